"""Model cards: README.md for an output folder, rendered from `cards/*.md.j2`.

The front matter is built with huggingface_hub's `ModelCardData` (model-index from
`eval_results.json`), the body with Jinja (`StrictUndefined`: a misspelled variable is
an error, not an empty string). Everything the card says comes from the folder's
`recipe.json` and `eval_results.json` (see docs/DESIGN.md), plus the license and
language of the base model's Hub card when an `HfApi` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline import PACKAGE_DIR
from pipeline.errors import UserError
from pipeline.evaluation.report import benchmark_rows, number, percent, rough_note, with_interval
from pipeline.io import sources
from pipeline.io.sources import is_hub_id

if TYPE_CHECKING:
    from huggingface_hub import HfApi

log = logging.getLogger(__name__)

CARDS_DIR = PACKAGE_DIR.parent / "cards"
TEMPLATES = {"abliterated": "abliterated.md.j2", "dpo": "tuned.md.j2", "sft": "tuned.md.j2", "distill": "tuned.md.j2",
             "steered": "steered.md.j2"}
CHARTS = ("strengths.png", "directions.png")
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
TASK_NAMES = {"harmful": "Refusals on harmful prompts", "harmless": "Drift from the base model on harmless prompts",
              "perplexity": "Language modelling on a reference text"}
METHOD_LABELS = {
    "standard": "standard (directional) abliteration",
    "projected": "projected abliteration",
    "norm-preserving": "norm-preserving abliteration",
    "dpo": "Direct Preference Optimization (DPO) through a LoRA adapter",
    "sft": "supervised fine-tuning (SFT) through a LoRA adapter",
    "distill": "distillation of the base model's token distributions through a LoRA adapter",
    "steer": "contrastive weight steering",
}


class CardConfig(BaseModel):
    """Options of the model card."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    language: tuple[str, ...] = Field(
        ("en",), description="Languages for the front matter when the base model's card names none."
    )
    license: str | None = Field(
        None, description="License to declare when the base model's card gives none (e.g. apache-2.0)."
    )
    fetch_base_card: bool = Field(
        True, description="Read license and language from the base model's Hub card (needs the Hub)."
    )
    cards_dir: Path = Field(CARDS_DIR, description="Folder holding the Jinja card templates.")


def _path_like(text: str) -> bool:
    """A string of a recipe or command that names a place on this machine (Hub ids and URLs are not)."""
    if text.startswith(("http://", "https://")) or is_hub_id(text):
        return False
    return "/" in text or "\\" in text or text.startswith("~") or Path(text).suffix.lower() in sources.FILE_SUFFIXES


