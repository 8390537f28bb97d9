"""LoRA tuning with TRL + PEFT: DPO on preference pairs, SFT on prompt/completion data.

`tune` trains a LoRA adapter (DPO: the reference is the same model with the adapter
disabled, so no second copy is held), then writes the merged model (default) or the
adapter alone into the output-folder contract (`recipe.json`, `eval_results.json`,
tokenizer). The same code runs in one process or under ``accelerate launch`` (DDP,
DeepSpeed, FSDP): every process trains, the main process writes the output.

    python -m pipeline.tune MODEL --data SPEC --out DIR [...]      # same as `python -m pipeline tune`
    accelerate launch --config_file configs/accelerate/ddp.yaml -m pipeline.tune MODEL --data SPEC --out DIR

`heal` is abliterate-then-tune (after the NeuralDaredevil recipe): pairs from the base and the
abliterated model, then (by default) distillation on the abliterated model (`pipeline.tuning.distill`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.edit.stages import PromptsConfig
from pipeline.errors import UserError
from pipeline.io.loading import (
    LoadConfig,
    free_memory,
    is_gguf,
    load_causal_lm,
    load_model,
    load_tokenizer,
    local_path,
    model_kwargs,
    unquantized,
)
from pipeline.io.output import EVAL_FILE, RECIPE_FILE, check_target, staged_folder, write_json, write_recipe
from pipeline.progress import Progress, say
from pipeline.tuning.pairs import TrainingData, load_training_data, to_conversational

log = logging.getLogger(__name__)

DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")
SFT_LOSSES = ("nll", "dft")
ADAPTER_DIR = "adapter"


class TuneConfig(BaseModel):
    """How to tune (DPO or SFT with a LoRA adapter)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["dpo", "sft", "distill"] = Field(
        "dpo", description="dpo: preference pairs; sft: prompt/completion data; distill (healing only): match the "
        "base's next-token distributions on harmless prompts, keep the model's own on harmful ones.")
    loss: Literal[DPO_LOSSES + SFT_LOSSES] | None = Field(
        None, description="Loss: for dpo sigmoid, hinge, ipo, ... (TRL's loss_type); for sft nll or dft. "
        "Default: sigmoid for dpo, nll for sft.")
    beta: float = Field(0.1, gt=0, description="DPO beta: how far the model may move from the reference.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (the update is scaled by alpha / rank).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str = Field(
        "all-linear", description="Modules that get an adapter: all-linear, or comma-separated names (q_proj,v_proj).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (of the LoRA adapter: full "
                                 "fine-tuning would use ~100x less).")
    epochs: float = Field(1.0, gt=0, description="Passes over the data (ignored when --max-steps is given).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides --epochs and --min-steps.")
    max_examples: int | None = Field(
        None, ge=1, description="Use at most this many examples of the data set (the first ones); default: all.")
    min_steps: int = Field(30, ge=1, description="With --epochs, train at least this many optimizer steps: a few "
                           "dozen pairs make one or two steps an epoch, too few to move a model.")
    batch_size: int = Field(4, ge=1, description="Examples per device per forward pass.")
    grad_accum: int = Field(4, ge=1, description="Forward passes accumulated per optimizer step.")
    max_length: int = Field(1024, ge=8, description="Tokens per sequence (prompt + completion); longer ones are cut.")
    warmup: float = Field(0.0, ge=0, description="Learning-rate warm-up: a fraction of the steps (< 1) or a count.")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Learning-rate schedule.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory (large models).")
    bf16: bool | None = Field(None, description="bfloat16 mixed precision; default: on when the GPU supports it.")
    adapter_only: bool = Field(False, description="Write only the LoRA adapter instead of the merged model.")
    keep_adapter: bool = Field(False, description="With a merged model, also keep the adapter in OUT/adapter.")
    logging_steps: int = Field(10, ge=1, description="Log the training loss every N steps.")
    seed: int = Field(0, description="Seed of the adapter initialisation and the data order.")

    @model_validator(mode="after")
    def _loss_matches_method(self) -> TuneConfig:
        allowed = {"dpo": DPO_LOSSES, "sft": SFT_LOSSES, "distill": ()}[self.method]
        if self.loss is not None and self.loss not in allowed:
            raise ValueError(f"--loss {self.loss} is not a {self.method} loss: use one of {', '.join(allowed)}")
        return self

    @property
    def effective_loss(self) -> str:
        return self.loss or {"dpo": "sigmoid", "sft": "nll", "distill": "forward_kl"}[self.method]

    def lora(self):
        from peft import LoraConfig

        names = self.target_modules.strip()
        targets: str | list[str] = names if names == "all-linear" else [n.strip() for n in names.split(",") if n]
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")


