"""Directions fitted to the plain edit (`pipeline.edit.direction_fit`), judged by generated refusals.

The chain's directions are fitted on the chain's measurement prompts (as `--auto --fit-steps STEPS` does), then
the plain default edit with the measured span and with the fitted span, each at the plain edit's weights times
every FACTOR, is evaluated on prompts the fit never saw: the search's trial and confirm parts (16 + 16 harmful,
16 + 16 harmless on the seed-0 draw) and 64 harmful prompts of the same sets that no measurement took, with the
78 harmless prompts of the search's confirm pool. Refusals are counted in generated replies (the evaluation's
classifier), never by likelihood, since a fit can game a likelihood; KL is first-token KL against the base,
paired per prompt with the plain edit's.

    .venv/bin/python bench/bench_direction_fit.py [--model qwen] [--directions bench/results/real-out]
        [--seed N] [--steps 40] [--weight 4] [--factors 1,1.2]

Prints a line per edit and a SUMMARY line; writes bench/results/bench_direction_fit[-MODEL][-seedN].json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_kl_holdout import RESULTS, paired  # noqa: E402

PARTS = ("trial", "confirm", "unseen")


def workbench(loaded: Any, d: Any, model: str, seed: int, extra: int) -> Any:
    """The search's trial and confirm parts, and an `unseen` part: ``extra`` harmful prompts outside every
    measurement and evaluation, with the harmless pool `wider_prompts` keeps unmeasured."""
    from pipeline.edit import stages
    from pipeline.edit.search_workbench import Workbench, measured_parts, split_parts, wider_prompts
    from pipeline.evaluation.evaluate import EvalConfig

    pc = stages.PromptsConfig(seed=seed)
    chain = stages.resolve_prompts(model, pc)
    more, pool = wider_prompts(model, pc, chain, 256)
    taken = set(chain.harmful.measure) | set(chain.harmful.evaluate)
    rest = [p for p in more.harmful.measure if p not in taken]
    random.Random(1).shuffle(rest)
    groups = {p: part.source for part in more.harmful_sets for p in part.measure}
    split = split_parts(chain.harmful.evaluate, chain.harmless.evaluate, chain.eval_groups(), 0.5)
    unseen = tuple(rest[:extra])
    parts = {"trial": split["trial"], "confirm": split["confirm"],
             "unseen": (unseen, tuple(pool), tuple(groups.get(p, "") for p in unseen))}
    return Workbench(loaded, d, measured_parts(loaded, parts, EvalConfig(), model), EvalConfig()), chain


def judged(bench: Any, params: dict) -> dict[str, Any]:
    """Refusals per part (generated), and first-token KL per harmless prompt of every part."""
    from pipeline.edit.abliterate import EditConfig

    out: dict[str, Any] = {}
    for part in PARTS:
        r, _ = bench.run(*bench.edit_of(params, EditConfig()), part=part)
        out[part] = {"refused": r["refusals"]["model"]["total"], "n": r["num_prompts"]["harmful"],
                     "on_topic": r["on_topic_rate"]["model"]}
    with bench.applied(*bench.edit_of(params, EditConfig())):
        out["kls"] = list(bench.kls()) + kls_on(bench, bench.parts["unseen"].harmless, bench.parts["unseen"].ref)
    out["refused"] = sum(out[p]["refused"] for p in PARTS)
    return out


def kls_on(bench: Any, harmless: tuple[str, ...], ref: Any) -> list[float]:
    from pipeline.evaluation.evaluate import first_token_logprobs, kl_per_prompt

    logprobs = first_token_logprobs(bench.model, bench.tokenizer, harmless, bench.eval_cfg.batch_size,
                                    bench.eval_cfg.prefill_think)
    return [round(float(x), 7) for x in kl_per_prompt(ref.logprobs, logprobs)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen", help="a real model key of tests/real_models.py")
    parser.add_argument("--directions", type=Path, default=RESULTS / "real-out", help="the chain's directions")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt draw (as bench_real.py --seed)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--weight", type=float, default=4.0, help="fit_directions' weight (--fit-weight)")
    parser.add_argument("--factors", default="1,1.2", help="the plain edit's weights times each, comma-separated")
    parser.add_argument("--extra", type=int, default=64, help="harmful prompts of the unseen part")
    args = parser.parse_args(argv)

    from pipeline.edit import directions as dirs
    from pipeline.edit import stages
    from pipeline.edit.abliterate import EditConfig
    from pipeline.edit.direction_fit import fit_directions
    from pipeline.edit.search import SearchConfig
    from pipeline.edit.search_space import from_edit, scaled
    from pipeline.io.loading import load_model
    from tests.real_models import fetch

    began = time.perf_counter()
    model = str(fetch(args.model))
    loaded = load_model(model)
    d = dirs.load(args.directions)
    bench, chain = workbench(loaded, d, model, args.seed, args.extra)
    fit_began = time.perf_counter()
    fitted = fit_directions(loaded, d, EditConfig(), chain.harmful.measure, chain.harmless.measure, args.steps,
                            SearchConfig().fit_learning_rate, weight=args.weight, say=print)
    fit_seconds = time.perf_counter() - fit_began
    bench.sources["wide"] = fitted
    plain = from_edit(stages.default_edit(d, "best", EditConfig()), d, SearchConfig(wide_prompts=256))
    rows: dict[str, Any] = {"plain": judged(bench, plain)}
    base = rows["plain"]
    n = sum(base[p]["n"] for p in PARTS)
    seen = len(bench.parts["trial"].harmless) + len(bench.parts["confirm"].harmless)
    print(f"plain edit: refused {base['refused']} of {n}", flush=True)
    for factor in [float(x) for x in args.factors.split(",")]:
        row = judged(bench, scaled(plain | {"source": "wide"}, factor))
        row |= {"kl_seen": paired(base["kls"][:seen], row["kls"][:seen]),
                "kl_unseen": paired(base["kls"][seen:], row["kls"][seen:])}
        rows[f"fitted x{factor:g}"] = row
        print(f"fitted x{factor:g}: refused {row['refused']} of {n} (plain {base['refused']}); KL on {seen} seen "
              f"{row['kl_seen']['change']:+.1%} (z {row['kl_seen']['z']:.2f}), on {len(row['kls']) - seen} unseen "
              f"{row['kl_unseen']['change']:+.1%} (z {row['kl_unseen']['z']:.2f})", flush=True)
    wins = [k for k, r in rows.items() if k != "plain" and r["refused"] <= base["refused"]
            and r["kl_unseen"]["z"] > 1.645 and r["kl_seen"]["z"] > 0]
    print(f"SUMMARY direction fit ({args.model}, seed {args.seed}, {args.steps} steps, weight {args.weight:g}, "
          f"{fit_seconds:.0f} s): {len(wins)} of {len(rows) - 1} fitted edits refuse no more than the plain edit at a "
          f"clearly lower unseen KL{': ' + ', '.join(wins) if wins else ''}; {time.perf_counter() - began:.0f} s")
    out = {"model": args.model, "seed": args.seed, "steps": args.steps, "weight": args.weight,
           "fit": fitted.info.get("fit"), "fit_seconds": fit_seconds, "seen": seen, "edits": rows}
    RESULTS.mkdir(exist_ok=True)
    suffix = f"-seed{args.seed}" if args.seed else ""
    (RESULTS / f"bench_direction_fit-{args.model}{suffix}.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
