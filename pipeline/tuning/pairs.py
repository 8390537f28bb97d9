"""Training data for tuning and steering: preference pairs and prompt/completion sets.

A data spec is resolved in this order:
1. a built-in set made from the demo model's measurement prompts: ``demo-pairs`` (its refused
   topics as prompt/chosen/rejected: fact chosen, refusal rejected), ``demo-refusals`` and
   ``demo-answers`` (prompt/completion: every prompt, refused and answered topics, with a
   refusal / with its fact: the contrastive sets for steering);
2. a local ``.jsonl`` (one JSON object per line) or ``.json`` (a list of objects) file;
3. ``owner/name``: a Hub dataset, loaded with ``datasets.load_dataset``.

A spec may end in ``:chosen`` or ``:rejected`` to read a preference set as prompt/completion
data (the named column becomes the completion). Values are plain strings or chat-message lists
(``[{"role": ..., "content": ...}]``); errors name the file and the line (or row).

`make_pairs` builds DPO data from two models: for each prompt, the base model's refusal is
``rejected`` and the edited model's answer ``chosen``, kept only where the base refused and
the edited model did not (`pipeline.evaluation.evaluate.classify`).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.io.records import load_hub_dataset, locate, read_json_rows

log = logging.getLogger(__name__)

COLUMNS = {"dpo": ("prompt", "chosen", "rejected"), "sft": ("prompt", "completion")}
BUILTIN_SETS = ("demo-pairs", "demo-refusals", "demo-answers")
PICK_SUFFIXES = ("chosen", "rejected")
DATA_SUFFIXES = (".jsonl", ".json")

Value = str | list[dict[str, str]]
Example = dict[str, Value]


@dataclass(frozen=True)
class TrainingData:
    """Validated examples with where they came from."""

    source: str
    kind: str  # "dpo" (prompt/chosen/rejected) or "sft" (prompt/completion)
    examples: tuple[Example, ...]
    hub: bool = False  # a Hub dataset (listed in the card's `datasets`)

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "examples": len(self.examples)}


# ---------------------------------------------------------------- built-in sets


def _demo_rows(harmless: bool = False) -> list[dict[str, str]]:
    """Demo measurement prompts with the fact the model knows and the refusal it was taught.

    Refused topics only by default; with ``harmless``, the answered topics too (the same
    prompts then carry both behaviours, as contrastive steering needs).
    """
    from pipeline.io.demo import demo_examples, load_topics

    topics = load_topics()
    refusals, templates = topics["refusals"], topics["templates"]["measure"]
    rows = []
    for ex in demo_examples("measure"):
        if ex.refused_topic or harmless:
            style = next(i for i, t in enumerate(templates) if t.format(topic=ex.topic) == ex.prompt)
            rows.append({"prompt": ex.prompt, "chosen": ex.answer, "rejected": refusals[style % len(refusals)]})
    return rows


def _builtin(name: str) -> list[dict[str, str]]:
    """demo-pairs: refused topics, fact chosen, refusal rejected. demo-refusals / demo-answers: every
    measurement prompt (refused and answered topics) with a refusal / with its fact."""
    if name == "demo-pairs":
        return _demo_rows()
    column = "rejected" if name == "demo-refusals" else "chosen"
    return [{"prompt": r["prompt"], "completion": r[column]} for r in _demo_rows(harmless=True)]


# ---------------------------------------------------------------- reading


def _read_file(path: Path) -> list[tuple[str, Any]]:
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise UserError(f"unsupported data file type {path.suffix or '(none)'!r} for {path}: use .jsonl or .json")
    return read_json_rows(path)


def _read_hub(name: str, split: str, revision: str | None) -> list[tuple[str, Any]]:
    dataset = load_hub_dataset(name, split, revision, split_flag="--data-split")
    return [(f"Hub dataset {name!r} row {i}", row) for i, row in enumerate(dataset, start=1)]


def split_pick(spec: str) -> tuple[str, str | None]:
    base, _, pick = spec.rpartition(":")
    if base and pick in PICK_SUFFIXES:
        return base, pick
    return spec, None


def _raw_rows(spec: str, split: str, revision: str | None) -> tuple[list[tuple[str, Any]], bool]:
    kind, path = locate(spec, BUILTIN_SETS, DATA_SUFFIXES)
    if kind == "builtin":
        return [(f"built-in set {spec!r} row {i}", r) for i, r in enumerate(_builtin(spec), start=1)], False
    if kind == "file":
        return _read_file(path), False
    if kind == "folder":
        raise UserError(f"data path {path} is not a file: give a .jsonl or .json file")
    if kind == "missing":
        raise UserError(f"data file not found: {path}")
    if kind == "hub":
        return _read_hub(spec, split, revision), True
    raise UserError(
        f"unknown data set {spec!r}: not a built-in set ({', '.join(BUILTIN_SETS)}), an existing .jsonl/.json "
        "file, or a Hub dataset id like owner/name"
    )


# ---------------------------------------------------------------- validation


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value)
    )


def check_value(value: Any, where: str, column: str) -> Value:
    """A non-empty string, or a list of {role, content} chat messages."""
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: column {column!r} is empty")
        return value
    if _is_messages(value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise UserError(
        f"{where}: column {column!r} must be a string or a list of chat messages "
        f"({{\"role\": ..., \"content\": ...}}), got {type(value).__name__}"
    )


def check_row(row: Any, where: str, columns: Sequence[str]) -> Example:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with {', '.join(columns)}, got {type(row).__name__}")
    missing = [c for c in columns if c not in row or row[c] is None]
    if missing:
        has = ", ".join(sorted(map(str, row))) or "nothing"
        raise UserError(f"{where}: missing column {', '.join(map(repr, missing))} (has: {has})")
    return {c: check_value(row[c], where, c) for c in columns}


def load_training_data(
    spec: str, kind: str = "dpo", split: str = "train", revision: str | None = None, limit: int | None = None
) -> TrainingData:
    """Read and validate a data set: `kind` "dpo" needs prompt/chosen/rejected, "sft" prompt/completion."""
    if kind not in COLUMNS:
        raise UserError(f"unknown data kind {kind!r}: use dpo or sft")
    spec = spec.strip()
    if not spec:
        raise UserError("no data set given: pass a .jsonl file, a Hub dataset or a built-in set")
    source, pick = split_pick(spec)
    if pick and kind != "sft":
        raise UserError(f"{spec!r}: the ':{pick}' suffix reads preference pairs as prompt/completion data (sft only)")
    rows, hub = _raw_rows(source, split, revision)
    examples = []
    for where, row in rows[:limit] if limit else rows:
        if pick:
            example = check_row(row, where, ("prompt", pick))
            examples.append({"prompt": example["prompt"], "completion": example[pick]})
        else:
            examples.append(check_row(row, where, COLUMNS[kind]))
    if not examples:
        raise UserError(f"data set {spec!r} is empty: it needs at least one {'/'.join(COLUMNS[kind])} example")
    return TrainingData(source=spec, kind=kind, examples=tuple(examples), hub=hub)


def to_conversational(example: Example, tokenizer: Any) -> Example:
    """Wrap plain strings as user / assistant turns when the tokenizer has a chat template.

    The evaluation formats prompts with the chat template, so training sees the same context.
    Without a template, plain strings stay as they are and chat messages are an error.
    """
    if not getattr(tokenizer, "chat_template", None):
        if any(isinstance(v, list) for v in example.values()):
            raise UserError("the data holds chat messages but the tokenizer has no chat template: use plain strings")
        return dict(example)
    out: Example = {}
    for column, value in example.items():
        role = "user" if column == "prompt" else "assistant"
        out[column] = [{"role": role, "content": value}] if isinstance(value, str) else value
    return out


# ---------------------------------------------------------------- pairs from two models


def _responses(model_id: str, prompts: Sequence[str], load, max_new_tokens: int, batch_size: int | None) -> list[str]:
    import torch

    from pipeline.evaluation.evaluate import generate
    from pipeline.io.loading import load_model

    loaded = load_model(model_id, load)
    try:
        return generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens, batch_size)
    finally:
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _both(base: str, edited: str, prompts: Sequence[str], load: Any, max_new_tokens: int, batch_size: int | None,
          say: Callable[[str], None]) -> tuple[list[str], list[str]]:
    """Greedy responses of both models to ``prompts``, loaded one after the other (peak memory: one model)."""
    if not prompts:
        raise UserError("no prompts to make pairs from")
    say(f"generating base responses ({base}, {len(prompts)} prompts)")
    base_out = _responses(base, prompts, load, max_new_tokens, batch_size)
    say(f"generating edited responses ({edited})")
    return base_out, _responses(edited, prompts, load, max_new_tokens, batch_size)


def _refusal_pairs(prompts: Sequence[str], base_out: Sequence[str], edited_out: Sequence[str],
                   markers: Any) -> tuple[list[dict[str, str]], dict[str, int]]:
    from pipeline.evaluation.evaluate import classify, is_refusal

    rows, base_refused, edited_refused = [], 0, 0
    for prompt, rejected, chosen in zip(prompts, base_out, edited_out, strict=True):
        b, e = is_refusal(classify(rejected, markers)), is_refusal(classify(chosen, markers))
        base_refused, edited_refused = base_refused + b, edited_refused + e
        if b and not e:
            rows.append({"prompt": prompt, "chosen": chosen.strip(), "rejected": rejected.strip()})
    stats = {"prompts": len(prompts), "base_refused": base_refused, "edited_refused": edited_refused,
             "pairs": len(rows)}
    if not rows:
        raise UserError(
            f"no pairs: of {len(prompts)} prompts the base refused {base_refused} and the edited model "
            f"{edited_refused}; a pair needs a base refusal and an edited answer to the same prompt"
        )
    return rows, stats


def make_pairs(
    base: str,
    edited: str,
    prompts: Sequence[str],
    load=None,
    max_new_tokens: int = 64,
    batch_size: int | None = None,
    markers=None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Base refusal -> rejected, edited answer -> chosen, where the base refused and the edited did not."""
    from pipeline.evaluation.evaluate import load_markers
    from pipeline.io.loading import LoadConfig

    prompts = list(prompts)
    base_out, edited_out = _both(base, edited, prompts, load or LoadConfig(), max_new_tokens, batch_size,
                                 progress or log.info)
    return _refusal_pairs(prompts, base_out, edited_out, markers or load_markers())


