"""Generation throughput of the refusal evaluation: batched against one prompt at a time.

Same prompts (the demo-harmful evaluation prompts), same greedy settings, on the demo
model; prints generated tokens per second for each mode and the speed-up (goal >= 5x on CPU).

    .venv/bin/python bench/bench_generation.py [--prompts demo-harmful] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int | None, repeats: int = 1
) -> tuple[float, int, list]:
    """Best wall time over ``repeats`` runs (the machine may be shared), generated tokens, token rows."""
    from pipeline.evaluation.evaluate import generate_tokens

    best, rows = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        rows = generate_tokens(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        best = min(best, time.perf_counter() - start)
    return best, sum(len(row) for row in rows), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="model id, folder or 'demo'")
    parser.add_argument("--prompts", default="demo-harmful", help="prompt set (its eval part when it has one)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None, help="batched mode; default: automatic")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode; the best time counts")
    args = parser.parse_args(argv)

    import torch

    from pipeline.io.chat import auto_batch_size
    from pipeline.io.loading import load_model
    from pipeline.io.prompts import load_prompts

    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    source = load_prompts(args.prompts)
    prompts = list(source.eval_prompts or source.prompts)
    size = args.batch_size or auto_batch_size(model)
    print(f"model {args.model} on {next(model.parameters()).device}, torch threads {torch.get_num_threads()}")
    print(f"{len(prompts)} prompts from {args.prompts}, max_new_tokens {args.max_new_tokens}, greedy, "
          f"best of {args.repeats} runs per mode")

    timed(model, tokenizer, prompts[:4], 8, size)  # warm-up
    t_batch, n_batch, rows_batch = timed(model, tokenizer, prompts, args.max_new_tokens, size, args.repeats)
    t_single, n_single, rows_single = timed(model, tokenizer, prompts, args.max_new_tokens, 1, args.repeats)
    same = sum(a == b for a, b in zip(rows_batch, rows_single, strict=True))
    rate_batch, rate_single = n_batch / t_batch, n_single / t_single
    ratio = rate_batch / rate_single
    print(f"batched (batch {size}): {n_batch} tokens in {t_batch:.2f} s = {rate_batch:.0f} tokens/s")
    print(f"one at a time:        {n_single} tokens in {t_single:.2f} s = {rate_single:.0f} tokens/s")
    print(f"identical responses: {same}/{len(prompts)}")
    verdict = "meets" if ratio >= 5 else "misses"
    print(
        f"SUMMARY generation: batched {rate_batch:.0f} tok/s vs single {rate_single:.0f} tok/s "
        f"= {ratio:.1f}x ({verdict} the >= 5x goal; {len(prompts)} prompts, {args.max_new_tokens} new tokens)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
