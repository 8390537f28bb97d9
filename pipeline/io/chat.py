"""Prompt formatting and batching shared by measurement, evaluation and tuning."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

log = logging.getLogger(__name__)

# What marks a reasoning template: a think block (Qwen3, DeepSeek-R1) or harmony channels (gpt-oss).
REASONING_MARKS = ("</think>", "<|channel|>")
_PROBE = [{"role": "user", "content": "Hi"}]
_SENTINEL = "ANSWER-4d1f"  # stands for the answer when rendering a finished assistant turn


def _render(tokenizer, messages: list[dict], generation: bool, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False, **kwargs)


def think_prefill(tokenizer) -> str:
    """The chat template's own empty reasoning block: the text it puts between the generation prompt
    and an answer given without thinking ("" for a template without reasoning).

    Read from the template itself, so no model family is hard-coded: Qwen3's ``enable_thinking=False``
    switch (``<think>\\n\\n</think>\\n\\n``), else the head the template renders before a finished
    answer (Qwen3-Thinking closes its opened block; gpt-oss opens its ``final`` channel).
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not any(m in template for m in (*REASONING_MARKS, "<think>")):
        return ""
    try:
        prompt = _render(tokenizer, _PROBE, True)
        off = _render(tokenizer, _PROBE, True, enable_thinking=False)
        if off.startswith(prompt) and "</think>" in off[len(prompt):]:
            return off[len(prompt):]
        answered = _render(tokenizer, [*_PROBE, {"role": "assistant", "content": _SENTINEL}], False)
    except Exception as err:  # noqa: BLE001 - a template that cannot render a probe gets no prefill
        log.warning("could not read the think block of the chat template (%s): no prefill", err)
        return ""
    head = answered.split(_SENTINEL)[0]
    extra = head[len(prompt):] if head.startswith(prompt) else ""
    return extra if any(m in extra for m in REASONING_MARKS) else ""


def format_prompts(tokenizer, prompts: Sequence[str], system: str | None = None,
                   prefill_think: bool = True) -> list[str]:
    """Wrap each prompt in the chat template with the generation prompt.

    With ``prefill_think`` (the default), a reasoning template's empty think block follows
    (`think_prefill`), so measurement, layer choice and evaluation all read the model where its
    answer starts. A tokenizer without a chat template gets the plain prompt (with a warning),
    so base models can still be measured.
    """
    if not getattr(tokenizer, "chat_template", None):
        log.warning("tokenizer has no chat template: using plain prompts")
        return list(prompts)
    prefill = think_prefill(tokenizer) if prefill_think else ""
    texts = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        texts.append(_render(tokenizer, messages, True) + prefill)
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

    On a CPU, 32 up to 3B parameters (a step over 32 prompts costs little more than over 4: the weights
    are read once a step either way; a dequantized GGUF of a 0.5B model counts its untied output head,
    0.63B), 8 up to 10B and 4 beyond (the key/value cache of 32 long prompts of a 7B model fills a
    desktop's memory); on a GPU, from its free memory, up to 128 (generation gains little beyond that).
    """
    import torch

    device = input_device(model)
    params = sum(p.numel() for p in model.parameters())
    if device.type != "cuda":
        return 32 if params < 3e9 else 8 if params < 1e10 else 4
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(128, free // max(1, params * 2) * 8)))


def input_device(model):
    """Device of the embedding: where inputs go, also under device_map='auto'."""
    return model.get_input_embeddings().weight.device
