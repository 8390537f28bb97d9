"""Benchmark: streaming safetensors edit (`pipeline.edit.abliterate.apply_streaming`) vs a plain file copy.

Builds (and caches) a random llama-architecture checkpoint in several safetensors
shards, then alternates, `--repeats` times:

* copy: `shutil.copyfile` of every shard into a fresh folder on the same disk;
* edit: `apply_streaming(src, fresh folder, r, EditConfig().placed(0.5), ...)` with a random
  unit direction r, run in a child process so its peak RSS can be read.

Dropping the page cache needs root, so instead both are run alternately and the
best time of each is kept: both then read from a warm page cache. `os.sync()`
runs before every timed run so neither pays for the other's dirty pages
(`--sync` also puts a final `os.sync()` inside the timed region of both).

Goals: throughput ratio copy_time / edit_time >= 0.7; peak RSS of the edit
<= 1.5 x largest shard + 300 MB. Correctness (cheap): shard headers and a few
non-writer tensors byte-identical, and for an edited o_proj rᵀW' = (1 - s) rᵀW
up to the rounding of the stored dtype (≈ 0 at strength s = 1).

    .venv/bin/python bench/bench_streaming.py            # 1.6 GB (1524 MiB) model, 4 shards
    .venv/bin/python bench/bench_streaming.py --quick    # ~340 MB model, 4 shards
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

MB = 1024 * 1024
GOAL_RATIO = 0.7
GOAL_RSS_SHARD_FACTOR = 1.5
GOAL_RSS_EXTRA_MB = 300


# --------------------------------------------------------------------------- model


def model_spec(args) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads or args.heads,
        "vocab_size": args.vocab,
        "dtype": args.dtype,
        "max_shard_size": args.shard_size,
        "seed": args.seed,
    }


def build_model(spec: dict, target: Path) -> float:
    """Random llama checkpoint in safetensors shards; returns the build time in seconds.

    Built on the meta device and materialised with `to_empty`, so memory is one
    copy of the weights and transformers' (slow) weight init is skipped.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    start = time.perf_counter()
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        vocab_size=spec["vocab_size"],
        tie_word_embeddings=False,
    )
    dtype = getattr(torch, spec["dtype"])
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        with torch.no_grad():
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
            model.to_empty(device="cpu")
            gen = torch.Generator().manual_seed(spec["seed"])
            for _name, p in model.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0)  # RMSNorm weights
                else:
                    p.normal_(0.0, 0.02, generator=gen)
            model.save_pretrained(tmp, max_shard_size=spec["max_shard_size"])
        del model
        (tmp / "bench_spec.json").write_text(json.dumps(spec, indent=2))
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return time.perf_counter() - start


def cached_model(spec: dict, rebuild: bool) -> tuple[Path, float | None]:
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    target = RESULTS / f"streaming-model-{key}"
    if rebuild and target.exists():
        shutil.rmtree(target)
    if (target / "bench_spec.json").exists():
        return target, None
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the random model into {target} ...", flush=True)
    return target, build_model(spec, target)


# --------------------------------------------------------------------------- timed runs


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    os.sync()  # flush earlier runs' dirty pages outside the timed region
    return path


def fast_edit_tensor(weight, direction, hidden_axis: int, strength: float, norm_preserving: bool = False):
    """`--what-if-fast-edit`: the edit of `pipeline.edit.abliterate.edit_tensor` without its strided
    full-size temporaries: one float32 copy in the original layout, updated in place."""
    import torch

    if strength == 0:
        return weight
    w = weight.to(torch.float32)  # a fresh contiguous copy, original layout
    r = direction.to(device=w.device, dtype=torch.float32)
    r = r / r.norm()
    coeff = (w.movedim(hidden_axis, -1) @ r).unsqueeze(hidden_axis)  # a matrix-vector product
    shape = [1] * w.dim()
    shape[hidden_axis] = -1
    before = w.norm(dim=hidden_axis, keepdim=True) if norm_preserving else None
    w.addcmul_(r.view(shape), coeff, value=-strength)  # in place: W -= s * r (rᵀW)
    if norm_preserving:
        w.mul_(before / w.norm(dim=hidden_axis, keepdim=True).clamp_min(1e-12))
    return w.to(weight.dtype)


