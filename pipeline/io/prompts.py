"""Prompt sets: built-in names, local files and Hub datasets; disjoint measure/eval split.

A spec is resolved in this order:
1. a built-in name: ``pipeline/data/prompts/<name>.txt`` (``<name>.eval.txt``, when
   present, is its predefined held-out part);
2. an existing local file: ``.txt`` (one prompt per line), ``.json`` (a list of strings
   or of objects), ``.jsonl``, ``.csv`` or ``.parquet`` (a text column);
3. ``owner/name``: a Hub dataset, loaded with ``datasets.load_dataset``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import PACKAGE_DIR
from pipeline.errors import UserError
from pipeline.io.records import load_hub_dataset, locate, read_json_rows, read_text

PROMPTS_DIR = PACKAGE_DIR / "data" / "prompts"
EVAL_SUFFIX = ".eval.txt"
FILE_EXTENSIONS = (".txt", ".json", ".jsonl", ".csv", ".parquet")
TEXT_COLUMNS = ("prompt", "text", "instruction", "goal", "question", "query", "input")


@dataclass(frozen=True)
class PromptSet:
    source: str  # the spec as given, e.g. "censored", "data/x.txt", "owner/dataset"
    prompts: tuple[str, ...]
    eval_prompts: tuple[str, ...] = ()  # a predefined held-out part, when the source has one


@dataclass(frozen=True)
class PromptSplit:
    source: str
    measure: tuple[str, ...]
    evaluate: tuple[str, ...]
    seed: int = 0
    method: str = "shuffled"  # "shuffled" here, or "predefined" (the source's own eval part)
    eval_fraction: float | None = None  # None when the eval part was predefined
    available: int = 0  # distinct prompts in the source, eval part included

    def record(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "measure_size": len(self.measure),
            "eval_size": len(self.evaluate),
            "available": self.available,
            "seed": self.seed,
            "method": self.method,
            "eval_fraction": self.eval_fraction,
        }


def _fail(message: str, cls: type[UserError] = UserError) -> UserError:
    """A user error whose message is a single line."""
    return cls(" ".join(message.split()))


def _clean(items: Iterable[str]) -> tuple[str, ...]:
    """Strip, drop empties and de-duplicate, keeping first occurrences in order."""
    return tuple(dict.fromkeys(t for t in (i.strip() for i in items) if t))


def builtin_names() -> list[str]:
    """Names of the built-in prompt sets (``data/prompts/<name>.txt``, eval parts excluded)."""
    if not PROMPTS_DIR.is_dir():
        return []
    return sorted(
        p.name[: -len(".txt")]
        for p in PROMPTS_DIR.glob("*.txt")
        if p.is_file() and not p.name.endswith(EVAL_SUFFIX)
    )


def _read_text(path: Path) -> str:
    return read_text(path)


def _pick_column(columns: Sequence[str], column: str | None, where: str) -> str:
    shown = ", ".join(repr(c) for c in columns) or "none"
    if column is not None:
        if column in columns:
            return column
        raise _fail(
            f"Column {column!r} not found in {where}; available columns: {shown}. "
            "Pass one of them as the column."
        )
    by_lower = {c.lower(): c for c in reversed(columns)}
    for name in TEXT_COLUMNS:
        if name in by_lower:
            return by_lower[name]
    raise _fail(
        f"No text column found in {where} (looked for {', '.join(TEXT_COLUMNS)}); "
        f"available columns: {shown}. Pass the column to use."
    )


def _texts(values: Iterable[object], column: str, where: str) -> list[str]:
    out: list[str] = []
    for value in values:
        if value is None or (isinstance(value, float) and math.isnan(value)):  # empty cell
            continue
        if not isinstance(value, str):
            raise _fail(
                f"Column {column!r} in {where} holds {type(value).__name__} values, not text. "
                "Choose a text column."
            )
        out.append(value)
    return out


def _from_records(rows: list[Any], column: str | None, where: str) -> list[str]:
    """Rows are plain strings, or objects with a text field."""
    if all(isinstance(r, str) for r in rows):
        if column is not None:
            raise _fail(f"{where} holds plain strings, not objects with a {column!r} field.")
        return rows
    if not all(isinstance(r, dict) for r in rows):
        raise _fail(f"{where} must hold strings or objects with a text field. Fix the file.")
    columns = list(dict.fromkeys(str(k) for row in rows for k in row))
    chosen = _pick_column(columns, column, where)
    return _texts((row.get(chosen) for row in rows), chosen, where)


def _load_json(path: Path, column: str | None) -> list[str]:
    """A .json list or .jsonl lines of prompts (strings, or objects with a text field)."""
    return _from_records([row for _, row in read_json_rows(path)], column, str(path))


def _load_table(path: Path, column: str | None) -> list[str]:
    import pandas as pd
    import pyarrow as pa

    kind = path.suffix.lower()[1:]
    try:
        if kind == "csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            frame = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise _fail(f"Prompt file {path} is empty. Add prompts to it.") from None
    except (ValueError, OSError, ImportError, pa.ArrowException) as exc:
        raise _fail(f"Cannot read {path} as {kind} ({exc}). Check the file.") from None
    columns = [str(c) for c in frame.columns]
    chosen = _pick_column(columns, column, str(path))
    return _texts(frame.iloc[:, columns.index(chosen)].tolist(), chosen, str(path))


def _load_file(path: Path, column: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_text(path).splitlines()
    if suffix in (".json", ".jsonl"):
        return _load_json(path, column)
    if suffix in (".csv", ".parquet"):
        return _load_table(path, column)
    raise _fail(
        f"Unsupported prompt file type {suffix or '(none)'!r} for {path}; "
        f"use one of {', '.join(FILE_EXTENSIONS)}."
    )


def _load_hub(name: str, split: str, column: str | None, revision: str | None) -> list[str]:
    dataset = load_hub_dataset(name, split, revision)
    where = f"Hub dataset {name!r} split {split!r}"
    chosen = _pick_column(list(dataset.column_names), column, where)
    return _texts(dataset[chosen], chosen, where)


def load_prompts(
    spec: str,
    *,
    split: str = "train",
    column: str | None = None,
    revision: str | None = None,
) -> PromptSet:
    """Load a prompt set from a built-in name, a local file or a Hub dataset (see module doc)."""
    spec = spec.strip()
    names = builtin_names()
    eval_prompts: tuple[str, ...] = ()
    if not spec:
        choices = ", ".join(names)
        raise _fail(f"No prompt set given. Use a built-in name ({choices}), a file or a Hub id.")
    kind, path = locate(spec, names, FILE_EXTENSIONS)
    if kind == "builtin":
        raw = _read_text(PROMPTS_DIR / f"{spec}.txt").splitlines()
        eval_path = PROMPTS_DIR / f"{spec}{EVAL_SUFFIX}"
        if eval_path.is_file():
            eval_prompts = _clean(_read_text(eval_path).splitlines())
        where = f"built-in prompt set {spec!r}"
    elif kind == "file":
        raw, where = _load_file(path, column), f"prompt file {path}"
    elif kind == "folder":
        raise _fail(f"{path} is not a file. Give a prompt file ({', '.join(FILE_EXTENSIONS)}).")
    elif kind == "missing":
        raise _fail(f"Prompt file not found: {path}. Check the path.")
    elif kind == "hub":
        raw, where = _load_hub(spec, split, column, revision), f"Hub dataset {spec!r}"
    else:
        raise _fail(
            f"Unknown prompt set {spec!r}: not a built-in name ({', '.join(names) or 'none'}), "
            "an existing file, or a Hub dataset id like owner/name."
        )
    prompts = _clean(raw)
    if not prompts:
        raise _fail(f"The {where} holds no prompts. Add prompts or choose another set.")
    return PromptSet(source=spec, prompts=prompts, eval_prompts=eval_prompts)


def _shuffled(items: Sequence[str], rng: random.Random) -> list[str]:
    out = list(items)
    rng.shuffle(out)
    return out


def split_prompts(
    prompt_set: PromptSet,
    *,
    eval_fraction: float = 0.25,
    seed: int = 0,
    max_measure: int | None = None,
    max_eval: int | None = None,
) -> PromptSplit:
    """Split into disjoint measure/evaluate parts, deterministically for a seed.

    A predefined eval part is used when present (its prompts are removed from measure);
    otherwise a seeded shuffle holds out ``eval_fraction`` of the prompts. Both parts
    are in seeded random order, so the optional caps take random subsets.
    """
    for name, cap in (("max_measure", max_measure), ("max_eval", max_eval)):
        if cap is not None and cap < 2:
            raise _fail(f"{name} is {cap}; it must be at least 2, or unset.")
    rng = random.Random(seed)
    prompts = _clean(prompt_set.prompts)
    if prompt_set.eval_prompts:
        evaluate = _shuffled(_clean(prompt_set.eval_prompts), rng)
        held_out = set(evaluate)
        measure = _shuffled([p for p in prompts if p not in held_out], rng)
        method, fraction = "predefined", None
        available = len(measure) + len(evaluate)
    else:
        if not 0.0 < eval_fraction < 1.0:
            message = f"eval_fraction is {eval_fraction}; it must be between 0 and 1 (e.g. 0.25)."
            raise _fail(message)
        order = _shuffled(prompts, rng)
        n_eval = min(max(1, round(len(order) * eval_fraction)), max(len(order) - 1, 0))
        evaluate, measure = order[:n_eval], order[n_eval:]
        method, fraction = "shuffled", float(eval_fraction)
        available = len(order)
    measure = measure[:max_measure] if max_measure is not None else measure
    evaluate = evaluate[:max_eval] if max_eval is not None else evaluate
    if len(measure) < 2 or len(evaluate) < 2:
        raise _fail(
            f"Prompt set {prompt_set.source!r} gives {len(measure)} measure and {len(evaluate)} "
            f"eval prompts (of {available}); each part needs at least 2. Add prompts or change "
            "eval_fraction."
        )
    return PromptSplit(
        source=prompt_set.source,
        measure=tuple(measure),
        evaluate=tuple(evaluate),
        seed=seed,
        method=method,
        eval_fraction=fraction,
        available=available,
    )
