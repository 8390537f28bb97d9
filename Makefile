# Every target sets itself up: a fresh clone needs only python3 (3.11+).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)

# Abliterate the built-in demo model and print the before/after evaluation.
run: $(STAMP)
	$(BIN)/python -m pipeline abliterate demo --out out/demo-abliterated --overwrite

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/bench_directions.py
	$(BIN)/python bench/bench_generation.py
	$(BIN)/python bench/bench_streaming.py

clean:
	rm -rf out tests/_output bench/results
