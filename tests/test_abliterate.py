"""Edit maths on random tensors and on tiny saved models: in memory and streaming."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from pipeline.edit.abliterate import (
    EditConfig,
    apply_in_memory,
    apply_streaming,
    edit_tensor,
    orthonormal,
    strength_of,
    strengths,
)
from pipeline.edit.architectures import find_writers, hidden_size_of, model_type_of, num_layers_of
from pipeline.edit.kernels import ComponentKernel
from pipeline.io.output import weight_shards
from tests.tiny_models import save_tiny, tiny_model


def _unit(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, generator=g)
    return r / r.norm()


@pytest.mark.parametrize("shape,axis", [((64, 32), 0), ((100, 64), 1), ((4, 64, 16), 1), ((4, 16, 64), 2), ((64,), 0)])
def test_full_strength_removes_the_direction_along_the_hidden_axis(shape, axis):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    r = _unit(64)
    edited = edit_tensor(w, r, axis, 1.0)
    along = torch.tensordot(edited, r, dims=([axis], [0]))
    assert along.abs().max() < 1e-5
    # Nothing orthogonal to r changed.
    orth = edited - w
    coeff = torch.tensordot(w, r, dims=([axis], [0]))
    expected = -coeff.unsqueeze(-1) * r
    assert torch.allclose(orth.movedim(axis, -1), expected, atol=1e-5)


def test_partial_strength_scales_the_component():
    w = torch.randn(64, 32)
    r = _unit(64, 3)
    edited = edit_tensor(w, r, 0, 0.25)
    assert torch.allclose(r @ edited, 0.75 * (r @ w), atol=1e-5)


def test_zero_strength_is_identity():
    w = torch.randn(64, 32)
    assert edit_tensor(w, _unit(64), 0, 0.0) is w


def test_norm_preserving_keeps_each_write_vector_norm_and_removes_r():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(2))
    r = _unit(64, 5)
    edited = edit_tensor(w, r, 0, 1.0, norm_preserving=True)
    # Columns are the vectors written into the 64-dim residual stream.
    assert torch.allclose(edited.norm(dim=0), w.norm(dim=0), rtol=1e-5)
    assert (r @ edited).abs().max() < 1e-5
    # Embedding layout [vocab, hidden]: rows keep their norm.
    emb = torch.randn(100, 64)
    e2 = edit_tensor(emb, r, 1, 0.6, norm_preserving=True)
    assert torch.allclose(e2.norm(dim=1), emb.norm(dim=1), rtol=1e-5)
    assert ((e2 @ r).abs() < (emb @ r).abs() + 1e-6).all()


def test_edit_keeps_dtype_for_half_precision():
    w = torch.randn(64, 32).to(torch.bfloat16)
    out = edit_tensor(w, _unit(64), 0, 1.0)
    assert out.dtype == torch.bfloat16 and out.shape == w.shape
    assert (_unit(64) @ out.float()).abs().max() < 0.05


def test_kernel_overrides_refine_the_preset():
    cfg = EditConfig(preset="conservative", attn={"peak": 0.2}, kernel="tent")
    assert cfg.attn.peak == 0.2 and cfg.attn.kind == "tent" and cfg.attn.max_weight == 1.0
    assert cfg.mlp.kind == "tent"
    plan = strengths(EditConfig(mlp=ComponentKernel(kind="off")).placed(0.6), 6)
    assert plan["mlp"] == [0.0] * 6 and plan["attn"][3] == pytest.approx(1.0)
    assert plan["attn"][0] < plan["attn"][2] < plan["attn"][3] > plan["attn"][5]


def test_kernels_are_centred_on_the_directions_layer_unless_placed_explicitly():
    with pytest.raises(ValueError, match="no position yet"):
        strengths(EditConfig(), 24)
    plan = strengths(EditConfig().placed(18 / 23), 24)
    for comp in ("attn", "mlp"):
        assert max(range(24), key=plan[comp].__getitem__) == 18 and plan[comp][18] == pytest.approx(1.0)
        assert plan[comp][0] < 0.2 < plan[comp][12]  # the first layers, far from the direction, are spared
    tent = EditConfig(kernel="tent", mlp={"position": 0.25}).placed(0.75)
    assert (tent.attn.position, tent.mlp.position, tent.attn.peak) == (0.75, 0.25, None)


def _residual_after_layers(model, ids):
    captured = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: captured.append(o.detach())) for layer in model.get_decoder().layers
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return captured


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe", "gpt_oss"])
def test_in_memory_edit_makes_every_layer_output_orthogonal(model_type):
    model = tiny_model(model_type)
    r = _unit(hidden_size_of(model.config), 7)
    n = num_layers_of(model.config)
    cfg = EditConfig(embed_strength=1.0, attn=ComponentKernel(width=5), mlp=ComponentKernel(width=5)).placed(0.5)
    assert all(abs(s - 1.0) < 0.01 for s in strengths(cfg, n)["attn"])
    exact = EditConfig(
        embed_strength=1.0,
        attn=ComponentKernel(kind="tent", distance=1.0, min_weight=1.0),
        mlp=ComponentKernel(kind="tent", distance=1.0, min_weight=1.0),
    ).placed(0.5)
    changed = apply_in_memory(model, r, exact, n, model_type_of(model.config))
    assert changed >= 1 + 2 * n
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    for hidden in _residual_after_layers(model, ids):
        assert (hidden @ r).abs().max() < 1e-3 * hidden.abs().max()


def test_streaming_equals_in_memory_and_keeps_untouched_bytes(tmp_path):
    src = save_tiny("llama", tmp_path / "src", max_shard_size="60KB")
    assert len(weight_shards(src)) >= 3
    model = tiny_model("llama")
    r = _unit(hidden_size_of(model.config), 11)
    cfg = EditConfig(method="norm-preserving", preset="conservative", embed_strength=0.5).placed(0.4)
    n, mt = num_layers_of(model.config), model_type_of(model.config)
    apply_streaming(src, tmp_path / "dst", r, cfg, n, mt)
    apply_in_memory(model, r, cfg, n, mt)
    state = model.state_dict()
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    assert index == json.loads((src / "model.safetensors.index.json").read_text())
    plan = strengths(cfg, n)
    # every writer the plan gives a strength changes; one at strength 0 keeps its bytes like any other tensor
    should_change = {m.name: strength_of(m, plan) > 0 for m in find_writers(mt, index["weight_map"])}
    assert sum(should_change.values()) >= 5
    changed, untouched = set(), 0
    for shard in weight_shards(src):
        with safe_open(str(shard), "pt") as a, safe_open(str(tmp_path / "dst" / shard.name), "pt") as b:
            assert a.metadata() == b.metadata()
            for name in a.keys():
                before, after = a.get_tensor(name), b.get_tensor(name)
                assert torch.allclose(after, state[name], atol=1e-6), name
                if should_change.get(name):
                    if not torch.equal(before, after):
                        changed.add(name)
                else:
                    untouched += 1
                    assert before.numpy().tobytes() == after.numpy().tobytes(), name
    assert changed == {name for name, change in should_change.items() if change} and untouched > 0
    for extra in ("config.json", "generation_config.json"):
        assert (tmp_path / "dst" / extra).read_bytes() == (src / extra).read_bytes()


@pytest.mark.parametrize("norm_preserving", [False, True])
def test_several_directions_are_removed_together(norm_preserving):
    g = torch.Generator().manual_seed(7)
    raw = torch.randn(3, 64, generator=g)
    raw[2] = raw[0] + raw[1]  # dependent: the span has rank 2
    basis = orthonormal(raw)
    assert basis.shape == (2, 64)
    assert torch.allclose(basis @ basis.T, torch.eye(2), atol=1e-5)
    assert (raw[0] @ basis[0]) > 0  # same orientation as the first input
    w = torch.randn(64, 40, generator=g)
    edited = edit_tensor(w, basis, 0, 1.0, norm_preserving)
    # Every vector of the span, not only the basis rows, is gone from what the tensor writes.
    assert (raw @ edited).abs().max() < 1e-4
    assert (raw @ w).abs().max() > 1.0
    if norm_preserving:
        assert torch.allclose(edited.norm(dim=0), w.norm(dim=0), rtol=1e-5)
    else:
        # The standard edit is the projection onto the complement of the span.
        projector = torch.eye(64) - basis.T @ basis
        assert torch.allclose(edited, projector @ w, atol=1e-5)
