"""Does a finalist's lower KL on the prompts the search saw hold on harmless prompts it never saw?

Reads the result of `bench_search.py` (its finalists, with their parameters), applies the plain edit and each
finalist to MODEL in place, and measures the first-token KL against the base model on harmless prompts outside
the search's evaluation prompts: the measurement split, and the rest of the harmless sets that neither split
took. For each finalist it prints the mean KL against the plain edit's and the paired z of the per-prompt
differences (positive: lower than the plain edit's), beside the same comparison on the prompts seen.

    .venv/bin/python bench/bench_kl_holdout.py [--model qwen] [--result bench/results/bench_search-qwen.json]
        [--directions bench/results/real-out]

Prints a table and a SUMMARY line; writes bench/results/bench_kl_holdout[-MODEL].json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def paired(plain: list[float], other: list[float]) -> dict[str, float]:
    """Mean KLs, the relative change and the paired z (mean difference over its standard error), as
    `search_choice.clearly_cheaper` weighs them."""
    from pipeline.edit.search_choice import paired_difference

    n = len(plain)
    mean, se = paired_difference(plain, other)
    return {"n": n, "plain": sum(plain) / n, "kl": sum(other) / n, "change": -mean / (sum(plain) / n),
            "z": mean / se if se else 0.0}


def unseen_harmless(model: str) -> dict[str, list[str]]:
    """Harmless prompts outside the evaluation prompts: the measurement split and the sets' unused rest."""
    from pipeline.edit.stages import PromptsConfig, default_specs, resolve_prompts
    from pipeline.io.prompts import load_prompts

    prompts = resolve_prompts(model, PromptsConfig())
    used = set(prompts.harmless.evaluate) | set(prompts.harmless.measure)
    rest = [p for spec in default_specs(model)[1].split(",") for p in load_prompts(spec).prompts if p not in used]
    return {"measure": list(prompts.harmless.measure), "rest": list(dict.fromkeys(rest))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen", help="demo, or a real model key of tests/real_models.py")
    parser.add_argument("--result", type=Path, help="bench_search's JSON (default: its file for --model)")
    parser.add_argument("--directions", type=Path, default=RESULTS / "real-out", help="the directions it used")
    args = parser.parse_args(argv)

    from pipeline.edit import directions as dirs
    from pipeline.edit import stages
    from pipeline.edit.abliterate import EditConfig
    from pipeline.edit.search_space import to_edit
    from pipeline.edit.selection import WeightEdits
    from pipeline.evaluation.evaluate import first_token_logprobs, kl_per_prompt
    from pipeline.io.loading import load_model

    model = args.model
    if model != "demo":
        from tests.real_models import fetch

        model = str(fetch(args.model))
    result = json.loads((args.result or RESULTS / f"bench_search-{args.model}.json").read_text())
    finalists = {t["number"]: t for t in result["ours"]["summary"]["finalists"]}
    loaded = load_model(model)
    m, tok, d = loaded.model, loaded.tokenizer, dirs.load(args.directions)
    pools = unseen_harmless(model)
    base = {k: first_token_logprobs(m, tok, v) for k, v in pools.items()}
    centre = d.suggested_layer / max(1, d.num_layers - 1)
    edits = WeightEdits(m, EditConfig())

    def kls(values: dict) -> list[float]:
        edit, spec = to_edit(values, EditConfig(), centre)
        direction, _, edit = stages.chosen_direction(d, spec, edit)  # kernels placed: `applied` keeps them
        with edits.applied(direction, d.suggested_layer, edit):
            return [x for k in pools for x in kl_per_prompt(base[k], first_token_logprobs(m, tok, pools[k])).tolist()]

    plain = kls(finalists[0]["params"])
    rows = {}
    sizes = ", ".join(f"{k} {len(v)}" for k, v in pools.items())
    print(f"{sum(len(v) for v in pools.values())} unseen harmless prompts ({sizes})")
    print("| trial | refusal seen | likelihood | KL seen vs plain (z) | KL unseen vs plain (z) |")
    for number, t in finalists.items():
        if number == 0:
            continue
        seen = paired(list(finalists[0]["kl_prompts"]), list(t["kl_prompts"]))
        unseen = paired(plain, kls(t["params"]))
        rows[number] = {"refusal": t["refusal"], "likelihood": t["likelihood"], "seen": seen, "unseen": unseen}
        print(f"| {number} | {t['refusal']:.1%} | {t['likelihood']:.4f} | {seen['change']:+.1%} ({seen['z']:.2f}) | "
              f"{unseen['change']:+.1%} ({unseen['z']:.2f}) |", flush=True)
    gains = [(r["seen"]["change"], r["unseen"]["change"]) for r in rows.values() if r["seen"]["change"] < 0]
    print(f"SUMMARY kl holdout ({args.model}): {len(gains)} finalists with lower KL than the plain edit on the prompts "
          f"seen; their change there {', '.join(f'{s:+.1%}' for s, _ in gains)} was "
          f"{', '.join(f'{u:+.1%}' for _, u in gains)} on {len(plain)} unseen harmless prompts")
    out = {"model": args.model, "prompts": {k: len(v) for k, v in pools.items()},
           "plain_unseen_kl": sum(plain) / len(plain), "finalists": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_kl_holdout-{args.model}.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
