"""Is there a refusal direction that costs less KL than the chain's at the plain edit's strength?

The plain default edit with the chain's directions (`--directions`, 64 harmful / 64 harmless prompts) against the
same edit (same layer, same kernels, weights scaled until its refusal likelihood matches) with another direction:

- `wide-set`: one direction per harmful set, measured from every bundled prompt outside the evaluation prompts
  (the prompts `--wide-prompts 256` gives the search), each set's refusals contrasted with its answers;
- `whiten:LAMBDA:u|c`: the chain's directions times the inverse of the harmless prompts' second moment (`u`) or
  covariance (`c`) at each layer, plus LAMBDA times its mean eigenvalue: directions along which harmless
  activations vary little, so removing them should disturb harmless prompts less;
- `draw:SEED`: the chain's measurement (per set, 64/64) from another random draw of those prompts;
- `load:DIR`: saved directions, e.g. those of `bench_real.py --seed N` (`bench/results/real-out-seedN`);
- `fit:STEPS`: the chain's directions fitted to the plain edit (`pipeline.edit.direction_fit`, as
  `--auto --fit-steps STEPS` does) on the chain's measurement prompts.

Every variant is evaluated at the chain's layer. KL is paired per prompt on the 32 harmless prompts the search sees
and on the harmless prompts that neither a measurement nor the evaluation used (the search's confirm pool). The
test part is not used.

    .venv/bin/python bench/bench_direction_variants.py [--model qwen] [--directions bench/results/real-out]
        [--seed N] [VARIANT ...]   (default: wide-set whiten:10:u whiten:3:u whiten:1:c draw:1 draw:2 draw:3)

Prints a line per variant and a SUMMARY line; writes bench/results/bench_direction_variants[-MODEL][-seedN].json.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_kl_holdout import RESULTS, paired  # noqa: E402

VARIANTS = ("wide-set", "whiten:10:u", "whiten:3:u", "whiten:1:c", "draw:1", "draw:2", "draw:3")


def whitened(d: Any, acts: Any, lam: float, centred: bool) -> Any:
    """``d`` with every direction (pooled and per set) multiplied by (M + lam * mean eigenvalue * I)^-1, where M
    is the second moment (or covariance) of the harmless activations ``acts`` [prompts, layers, hidden]."""
    import torch

    from pipeline.edit import directions as dirs

    w = copy.copy(d)
    sets, pooled = d.set_directions.clone(), d.directions.clone()
    for layer in range(d.num_layers):
        x = acts[:, layer].double()
        x = x - x.mean(0) if centred else x
        m = x.T @ x / len(x)
        m = m + lam * (m.trace() / m.shape[0]) * torch.eye(m.shape[0], dtype=m.dtype)
        for k in range(len(sets)):
            sets[k, layer] = dirs.unit(torch.linalg.solve(m, sets[k, layer].double())).float()
        pooled[layer] = dirs.unit(torch.linalg.solve(m, pooled[layer].double())).float()
    w.set_directions, w.directions = sets, pooled
    w.projected = dirs.project_out_harmless(pooled, d.harmless_mean)
    return w


def variant_directions(name: str, loaded: Any, d: Any, more: Any, acts: Any, chain: Any) -> Any:
    """The directions of one VARIANT (see the module doc), at the chain's layer."""
    from pipeline.edit import directions as dirs
    from pipeline.edit import stages
    from pipeline.edit.abliterate import EditConfig

    kind, *args = name.split(":")
    if kind == "wide-set":
        x = stages.measure_directions(loaded, more, dirs.DirectionsConfig(), EditConfig())
    elif kind == "whiten":
        x = whitened(d, acts, float(args[0]), args[1] == "c")
    elif kind == "draw":
        rng = random.Random(int(args[0]))
        groups = {p: part.source for part in more.harmful_sets for p in part.measure}
        harmful = rng.sample(list(more.harmful.measure), 64)
        harmless = rng.sample(list(more.harmless.measure), 64)
        x = dirs.measure(loaded.model, loaded.tokenizer, harmful, harmless, dirs.DirectionsConfig(), EditConfig(),
                         None, groups)
    elif kind == "load":
        x = dirs.load(Path(name.partition(":")[2]))
    elif kind == "fit":
        from pipeline.edit.direction_fit import fit_directions
        from pipeline.edit.search import SearchConfig

        x = fit_directions(loaded, d, EditConfig(), chain.harmful.measure, chain.harmless.measure, int(args[0]),
                           SearchConfig().fit_learning_rate, say=print)
    else:
        raise SystemExit(f"unknown variant '{name}': use wide-set, whiten:LAMBDA:u|c, draw:SEED, load:DIR or fit:STEPS")
    x.info = {**x.info, "own_layer": x.suggested_layer}
    x.suggested_layer = d.suggested_layer
    return x


