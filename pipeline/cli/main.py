"""`python -m pipeline COMMAND ...`: flags generated from the stage configs.

Exit codes: 0 success, 2 bad input or usage, 3 authentication or permission,
4 Hub or network error, 1 anything unexpected (a bug: the traceback is shown).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.configs import add_config_args, config_from_args
from pipeline.errors import UserError


def _abliterate_parser(sub) -> None:
    from pipeline.edit.abliterate import EditConfig
    from pipeline.edit.directions import DirectionsConfig
    from pipeline.edit.stages import PromptsConfig
    from pipeline.io.loading import LoadConfig

    p = sub.add_parser("abliterate", help="Measure the refusal direction and remove it from the weights.")
    p.add_argument("model", help="Hub id, local folder, or 'demo'.")
    p.add_argument("--out", required=True, type=Path, help="Output folder (written atomically).")
    p.add_argument("--directions", type=Path, help="Use saved directions (a folder or .safetensors); skip measuring.")
    p.add_argument("--layer", default="best", help="Direction layer: an index, 'best', or a fraction like 0.6.")
    p.add_argument("--streaming", action="store_true", help="Edit the safetensors shards one at a time.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    p.add_argument("--no-eval", action="store_true", help="Skip the before/after evaluation.")
    p.add_argument("--auto", action="store_true", help="Search the edit parameters (Optuna) and save the chosen trial.")
    p.add_argument(
        "--heal", action="store_true",
        help="Then heal the abliterated model: a short LoRA distillation that matches the base's token "
        "distributions on harmless prompts and keeps its own on harmful ones, which lowers the KL divergence "
        "(abliterate-then-heal).",
    )
    from pipeline.edit.search import SearchConfig

    for cls in (LoadConfig, PromptsConfig, DirectionsConfig, EditConfig, SearchConfig):
        add_config_args(p, cls)
    _add_eval_args(p, prefix="eval-")
    p.set_defaults(func=cmd_abliterate)


def _directions_parser(sub) -> None:
    from pipeline.edit.directions import DirectionsConfig
    from pipeline.edit.stages import PromptsConfig
    from pipeline.io.loading import LoadConfig

    p = sub.add_parser("directions", help="Measure and save the refusal direction of every layer.")
    p.add_argument("model", help="Hub id, local folder, or 'demo'.")
    p.add_argument("--out", required=True, type=Path, help="Folder for directions.safetensors/.json/.png.")
    for cls in (LoadConfig, PromptsConfig, DirectionsConfig):
        add_config_args(p, cls)
    p.set_defaults(func=cmd_directions)


def _add_eval_args(p, prefix: str = "") -> None:
    try:
        from pipeline.evaluation.evaluate import EvalConfig
    except ImportError:  # evaluation not installed in this checkout
        return
    add_config_args(p, EvalConfig, prefix=prefix)


def _eval_config(args, prefix: str = ""):
    try:
        from pipeline.evaluation.evaluate import EvalConfig
    except ImportError:
        return None
    return config_from_args(EvalConfig, args, prefix=prefix)


def _evaluate_parser(sub) -> None:
    from pipeline.edit.stages import PromptsConfig
    from pipeline.io.loading import LoadConfig

    p = sub.add_parser("evaluate", help="Refusal rate, KL divergence and perplexity of a model (against a base).")
    p.add_argument("model", help="Hub id, local folder, or 'demo'.")
    p.add_argument("--base", help="Base model to compare with (KL, removal rate); default: the recipe's base, if any.")
    p.add_argument("--json", type=Path, help="Write eval_results.json here.")
    p.add_argument("--allow-no-refusals", action="store_true", help="Do not fail when the base refuses nothing.")
    from pipeline.evaluation.benchmarks import BenchmarkConfig

    for cls in (LoadConfig, PromptsConfig):
        add_config_args(p, cls)
    _add_eval_args(p)
    add_config_args(p, BenchmarkConfig)
    p.set_defaults(func=cmd_evaluate)


def _recipe_base(model: str) -> str | None:
    recipe = Path(model) / "recipe.json"
    return json.loads(recipe.read_text()).get("base_model") if recipe.is_file() else None


def cmd_evaluate(args) -> int:
    from pipeline.edit.stages import PromptsConfig, base_reference, evaluate_model, resolve_prompts
    from pipeline.evaluation import benchmarks as bm
    from pipeline.evaluation import evaluate as ev
    from pipeline.evaluation import report
    from pipeline.io.loading import LoadConfig, load_model

    load = config_from_args(LoadConfig, args)
    cfg = _eval_config(args)
    bench = config_from_args(bm.BenchmarkConfig, args)
    tasks = bm.task_manager(bench)  # unknown tasks fail before any model loads
    base_id = args.base or _recipe_base(args.model)
    prompts = resolve_prompts(base_id or args.model, config_from_args(PromptsConfig, args))
    reference, base_scores = None, {}
    if base_id:
        base = load_model(base_id, load)
        reference = base_reference(base.model, base.tokenizer, prompts, cfg, base_id)
        if not args.allow_no_refusals:
            ev.require_base_refusals(reference)
        base_scores = bm.run_benchmarks(base.model, base.tokenizer, bench, tasks)
        del base
    loaded = load_model(args.model, load)
    results = evaluate_model(loaded.model, loaded.tokenizer, prompts, cfg, reference, args.model, base_id)
    if tasks is not None:
        results["benchmarks"] = bm.compare(base_scores, bm.run_benchmarks(loaded.model, loaded.tokenizer, bench, tasks))
    print(report.markdown_table(results))
    if results["num_prompts"]["harmful"] < report.ROUGH_BELOW:
        print(f"note: only {results['num_prompts']['harmful']} harmful prompts: these rates are rough")
    if args.json:
        from pipeline.io.output import write_json

        write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


def cmd_directions(args) -> int:
    from pipeline.edit.directions import DirectionsConfig
    from pipeline.edit.stages import PromptsConfig
    from pipeline.io.loading import LoadConfig
    from pipeline.orchestrator.run import directions_only

    d = directions_only(
        args.model,
        args.out,
        config_from_args(LoadConfig, args),
        config_from_args(PromptsConfig, args),
        config_from_args(DirectionsConfig, args),
        progress=print,
    )
    best = d.stats[d.suggested_layer]
    print(f"suggested layer {d.suggested_layer} (separation {best.separation:.2f}, accuracy {best.accuracy:.2f})")
    print(f"saved to {args.out}")
    return 0


def cmd_abliterate(args) -> int:
    from pipeline.edit.abliterate import EditConfig
    from pipeline.edit.directions import DirectionsConfig
    from pipeline.edit.stages import PromptsConfig
    from pipeline.io.loading import LoadConfig
    from pipeline.orchestrator.run import AbliterateJob, abliterate

    job = AbliterateJob(
        model=args.model,
        out=args.out,
        layer=args.layer,
        directions_file=args.directions,
        streaming=args.streaming,
        overwrite=args.overwrite,
        evaluate=not args.no_eval,
        load=config_from_args(LoadConfig, args),
        prompts=config_from_args(PromptsConfig, args),
        measure=config_from_args(DirectionsConfig, args),
        edit=config_from_args(EditConfig, args),
        eval=_eval_config(args, prefix="eval-"),
    )
    if args.heal:
        return _abliterate_and_heal(job, args)
    if args.auto:
        from pipeline.edit.search import SearchConfig, search

        summary = search(job, config_from_args(SearchConfig, args), progress=print)
    else:
        if args.trials is not None or args.study is not None:
            raise UserError("--trials and --study belong to the automatic search: add --auto")
        summary = abliterate(job, progress=print)
    print_summary(summary)
    return 0


def _abliterate_and_heal(job, args) -> int:
    """Abliterate into OUT.abliterated (evaluated), then heal it into OUT (`pipeline.tuning.tune.heal`)."""
    from dataclasses import replace

    from pipeline.orchestrator.run import abliterate
    from pipeline.tuning.tune import HEAL, heal

    stage = job.out.with_name(job.out.name + ".abliterated")
    if not (stage / "recipe.json").exists():
        abliterate(replace(job, out=stage, overwrite=True), progress=print)  # evaluated: the card compares
    summary = heal(
        stage,
        job.model,
        job.out,
        HEAL,
        load=job.load,
        prompts_cfg=job.prompts,
        eval_cfg=job.eval,
        evaluate=job.evaluate,
        overwrite=job.overwrite,
        progress=print,
    )
    if summary:
        print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    selection = ((summary.get("recipe") or {}).get("measurement") or {}).get("selection") or {}
    if selection.get("weak"):
        print(f"WARNING: no candidate layer removed most refusals (the chosen one left "
              f"{selection['refusal_ablated']:.0%} of the selection prompts refused): try other --harmful prompts "
              "or --auto")
    results = summary.get("eval")
    if results:
        for line in eval_lines(results):
            print(line)
        found = summary.get("search") or {}
        plain, chosen = found.get("plain_edit_on_test"), found.get("chosen_on_test")
        if plain and chosen:
            def pct(x: float | None) -> str:
                return "n/a" if x is None else f"{x:.1%}"

            print(f"search: trial {found['chosen_trial']} of {found['trials']} chosen; on the test prompts no trial "
                  f"saw it refuses {pct(chosen['refusal'])} at KL {chosen['kl']:.4f}, the plain edit "
                  f"{pct(plain['refusal'])} at KL {plain['kl']:.4f}")
        for sample in results.get("samples", [])[:3]:
            print(json.dumps(sample, ensure_ascii=False))
    print(f"output: {summary['out']}")


def eval_lines(results: dict) -> list[str]:
    """The evaluation in a few lines: rates with their 95% intervals, on-topic answers, KL, perplexity."""
    from pipeline.evaluation.report import ROUGH_BELOW, with_interval

    def change(rate: dict | None, bounds: dict | None) -> str:
        rate, bounds = rate or {}, bounds or {}
        return " -> ".join(with_interval(rate.get(s), bounds.get(s)) for s in ("base", "model"))

    n = results["num_prompts"]["harmful"]
    lines = [f"refusal rate: {change(results['refusal_rate'], results.get('refusal_interval'))} ({n} prompts)"]
    for name, rates in (results.get("by_set") or {}).items():
        lines.append(f"  {name}: {change(rates, rates.get('interval'))} ({rates['n']} prompts)")
    if results.get("on_topic_rate"):
        lines.append(f"on-topic answers: {change(results['on_topic_rate'], results.get('on_topic_interval'))}")
    undetermined = results.get("undetermined") or {}
    if any(undetermined.values()):
        lines.append(f"undetermined (reasoning unfinished, not counted): {undetermined.get('base')} -> "
                     f"{undetermined.get('model')}")
    if n < ROUGH_BELOW:
        lines.append(f"note: only {n} harmful prompts: these rates are rough")
    if results.get("kl_divergence") is not None:
        lines.append(f"KL divergence (harmless, first answer token): {results['kl_divergence']:.4f}")
    ppl = results.get("perplexity") or {}
    if ppl.get("model") is not None:
        lines.append(f"perplexity: {ppl.get('base')} -> {ppl.get('model')}")
    return lines


def _stage_classes():
    import importlib

    from pipeline.orchestrator.options import STAGE_CONFIGS

    return [getattr(importlib.import_module(m), n) for m, n in STAGE_CONFIGS]


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="Model to Hub in one command: edit or tune, evaluate, card, push.")
    p.add_argument("model", nargs="?", help="Hub id, local folder, or 'demo'.")
    p.add_argument("--recipe", type=Path, help="YAML file of several jobs (models x methods), run one after the other.")
    p.add_argument("--repo-id", help="Target Hub repo OWNER/NAME.")
    p.add_argument("--method", choices=["abliterate", "auto", "dpo", "steer"], default="abliterate")
    p.add_argument("--out", type=Path, help="Output folder (default: out/<owner>--<name>-<method> for a Hub id).")
    p.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    p.add_argument("--no-push", action="store_true", help="Stop after the card; upload nothing.")
    p.add_argument("--layer", help="Direction layer: an index, 'best', or a fraction.")
    p.add_argument("--edit-method", choices=["standard", "projected", "norm-preserving"], help="Abliteration method.")
    tuning = p.add_argument_group("DPO and steering data")
    tuning.add_argument("--data", help="--method dpo: preference pairs (JSONL, Hub dataset, or demo-pairs).")
    tuning.add_argument("--positive", help="--method steer: data showing the behaviour (default demo-refusals).")
    tuning.add_argument("--negative", help="--method steer: data without it (default demo-answers).")
    tuning.add_argument("--k", type=float, help="--method steer: steering strength; negative removes the behaviour.")
    tuning.add_argument("--vector", help="--method steer: a saved steering vector (skips training).")
    seen: set[str] = {"method"}
    for cls in _stage_classes():
        add_config_args(p, cls, skip=seen)
        seen |= set(cls.model_fields)
    p.set_defaults(func=cmd_run)


def _given_options(args, exclude: set[str]) -> dict:
    return {k: v for k, v in vars(args).items() if v is not None and k not in exclude}


def cmd_run(args) -> int:
    from pipeline.orchestrator.jobs import load_jobs, run_jobs
    from pipeline.orchestrator.run import RunJob

    if args.recipe:
        jobs = load_jobs(args.recipe)
    elif args.model:
        fixed = {"model", "recipe", "repo_id", "method", "out", "private", "no_push", "func", "command", "verbose"}
        options = _given_options(args, fixed | {"edit_method"})
        if args.edit_method:
            options["method"] = args.edit_method
        job = RunJob(
            model=args.model,
            repo_id=args.repo_id,
            method=args.method,
            out=args.out,
            private=args.private,
            push=not args.no_push,
            options=options,
        )
        jobs = [job]
    else:
        raise UserError("give a MODEL or --recipe jobs.yaml")
    return run_jobs(jobs, progress=print)


def _passthrough_parser(sub, name: str, help_text: str, target: str) -> None:
    p = sub.add_parser(name, help=help_text, add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: _call(target, args.rest))


def _call(target: str, argv: list[str]) -> int:
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="Log progress details.")
    sub = parser.add_subparsers(dest="command", required=True)
    _directions_parser(sub)
    _abliterate_parser(sub)
    _evaluate_parser(sub)
    _run_parser(sub)
    _passthrough_parser(
        sub,
        "card",
        "Render DIR/README.md from its recipe and evaluation.",
        "pipeline.publish.card:card_main",
    )
    _passthrough_parser(
        sub,
        "push",
        "Upload an output folder to the Hub (same as python -m pipeline.push).",
        "pipeline.publish.push:main",
    )
    from pipeline.cli.tune import add_parsers

    add_parsers(sub)  # tune, pairs, steer
    return parser



def main(argv: list[str] | None = None) -> int:
    return run_parser(build_parser(), argv)


def run_parser(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and run a command: one-line errors and the documented exit codes."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing was written to the output folder", file=sys.stderr)
        return 130
