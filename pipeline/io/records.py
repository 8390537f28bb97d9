"""Reading user data: where a spec points, JSON/JSONL rows, Hub datasets. Shared by prompts and pairs.

Prompt sets (`pipeline.io.prompts`) and training data (`pipeline.tuning.pairs`) accept the same kinds of
spec: a built-in name, a local file, or a Hub dataset `owner/name`. One reader each, so the
two give the same answer and the same one-line errors. JSON rows are read here rather than with
`datasets.load_dataset("json")`: Arrow needs one schema for every row (a chat-message list in
one row and a string in the next fails), and its errors do not name the line to fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import AuthError, HubError, UserError
from pipeline.io.sources import HUB_ID

SpecKind = Literal["builtin", "file", "folder", "missing", "hub", "unknown"]


def locate(spec: str, builtins: tuple[str, ...] | list[str], suffixes: tuple[str, ...]) -> tuple[SpecKind, Path]:
    """What `spec` names: a built-in set, an existing file or folder, a missing path, a Hub id, or nothing.

    Anything shaped like a path (a known suffix, a leading `.`/`/`/`~`, two slashes) is a path even
    when it does not exist, so a typo in a file name is reported as a missing file, not as a Hub id.
    """
    path = Path(spec).expanduser()
    if spec in builtins:
        return "builtin", path
    if path.is_file():
        return "file", path
    if path.exists():
        return "folder", path
    if path.suffix.lower() in suffixes or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        return "missing", path
    if HUB_ID.match(spec):
        return "hub", path
    return "unknown", path


def read_text(path: Path) -> str:
    """A UTF-8 text file, or a one-line error (missing, not UTF-8, unreadable)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"file not found: {path}. Check the path.") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc}): check its permissions") from None


def read_json_rows(path: Path) -> list[tuple[str, Any]]:
    """The rows of a `.json` list or a `.jsonl` file, each with where it is (`FILE line N` / `FILE item N`)."""
    path = Path(path)
    text = read_text(path)
    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path} line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {number} is not valid JSON ({exc.msg}): fix that line") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}): fix it") from None
    if not isinstance(data, list):
        raise UserError(f"{path} must hold a JSON list (or use .jsonl, one item per line)")
    return [(f"{path} item {i}", row) for i, row in enumerate(data, start=1)]


def load_hub_dataset(name: str, split: str, revision: str | None = None, split_flag: str = "--split") -> Any:
    """One split of a Hub dataset, read with this job's token; Hub failures as one-line errors."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    from pipeline.io.hub_token import check_access, token_kwargs

    at = f" (revision {revision!r})" if revision else ""
    fallback = "or use a built-in set or a local file"
    try:
        # the job's own Hub token, and no cached copy for a user the Hub refuses (see pipeline/io/hub_token.py)
        check_access(name, revision, "dataset")
        return datasets.load_dataset(name, split=split, revision=revision, **token_kwargs())
    except (GatedRepoError, DatasetNotFoundError, RepositoryNotFoundError) as exc:
        # datasets words a gated repo only in its message
        if isinstance(exc, GatedRepoError) or (isinstance(exc, DatasetNotFoundError) and "gated" in str(exc).lower()):
            raise AuthError(f"Hub dataset {name!r} is gated: accept its terms at https://huggingface.co/datasets/"
                            f"{name} and set HF_TOKEN to that account's token") from None
        raise HubError(f"Hub dataset {name!r}{at} not found, or private (then set HF_TOKEN): check the name, "
                       f"{fallback}") from None
    except (ConnectionError, TimeoutError, HfHubHTTPError) as exc:
        raise HubError(f"Hub dataset {name!r} could not be loaded ({_first_line(exc)}): check the network and "
                       f"HF_HUB_OFFLINE, {fallback}") from None
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise UserError(f"Split {split!r} not found in Hub dataset {name!r} ({_first_line(exc)}): "
                            f"pass {split_flag}") from None
        raise HubError(f"cannot load Hub dataset {name!r}{at}: {_first_line(exc)}") from None
    except OSError as exc:
        raise HubError(f"cannot load Hub dataset {name!r}{at}: {_first_line(exc)}: check the name") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
