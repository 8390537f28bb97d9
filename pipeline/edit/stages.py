"""The abliteration stages as plain functions: prompts, measure, edit, save.

`pipeline.orchestrator.run` (the orchestrator that the UI, the CLI and CI call) chains
these; the CLI's `directions` and `abliterate` commands call them directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from pipeline.edit import directions as dirs
from pipeline.edit.abliterate import EditConfig, apply_in_memory, apply_streaming, strengths
from pipeline.edit.architectures import model_type_of, num_layers_of
from pipeline.errors import UserError
from pipeline.io.loading import LoadConfig, Loaded, is_demo, load_config, local_path
from pipeline.io.prompts import PromptSplit, load_prompts, split_prompts

log = logging.getLogger(__name__)


DEFAULT_HARMFUL = "censored,harmful"
# Generation dominates on a CPU: these caps keep the default chain on a 0.5B model under 10 minutes.
REAL_MAX_PROMPTS, REAL_MAX_EVAL = 64, 32
DEFAULT_HARMLESS = "harmless,harmless-general"


class PromptsConfig(BaseModel):
    """Which prompts measure the direction and which evaluate the result."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    harmful: str | None = Field(
        None,
        description="Prompts the model refuses: a built-in set, a file, or a Hub dataset; several joined by commas "
        f"are measured together and reported per set (default: demo-harmful for demo, else {DEFAULT_HARMFUL}).",
    )
    harmless: str | None = Field(
        None,
        description="Ordinary prompts of similar form, one or several joined by commas "
        f"(default: demo-harmless for demo, else {DEFAULT_HARMLESS}).",
    )
    split: str = Field("train", description="Split of a Hub dataset.")
    column: str | None = Field(None, description="Text column of a dataset or table file (default: auto-detected).")
    eval_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share held out for evaluation when a set has no eval part."
    )
    max_prompts: int | None = Field(
        None, ge=2, description=f"At most this many measurement prompts per class, before filtering (default: "
        f"{REAL_MAX_PROMPTS}; all for demo, whose prompts are cheap)."
    )
    max_eval: int | None = Field(
        None, ge=2, description=f"At most this many evaluation prompts per set (default: {REAL_MAX_EVAL}; all for "
        "demo)."
    )
    seed: int = Field(0, description="Seed of the measurement/evaluation split.")


@dataclass(frozen=True)
class Prompts:
    harmful: PromptSplit  # all harmful sets together (measurement interleaves them, evaluation concatenates)
    harmless: PromptSplit
    harmful_sets: tuple[PromptSplit, ...] = ()  # each harmful set on its own, for per-set reporting

    def record(self) -> dict:
        rec = {"harmful": self.harmful.record(), "harmless": self.harmless.record()}
        if len(self.harmful_sets) > 1:
            rec["harmful_sets"] = [s.record() for s in self.harmful_sets]
        return rec

    def eval_groups(self) -> list[str]:
        """The set each harmful evaluation prompt comes from, in order."""
        sets = self.harmful_sets or (self.harmful,)
        return [s.source for s in sets for _ in s.evaluate]

    def hub_datasets(self) -> list[str]:
        """The sources that were Hub datasets (a local file's path has a '/' too: it is not one)."""
        from pipeline.io.sources import is_hub_id

        sources = [x for s in (self.harmful, self.harmless) for x in s.source.split(",")]
        return [s for s in sources if is_hub_id(s)]


