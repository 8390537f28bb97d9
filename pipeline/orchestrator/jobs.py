"""Several jobs from one YAML recipe, run one after the other; a failed job does not stop the rest.

```yaml
defaults:            # applied to every job
  private: true
  options: {preset: standard}
jobs:                # explicit jobs ...
  - {model: demo, repo_id: alice/demo-abliterated}
matrix:              # ... and/or every model x method
  models: [demo, Qwen/Qwen3-0.6B]
  methods: [abliterate, auto]
  repo_id: "alice/{name}-{method}"   # {name} is the model's last path part
```
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.errors import UserError
from pipeline.orchestrator.run import RunJob, run_job
from pipeline.progress import Progress

log = logging.getLogger(__name__)


def _job(entry: dict[str, Any], defaults: dict[str, Any], where: str) -> RunJob:
    merged = {**defaults, **entry, "options": {**defaults.get("options", {}), **entry.get("options", {})}}
    try:
        return RunJob(**merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        message = str(err["msg"]).removeprefix("Value error, ")
        raise UserError(f"{where}: {'.'.join(map(str, err['loc']))}: {message}") from exc


RECIPE_KEYS = ("defaults", "jobs", "matrix")
MATRIX_KEYS = ("models", "methods", "repo_id")


def _check_keys(data: Any, valid: tuple[str, ...], where: str) -> None:
    """A misspelt section (`job:` for `jobs:`) is an error, not silently ignored."""
    from pipeline.orchestrator.options import unknown_key_message

    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping")
    for key in data:
        if key not in valid:
            raise UserError(f"{where}: {unknown_key_message(str(key), valid, 'key')}")


def load_jobs(path: Path) -> list[RunJob]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise UserError(f"recipe '{path}' not found") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"recipe '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict) or not (data.get("jobs") or data.get("matrix")):
        raise UserError(f"recipe '{path}' needs a 'jobs' list or a 'matrix' of models and methods")
    _check_keys(data, RECIPE_KEYS, f"recipe '{path}'")
    _check_keys(data.get("matrix") or {}, MATRIX_KEYS, f"recipe '{path}': matrix")
    defaults = data.get("defaults") or {}
    jobs = [_job(e, defaults, f"{path}: job {i + 1}") for i, e in enumerate(data.get("jobs") or [])]
    matrix = data.get("matrix") or {}
    for model in matrix.get("models", []):
        for method in matrix.get("methods", ["abliterate"]):
            repo = matrix.get("repo_id", "").format(name=Path(model).name, method=method) or None
            jobs.append(_job({"model": model, "method": method, "repo_id": repo}, defaults, f"{path}: {model}"))
    return jobs


def run_jobs(jobs: list[RunJob], progress: Progress | None = print, token: str | None = None) -> int:
    """Run every job; report all outcomes at the end. Exit code: 0, or the first failure's."""
    outcomes: list[tuple[RunJob, str, int]] = []
    for i, job in enumerate(jobs, 1):
        if len(jobs) > 1 and progress:
            progress(f"[job {i}/{len(jobs)}] {job.model} -> {job.method} -> {job.repo_id or 'no push'}")
        try:
            result = run_job(job, progress, token)
            outcomes.append((job, f"ok: {result['url'] or result['out']}", 0))
        except UserError as exc:
            outcomes.append((job, f"failed: {exc}", exc.exit_code))
            print(f"error: {exc}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - a bug in one job must not cost the other jobs their run
            log.error("job %d (%s) failed unexpectedly", i, job.model, exc_info=True)
            line = " ".join(f"unexpected error ({type(exc).__name__}): {exc}".split())
            outcomes.append((job, f"failed: {line}", 1))
            print(f"error: {line}", file=sys.stderr)
    if progress:
        progress("summary:")
        for job, text, _ in outcomes:
            progress(f"  {job.model} [{job.method}] {text}")
    failures = [code for _, _, code in outcomes if code]
    return failures[0] if failures else 0
