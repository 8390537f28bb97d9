"""Refusal directions: per-layer mean differences, validation, choice, files.

The direction of layer i is the normalised difference between the mean
last-token residual after layer i on refused prompts and on harmless ones.
Each layer's direction is validated on held-out measurement prompts (how well
a projection onto it separates the two classes), and the layer to use is
chosen by behaviour: ablate each candidate direction from the residual stream
and keep the one that removes refusals while changing harmless next-token
distributions least.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from pipeline.edit.activations import collect
from pipeline.errors import UserError

log = logging.getLogger(__name__)

DIRECTIONS_FILE = "directions.safetensors"
DIRECTIONS_JSON = "directions.json"
DIRECTIONS_PNG = "directions.png"


class DirectionsConfig(BaseModel):
    """How refusal directions are measured and chosen."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: int | None = Field(None, ge=1, description="Prompts per forward pass; default: chosen automatically.")
    clip: bool = Field(False, description="Clip outlier components at the 99.5th percentile of |component| first.")
    validation_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of measurement prompts held out to validate each layer's direction."
    )
    min_accuracy: float = Field(
        0.9, ge=0, le=1, description="Threshold-classifier accuracy for a direction to be reported valid."
    )
    min_separation: float = Field(1.0, ge=0, description="Class separation (Cohen's d) for a valid direction.")
    filter_prompts: bool = Field(
        True,
        description="Measure only on prompts the base model treats as labelled: harmful ones it refuses, "
        "harmless ones it answers (judged on a short greedy reply).",
    )
    filter_tokens: int = Field(12, ge=1, description="New tokens generated per prompt to filter the prompts.")
    min_depth: float = Field(0.3, ge=0, lt=1, description="Candidate layers lie at or above this fraction of depth.")
    max_depth: float = Field(0.8, gt=0, le=1, description="Candidate layers lie at or below this fraction of depth.")
    select: str = Field(
        "behaviour",
        pattern="^(behaviour|separation)$",
        description="How `best` picks the layer: behaviour (ablate and test) or separation (largest Cohen's d).",
    )
    select_prompts: int = Field(32, ge=2, description="Prompts per class used to test each candidate layer.")
    select_tokens: int = Field(16, ge=1, description="New tokens generated per prompt when testing a candidate layer.")
    select_finalists: int = Field(
        3, ge=1, description="Candidates (ranked by the likelihood of the base's own refusals) tested by generation."
    )
    max_kl: float = Field(
        0.1, gt=0, description="Candidates whose harmless first-token KL exceeds this are last resort."
    )
    set_directions: bool = Field(
        True, description="With several harmful sets (e.g. censored,harmful), measure one direction per set and "
        "remove their span: different kinds of refusal can lie along different directions."
    )
    set_contrast: Literal["answered", "harmless"] = Field(
        "answered", description="Each set's refused prompts are contrasted with its answered prompts (same "
        "topics) when there are enough, else with the harmless prompts."
    )
    min_answered: int = Field(4, ge=1, description="Answered prompts a set needs for the answered contrast.")
    select_breadth: float = Field(
        3.0, ge=1, description="Also test the chosen layer with the preset's kernels this many times wider (1: "
        "never), and keep the wider edit when it removes more refusals (in steps of 5 points): on shallow models "
        "refusal spans more of the depth than the preset's width reaches. Explicit --attn-*/--mlp-* kernels are "
        "never widened."
    )
    min_removal: float = Field(
        0.5, ge=0, le=1, description="Warn (and flag the recipe) when the chosen layer removes less than this share "
        "of the refusals on the selection prompts."
    )


@dataclass
class LayerStats:
    layer: int
    diff_norm: float
    separation: float
    accuracy: float
    valid: bool
    refusal_ablated: float | None = None
    kl_ablated: float | None = None
    refusal_logprob: float | None = None  # mean log-prob of the base's own refusal tokens, direction ablated


@dataclass
class Directions:
    """Unit directions per layer ([layers, hidden], float32) with their validation."""

    directions: torch.Tensor
    projected: torch.Tensor
    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor
    stats: list[LayerStats]
    suggested_layer: int
    info: dict
    # One direction per harmful prompt set ([sets, layers, hidden]) when several were measured: refusals
    # of different kinds (political censorship, harmful requests) can lie along different directions.
    set_directions: torch.Tensor | None = None
    set_names: tuple[str, ...] = ()

    @property
    def num_layers(self) -> int:
        return self.directions.shape[0]


