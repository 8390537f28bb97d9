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
    peak: float = Field(0.5, ge=0, le=1, description="gaussian: position of the peak, as a fraction of depth.")
    width: float = Field(0.5, gt=0, le=5, description="gaussian: standard deviation, as a fraction of depth.")
    max_weight: float = Field(1.0, ge=0, le=2, description="tent: weight at its position.")
    position: float = Field(0.5, ge=0, le=1, description="tent: position of the maximum, as a fraction of depth.")
    min_weight: float = Field(0.0, ge=0, le=2, description="tent: weight at `distance` from the position.")
    distance: float = Field(0.5, gt=0, le=1, description="tent: reach on each side, as a fraction of depth; 0 beyond.")


def layer_weights(kernel: ComponentKernel, num_layers: int) -> list[float]:
    """The edit strength of each layer."""
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


# `standard` is the paper's edit: (almost) full strength at every layer, which
# is also what the layer choice tests by ablating the direction everywhere.
# `conservative` concentrates a weaker edit in the middle of the stack, where
# the refusal feature forms, and leaves the ends (fluency) alone;
# `aggressive` over-shoots to remove stubborn refusals at some cost in KL.
PRESETS: dict[str, dict[str, ComponentKernel]] = {
    "conservative": {
        "attn": ComponentKernel(strength=0.8, peak=0.5, width=0.35),
        "mlp": ComponentKernel(strength=0.8, peak=0.5, width=0.35),
    },
    "standard": {
        "attn": ComponentKernel(strength=1.0, peak=0.5, width=2.0),
        "mlp": ComponentKernel(strength=1.0, peak=0.5, width=2.0),
    },
    "aggressive": {
        "attn": ComponentKernel(strength=1.25, peak=0.5, width=2.0),
        "mlp": ComponentKernel(strength=1.25, peak=0.5, width=2.0),
    },
}
