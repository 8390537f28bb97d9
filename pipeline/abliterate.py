"""The weight edit: remove a direction from every tensor that writes to the residual stream.

For a tensor W whose axis `a` runs along the hidden (residual) dimension and a
unit direction r:

* standard / projected: W' = W - s * r (rᵀW) along axis a. At s = 1 every
  vector W writes into the residual stream is orthogonal to r.
* norm-preserving: each vector along the hidden axis (for a Linear [hidden,
  in]: each column, the write of one input feature; for the embedding: each
  row, one token) has r removed with strength s and is then rescaled to its
  original norm. We preserve the norm of the write vectors, not of rows of
  W, because those vectors are what the edit rotates: the magnitude each input
  feature adds to the residual stream stays the same, only its direction turns
  away from r (at s = 1, rᵀW' = 0 exactly as in the standard edit).

Two ways to apply it, same tensors out: in memory on a loaded model, and
streaming over safetensors shards, one tensor at a time.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.architectures import WriterMatch, find_writers
from pipeline.kernels import PRESETS, ComponentKernel, layer_weights

log = logging.getLogger(__name__)

Method = Literal["standard", "projected", "norm-preserving"]


class EditConfig(BaseModel):
    """How the weights are edited."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Method = Field(
        "standard",
        description="standard, projected (direction orthogonal to the harmless mean), or norm-preserving.",
    )
    preset: Literal["conservative", "standard", "aggressive"] | None = Field(
        "standard", description="Kernel preset for attention and MLP; --attn-*/--mlp-* settings override it."
    )
    kernel: Literal["gaussian", "tent"] | None = Field(
        None, description="Kernel shape for both components (overrides the preset's shape)."
    )
    attn: ComponentKernel | None = Field(None, description="Kernel for attention output projections.")
    mlp: ComponentKernel | None = Field(None, description="Kernel for MLP (and expert) down projections.")
    embed_strength: float = Field(
        0.0, ge=0, le=2, description="Strength of the edit on the token embedding (0: untouched)."
    )
    per_layer: bool = Field(False, description="Use each layer's own direction instead of one direction for all.")

    @model_validator(mode="before")
    @classmethod
    def _merge_kernels(cls, data: Any) -> Any:
        """Partial --attn-*/--mlp-* settings refine the preset's kernel instead of replacing it."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        preset = data.get("preset", "standard")
        for comp in ("attn", "mlp"):
            base = PRESETS[preset][comp] if preset else ComponentKernel()
            given = data.get(comp)
            if isinstance(given, ComponentKernel):
                continue
            update = dict(given or {})
            if data.get("kernel") and "kind" not in update:
                update["kind"] = data["kernel"]
            try:
                data[comp] = ComponentKernel(**{**base.model_dump(), **update})
            except ValidationError as exc:
                err = exc.errors()[0]
                flag = f"--{comp}-" + "-".join(str(p) for p in err["loc"]).replace("_", "-")
                raise ValueError(f"{flag}: {err['msg']} (got {err.get('input')!r})") from None
        return data

    def kernels(self) -> dict[str, ComponentKernel]:
        return {"attn": self.attn, "mlp": self.mlp}


def strengths(cfg: EditConfig, num_layers: int) -> dict:
    """Per-layer strengths of each component: {"attn": [...], "mlp": [...], "embed": s}."""
    k = cfg.kernels()
    return {
        "attn": layer_weights(k["attn"], num_layers),
        "mlp": layer_weights(k["mlp"], num_layers),
        "embed": cfg.embed_strength,
    }


def strength_of(match: WriterMatch, plan: dict) -> float:
    if match.component == "embed":
        return plan["embed"]
    return plan[match.component][match.layer]


def direction_for(match: WriterMatch, directions: torch.Tensor) -> torch.Tensor:
    """One direction [hidden] for all, or per layer [layers, hidden] (embedding: layer 0)."""
    if directions.dim() == 1:
        return directions
    return directions[match.layer if match.layer is not None else 0]


def edit_tensor(
    weight: torch.Tensor, direction: torch.Tensor, hidden_axis: int, strength: float, norm_preserving: bool = False
) -> torch.Tensor:
    """The edited copy of `weight` (same dtype and shape)."""
    if strength == 0:
        return weight
    w = weight.to(torch.float32).movedim(hidden_axis, -1)
    r = direction.to(device=w.device, dtype=torch.float32)
    r = r / r.norm()
    coeff = w @ r  # [...]: component of each hidden-axis vector along r
    edited = w - strength * coeff.unsqueeze(-1) * r
    if norm_preserving:
        before = w.norm(dim=-1, keepdim=True)
        after = edited.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        edited = edited * (before / after)
    return edited.movedim(-1, hidden_axis).to(weight.dtype).contiguous()


@torch.no_grad()
def apply_in_memory(model, directions: torch.Tensor, cfg: EditConfig, num_layers: int, model_type: str) -> int:
    """Edit a loaded model in place; returns the number of tensors changed."""
    plan = strengths(cfg, num_layers)
    params = dict(model.named_parameters())
    changed = 0
    for match in find_writers(model_type, params):
        s = strength_of(match, plan)
        if s == 0:
            continue
        p = params[match.name]
        r = direction_for(match, directions)
        p.data.copy_(edit_tensor(p.data, r, match.hidden_axis, s, cfg.method == "norm-preserving"))
        changed += 1
    if cfg.embed_strength and getattr(model.config, "tie_word_embeddings", False):
        log.warning("embeddings are tied to the output head: the embedding edit also changes the logits")
    return changed


def shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    return files


def _data_offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """Start of the data section and each tensor's byte range, from the safetensors header."""
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    header.pop("__metadata__", None)
    return 8 + header_len, {name: tuple(info["data_offsets"]) for name, info in header.items()}


