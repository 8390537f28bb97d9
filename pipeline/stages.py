"""The abliteration stages as plain functions: prompts, measure, edit, save.

`pipeline.run` (the orchestrator that the UI, the CLI and CI call) chains
these; the CLI's `directions` and `abliterate` commands call them directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from pipeline import directions as dirs
from pipeline.abliterate import EditConfig, apply_in_memory, apply_streaming, strengths
from pipeline.architectures import model_type_of, num_layers_of
from pipeline.errors import UserError
from pipeline.loading import LoadConfig, Loaded, is_demo, load_config, local_path
from pipeline.prompts import PromptSplit, load_prompts, split_prompts

log = logging.getLogger(__name__)


class PromptsConfig(BaseModel):
    """Which prompts measure the direction and which evaluate the result."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    harmful: str | None = Field(
        None,
        description="Prompts the model refuses: a built-in set, a file, or a Hub dataset "
        "(default: demo-harmful for demo, else censored).",
    )
    harmless: str | None = Field(
        None, description="Ordinary prompts of similar form (default: demo-harmless for demo, else harmless)."
    )
    split: str = Field("train", description="Split of a Hub dataset.")
    column: str | None = Field(None, description="Text column of a dataset or table file (default: auto-detected).")
    eval_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share held out for evaluation when a set has no eval part."
    )
    max_prompts: int | None = Field(None, ge=2, description="At most this many measurement prompts per class.")
    seed: int = Field(0, description="Seed of the measurement/evaluation split.")


@dataclass(frozen=True)
class Prompts:
    harmful: PromptSplit
    harmless: PromptSplit

    def record(self) -> dict:
        return {"harmful": self.harmful.record(), "harmless": self.harmless.record()}

    def hub_datasets(self) -> list[str]:
        """The sources that were Hub datasets (a local file's path has a '/' too: it is not one)."""
        from pipeline.sources import is_hub_id

        return [s.source for s in (self.harmful, self.harmless) if is_hub_id(s.source)]


def resolve_prompts(model_id: str, cfg: PromptsConfig) -> Prompts:
    demo = is_demo(model_id)
    harmful_spec = cfg.harmful or ("demo-harmful" if demo else "censored")
    harmless_spec = cfg.harmless or ("demo-harmless" if demo else "harmless")
    splits = []
    for spec in (harmful_spec, harmless_spec):
        prompt_set = load_prompts(spec, split=cfg.split, column=cfg.column)
        splits.append(
            split_prompts(prompt_set, eval_fraction=cfg.eval_fraction, seed=cfg.seed, max_measure=cfg.max_prompts)
        )
    return Prompts(*splits)


def measure_directions(loaded: Loaded, prompts: Prompts, cfg: dirs.DirectionsConfig) -> dirs.Directions:
    d = dirs.measure(loaded.model, loaded.tokenizer, prompts.harmful.measure, prompts.harmless.measure, cfg)
    d.info.update({"model": loaded.model_id, "prompts_split": prompts.record()})
    return d


def chosen_direction(d: dirs.Directions, layer: str, edit: EditConfig) -> tuple[torch.Tensor, dict]:
    """The direction(s) to remove: one vector, or one per layer with --per-layer."""
    projected = edit.method == "projected"
    if edit.per_layer:
        table = d.projected if projected else d.directions
        return table.clone(), {"spec": "per-layer"}
    return dirs.resolve_layer(layer, d, projected=projected)


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


def recipe(model_id: str, load: LoadConfig, edit: EditConfig, layer_info: dict, prompts: Prompts | None, plan: dict):
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
    }


def plot_strengths(plan: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    layers = range(len(plan["attn"]))
    ax.plot(layers, plan["attn"], marker="o", label="attention")
    ax.plot(layers, plan["mlp"], marker="s", label="MLP")
    ax.set_xlabel("layer")
    ax.set_ylabel("edit strength")
    ax.set_title("Abliteration strength per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def strength_plan(edit: EditConfig, num_layers: int) -> dict:
    plan = strengths(edit, num_layers)
    if not any(plan["attn"]) and not any(plan["mlp"]) and not plan["embed"]:
        raise UserError("every edit strength is 0: nothing would change (check --preset/--attn-*/--mlp-*)")
    return plan
