"""Which trial the search keeps: the finalists worth re-scoring, and the rule that picks one of them.

Refusal counts on a few dozen prompts move in steps of one prompt, so a weaker edit can tie with the plain
edit on the prompts the search saw and refuse more on the next ones. Finalists therefore carry their
*refusal likelihood* too (`pipeline.evaluation.likelihood`: how readily the edited model still starts the
base model's refusals, a continuous measure); where the plain edit is a candidate, only an edit no weaker than
it by that measure can replace it, and only when its KL is lower beyond the noise of the prompts it was
measured on (`clearly_cheaper`, a paired comparison per prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipeline.errors import UserError

EPS = 1e-9


@dataclass(frozen=True)
class Scored:  # one completed trial
    number: int
    refusal: float
    kl: float
    params: dict[str, Any]
    layer: dict[str, Any]  # the layer info of the direction (resolve_layer's dict)
    likelihood: float | None = None  # refusal likelihood on the prompts seen (finalists only)
    kl_prompts: tuple[float, ...] = ()  # first-token KL per harmless prompt seen (finalists only)

    def rescored(self, refusal: float, kl: float, likelihood: float | None,
                 kl_prompts: tuple[float, ...] = ()) -> Scored:
        return replace(self, refusal=refusal, kl=kl, likelihood=likelihood, kl_prompts=tuple(kl_prompts))


def rank(trials: list[Scored], limit: float) -> list[Scored]:
    """Best first: trials at or below the refusal limit by KL, then the others by refusal (ties by KL)."""
    return sorted(trials, key=lambda t: (t.refusal > limit + EPS, t.kl if t.refusal <= limit + EPS else t.refusal,
                                         t.kl, t.number))


def finalists_of(front: list[Scored], trials: list[Scored], default: Scored | None, limit: float,
                 n: int) -> list[Scored]:
    """The trials to re-score: the best ``n`` of the Pareto front, the ``n`` lowest-KL trials refusing no more
    than the plain edit (its peers: on a few prompts one of them can be hidden behind a front member that
    refused one prompt less by chance), and the plain edit itself."""
    picks = rank(front, limit)[:n]
    if default is not None:
        peers = sorted((t for t in trials if t.refusal <= default.refusal + EPS and t.number != default.number),
                       key=lambda t: (t.kl, t.number))
        picks += [t for t in peers if t not in picks][:n] + ([default] if default not in picks else [])
    return picks


def counterpart(trials: list[Scored], default: Scored | None) -> Scored | None:
    """The plain edit made with the search's own direction (same layer and kernels), when it ran: a finalist
    always, since it differs from the plain edit by the direction's estimate alone."""
    if default is None or "source" not in default.params:
        return None
    wanted = default.params | {"source": "wide"}
    return next((t for t in trials if t.params == wanted), None)


def weaker(t: Scored, default: Scored | None) -> bool:
    """Whether ``t`` starts the base's refusals more readily than the plain edit: on the next prompts it refuses
    more, even where it refused fewer of the few seen (on the demo such a trial, 1 of 40 refused against the plain
    edit's 2, refused 7 of the 40 test prompts to its 3)."""
    if default is None or t.number == default.number or t.likelihood is None or default.likelihood is None:
        return False
    return t.likelihood > default.likelihood + EPS


# One-sided 95% normal quantile: a finalist replaces the plain edit only when its KL is lower with that confidence.
KL_EVIDENCE = 1.645


def clearly_cheaper(t: Scored, default: Scored | None, z: float = KL_EVIDENCE) -> bool:
    """Whether ``t``'s KL is lower than the plain edit's beyond the noise of the prompts it was measured on: the
    mean of the paired per-prompt differences exceeds ``z`` standard errors (on Qwen2.5 a finalist 1% lower on
    the 32 prompts seen was 3% higher on the test prompts). Without per-prompt KLs, the means decide."""
    if default is None or t.number == default.number:
        return True
    if not t.kl_prompts or len(t.kl_prompts) != len(default.kl_prompts):
        return t.kl < default.kl
    mean, se = paired_difference(default.kl_prompts, t.kl_prompts)
    return mean > z * se if len(t.kl_prompts) > 1 else mean > 0


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """The mean of the per-prompt differences ``a - b`` and its standard error (0 for a single prompt)."""
    diff = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diff)
    mean = sum(diff) / n
    spread = (sum((x - mean) ** 2 for x in diff) / max(1, n - 1)) ** 0.5
    return mean, spread / n**0.5 if n > 1 else 0.0


def choose(trials: list[Scored], base_rate: float, target: float, max_kl: float | None = None,
           default: Scored | None = None, slack: float = 0.0) -> tuple[Scored, str]:
    """The chosen trial and the rule that chose it, in words. With the plain edit's score (``default``)
    at or below the target, nothing refusing more than it (plus ``slack``: one prompt's worth, the noise
    floor of the count) can be chosen: the search does not trade refusals for KL against the plain edit.
    With it above the target by no more than ``slack``, nothing refusing more than it can be chosen either,
    and it is not traded for a stronger edit of higher KL: one prompt fewer is within the count's noise (on
    Qwen2.5 such a trial refused 2 of the 32 prompts seen to the plain edit's 3, and as many of the test
    prompts at 3% more KL). Nothing `weaker` than the plain edit replaces it, nor anything not `clearly_cheaper`."""
    if not trials:
        raise UserError("the study holds no completed trial to choose from: run more --trials")
    pool = [t for t in trials if (max_kl is None or t.kl <= max_kl) and not weaker(t, default)] or trials
    kl_note = f" and KL ≤ {max_kl:g}" if max_kl is not None and any(t.kl > max_kl for t in trials) else ""
    if default is not None and any(weaker(t, default) for t in trials):
        kl_note += f", none weaker than the plain edit (refusal likelihood ≤ {default.likelihood:.4f})"
    limit = target * base_rate
    if default is not None and default.refusal <= limit + slack + EPS:
        within = default.refusal <= limit + EPS
        cap = min(limit, default.refusal + slack) if within else default.refusal
        ok = [t for t in pool if t.refusal <= cap + EPS and clearly_cheaper(t, default)] or [default]
        if any(t.refusal <= cap + EPS and t.kl < default.kl and not clearly_cheaper(t, default) for t in pool):
            kl_note += ", none whose lower KL is within the per-prompt noise"
        best = min(ok, key=lambda t: (t.kl, t.refusal, t.number))
        where = (f"the plain edit's {default.refusal:.1%}{f' + {slack:.1%}' if slack else ''}, within the target "
                 f"{limit:.1%}" if within else f"the plain edit's, within one prompt of the target {limit:.1%}")
        return best, f"lowest KL among {len(ok)} finalists refusing at most {cap:.1%} ({where})" + kl_note
    ok = [t for t in pool if t.refusal <= limit + EPS]
    if ok:
        best = min(ok, key=lambda t: (t.kl, t.refusal, t.number))
        rule = f"lowest KL among {len(ok)} trials with refusal ≤ {limit:.1%} ({target:g} × base {base_rate:.1%})"
        return best, rule + kl_note
    best = min(pool, key=lambda t: (t.refusal, t.kl, t.number))
    if best.refusal >= base_rate:
        raise UserError(f"none of the {len(trials)} trials lowered the refusal rate below the base's "
                        f"{base_rate:.1%}: run more --trials (the study continues where it stopped)")
    return best, f"no trial reached refusal ≤ {limit:.1%}: lowest refusal (ties by KL)" + kl_note
