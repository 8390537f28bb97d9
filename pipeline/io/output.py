"""The output-folder contract: written to a temporary folder, renamed when complete.

Every stage that produces a model (abliterate, tune, steer) writes config,
safetensors weights, tokenizer, generation config and `recipe.json`. A
half-written folder never takes the place of the user's data: the work happens
in a sibling temporary folder, and the rename is the last step.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import UserError

RECIPE_FILE = "recipe.json"
EVAL_FILE = "eval_results.json"
PACKAGES = (
    "torch",
    "transformers",
    "huggingface_hub",
    "safetensors",
    "accelerate",
    "peft",
    "trl",
    "datasets",
    "optuna",
)


def check_target(out: Path, overwrite: bool) -> None:
    """Fail before any work if the output folder exists and may not be replaced."""
    if out.exists() and not overwrite:
        raise UserError(
            f"output folder '{out}' already exists: pass --overwrite to replace it, or choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"output path '{out}' is a file, not a folder: choose another --out")


@contextmanager
def staged_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out` atomically."""
    out = Path(out)
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "pipeline": "0.1.0"}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


# A caller that is not the command line (the Space) records the equivalent command here.
RECORDED_COMMAND: ContextVar[str | None] = ContextVar("recorded_command", default=None)


def command_line() -> str:
    if RECORDED_COMMAND.get():
        return RECORDED_COMMAND.get()
    return " ".join(["python -m pipeline", *sys.argv[1:]]) if sys.argv and "pipeline" in sys.argv[0] else ""


INDEX_FILE = "model.safetensors.index.json"


def is_weight_shard(path: Path) -> bool:
    return not path.name.startswith("directions")


def weight_shards(folder: Path) -> list[Path]:
    """The safetensors files holding a saved model's weights, from its index when it has one."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        return [folder / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    # neither saved directions nor an adapter kept beside the merged model are its weights
    return [p for p in sorted(folder.glob("*.safetensors")) if not p.name.startswith(("directions", "adapter_model"))]


def tensor_index(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name of a saved model folder (empty when it has no weights)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    names: dict[str, str] = {}
    for shard in weight_shards(folder):
        with safe_open(str(shard), framework="pt") as handle:
            names.update(dict.fromkeys(handle.keys(), shard.name))
    return names


def write_recipe(folder: Path, recipe: dict) -> dict:
    """Complete `recipe` with versions, shard hashes and time, and write recipe.json."""
    full = {
        **recipe,
        "versions": package_versions(),
        "shards": {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors")) if is_weight_shard(p)},
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    full.setdefault("command", command_line())
    write_json(folder / RECIPE_FILE, full)
    return full


@contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only when the block finishes.

    The one way every file of ours is written: a crash or a bad value mid-write leaves the old
    file (or none), never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path | str, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")
    return Path(path)


def write_json(path: Path | str, data: dict) -> Path:
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(rows: Iterable[dict], path: Path | str) -> Path:
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise UserError(f"'{path}' not found") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"'{path}' is not valid JSON (line {exc.lineno}): fix or delete it") from exc