def vm_hwm() -> int:
    """Peak resident set of this process in bytes (VmHWM).

    Not `ru_maxrss`: on Linux that survives fork + exec, so a child started
    from a big parent reports the parent's RSS at fork time.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(mode: str, src: Path, dst: Path, direction_file: Path, sync: bool, threads: int | None) -> dict:
    """One timed copy or edit in a fresh interpreter (same conditions for both); returns its report."""
    fresh_dir(dst)
    payload = json.dumps(
        {
            "mode": mode,
            "src": str(src),
            "dst": str(dst),
            "direction": str(direction_file),
            "sync": sync,
            "threads": threads,
        }
    )
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", payload], capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{mode} child failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(payload: str) -> None:
    """Runs in the child: imports, then one timed copy or apply_streaming, then prints JSON."""
    import psutil
    import torch

    import pipeline.edit.abliterate as ab
    from pipeline.io.output import weight_shards

    args = json.loads(payload)
    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    src, dst = Path(args["src"]), Path(args["dst"])
    config = json.loads((src / "config.json").read_text())
    direction = torch.load(args["direction"])
    shards = weight_shards(src)
    rss_after_imports = psutil.Process().memory_info().rss
    peak_before = vm_hwm()

    # Attribute the edit's time to the shard copy and to the tensor maths (a few calls: negligible cost).
    spent = {"copyfile": 0.0, "edit_tensor": 0.0}

    def timed(key, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t0

        return wrapper

    copyfile = shutil.copyfile
    shutil.copyfile = timed("copyfile", copyfile)
    ab.edit_tensor = timed("edit_tensor", fast_edit_tensor if args["mode"] == "fast-edit" else ab.edit_tensor)

    changed = 0
    start = time.perf_counter()
    if args["mode"] == "copy":
        dst.mkdir(parents=True)
        for shard in shards:
            shutil.copyfile(shard, dst / shard.name)
    else:
        changed = ab.apply_streaming(
            src, dst, direction, ab.EditConfig().placed(0.5), config["num_hidden_layers"], config["model_type"]
        )
    if args["sync"]:
        os.sync()
    elapsed = time.perf_counter() - start
    print(
        json.dumps(
            {
                "mode": args["mode"],
                "seconds": elapsed,
                "changed": changed,
                "peak_rss": vm_hwm(),
                "peak_rss_before": peak_before,
                "rss_after_imports": rss_after_imports,
                "copyfile_seconds": spent["copyfile"],
                "edit_tensor_seconds": spent["edit_tensor"],
            }
        )
    )


# --------------------------------------------------------------------------- correctness


def read_range(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(start)
        return fh.read(end - start)


def header_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return fh.read(n)


def rounding_noise(edited, r, mantissa_bits: int) -> float:
    """Expected norm of rᵀE where E is the rounding of each element of `edited` to its dtype."""
    import torch

    w = edited.to(torch.float64)
    _, exponent = torch.frexp(w)
    ulp = torch.pow(2.0, (exponent - 1 - mantissa_bits).to(torch.float64))
    var = (r.to(torch.float64).unsqueeze(1) ** 2 * ulp**2 / 12).sum(0)  # per column
    return float(var.sum().sqrt())


def verify(src: Path, dst: Path, direction, num_layers: int, model_type: str, per_shard: int, full: bool) -> dict:
    import torch
    from safetensors import safe_open

    from pipeline.edit.abliterate import EditConfig, _data_offsets, strength_of, strengths
    from pipeline.edit.architectures import find_writers
    from pipeline.io.output import weight_shards

    plan = strengths(EditConfig().placed(0.5), num_layers)
    headers_ok, compared, mismatched, compared_bytes = True, 0, [], 0
    writers_total, writers_changed = 0, 0
    for shard in weight_shards(src):
        out = dst / shard.name
        headers_ok &= header_bytes(shard) == header_bytes(out)
        base, offsets = _data_offsets(shard)
        writers = {m.name: m for m in find_writers(model_type, offsets)}
        others = sorted(n for n in offsets if n not in writers)
        picks = others if full else others[:: max(1, len(others) // per_shard)][:per_shard]
        for name in picks:
            a, b = offsets[name]
            compared += 1
            compared_bytes += b - a
            if read_range(shard, base + a, base + b) != read_range(out, base + a, base + b):
                mismatched.append(name)
        for name, m in writers.items():
            if strength_of(m, plan):
                writers_total += 1
                a, b = offsets[name]
                writers_changed += read_range(shard, base + a, base + b) != read_range(out, base + a, base + b)

    # One edited o_proj: rᵀW' must equal (1 - s) rᵀW up to rounding to the stored dtype.
    layer = num_layers // 2
    name = f"model.layers.{layer}.self_attn.o_proj.weight"
    index_file = src / "model.safetensors.index.json"
    shard = json.loads(index_file.read_text())["weight_map"][name] if index_file.exists() else "model.safetensors"
    with safe_open(str(src / shard), framework="pt") as f:
        w = f.get_tensor(name)
    with safe_open(str(dst / shard), framework="pt") as f:
        w_new = f.get_tensor(name)
    s = plan["attn"][layer]
    r = direction.to(torch.float64)
    r = r / r.norm()
    before = r @ w.to(torch.float64)  # hidden axis 0: one value per input column
    after = r @ w_new.to(torch.float64)
    mantissa = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[w.dtype]
    noise = rounding_noise(w_new, r, mantissa)
    error = float((after - (1 - s) * before).norm())
    return {
        "headers_identical": bool(headers_ok),
        "untouched_compared": compared,
        "untouched_compared_mb": compared_bytes / MB,
        "untouched_mismatched": mismatched,
        "writers_expected": writers_total,
        "writers_changed": int(writers_changed),
        "o_proj": name,
        "strength": s,
        "rTW_norm_before": float(before.norm()),
        "rTW_norm_after": float(after.norm()),
        "residual_ratio": float(after.norm() / before.norm()),
        "expected_ratio": abs(1 - s),
        "error_vs_expected": error,
        "rounding_noise": noise,
        "o_proj_ok": error <= 3 * noise + 1e-9,
    }


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (default 2048)")
    p.add_argument("--intermediate", type=int, default=5632, help="MLP intermediate size (default 5632)")
    p.add_argument("--layers", type=int, default=13, help="decoder layers (default 13: 1.6 GB at the defaults)")
    p.add_argument("--heads", type=int, default=16, help="attention heads (default 16)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="weights dtype")
    p.add_argument("--shard-size", default="500MB", help="save_pretrained max_shard_size (default 500MB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="small model: hidden 1024, intermediate 2816, 8 layers, 100MB shards"
    )
    p.add_argument("--repeats", type=int, default=3, help="alternating copy/edit rounds; best of each (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the children (default: torch's)")
    p.add_argument("--sync", action="store_true", help="include a final os.sync() in both timed regions")
    p.add_argument(
        "--what-if-fast-edit",
        action="store_true",
        help="also time apply_streaming with a faster edit_tensor patched in (bench-only, informational)",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached random model")
    p.add_argument("--delete-model", action="store_true", help="delete the cached model at the end")
    p.add_argument("--verify-per-shard", type=int, default=4, help="untouched tensors compared per shard")
    p.add_argument("--full-verify", action="store_true", help="compare every untouched tensor's bytes")
    p.add_argument("--json", type=Path, default=RESULTS / "bench_streaming.json", help="results file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.shard_size = 1024, 2816, 8, "100MB"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0

    import torch

    from pipeline.io.output import weight_shards

    spec = model_spec(args)
    src, build_seconds = cached_model(spec, args.rebuild)
    shards = weight_shards(src)
    sizes = [s.stat().st_size for s in shards]
    total, largest = sum(sizes), max(sizes)
    config = json.loads((src / "config.json").read_text())
    num_layers, model_type = config["num_hidden_layers"], config["model_type"]
    print(
        f"model: {src.name}  llama hidden={args.hidden} layers={num_layers} {args.dtype}  "
        f"{total / MB:.0f} MB in {len(shards)} shards (largest {largest / MB:.0f} MB)"
        + (f"  [built in {build_seconds:.1f}s]" if build_seconds is not None else "  [cached]")
    )
    if len(shards) < 4 or total < 1.5e9:
        print("note: smaller than the reference setup (>= 1.5 GB in >= 4 shards)")

    work = RESULTS / "streaming-work"
    work.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed + 1)
    direction = torch.randn(args.hidden, generator=gen, dtype=torch.float32)
    direction /= direction.norm()
    direction_file = work / "direction.pt"
    torch.save(direction, direction_file)

    load_before = os.getloadavg()
    copies, edits, fast = [], [], []
    checks = {}
    try:
        for i in range(args.repeats):
            copies.append(run_child("copy", src, work / "copy", direction_file, args.sync, args.threads))
            edits.append(run_child("edit", src, work / "edit", direction_file, args.sync, args.threads))
            line = f"round {i + 1}/{args.repeats}: copy {copies[-1]['seconds']:.2f}s  edit {edits[-1]['seconds']:.2f}s"
            if args.what_if_fast_edit:
                fast.append(run_child("fast-edit", src, work / "fast-edit", direction_file, args.sync, args.threads))
                line += f"  what-if fast edit {fast[-1]['seconds']:.2f}s"
            rss = f"copy {copies[-1]['peak_rss'] / MB:.0f} MB, edit {edits[-1]['peak_rss'] / MB:.0f} MB"
            print(f"{line}  (peak RSS: {rss})", flush=True)
        for sub in ("edit", "fast-edit") if fast else ("edit",):
            checks[sub] = verify(
                src, work / sub, direction, num_layers, model_type, args.verify_per_shard, args.full_verify
            )
    finally:
        for sub in ("copy", "edit", "fast-edit"):
            shutil.rmtree(work / sub, ignore_errors=True)
        if args.delete_model:
            shutil.rmtree(src, ignore_errors=True)

    def passed(check: dict, changed: int) -> bool:
        return bool(
            check["headers_identical"]
            and not check["untouched_mismatched"]
            and check["writers_changed"] == check["writers_expected"] == changed
            and check["o_proj_ok"]
        )

    check = checks["edit"]
    load_after = os.getloadavg()
    best_copy = min(c["seconds"] for c in copies)
    best_edit = min(edits, key=lambda e: e["seconds"])
    ratio = best_copy / best_edit["seconds"]
    peak = max(e["peak_rss"] for e in edits)
    rss_goal = GOAL_RSS_SHARD_FACTOR * largest + GOAL_RSS_EXTRA_MB * MB
    ratio_ok, rss_ok = ratio >= GOAL_RATIO, peak <= rss_goal
    correct = passed(check, best_edit["changed"])
    best_fast = min(fast, key=lambda e: e["seconds"]) if fast else None
    fast_ratio = best_copy / best_fast["seconds"] if best_fast else None
    fast_correct = passed(checks["fast-edit"], best_fast["changed"]) if best_fast else None

    rows = [
        ("machine", f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after"),
        ("model size", f"{total / MB:.0f} MB, {len(shards)} shards, largest {largest / MB:.0f} MB"),
        (f"copy (best of {args.repeats})", f"{best_copy:.2f} s  ({total / MB / best_copy:.0f} MB/s)"),
        (
            f"edit (best of {args.repeats})",
            f"{best_edit['seconds']:.2f} s  ({total / MB / best_edit['seconds']:.0f} MB/s), "
            f"{best_edit['changed']} tensors edited",
        ),
        ("  of which copyfile", f"{best_edit['copyfile_seconds']:.2f} s"),
        ("  of which edit_tensor maths", f"{best_edit['edit_tensor_seconds']:.2f} s"),
        (
            "  of which read + write back",
            f"{best_edit['seconds'] - best_edit['copyfile_seconds'] - best_edit['edit_tensor_seconds']:.2f} s",
        ),
        ("all copy times", ", ".join(f"{c['seconds']:.2f}" for c in copies) + " s"),
        ("all edit times", ", ".join(f"{e['seconds']:.2f}" for e in edits) + " s"),
        ("throughput ratio copy/edit", f"{ratio:.2f}  (goal >= {GOAL_RATIO})  {'MET' if ratio_ok else 'NOT MET'}"),
        (
            "child RSS after imports",
            f"{edits[0]['rss_after_imports'] / MB:.0f} MB (peak so far {edits[0]['peak_rss_before'] / MB:.0f} MB); "
            f"copy child peak {max(c['peak_rss'] for c in copies) / MB:.0f} MB",
        ),
        (
            "edit peak RSS",
            f"{peak / MB:.0f} MB  (goal <= 1.5 x {largest / MB:.0f} + 300 = {rss_goal / MB:.0f} MB)  "
            f"{'MET' if rss_ok else 'NOT MET'}",
        ),
        (
            "untouched bytes identical",
            f"headers {'yes' if check['headers_identical'] else 'NO'}; {check['untouched_compared']} tensors "
            f"({check['untouched_compared_mb']:.0f} MB) compared, {len(check['untouched_mismatched'])} differ",
        ),
        ("writer tensors changed", f"{check['writers_changed']} / {check['writers_expected']}"),
        (
            f"rᵀW' on {check['o_proj'].removeprefix('model.')}",
            f"|rᵀW'|/|rᵀW| = {check['residual_ratio']:.2e} (s = {check['strength']:.4f}, expected "
            f"{check['expected_ratio']:.2e}); error {check['error_vs_expected']:.2e} vs rounding noise "
            f"{check['rounding_noise']:.2e}  {'OK' if check['o_proj_ok'] else 'FAIL'}",
        ),
    ]
    if best_fast:
        rows += [
            (
                "what-if: faster edit_tensor",
                f"{best_fast['seconds']:.2f} s (maths {best_fast['edit_tensor_seconds']:.2f} s), ratio "
                f"{fast_ratio:.2f}, peak RSS {max(e['peak_rss'] for e in fast) / MB:.0f} MB, "
                f"checks {'ok' if fast_correct else 'FAILED'}",
            ),
            ("all what-if edit times", ", ".join(f"{e['seconds']:.2f}" for e in fast) + " s"),
        ]
    width = max(len(k) for k, _ in rows)
    print()
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  {'-' * 60}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")

    result = {
        "benchmark": "bench_streaming",
        "spec": spec,
        "model_dir": str(src),
        "num_shards": len(shards),
        "total_bytes": total,
        "largest_shard_bytes": largest,
        "build_seconds": build_seconds,
        "repeats": args.repeats,
        "sync": args.sync,
        "copies": copies,
        "edits": edits,
        "best_copy_seconds": best_copy,
        "best_edit_seconds": best_edit["seconds"],
        "throughput_ratio": ratio,
        "goal_ratio": GOAL_RATIO,
        "ratio_met": ratio_ok,
        "peak_rss_bytes": peak,
        "rss_goal_bytes": rss_goal,
        "rss_met": rss_ok,
        "correctness": check,
        "correct": bool(correct),
        "what_if_fast_edit": {
            "edits": fast,
            "best_seconds": best_fast["seconds"],
            "throughput_ratio": fast_ratio,
            "correctness": checks["fast-edit"],
            "correct": fast_correct,
        }
        if best_fast
        else None,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "torch_threads": torch.get_num_threads(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print()
    print(
        f"SUMMARY streaming: copy/edit throughput ratio {ratio:.2f} (goal >= {GOAL_RATIO}: "
        f"{'met' if ratio_ok else 'NOT met'}); peak RSS {peak / MB:.0f} MB vs {rss_goal / MB:.0f} MB "
        f"(goal: {'met' if rss_ok else 'NOT met'}); correctness {'ok' if correct else 'FAILED'}"
        + (f"; what-if faster edit_tensor ratio {fast_ratio:.2f}" if best_fast else "")
        + f"  -> {args.json}"
    )
    return 0 if correct else 1


if __name__ == "__main__":
    raise SystemExit(main())
