"""Benchmark: DPO steps per second and peak memory, LoRA against full fine-tuning.

Same model, same DPO data (the built-in `demo-pairs`), same batch, length and number of
steps; each mode runs in its own child process so its peak RSS (and, on a GPU, its peak
allocated GPU memory) is its own. LoRA: TRL `DPOTrainer` with a PEFT `LoraConfig` (the
reference is the model with the adapter disabled). Full: the same trainer without PEFT
(TRL then keeps a frozen copy of the model as the reference, and AdamW holds two moments
per weight). The first `--warmup` steps are not timed. Each child uses one torch thread by
default (`--threads 0`: torch's default): on a shared 2-core machine OpenMP's spin-waiting
made two threads up to 17x slower than one, which drowns the LoRA/full difference.

    .venv/bin/python bench/bench_tune.py                 # the demo model (6 layers, hidden 128)
    .venv/bin/python bench/bench_tune.py --hidden 512    # a random qwen2 with the demo tokenizer, 8 layers
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def random_model(hidden: int, layers: int) -> Path:
    """A random qwen2 model of the given size with the demo tokenizer, cached beside the demo."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.io.demo import cache_root, demo_path
    from pipeline.io.loading import load_tokenizer

    target = cache_root() / f"bench-tune-qwen2-h{hidden}-l{layers}"
    if (target / "config.json").exists():
        return target
    tok = load_tokenizer(demo_path())
    config = AutoConfig.for_model("qwen2", vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                  num_key_value_heads=max(1, hidden // 64), max_position_embeddings=256,
                                  tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return target


def child(args) -> None:
    """One mode in this process: time DPO steps; write the numbers to args.result."""
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOTrainer

    from pipeline.io.loading import load_tokenizer, local_path
    from pipeline.tuning.pairs import load_training_data
    from pipeline.tuning.tune import TuneConfig, quiet_renames, to_dataset, trainer_args

    torch.set_num_threads(args.threads or torch.get_num_threads())
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    path = Path(args.model) if args.model != "demo" else local_path("demo")
    cfg = TuneConfig(max_steps=args.steps + args.warmup, batch_size=args.batch_size, grad_accum=1,
                     max_length=args.max_length, learning_rate=1e-5, scheduler="constant", logging_steps=10_000)
    tok = load_tokenizer(path)
    dataset = to_dataset(load_training_data("demo-pairs"), tok, "dpo")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as work, quiet_renames():
        trainer = DPOTrainer(model=model, args=trainer_args(cfg, Path(work)), train_dataset=dataset,
                             processing_class=tok, peft_config=cfg.lora() if args.child == "lora" else None,
                             callbacks=[Clock()])
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        trainer.train()
    timed = stamps[args.warmup - 1 :]  # from the end of the last warm-up step
    result = {
        "mode": args.child, "params": params, "trainable": trainable, "steps_timed": len(timed) - 1,
        "steps_per_s": (len(timed) - 1) / (timed[-1] - timed[0]),
        "peak_rss_before_train_mb": rss_before,
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }
    Path(args.result).write_text(json.dumps(result))


def run_child(mode: str, args, model: str) -> dict:
    """Run one mode in a child process; its peak RSS comes from wait4 (that child alone)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_file = handle.name
    cmd = [sys.executable, __file__, "--child", mode, "--result", result_file, "--model", model,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--threads", str(args.threads or 0)]
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise SystemExit(f"{mode} run failed:\n{log.read()[-3000:]}")
    result = json.loads(Path(result_file).read_text())
    Path(result_file).unlink()
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="model folder or 'demo' (default)")
    parser.add_argument("--hidden", type=int, help="benchmark a random qwen2 of this hidden size instead")
    parser.add_argument("--layers", type=int, default=8, help="layers of the random model (with --hidden)")
    parser.add_argument("--steps", type=int, default=10, help="timed DPO steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=96, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child (default 1; 0: torch's)")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_tune.json", help="results file")
    parser.add_argument("--child", choices=["lora", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.child:
        child(args)
        return 0

    model = str(random_model(args.hidden, args.layers)) if args.hidden else args.model
    print(f"DPO on {'demo' if model == 'demo' else model}: {args.steps} timed steps (+{args.warmup} warm-up), "
          f"batch {args.batch_size} pairs, max length {args.max_length}, torch threads {args.threads or 'default'}")
    results = {mode: run_child(mode, args, model) for mode in ("lora", "full")}
    print("| mode | trainable params | steps/s | peak RSS (MB) | RSS before training (MB) | wall (s) |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['trainable']:,} of {r['params']:,} | {r['steps_per_s']:.2f} | {r['peak_rss_mb']:.0f} "
              f"| {r['peak_rss_before_train_mb']:.0f} | {r['wall_s']:.1f} |")
    lora, full = results["lora"], results["full"]
    train_lora = lora["peak_rss_mb"] - lora["peak_rss_before_train_mb"]
    train_full = full["peak_rss_mb"] - full["peak_rss_before_train_mb"]
    summary = (f"LoRA runs {lora['steps_per_s'] / full['steps_per_s']:.2f}x the steps/s of full fine-tuning and "
               f"peaks at {lora['peak_rss_mb']:.0f} MB vs {full['peak_rss_mb']:.0f} MB RSS "
               f"(training adds {train_lora:.0f} vs {train_full:.0f} MB)")
    print(summary)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "bench_tune", "model": model, "steps": args.steps,
                                     "batch_size": args.batch_size, "max_length": args.max_length,
                                     "results": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