def _edit_shard(src: Path, dst: Path, directions, cfg: EditConfig, plan: dict, model_type: str) -> int:
    """Copy the shard, then overwrite the edited tensors' bytes in place.

    An edit keeps dtype and shape, so the header and every offset stay valid
    and untouched tensors stay byte-identical. Memory: one tensor at a time.
    """
    from safetensors import safe_open

    shutil.copyfile(src, dst)
    base, offsets = _data_offsets(src)
    changed = 0
    with safe_open(str(src), framework="pt") as f, open(dst, "r+b") as out:
        for m in find_writers(model_type, f.keys()):
            s = strength_of(m, plan)
            if not s:
                continue
            tensor = f.get_tensor(m.name)
            edited = edit_tensor(
                tensor, direction_for(m, directions), m.hidden_axis, s, cfg.method == "norm-preserving"
            )
            start, end = offsets[m.name]
            data = edited.reshape(-1).view(torch.uint8).numpy().tobytes()
            assert len(data) == end - start, f"size changed for {m.name}"
            out.seek(base + start)
            out.write(data)
            changed += 1
    return changed


def apply_streaming(
    src: Path, dst: Path, directions: torch.Tensor, cfg: EditConfig, num_layers: int, model_type: str
) -> int:
    """Edit a saved model shard by shard into `dst`: same shard names and index.

    Only residual-writing tensors are edited; every other tensor keeps its
    bytes. Peak memory is about one shard. Non-weight files are copied as-is.
    """
    from tqdm.auto import tqdm

    plan = strengths(cfg, num_layers)
    dst.mkdir(parents=True, exist_ok=True)
    shards = shard_files(src)
    if not shards:
        from pipeline.errors import UserError

        raise UserError(f"no .safetensors weights in '{src}': streaming needs safetensors shards")
    changed = 0
    for shard in tqdm(shards, desc="shards", leave=False):
        changed += _edit_shard(shard, dst / shard.name, directions, cfg, plan, model_type)
    for item in src.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and not (dst / item.name).exists():
            shutil.copy2(item, dst / item.name)
    return changed