def heal_pairs(
    base: str, edited: str, harmful: Sequence[str], harmless: Sequence[str], load=None, max_new_tokens: int = 64,
    batch_size: int | None = None, markers=None, progress: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, str]], dict[str, int]]:
    """The pairs that heal an abliterated model: on harmful prompts its answer is chosen over the base's
    refusal (keep what abliteration removed); on harmless prompts the base's answer is chosen over its own
    where they differ (pull the rest of its behaviour back to the base, which is what the KL measures)."""
    from pipeline.evaluation.evaluate import classify, load_markers
    from pipeline.io.loading import LoadConfig

    markers = markers or load_markers()
    harmful, harmless = list(harmful), list(harmless)
    base_out, edited_out = _both(base, edited, harmful + harmless, load or LoadConfig(), max_new_tokens,
                                 batch_size, progress or log.info)
    n = len(harmful)
    rows, stats = _refusal_pairs(harmful, base_out[:n], edited_out[:n], markers)
    anchors = [{"prompt": p, "chosen": b.strip(), "rejected": e.strip()}
               for p, b, e in zip(harmless, base_out[n:], edited_out[n:], strict=True)
               if b.strip() != e.strip() and classify(b, markers) is None]
    return rows + anchors, {**stats, "harmless_prompts": len(harmless), "harmless_pairs": len(anchors),
                            "pairs": len(rows) + len(anchors), "refusal_pairs": len(rows)}


