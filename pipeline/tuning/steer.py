"""Contrastive weight steering (arXiv 2511.05408) and weight-vector monitoring.

Steering: a LoRA is fine-tuned on the positive data (the behaviour) and another on the
negative data (its opposite) with the same settings (paper: rank 32, alpha 16, about one
epoch). The steering vector is w = θ₊ − θ₋; the steered model is θ + k·w (k > 0 adds the
behaviour, k < 0 removes it, k = 0 copies the base weights bit for bit).

θ₊ − θ₋ equals the difference of the two merged LoRA updates, ΔW₊ − ΔW₋, which is what
is computed (in float32, without rounding θ). w is saved as safetensors keyed by the
model's tensor names, so several k can be tried without training again. The steered model
is written shard by shard from the base's safetensors files: peak memory is one shard.

Monitoring: the cosine similarity between a fine-tune's task vector (θ_ft − θ_base) and w,
over all of w's tensors and per tensor / module / layer: a fine-tune that learns the
behaviour points along w.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.edit.stages import PromptsConfig
from pipeline.errors import UserError
from pipeline.io.loading import LoadConfig, free_memory, load_causal_lm, local_path, unquantized
from pipeline.io.output import (
    EVAL_FILE,
    atomic_file,
    check_target,
    sha256_file,
    staged_folder,
    tensor_index,
    write_json,
    write_recipe,
)
from pipeline.io.sources import is_hub_id
from pipeline.progress import Progress, say

log = logging.getLogger(__name__)

SKIP_FILES = {"recipe.json", EVAL_FILE, "README.md", ".gitattributes", "strengths.png"}
_LAYER = re.compile(r"\.layers\.(\d+)\.(.+)\.weight$")


class SteerConfig(BaseModel):
    """How the positive and negative LoRA fine-tunes are trained (both the same)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lora_r: int = Field(32, ge=1, description="LoRA rank (paper: 32).")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha (paper: 16).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str = Field(
        "all-linear", description="Modules that get an adapter: all-linear, or comma-separated names.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over each data set (paper: about one).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps per fine-tune; overrides --epochs.")
    max_examples: int | None = Field(
        None, ge=1, description="Use at most this many examples of each data set (the first ones); default: all.")
    batch_size: int = Field(4, ge=1, description="Examples per device per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Forward passes accumulated per optimizer step.")
    max_length: int = Field(1024, ge=8, description="Tokens per sequence (prompt + completion).")
    data_split: str = Field("train", description="Split of a Hub dataset.")
    seed: int = Field(0, description="Seed of both fine-tunes (the same for both).")

    def tune_config(self):
        from pipeline.tuning.tune import TuneConfig

        fields = self.model_dump(exclude={"data_split"})
        return TuneConfig(method="sft", adapter_only=True, scheduler="linear", **fields)



# ---------------------------------------------------------------- safetensors helpers


def shard_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name; a one-line error when the folder holds no model weights."""
    names = tensor_index(folder)
    if not names:
        adapter = (Path(folder) / "adapter_config.json").exists()
        hint = " (an adapter-only folder: tune it without --adapter-only)" if adapter else ""
        raise UserError(f"no safetensors model weights in '{folder}'{hint}")
    return names


def save_vector(vector: dict[str, Any], path: Path, meta: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in vector.items()}, str(tmp), metadata=meta)
    return path


def load_vector(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"steering vector not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise UserError(f"'{path}' is not a safetensors steering vector ({str(exc).splitlines()[0]})") from None


def vector_norm(vector: dict[str, Any]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in vector.values()))


# ---------------------------------------------------------------- building w


def adapter_difference(model_id: str, positive: Path, negative: Path, load: LoadConfig = LoadConfig()) -> dict:
    """ΔW₊ − ΔW₋ per adapted weight (= θ₊ − θ₋ of the merged models), float32, keyed by tensor name."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from pipeline.tuning.tune import quiet_renames

    base = load_causal_lm(model_id, unquantized(load), place=False)
    with quiet_renames():
        model = PeftModel.from_pretrained(base, str(positive), adapter_name="positive")
    model.load_adapter(str(negative), adapter_name="negative")
    vector = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and {"positive", "negative"} <= set(module.scaling):
            delta = module.get_delta_weight("positive").float() - module.get_delta_weight("negative").float()
            vector[name.removeprefix("base_model.model.") + ".weight"] = delta.detach().cpu()
    if not vector:
        raise UserError("the adapters changed no weights: check --target-modules")
    return vector


