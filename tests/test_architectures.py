"""The residual-writer table against real (tiny) transformers 5 models.

Discovery runs on both the in-memory state dict and the saved safetensors
names, because transformers 5 converts MoE experts and multimodal prefixes on
load and converts them back on save. The behavioural tests prove the table is
complete: with r removed from every writer by the edit itself (`apply_in_memory`, and
`apply_streaming` on the per-expert files), no layer output has a component along r.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from safetensors import safe_open

from pipeline.edit.abliterate import EditConfig, apply_in_memory, apply_streaming
from pipeline.edit.architectures import (
    ARCHITECTURES,
    WriterMatch,
    find_writers,
    hidden_size_of,
    model_type_of,
    num_layers_of,
    supported_model_types,
    writers_for,
)
from pipeline.errors import UserError
from tests.tiny_models import TINY_MODEL_TYPES, save_tiny, tiny_config, tiny_model

REQUIRED = {
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2",
    "gemma3_text", "gemma3", "phi3", "gpt_oss", "mixtral", "qwen2_moe",
}  # fmt: skip
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"}
# Names that look like residual writers; each must be matched (vision towers aside).
WRITER_LIKE = re.compile(r"embed_tokens|o_proj|down_proj|\.w2\.|mm_input_projection")


def _memory_shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _file_shapes(folder) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as fh:
            names = fh.keys()  # a safe_open handle is not iterable
            for name in names:
                shapes[name] = tuple(fh.get_slice(name).get_shape())
    return shapes


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model_type -> (config, tensor shapes in the saved safetensors files)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for model_type in TINY_MODEL_TYPES:
        folder = save_tiny(model_type, root / model_type)
        assert len(list(folder.glob("*.safetensors"))) > 1, "expected a sharded save"
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shapes = _file_shapes(folder)
        assert set(index["weight_map"]) == set(shapes)
        out[model_type] = (tiny_config(model_type), shapes)
    return out


def test_required_architectures_are_supported():
    assert supported_model_types() == sorted(ARCHITECTURES)
    assert set(supported_model_types()) >= REQUIRED
    assert set(TINY_MODEL_TYPES) >= REQUIRED


def _check_discovery(
    model_type: str, config, shapes: dict[str, tuple[int, ...]], source: str
) -> None:
    hidden = hidden_size_of(config)
    layers = num_layers_of(config)
    matches = find_writers(model_type, shapes)
    matched = {m.name for m in matches}
    assert len(matched) == len(matches), "a name matched twice"

    # Nothing that looks like a writer is left out (the vision tower has its own residual).
    missed = [
        n
        for n in shapes
        if WRITER_LIKE.search(n) and n not in matched and "vision_tower" not in n
    ]
    assert not missed, (
        f"{model_type} ({source}): unmatched writer-like tensors {missed}"
    )

    # The hidden axis really is the residual width.
    for m in matches:
        shape = shapes[m.name]
        assert shape[m.hidden_axis] == hidden, (
            f"{m.name} {shape} axis {m.hidden_axis} != {hidden}"
        )

    embeds = [m for m in matches if m.component == "embed"]
    assert any("embed_tokens" in m.name for m in embeds)
    assert all(m.layer is None for m in embeds)

    by_component = {
        c: Counter(m.layer for m in matches if m.component == c)
        for c in ("attn", "mlp")
    }
    for component, per_layer in by_component.items():
        assert set(per_layer) == set(range(layers)), (
            f"{model_type} ({source}) {component}: {per_layer}"
        )
    assert {m.layer for m in matches if m.layer is not None} == set(range(layers))

    if model_type in MOE:
        experts = [m for m in matches if m.component == "mlp" and ".experts." in m.name]
        assert {m.layer for m in experts} == set(range(layers)), (
            f"{model_type} ({source}): no experts"
        )
        n_experts = getattr(config, "num_experts", None) or config.num_local_experts
        for m in experts:
            if len(shapes[m.name]) == 3:  # fused [E, ., .]
                assert shapes[m.name][0] == n_experts
        per_expert = [m for m in experts if re.search(r"\.experts\.\d+\.", m.name)]
        if per_expert:  # legacy layout: one 2-D tensor per expert and layer
            assert len(per_expert) == n_experts * layers


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_discovery_in_memory(model_type):
    model = tiny_model(model_type)
    assert model_type_of(model.config) == model_type
    _check_discovery(model_type, model.config, _memory_shapes(model), "memory")


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_discovery_in_saved_files(model_type, saved):
    config, shapes = saved[model_type]
    _check_discovery(model_type, config, shapes, "safetensors")


def test_moe_layouts_differ_between_memory_and_disk(saved):
    """The reason both layouts are in the table: transformers 5 fuses experts on load."""
    memory = set(_memory_shapes(tiny_model("qwen3_moe")))
    _, disk = saved["qwen3_moe"]
    assert "model.layers.0.mlp.experts.down_proj" in memory
    assert "model.layers.0.mlp.experts.0.down_proj.weight" in disk
    assert "model.layers.0.block_sparse_moe.experts.0.w2.weight" in saved["mixtral"][1]
    assert "model.language_model.layers.0.mlp.down_proj.weight" in set(
        _memory_shapes(tiny_model("gemma3"))
    )
    assert "language_model.model.layers.0.mlp.down_proj.weight" in saved["gemma3"][1]


def test_layer_index_and_axis_of_named_tensors():
    names = [
        "model.embed_tokens.weight",
        "model.layers.11.self_attn.o_proj.weight",
        "model.language_model.layers.3.mlp.down_proj.weight",
        "language_model.model.layers.4.self_attn.o_proj.weight",
        "model.vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "lm_head.weight",
    ]
    got = find_writers("gemma3", names)
    assert got == [
        WriterMatch("model.embed_tokens.weight", "embed", None, 1),
        WriterMatch("model.layers.11.self_attn.o_proj.weight", "attn", 11, 0),
        WriterMatch("model.language_model.layers.3.mlp.down_proj.weight", "mlp", 3, 0),
        WriterMatch(
            "language_model.model.layers.4.self_attn.o_proj.weight", "attn", 4, 0
        ),
    ]
    fused = find_writers(
        "gpt_oss",
        [
            "model.layers.2.mlp.experts.down_proj",
            "model.layers.2.mlp.experts.down_proj_bias",
        ],
    )
    assert [(m.layer, m.hidden_axis) for m in fused] == [(2, 2), (2, 1)]
    fused = find_writers(
        "qwen3_moe",
        [
            "model.layers.2.mlp.experts.down_proj",
            "model.layers.2.mlp.experts.7.down_proj.weight",
        ],
    )
    assert [(m.layer, m.hidden_axis) for m in fused] == [(2, 1), (2, 0)]


def test_unknown_architecture_is_a_one_line_user_error():
    with pytest.raises(UserError) as info:
        writers_for("foo")
    message = str(info.value)
    assert (
        message
        == f"unsupported architecture 'foo'; supported: {', '.join(supported_model_types())}"
    )
    assert "\n" not in message and "gemma2" in message and info.value.exit_code == 2
    with pytest.raises(UserError, match="unsupported architecture 'foo'"):
        find_writers("foo", ["model.embed_tokens.weight"])


def test_quantized_gpt_oss_experts_are_refused():
    with pytest.raises(UserError, match="MXFP4"):
        find_writers(
            "gpt_oss",
            [
                "model.embed_tokens.weight",
                "model.layers.0.mlp.experts.down_proj_blocks",
            ],
        )


def test_sizes_of_text_and_multimodal_configs():
    gemma3 = tiny_config("gemma3")
    assert model_type_of(gemma3) == "gemma3"
    assert num_layers_of(gemma3) == gemma3.text_config.num_hidden_layers == 2
    assert hidden_size_of(gemma3) == gemma3.text_config.hidden_size == 64
    assert gemma3.vision_config.hidden_size != 64
    llama = tiny_config("llama", num_hidden_layers=3)
    assert (num_layers_of(llama), hidden_size_of(llama)) == (3, 64)


# --- behaviour: the table is complete --------------------------------------------------


# Full strength on every layer and on the embedding: the edit then removes r from every writer exactly.
FULL = EditConfig(method="standard", preset=None, kernel="tent", embed_strength=1.0,
                  attn={"max_weight": 1.0, "min_weight": 1.0, "distance": 1.0},
                  mlp={"max_weight": 1.0, "min_weight": 1.0, "distance": 1.0}).placed(0.5)


def _random_biases(model, gen: torch.Generator) -> None:
    with torch.no_grad():  # biases start at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def _assert_no_r_in_residual(model, r: torch.Tensor, input_ids: torch.Tensor) -> None:
    after = _layer_outputs(model, input_ids)
    assert len(after) == num_layers_of(model.config)
    for i, h in enumerate(after):
        along = (h @ r).abs().max().item()
        assert along <= 1e-5 * h.norm(dim=-1).max().item(), f"layer {i}: |r.h| = {along}"


def _layer_outputs(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [
        layer.register_forward_hook(hook) for layer in model.get_decoder().layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        for handle in handles:
            handle.remove()
    return outputs


BEHAVIOUR_CASES = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("phi3", {}),
    ("mixtral", {}),
    ("qwen2_moe", {}),
    ("qwen3_moe", {}),
    ("qwen3_moe", {"mlp_only_layers": [1]}),
    ("gpt_oss", {}),
]


@pytest.mark.parametrize(("model_type", "overrides"), BEHAVIOUR_CASES)
def test_removing_a_direction_from_all_writers_removes_it_from_the_residual(
    model_type, overrides
):
    model = tiny_model(model_type, seed=1, **overrides)
    hidden = hidden_size_of(model.config)
    gen = torch.Generator().manual_seed(0)
    _random_biases(model, gen)
    r = torch.randn(hidden, generator=gen)
    r /= r.norm()
    input_ids = torch.randint(3, model.config.vocab_size - 3, (2, 7), generator=gen)

    before = _layer_outputs(model, input_ids)
    assert len(before) == num_layers_of(model.config)
    assert (
        max((h @ r).abs().max().item() for h in before) > 1e-3
    )  # r is there to begin with

    n, mt = num_layers_of(model.config), model_type_of(model.config)
    assert apply_in_memory(model, r, FULL, n, mt) > 0
    _assert_no_r_in_residual(model, r, input_ids)


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_streaming_edits_per_expert_files_like_the_loaded_model(model_type, tmp_path):
    """The saved files hold one tensor per expert (transformers 5 fuses them only on load): streaming edits
    those files, and the model loaded from its output has r removed from every layer's residual."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(model_type, seed=1)
    gen = torch.Generator().manual_seed(0)
    _random_biases(model, gen)
    model.save_pretrained(tmp_path / "src", max_shard_size="200KB")
    r = torch.randn(hidden_size_of(model.config), generator=gen)
    r /= r.norm()
    n, mt = num_layers_of(model.config), model_type_of(model.config)
    assert apply_streaming(tmp_path / "src", tmp_path / "dst", r, FULL, n, mt) > 0
    index = json.loads((tmp_path / "src" / "model.safetensors.index.json").read_text())
    if model_type != "gpt_oss":  # gpt_oss stores its experts fused on disk as well
        assert any(re.search(r"\.experts\.\d+\.", name) for name in index["weight_map"])

    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").float().eval()
    input_ids = torch.randint(3, model.config.vocab_size - 3, (2, 7), generator=gen)
    _assert_no_r_in_residual(streamed, r, input_ids)
    apply_in_memory(model, r, FULL, n, mt)
    loaded = dict(streamed.named_parameters())
    for name, param in model.named_parameters():
        assert torch.allclose(loaded[name], param, atol=1e-5), name
