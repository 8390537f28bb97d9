"""Automatic search on the demo model: cost of one trial, and time to reach the refusal/KL target.

(a) One search trial (Optuna ask -> edit in place -> evaluate -> restore -> tell into the journal)
    against one evaluation of the same edit on the same prompts with the same settings (goal: trial
    <= 1.1x evaluation). The headline pairs each trial with the evaluation inside it (same time window,
    so a shared machine slows both alike); a separate evaluation after each trial checks that it is the
    same work (same scores, similar time). For scale: what reloading the model would cost.
(b) Wall time of `search()` until the first trial with refusal <= 10% and KL <= 0.1 on the held-out
    evaluation prompts, counted from the call (load, directions, base reference included), for a
    study that starts from the plain edit (the default) and for one that starts from random trials.

    .venv/bin/python bench/bench_search.py [--rounds 5] [--trials 12] [--max-new-tokens 64] [--directions DIR]

Prints the numbers and a SUMMARY line; writes bench/results/bench_search.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results" / "bench_search.json"
TARGET_REFUSAL, TARGET_KL = 0.10, 0.10


def trial_cost(loaded, d, prompts, eval_cfg, rounds: int, work: Path) -> dict:
    """Seconds of one search trial, of the evaluation inside it, and of a separate evaluation of the same edit."""
    from pipeline import search as se
    from pipeline.abliterate import EditConfig, apply_in_memory
    from pipeline.evaluate import evaluate, reference
    from pipeline.loading import load_model

    harmful, harmless = tuple(prompts.harmful.evaluate), tuple(prompts.harmless.evaluate)
    ref = reference(loaded.model, loaded.tokenizer, harmful, harmless, eval_cfg, model_id="demo")
    bench = se.Workbench(loaded, d, harmful, harmless, eval_cfg, ref)
    cfg = se.SearchConfig(trials=1)
    params = se.from_edit(EditConfig(), d, cfg)
    edit, spec = se.to_edit(params, EditConfig())
    direction, _ = se.stages.chosen_direction(d, spec, edit)
    trial_s, inner_s, eval_s, scores = [], [], [], set()
    with se.quiet_optuna():
        study = se.open_study(work / "cost.study.journal", cfg)
        for _ in range(rounds):
            study.enqueue_trial(params)  # the same edit every round
            start = time.perf_counter()
            (done,) = se.run_trials(study, bench, cfg, EditConfig(), progress=None)
            trial_s.append(time.perf_counter() - start)
            inner_s.append(bench.eval_seconds)  # the evaluation inside that trial: same time window
            with bench.restoring():
                apply_in_memory(loaded.model, direction, edit, bench.num_layers, bench.model_type)
                start = time.perf_counter()
                res = evaluate(loaded.model, loaded.tokenizer, harmful, harmless, bench.trial_cfg, base=ref,
                               markers=bench.markers)
                eval_s.append(time.perf_counter() - start)
            scores.add((done.refusal, round(done.kl, 9), res["refusal_rate"]["model"], round(res["kl_divergence"], 9)))
    start = time.perf_counter()
    for _ in range(5):
        with bench.restoring():
            apply_in_memory(loaded.model, direction, edit, bench.num_layers, bench.model_type)
    edit_restore = (time.perf_counter() - start) / 5
    start = time.perf_counter()
    load_model("demo")
    reload_s = time.perf_counter() - start
    paired = statistics.median(t / i for t, i in zip(trial_s, inner_s, strict=True))
    return {"trial_s": trial_s, "eval_inside_trial_s": inner_s, "eval_s": eval_s, "ratio": paired,
            "ratio_vs_separate_eval_median": statistics.median(trial_s) / statistics.median(eval_s),
            "ratio_vs_separate_eval_best": min(trial_s) / min(eval_s), "trial_median_s": statistics.median(trial_s),
            "eval_median_s": statistics.median(eval_s), "edit_and_restore_s": edit_restore, "reload_s": reload_s,
            "same_scores": len(scores) == 1, "scores": sorted(scores)[0]}


def time_to_target(directions: Path | None, eval_cfg, trials: int, from_default: bool, seed: int, work: Path) -> dict:
    """Run `search()` from scratch; seconds from the call to the first trial that meets the target."""
    from pipeline.run import AbliterateJob
    from pipeline.search import SearchConfig, search

    name = "default-start" if from_default else f"random-start-seed{seed}"
    start, hits, lines = time.perf_counter(), [], []

    def progress(line: str) -> None:
        now = time.perf_counter() - start
        lines.append(f"[{now:6.1f}s] {line}")
        found = re.match(r"trial (\d+) \[(\d+)/\d+\]: refusal ([\d.]+)%, KL ([\d.]+)", line)
        if found and float(found[3]) / 100 <= TARGET_REFUSAL and float(found[4]) <= TARGET_KL:
            hits.append((now, int(found[1]), int(found[2])))
        print(lines[-1].splitlines()[0][:150], flush=True)

    job = AbliterateJob(model="demo", out=work / name, directions_file=directions, eval=eval_cfg)
    summary = search(job, SearchConfig(trials=trials, study=work / f"{name}.journal", search_seed=seed,
                                       start_from_default=from_default), progress)
    total = time.perf_counter() - start
    inner = _trial_overhead(work / f"{name}.journal")
    setup = next(float(re.match(r"\[\s*([\d.]+)s\]", x)[1]) for x in lines if "] search: " in x)
    result = summary["eval"]
    return {"start": name, "trials": trials, "seconds_to_target": hits[0][0] if hits else None,
            "trials_to_target": hits[0][2] if hits else None, "setup_s": setup, "total_s": total,
            "chosen_refusal": result["refusal_rate"]["model"], "chosen_kl": result["kl_divergence"],
            "chosen_trial": summary["search"]["chosen_trial"], **inner}


def _trial_overhead(journal: Path) -> dict:
    """Within each trial of a real search: (ask + suggest + edit + evaluate + restore) / evaluate alone."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from pipeline.search import STUDY_NAME

    study = optuna.load_study(study_name=STUDY_NAME, storage=JournalStorage(JournalFileBackend(str(journal))))
    res = [t.user_attrs["result"] for t in study.trials if "result" in t.user_attrs]
    total, evals = sum(r["seconds"] for r in res), sum(r["eval_seconds"] for r in res)
    return {"trial_seconds": total, "eval_seconds": evals, "trial_over_eval": total / evals}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="trial/evaluation pairs for (a)")
    parser.add_argument("--trials", type=int, default=12, help="search budget for (b)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--random-seeds", type=int, default=3, help="random-start searches (seeds 0..N-1) for (b)")
    parser.add_argument("--directions", type=Path, help="saved directions for (b); default: measured in each run")
    parser.add_argument("--skip-b", action="store_true", help="only measure the trial cost")
    args = parser.parse_args(argv)

    import torch

    from pipeline import directions as dirs
    from pipeline.evaluate import EvalConfig
    from pipeline.loading import load_model
    from pipeline.stages import PromptsConfig, measure_directions, resolve_prompts

    eval_cfg = EvalConfig(max_new_tokens=args.max_new_tokens)
    print(f"demo model, torch threads {torch.get_num_threads()}, max_new_tokens {args.max_new_tokens}")
    with tempfile.TemporaryDirectory(prefix="bench_search-") as tmp:
        work = Path(tmp)
        loaded, prompts = load_model("demo"), resolve_prompts("demo", PromptsConfig())
        d = dirs.load(args.directions) if args.directions else measure_directions(
            loaded, prompts, dirs.DirectionsConfig())
        cost = trial_cost(loaded, d, prompts, eval_cfg, args.rounds, work)
        print(f"(a) one trial / the evaluation inside it: {cost['ratio']:.3f}x (median of {args.rounds} rounds); "
              f"trial {cost['trial_median_s']:.2f} s vs a separate evaluation {cost['eval_median_s']:.2f} s (medians"
              f" {cost['ratio_vs_separate_eval_median']:.3f}x, best {cost['ratio_vs_separate_eval_best']:.3f}x); "
              f"edit+restore {cost['edit_and_restore_s'] * 1000:.0f} ms; a reload would add {cost['reload_s']:.2f} s; "
              f"identical scores: {cost['same_scores']}")
        starts = [(True, 0)] + [(False, seed) for seed in range(args.random_seeds)]
        runs = [] if args.skip_b else [time_to_target(args.directions, eval_cfg, args.trials, default, seed, work)
                                       for default, seed in starts]
    for run in runs:
        reached = (f"{run['seconds_to_target']:.1f} s (trial {run['trials_to_target']}/{run['trials']})"
                   if run["seconds_to_target"] is not None else f"not within {run['trials']} trials")
        print(f"(b) {run['start']}: target reached after {reached}; setup {run['setup_s']:.1f} s, "
              f"total {run['total_s']:.1f} s; chosen trial {run['chosen_trial']}: refusal "
              f"{run['chosen_refusal']:.1%}, KL {run['chosen_kl']:.4f}; within its trials, trial time / "
              f"evaluation time = {run['trial_over_eval']:.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
                                   "trial_cost": cost, "time_to_target": runs}, indent=2) + "\n")
    verdict = "meets" if cost["ratio"] <= 1.1 else "misses"
    inner = (f", {sum(r['trial_seconds'] for r in runs) / sum(r['eval_seconds'] for r in runs):.3f}x inside "
             f"{sum(r['trials'] for r in runs)} search trials" if runs else "")
    print(f"SUMMARY search: one trial = {cost['ratio']:.3f}x one evaluation ({verdict} the <= 1.1x goal{inner}); "
          f"time to refusal <= 10% & KL <= 0.1: {_reach(runs)}")
    return 0


def _reach(runs: list[dict]) -> str:
    if not runs:
        return "not measured"
    parts = []
    for label, group in (("default start", runs[:1]), ("random start", runs[1:])):
        hit = [r["seconds_to_target"] for r in group if r["seconds_to_target"] is not None]
        trials = [r["trials_to_target"] for r in group if r["seconds_to_target"] is not None]
        if group:
            parts.append(f"{label} {len(hit)}/{len(group)} runs" + (
                f", median {statistics.median(hit):.0f} s (trial {statistics.median(trials):g})" if hit else ""))
    return "; ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
