"""What a job leaves to its user: a dry run's result as a zip to download (kept for the session, so a
publish with the same settings uploads it instead of making it again), and the command that reproduces
the job from the command line (written into the recipe and the card).

Zips live in one folder under the temporary directory and are pruned by age and count at each new
zip, so the disk stays bounded however many dry runs come. A zip is written under a temporary name
and renamed when complete: a download never gets half a file.
"""

from __future__ import annotations

import json
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
STAMP = "fingerprint.json"  # beside the zip: the pipeline's fingerprint of the settings that made it


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
    from pipeline.orchestrator.fingerprint import FINGERPRINT_FILE

    if (folder / FINGERPRINT_FILE).is_file():
        (target.parent / STAMP).write_bytes((folder / FINGERPRINT_FILE).read_bytes())
    return target


def unpack(zip_path: str | Path, out: Path, command: str) -> bool:
    """Restore a kept dry-run result into `out` with its fingerprint, so `run_job` reuses it when the
    settings still match (and makes it again when they do not). False when it was pruned meanwhile."""
    from pipeline.io.output import RECIPE_FILE, read_json, write_json
    from pipeline.orchestrator.fingerprint import FINGERPRINT_FILE

    zip_path = Path(zip_path)
    root = results_root().resolve()
    if not zip_path.resolve().is_relative_to(root) or not zip_path.is_file() or not (zip_path.parent / STAMP).is_file():
        return False
    prefix = f"{zip_path.stem}/"
    staged = out.with_name(f".{out.name}.unpacking")
    with zipfile.ZipFile(zip_path) as zf:
        for member in zf.namelist():
            rel = Path(member.removeprefix(prefix))
            if not member.startswith(prefix) or rel.is_absolute() or ".." in rel.parts:
                continue
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            (staged / rel).write_bytes(zf.read(member))
    (staged / FINGERPRINT_FILE).write_text(json.dumps(json.loads((zip_path.parent / STAMP).read_text())))
    if (staged / RECIPE_FILE).is_file():  # the command now names the repo it is published to
        write_json(staged / RECIPE_FILE, {**read_json(staged / RECIPE_FILE), "command": command})
    staged.replace(out)
    return True


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