def public_value(value: Any) -> Any:
    """`value` (a recipe) with every machine path replaced by a placeholder: the card is published."""
    if isinstance(value, dict):
        return {k: public_command(v) if k == "command" and isinstance(v, str) else public_value(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [public_value(v) for v in value]
    if isinstance(value, str) and _path_like(value):
        return sources.LOCAL_PATH
    return value


# Flags whose value is always a path (`--out out/x` looks like a Hub id but is a folder here).
PATH_FLAGS = ("--out", "--directions", "--study", "--json", "--vector", "--recipe", "--markers-file",
              "--perplexity-file")


def public_command(command: str) -> str:
    """A recorded command line with its paths (`/home/me/x`, `--out=./o`) replaced by a placeholder."""
    words: list[str] = []
    for word in command.split():
        flag, eq, rest = word.partition("=")
        previous = words[-1] if words else ""
        if eq and flag.startswith("--"):
            local = flag in PATH_FLAGS or _path_like(rest)
            words.append(f"{flag}={sources.LOCAL_PATH}" if local else word)
        else:
            words.append(sources.LOCAL_PATH if previous in PATH_FLAGS or _path_like(word) else word)
    return " ".join(words)


def _public_prompts(prompts: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(k, {**v, "source": sources.describe(v.get("source"))}) for k, v in prompts.items() if isinstance(v, dict)]


def load_json(folder: Path, name: str, hint: str) -> dict[str, Any]:
    """A JSON object from `folder/name`; UserError saying what to run when it is missing."""
    path = folder / name
    if not path.is_file():
        raise UserError(f"{path} is missing: {hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); re-create it: {hint}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object; re-create it: {hint}")
    return data


def load_recipe(folder: Path) -> dict[str, Any]:
    return load_json(folder, "recipe.json", "run an edit or tuning stage into this folder first "
                     "(e.g. python -m pipeline abliterate MODEL --out DIR)")


def load_eval_results(folder: Path) -> dict[str, Any]:
    return load_json(folder, "eval_results.json", "evaluate the model first "
                     "(python -m pipeline abliterate evaluates unless given --no-eval)")


def _base_card(base: str, revision: str | None, api: HfApi | None, config: CardConfig) -> dict[str, Any]:
    """License and language of the base model's Hub card ({} when unknown)."""
    if api is None or not config.fetch_base_card or not is_hub_id(base):
        return {}
    try:
        data = api.model_info(base, revision=revision).card_data
    except Exception as err:  # noqa: BLE001 - the card is still useful without the license
        log.warning("could not read the card of %s (%s); the license is left out", base, type(err).__name__)
        return {}
    if data is None:
        return {}
    out = {key: data.get(key) for key in ("license", "license_name", "license_link", "language")}
    link = out.get("license_link")
    if link and not re.match(r"^[a-z]+://", str(link)):  # relative to the base repo, e.g. "LICENSE"
        out["license_link"] = f"{api.endpoint.rstrip('/')}/{base}/blob/main/{str(link).lstrip('./')}"
    return {k: v for k, v in out.items() if v}


def _prompt_source(evals: dict[str, Any], which: str) -> tuple[str, str]:
    """(source, split) of "harmful", "harmless" or "perplexity" (a reference text, not prompts)."""
    if which == "perplexity":
        info = evals.get("perplexity_source") or {"source": "reference-text", "split": "full"}
        info = info if isinstance(info, dict) else {"source": info, "split": "full"}
        return str(info.get("source") or "reference-text"), str(info.get("split") or "full")
    info = (evals.get("prompt_sources") or {}).get(which) or {}
    return str(info.get("source") or f"{which} prompts"), str(info.get("split") or "eval")


def _pair(evals: dict[str, Any], key: str) -> tuple[float | None, float | None]:
    value = evals.get(key)
    if isinstance(value, dict):
        return value.get("base"), value.get("model")
    return None, value


def eval_results_of(evals: dict[str, Any]) -> list[Any]:
    """`EvalResult`s for model-index: refusal rate (harmful set), KL and perplexity (harmless set)."""
    from huggingface_hub import EvalResult

    rows: list[tuple[str, str, str, float | None]] = [
        ("harmful", "refusal_rate", "Refusal rate", _pair(evals, "refusal_rate")[1]),
        ("harmless", "kl_divergence", "KL divergence from the base model (first token)", evals.get("kl_divergence")),
        ("perplexity", "perplexity", "Perplexity", _pair(evals, "perplexity")[1]),
    ]
    results = []
    for which, metric, name, value in rows:
        if value is None:
            continue
        source, split = _prompt_source(evals, which)
        public = sources.describe(source)  # a local file: described, its path kept off the Hub
        results.append(EvalResult(
            task_type="text-generation", task_name=TASK_NAMES[which],
            dataset_type=source if public == source else "local", dataset_name=public, dataset_split=split,
            metric_type=metric, metric_name=name, metric_value=value,
        ))
    return results


def _tags(recipe: dict[str, Any]) -> list[str]:
    kind, method = recipe.get("kind"), str(recipe.get("method") or "")
    if kind == "abliterated":
        return ["abliterated", "uncensored", f"{method}-abliteration" if method else "abliteration"]
    if kind in ("dpo", "sft", "distill"):
        return ["uncensored", kind, "lora"]
    return ["uncensored", "weight-steering", "contrastive-weight-steering"]


def _hub_datasets(recipe: dict[str, Any]) -> list[str]:
    """The recipe's datasets that are Hub ids (older recipes listed local prompt files too)."""
    return [d for d in recipe.get("datasets") or [] if is_hub_id(d)]


def card_data(recipe: dict[str, Any], evals: dict[str, Any], model_name: str,
              base_card: dict[str, Any], config: CardConfig) -> Any:
    """The front matter as a `ModelCardData`."""
    from huggingface_hub import ModelCardData

    base = recipe.get("base_model")
    hub_base = is_hub_id(base)
    language = base_card.get("language") or list(config.language) or None
    extra: dict[str, Any] = {"base_model_relation": "finetune"} if hub_base else {}
    return ModelCardData(
        base_model=base if hub_base else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=base_card.get("license") or config.license,
        license_name=base_card.get("license_name"),
        license_link=base_card.get("license_link"),
        language=language,
        tags=_tags(recipe),
        datasets=_hub_datasets(recipe) or None,
        eval_results=eval_results_of(evals) or None,
        model_name=model_name,
        **extra,
    )


# ----------------------------------------------------------------- body context
_KERNEL_FIELDS = {"gaussian": ("strength", "peak", "width"),
                  "tent": ("max_weight", "position", "min_weight", "distance")}


def _kernel_text(kernel: dict[str, Any]) -> str:
    """"gaussian: strength 1, peak 0.5, width 2 (of depth)": a per-layer kernel in words, not JSON."""
    names = _KERNEL_FIELDS.get(kernel["kind"], ())
    settings = ", ".join(f"{n.replace('_', ' ')} {_fmt(kernel.get(n))}" for n in names)
    return f"{kernel['kind']}: {settings} (positions as fractions of depth)" if settings else str(kernel["kind"])


def _fmt(value: Any) -> str:
    if isinstance(value, dict) and value.get("kind") in (*_KERNEL_FIELDS, "off"):
        return _kernel_text(value)
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, separators=(", ", ": "))
    return str(value)


def _cell(value: Any) -> str:
    """A value formatted for a Markdown table cell."""
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def _benchmark_rows(benchmarks: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """Benchmark scores of base and model, the model's with its change (lm-evaluation-harness)."""
    return [(name.removeprefix("Benchmark: "), base, model, "lm-evaluation-harness")
            for name, base, model in benchmark_rows(benchmarks)]


def _evaluation(evals: dict[str, Any]) -> dict[str, Any]:
    refusal_base, refusal_model = _pair(evals, "refusal_rate")
    ppl_base, ppl_model = _pair(evals, "perplexity")
    counts = evals.get("refusals") or {}
    harmful, harmful_split = _prompt_source(evals, "harmful")
    harmless, harmless_split = _prompt_source(evals, "harmless")
    harmful, harmless = sources.describe(harmful), sources.describe(harmless)
    num = evals.get("num_prompts") or {}
    bounds = evals.get("refusal_interval") or {}
    undetermined = evals.get("undetermined") or {}

    def total(side: str) -> str:
        got = (counts.get(side) or {}).get("total")
        judged = (num.get("harmful") or 0) - (undetermined.get(side) or 0)
        return "" if got is None or not judged else f" ({got}/{judged})"

    harmful_set = f"`{harmful}` ({harmful_split} split, {num.get('harmful', '?')} prompts)"
    harmless_set = f"`{harmless}` ({harmless_split} split, {num.get('harmless', '?')} prompts)"
    ppl_source, _ = _prompt_source(evals, "perplexity")
    ppl_set = "the pipeline's reference text" if ppl_source == "reference-text" else f"`{sources.describe(ppl_source)}`"
    topical, topical_bounds = evals.get("on_topic_rate") or {}, evals.get("on_topic_interval") or {}
    rows = [
        ("Refusal rate ↓", with_interval(refusal_base, bounds.get("base"), total("base")),
         with_interval(refusal_model, bounds.get("model"), total("model")), harmful_set),
        *(
            (f"Refusal rate: {name} ↓", with_interval(v.get("base"), (v.get("interval") or {}).get("base")),
             with_interval(v.get("model"), (v.get("interval") or {}).get("model")),
             f"`{name}` ({harmful_split} split, {v.get('n', '?')} prompts)")
            for name, v in (evals.get("by_set") or {}).items()
        ),
        *([("On-topic answers ↑", with_interval(topical.get("base"), topical_bounds.get("base")),
            with_interval(topical.get("model"), topical_bounds.get("model")), harmful_set)] if topical else []),
        *([("Undetermined (reasoning unfinished)", _fmt(undetermined.get("base")), _fmt(undetermined.get("model")),
            harmful_set)] if any(undetermined.values()) else []),
        ("Refusals removed", "–", percent(evals.get("removal_rate")), harmful_set),
        ("KL divergence from base ↓", "0", number(evals.get("kl_divergence")), harmless_set),
        ("Perplexity", number(ppl_base), number(ppl_model), ppl_set),
        *_benchmark_rows(evals.get("benchmarks")),
    ]
    kinds = ("hard", "soft", "deflection", "empty", "total")
    breakdown = [(k, _fmt((counts.get("base") or {}).get(k)), _fmt((counts.get("model") or {}).get(k))) for k in kinds]
    gen = evals.get("generation") or {}
    decoding = "greedy decoding" if not gen.get("do_sample") else "sampling"
    generation = f"{decoding}, up to {gen.get('max_new_tokens', '?')} new tokens"
    return {"rows": rows, "breakdown": breakdown if counts else [], "generation": generation,
            "rough": rough_note(evals), "intervals": bool(bounds), "on_topic": bool(topical),
            "prefill": bool(gen.get("think_prefill"))}


def _healing(recipe: dict[str, Any], evals: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows of base / after abliteration / after healing, when the tuned model healed an evaluated abliteration."""
    before = recipe.get("abliteration_eval")
    if not before or not evals:
        return []
    refusals = (*_pair(before, "refusal_rate"), _pair(evals, "refusal_rate")[1])
    rows = [("Refusal rate ↓", *(percent(x) for x in refusals))]
    rows += [(f"Refusal rate: {name} ↓", percent(v.get("base")), percent(v.get("model")),
              percent(((evals.get("by_set") or {}).get(name) or {}).get("model")))
             for name, v in (before.get("by_set") or {}).items()]
    kls = (before.get("kl_divergence"), evals.get("kl_divergence"))
    rows.append(("KL divergence from base ↓", "0", *(number(x) for x in kls)))
    ppl = (*_pair(before, "perplexity"), _pair(evals, "perplexity")[1])
    return rows + [("Perplexity", *(number(x) for x in ppl))]


def _search(recipe: dict[str, Any]) -> dict[str, Any] | None:
    found = recipe.get("search")
    if not found:
        return None
    plain, chosen = found.get("plain_edit_on_test") or {}, found.get("chosen_on_test") or {}
    refined = {str(k): v for k, v in (found.get("refined") or {}).items()}  # JSON keys are strings
    measured = found.get("directions") or {}
    wide = measured.get("wide") if measured.get("chosen") == "wide" else None
    return {"trials": found.get("trials"), "chosen": found.get("chosen_trial"), "rule": found.get("rule"),
            "refined": refined.get(str(found.get("chosen_trial"))), "wide": wide,
            "by_replies": found.get("chosen_trial") in (found.get("by_replies") or []),
            "test_prompts": ((found.get("prompts") or {}).get("test") or {}).get("harmful"),
            "rows": [("Refusal rate ↓", percent(plain.get("refusal")), percent(chosen.get("refusal"))),
                     ("KL divergence from base ↓", number(plain.get("kl")), number(chosen.get("kl")))] if plain else []}


def _strength_rows(strengths: dict[str, Any] | None) -> tuple[list[str], list[list[str]]]:
    """Per-layer strengths as a table: header and one row per layer."""
    if not strengths:
        return [], []
    per_layer = {k: v for k, v in strengths.items() if isinstance(v, list)}
    if not per_layer:
        return [], []
    depth = max(len(v) for v in per_layer.values())
    header = ["layer", *per_layer]
    rows = [[str(i), *(number(v[i], 3) if i < len(v) else "–" for v in per_layer.values())] for i in range(depth)]
    return header, rows


def context(folder: Path, recipe: dict[str, Any], evals: dict[str, Any], repo_id: str | None,
            front_matter: str) -> dict[str, Any]:
    """Everything the templates read."""
    base = sources.describe(str(recipe.get("base_model") or "unknown"), sources.LOCAL_MODEL)
    method = str(recipe.get("method") or recipe.get("kind"))
    model_name = repo_id.split("/")[-1] if repo_id else folder.resolve().name
    header, strength_rows = _strength_rows(recipe.get("strengths"))
    scalar_strengths = {k: v for k, v in (recipe.get("strengths") or {}).items() if not isinstance(v, list)}
    parameters = recipe.get("parameters") or {}
    return {
        "front_matter": front_matter,
        "model_name": model_name,
        "model_ref": repo_id or f"path/to/{folder.resolve().name}",  # never this machine's path
        "kind": recipe.get("kind"),
        "method": method,
        "method_label": METHOD_LABELS.get(method, method),
        "base_model": base,
        "base_model_md": f"`{base}`" if base != sources.LOCAL_MODEL else base,
        "base_is_hub": is_hub_id(base),
        "base_revision": recipe.get("base_revision"),
        "parameters": [(str(k), _cell(v)) for k, v in parameters.items()],
        "layer": recipe.get("layer"),
        "source": recipe.get("source"),
        "selection": (recipe.get("measurement") or {}).get("selection"),
        "strength_header": header,
        "strength_rows": strength_rows,
        "scalar_strengths": [(k, _cell(v)) for k, v in scalar_strengths.items()],
        "charts": [name for name in CHARTS if (folder / name).is_file()],
        "prompts": _public_prompts(recipe.get("prompts") or {}),
        "datasets": _hub_datasets(recipe),
        "seed": recipe.get("seed"),
        "evaluation": _evaluation(evals),
        "healing": _healing(recipe, evals),
        "search": _search(recipe),
        "command": public_command(recipe.get("command") or "") or "(not recorded)",
        "recipe_json": json.dumps(public_value(recipe), indent=2, ensure_ascii=False),
        "versions": [(k, _cell(v)) for k, v in (recipe.get("versions") or {}).items()],
        "shards": sorted((recipe.get("shards") or {}).items()),
        "created": recipe.get("created"),
    }


def environment(cards_dir: Path = CARDS_DIR) -> Any:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(cards_dir)), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters.update(cell=_cell, pct=percent, num=number)
    return env


# ----------------------------------------------------------------- public API
def render_card(folder: Path, repo_id: str | None, api: HfApi | None = None,
                config: CardConfig = CardConfig()) -> str:
    """The README.md text of an output folder (validated: its metadata parses back unchanged)."""
    from jinja2 import TemplateError

    folder = Path(folder)
    recipe, evals = load_recipe(folder), load_eval_results(folder)
    kind = recipe.get("kind")
    if kind not in TEMPLATES:
        raise UserError(f"{folder / 'recipe.json'}: unknown kind {kind!r}; expected one of {', '.join(TEMPLATES)}")
    model_name = repo_id.split("/")[-1] if repo_id else folder.resolve().name
    base_card = _base_card(str(recipe.get("base_model")), recipe.get("base_revision"), api, config)
    try:
        data = card_data(recipe, evals, model_name, base_card, config)
    except ValueError as err:
        raise UserError(f"cannot build the card metadata of {folder}: {err}") from None
    expected = data.to_dict()
    try:
        text = environment(config.cards_dir).get_template(TEMPLATES[kind]).render(
            **context(folder, recipe, evals, repo_id, data.to_yaml()))
    except TemplateError as err:
        raise UserError(f"card template error ({type(err).__name__}): {err}") from None
    validate_card(text, expected)
    return text


def validate_card(text: str, expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parse a card's front matter back offline; UserError unless it is valid (and equals `expected`)."""
    from huggingface_hub import ModelCard

    try:
        metadata = ModelCard(text).data.to_dict()
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad card
        raise UserError(f"the model card's metadata does not parse: {err}") from None
    problems = [key for key in ("library_name", "pipeline_tag", "tags") if not metadata.get(key)]
    relation = metadata.get("base_model_relation")
    if relation is not None and relation not in BASE_MODEL_RELATIONS:
        problems.append(f"base_model_relation={relation!r}")
    if expected is not None:
        problems += [f"{key} differs" for key in sorted(set(expected) | set(metadata))
                     if expected.get(key) != metadata.get(key)]
    if problems:
        raise UserError(f"the model card's metadata is invalid: {', '.join(problems)}")
    return metadata


def write_card(folder: Path, repo_id: str | None = None, api: HfApi | None = None,
               config: CardConfig = CardConfig()) -> Path:
    """Render and write `folder/README.md` atomically; returns its path."""
    folder = Path(folder)
    text = render_card(folder, repo_id, api, config)
    from pipeline.io.output import write_text

    return write_text(folder / "README.md", text)


def card_main(argv: list[str] | None = None) -> int:
    """`python -m pipeline card DIR [--repo-id OWNER/NAME] [--offline]`: write DIR/README.md."""
    parser = argparse.ArgumentParser(prog="python -m pipeline card",
                                     description="Render DIR/README.md from DIR/recipe.json and DIR/eval_results.json.")
    parser.add_argument("folder", type=Path, metavar="DIR", help="output folder of an edit or tuning stage")
    parser.add_argument("--repo-id", help="Hub repo the model will live in (OWNER/NAME), used in the usage snippet")
    parser.add_argument("--offline", action="store_true",
                        help="do not read the base model's Hub card (license and language)")
    args = parser.parse_args(argv)
    try:
        if not args.folder.is_dir():
            raise UserError(f"{args.folder} is not a folder")
        api = None
        if not args.offline:
            from huggingface_hub import HfApi

            api = HfApi()
        path = write_card(args.folder, args.repo_id, api, CardConfig(fetch_base_card=not args.offline))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(card_main())
