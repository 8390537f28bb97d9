"""The search space: what a trial samples, and how its parameters become an edit.

A trial picks a method, whose directions it removes (the chain's, or the search's own: measured from more
prompts with `SearchConfig.wide_prompts`, or fitted to the plain edit with `SearchConfig.fit_steps`), the
direction's layer (a fraction of the depth, interpolated) and a
kernel per component. Kernels are placed relative to the trial's layer (a shift), so most of the space lies around
the layer the direction came from. A new study starts with the plain edit and its near variants
(`neighbours`), then samples with TPE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.edit import directions as dirs
from pipeline.edit.abliterate import EditConfig
from pipeline.edit.kernels import POSITION_FIELD, PRESETS, ComponentKernel, placed

if TYPE_CHECKING:  # search.py imports this module
    from pipeline.edit.search import SearchConfig

METHODS = ("standard", "projected", "norm-preserving")
SOURCES = ("chain", "wide")  # the chain's directions, or the search's own (more prompts, or fitted)
LAYER_RANGE = (0.3, 0.9)  # direction layer, as a fraction of depth (interpolated between layers)

# kind -> search parameter -> (low, high, log scale). "shift" places the shape relative to the direction's
# layer (peak/position = layer + shift): on Qwen2.5 a kernel centred there beat every placement in absolute
# depth (bench/README.md), and an absolute range spends most trials on shapes that miss that layer.
# Weights start at 0.5: below it no trial on the real model removed half the refusals.
KERNEL_SPACE = {
    "gaussian": {"strength": (0.5, 1.5, False), "shift": (-0.3, 0.3, False), "width": (0.1, 2.0, True)},
    "tent": {"max_weight": (0.5, 1.5, False), "shift": (-0.3, 0.3, False), "min_weight": (0.0, 1.0, False),
             "distance": (0.1, 1.0, False)},
}


def _suggest_kernel(trial: Any, comp: str, allow_off: bool) -> None:
    kind = trial.suggest_categorical(f"{comp}.kind", [*KERNEL_SPACE, "off"] if allow_off else [*KERNEL_SPACE])
    for name, (low, high, log_scale) in KERNEL_SPACE.get(kind, {}).items():
        trial.suggest_float(f"{comp}.{name}", low, high, log=log_scale)


def own_directions(cfg: SearchConfig) -> bool:
    """Whether trials choose between the chain's directions and the search's own (the `source` parameter)."""
    return bool(cfg.wide_prompts or cfg.fit_steps)


def suggest(trial: Any, cfg: SearchConfig, base: EditConfig) -> dict[str, Any]:
    """Sample one point of the search space into ``trial``; returns its parameters."""
    if cfg.search_method:
        trial.suggest_categorical("method", list(METHODS))
    if own_directions(cfg):
        trial.suggest_categorical("source", list(SOURCES))
    single = not base.per_layer
    if cfg.search_per_layer:
        single = trial.suggest_categorical("directions", ["single", "per-layer"]) == "single"
    if single:
        trial.suggest_float("layer", *LAYER_RANGE, step=0.01)
    _suggest_kernel(trial, "attn", False)
    _suggest_kernel(trial, "mlp", cfg.allow_mlp_off)
    return dict(trial.params)


def _kernel(comp: str, params: dict[str, Any], centre: float | None) -> ComponentKernel:
    fields = {k[len(comp) + 1:]: v for k, v in params.items() if k.startswith(comp + ".")}
    shift = fields.pop("shift", None)
    if shift is not None:
        if centre is None:
            raise ValueError("a per-layer trial's kernel is placed relative to the suggested layer: pass centre")
        fields[POSITION_FIELD[fields["kind"]]] = round(min(1.0, max(0.0, centre + shift)), 4)
    return ComponentKernel(**fields)


def to_edit(params: dict[str, Any], base: EditConfig, centre: float | None = None) -> tuple[EditConfig, str]:
    """The edit and layer spec of a trial's parameters (unsearched settings come from ``base``). Kernels sit
    at the trial's layer plus their shift; per-layer trials have no layer and use ``centre`` (the suggested
    layer's fraction of depth)."""
    per_layer = params.get("directions", "per-layer" if base.per_layer else "single") == "per-layer"
    centre = params.get("layer", centre)
    kernels = {c: _kernel(c, params, centre) for c in ("attn", "mlp")}
    edit = EditConfig(method=params.get("method", base.method), preset=None, **kernels,
                      embed_strength=base.embed_strength, per_layer=per_layer, per_set=base.per_set)
    return edit, "per-layer" if per_layer else f"{params['layer']:.2f}"


