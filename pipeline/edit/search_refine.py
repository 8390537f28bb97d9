"""Edits of one strength: matching an edit to a refusal likelihood, and refining the plain edit at that strength.

Trials compare edits of different strengths by refusal counts on a few dozen prompts, and a trial with a lower
KL than the plain edit is most often a weaker one. Refinement compares edits at one strength instead: starting
from the plain edit, each move of `MOVES` (another method, weight moved between attention and MLP, a narrower or
wider kernel, the kernels earlier or later) is scaled until it starts the base model's refusals exactly as readily
as the target (`match_strength`: probes, one forward pass each, no generation), and the move that then keeps the
least KL on the harmless prompts seen is taken; round after round, while a move still gains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.edit.abliterate import EditConfig
from pipeline.edit.search_space import KERNEL_SPACE, METHODS, scaled, strength_cap
from pipeline.edit.search_workbench import Workbench, refusal_of

# a kernel's fields by role, per kind: what a move scales or shifts
ROLES = {"weight": ("strength", "max_weight"), "reach": ("width", "distance"), "place": ("shift",)}
LOWEST_FACTOR = 0.25  # below it an edit does next to nothing: matching gives up rather than go there


@dataclass(frozen=True)
class Move:
    """One change to an edit's parameters: per component ("attn", "mlp") and role, a factor or an offset."""

    name: str
    times: dict[tuple[str, str], float] = field(default_factory=dict)
    plus: dict[tuple[str, str], float] = field(default_factory=dict)

    def apply(self, params: dict[str, Any]) -> dict[str, Any]:
        out = dict(params)
        for key, value in params.items():
            comp, _, name = key.partition(".")
            kind = params.get(f"{comp}.kind")
            role = next((r for r, names in ROLES.items() if name in names), None)
            if kind not in KERNEL_SPACE or role is None:
                continue
            low, high, _ = KERNEL_SPACE[kind][name]
            moved = value * self.times.get((comp, role), 1.0) + self.plus.get((comp, role), 0.0)
            out[key] = round(min(high, max(low, moved)), 4)
        return out


_BOTH = ("attn", "mlp")
# Kernel moves, small enough that matching the strength again stays a local step.
MOVES = (
    Move("towards attention", times={("attn", "weight"): 1.15, ("mlp", "weight"): 0.85}),
    Move("towards MLP", times={("attn", "weight"): 0.85, ("mlp", "weight"): 1.15}),
    Move("narrower", times={(c, "reach"): 0.8 for c in _BOTH}),
    Move("wider", times={(c, "reach"): 1.25 for c in _BOTH}),
    Move("earlier", plus={(c, "place"): -0.04 for c in _BOTH}),
    Move("later", plus={(c, "place"): 0.04 for c in _BOTH}),
)


def moves_from(params: dict[str, Any], search_method: bool) -> list[tuple[str, dict[str, Any]]]:
    """(name, parameters) of every move from ``params`` that changes something (clamped moves may not)."""
    out = [(f"method {m}", params | {"method": m}) for m in METHODS if search_method and m != params.get("method")]
    out += [(m.name, m.apply(params)) for m in MOVES]
    return [(name, p) for name, p in out if p != params]


@dataclass(frozen=True)
class Matched:
    factor: float  # on the kernels' peak weights (`scaled`)
    likelihood: float
    kl: float  # first-token KL on the harmless prompts seen


def match_strength(bench: Workbench, params: dict[str, Any], base: EditConfig, target: float, tol: float,
                   steps: int = 6, first: tuple[float | None, float] | None = None) -> Matched | None:
    """The factor on ``params``' peak weights at which the edit's refusal likelihood lies in [target - tol,
    target]: secant steps up or down, since the likelihood falls steadily as the weights grow. None when the
    search space's weights cannot get there. ``first``: the probe of ``params`` as they are, if already made."""
    def at(factor: float) -> tuple[float | None, float]:
        return bench.probe(*bench.edit_of(scaled(params, factor), base))

    cap = strength_cap(params)
    f0, (l0, k0) = 1.0, first or at(1.0)
    if l0 is None or target - tol <= l0 <= target:
        return None if l0 is None else Matched(1.0, l0, k0)
    f1 = min(cap, 1.02) if l0 > target else 0.98
    if f1 <= f0 and l0 > target:  # at the space's ceiling already
        return None
    l1, k1 = at(f1)
    for _ in range(steps):
        if l1 is None or target - tol <= l1 <= target:
            break
        slope = (l1 - l0) / (f1 - f0)
        if slope >= 0:
            return None
        f2 = min(cap, max(LOWEST_FACTOR, f1 + (target - tol / 2 - l1) / slope))  # aim at the window's middle
        if abs(f2 - f1) < 1e-4:
            break
        f0, l0, f1, (l1, k1) = f1, l1, f2, at(f2)
    return Matched(f1, l1, k1) if l1 is not None and l1 <= target else None


