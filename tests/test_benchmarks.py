"""Benchmarks through lm-evaluation-harness, offline: a multiple-choice task over a local file of the
demo's facts, run by `evaluate --benchmarks` on base and model."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from pipeline.evaluation import benchmarks as bm

pytest.importorskip("lm_eval")

TASK = """task: demo_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "<|im_start|>user\\n{{{{question}}}}<|im_end|>\\n<|im_start|>assistant\\n"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Every demo topic asked once; the choices are its own fact and two other topics' facts."""
    from pipeline.io.demo import demo_examples

    examples = {ex.topic: ex for ex in demo_examples("eval")}
    topics = sorted(examples)
    rows = []
    for i, topic in enumerate(topics):
        others = [examples[topics[(i + k) % len(topics)]].answer for k in (7, 19)]
        answer = i % 3
        choices = others[:answer] + [examples[topic].answer] + others[answer:]
        rows.append({"question": f"Tell me about {topic}.", "choices": choices, "answer": answer})
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "demo_facts.yaml").write_text(TASK.format(data=folder / "facts.jsonl"))
    return folder


@pytest.mark.slow  # about two minutes: importing lm-eval, and three benchmark runs
def test_evaluate_with_benchmarks(task_dir, tmp_path, demo_loaded, one_thread) -> None:
    from pipeline.cli.main import main

    out = tmp_path / "eval.json"
    code = main(["evaluate", "demo", "--base", "demo", "--max-eval", "4", "--max-new-tokens", "16", "--no-perplexity",
                 "--benchmarks", "demo_facts", "--benchmarks-include", str(task_dir), "--json", str(out)])
    assert code == 0
    acc = json.loads(out.read_text())["benchmarks"]["demo_facts"]["acc"]
    assert acc["base"] == acc["model"] and acc["delta"] == 0.0
    assert acc["model"] >= 0.6  # the demo learnt its facts (chance: 1/3; its refusals pull some down)
    assert 0 < acc["stderr"] < 0.2
    # A copy whose knowledge is scrambled scores about chance (1/3): the benchmark sees the damage.
    scrambled = copy.deepcopy(demo_loaded.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in scrambled.get_decoder().layers:
            for p in layer.parameters():
                if p.dim() == 2:
                    p.add_(torch.randn(p.shape, generator=gen) * 3 * p.std())
    cfg = bm.BenchmarkConfig(benchmarks="demo_facts", benchmarks_include=str(task_dir))
    scores = bm.compare({"demo_facts": {"acc": acc["base"]}},
                        bm.run_benchmarks(scrambled, demo_loaded.tokenizer, cfg))
    assert scores["demo_facts"]["acc"]["model"] <= 0.55
    assert scores["demo_facts"]["acc"]["delta"] <= -0.1


def test_benchmark_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(UserError, match="unknown lm-eval task.*not_a_task"):
        bm.task_manager(bm.BenchmarkConfig(benchmarks="not_a_task", benchmarks_include=str(tmp_path)))
    with pytest.raises(UserError, match="no such folder"):
        bm.task_manager(bm.BenchmarkConfig(benchmarks="x", benchmarks_include=str(tmp_path / "missing")))
    assert bm.task_manager(bm.BenchmarkConfig()) is None  # no tasks: nothing to check, nothing run
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    with pytest.raises(UserError) as err:
        bm.task_manager(bm.BenchmarkConfig(benchmarks="hellaswag"))
    assert str(err.value) == bm.NOT_INSTALLED
