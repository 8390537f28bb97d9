"""What identifies a `run` job's result, so a re-run reuses a finished stage only when it is the same.

A fingerprint is the SHA-256 of everything that determines a stage's output: the model (a Hub
id and revision; a local folder by the names, sizes and modification times of its files), the
method, every setting, and each prompt or data source (a local file by its content). Stages:

* ``directions``: model, load settings, prompt and measurement settings, prompt sources;
* ``edit``: the directions' fingerprint, the method and the edit (or tuning) settings and data;
* ``eval``: the edit's fingerprint and the evaluation settings and sources.

Each is stored beside its stage's files in a hidden JSON file (never uploaded: the push skips
hidden files). The default output folder also names the model's owner, so `orgA/X` and `orgB/X`
never share a folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.io.output import sha256_file, write_text

log = logging.getLogger(__name__)

FINGERPRINT_FILE = ".abliterator-fingerprint.json"
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")
# Options read by the evaluation only: changing them re-evaluates but keeps the edit.
EVAL_ONLY = ("max_new_tokens", "markers_file", "replace_markers", "num_samples", "prefill_think", "perplexity",
             "perplexity_file")
# Options naming a file, a folder, a built-in set or a Hub dataset.
SOURCE_KEYS = ("harmful", "harmless", "markers_file", "perplexity_file", "data", "positive", "negative", "vector")


def digest(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _folder_signature(folder: Path) -> list[tuple[str, int, int]]:
    """Name, size and modification time of the model files: cheap, and changes when the files do."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and (p.suffix in WEIGHT_SUFFIXES
                                                                      or p.suffix == ".json")]
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def model_identity(model: str, revision: str | None) -> dict[str, Any]:
    path = Path(model).expanduser()
    if path.is_dir():
        return {"folder": str(path.resolve()), "files": _folder_signature(path)}
    return {"model": model, "revision": revision}


def source_identity(spec: Any) -> Any:
    """A source as given, plus the content hash of a local file (a folder: its file signature)."""
    if not isinstance(spec, str) or not spec:
        return spec
    path = Path(spec).expanduser()
    if path.is_file():
        return {"spec": spec, "sha256": sha256_file(path)}
    if path.is_dir():
        return {"spec": spec, "files": _folder_signature(path)}
    return {"spec": spec}


def stage_fingerprints(model: str, method: str, options: dict[str, Any]) -> dict[str, str]:
    """{"directions", "edit", "eval"}: each stage's fingerprint, including the stages before it."""
    from pipeline.edit.directions import DirectionsConfig
    from pipeline.edit.stages import PromptsConfig
    from pipeline.io.loading import LoadConfig

    opts = {str(k).replace("-", "_"): v for k, v in options.items()}
    sources = {k: source_identity(opts[k]) for k in SOURCE_KEYS if k in opts}
    settings = {k: v for k, v in opts.items() if k not in SOURCE_KEYS}
    measuring = set(LoadConfig.model_fields) | set(PromptsConfig.model_fields) | set(DirectionsConfig.model_fields)
    directions = digest({
        "model": model_identity(model, opts.get("revision")),
        "settings": {k: v for k, v in settings.items() if k in measuring},
        "sources": {k: v for k, v in sources.items() if k in ("harmful", "harmless")},
    })
    # abliterate evaluates after the edit; auto, dpo and steer evaluate while they make it (the search
    # chooses by it), so for them every setting belongs to the edit.
    eval_only = EVAL_ONLY if method == "abliterate" else ()
    edit = digest({
        "directions": directions, "method": method,
        "settings": {k: v for k, v in settings.items() if k not in eval_only},
        "sources": {k: v for k, v in sources.items() if k not in eval_only},
    })
    evaluation = digest({"edit": edit, "settings": settings, "sources": sources})
    return {"directions": directions, "edit": edit, "eval": evaluation}


def read(folder: Path) -> dict[str, str]:
    """The fingerprints stored in `folder` ({} when there are none or the file is unreadable)."""
    try:
        data = json.loads((Path(folder) / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(folder: Path, **stages: str) -> None:
    """Add or replace stage fingerprints in `folder`."""
    data = {**read(folder), **stages}
    write_text(Path(folder) / FINGERPRINT_FILE, json.dumps(data, indent=2, sort_keys=True) + "\n")


def matches(folder: Path, stage: str, expected: str) -> bool:
    return read(folder).get(stage) == expected


def default_folder_name(model: str, method: str) -> str:
    """`owner--name-method` for a Hub id (so orgA/X and orgB/X differ), else the folder's or `demo`'s name."""
    from pipeline.io.sources import is_hub_id

    if is_hub_id(model):
        owner, name = model.split("/")
        return f"{owner}--{name}-{method}"
    return f"{Path(model).name}-{method}"
