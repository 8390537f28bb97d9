"""Edit variants on a real model from saved directions: refusal per set, first-token KL and perplexity.

The default chain (`bench_real.py`) measures the directions once; this script evaluates other edits of the
same directions on the same held-out evaluation prompts, so kernels, methods and ranks can be compared
without measuring again. The base side is measured once per run.

    .venv/bin/python bench/bench_kernels.py [--directions bench/results/real-out] [--layer 18]
        [--variants '[{"attn": {"peak": 0.5, "width": 2.0}, "mlp": {"peak": 0.5, "width": 2.0}}, {}]']

Each variant is a dict of EditConfig settings ({} is the default edit). Writes bench/results/bench_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OLD_DEFAULT = {"attn": {"peak": 0.5, "width": 2.0}, "mlp": {"peak": 0.5, "width": 2.0}}
VARIANTS = [OLD_DEFAULT, {**OLD_DEFAULT, "method": "projected"}, {**OLD_DEFAULT, "per_set": False},
            {"attn": {"peak": 0.6, "width": 0.4}, "mlp": {"peak": 0.6, "width": 0.4}}, {}, {"method": "projected"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen", help="a real model key of tests/real_models.py")
    parser.add_argument("--directions", type=Path, default=ROOT / "bench/results/real-out")
    parser.add_argument("--layer", default="best", help="layer spec of the direction (best, index, fraction)")
    parser.add_argument("--variants", type=json.loads, default=VARIANTS, help="JSON list of EditConfig dicts")
    args = parser.parse_args()

    import torch

    from pipeline.edit import directions as dirs
    from pipeline.edit import stages
    from pipeline.edit.abliterate import EditConfig, apply_in_memory
    from pipeline.edit.architectures import model_type_of
    from pipeline.evaluation.evaluate import EvalConfig, evaluate, markers_for, reference
    from pipeline.io.loading import LoadConfig, load_model
    from tests.real_models import fetch

    began = time.monotonic()
    path = str(fetch(args.model))
    prompts = stages.resolve_prompts(path, stages.PromptsConfig())
    loaded = load_model(path, LoadConfig())
    d = dirs.load(args.directions)
    cfg, markers = EvalConfig(), markers_for(EvalConfig())
    harmful, harmless = tuple(prompts.harmful.evaluate), tuple(prompts.harmless.evaluate)
    ref = reference(loaded.model, loaded.tokenizer, harmful, harmless, cfg, model_id=path)
    params = dict(loaded.model.named_parameters())
    saved = {k: v.detach().clone() for k, v in params.items()}
    rows = []
    for variant in args.variants:
        direction, layer, edit = stages.chosen_direction(d, args.layer, EditConfig(**variant))
        apply_in_memory(loaded.model, direction, edit, d.num_layers, model_type_of(loaded.model.config))
        r = evaluate(loaded.model, loaded.tokenizer, harmful, harmless, cfg, base=ref, markers=markers,
                     groups=prompts.eval_groups())
        with torch.no_grad():
            for k, v in params.items():
                v.data.copy_(saved[k])
        row = {"variant": variant, "layer": layer.get("index"), "refusal": r["refusal_rate"]["model"],
               "by_set": {k: v["model"] for k, v in (r["by_set"] or {}).items()}, "kl": r["kl_divergence"],
               "perplexity": r["perplexity"]["model"], "seconds": round(time.monotonic() - began)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = ROOT / "bench/results/bench_kernels.json"
    out.write_text(json.dumps({"model": args.model, "base_perplexity": ref.perplexity, "rows": rows}, indent=2))
    best = min(rows, key=lambda x: (max(x["by_set"].values(), default=x["refusal"]), x["kl"]))
    print(f"SUMMARY {len(rows)} variants; lowest worst-set refusal, then KL: {best['variant']} "
          f"{best['by_set']} KL {best['kl']:.3f} ppl {best['perplexity']:.2f} (base {ref.perplexity:.2f})")


if __name__ == "__main__":
    main()
