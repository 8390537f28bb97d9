"""Automatic search: does it beat the plain edit on prompts it never saw, at what cost per trial, and is its
space better than a simpler one?

(a) `search()` with TRIALS trials on MODEL (demo, or a real model of tests/real_models.py): the chosen edit
    and the plain default edit (trial 0), both evaluated on the test part of the evaluation prompts that no
    trial saw. Goal: lower KL than the plain edit at equal or lower refusal.
(b) Cost of a trial: within every trial of (a), seconds of the whole trial (Optuna ask, suggest, edit in
    place, evaluate, restore, tell into the journal) over seconds of the evaluation inside it (same time
    window, so a shared machine slows both alike). Goal: <= 1.1x.
(c) With --compare: the same number of trials over a simpler space in the manner of Heretic's (one direction
    interpolated over 0.4-0.9 of the depth, a tent kernel per component, standard method, random start-up),
    and the area each Pareto front dominates (hypervolume of refusal x KL on the trial part, up to the base's
    refusal rate and the largest KL either study saw): larger is better.

    .venv/bin/python bench/bench_search.py [--model demo|qwen] [--trials 40] [--compare] [--directions DIR]
        [--seed N] [--fit-steps N] [--confirm-prompts N] [--compare-with RESULT.json]

--seed N (not 0) draws other measurement and evaluation prompts from the same sets (as `bench_real.py --seed N`,
whose directions `--directions bench/results/real-out-seedN` gives): the plain edit is then the default chain's on
a draw it was not tuned on.

--compare-with RESULT.json runs (c) alone against the search saved in that result file (its (a) and (b) are
repeated from it), so a slow model's search need not run again.

Prints the numbers and a SUMMARY line; writes
bench/results/bench_search[-MODEL][-seedN][-fitN][-confirmN][-vs-simple].json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def simple_space(trial: Any, cfg: Any, base: Any) -> dict[str, Any]:
    """The comparison space: one interpolated direction over 0.4-0.9 of the depth, a tent kernel per
    component (peak weight, its position, the floor as a share of the peak, the reach)."""
    trial.suggest_float("layer", 0.4, 0.9)
    for comp in ("attn", "mlp"):
        trial.suggest_categorical(f"{comp}.kind", ["tent"])
        trial.suggest_float(f"{comp}.max_weight", 0.8, 1.5)
        trial.suggest_float(f"{comp}.position", 0.4, 1.0)
        trial.suggest_float(f"{comp}.min_weight", 0.0, 1.0)
        trial.suggest_float(f"{comp}.distance", 0.1, 0.6)
    return dict(trial.params)


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both objectives minimised) inside the box up to ``ref``."""
    area, best_kl = 0.0, ref[1]
    inside = sorted((r, k) for r, k in points if r < ref[0] and k < ref[1])
    for i, (r, k) in enumerate(inside):
        best_kl = min(best_kl, k)
        right = inside[i + 1][0] if i + 1 < len(inside) else ref[0]
        area += (right - r) * (ref[1] - best_kl)
    return area


