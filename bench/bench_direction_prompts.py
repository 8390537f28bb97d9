"""Does a refusal direction measured from more prompts keep less KL at the plain edit's strength?

A: the directions of the default chain (`--directions`, 64 harmful / 64 harmless measurement prompts on a real
model). B: measured here from every bundled harmful prompt outside the evaluation prompts and `--harmless`
harmless ones. The plain default edit of each, B's weights scaled until its refusal likelihood on the harmful
prompts the search sees (trial + confirm parts; the base's refusals) matches A's: equal strength. Then the
first-token KL of both on the harmless prompts seen and on harmless prompts neither measurement used, paired per
prompt (`bench_kl_holdout.paired`). The test part is not used.

    .venv/bin/python bench/bench_direction_prompts.py [--model qwen] [--directions bench/results/real-out]

Prints a table and a SUMMARY line; writes bench/results/bench_direction_prompts[-MODEL].json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_kl_holdout import RESULTS, paired  # noqa: E402


def pools(model: str, n_harmless: int) -> dict[str, Any]:
    """The prompt pools: seen (the search's trial + confirm parts), B's measurement prompts, the holdout."""
    from pipeline.edit import stages
    from pipeline.edit.search_workbench import split_parts
    from pipeline.io.prompts import load_prompts

    prompts = stages.resolve_prompts(model, stages.PromptsConfig())
    parts = split_parts(prompts.harmful.evaluate, prompts.harmless.evaluate, prompts.eval_groups(), 0.5)
    hf_specs, hl_specs = stages.default_specs(model)

    def rest(specs: str, split: Any) -> list[str]:
        taken = set(split.evaluate) | set(split.measure)
        return list(dict.fromkeys(p for s in specs.split(",") for p in load_prompts(s).prompts if p not in taken))

    harmless_rest = rest(hl_specs, prompts.harmless)
    extra = max(0, n_harmless - len(prompts.harmless.measure))
    return {"seen_harmful": parts["trial"][0] + parts["confirm"][0],
            "seen_harmless": parts["trial"][1] + parts["confirm"][1],
            "measure_harmful": list(prompts.harmful.measure) + rest(hf_specs, prompts.harmful),
            "measure_harmless": list(prompts.harmless.measure) + harmless_rest[:extra],
            "holdout": harmless_rest[extra:]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen", help="a real model key of tests/real_models.py")
    parser.add_argument("--directions", type=Path, default=RESULTS / "real-out", help="A: the chain's directions")
    parser.add_argument("--harmless", type=int, default=128, help="harmless prompts B is measured from")
    args = parser.parse_args(argv)

    from pipeline.edit import directions as dirs
    from pipeline.edit import stages
    from pipeline.edit.abliterate import EditConfig
    from pipeline.edit.search import SearchConfig
    from pipeline.edit.search_space import from_edit, scaled, to_edit
    from pipeline.edit.selection import WeightEdits
    from pipeline.evaluation.evaluate import (
        EvalConfig,
        classify,
        first_token_logprobs,
        generate,
        is_refusal,
        kl_per_prompt,
        markers_for,
    )
    from pipeline.evaluation.likelihood import refusal_likelihood
    from pipeline.io.loading import load_model
    from tests.real_models import fetch

    began = time.perf_counter()
    model = str(fetch(args.model))
    loaded = load_model(model)
    m, tok = loaded.model, loaded.tokenizer
    p = pools(model, args.harmless)
    replies = generate(m, tok, list(p["seen_harmful"]), EvalConfig().max_new_tokens)
    markers = markers_for(EvalConfig())
    said = [(q, r) for q, r in zip(p["seen_harmful"], replies, strict=True) if is_refusal(classify(r, markers))]
    kl_prompts = list(p["seen_harmless"]) + p["holdout"]
    base = first_token_logprobs(m, tok, kl_prompts)
    a = dirs.load(args.directions)
    measured = time.perf_counter()
    b = dirs.measure(m, tok, p["measure_harmful"], p["measure_harmless"], dirs.DirectionsConfig())
    measure_s = time.perf_counter() - measured
    edits = WeightEdits(m, EditConfig())

    def probe(d: dirs.Directions, values: dict, factor: float = 1.0) -> tuple[float, list[float]]:
        edit, spec = to_edit(scaled(values, factor), EditConfig(), d.suggested_layer / max(1, d.num_layers - 1))
        direction, _, edit = stages.chosen_direction(d, spec, edit)  # kernels placed: `applied` keeps them
        with edits.applied(direction, d.suggested_layer, edit):
            likelihood = refusal_likelihood(m, tok, [q for q, _ in said], [r for _, r in said])
            return likelihood, kl_per_prompt(base, first_token_logprobs(m, tok, kl_prompts)).tolist()

    plain = {k: from_edit(stages.default_edit(d, "best", EditConfig()), d, SearchConfig())
             for k, d in (("a", a), ("b", b))}
    target, kl_a = probe(a, plain["a"])
    previous, (lik, kl_b) = (1.0, 0.0), probe(b, plain["b"])
    factor = 0.9 if lik < target else 1.1  # B stronger than A: weaken it, else strengthen
    if abs(lik - target) >= 1e-3:
        previous, (lik, kl_b) = (1.0, lik), probe(b, plain["b"], factor)
    for _ in range(5):  # secant steps on the factor until B's likelihood is within 0.001 of A's
        if abs(lik - target) < 1e-3:
            break
        slope = (lik - previous[1]) / (factor - previous[0])
        previous, factor = (factor, lik), factor + (target - lik) / slope
        lik, kl_b = probe(b, plain["b"], factor)
    n = len(p["seen_harmless"])
    rows = {"seen": paired(kl_a[:n], kl_b[:n]), "holdout": paired(kl_a[n:], kl_b[n:]), "all": paired(kl_a, kl_b)}
    print(f"A layer {a.suggested_layer}, B layer {b.suggested_layer}; B measured from {len(p['measure_harmful'])} "
          f"harmful / {len(p['measure_harmless'])} harmless prompts in {measure_s:.0f} s; base refused {len(said)} of "
          f"{len(p['seen_harmful'])} seen harmful prompts")
    print(f"likelihood A {target:.4f}, B {lik:.4f} at weights x{factor:.3f}")
    print("| harmless prompts | n | KL A | KL B | change | z |")
    for k, r in rows.items():
        print(f"| {k} | {r['n']} | {r['plain']:.5f} | {r['kl']:.5f} | {r['change']:+.1%} | {r['z']:.2f} |")
    print(f"SUMMARY direction prompts ({args.model}): at equal refusal likelihood, a direction from "
          f"{len(p['measure_harmful'])}/{len(p['measure_harmless'])} prompts changes KL by "
          f"{rows['holdout']['change']:+.1%} (z {rows['holdout']['z']:.2f}) on {rows['holdout']['n']} unseen harmless "
          f"prompts and {rows['seen']['change']:+.1%} on the {n} seen; {time.perf_counter() - began:.0f} s")
    out = {"model": args.model, "layers": [a.suggested_layer, b.suggested_layer], "factor": factor,
           "likelihood": [target, lik], "prompts": {k: len(v) for k, v in p.items()}, "kl": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_direction_prompts-{args.model}.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