def clip_outliers(diff: torch.Tensor, percentile: float = 99.5) -> torch.Tensor:
    """Clamp each layer's components at its `percentile` of |component|."""
    limit = torch.quantile(diff.abs().float(), percentile / 100, dim=-1, keepdim=True).to(diff.dtype)
    return diff.clamp(-limit, limit)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_difference(harmful: torch.Tensor, harmless: torch.Tensor, clip: bool = False) -> torch.Tensor:
    diff = harmful - harmless
    return clip_outliers(diff) if clip else diff


def project_out_harmless(direction: torch.Tensor, harmless_mean: torch.Tensor) -> torch.Tensor:
    """The projected variant: remove the component along the harmless mean, renormalise."""
    m = unit(harmless_mean.to(direction.dtype))
    return unit(direction - (direction * m).sum(-1, keepdim=True) * m)


def separation_stats(proj_h: torch.Tensor, proj_b: torch.Tensor) -> tuple[float, float]:
    """Cohen's d of the two classes along a direction, and midpoint-threshold accuracy."""
    mh, mb = proj_h.mean(), proj_b.mean()
    pooled = torch.sqrt((proj_h.var(unbiased=False) + proj_b.var(unbiased=False)) / 2).clamp_min(1e-12)
    threshold = (mh + mb) / 2
    correct = (proj_h > threshold).sum() + (proj_b <= threshold).sum()
    return float((mh - mb) / pooled), float(correct) / (len(proj_h) + len(proj_b))


def validate(
    directions: torch.Tensor, diff_norm: torch.Tensor, val_h, val_b, cfg: DirectionsConfig
) -> list[LayerStats]:
    stats = []
    for layer in range(directions.shape[0]):
        r = directions[layer].float()
        sep, acc = separation_stats(val_h[:, layer] @ r, val_b[:, layer] @ r)
        valid = acc >= cfg.min_accuracy and sep >= cfg.min_separation
        stats.append(LayerStats(layer, float(diff_norm[layer]), sep, acc, valid))
    return stats


