"""Is a model, prompt or data spec a Hub id, or something on this machine?

One answer for the Space (which accepts built-in names and Hub ids only: a path would read
the server's files) and for the model card (which names Hub ids and describes anything local in
words: a machine path must not be published). Mirrors how `pipeline.io.prompts.load_prompts`
decides: an existing path is local; so is anything shaped like a path even where it does not
exist (the card may be rendered on another machine than the one that ran the job).
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet", ".yaml", ".yml", ".journal", ".safetensors",
                 ".gguf", ".md", ".bin", ".pt")
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
LOCAL_MODEL = "a local model folder (its path is not published)"
LOCAL_FILE = "a local file (its path is not published)"
LOCAL_PATH = "<local path>"


def looks_local(spec: str) -> bool:
    """True for a path: it exists here, or it is shaped like one (absolute, relative, a file name)."""
    spec = str(spec).strip()
    if not spec:
        return False
    if spec.startswith((".", "/", "~", "\\")) or _DRIVE.match(spec) or "\\" in spec or spec.count("/") > 1:
        return True
    if Path(spec).suffix.lower() in FILE_SUFFIXES:
        return True
    try:
        return Path(spec).expanduser().exists()
    except OSError:  # a name too long for the file system is no path here
        return False


def is_hub_id(spec: str | None) -> bool:
    """`owner/name` that is not a path."""
    return bool(spec) and bool(HUB_ID.match(str(spec).strip())) and not looks_local(str(spec))


def is_name(spec: str) -> bool:
    """A bare name such as a built-in set (`censored`, `demo-pairs`) or `demo`: no slash, no path."""
    spec = str(spec).strip()
    return bool(spec) and "/" not in spec and not looks_local(spec)


def describe(spec: str | None, local: str = LOCAL_FILE) -> str | None:
    """A Hub id or a bare name as it is; anything local in words, without its path."""
    if spec is None:
        return None
    return str(spec) if is_hub_id(spec) or is_name(spec) else local
