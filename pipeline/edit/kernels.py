"""Per-layer edit strengths: a kernel over depth for each component.

Positions and widths are fractions of the depth (layer i of n sits at
i / (n - 1)), so one setting transfers between models of different depth.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ComponentKernel(BaseModel):
    """Edit strength over depth for one component (attention or MLP)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["gaussian", "tent", "off"] = Field(
        "gaussian", description="Kernel shape; off disables the component."
    )
    strength: float = Field(
        1.0, ge=0, le=2, description="gaussian: weight at the peak (1 removes the direction fully)."
    )
    peak: float | None = Field(
        None, ge=0, le=1,
        description="gaussian: position of the peak, as a fraction of depth (default: the direction's layer).")
    width: float = Field(0.5, gt=0, le=5, description="gaussian: standard deviation, as a fraction of depth.")
    max_weight: float = Field(1.0, ge=0, le=2, description="tent: weight at its position.")
    position: float | None = Field(
        None, ge=0, le=1,
        description="tent: position of the maximum, as a fraction of depth (default: the direction's layer).")
    min_weight: float = Field(0.0, ge=0, le=2, description="tent: weight at `distance` from the position.")
    distance: float = Field(0.5, gt=0, le=1, description="tent: reach on each side, as a fraction of depth; 0 beyond.")


POSITION_FIELD = {"gaussian": "peak", "tent": "position"}  # the field that says where each shape sits


def placed(kernel: ComponentKernel, fraction: float) -> ComponentKernel:
    """The kernel with an unset peak/position put at ``fraction`` of the depth (the direction's layer)."""
    name = POSITION_FIELD.get(kernel.kind)
    if name is None or getattr(kernel, name) is not None:
        return kernel
    return kernel.model_copy(update={name: round(fraction, 4)})


def layer_weights(kernel: ComponentKernel, num_layers: int) -> list[float]:
    """The edit strength of each layer (the kernel must be placed: see `placed`)."""
    if kernel.kind in POSITION_FIELD and getattr(kernel, POSITION_FIELD[kernel.kind]) is None:
        raise ValueError("the kernel has no position yet: place it at the direction's layer first")
    weights = []
    for i in range(num_layers):
        x = i / max(1, num_layers - 1)
        if kernel.kind == "off":
            w = 0.0
        elif kernel.kind == "gaussian":
            w = kernel.strength * math.exp(-((x - kernel.peak) ** 2) / (2 * kernel.width**2))
        else:
            d = abs(x - kernel.position)
            w = (
                0.0
                if d > kernel.distance
                else kernel.max_weight + (kernel.min_weight - kernel.max_weight) * d / kernel.distance
            )
        weights.append(w)
    return weights


# Every preset is centred on the direction's own layer (the peak is placed there when the layer is
# known). `standard` removes the direction fully there and fades with distance (sd 0.35 of the depth):
# on Qwen2.5-Coder-0.5B this beat the paper's full strength at every layer (refusal 12.5% -> 9.4%,
# first-token KL 0.076 -> 0.056, perplexity +17% -> +3.3%; bench/bench_real.py), because editing the first
# layers with a late layer's direction costs fluency and removes no refusal.
# `conservative` is weaker and narrower; `aggressive` is the paper's edit everywhere, over-shot, for
# stubborn refusals at some cost in KL.
PRESETS: dict[str, dict[str, ComponentKernel]] = {
    "conservative": {
        "attn": ComponentKernel(strength=0.8, width=0.25),
        "mlp": ComponentKernel(strength=0.8, width=0.25),
    },
    "standard": {
        "attn": ComponentKernel(strength=1.0, width=0.35),
        "mlp": ComponentKernel(strength=1.0, width=0.35),
    },
    "aggressive": {
        "attn": ComponentKernel(strength=1.25, width=2.0),
        "mlp": ComponentKernel(strength=1.25, width=2.0),
    },
}
