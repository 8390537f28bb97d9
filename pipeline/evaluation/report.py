"""Evaluation results as text: the rate cells, the before/after table and the note on rough rates.

One formatting for the CLI, the Space and the model card, so a rate reads the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ROUGH_BELOW = 30  # prompts: fewer, and the card calls the rate rough


def percent(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.1f}%"


def number(value: Any, digits: int = 4) -> str:
    return "–" if value is None else f"{float(value):.{digits}g}"


def with_interval(rate: Any, interval: Sequence[float] | None, count: str = "") -> str:
    """"10.0% (4/40; 95% CI 4.0–23.1%)": a rate, its count and its 95% Wilson interval when known."""
    if rate is None:
        return "–"
    parts = [count.strip(" ()")] if count else []
    if interval:
        parts.append(f"95% CI {100 * interval[0]:.1f}–{100 * interval[1]:.1f}%")
    return percent(rate) + (f" ({'; '.join(parts)})" if parts else "")


def _sides(values: dict[str, Any] | None, bounds: dict[str, Any] | None) -> tuple[str, str]:
    """(base, model) cells of a rate with its interval."""
    values, bounds = values or {}, bounds or {}
    base, model = (with_interval(values.get(side), bounds.get(side)) for side in ("base", "model"))
    return base, model


def benchmark_rows(benchmarks: dict[str, dict] | None) -> list[tuple[str, str, str]]:
    """(name, base, model with its change) per benchmark metric."""
    rows = []
    for task, scores in (benchmarks or {}).items():
        for metric, v in scores.items():
            delta = "" if v.get("delta") is None else f" ({v['delta']:+.4g})"
            rows.append((f"Benchmark: {task} {metric}", number(v.get("base")), number(v.get("model")) + delta))
    return rows


def markdown_table(results: dict[str, Any]) -> str:
    """A before/after table for the CLI and the Space: rates with their 95% Wilson intervals."""
    ppl, refusals = results["perplexity"], results["refusals"]
    n = results["num_prompts"]["harmful"]

    def count(side: str, key: str) -> str:
        counts = refusals[side]
        return "–" if counts is None else f"{counts.get(key, 0)}/{n}"

    per_set = [
        (f"Refusal rate: {name} ({v['n']} prompts)", *_sides(v, v.get("interval")))
        for name, v in (results.get("by_set") or {}).items()
    ]
    undetermined = results.get("undetermined") or {}
    rows = [
        ("Refusal rate", *_sides(results["refusal_rate"], results.get("refusal_interval"))),
        *per_set,
        ("On-topic answers", *_sides(results.get("on_topic_rate"), results.get("on_topic_interval"))),
        *([("Undetermined (reasoning unfinished)", number(undetermined.get("base")), number(undetermined.get("model")))]
          if any(undetermined.values()) else []),
        *((f"Refusals: {k}", count("base", k), count("model", k)) for k in refusals["model"] if k != "total"),
        ("Removal rate", "", percent(results["removal_rate"])),
        ("KL divergence (first answer token)", "0", number(results["kl_divergence"])),
        ("Perplexity (reference text)", number(ppl["base"]), number(ppl["model"])),
        *benchmark_rows(results.get("benchmarks")),
    ]
    lines = ["| Metric | Base | This model |", "|---|---|---|"]
    lines += [f"| {name} | {before} | {after} |" for name, before, after in rows]
    return "\n".join(lines) + "\n"


def rough_note(evals: dict[str, Any]) -> str:
    """A sentence saying the rates are rough when they rest on few prompts ("" otherwise)."""
    n = (evals.get("num_prompts") or {}).get("harmful")
    small = {name: v.get("n") for name, v in (evals.get("by_set") or {}).items() if (v.get("n") or 0) < ROUGH_BELOW}
    if not n or (n >= ROUGH_BELOW and not small):
        return ""
    if n < ROUGH_BELOW:
        bounds = (evals.get("refusal_interval") or {}).get("model")
        span = f" (its 95% interval spans {100 * (bounds[1] - bounds[0]):.0f} points)" if bounds else ""
        return (f"These rates rest on only {n} harmful prompts, so they are rough{span}: a few replies more or "
                "less move them by many points. Evaluate on more prompts for a firmer number.")
    sets = ", ".join(f"`{name}` ({k})" for name, k in small.items())
    return f"The rates of the smaller prompt sets are rough: {sets} prompts."