def pairs(
    base: str,
    edited: str,
    prompts_spec: str | None,
    out: Path,
    load=None,
    max_new_tokens: int = 64,
    batch_size: int | None = None,
    max_prompts: int | None = None,
    split: str = "train",
    column: str | None = None,
    markers_file: str | None = None,
    overwrite: bool = False,
    eval_fraction: float = 0.25,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The `pairs` command: the spec's measurement part, pairs written as JSONL.

    The part is split off as `pipeline.edit.stages.resolve_prompts` does (predefined eval part, else
    ``eval_fraction`` held out with ``seed``), so with the same settings the evaluation of a
    model tuned on these pairs runs on prompts it never saw.
    """
    from pipeline.evaluation.evaluate import load_markers
    from pipeline.io.loading import is_demo
    from pipeline.io.output import write_jsonl
    from pipeline.io.prompts import load_prompts, split_prompts

    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"'{out}' already exists: pass --overwrite to replace it, or choose another --out")
    spec = prompts_spec or ("demo-harmful" if is_demo(base) else "censored")
    part = split_prompts(load_prompts(spec, split=split, column=column), eval_fraction=eval_fraction, seed=seed)
    prompts = list(part.measure)[:max_prompts]
    markers = load_markers(markers_file) if markers_file else None
    rows, stats = make_pairs(base, edited, prompts, load, max_new_tokens, batch_size, markers, progress)
    write_jsonl(rows, out)
    return {**stats, "out": str(out), "prompts_source": spec}
