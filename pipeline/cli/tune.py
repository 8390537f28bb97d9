"""CLI of the tuning commands: `tune`, `pairs` and `steer` (flags generated from the configs).

`add_parsers(subparsers)` registers them on the main `python -m pipeline` parser; `python -m
pipeline.tune ...` (also the entry point under ``accelerate launch -m pipeline.tune``) is
``python -m pipeline tune ...``.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

from pipeline.configs import add_config_args, config_from_args
from pipeline.errors import UserError

PROMPT_SKIP = ("seed",)  # the tuning seed also seeds the evaluation split


def _command(name: str) -> str:
    """The command line for recipe.json, also when run as `python -m pipeline.tune` or under accelerate."""
    args = sys.argv[1:]
    if name not in args:
        args = [name, *args]
    return "python -m pipeline " + shlex.join(args)


def _add_common(p: argparse.ArgumentParser, evaluation: bool = True) -> None:
    from pipeline.edit.stages import PromptsConfig
    from pipeline.io.loading import LoadConfig

    add_config_args(p, LoadConfig)
    if evaluation:
        from pipeline.evaluation.evaluate import EvalConfig

        p.add_argument("--no-eval", action="store_true", help="Skip the evaluation against the base model.")
        add_config_args(p, PromptsConfig, skip=PROMPT_SKIP)
        add_config_args(p, EvalConfig, prefix="eval-")


def _eval_configs(args, seed: int):
    from pipeline.edit.stages import PromptsConfig
    from pipeline.evaluation.evaluate import EvalConfig

    prompts = config_from_args(PromptsConfig, args, skip=PROMPT_SKIP, seed=seed)
    return prompts, config_from_args(EvalConfig, args, prefix="eval-")


def _tune_parser(sub) -> None:
    from pipeline.tuning.tune import TuneConfig

    p = sub.add_parser("tune", help="DPO or SFT with a LoRA adapter (TRL + PEFT); merged model or adapter.",
                       description="DPO or SFT with a LoRA adapter. Runs unchanged under `accelerate launch "
                       "--config_file configs/accelerate/... -m pipeline.tune ...`.")
    p.add_argument("model", help="Hub id, local folder, or 'demo'.")
    p.add_argument("--data", required=True, help="Training data: a .jsonl/.json file (prompt/chosen/rejected for "
                   "dpo, prompt/completion for sft), a Hub dataset, or a built-in set (demo-pairs, "
                   "demo-refusals, demo-answers).")
    p.add_argument("--data-split", default="train", help="Split of a Hub dataset (default: train).")
    p.add_argument("--out", required=True, type=Path, help="Output folder (written atomically).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    p.add_argument("--eval-base", help="Evaluate against this model (default: the tuned model without adapter).")
    add_config_args(p, TuneConfig)
    _add_common(p)
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    from pipeline.io.loading import LoadConfig
    from pipeline.tuning.tune import TuneConfig, tune

    cfg = config_from_args(TuneConfig, args)
    prompts, eval_cfg = _eval_configs(args, cfg.seed)
    summary = tune(
        args.model, args.data, args.out, cfg, load=config_from_args(LoadConfig, args), prompts_cfg=prompts,
        eval_cfg=eval_cfg, evaluate=not args.no_eval, eval_base=args.eval_base, overwrite=args.overwrite,
        data_split=args.data_split,
        recipe_extra={"command": _command("tune")}, progress=print,
    )
    if summary is not None:
        _print_eval(summary.get("eval"))
        print(f"output: {summary['out']}")
    return 0


def _print_eval(results: dict | None) -> None:
    if results:
        rate = results["refusal_rate"]
        base, model = ("–" if x is None else f"{x:.1%}" for x in (rate["base"], rate["model"]))
        print(f"refusal rate: {base} -> {model}")
        if results.get("kl_divergence") is not None:
            print(f"KL divergence (harmless, first token): {results['kl_divergence']:.4f}")


def _pairs_parser(sub) -> None:
    p = sub.add_parser("pairs", help="DPO pairs from two models: base refusal rejected, edited answer chosen.")
    p.add_argument("--model", required=True, help="The base model (its refusals become `rejected`).")
    p.add_argument("--edited", required=True, help="The edited model (its answers become `chosen`).")
    p.add_argument("--prompts", help="Prompt set (its measurement part: the evaluation part stays held out; "
                   "default: demo-harmful for demo, else censored).")
    p.add_argument("--out", required=True, type=Path, help="Output .jsonl file (prompt, chosen, rejected).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output file.")
    p.add_argument("--max-new-tokens", type=int, default=64, help="New tokens per response (default: 64).")
    p.add_argument("--batch-size", type=int, help="Prompts per generation batch (default: automatic).")
    p.add_argument("--max-prompts", type=int, help="Use at most this many prompts.")
    p.add_argument("--split", default="train", help="Split of a Hub prompt dataset (default: train).")
    p.add_argument("--column", help="Text column of a prompt dataset or table file (default: auto-detected).")
    p.add_argument("--markers-file", help="Extra refusal markers (.json or .txt), as for evaluate.")
    p.add_argument("--eval-fraction", type=float, default=0.25, help="Share held out for evaluation (not used "
                   "here) when the set has no eval part, as in tune/abliterate (default: 0.25).")
    p.add_argument("--seed", type=int, default=0, help="Seed of that split (default: 0).")
    _add_common(p, evaluation=False)
    p.set_defaults(func=cmd_pairs)


def cmd_pairs(args) -> int:
    from pipeline.io.loading import LoadConfig
    from pipeline.tuning.pairs import pairs

    for flag in ("max_new_tokens", "batch_size", "max_prompts"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1 (got {value})")
    stats = pairs(args.model, args.edited, args.prompts, args.out, load=config_from_args(LoadConfig, args),
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, max_prompts=args.max_prompts,
                  split=args.split, column=args.column, markers_file=args.markers_file, overwrite=args.overwrite,
                  eval_fraction=args.eval_fraction, seed=args.seed, progress=print)
    print(f"{stats['prompts']} prompts: base refused {stats['base_refused']}, edited refused "
          f"{stats['edited_refused']}; {stats['pairs']} pairs written to {stats['out']}")
    return 0


def _steer_parser(sub) -> None:
    from pipeline.tuning.steer import SteerConfig

    p = sub.add_parser("steer", help="Contrastive weight steering (θ + k·w, w = θ₊ − θ₋) or weight monitoring.",
                       description="Steer: fine-tune a LoRA on --positive and on --negative data, w = θ₊ − θ₋, "
                       "write θ + k·w. Monitor: --monitor FINETUNED --vector FILE --base MODEL reports the cosine "
                       "between the fine-tune's task vector and w.")
    p.add_argument("model", nargs="?", help="Model to steer: Hub id, local folder, or 'demo'.")
    p.add_argument("--positive", help="Data with the behaviour (prompt/completion .jsonl, Hub dataset, built-in "
                   "set such as demo-refusals, or PAIRS.jsonl:rejected).")
    p.add_argument("--negative", help="Data without it, same form (e.g. demo-answers or PAIRS.jsonl:chosen).")
    p.add_argument("--k", help="Steering strength: θ + k·w; negative removes the behaviour, 0 gives the base.")
    p.add_argument("--out", type=Path, help="Output folder of the steered model (written atomically).")
    p.add_argument("--vector", type=Path, help="Steering vector file (.safetensors): used when it exists (no "
                   "training), else written there (default: OUT.vector.safetensors).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    p.add_argument("--monitor", help="A fine-tuned model to compare with --vector (needs --base).")
    p.add_argument("--base", help="With --monitor: the model the fine-tune started from.")
    p.add_argument("--chart", type=Path, default=Path("monitor.png"), help="With --monitor: chart file "
                   "(default: monitor.png).")
    p.add_argument("--json", type=Path, help="With --monitor: also write the cosines as JSON.")
    add_config_args(p, SteerConfig)
    _add_common(p)
    p.set_defaults(func=cmd_steer)


def parse_k(text: str | None) -> float:
    if text is None:
        raise UserError("--k is required: the steering strength, e.g. --k -1.0 (negative removes the behaviour)")
    try:
        k = float(text)
    except ValueError:
        raise UserError(f"--k must be a number, e.g. -1.0 or 0.5 (got {text!r})") from None
    if not math.isfinite(k):
        raise UserError(f"--k must be a finite number (got {text!r})")
    return k


def cmd_steer(args) -> int:
    from pipeline.io.loading import LoadConfig
    from pipeline.tuning.steer import SteerConfig, monitor, print_monitor, steer

    load = config_from_args(LoadConfig, args)
    if args.monitor:
        if not args.vector or not args.base:
            raise UserError("--monitor needs --vector FILE (an existing steering vector) and --base MODEL")
        report = monitor(args.monitor, args.vector, args.base, load=load, chart=args.chart, json_file=args.json)
        print_monitor(report)
        return 0
    if not args.model or not args.out:
        raise UserError("steer needs MODEL and --out DIR (or --monitor FINETUNED --vector FILE --base MODEL)")
    k = parse_k(args.k)
    cfg = config_from_args(SteerConfig, args)
    prompts, eval_cfg = _eval_configs(args, cfg.seed)
    summary = steer(args.model, args.out, k, positive=args.positive, negative=args.negative, vector=args.vector,
                    cfg=cfg, load=load, prompts_cfg=prompts, eval_cfg=eval_cfg, evaluate=not args.no_eval,
                    overwrite=args.overwrite, recipe_extra={"command": _command("steer")}, progress=print)
    _print_eval(summary.get("eval"))
    print(f"steering vector: {summary['vector']} (norm {summary['vector_norm']:.4g})")
    print(f"output: {summary['out']}")
    return 0


def add_parsers(subparsers) -> None:
    """Register `tune`, `pairs` and `steer` on the main parser's subparsers."""
    _tune_parser(subparsers)
    _pairs_parser(subparsers)
    _steer_parser(subparsers)
