"""Benchmarks through lm-evaluation-harness: the same tasks on the base model and the edited one,
and the change of each score (`evaluate --benchmarks TASKS`).

The models are handed to lm-eval already loaded (no second load from disk). Tasks are lm-eval's own
names (``hellaswag``, ``arc_easy``, ...) or tasks defined in YAML files of an ``--benchmarks-include``
folder, e.g. a multiple-choice task over a local JSON file, which needs no network.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import UserError

log = logging.getLogger(__name__)
NOT_INSTALLED = "lm-evaluation-harness is not installed: pip install lm-eval"


class BenchmarkConfig(BaseModel):
    """Benchmarks (lm-evaluation-harness) run on the base model and this model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    benchmarks: str | None = Field(
        None, description="lm-eval tasks, comma-separated (e.g. hellaswag,arc_easy); scores of base and model "
        "and their change go into eval_results.json and the card.")
    benchmarks_include: str | None = Field(
        None, description="A folder of lm-eval task YAML files (tasks of your own, e.g. over a local file).")
    benchmarks_limit: int | None = Field(
        None, ge=1, description="Examples per task at most (a quick, rougher score); default: all.")
    benchmarks_batch_size: int = Field(8, ge=1, description="Batch size of the benchmark runs.")

    def tasks(self) -> list[str]:
        return [t.strip() for t in (self.benchmarks or "").split(",") if t.strip()]


def task_manager(cfg: BenchmarkConfig) -> Any:
    """lm-eval's task registry with the tasks checked, before any model is loaded (None without tasks)."""
    if not cfg.tasks():
        return None
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UserError(NOT_INSTALLED) from exc
    from pathlib import Path

    if cfg.benchmarks_include and not Path(cfg.benchmarks_include).is_dir():
        raise UserError(f"--benchmarks-include: no such folder: {cfg.benchmarks_include}")
    manager = TaskManager(include_path=cfg.benchmarks_include)
    unknown = [t for t in cfg.tasks() if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)} (see `lm-eval ls tasks`, or give a folder "
                        "of task YAMLs with --benchmarks-include)")
    return manager


def run_benchmarks(model: Any, tokenizer: Any, cfg: BenchmarkConfig, manager: Any = None) -> dict[str, dict]:
    """Task -> metric -> score of a loaded model ({} without tasks)."""
    tasks = cfg.tasks()
    if not tasks:
        return {}
    manager = manager or task_manager(cfg)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.benchmarks_batch_size)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=cfg.benchmarks_limit,
                          log_samples=False, verbosity="WARNING")
    return {task: _scores(values) for task, values in ((out or {}).get("results") or {}).items()}


def _scores(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's "acc,none" keys as plain metric names; the standard errors kept as "<metric>_stderr"."""
    scores = {}
    for key, value in values.items():
        metric, comma, _filter = key.partition(",")
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if comma and numeric:  # "alias", "name" and "sample_len" carry no filter suffix
            scores[metric] = float(value)
    return scores


def compare(base: dict[str, dict], model: dict[str, dict]) -> dict[str, dict]:
    """Task -> metric -> {"base", "model", "delta"} (delta: model minus base; stderr entries left out)."""
    out: dict[str, dict] = {}
    for task, scores in model.items():
        rows = {}
        for metric, value in scores.items():
            if metric.endswith("_stderr"):
                continue
            before = (base.get(task) or {}).get(metric)
            rows[metric] = {"base": before, "model": round(value, 6),
                            "delta": None if before is None else round(value - before, 6),
                            "stderr": scores.get(f"{metric}_stderr")}
        out[task] = rows
    return out
