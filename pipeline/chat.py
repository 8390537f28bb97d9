"""Prompt formatting and batching shared by measurement, evaluation and tuning."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

log = logging.getLogger(__name__)


def format_prompts(tokenizer, prompts: Sequence[str], system: str | None = None) -> list[str]:
    """Wrap each prompt in the chat template with the generation prompt.

    A tokenizer without a chat template gets the plain prompt (with a warning),
    so base models can still be measured.
    """
    if not getattr(tokenizer, "chat_template", None):
        log.warning("tokenizer has no chat template: using plain prompts")
        return list(prompts)
    texts = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return texts


def prepare_tokenizer(tokenizer):
    """Left padding (so the last prompt token sits at position -1) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_batch(tokenizer, texts: Sequence[str], device) -> dict:
    # The chat template already holds any BOS token; adding another shifts activations.
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items()}


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def auto_batch_size(model) -> int:
    """Prompts per batch when none is given (measurement and evaluation alike).

    On a CPU, 32 for small models and 4 for big ones (activations of 32 long prompts of a 7B model do
    not fit in a desktop's memory); on a GPU, from its free memory, up to 128 (generation gains little
    beyond that).
    """
    import torch

    device = input_device(model)
    params = sum(p.numel() for p in model.parameters())
    if device.type != "cuda":
        return 32 if params < 5e8 else 4
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(128, free // max(1, params * 2) * 8)))


def input_device(model):
    """Device of the embedding: where inputs go, also under device_map='auto'."""
    return model.get_input_embeddings().weight.device