def holdout(prompts: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split of measurement prompts into fit and validation parts."""
    n_val = max(1, round(len(prompts) * fraction))
    if len(prompts) - n_val < 1:
        raise UserError(f"need at least 2 measurement prompts per class, got {len(prompts)}")
    # Every k-th prompt, so both parts cover the whole list (e.g. all topics).
    step = len(prompts) / n_val
    val_idx = {int(i * step) for i in range(n_val)}
    fit = [p for i, p in enumerate(prompts) if i not in val_idx]
    val = [p for i, p in enumerate(prompts) if i in val_idx]
    return fit, val


def _measured(model, tokenizer, prompts: Sequence[str], cfg: DirectionsConfig, generate: bool):
    from pipeline.edit import selection

    if generate:
        return selection.replies_with_activations(model, tokenizer, prompts, cfg.filter_tokens, cfg.batch_size)
    acts = collect(model, tokenizer, prompts, batch_size=cfg.batch_size, keep_samples=True, desc="activations")
    return selection.Measured(tuple(prompts), acts.samples)


def _split(m, fraction: float):
    fit, val = holdout(m.prompts, fraction)
    fit_set = set(fit)
    return m.subset([p in fit_set for p in m.prompts]), m.subset([p not in fit_set for p in m.prompts])


def per_set_directions(measured, groups: dict[str, str], fit: set[str], mean_b: torch.Tensor, cfg: DirectionsConfig):
    """One unit direction per harmful prompt set ([sets, layers, hidden]) and the sets' names.

    Each set's refused prompts (fit part) are contrasted with the prompts of the same set that the
    base answered, when there are enough of them: same topics, different behaviour, so the direction
    is refusal rather than subject matter. Otherwise the harmless mean is the contrast.
    """
    names = list(dict.fromkeys(groups.get(p, "") for p in measured.prompts))
    if len(names) < 2:
        return None, ()
    rows, kept = [], []
    for name in names:
        idx = [i for i, p in enumerate(measured.prompts) if groups.get(p) == name]
        refused = [i for i in idx if measured.refused[i] and measured.prompts[i] in fit]
        answered = [i for i in idx if not measured.refused[i]]
        if len(refused) < 2:
            log.info("prompt set %s: too few refused prompts for a direction of its own", name)
            continue
        other = mean_b
        if cfg.set_contrast == "answered" and len(answered) >= cfg.min_answered:
            other = measured.samples[answered].double().mean(0)
        rows.append(unit(measured.samples[refused].double().mean(0) - other).float())
        kept.append(name)
    if len(rows) < 2:
        return None, ()
    return torch.stack(rows), tuple(kept)


def measure(
    model, tokenizer, harmful: Sequence[str], harmless: Sequence[str], cfg: DirectionsConfig, edit=None,
    progress=None, groups: dict[str, str] | None = None,
) -> Directions:
    """Measure, validate and choose refusal directions for every layer (`edit`: the edit the layer is
    chosen for, by default the standard preset, centred on each candidate layer in turn)."""
    from pipeline.edit import selection

    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        if len(prompts) < 2:
            raise UserError(f"need at least 2 {name} prompts to measure a direction, got {len(prompts)}")
    m_h = _measured(model, tokenizer, harmful, cfg, cfg.filter_prompts)
    m_b = _measured(model, tokenizer, harmless, cfg, cfg.filter_prompts)
    filter_record, all_h = None, m_h
    if cfg.filter_prompts:
        m_h, m_b, filter_record = selection.keep_labelled(m_h, m_b)
    fit_h, val_h = _split(m_h, cfg.validation_fraction)
    fit_b, val_b = _split(m_b, cfg.validation_fraction)
    mean_h, mean_b = fit_h.samples.double().mean(0), fit_b.samples.double().mean(0)

    diff = mean_difference(mean_h, mean_b, cfg.clip)
    directions = unit(diff).float()
    projected = project_out_harmless(directions, mean_b.float())
    stats = validate(directions, diff.norm(dim=-1), val_h.samples, val_b.samples, cfg)
    set_dirs, set_names = (None, ())
    if cfg.set_directions and groups and all_h.refused is not None:
        set_dirs, set_names = per_set_directions(all_h, groups, set(fit_h.prompts), mean_b, cfg)
    result = Directions(
        directions=directions,
        projected=projected,
        harmful_mean=mean_h.float(),
        harmless_mean=mean_b.float(),
        stats=stats,
        suggested_layer=-1,
        info={
            "prompts": {
                "harmful_fit": len(fit_h.prompts),
                "harmful_validate": len(val_h.prompts),
                "harmless_fit": len(fit_b.prompts),
                "harmless_validate": len(val_b.prompts),
            },
            "filter": filter_record,
            "clip": cfg.clip,
        },
        set_directions=set_dirs,
        set_names=set_names,
    )
    result.suggested_layer = choose_layer(
        model, tokenizer, result, val_h.prompts, val_b.prompts, cfg, val_h.replies, edit, progress
    )
    return result


def choose_layer(
    model, tokenizer, d: Directions, val_h, val_b, cfg: DirectionsConfig, refusals=None, edit=None, progress=None
) -> int:
    """The layer whose direction, edited out of the weights, removes most refusals with least harmless KL."""
    from pipeline.edit import selection
    from pipeline.edit.abliterate import EditConfig
    from pipeline.evaluation.evaluate import first_token_logprobs, kl_divergence
    from pipeline.progress import say

    candidates = selection.candidate_layers(d.num_layers, cfg.min_depth, cfg.max_depth)
    if cfg.select == "separation":
        chosen = max(candidates, key=lambda i: d.stats[i].separation)
        d.info["selection"] = {"rule": "separation", "candidates": candidates}
        return chosen
    harmful, harmless = list(val_h[: cfg.select_prompts]), list(val_b[: cfg.select_prompts])
    if refusals is None:
        m = selection.replies_with_activations(model, tokenizer, harmful, cfg.filter_tokens, cfg.batch_size)
        refusals = [r if x else () for r, x in zip(m.replies, m.refused, strict=True)]
    refusals = list(refusals[: len(harmful)])
    base_rate = sum(1 for r in refusals if len(r)) / len(refusals)  # the base's own refusals (filter or above)
    size = cfg.batch_size or 32
    base_lp = first_token_logprobs(model, tokenizer, harmless, size)
    edits = selection.WeightEdits(model, edit or EditConfig())
    say(progress, f"choosing the layer: testing {len(candidates)} candidates (layers {candidates[0]}-"
                  f"{candidates[-1]} of {d.num_layers}) on {len(harmful)} held-out prompts per class")
    projected = edit is not None and edit.method == "projected"

    def removed(layer: int) -> torch.Tensor:
        return removal(d, str(layer), projected, cfg.set_directions and (edit is None or edit.per_set))[0]

    for layer in candidates:
        with edits.applied(removed(layer), layer):
            s = d.stats[layer]
            s.refusal_logprob = selection.refusal_logprob(model, tokenizer, harmful, refusals, size)
            s.kl_ablated = kl_divergence(base_lp, first_token_logprobs(model, tokenizer, harmless, size))
        log.info("layer %d: refusal log-prob %.3f kl %.4f", layer, s.refusal_logprob, s.kl_ablated)
    ranked = sorted(candidates, key=lambda i: (d.stats[i].kl_ablated > cfg.max_kl, d.stats[i].refusal_logprob))
    finalists = ranked[: cfg.select_finalists]
    for layer in finalists:
        with edits.applied(removed(layer), layer):
            d.stats[layer].refusal_ablated = refusal_fraction(model, tokenizer, harmful, cfg)
        log.info("layer %d: refusal %.2f when ablated", layer, d.stats[layer].refusal_ablated)

    def removal_of(refused: float) -> float:
        return 0.0 if base_rate == 0 else (base_rate - refused) / base_rate

    def key(refused: float, kl: float) -> tuple:
        # Removing most refusals first (a weak edit does nothing a user wants), then the KL cap, then refusal
        # in steps of 5 points (so noise does not win), then damage.
        return (removal_of(refused) < cfg.min_removal, kl > cfg.max_kl, round(refused * 20), kl)

    chosen = min(finalists, key=lambda i: key(d.stats[i].refusal_ablated, d.stats[i].kl_ablated))
    after, breadth = d.stats[chosen].refusal_ablated, 1.0
    plain = edit or EditConfig()
    if cfg.select_breadth > 1 and plain.is_preset():
        wide = plain.widened(cfg.select_breadth)
        with edits.applied(removed(chosen), chosen, wide):
            wide_refusal = refusal_fraction(model, tokenizer, harmful, cfg)
            wide_kl = kl_divergence(base_lp, first_token_logprobs(model, tokenizer, harmless, size))
        log.info("layer %d, kernels %.1fx wider: refusal %.2f kl %.4f", chosen, cfg.select_breadth, wide_refusal,
                 wide_kl)
        if key(wide_refusal, wide_kl) < key(after, d.stats[chosen].kl_ablated):
            after, breadth = wide_refusal, cfg.select_breadth
    _record_choice(d, cfg, chosen, candidates, finalists, len(harmful), base_rate, after, breadth)
    if cfg.select_breadth > 1 and plain.is_preset():
        d.info["selection"]["wider"] = {"breadth": cfg.select_breadth, "refusal": wide_refusal, "kl": wide_kl}
    return chosen


def _record_choice(d: Directions, cfg: DirectionsConfig, chosen: int, candidates: list[int], finalists: list[int],
                   prompts: int, base_rate: float, after: float, breadth: float) -> None:
    """The choice in `directions.json`, and a warning when it removes too little to be worth writing."""
    removed_share = 0.0 if base_rate == 0 else (base_rate - after) / base_rate
    weak = removed_share < cfg.min_removal
    d.info["selection"] = {
        "rule": "behaviour",
        "candidates": candidates,
        "finalists": finalists,
        "prompts": prompts,
        "base_refusal": base_rate,
        "refusal_ablated": after,
        "breadth": breadth,
        "removal": removed_share,
        "weak": weak,
    }
    if weak:
        log.warning(
            "no candidate layer removes most refusals: the best (layer %d) leaves %.0f%% of %d selection prompts "
            "refused (base %.0f%%); the edit will do little: try other --harmful prompts or --auto",
            chosen, 100 * after, prompts, 100 * base_rate,
        )


def refusal_fraction(model, tokenizer, prompts: Sequence[str], cfg: DirectionsConfig) -> float:
    from pipeline.evaluation.evaluate import classify, generate, is_refusal, load_markers

    texts = generate(model, tokenizer, list(prompts), cfg.select_tokens, cfg.batch_size or 32)
    markers = load_markers()
    return sum(is_refusal(classify(t, markers)) for t in texts) / len(texts)


def resolve_layer(spec: str | int | float, d: Directions, projected: bool = False) -> tuple[torch.Tensor, dict]:
    """The direction for `--layer`: an index, `best`, or a fraction of the depth (interpolated)."""
    return at_layer(d.projected if projected else d.directions, spec, d.suggested_layer)


def at_layer(table: torch.Tensor, spec: str | int | float, best: int) -> tuple[torch.Tensor, dict]:
    """Row of a [layers, hidden] table for a layer spec (an index, `best`, or an interpolated fraction)."""
    n = table.shape[0]
    text = str(spec).strip()
    if text == "best":
        return table[best].clone(), {"spec": "best", "index": best, "fraction": best / max(1, n - 1)}
    try:
        value = float(text)
    except ValueError as exc:
        raise UserError(f"--layer must be an index, 'best' or a fraction in (0, 1), got '{spec}'") from exc
    if "." not in text and value == int(value):
        index = int(value)
        if not -n <= index < n:
            raise UserError(f"--layer {index} is beyond the model's depth ({n} layers: 0..{n - 1})")
        index %= n
        return table[index].clone(), {"spec": text, "index": index, "fraction": index / max(1, n - 1)}
    if not 0.0 <= value <= 1.0:
        raise UserError(f"--layer fraction must lie in [0, 1], got {value}")
    pos = value * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    w = pos - lo
    direction = unit((1 - w) * table[lo] + w * table[hi])
    return direction, {"spec": text, "index": round(pos), "fraction": value, "between": [lo, hi], "weight": w}


def removal(d: Directions, spec: str | int | float, projected: bool = False, per_set: bool = True):
    """What the edit removes for a layer spec: one direction [hidden], or, with several measured prompt
    sets, the orthonormal span of their directions (k rows, given to every layer: [layers, k, hidden]);
    and the layer info."""
    from pipeline.edit.abliterate import orthonormal

    direction, info = resolve_layer(spec, d, projected)
    if not per_set or d.set_directions is None or len(d.set_directions) < 2:
        return direction, info
    rows = []
    for table in d.set_directions:
        table = project_out_harmless(table, d.harmless_mean) if projected else table
        rows.append(at_layer(table, spec, d.suggested_layer)[0])
    basis = orthonormal(torch.stack(rows))
    info = {**info, "sets": list(d.set_names), "rank": int(basis.shape[0])}
    # The edit takes k directions per layer as [layers, k, hidden]; here every layer gets the same k.
    return basis[None].expand(d.num_layers, -1, -1).contiguous(), info


def save(d: Directions, folder: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "directions": d.directions.contiguous(),
        "projected": d.projected.contiguous(),
        "harmful_mean": d.harmful_mean.contiguous(),
        "harmless_mean": d.harmless_mean.contiguous(),
    }
    if d.set_directions is not None:
        tensors["set_directions"] = d.set_directions.contiguous()
    save_file(tensors, str(folder / DIRECTIONS_FILE))
    meta = {
        "suggested_layer": d.suggested_layer,
        "num_layers": d.num_layers,
        "hidden_size": d.directions.shape[1],
        "layers": [asdict(s) for s in d.stats],
        "set_names": list(d.set_names),
        **d.info,
        **(extra or {}),
    }
    (folder / DIRECTIONS_JSON).write_text(json.dumps(meta, indent=2))
    plot(d, folder / DIRECTIONS_PNG)


def load(folder_or_file: Path) -> Directions:
    from safetensors.torch import load_file

    path = Path(folder_or_file)
    if not path.exists():
        raise UserError(f"directions '{path}' not found: give the folder or .safetensors written by `directions`")
    folder = path if path.is_dir() else path.parent
    tensor_file = path if path.is_file() else folder / DIRECTIONS_FILE
    meta_file = folder / DIRECTIONS_JSON
    if not tensor_file.exists() or not meta_file.exists():
        raise UserError(
            f"no directions at '{path}': expected {DIRECTIONS_FILE} and {DIRECTIONS_JSON} (run `directions`)"
        )
    t = load_file(str(tensor_file))
    meta = json.loads(meta_file.read_text())
    stats = [LayerStats(**s) for s in meta.pop("layers")]
    names = tuple(meta.pop("set_names", ()))
    return Directions(
        t["directions"], t["projected"], t["harmful_mean"], t["harmless_mean"], stats, meta.pop("suggested_layer"),
        meta, t.get("set_directions"), names,
    )


def plot(d: Directions, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [s.layer for s in d.stats]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(layers, [s.separation for s in d.stats], marker="o", label="separation (Cohen's d)")
    ax.set_xlabel("layer")
    ax.set_ylabel("separation")
    ax2 = ax.twinx()
    ax2.plot(layers, [s.accuracy for s in d.stats], color="tab:green", marker=".", label="accuracy")
    if any(s.refusal_ablated is not None for s in d.stats):
        pts = [(s.layer, s.refusal_ablated) for s in d.stats if s.refusal_ablated is not None]
        ax2.plot(*zip(*pts, strict=False), color="tab:red", marker="x", linestyle="", label="refusal when ablated")
    ax2.set_ylim(0, 1.05)
    ax.set_ylim(bottom=min(0.0, *(s.separation for s in d.stats)))
    ax.axvline(d.suggested_layer, color="gray", linestyle="--", label=f"best measured layer {d.suggested_layer}")
    # Below the axes, never over the data or the axis labels.
    handles = [h for a in (ax, ax2) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=8, frameon=False)
    ax.set_title("Refusal direction per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
