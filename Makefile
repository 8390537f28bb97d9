# Every target sets itself up: a fresh clone needs only python3 (3.11+).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run demo test lint bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)

# Start the Space on http://127.0.0.1:7860 with the demo model preselected.
# (CLI twin: make demo)
run: $(STAMP)
	GRADIO_SERVER_NAME=127.0.0.1 GRADIO_SERVER_PORT=7860 $(BIN)/python app.py

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/bench_directions.py
	$(BIN)/python bench/bench_generation.py
	$(BIN)/python bench/bench_streaming.py
	$(BIN)/python bench/bench_search.py
	$(BIN)/python bench/bench_tune.py
	$(BIN)/python bench/bench_real.py
	$(BIN)/python bench/bench_heal.py

clean:
	rm -rf out tests/_output bench/results

# Abliterate the built-in demo model from the CLI and print the before/after evaluation.
demo: $(STAMP)
	$(BIN)/python -m pipeline abliterate demo --out out/demo-abliterated --overwrite