def workbench(loaded: Any, d: Any, model: str, pool: tuple[str, ...], prompts: Any) -> Any:
    """The search's trial and confirm parts (the confirm part's harmless prompts plus ``pool``) on ``loaded``."""
    from pipeline.edit.search_workbench import Workbench, measured_parts, split_parts
    from pipeline.evaluation.evaluate import EvalConfig

    split = split_parts(prompts.harmful.evaluate, prompts.harmless.evaluate, prompts.eval_groups(), 0.5)
    harmful, harmless, groups = split["confirm"]
    seen = {"trial": split["trial"], "confirm": (harmful, harmless + pool, groups)}
    return Workbench(loaded, d, measured_parts(loaded, seen, EvalConfig(), model), EvalConfig())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen", help="a real model key of tests/real_models.py")
    parser.add_argument("--directions", type=Path, default=RESULTS / "real-out", help="the chain's directions")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt draw (as bench_real.py --seed)")
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), help="see the module doc")
    args = parser.parse_args(argv)

    from pipeline.edit import directions as dirs
    from pipeline.edit import stages
    from pipeline.edit.abliterate import EditConfig
    from pipeline.edit.activations import collect
    from pipeline.edit.search import SearchConfig
    from pipeline.edit.search_refine import match_strength
    from pipeline.edit.search_space import from_edit, scaled
    from pipeline.edit.search_workbench import wider_prompts
    from pipeline.io.loading import load_model
    from tests.real_models import fetch

    began = time.perf_counter()
    model = str(fetch(args.model))
    loaded = load_model(model)
    d = dirs.load(args.directions)
    pc = stages.PromptsConfig(seed=args.seed)
    chain = stages.resolve_prompts(model, pc)
    more, pool = wider_prompts(model, pc, chain, 256)
    acts = None
    if any(v.startswith("whiten") for v in args.variants):
        acts = collect(loaded.model, loaded.tokenizer, list(more.harmless.measure), keep_samples=True).samples
    bench = workbench(loaded, d, model, pool, chain)
    seen = len(bench.parts["trial"].harmless) + len(bench.parts["confirm"].harmless) - len(pool)
    plain = from_edit(stages.default_edit(d, "best", EditConfig()), d, SearchConfig(wide_prompts=256))

    def kls(params: dict) -> list[float]:
        with bench.applied(*bench.edit_of(params, EditConfig())):
            return list(bench.kls())

    target, _ = bench.probe(*bench.edit_of(plain, EditConfig()))
    ref = kls(plain)
    print(f"plain edit: refusal likelihood {target:.4f}; KL on {seen} seen + {len(pool)} unseen harmless prompts",
          flush=True)
    rows: dict[str, Any] = {}
    for name in args.variants:
        x = variant_directions(name, loaded, d, more, acts, chain)
        layer = d.suggested_layer
        cos = [round(float(x.set_directions[k, layer] @ d.set_directions[k, layer]), 3)
               for k in range(len(d.set_directions))]
        bench.sources["wide"] = x
        params = plain | {"source": "wide"}
        matched = match_strength(bench, params, EditConfig(), target, 0.002, steps=8)
        row: dict[str, Any] = {"own_layer": x.info["own_layer"], "cos": cos}
        if matched is None:
            print(f"{name}: cos {cos}: cannot reach the plain edit's strength within the search space", flush=True)
        else:
            k = kls(scaled(params, matched.factor))
            row |= {"factor": matched.factor, "seen": paired(ref[:seen], k[:seen]),
                    "unseen": paired(ref[seen:], k[seen:])}
            print(f"{name}: own layer {row['own_layer']}, cos {cos}, weights x{matched.factor:.3f}: KL seen "
                  f"{row['seen']['change']:+.1%} (z {row['seen']['z']:.2f}), unseen {row['unseen']['change']:+.1%} "
                  f"(z {row['unseen']['z']:.2f})", flush=True)
        rows[name] = row
    better = [n for n, r in rows.items() if "unseen" in r and r["unseen"]["z"] > 1.645 and r["seen"]["z"] > 0]
    print(f"SUMMARY direction variants ({args.model}): {len(better)} of {len(rows)} variants clearly cheaper than the "
          f"chain's direction at equal strength{': ' + ', '.join(better) if better else ''}; "
          f"{time.perf_counter() - began:.0f} s")
    out = {"model": args.model, "seed": args.seed, "seen": seen, "unseen": len(pool), "likelihood": target,
           "variants": rows}
    RESULTS.mkdir(exist_ok=True)
    suffix = f"-seed{args.seed}" if args.seed else ""
    (RESULTS / f"bench_direction_variants-{args.model}{suffix}.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
