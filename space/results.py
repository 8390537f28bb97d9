"""What a job leaves to its user: a dry run's result as a zip to download, and the command that
reproduces the job from the command line (written into the recipe and the card).

Zips live in one folder under the temporary directory and are pruned by age and count at each new
zip, so the disk stays bounded however many dry runs come. A zip is written under a temporary name
and renamed when complete: a download never gets half a file.
"""

from __future__ import annotations

import os
import shlex
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

RESULTS_DIR = "abliterator-results"
KEEP_SECONDS = int(os.environ.get("ABLITERATOR_RESULTS_KEEP_S") or 3600)
KEEP_COUNT = int(os.environ.get("ABLITERATOR_RESULTS_KEEP") or 8)
CLI_FLAGS = {"method": "--edit-method"}  # options whose flag differs from the option name


def results_root() -> Path:
    return Path(tempfile.gettempdir()) / RESULTS_DIR


def prune(root: Path, keep_seconds: float = KEEP_SECONDS, keep_count: int = KEEP_COUNT) -> None:
    """Drop zips older than `keep_seconds`, then the oldest beyond `keep_count`."""
    if not root.is_dir():
        return
    zips = sorted(root.glob("*/*.zip"), key=lambda p: p.stat().st_mtime, reverse=True)
    now = time.time()
    for i, path in enumerate(zips):
        if i >= keep_count or now - path.stat().st_mtime > keep_seconds:
            path.unlink(missing_ok=True)
            try:
                path.parent.rmdir()
            except OSError:
                pass


def pack(folder: Path, name: str) -> Path:
    """Zip an output folder (its visible files: the model, card, recipe, evaluation, charts) for download."""
    root = results_root()
    root.mkdir(parents=True, exist_ok=True)
    prune(root, keep_count=KEEP_COUNT - 1)
    target = root / uuid.uuid4().hex / f"{name}.zip"
    target.parent.mkdir()
    partial = target.with_name(f".{target.name}.partial")
    # Stored, not deflated: safetensors barely compress, and the CPU is better spent on the next job.
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                zf.write(path, f"{name}/{rel.as_posix()}")
    partial.replace(target)
    return target


def reproduce_command(model_id: str, method: str, repo_id: str | None, private: bool, options: dict[str, Any]) -> str:
    """The `python -m pipeline run ...` line that makes the same model (and publishes it to `repo_id`)."""
    words = ["python", "-m", "pipeline", "run", model_id, "--method", method]
    if repo_id:
        words += ["--repo-id", repo_id]
    if private:
        words.append("--private")
    for key, value in options.items():
        flag = CLI_FLAGS.get(key) or "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif value is not None and value != "":
            words += [flag, str(value)]
    return shlex.join(words)
