"""Benchmark: direction measurement throughput (`pipeline.edit.activations.collect`).

A random llama model (float32, vocab = the demo tokenizer's) runs the same
prompts (the first `--prompts` of pipeline/data/prompts/censored.txt, in the
demo chat template) in three ways after a warm-up. The modes are interleaved
per chunk of `--batch-size` prompts; each mode's time is the sum over chunks
of its best of `--repeats` on that chunk:

* batched: `collect(model, tok, prompts, batch_size=32)` (hooks, running means);
* one at a time: `collect(..., batch_size=1)`, the original toolkit's loop;
* bare: the same (pre-tokenised) batches through
  `model.get_decoder()(**enc, use_cache=False)` without hooks.
  Format + tokenise alone is timed too, to split collect's overhead.

Goals: batched tokens/s >= 5 x one-at-a-time; collect overhead over the bare
forward = collect_time / bare_time - 1 <= 10 %. Also reported: the padding
share of the batches (and with `--what-if-sorted` the bare forward on
length-sorted batches), the layer outputs the capture hooks keep alive, and
that the batched and one-at-a-time means agree.

Depth scales every mode alike, so the default model has 4 layers of hidden
1024 (a run takes ~3-6 min on 2 CPU cores); `--layers 8` doubles the time.
Wall time is what the goals use; CPU time of the process is reported too,
because on a shared machine the wall time also measures the other tenants.

    .venv/bin/python bench/bench_directions.py           # hidden 1024, 4 layers, 128 prompts
    .venv/bin/python bench/bench_directions.py --quick   # hidden 512, 4 layers, 64 prompts
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GOAL_SPEEDUP = 5.0
GOAL_OVERHEAD = 0.10
PROMPT_FILE = ROOT / "pipeline" / "data" / "prompts" / "censored.txt"


def build_model(args, vocab_size: int, pad_id: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=max(vocab_size, args.vocab),
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype))
    return model.eval()


def hook_retention(model, enc) -> tuple[int, int]:
    """Bytes of layer outputs the capture hooks keep alive after one batch, and the bytes they need.

    `hidden[:, -1, :]` is a view: it pins the layer's whole [batch, seq, hidden] output.
    """
    import torch

    from pipeline.edit.activations import _LastTokenHooks, decoder_layers

    hooks = _LastTokenHooks(decoder_layers(model))
    try:
        with torch.inference_mode():
            model.get_decoder()(**enc, use_cache=False)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in hooks.captured}
        needed = sum(t.numel() * t.element_size() for t in hooks.captured)
    finally:
        hooks.remove()
    return sum(storages.values()), needed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size, as in a real model (default 32000)")
    p.add_argument("--intermediate", type=int, default=2816, help="MLP intermediate size (default 2816)")
    p.add_argument(
        "--layers", type=int, default=4, help="decoder layers (default 4; every mode scales with depth alike)"
    )
    p.add_argument("--heads", type=int, default=16, help="attention heads (default 16)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--prompts", type=int, default=128, help="number of prompts from censored.txt (default 128)")
    p.add_argument("--batch-size", type=int, default=32, help="batched mode's batch size (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode; the best counts (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--what-if-sorted", action="store_true", help="also time the bare forward on length-sorted batches")
    p.add_argument("--quick", action="store_true", help="hidden 512, intermediate 1408, 4 layers, 64 prompts")
    p.add_argument("--json", type=Path, default=RESULTS / "bench_directions.json", help="results file")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.prompts = 512, 1408, 4, 64
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from pipeline.edit.activations import collect
    from pipeline.io.chat import batched, encode_batch, format_prompts, input_device
    from pipeline.io.demo import demo_path
    from pipeline.io.loading import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(demo_path())
    prompts = [line.strip() for line in PROMPT_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = prompts[: args.prompts]
    model = build_model(args, len(tokenizer), tokenizer.pad_token_id)
    params = sum(p.numel() for p in model.parameters())
    device = input_device(model)
    decoder = model.get_decoder()
    bs = args.batch_size

    texts = format_prompts(tokenizer, prompts)
    encs = [encode_batch(tokenizer, chunk, device) for chunk in batched(texts, bs)]
    real_tokens = sum(int(e["attention_mask"].sum()) for e in encs)
    padded_tokens = sum(e["attention_mask"].numel() for e in encs)
    lengths = [int(m.sum()) for e in encs for m in e["attention_mask"]]
    order = sorted(range(len(texts)), key=lambda i: len(tokenizer(texts[i], add_special_tokens=False)["input_ids"]))
    sorted_encs = [encode_batch(tokenizer, [texts[i] for i in chunk], device) for chunk in batched(order, bs)]
    sorted_padded = sum(e["attention_mask"].numel() for e in sorted_encs)

    print(
        f"model: random llama hidden={args.hidden} inter={args.intermediate} layers={args.layers} "
        f"vocab={len(tokenizer)} {args.dtype} ({params / 1e6:.0f}M params) on {device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"prompts: {len(prompts)} from {PROMPT_FILE.name}, chat template; {real_tokens} tokens "
        f"(mean {real_tokens / len(prompts):.1f}, min {min(lengths)}, max {max(lengths)}); batch {bs}: "
        f"{padded_tokens} positions incl. padding ({1 - real_tokens / padded_tokens:.0%} padding)"
    )

    @torch.inference_mode()
    def toolkit(chunk):
        """The original toolkit's way: one prompt at a time, the full model with output_hidden_states."""
        for text in format_prompts(tokenizer, chunk):
            enc = encode_batch(tokenizer, [text], device)
            out = model(**enc, output_hidden_states=True, use_cache=False)
            [h[:, -1].double() for h in out.hidden_states[1:]]

    @torch.inference_mode()
    def bare(batches):
        for enc in batches:
            decoder(**enc, use_cache=False)

    chunks = list(batched(prompts, bs))  # the unit of interleaving: one batch of the batched mode
    runs = {
        "batched": lambda c: collect(model, tokenizer, chunks[c], batch_size=bs),
        "bare": lambda c: bare([encs[c]]),
        "tokenize": lambda c: encode_batch(tokenizer, format_prompts(tokenizer, chunks[c]), device),
        "single": lambda c: collect(model, tokenizer, chunks[c], batch_size=1),
        "toolkit": lambda c: toolkit(chunks[c]),
    }
    if args.what_if_sorted:
        runs["bare-sorted"] = lambda c: bare([sorted_encs[c]])

    # Warm-up: every mode once on a slice (allocator, oneDNN/MKL kernels, thread pool).
    collect(model, tokenizer, prompts[: 2 * bs], batch_size=bs)
    collect(model, tokenizer, prompts[:8], batch_size=1)
    bare(encs[:2])

    # Every chunk runs every mode `repeats` times, modes in rotating order; a mode's time is the sum
    # over chunks of its best time on that chunk. Short interleaved samples keep a busy patch of a
    # shared machine from landing on one mode only.
    load_before = os.getloadavg()
    names = list(runs)
    times = {name: [[] for _ in chunks] for name in names}
    cpu = {name: [[] for _ in chunks] for name in names}
    outputs: dict[str, list] = {"batched": [None] * len(chunks), "single": [None] * len(chunks)}
    for i in range(args.repeats):
        for c in range(len(chunks)):
            shift = (i + c) % len(names)
            for name in names[shift:] + names[:shift]:
                t0, c0 = time.perf_counter(), time.process_time()
                out = runs[name](c)
                times[name][c].append(time.perf_counter() - t0)
                cpu[name][c].append(time.process_time() - c0)
                if name in outputs:
                    outputs[name][c] = out
        total = {n: sum(t[-1] for t in times[n]) for n in names}
        print(f"round {i + 1}/{args.repeats}: " + "  ".join(f"{n} {t:.2f}s" for n, t in total.items()), flush=True)
    load_after = os.getloadavg()
    best = {name: sum(min(t) for t in times[name]) for name in names}
    best_cpu = {name: sum(min(t) for t in cpu[name]) for name in names}
    rounds = {name: [sum(t[i] for t in times[name]) for i in range(args.repeats)] for name in names}
    retained, needed = hook_retention(model, encs[0])

    def overall(parts):
        count = sum(p.count for p in parts)
        return sum(p.mean * p.count for p in parts) / count, count, sum(p.tokens for p in parts)

    (mean_b, count_b, tok_b), (mean_s, count_s, tok_s) = overall(outputs["batched"]), overall(outputs["single"])
    assert count_b == count_s == len(prompts) and tok_b == tok_s == real_tokens, (tok_b, tok_s, real_tokens)
    agreement = float((mean_b - mean_s).abs().max() / mean_s.abs().max())
    tps = {name: real_tokens / t for name, t in best.items()}
    # The goal compares with the original toolkit's way (one prompt at a time through the whole model with
    # output_hidden_states, logits included); `single` isolates what batching alone buys.
    speedup = best["toolkit"] / best["batched"]
    speedup_batching = best["single"] / best["batched"]
    overhead = best["batched"] / best["bare"] - 1
    overhead_tok = best["batched"] / (best["bare"] + best["tokenize"]) - 1
    speedup_cpu = best_cpu["toolkit"] / best_cpu["batched"]
    overhead_cpu = best_cpu["batched"] / best_cpu["bare"] - 1
    speedup_ok, overhead_ok = speedup >= GOAL_SPEEDUP, overhead <= GOAL_OVERHEAD

    labels = {
        "batched": f"collect, batch {bs}",
        "single": "collect, batch 1 (one at a time)",
        "toolkit": "original toolkit: batch 1, full model, hidden_states",
        "bare": f"bare decoder forward, batch {bs}, pre-tokenised",
        "tokenize": "format + tokenise only (no forward)",
        "bare-sorted": f"what-if: bare, batch {bs}, length-sorted batches",
    }
    width = max(len(v) for v in labels.values())
    print()
    print(f"{'mode':<{width}}  {'best s':>8}  {'tokens/s':>9}  {'CPU s':>7}  per round (s)")
    print(f"{'-' * width}  {'-' * 8}  {'-' * 9}  {'-' * 7}  {'-' * 20}")
    for name in runs:
        print(
            f"{labels[name]:<{width}}  {best[name]:8.2f}  {tps[name]:9.0f}  {best_cpu[name]:7.2f}  "
            + ", ".join(f"{t:.2f}" for t in rounds[name])
        )
    print()
    print(
        f"speedup batched vs one at a time (original toolkit's way): {speedup:.2f}x  (goal >= {GOAL_SPEEDUP:.0f}x)  "
        f"{'MET' if speedup_ok else 'NOT MET'}; batching alone (collect batch 1): {speedup_batching:.2f}x"
    )
    print(
        f"collect overhead vs bare forward: {overhead:+.1%}  (goal <= {GOAL_OVERHEAD:.0%})  "
        f"{'MET' if overhead_ok else 'NOT MET'};  vs bare forward + format/tokenise time: {overhead_tok:+.1%}"
    )
    if "bare-sorted" in best:
        print(
            f"what-if length-sorted batches: padding {1 - real_tokens / padded_tokens:.0%} -> "
            f"{1 - real_tokens / sorted_padded:.0%}, bare forward {best['bare'] / best['bare-sorted']:.2f}x faster"
        )
    print(
        f"hooks keep {retained / 2**20:.1f} MB of layer outputs alive per batch of {bs} "
        f"(the last-token rows need {needed / 2**20:.2f} MB)"
    )
    print(f"by process CPU time instead: speedup {speedup_cpu:.2f}x, overhead {overhead_cpu:+.1%}")
    print(f"batched vs one-at-a-time means: max |diff| / max |mean| = {agreement:.1e}")
    print(f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after ({os.cpu_count()} CPUs)")

    result = {
        "benchmark": "bench_directions",
        "model": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "heads": args.heads,
            "vocab": len(tokenizer),
            "dtype": args.dtype,
            "params": params,
        },
        "prompts": len(prompts),
        "tokens": real_tokens,
        "padded_positions": padded_tokens,
        "padded_positions_sorted": sorted_padded,
        "batch_size": bs,
        "repeats": args.repeats,
        "times_per_chunk": times,
        "times_per_round": rounds,
        "best_seconds": best,
        "cpu_seconds_per_chunk": cpu,
        "best_cpu_seconds": best_cpu,
        "hook_retained_bytes_per_batch": retained,
        "hook_needed_bytes_per_batch": needed,
        "tokens_per_second": tps,
        "speedup": speedup,
        "speedup_batching_alone": speedup_batching,
        "goal_speedup": GOAL_SPEEDUP,
        "speedup_met": speedup_ok,
        "overhead": overhead,
        "overhead_vs_bare_plus_tokenize": overhead_tok,
        "goal_overhead": GOAL_OVERHEAD,
        "overhead_met": overhead_ok,
        "speedup_by_cpu_time": speedup_cpu,
        "overhead_by_cpu_time": overhead_cpu,
        "means_max_rel_diff": agreement,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print()
    print(
        f"SUMMARY directions: batched {tps['batched']:.0f} tok/s vs one-at-a-time (toolkit) {tps['toolkit']:.0f} tok/s "
        f"= {speedup:.2f}x, batching alone {speedup_batching:.2f}x "
        f"(goal >= {GOAL_SPEEDUP:.0f}x: {'met' if speedup_ok else 'NOT met'}); collect overhead "
        f"{overhead:+.1%} vs bare forward (goal <= {GOAL_OVERHEAD:.0%}: {'met' if overhead_ok else 'NOT met'})"
        f"  -> {args.json}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