@dataclass(frozen=True)
class AbliterateJob:
    """Everything one abliteration needs; each part is a stage's own config."""

    model: str
    out: Path
    layer: str = "best"
    directions_file: Path | None = None
    streaming: bool = False
    overwrite: bool = False
    evaluate: bool = True
    load: LoadConfig = field(default_factory=LoadConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    measure: dirs.DirectionsConfig = field(default_factory=dirs.DirectionsConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    eval: object | None = None  # pipeline.evaluation.evaluate.EvalConfig; None: its defaults


def _interleave(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    """Round-robin over the sets, so a cap on the number of prompts takes from each set alike."""
    out: list[str] = []
    for i in range(max((len(p) for p in parts), default=0)):
        out += [p[i] for p in parts if i < len(p)]
    return tuple(dict.fromkeys(out))


def _merge(splits: list[PromptSplit], max_measure: int | None) -> PromptSplit:
    if len(splits) == 1:
        return splits[0]
    measure = _interleave([s.measure for s in splits])
    held_out = {p for s in splits for p in s.evaluate}
    measure = tuple(p for p in measure if p not in held_out)[:max_measure]
    evaluate = tuple(dict.fromkeys(p for s in splits for p in s.evaluate))
    return PromptSplit(
        source=",".join(s.source for s in splits),
        measure=measure,
        evaluate=evaluate,
        seed=splits[0].seed,
        method="+".join(dict.fromkeys(s.method for s in splits)),
        eval_fraction=splits[0].eval_fraction,
        available=sum(s.available for s in splits),
    )


def default_specs(model_id: str) -> tuple[str, str]:
    return ("demo-harmful", "demo-harmless") if is_demo(model_id) else (DEFAULT_HARMFUL, DEFAULT_HARMLESS)


def resolve_prompts(model_id: str, cfg: PromptsConfig) -> Prompts:
    defaults = default_specs(model_id)
    demo = is_demo(model_id)
    max_measure = cfg.max_prompts or (None if demo else REAL_MAX_PROMPTS)
    max_eval = cfg.max_eval or (None if demo else REAL_MAX_EVAL)
    merged = []
    sets: list[PromptSplit] = []
    for spec, default in zip((cfg.harmful, cfg.harmless), defaults, strict=True):
        parts = [p.strip() for p in (spec or default).split(",") if p.strip()]
        if not parts:
            raise UserError(f"empty prompt set '{spec}': give a built-in name, a file or a Hub dataset")
        splits = [
            split_prompts(
                load_prompts(part, split=cfg.split, column=cfg.column),
                eval_fraction=cfg.eval_fraction,
                seed=cfg.seed,
                max_measure=max_measure,
                max_eval=max_eval,
            )
            for part in parts
        ]
        merged.append(_merge(splits, max_measure))
        sets = sets or splits
    return Prompts(merged[0], merged[1], tuple(sets))


def base_reference(model, tokenizer, prompts: Prompts, cfg=None, model_id: str | None = None):
    """The base side of every evaluation (abliterate, tune, steer, evaluate): measured once, before any edit."""
    from pipeline.evaluation import evaluate as ev

    return ev.reference(model, tokenizer, prompts.harmful.evaluate, prompts.harmless.evaluate,
                        cfg or ev.EvalConfig(), model_id=model_id)


def evaluate_model(model, tokenizer, prompts: Prompts, cfg=None, reference=None, model_id: str | None = None,
                   base_id: str | None = None) -> dict:
    """`eval_results.json` of `model` on the held-out prompts, against `reference`, with per-set rates."""
    from pipeline.evaluation import evaluate as ev

    sources = {side: {"source": getattr(prompts, side).source, "split": "eval"} for side in ("harmful", "harmless")}
    return ev.evaluate(model, tokenizer, prompts.harmful.evaluate, prompts.harmless.evaluate, cfg or ev.EvalConfig(),
                       base=reference, model_id=model_id, base_id=base_id, prompt_sources=sources,
                       groups=prompts.eval_groups())


def measure_directions(
    loaded: Loaded, prompts: Prompts, cfg: dirs.DirectionsConfig, edit: EditConfig | None = None, progress=None
) -> dirs.Directions:
    groups = {p: part.source for part in prompts.harmful_sets for p in part.measure}
    d = dirs.measure(
        loaded.model, loaded.tokenizer, prompts.harmful.measure, prompts.harmless.measure, cfg, edit, progress,
        groups,
    )
    d.info.update({"model": loaded.model_id, "prompts_split": prompts.record()})
    return d


def default_edit(d: dirs.Directions, layer: str, edit: EditConfig) -> EditConfig:
    """``edit`` with the breadth the layer choice found best (`DirectionsConfig.select_breadth`), when its
    kernels are the preset's and the layer is the chosen one; otherwise ``edit`` itself."""
    breadth = d.info.get("selection", {}).get("breadth", 1.0)
    wanted = breadth > 1 and str(layer) == "best" and not edit.per_layer and edit.is_preset()
    return edit.widened(breadth) if wanted else edit


def chosen_direction(d: dirs.Directions, layer: str, edit: EditConfig
                     ) -> tuple[torch.Tensor, dict, EditConfig]:
    """The direction(s) to remove (one vector, or one per layer with --per-layer), the layer info, and
    the edit with its kernels centred on that layer (on the suggested layer with --per-layer) and as
    broad as the layer choice found best (`default_edit`)."""
    edit = default_edit(d, layer, edit)
    projected = edit.method == "projected"
    if edit.per_layer:
        table = d.projected if projected else d.directions
        direction, info = table.clone(), {"spec": "per-layer"}
    else:
        direction, info = dirs.removal(d, layer, projected=projected, per_set=edit.per_set)
    fraction = info.get("fraction", d.suggested_layer / max(1, d.num_layers - 1))
    return direction, info, edit.placed(fraction)


def edit_and_save_in_memory(loaded: Loaded, direction: torch.Tensor, edit: EditConfig, folder: Path) -> int:
    config = loaded.model.config
    changed = apply_in_memory(loaded.model, direction, edit, num_layers_of(config), model_type_of(config))
    loaded.model.save_pretrained(folder, max_shard_size="5GB")
    loaded.tokenizer.save_pretrained(folder)
    return changed


def edit_streaming(model_id: str, load: LoadConfig, direction: torch.Tensor, edit: EditConfig, folder: Path) -> int:
    src = local_path(model_id, load)
    config = load_config(src, load)
    return apply_streaming(src, folder, direction, edit, num_layers_of(config), model_type_of(config))


def describe_layer(info: dict, num_layers: int) -> str:
    """The chosen direction in words, e.g. "direction from layer 15 of 24 (0.65 of the depth)"."""
    if info.get("spec") == "per-layer":
        return "directions: each layer's own"
    if "between" in info:
        lo, hi = info["between"]
        return f"direction between layers {lo} and {hi} of {num_layers} ({info['fraction']:.2f} of the depth)"
    return f"direction from layer {info['index']} of {num_layers} ({info['fraction']:.2f} of the depth)"


def recipe(
    model_id: str, load: LoadConfig, edit: EditConfig, layer_info: dict, prompts: Prompts | None, plan: dict,
    d: dirs.Directions | None = None, source: dict | None = None,
) -> dict:
    info = d.info if d is not None else {}
    return {
        "kind": "abliterated",
        "base_model": model_id,
        "base_revision": load.revision,
        "method": edit.method,
        "parameters": edit.model_dump(mode="json"),
        "layer": layer_info,
        "strengths": plan,
        "prompts": prompts.record() if prompts else None,
        "datasets": prompts.hub_datasets() if prompts else [],
        "seed": prompts.harmful.seed if prompts else 0,
        "source": source,
        "measurement": {"filter": info.get("filter"), "selection": info.get("selection")},
    }


def plot_strengths(plan: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    layers = range(len(plan["attn"]))
    # Dashed over solid with hollow markers: equal profiles stay both visible.
    ax.plot(layers, plan["attn"], marker="o", linewidth=2.5, label="attention")
    ax.plot(layers, plan["mlp"], marker="s", linestyle="--", markerfacecolor="none", label="MLP")
    ax.set_xlabel("layer")
    ax.set_ylabel("edit strength")
    # From 0: a nearly flat profile (0.97-1.0) must not look like a hill.
    ax.set_ylim(0, max(1.0, *plan["attn"], *plan["mlp"]) * 1.08)
    ax.set_title("Abliteration strength per layer")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def strength_plan(edit: EditConfig, num_layers: int) -> dict:
    plan = strengths(edit, num_layers)
    if not any(plan["attn"]) and not any(plan["mlp"]) and not plan["embed"]:
        raise UserError("every edit strength is 0: nothing would change (check --preset/--attn-*/--mlp-*)")
    return plan