def trial_overhead(journal: Path) -> dict:
    """Within each trial: (ask + suggest + edit + evaluate + restore + tell) / evaluate alone."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from pipeline.edit.search import STUDY_NAME

    study = optuna.load_study(study_name=STUDY_NAME, storage=JournalStorage(JournalFileBackend(str(journal))))
    res = [t.user_attrs["result"] for t in study.trials if "result" in t.user_attrs]
    total, evals = sum(r["seconds"] for r in res), sum(r["eval_seconds"] for r in res)
    return {"trial_seconds": round(total, 1), "eval_seconds": round(evals, 1), "trial_over_eval": total / evals}


def run_search(model: str, loaded: Any, d: Any, trials: int, work: Path, name: str, space: Any = None,
               from_default: bool = True, seed: int = 0, fit_steps: int = 0, confirm_prompts: int = 0) -> dict:
    from pipeline.edit import search as se
    from pipeline.edit.search_space import suggest
    from pipeline.edit.stages import PromptsConfig
    from pipeline.orchestrator.run import AbliterateJob

    start = time.perf_counter()

    def progress(line: str) -> None:
        print(f"[{name} {time.perf_counter() - start:7.1f}s] {line.splitlines()[0][:170]}", flush=True)

    job = AbliterateJob(model=model, out=work / name, prompts=PromptsConfig(seed=seed))
    cfg = se.SearchConfig(trials=trials, study=work / f"{name}.journal", start_from_default=from_default,
                          neighbours=from_default, fit_steps=fit_steps, confirm_prompts=confirm_prompts)
    summary = se.search(job, cfg, progress, loaded, d, space or suggest)["search"]
    return {"seconds": round(time.perf_counter() - start, 1), "summary": summary,
            **trial_overhead(work / f"{name}.journal")}


def main(argv: list[str] | None = None) -> int:
    from pipeline.edit.search import SearchConfig

    fields = SearchConfig.model_fields
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, or a real model key of tests/real_models.py")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--compare", action="store_true", help="(c): also search the simpler space")
    parser.add_argument("--directions", type=Path, help="saved directions (default: measured here)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the measurement/evaluation split")
    parser.add_argument("--fit-steps", type=int, default=fields["fit_steps"].default,
                        help="SearchConfig.fit_steps of the search (a); default: the search's default")
    parser.add_argument("--confirm-prompts", type=int, default=fields["confirm_prompts"].default,
                        help="SearchConfig.confirm_prompts of the search (a); default: the search's default")
    parser.add_argument("--compare-with", type=Path, help="(c) alone: search only the simpler space and compare its "
                        "front with the search saved in this result file (same --model, --seed, --trials)")
    args = parser.parse_args(argv)
    saved = json.loads(args.compare_with.read_text()) if args.compare_with else None
    if saved is not None:
        wanted = (args.model, args.seed, args.trials, str(args.directions or "measured"))
        if (saved["model"], saved["seed"], saved["trials"], saved.get("directions", wanted[3])) != wanted:
            raise SystemExit(f"{args.compare_with} is a search of {saved['model']}, seed {saved['seed']}, "
                             f"{saved['trials']} trials, directions {saved.get('directions', '?')}: give the same "
                             "--model, --seed, --trials and --directions")
        args.compare, args.fit_steps, args.confirm_prompts = True, saved["fit_steps"], saved["confirm_prompts"]

    import torch

    from pipeline.edit import directions as dirs
    from pipeline.edit.stages import PromptsConfig, measure_directions, resolve_prompts
    from pipeline.io.loading import load_model

    model = args.model
    if model != "demo":
        from tests.real_models import fetch

        model = str(fetch(args.model))
    print(f"{args.model}: torch threads {torch.get_num_threads()}, {args.trials} trials", flush=True)
    began = time.perf_counter()
    loaded = load_model(model)
    d = dirs.load(args.directions) if args.directions else measure_directions(
        loaded, resolve_prompts(model, PromptsConfig(seed=args.seed)), dirs.DirectionsConfig())
    setup = time.perf_counter() - began
    with tempfile.TemporaryDirectory(prefix="bench_search-") as tmp:
        ours = saved["ours"] if saved is not None else run_search(
            model, loaded, d, args.trials, Path(tmp), "ours", seed=args.seed, fit_steps=args.fit_steps,
            confirm_prompts=args.confirm_prompts)
        simple = (run_search(model, loaded, d, args.trials, Path(tmp), "simple", simple_space, False, args.seed)
                  if args.compare else None)
    s = ours["summary"]
    chosen, plain = s["chosen_on_test"], s["plain_edit_on_test"]
    beats = chosen["refusal"] <= plain["refusal"] and chosen["kl"] < plain["kl"]
    same = s["chosen_trial"] == 0
    measured = s.get("directions", {})
    froms = [f"{k} from {v['harmful']}/{v['harmless']} prompts" for k, v in measured.items() if k != "chosen"]
    print(f"directions: {', '.join(froms)}; the chosen trial removes the {measured.get('chosen')} ones")
    refined = {int(k): v for k, v in s.get("refined", {}).items()}
    if refined:
        print(f"refined trials (the plain edit at its strength, moved): {refined}")
    print(f"(a) on the test part ({s['prompts']['test']['harmful']} harmful prompts, unseen by the search): chosen "
          f"trial {s['chosen_trial']} refusal {chosen['refusal']:.1%} KL {chosen['kl']:.4f}; plain edit refusal "
          f"{plain['refusal']:.1%} KL {plain['kl']:.4f}")
    print(f"(b) trial / evaluation inside it: {ours['trial_over_eval']:.3f}x over {args.trials} trials; the whole "
          f"search {ours['seconds']:.0f} s")
    result = {"model": args.model, "seed": args.seed, "directions": str(args.directions or "measured"),
              "fit_steps": args.fit_steps,
              "confirm_prompts": args.confirm_prompts,
              "trials": args.trials, "threads": torch.get_num_threads(),
              "setup_s": round(setup, 1), "ours": ours, "chosen_beats_plain_on_test": beats}
    hv = ""
    if simple is not None:
        fronts = {k: [(t["refusal"], t["kl"]) for t in r["summary"]["pareto_front"]]
                  for k, r in (("ours", ours), ("simple", simple))}
        ref = (s["base_refusal_rate"], max(k for f in fronts.values() for _, k in f) * 1.01)
        areas = {k: hypervolume(f, ref) for k, f in fronts.items()}
        result |= {"simple": simple, "hypervolume": areas, "hypervolume_ref": ref}
        hv = f"; front area ours {areas['ours']:.5f} vs simple space {areas['simple']:.5f}"
        print(f"(c) Pareto front area (refusal x KL, up to {ref[0]:.2f} x {ref[1]:.4f}): ours {areas['ours']:.5f}, "
              f"simple space {areas['simple']:.5f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = ("" if args.model == "demo" else f"-{args.model}") + (f"-seed{args.seed}" if args.seed else "") + (
        f"-fit{args.fit_steps}" if args.fit_steps else "") + (
        f"-confirm{args.confirm_prompts}" if args.confirm_prompts else "") + ("-vs-simple" if saved else "")
    (RESULTS / f"bench_search{suffix}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    verdict = ("is the plain edit" if same else
               "beats the plain edit" if beats else "does NOT beat the plain edit")
    print(f"SUMMARY search ({args.model}, seed {args.seed}, {args.trials} trials): on unseen test prompts the choice "
          f"{verdict} "
          f"(refusal {chosen['refusal']:.1%} vs {plain['refusal']:.1%}, KL {chosen['kl']:.4f} vs {plain['kl']:.4f}); "
          f"one trial = {ours['trial_over_eval']:.3f}x one evaluation"
          f" ({'meets' if ours['trial_over_eval'] <= 1.1 else 'misses'} <= 1.1x){hv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