def _same_data(a, b) -> bool:
    return sorted(map(json.dumps, a.examples)) == sorted(map(json.dumps, b.examples))


def build_vector(
    model_id: str, positive: str, negative: str, cfg: SteerConfig = SteerConfig(), load: LoadConfig = LoadConfig(),
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fine-tune a LoRA on each set (same settings and seed) and return w = θ₊ − θ₋."""
    from pipeline.tuning.pairs import load_training_data
    from pipeline.tuning.tune import train_adapter

    pos = load_training_data(positive, "sft", split=cfg.data_split, limit=cfg.max_examples)
    neg = load_training_data(negative, "sft", split=cfg.data_split, limit=cfg.max_examples)
    if _same_data(pos, neg):
        raise UserError("the positive and negative sets are identical: w = θ₊ − θ₋ would be 0; give data that "
                        "shows the behaviour (--positive) and data that does not (--negative)")
    tune_cfg = cfg.tune_config()
    work = Path(tempfile.mkdtemp(prefix="steer-"))
    try:
        say(progress, f"fine-tuning on the positive set ({len(pos.examples)} examples)")
        a_pos, _ = train_adapter(model_id, pos, tune_cfg, work / "positive", load, progress)
        say(progress, f"fine-tuning on the negative set ({len(neg.examples)} examples)")
        a_neg, _ = train_adapter(model_id, neg, tune_cfg, work / "negative", load, progress)
        vector = adapter_difference(model_id, a_pos, a_neg, load)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if vector_norm(vector) == 0.0:
        raise UserError("the steering vector is 0 (θ₊ = θ₋): the two fine-tunes learnt the same thing; give "
                        "contrasting positive and negative data, or train longer")
    return vector


# ---------------------------------------------------------------- applying w


def _check_fits(vector: dict[str, Any], index: dict[str, str], model_id: str) -> None:
    missing = [name for name in vector if name not in index]
    if missing:
        raise UserError(f"the steering vector does not fit '{model_id}': it has no tensor {missing[0]!r} "
                        f"({len(missing)} missing); was the vector made for another model?")


def write_steered(base_dir: Path, vector: dict[str, Any], k: float, folder: Path, model_id: str = "") -> int:
    """θ + k·w shard by shard into ``folder``; other files copied. Returns the number of changed tensors."""
    from safetensors.torch import load_file, save_file

    base_dir, folder = Path(base_dir), Path(folder)
    index = shard_map(base_dir)
    _check_fits(vector, index, model_id or str(base_dir))
    changed = 0
    for shard in sorted(set(index.values())):
        names = [n for n in vector if index[n] == shard]
        if k == 0 or not names:
            shutil.copyfile(base_dir / shard, folder / shard)  # bit-exact base weights
            continue
        tensors = load_file(str(base_dir / shard))
        for name in names:
            weight, delta = tensors[name], vector[name]
            if tuple(weight.shape) != tuple(delta.shape):
                raise UserError(f"the steering vector does not fit '{model_id or base_dir}': {name} is "
                                f"{tuple(weight.shape)} in the model and {tuple(delta.shape)} in the vector")
            tensors[name] = (weight.float() + k * delta.float()).to(weight.dtype)
            changed += 1
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    for item in base_dir.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in SKIP_FILES \
                and not item.name.startswith("directions"):
            shutil.copyfile(item, folder / item.name)
    return changed


def _evaluate(model_id: str, folder: Path, out: Path, load: LoadConfig, prompts_cfg, eval_cfg, progress) -> tuple:
    from pipeline.edit.stages import base_reference, evaluate_model, resolve_prompts
    from pipeline.io.loading import load_tokenizer

    prompts = resolve_prompts(model_id, prompts_cfg or PromptsConfig())
    tokenizer = load_tokenizer(local_path(model_id, load), load)
    say(progress, "evaluating the base model")
    base = load_causal_lm(model_id, unquantized(load))
    reference = base_reference(base, tokenizer, prompts, eval_cfg, model_id)
    del base
    free_memory()
    say(progress, "evaluating the steered model")
    steered = load_causal_lm(str(folder), unquantized(load).model_copy(update={"revision": None}))
    return evaluate_model(steered, tokenizer, prompts, eval_cfg, reference, str(out), model_id), prompts


def steer(
    model_id: str, out: Path, k: float, *, positive: str | None = None, negative: str | None = None,
    vector: Path | None = None, cfg: SteerConfig = SteerConfig(), load: LoadConfig = LoadConfig(),
    prompts_cfg: PromptsConfig | None = None, eval_cfg=None, evaluate: bool = True, overwrite: bool = False,
    recipe_extra: dict | None = None, progress: Progress | None = None,
) -> dict:
    """Write θ + k·w into ``out``; w is read from an existing ``vector`` file, else trained and saved there."""
    if not math.isfinite(k):
        raise UserError(f"k must be a finite number (got {k})")
    from pipeline.tuning.tune import check_eval_inputs

    out = Path(out)
    check_target(out, overwrite)
    if evaluate:
        check_eval_inputs(model_id, prompts_cfg, eval_cfg)
    vector_path = Path(vector) if vector else out.parent / f"{out.name}.vector.safetensors"
    if vector and vector_path.is_file():
        say(progress, f"using the steering vector {vector_path} (no training)")
        w, meta = load_vector(vector_path)
    else:
        if not positive or not negative:
            raise UserError("--positive and --negative are needed to build the steering vector "
                            "(or pass an existing --vector FILE)")
        w = build_vector(model_id, positive, negative, cfg, load, progress)
        meta = {"base_model": model_id, "positive": positive, "negative": negative,
                "config": json.dumps(cfg.model_dump(mode="json"))}
        save_vector(w, vector_path, meta)
        say(progress, f"saved the steering vector to {vector_path}")
    base_dir = local_path(model_id, load)
    results = None
    with staged_folder(out, overwrite) as tmp:
        changed = write_steered(base_dir, w, k, tmp, model_id)
        prompts = None
        if evaluate:
            results, prompts = _evaluate(model_id, tmp, out, load, prompts_cfg, eval_cfg, progress)
        datasets = [s for s in (meta.get("positive"), meta.get("negative")) if s and _is_hub(s)]
        rec = write_recipe(tmp, {
            "kind": "steered", "base_model": model_id, "base_revision": load.revision, "method": "steer",
            "parameters": {**json.loads(meta.get("config", "{}") or "{}"), "k": k},
            "vector": {"file": str(vector_path), "sha256": sha256_file(vector_path), "norm": vector_norm(w),
                       "tensors": len(w), "positive": meta.get("positive"), "negative": meta.get("negative"),
                       "base_model": meta.get("base_model")},
            "prompts": prompts.record() if prompts else None, "datasets": datasets,
            "seed": json.loads(meta.get("config", "{}") or "{}").get("seed", 0), **(recipe_extra or {}),
        })
        if results is not None:
            write_json(tmp / EVAL_FILE, results)
    say(progress, f"wrote {out} ({changed} tensors changed)")
    return {"out": str(out), "vector": str(vector_path), "vector_norm": vector_norm(w), "changed": changed,
            "recipe": rec, "eval": results}


def _is_hub(spec: str) -> bool:
    from pipeline.tuning.pairs import split_pick

    return is_hub_id(split_pick(spec)[0])


# ---------------------------------------------------------------- monitoring


def _module_of(name: str) -> tuple[int | None, str]:
    match = _LAYER.search(name)
    if not match:
        return None, name.removesuffix(".weight")
    return int(match.group(1)), match.group(2).split(".")[-1]


def _cos(dot: float, a2: float, b2: float) -> float:
    return dot / math.sqrt(a2 * b2) if a2 > 0 and b2 > 0 else 0.0


def monitor(
    finetuned: str, vector: Path, base: str, load: LoadConfig = LoadConfig(), chart: Path | None = None,
    json_file: Path | None = None,
) -> dict:
    """Cosine similarity between θ_ft − θ_base and w: overall, per tensor, per module kind, per layer."""
    from safetensors import safe_open

    w, meta = load_vector(vector)
    ft_dir, base_dir = local_path(finetuned, load), local_path(base, load)
    ft_index, base_index = shard_map(ft_dir), shard_map(base_dir)
    _check_fits(w, ft_index, finetuned)
    _check_fits(w, base_index, base)
    rows, groups = [], {}
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def tensor(folder: Path, file: str, name: str):
            path = folder / file
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return handles[path].get_tensor(name).double()

        for name in sorted(w):
            delta = tensor(ft_dir, ft_index[name], name) - tensor(base_dir, base_index[name], name)
            v = w[name].double()
            if delta.shape != v.shape:
                raise UserError(f"{name} is {tuple(delta.shape)} in the models and {tuple(v.shape)} in the vector")
            dot, d2, v2 = float((delta * v).sum()), float(delta.pow(2).sum()), float(v.pow(2).sum())
            layer, module = _module_of(name)
            rows.append({"name": name, "layer": layer, "module": module, "cosine": _cos(dot, d2, v2),
                         "delta_norm": math.sqrt(d2), "vector_norm": math.sqrt(v2)})
            for key in ("overall", f"module:{module}", f"layer:{layer}"):
                acc = groups.setdefault(key, [0.0, 0.0, 0.0])
                acc[0], acc[1], acc[2] = acc[0] + dot, acc[1] + d2, acc[2] + v2
    cos = {key: _cos(*acc) for key, acc in groups.items()}
    report = {
        "finetuned": finetuned, "base": base, "vector": str(vector), "vector_meta": meta,
        "overall": cos["overall"],
        "task_vector_norm": math.sqrt(groups["overall"][1]),
        "per_module": {k.split(":", 1)[1]: v for k, v in cos.items() if k.startswith("module:")},
        "per_layer": {k.split(":", 1)[1]: v for k, v in cos.items() if k.startswith("layer:") and k != "layer:None"},
        "per_tensor": rows,
    }
    if chart:
        plot_monitor(report, Path(chart))
        report["chart"] = str(chart)
    if json_file:
        write_json(Path(json_file), report)
    return report


def plot_monitor(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [2, 1]})
    modules = sorted({r["module"] for r in report["per_tensor"] if r["layer"] is not None})
    for module in modules:
        points = sorted((r["layer"], r["cosine"]) for r in report["per_tensor"] if r["module"] == module)
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=module)
    left.axhline(0, color="grey", linewidth=0.8)
    left.set_xlabel("layer")
    left.set_ylabel("cosine(θ_ft − θ_base, w)")
    left.legend(fontsize=7, ncol=2)
    names = sorted(report["per_module"])
    right.barh(names, [report["per_module"][n] for n in names])
    right.axvline(0, color="grey", linewidth=0.8)
    right.set_xlabel("cosine per module")
    fig.suptitle(f"Weight monitoring: overall cosine {report['overall']:.3f}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_monitor(report: dict) -> None:
    print(f"fine-tune {report['finetuned']} vs base {report['base']}, vector {report['vector']}")
    print(f"overall cosine: {report['overall']:.4f} (task vector norm {report['task_vector_norm']:.4g})")
    print("| module | cosine |\n|---|---|")
    for module, value in sorted(report["per_module"].items()):
        print(f"| {module} | {value:.4f} |")
    print("| layer | cosine |\n|---|---|")
    for layer, value in sorted(report["per_layer"].items(), key=lambda kv: int(kv[0])):
        print(f"| {layer} | {value:.4f} |")
    if report.get("chart"):
        print(f"chart: {report['chart']}")
