"""Which tensors write to the residual stream, per architecture, as data.

Every decoder layer adds two things to the residual stream: the attention output
projection and the MLP down projection (for a mixture of experts: every expert's
down projection, plus the shared expert's). The token embedding writes the
initial residual. Abliteration removes a direction from exactly these tensors.

Each `Writer` is a regex over a tensor name. The same table has to match

* `model.state_dict()` names as transformers 5 holds them in memory, where MoE
  experts are FUSED 3-D tensors (`mlp.experts.down_proj`) and multimodal
  models nest the text model as `model.language_model.layers.N`;
* the names inside saved safetensors files. `save_pretrained` writes the
  legacy layout by default (`save_original_format=True`): per-expert 2-D
  tensors (`mlp.experts.N.down_proj.weight`, mixtral's
  `block_sparse_moe.experts.N.w2.weight`) and, for gemma3,
  `language_model.model.layers.N`. Hub checkpoints use either layout.

So each architecture lists both forms, each with its own `hidden_axis`.
Patterns are matched with `re.fullmatch`; group `layer` is the decoder layer index.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from pipeline.errors import UserError

Component = Literal["embed", "attn", "mlp"]


@dataclass(frozen=True)
class Writer:
    """One residual-writing tensor (family) of an architecture.

    pattern: regex over a tensor name (state dict / safetensors), matched with
    `re.fullmatch`; group "layer" holds the decoder layer index when there is one.
    hidden_axis: the tensor axis that runs along the residual (hidden) dimension.
    """

    pattern: str
    component: Component
    hidden_axis: int


@dataclass(frozen=True)
class WriterMatch:
    name: str
    component: Component
    layer: int | None  # None for the embedding
    hidden_axis: int


# Text-only models: `model.layers.N`; a bare base model: `layers.N`; gemma3
# multimodal in memory: `model.language_model.layers.N`, on disk:
# `language_model.model.layers.N`. Vision towers (`vision_tower...`) never match.
_PREFIX = r"(?:model\.)?(?:language_model\.)?(?:model\.)?"
_LAYER = _PREFIX + r"layers\.(?P<layer>\d+)\."

# --- building blocks --------------------------------------------------------
# [vocab, hidden]
EMBED = Writer(_PREFIX + r"embed_tokens\.weight", "embed", 1)
# nn.Linear weight is [out=hidden, in]; its bias (llama attention_bias / gpt_oss) is [hidden].
ATTN_OUT = Writer(_LAYER + r"self_attn\.o_proj\.(?:weight|bias)", "attn", 0)
# dense MLP (also the dense layers of an MoE model: qwen `mlp_only_layers`); bias when mlp_bias.
MLP_DOWN = Writer(_LAYER + r"mlp\.down_proj\.(?:weight|bias)", "mlp", 0)

# Fused experts as transformers 5 holds them (and newer checkpoints store them):
# mixtral / qwen2_moe / qwen3_moe: down_proj is [experts, hidden, inter].
EXPERTS_FUSED_DOWN = Writer(_LAYER + r"mlp\.experts\.down_proj", "mlp", 1)
# Legacy per-expert checkpoint tensors (what save_pretrained writes): [hidden, inter].
EXPERTS_DOWN = Writer(_LAYER + r"mlp\.experts\.\d+\.down_proj\.weight", "mlp", 0)
MIXTRAL_EXPERTS_W2 = Writer(
    _LAYER + r"block_sparse_moe\.experts\.\d+\.w2\.weight", "mlp", 0
)
# qwen2_moe shared expert (scaled by a scalar sigmoid gate, still linear): [hidden, inter].
SHARED_EXPERT_DOWN = Writer(_LAYER + r"mlp\.shared_expert\.down_proj\.weight", "mlp", 0)
# gpt_oss stores its experts transposed, in memory and on disk alike:
# down_proj [experts, inter, hidden], down_proj_bias [experts, hidden].
GPT_OSS_EXPERTS_DOWN = Writer(_LAYER + r"mlp\.experts\.down_proj", "mlp", 2)
GPT_OSS_EXPERTS_DOWN_BIAS = Writer(_LAYER + r"mlp\.experts\.down_proj_bias", "mlp", 1)
# gemma3 multimodal: soft image tokens = norm(pooled vision) @ W, W is
# [vision_hidden, text_hidden]; they replace embeddings at image positions.
GEMMA3_MM_PROJECTION = Writer(
    r"(?:model\.)?multi_modal_projector\.mm_input_projection_weight", "embed", 1
)

_DENSE = (EMBED, ATTN_OUT, MLP_DOWN)
_QWEN_MOE = (*_DENSE, EXPERTS_FUSED_DOWN, EXPERTS_DOWN)

ARCHITECTURES: dict[str, tuple[Writer, ...]] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    "phi3": _DENSE,  # fused qkv_proj / gate_up_proj are readers; o_proj / down_proj as usual
    "gemma2": _DENSE,
    "gemma3_text": _DENSE,
    "gemma3": (*_DENSE, GEMMA3_MM_PROJECTION),
    "mixtral": (EMBED, ATTN_OUT, EXPERTS_FUSED_DOWN, MIXTRAL_EXPERTS_W2),
    "qwen2_moe": (*_QWEN_MOE, SHARED_EXPERT_DOWN),
    "qwen3_moe": _QWEN_MOE,
    "gpt_oss": (EMBED, ATTN_OUT, GPT_OSS_EXPERTS_DOWN, GPT_OSS_EXPERTS_DOWN_BIAS),
}

# Tensors that write to the residual stream but cannot be edited as stored
# (quantized blocks): a checkpoint holding them must be refused, not half-edited.
UNEDITABLE: dict[str, tuple[tuple[str, str], ...]] = {
    "gpt_oss": (
        (
            _LAYER + r"mlp\.experts\.down_proj_(?:blocks|scales)",
            "MXFP4-quantized experts; use a dequantized (bf16) checkpoint",
        ),
    ),
}


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def model_type_of(config: Any) -> str:
    return config.model_type


def writers_for(model_type: str) -> tuple[Writer, ...]:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(supported_model_types())
        raise UserError(
            f"unsupported architecture {model_type!r}; supported: {supported}"
        ) from None


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def find_writers(model_type: str, names: Iterable[str]) -> list[WriterMatch]:
    """The residual writers among `names`, in the order given.

    A name matches at most one writer (the first in the table). Raises
    `UserError` for an unknown architecture or a tensor that cannot be edited.
    """
    writers = writers_for(model_type)
    uneditable = UNEDITABLE.get(model_type, ())
    matches: list[WriterMatch] = []
    for name in names:
        for pattern, why in uneditable:
            if _compiled(pattern).fullmatch(name):
                raise UserError(f"cannot edit {name} ({model_type}): {why}")
        for writer in writers:
            m = _compiled(writer.pattern).fullmatch(name)
            if m is None:
                continue
            layer = m.groupdict().get("layer")
            matches.append(
                WriterMatch(
                    name=name,
                    component=writer.component,
                    layer=None if layer is None else int(layer),
                    hidden_axis=writer.hidden_axis,
                )
            )
            break
    return matches


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    if callable(get):
        return get()
    return getattr(config, "text_config", None) or config


def num_layers_of(config: Any) -> int:
    """Decoder layers of the language model (multimodal configs: their text_config)."""
    return int(_text_config(config).num_hidden_layers)


def hidden_size_of(config: Any) -> int:
    """Residual width of the language model (multimodal configs: their text_config)."""
    return int(_text_config(config).hidden_size)