def strengthen(bench: Workbench, params: dict[str, Any], base: EditConfig, target: float,
               tol: float) -> Matched | None:
    """`match_strength` for an edit that is weaker than ``target``; None when it is that strong already."""
    first = bench.probe(*bench.edit_of(params, base))
    if first[0] is None or first[0] <= target:
        return None
    return match_strength(bench, params, base, target, tol, first=first)


@dataclass(frozen=True)
class Refined:
    params: dict[str, Any]
    start: Matched  # the starting edit, matched to the target
    matched: Matched  # the refined edit (its factor already applied to ``params``)
    path: tuple[str, ...]  # the moves taken, in order


def refine(bench: Workbench, start: dict[str, Any], base: EditConfig, target: float, tol: float, rounds: int,
           search_method: bool, min_gain: float = 0.01, say: Callable[[str], Any] | None = None,
           first: tuple[float | None, float] | None = None) -> Refined | None:
    """Greedy descent on KL at the strength ``target``, from ``start``: each round, every move matched to the
    target, and the one with the least KL taken while it gains at least ``min_gain`` (relative) over the current
    edit. None when ``start`` cannot be matched or no move gains. ``first``: the probe of ``start``, if made."""
    matched = match_strength(bench, start, base, target, tol, first=first)
    if matched is None:
        return None
    current, now, path = scaled(start, matched.factor), matched, ()
    for _ in range(rounds):
        tried = []
        for name, params in moves_from(current, search_method):
            found = match_strength(bench, params, base, target, tol)
            if found is not None:
                tried.append((found.kl, name, scaled(params, found.factor), found))
            if say:
                shown = "cannot reach it" if found is None else f"x{found.factor:.3f}, KL {found.kl:.4f}"
                say(f"refining ({' + '.join(path) or 'plain edit'}, KL {now.kl:.4f}) {name}: {shown}")
        if not tried:
            break
        kl, name, params, found = min(tried, key=lambda x: (x[0], x[1]))
        if kl > now.kl * (1 - min_gain):
            break
        current, now, path = params, found, (*path, name)
    return Refined(current, matched, now, path) if path else None


# Factors on the peak weights tried, in order, when an edit is raised by its replies (`raise_by_replies`).
REPLY_FACTORS = (1.1, 1.2, 1.3, 1.4, 1.5)
EPS = 1e-9


@dataclass(frozen=True)
class Raised:
    factor: float  # on the kernels' peak weights (`scaled`)
    refusal: float  # on the trial and confirm parts together, by generated replies
    kl: float  # there


def seen_score(bench: Workbench, params: dict[str, Any], base: EditConfig) -> tuple[float, float]:
    """(refusal rate, KL) of an edit on the trial and confirm parts together (prompt-weighted), by generated
    replies, as `search.confirm` scores finalists (the confirm part with its likelihood, so confirming the same
    edit later evaluates nothing again)."""
    edit = bench.edit_of(params, base)
    runs = [(bench.run(*edit, part=p, likelihood=p == "confirm")[0], bench.parts[p]) for p in ("trial", "confirm")]
    n, m = (sum(len(getattr(part, side)) for _, part in runs) for side in ("harmful", "harmless"))
    refusal = sum(refusal_of(r) * len(part.harmful) for r, part in runs) / n
    return refusal, sum(r["kl_divergence"] * len(part.harmless) for r, part in runs) / m


def raise_by_replies(bench: Workbench, params: dict[str, Any], base: EditConfig, plain: tuple[float, float],
                     target: float, factors: tuple[float, ...] = REPLY_FACTORS,
                     say: Callable[[str], Any] | None = None) -> Raised | None:
    """The first of 1 and ``factors`` (on ``params``' peak weights, within the search space) at which the edit
    refuses at most ``target`` of the prompts seen, by generated replies (`seen_score`); failing that, the one
    refusing least, if no more than the ``plain`` edit's (refusal, KL). Stops where the KL reaches the plain
    edit's: no gain is left. For directions whose refusal likelihood does not compare with the plain edit's
    (`direction_fit` keeps its replies, not the base's refusal openings)."""
    found = None
    for factor in (1.0, *(f for f in factors if f <= strength_cap(params) + EPS)):
        refusal, kl = seen_score(bench, params if factor == 1.0 else scaled(params, factor), base)
        if say:
            say(f"raising by replies: x{factor:.2f} refuses {refusal:.1%} at KL {kl:.4f} (plain edit "
                f"{plain[0]:.1%} at {plain[1]:.4f}; aim {target:.1%})")
        if kl >= plain[1]:
            break
        if refusal <= plain[0] + EPS and (found is None or refusal < found.refusal - EPS):
            found = Raised(factor, refusal, kl)
        if refusal <= target + EPS:
            break
    return found

