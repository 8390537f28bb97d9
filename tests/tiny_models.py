"""Tiny random models of every supported architecture, built offline from configs.

`tiny_model(model_type)` returns a freshly initialised `PreTrainedModel` with a few
layers and a small hidden size (seeded, so two calls give the same weights);
`save_tiny(model_type, path)` saves one into several safetensors shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

VOCAB = 256
HIDDEN = 64
LAYERS = 2

_DENSE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 96,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,  # heads * head_dim = 32 != hidden, so o_proj is not square
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

_MOE: dict[str, Any] = {"num_experts_per_tok": 2, "moe_intermediate_size": 48}

# model_type -> config overrides on top of _DENSE.
_OVERRIDES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {},
    "phi3": {"head_dim": None},  # phi3 derives head_dim from hidden / heads
    "gemma2": {
        "query_pre_attn_scalar": 8,
        "sliding_window": 8,
        "tie_word_embeddings": True,
    },
    "gemma3_text": {
        "query_pre_attn_scalar": 8,
        "sliding_window": 8,
        "tie_word_embeddings": True,
    },
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**_MOE, "num_experts": 4, "shared_expert_intermediate_size": 80},
    "qwen3_moe": {**_MOE, "num_experts": 4},
    "gpt_oss": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "intermediate_size": 48,
        "sliding_window": 8,
        "max_position_embeddings": 131072,  # matches its default YaRN factor (no warning)
    },
}

TINY_MODEL_TYPES: list[str] = [*_OVERRIDES, "gemma3"]


def tiny_config(model_type: str, **overrides: Any):
    """The config of `tiny_model(model_type)`; `overrides` go to the (text) config."""
    if model_type == "gemma3":
        text = {**_DENSE, **_OVERRIDES["gemma3_text"], **overrides}
        vision = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        }
        return AutoConfig.for_model(
            "gemma3",
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=4,
            boi_token_index=VOCAB - 3,
            eoi_token_index=VOCAB - 2,
            image_token_index=VOCAB - 1,
            tie_word_embeddings=True,
        )
    if model_type not in _OVERRIDES:
        raise KeyError(
            f"no tiny model for {model_type!r}; known: {', '.join(TINY_MODEL_TYPES)}"
        )
    kwargs = {**_DENSE, **_OVERRIDES[model_type], **overrides}
    kwargs = {k: v for k, v in kwargs.items() if not (k == "head_dim" and v is None)}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random model of `model_type` in float32 and eval mode."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    # gemma3 (multimodal config) -> Gemma3ForConditionalGeneration via the auto class.
    model = AutoModelForCausalLM.from_config(config)
    return model.float().eval()


def save_tiny(
    model_type: str, path: str | Path, max_shard_size: str = "200KB", seed: int = 0
) -> Path:
    """Save `tiny_model(model_type, seed)` into `path` as several safetensors shards."""
    path = Path(path)
    tiny_model(model_type, seed).save_pretrained(path, max_shard_size=max_shard_size)
    return path


TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
# model_type -> (special tokens, in id order: pad 0, bos 1, eos 2, ...; added plain tokens; template file).
# The ids match `_DENSE` (pad 0, bos 1, eos 2), so generation stops where the real model's would.
CHAT_TOKENS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "qwen3": (("<|endoftext|>", "<|im_start|>", "<|im_end|>"), ("<think>", "</think>"), "qwen3.jinja"),
    "gpt_oss": (("<|endoftext|>", "<|startoftext|>", "<|return|>", "<|start|>", "<|end|>", "<|message|>",
                 "<|channel|>", "<|call|>", "<|constrain|>"), (), "gpt_oss.jinja"),
}


def tiny_chat_tokenizer(model_type: str, corpus: list[str] | None = None):
    """A small byte-level BPE tokenizer with the model family's special tokens and its real chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, plain, template = CHAT_TOKENS[model_type]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(corpus or ["Tell me about the water cycle and volcanoes, please."], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token=specials[0], bos_token=specials[1],
                                  eos_token=specials[2])
    tok.add_tokens(list(plain))
    tok.chat_template = (TEMPLATES / template).read_text()
    return tok


def tiny_chat_model(model_type: str, seed: int = 0):
    """A tiny random `model_type` model with a tokenizer that carries its family's real chat template."""
    tok = tiny_chat_tokenizer(model_type)
    return tiny_model(model_type, seed, vocab_size=len(tok)), tok
