"""Healing by distillation: the abliterated model, through a LoRA adapter, learns the base model's
next-token distributions on harmless prompts and keeps its own (the adapter disabled) on harmful ones.

Why distributions and not answers: SFT on the base's greedy answers trains on hard targets and sharpens
the model's distributions. On Qwen2.5-Coder-0.5B it drove the first-token KL to the base from 0.056 up to
2.5 (30 steps) or 0.22 (6 steps at a quarter of the rate). TRL's generalized JSD loss with beta 0 is
KL(teacher || student) per completion token, the direction the evaluation measures; with the base as the
only teacher the refusals came back (9.4% -> 25%), so harmful prompts get the abliterated model itself as
their teacher (docs/tuning.md has the measurements).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from pipeline.io.loading import LoadConfig, free_memory, load_causal_lm, load_model, load_tokenizer, local_path
from pipeline.progress import Progress, say

log = logging.getLogger(__name__)

OWN = "own"  # dataset column: True where the abliterated model is its own teacher


def distill_dataset(rows: list[dict[str, str]], own: int):
    """Conversations of the heal pairs' chosen answers; the first ``own`` rows (the refusal pairs) keep the
    abliterated model's distributions, the rest learn the base's. The smaller group is repeated until both
    weigh the same: with the harmless ones in the majority (57 to 30 on Qwen2.5) refusals crept back."""
    from datasets import Dataset

    def example(r: dict[str, str], keep: bool) -> dict:
        return {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
                OWN: keep}

    groups = [[example(r, True) for r in rows[:own]], [example(r, False) for r in rows[own:]]]
    size = max(len(g) for g in groups)
    return Dataset.from_list([g[i % len(g)] for g in groups if g for i in range(size)])


def _trainer_class():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trl.experimental.*")
        from trl.experimental.gkd import GKDTrainer

    import torch

    class TwoTeacherTrainer(GKDTrainer):
        """GKD with a teacher per example: the base model, or the student with its adapter disabled."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            own = inputs.pop(OWN)
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            student = model(input_ids=ids, attention_mask=mask)
            self.teacher_model.eval()
            with torch.no_grad():
                teacher = self.teacher_model(input_ids=ids, attention_mask=mask).logits
                if own.any():
                    with model.disable_adapter():
                        itself = model(input_ids=ids, attention_mask=mask).logits
                    teacher = torch.where(own.to(teacher.device)[:, None, None], itself, teacher)
            loss = self.generalized_jsd_loss(student_logits=student.logits[:, :-1], teacher_logits=teacher[:, :-1],
                                             labels=inputs["labels"][:, 1:], beta=self.beta,
                                             num_items_in_batch=num_items_in_batch)
            return (loss, student) if return_outputs else loss

    return TwoTeacherTrainer


def _collator(tokenizer: Any, max_length: int):
    import torch
    from trl.experimental.utils import DataCollatorForChatML

    chatml = DataCollatorForChatML(tokenizer=tokenizer, max_length=max_length)

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        return {**chatml(examples), OWN: torch.tensor([bool(e[OWN]) for e in examples])}

    return collate


def train_distilled(
    model_id: str, teacher_id: str, dataset, args, lora, adapter: Path, load: LoadConfig = LoadConfig(),
    callbacks: list | None = None, progress: Progress | None = None,
) -> Path:
    """Train the LoRA adapter of ``model_id`` against ``teacher_id`` (a GGUF file works) into ``adapter``."""
    from pipeline.io.loading import unquantized

    path = local_path(model_id, load)
    tokenizer = load_tokenizer(path, load)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_causal_lm(model_id, unquantized(load))
    teacher = load_model(teacher_id, unquantized(load)).model
    trainer = _trainer_class()(model=model, teacher_model=teacher, args=args, train_dataset=dataset,
                               processing_class=tokenizer, peft_config=lora, callbacks=callbacks,
                               data_collator=_collator(tokenizer, args.max_length))
    say(progress, f"distilling into a LoRA adapter ({len(dataset)} examples, {sum(dataset[OWN])} of them on "
                  "harmful prompts, where the model keeps its own answers)")
    result = trainer.train()
    say(progress, f"trained {result.global_step} steps, loss {result.training_loss:.4f}")
    trainer.save_model(str(adapter))
    del trainer, model, teacher
    free_memory()
    return adapter