def _kernel_params(comp: str, kernel: ComponentKernel, allow_off: bool, centre: float) -> dict[str, Any]:
    if kernel.kind == "off" and not allow_off:
        kernel = placed(PRESETS["standard"][comp], centre)
    out: dict[str, Any] = {f"{comp}.kind": kernel.kind}
    for name, (low, high, _) in KERNEL_SPACE.get(kernel.kind, {}).items():
        value = getattr(kernel, POSITION_FIELD[kernel.kind]) - centre if name == "shift" else getattr(kernel, name)
        out[f"{comp}.{name}"] = min(high, max(low, value))
    return out


def from_edit(edit: EditConfig, d: dirs.Directions, cfg: SearchConfig) -> dict[str, Any]:
    """Search-space parameters of a plain edit at the suggested layer of the chain's directions ``d`` (the first
    trial of a new study)."""
    params: dict[str, Any] = {"method": edit.method} if cfg.search_method else {}
    if own_directions(cfg):
        params["source"] = "chain"
    if cfg.search_per_layer:
        params["directions"] = "per-layer" if edit.per_layer else "single"
    fraction = d.suggested_layer / max(1, d.num_layers - 1)
    if not edit.per_layer:
        params["layer"] = round(min(LAYER_RANGE[1], max(LAYER_RANGE[0], fraction)), 2)
    centre, edit = params.get("layer", fraction), edit.placed(fraction)
    return params | _kernel_params("attn", edit.attn, False, centre) | _kernel_params(
        "mlp", edit.mlp, cfg.allow_mlp_off, centre)


# Near variants of the plain edit: kernel parameter -> factor. Weaker and narrower shapes are where a lower KL
# at the same refusal lies, if anywhere near the default.
NEIGHBOUR_SCALES = ({"strength": 0.85, "max_weight": 0.85}, {"width": 0.7, "distance": 0.7})


def neighbours(params: dict[str, Any], cfg: SearchConfig) -> list[dict[str, Any]]:
    """Variants of a plain edit's parameters, each one change away: the other methods (when searched), then
    both kernels scaled by each of NEIGHBOUR_SCALES (clamped to the search space)."""
    out = [params | {"method": m} for m in METHODS if cfg.search_method and m != params.get("method")]
    for scales in NEIGHBOUR_SCALES:
        variant = dict(params)
        for key, value in params.items():
            comp, _, name = key.partition(".")
            kind = params.get(f"{comp}.kind")
            if name in scales and kind in KERNEL_SPACE:
                low, high, _ = KERNEL_SPACE[kind][name]
                variant[key] = min(high, max(low, value * scales[name]))
        if variant != params:
            out.append(variant)
    return out


WEIGHT_FIELDS = ("strength", "max_weight")  # the weight a kernel gives at its peak, per kind


def strength_cap(params: dict[str, Any]) -> float:
    """The largest factor `scaled` may apply before a kernel's peak weight leaves the search space."""
    caps = [KERNEL_SPACE[params[f"{comp}.kind"]][name][1] / value for key, value in params.items()
            for comp, _, name in [key.partition(".")]
            if name in WEIGHT_FIELDS and params.get(f"{comp}.kind") in KERNEL_SPACE and value > 0]
    return min(caps, default=1.0)


def scaled(params: dict[str, Any], factor: float) -> dict[str, Any]:
    """The same edit with every kernel's peak weight times ``factor`` (shape, place and method kept)."""
    return {key: round(value * factor, 4) if key.partition(".")[2] in WEIGHT_FIELDS else value
            for key, value in params.items()}
