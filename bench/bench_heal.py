"""Abliterate-then-heal on a real chat model (Qwen2.5-Coder-0.5B-Instruct, GGUF from PyPI).

Heals an abliterated copy of the model (by default the folder `bench/bench_real.py` wrote, so the
abliteration is the default one) with each heal method asked for, and reports, against the GGUF base:
refusal and first-token KL after abliteration and after healing, perplexity, training seconds and peak
RSS. The goal of the healing issue: KL after healing below KL before, refusal no more than 5 points higher.

    .venv/bin/python bench/bench_heal.py [--model qwen] [--abliterated bench/results/real-out]
                                         [--methods distill,sft]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen", help="real model key (tests/real_models.py)")
    parser.add_argument("--abliterated", type=Path, default=ROOT / "bench" / "results" / "real-out",
                        help="an abliterated, evaluated copy of the model (bench/bench_real.py writes one)")
    parser.add_argument("--methods", default="distill", help="comma-separated heal methods: distill, sft, dpo")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_heal.json")
    args = parser.parse_args(argv)

    import torch

    from pipeline.tuning.tune import HEAL, TuneConfig, heal
    from tests.real_models import fetch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    gguf = str(fetch(args.model))
    before = json.loads((args.abliterated / "eval_results.json").read_text())
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        cfg = HEAL if method == HEAL.method else TuneConfig(method=method)
        work = Path(tempfile.mkdtemp(prefix="bench_heal-"))
        t0 = time.perf_counter()
        summary = heal(args.abliterated, gguf, work / "healed", cfg, progress=lambda m, tag=method: print(
            f"[{tag}] {m}", flush=True))
        seconds = time.perf_counter() - t0
        after = summary["eval"]
        rows.append({
            "method": method, "seconds": round(seconds), "refusal_before": before["refusal_rate"]["model"],
            "refusal_after": after["refusal_rate"]["model"], "kl_before": before["kl_divergence"],
            "kl_after": after["kl_divergence"], "perplexity_base": after.get("perplexity", {}).get("base"),
            "perplexity_before": before.get("perplexity", {}).get("model"),
            "perplexity_after": after.get("perplexity", {}).get("model"),
            "by_set_after": {k: v["model"] for k, v in after.get("by_set", {}).items()},
            "pairs": summary["recipe"].get("heal_pairs"),
        })
        shutil.rmtree(work, ignore_errors=True)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "peak_rss_gb": round(peak_gb, 2), "runs": rows}, indent=2))
    for r in rows:
        met = r["kl_after"] < r["kl_before"] and r["refusal_after"] <= r["refusal_before"] + 0.05
        print(f"SUMMARY heal {r['method']} ({args.model}): refusal {r['refusal_before']:.1%} -> "
              f"{r['refusal_after']:.1%}, KL {r['kl_before']:.4f} -> {r['kl_after']:.4f}, perplexity "
              f"{r['perplexity_before']} -> {r['perplexity_after']} (base {r['perplexity_base']}), {r['seconds']} s; "
              f"goal (KL lower, refusal <= +5 points): {'met' if met else 'NOT met'}")
    print(f"peak RSS {peak_gb:.1f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