@contextmanager
def quiet_renames() -> Iterator[None]:
    """TRL 1.16 and PEFT 0.21 still read transformers' renamed `is_gradient_checkpointing`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield



def check_eval_inputs(model_id: str, prompts_cfg: PromptsConfig | None, eval_cfg) -> None:
    """Resolve the evaluation prompts and markers now, so bad input fails before any training."""
    from pipeline.edit.stages import resolve_prompts
    from pipeline.evaluation import evaluate as ev

    resolve_prompts(model_id, prompts_cfg or PromptsConfig())
    cfg = eval_cfg or ev.EvalConfig()
    ev.markers_for(cfg)
    if cfg.perplexity and cfg.perplexity_file and not Path(cfg.perplexity_file).is_file():
        raise UserError(f"perplexity text not found: {cfg.perplexity_file}")


def trainer_args(cfg: TuneConfig, output_dir: Path):
    """DPOConfig / SFTConfig for this machine: CPU without bf16, no reports, no checkpoints."""
    import torch
    from trl import DPOConfig, SFTConfig

    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    common: dict[str, Any] = dict(
        output_dir=str(output_dir), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1, lr_scheduler_type=cfg.scheduler, warmup_steps=cfg.warmup, seed=cfg.seed,
        data_seed=cfg.seed, logging_steps=cfg.logging_steps, save_strategy="no", report_to="none",
        use_cpu=not cuda, bf16=bf16, fp16=False, activation_checkpointing=cfg.gradient_checkpointing,
        max_length=cfg.max_length, disable_tqdm=not log.isEnabledFor(logging.INFO),
    )
    if cfg.method == "dpo":
        return DPOConfig(**common, beta=cfg.beta, loss_type=[cfg.effective_loss])
    if cfg.method == "distill":  # GKD off-policy (lmbda 0) with beta 0: KL(teacher || student) per token
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*trl.experimental.*")
            from trl.experimental.gkd import GKDConfig
        return GKDConfig(**common, lmbda=0.0, beta=0.0, temperature=1.0)
    return SFTConfig(**common, loss_type=cfg.effective_loss)


def to_dataset(data: TrainingData, tokenizer: Any, method: str):
    from datasets import Dataset

    if data.kind != method:
        need = "prompt/chosen/rejected" if method == "dpo" else "prompt/completion"
        raise UserError(f"--method {method} needs {need} data, and {data.source!r} holds {data.kind} data")
    return Dataset.from_list([to_conversational(ex, tokenizer) for ex in data.examples])


def _step_reporter(progress: Progress | None):
    """A trainer callback that reports each logged step and its loss (the Space shows them as they come)."""
    from transformers import TrainerCallback

    class StepReporter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and state.is_world_process_zero:
                say(progress, f"step {state.global_step} of {state.max_steps}: loss {float(logs['loss']):.4f}")

    return StepReporter()


def set_steps(args: Any, cfg: TuneConfig, examples: int) -> None:
    """Optimizer steps from --epochs (scaled with the data, never below --min-steps) unless --max-steps."""
    if cfg.max_steps is None:
        per_step = cfg.batch_size * cfg.grad_accum * max(1, args.world_size)
        args.max_steps = max(cfg.min_steps, math.ceil(cfg.epochs * examples / per_step))


def train_adapter(
    model_id: str, data: TrainingData, cfg: TuneConfig, work: Path, load: LoadConfig = LoadConfig(),
    progress: Progress | None = None,
) -> tuple[Path, bool]:
    """Train a LoRA adapter into ``work/adapter``; returns it and whether this is the main process.

    Under ``accelerate launch`` every process runs this; the trainer gathers sharded
    (ZeRO-3 / FSDP) weights when saving, and only the main process writes.
    """
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer, SFTTrainer

    args = trainer_args(cfg, work / "trainer")  # first: DeepSpeed ZeRO-3 must see it before the model loads
    if not log.isEnabledFor(logging.INFO):
        import datasets

        datasets.disable_progress_bars()
    path = local_path(model_id, load)
    tokenizer = load_tokenizer(path, load)
    dataset = to_dataset(data, tokenizer, cfg.method)
    set_steps(args, cfg, len(dataset))
    kwargs = model_kwargs(load)
    if args.distributed_state.distributed_type != "NO":
        kwargs.pop("device_map", None)  # the trainer places each process's copy
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    trainer_cls = DPOTrainer if cfg.method == "dpo" else SFTTrainer
    with quiet_renames():
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=cfg.lora(), callbacks=[_step_reporter(progress)])
        say(progress, f"training a LoRA adapter ({cfg.method}, {len(dataset)} examples)")
        result = trainer.train()
    say(progress, f"trained {result.global_step} steps, loss {result.training_loss:.4f}")
    adapter = work / ADAPTER_DIR
    trainer.save_model(str(adapter))
    trainer.accelerator.wait_for_everyone()
    main = trainer.is_world_process_zero()
    del trainer, model
    free_memory()
    return adapter, main


def base_reference_id(model_id: str, load: LoadConfig) -> str:
    """What the adapter config names as its base: the Hub id, or the resolved local folder."""
    from pipeline.io.loading import is_demo

    path = Path(model_id).expanduser()
    return str(local_path(model_id, load).resolve()) if is_demo(model_id) or path.is_dir() else model_id


def _save_adapter(model, folder: Path, base_ref: str) -> None:
    model.peft_config["default"].base_model_name_or_path = base_ref
    model.save_pretrained(str(folder))
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's own card is broken; the pipeline writes the card


def tune_recipe(model_id: str, cfg: TuneConfig, data: TrainingData, load: LoadConfig, prompts, extra: dict) -> dict:
    datasets = [data.source] if data.hub else []
    if prompts is not None:
        datasets += [d for d in prompts.hub_datasets() if d not in datasets]
    return {
        "kind": cfg.method,
        "base_model": model_id,
        "base_revision": load.revision,
        "method": cfg.method,
        "parameters": {**cfg.model_dump(mode="json"), "loss": cfg.effective_loss},
        "data": data.record(),
        "prompts": prompts.record() if prompts is not None else None,
        "datasets": datasets,
        "seed": cfg.seed,
        **extra,
    }


def _reference(model, tokenizer, prompts, eval_cfg, model_id: str, eval_base: str | None, load: LoadConfig):
    """The base side of the evaluation: ``eval_base`` when given, else ``model`` with its adapter disabled."""
    from pipeline.edit.stages import base_reference

    if eval_base:
        if is_gguf(eval_base, load):  # abliterate-then-heal of a GGUF model: its base is the GGUF file
            loaded = load_model(eval_base, unquantized(load))
            base, base_tok = loaded.model, loaded.tokenizer
        else:
            base = load_causal_lm(eval_base, unquantized(load))
            base_tok = load_tokenizer(local_path(eval_base, load), load)
        ref = base_reference(base, base_tok, prompts, eval_cfg, eval_base)
        del base
        free_memory()
        return ref
    with model.disable_adapter():
        return base_reference(model, tokenizer, prompts, eval_cfg, model_id)


def write_tuned(
    model_id: str, adapter: Path, out: Path, cfg: TuneConfig, data: TrainingData, load: LoadConfig = LoadConfig(),
    prompts_cfg: PromptsConfig | None = None, eval_cfg=None, evaluate: bool = True, eval_base: str | None = None,
    overwrite: bool = False, recipe_extra: dict | None = None, extra_files: dict[str, Path] | None = None,
    progress: Progress | None = None,
) -> dict:
    """Base + trained adapter -> the output folder (merged model or adapter), recipe, evaluation."""
    from peft import PeftModel

    from pipeline.edit.stages import evaluate_model, resolve_prompts

    load_plain = unquantized(load)  # merging needs unquantized weights
    tokenizer = load_tokenizer(local_path(model_id, load), load)
    with quiet_renames():
        model = PeftModel.from_pretrained(load_causal_lm(model_id, load_plain), str(adapter))
    model.eval()
    prompts = resolve_prompts(eval_base or model_id, prompts_cfg or PromptsConfig()) if evaluate else None
    results = None
    with staged_folder(out, overwrite) as tmp:
        reference = None
        if evaluate:
            say(progress, "evaluating the base model")
            reference = _reference(model, tokenizer, prompts, eval_cfg, model_id, eval_base, load)
        base_ref = base_reference_id(model_id, load)
        if cfg.adapter_only:
            _save_adapter(model, tmp, base_ref)
            final = model
        else:
            if cfg.keep_adapter:
                _save_adapter(model, tmp / ADAPTER_DIR, base_ref)
            final = model.merge_and_unload()
            final.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        for name, source in (extra_files or {}).items():
            shutil.copy(source, tmp / name)
        extra = {"adapter_only": cfg.adapter_only, **(recipe_extra or {})}
        rec = write_recipe(tmp, tune_recipe(model_id, cfg, data, load, prompts, extra))
        if evaluate:
            say(progress, "evaluating the tuned model")
            results = evaluate_model(final, tokenizer, prompts, eval_cfg, reference, str(out), eval_base or model_id)
            write_json(tmp / EVAL_FILE, results)
    say(progress, f"wrote {out}")
    return {"out": str(out), "recipe": rec, "eval": results}


def tune(
    model_id: str, data: str | TrainingData, out: Path, cfg: TuneConfig = TuneConfig(),
    load: LoadConfig = LoadConfig(), prompts_cfg: PromptsConfig | None = None, eval_cfg=None,
    evaluate: bool = True, eval_base: str | None = None, overwrite: bool = False, data_split: str = "train",
    recipe_extra: dict | None = None, extra_files: dict[str, Path] | None = None,
    progress: Progress | None = None,
) -> dict | None:
    """Train and write one tuned model; returns a summary on the main process, None on the others."""
    out = Path(out)
    check_target(out, overwrite)
    if cfg.method == "distill":
        raise UserError("--method distill heals an abliterated model against its base: use abliterate --heal")
    if isinstance(data, str):
        data = load_training_data(data, cfg.method, split=data_split, limit=cfg.max_examples)
    if evaluate:
        check_eval_inputs(eval_base or model_id, prompts_cfg, eval_cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.train-", dir=out.parent))  # one per process
    try:
        adapter, main = train_adapter(model_id, data, cfg, work, load, progress)
        if not main:
            return None
        return write_tuned(model_id, adapter, out, cfg, data, load, prompts_cfg, eval_cfg, evaluate, eval_base,
                           overwrite, recipe_extra, extra_files, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# Measured on Qwen2.5-Coder-0.5B and on a toy it was not tuned on (pipeline/tuning/distill.py, docs/tuning.md):
# 87 heal pairs make 11 steps of 8, so the floor of 20 steps is about two passes.
HEAL = TuneConfig(method="distill", learning_rate=1e-4, grad_accum=2, min_steps=20)


def heal(
    abliterated: str | Path, base_model: str, out: Path, cfg: TuneConfig = HEAL, *, data: str | None = None,
    load: LoadConfig = LoadConfig(), prompts_cfg: PromptsConfig | None = None, eval_cfg=None,
    evaluate: bool = True, overwrite: bool = False, max_new_tokens: int = 64, progress: Progress | None = None,
) -> dict | None:
    """Abliterate-then-heal: a short LoRA run on the abliterated model, evaluated against the original base.

    Without ``data``, the pairs come from the measurement prompts (`pipeline.tuning.pairs.heal_pairs`): on
    harmful ones the abliterated answer is chosen over the base's refusal, on harmless ones the base's
    answer over the abliterated model's where they differ. Distillation (the default) matches the base's
    token distributions on the harmless ones and the abliterated model's own on the harmful ones; SFT trains
    on the chosen side, DPO on the pairs (both moved the KL the wrong way on Qwen2.5: docs/tuning.md). The pairs
    are kept in ``OUT/heal_pairs.jsonl``; the abliteration recipe (with its evaluation, when it was
    evaluated) is kept under ``abliteration``.
    """
    from pipeline.edit.stages import resolve_prompts
    from pipeline.io.output import read_json, write_jsonl
    from pipeline.tuning.pairs import heal_pairs

    out, abliterated = Path(out), str(abliterated)
    check_target(out, overwrite)
    if cfg.method == "distill" and data is not None:
        raise UserError("distillation heals with the pairs it makes from the base and the abliterated model: drop "
                        "--data, or heal with --method sft or dpo")
    prompts_cfg = prompts_cfg or PromptsConfig()
    pairs_info = None
    if data is None:
        prompts = resolve_prompts(base_model, prompts_cfg)
        rows, stats = heal_pairs(base_model, abliterated, prompts.harmful.measure, prompts.harmless.measure, load,
                                 max_new_tokens, progress=progress)
        say(progress, f"{stats['pairs']} pairs: {stats['refusal_pairs']} where the base refused and the abliterated "
                      f"model answers, {stats['harmless_pairs']} harmless ones pulling it back to the base")
        pairs_file = out.parent / f".{out.name}.heal_pairs.jsonl"
        write_jsonl(rows, pairs_file)
        data, pairs_info = str(pairs_file), stats
    recipe_file, eval_file = Path(abliterated) / RECIPE_FILE, Path(abliterated) / EVAL_FILE
    extra = {
        "base_model": base_model,  # the card's base: the model before abliteration
        "tuned_model": abliterated,
        "abliteration": read_json(recipe_file) if recipe_file.is_file() else None,
        "abliteration_eval": read_json(eval_file) if eval_file.is_file() else None,
        "heal_pairs": pairs_info,
    }
    try:
        training = load_training_data(data if cfg.method == "dpo" else f"{data}:chosen", "dpo" if cfg.method == "dpo"
                                      else "sft")
        if pairs_info is not None:  # generated here: name the copy kept in the output folder
            training = dataclasses.replace(training, source="heal_pairs.jsonl")
        files = {"heal_pairs.jsonl": Path(data)} if pairs_info is not None else None
        if cfg.method == "distill":
            own = rows[: stats["refusal_pairs"]], rows[stats["refusal_pairs"]:]
            return _distill(abliterated, base_model, out, cfg, own, training, load, prompts_cfg, eval_cfg,
                            evaluate, overwrite, extra, files, progress)
        return tune(abliterated, training, out, cfg, load, prompts_cfg, eval_cfg, evaluate, base_model, overwrite,
                    recipe_extra=extra, extra_files=files, progress=progress)
    finally:
        if pairs_info is not None:
            Path(data).unlink(missing_ok=True)


def _distill(
    abliterated: str, base_model: str, out: Path, cfg: TuneConfig, rows: tuple[list, list], training: TrainingData,
    load: LoadConfig, prompts_cfg: PromptsConfig, eval_cfg, evaluate: bool, overwrite: bool, extra: dict,
    files: dict[str, Path] | None, progress: Progress | None,
) -> dict:
    """Heal by distillation (`pipeline.tuning.distill`): ``rows`` are (refusal pairs, harmless pairs)."""
    from pipeline.tuning.distill import distill_dataset, train_distilled

    if evaluate:
        check_eval_inputs(base_model, prompts_cfg, eval_cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.train-", dir=out.parent))
    try:
        args = trainer_args(cfg, work / "trainer")
        dataset = distill_dataset(rows[0] + rows[1], len(rows[0]))
        set_steps(args, cfg, len(dataset))
        with quiet_renames():
            adapter = train_distilled(abliterated, base_model, dataset, args, cfg.lora(), work / ADAPTER_DIR, load,
                                      [_step_reporter(progress)], progress)
        return write_tuned(abliterated, adapter, out, cfg, training, load, prompts_cfg, eval_cfg, evaluate,
                           base_model, overwrite, extra, files, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
