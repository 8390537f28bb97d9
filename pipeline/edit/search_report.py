"""What the automatic search shows: a trial's edit in words, the Pareto front as a table and a chart."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.edit.search_choice import Scored


def fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


_SHAPES = {"gaussian": ("gauss", "strength", "peak", "width"), "tent": ("tent", "max_weight", "position", "distance")}


def describe(params: dict[str, Any]) -> str:
    """A short description of a trial's edit: method, direction, kernel per component (weight@position±reach,
    the position as the direction's layer plus a shift)."""
    parts = [params["method"]] if "method" in params else []
    where = f"layer {params['layer']:.2f}" if "layer" in params else "per-layer"
    parts.append(f"{where} (own direction)" if params.get("source") == "wide" else where)
    for comp in ("attn", "mlp"):
        kind = params[f"{comp}.kind"]
        if kind == "off":
            parts.append(f"{comp} off")
            continue
        label, *names = _SHAPES[kind]
        w, reach = params[f"{comp}.{names[0]}"], params[f"{comp}.{names[2]}"]
        shift = params.get(f"{comp}.shift")  # relative to the direction's layer; older studies: absolute
        at = f"layer{shift:+.2f}" if shift is not None else f"{params[f'{comp}.{names[1]}']:.2f}"
        floor = f">{params[f'{comp}.min_weight']:.2f}" if kind == "tent" else ""
        parts.append(f"{comp} {label} {w:.2f}@{at}±{reach:.2f}{floor}")
    return ", ".join(parts)


def front_table(front: list[Scored], chosen: int | None = None) -> str:
    lines = ["| trial | refusal | KL | edit |", "|---|---|---|---|"]
    for t in front:
        mark = " (chosen)" if t.number == chosen else ""
        lines.append(f"| {t.number}{mark} | {t.refusal:.1%} | {t.kl:.4f} | {describe(t.params)} |")
    return "\n".join(lines) + "\n"


def plot_pareto(study: Any, chosen: Scored, limit: float, path: Path, kls: list[float]) -> None:
    """Optuna's Pareto-front chart of the study, with the chosen trial and the refusal target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization.matplotlib import plot_pareto_front

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = plot_pareto_front(study, target_names=["refusal rate (evaluation prompts)",
                                                    "KL divergence (harmless, first token)"])
    ax.scatter([chosen.refusal], [chosen.kl], marker="*", s=250, color="tab:red", zorder=5,
               label=f"chosen (trial {chosen.number})")
    ax.axvline(limit, color="tab:green", linestyle="--", label=f"refusal target {limit:.1%}")
    if all(k > 0 for k in kls) and max(kls) > 100 * min(kls):
        ax.set_yscale("log")
    ax.set_title("Automatic search: refusal vs damage")
    ax.legend(fontsize=8)
    fig = ax.figure
    fig.set_size_inches(7, 4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
