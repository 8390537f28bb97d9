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
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.edit.architectures import WriterMatch, find_writers
from pipeline.edit.kernels import PRESETS, ComponentKernel, layer_weights, placed
from pipeline.errors import UserError
from pipeline.io.output import weight_shards

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
    per_set: bool = Field(
        True, description="When directions were measured per harmful prompt set, remove all of them (their span)."
    )

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

    def widened(self, factor: float) -> EditConfig:
        """This edit with both kernels ``factor`` times wider (gaussian width, tent distance; clamped to
        their ranges). `choose_layer` tests it on shallow models, whose refusal spans more of the depth."""
        def wider(k: ComponentKernel) -> ComponentKernel:
            return k.model_copy(update={"width": min(5.0, k.width * factor), "distance": min(1.0, k.distance * factor)})

        return self.model_copy(update={"attn": wider(self.attn), "mlp": wider(self.mlp)})

    def is_preset(self) -> bool:
        """Whether the kernels are exactly the preset's (no --attn-*/--mlp-*/--kernel given)."""
        return self.preset is not None and self.kernels() == PRESETS[self.preset]

    def placed(self, fraction: float) -> EditConfig:
        """This edit with its kernels centred on the direction's layer (``fraction`` of the depth) where
        their position was left open."""
        return self.model_copy(update={"attn": placed(self.attn, fraction), "mlp": placed(self.mlp, fraction)})


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
    """What to remove from one tensor: a direction [hidden] for all layers, or per layer
    ([layers, hidden]: one direction each; [layers, k, hidden]: k orthonormal directions each).
    The embedding takes layer 0's."""
    if directions.dim() == 1:
        return directions
    return directions[match.layer if match.layer is not None else 0]


def orthonormal(vectors: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the rows of `vectors` [k, hidden], in order (Gram-Schmidt via QR)."""
    q, r = torch.linalg.qr(vectors.double().T)
    keep = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()
    q = q * torch.sign(r.diagonal())  # same orientation as the inputs
    return q.T[keep].to(vectors.dtype)


def edit_tensor(
    weight: torch.Tensor, direction: torch.Tensor, hidden_axis: int, strength: float, norm_preserving: bool = False
) -> torch.Tensor:
    """The edited copy of `weight` (same dtype and shape). `direction` is one vector [hidden], or k
    orthonormal rows [k, hidden] removed together (for orthonormal rows, removing them one after the
    other is the projection onto the complement of their span, also with norm preservation: a rescale
    keeps a zero component zero)."""
    if strength == 0:
        return weight
    if direction.dim() == 2:
        for row in direction:
            weight = edit_tensor(weight, row, hidden_axis, strength, norm_preserving)
        return weight
    axis = hidden_axis % weight.dim()
    # One float32 working copy in the original layout, updated in place: no
    # transposed temporaries, memory-order access (about 5x faster on CPU).
    w = weight.to(torch.float32, copy=True)
    r = direction.to(device=w.device, dtype=torch.float32)
    r = r / r.norm()
    shape = [1] * w.dim()
    shape[axis] = -1
    r_b = r.view(shape)
    coeff = torch.tensordot(w, r, dims=([axis], [0])).unsqueeze(axis)  # component along r
    before = w.norm(dim=axis, keepdim=True) if norm_preserving else None
    w.addcmul_(r_b, coeff, value=-strength)
    if before is not None:
        w.mul_(before / w.norm(dim=axis, keepdim=True).clamp_min(1e-12))
    return w.to(weight.dtype)


@torch.no_grad()
def apply_in_memory(model, directions: torch.Tensor, cfg: EditConfig, num_layers: int, model_type: str) -> int:
    """Edit a loaded model in place; returns the number of tensors that actually changed."""
    check_editable_in_memory(model)
    plan = strengths(cfg, num_layers)
    params = dict(model.named_parameters())
    changed = 0
    for match in find_writers(model_type, params):
        s = strength_of(match, plan)
        if s == 0:
            continue
        p = params[match.name]
        r = direction_for(match, directions)
        edited = edit_tensor(p.data, r, match.hidden_axis, s, cfg.method == "norm-preserving")
        if torch.equal(edited, p.data):  # e.g. a weight already orthogonal to r: not counted as changed
            log.info("%s: the edit leaves it unchanged", match.name)
            continue
        p.data.copy_(edited)
        # Offloaded or quantized weights can swallow the write (placeholders): then the saved
        # model would be the original while the summary claims an edit. Check the write took.
        if not torch.equal(p.data, edited):
            raise UserError(f"the in-memory edit of {match.name} did not take effect (offloaded or quantized "
                            "weights?): use --streaming to edit the saved shards")
        changed += 1
    if cfg.embed_strength and getattr(model.config, "tie_word_embeddings", False):
        log.warning("embeddings are tied to the output head: the embedding edit also changes the logits")
    return changed


def _data_offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """Start of the data section and each tensor's byte range, from the safetensors header."""
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    header.pop("__metadata__", None)
    return 8 + header_len, {name: tuple(info["data_offsets"]) for name, info in header.items()}


def _copy_range(src, dst, start: int, length: int) -> None:
    """Copy bytes between files, in the kernel (copy_file_range) when the OS offers it."""
    dst.flush()
    while length > 0:
        try:
            done = os.copy_file_range(src.fileno(), dst.fileno(), min(length, 1 << 30), start)
        except (AttributeError, OSError):
            done = 0
        if done <= 0:  # not supported here: plain reads and writes
            src.seek(start)
            chunk = src.read(min(length, 64 << 20))
            if not chunk:
                raise OSError("unexpected end of file")
            dst.write(chunk)
            done = len(chunk)
        start += done
        length -= done


def _edit_shard(src: Path, dst: Path, directions, cfg: EditConfig, plan: dict, model_type: str) -> int:
    """Write the shard once, in file order: header and untouched tensors as-is, edited tensors new.

    An edit keeps dtype and shape, so the header and every offset stay valid
    and untouched tensors stay byte-identical. The maths of the next edited
    tensor runs in a worker thread while the current bytes are written, so
    memory holds at most two edited tensors.
    """
    from concurrent.futures import ThreadPoolExecutor

    from safetensors import safe_open

    base, offsets = _data_offsets(src)
    edits = {m.name: m for m in find_writers(model_type, offsets) if strength_of(m, plan)}
    order = [(n, se) for n, se in sorted(offsets.items(), key=lambda kv: kv[1][0]) if n in edits]
    norm = cfg.method == "norm-preserving"
    with safe_open(str(src), framework="pt") as f, open(src, "rb") as raw, open(dst, "wb") as out:

        unchanged: list[str] = []

        def compute(name: str) -> torch.Tensor:
            m = edits[name]
            original = f.get_tensor(name)
            edited = edit_tensor(original, direction_for(m, directions), m.hidden_axis, strength_of(m, plan), norm)
            if torch.equal(edited, original):  # counted only when its bytes really change
                unchanged.append(name)
            return edited

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(compute, order[0][0]) if order else None
            _copy_range(raw, out, 0, base)
            pos = 0
            for i, (name, (start, end)) in enumerate(order):
                _copy_range(raw, out, base + pos, start - pos)
                edited = pending.result()
                pending = pool.submit(compute, order[i + 1][0]) if i + 1 < len(order) else None
                data = memoryview(edited.contiguous().reshape(-1).view(torch.uint8).numpy())
                if len(data) != end - start:
                    raise RuntimeError(f"edit changed the size of {name}")
                out.write(data)
                pos = end
            _copy_range(raw, out, base + pos, raw.seek(0, 2) - base - pos)
    return len(edits) - len(unchanged)


def apply_streaming(
    src: Path, dst: Path, directions: torch.Tensor, cfg: EditConfig, num_layers: int, model_type: str
) -> int:
    """Edit a saved model shard by shard into `dst`: same shard names and index.

    Only residual-writing tensors are edited; every other tensor keeps its
    bytes. Peak memory is about one shard. Of the other files only those that
    make the model loadable are copied (see `is_model_file`): the source's own
    card, evaluation or recipe must never be published as this model's.
    """
    from tqdm.auto import tqdm

    plan = strengths(cfg, num_layers)
    dst.mkdir(parents=True, exist_ok=True)
    shards = weight_shards(src)
    if not shards:
        raise UserError(f"no .safetensors weights in '{src}': streaming needs safetensors shards")
    changed = 0
    for shard in tqdm(shards, desc="shards", leave=False):
        changed += _edit_shard(shard, dst / shard.name, directions, cfg, plan, model_type)
    for item in src.iterdir():
        if item.is_file() and is_model_file(item.name) and not (dst / item.name).exists():
            shutil.copy2(item, dst / item.name)
    return changed


# What a saved model needs besides its weights: config, shard index, tokenizer, chat template and
# generation settings. Anything else in the source (README.md, eval_results.json, recipe.json,
# directions, licences of other repos...) describes the source, not the edited model.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "special_tokens_map.json",
               "added_tokens.json", "merges.txt", "tekken.json", "preprocessor_config.json", "processor_config.json")
MODEL_FILE_PREFIXES = ("tokenizer", "vocab.", "chat_template.")
MODEL_FILE_SUFFIXES = (".model", ".tiktoken")


def is_model_file(name: str) -> bool:
    """True for the non-weight files that `apply_streaming` copies from the source model."""
    return name in MODEL_FILES or name.startswith(MODEL_FILE_PREFIXES) or name.endswith(MODEL_FILE_SUFFIXES)


def check_editable_in_memory(model) -> None:
    """Refuse a loaded model whose weights cannot be edited in place (one line, pointing to --streaming).

    4-bit weights are packed integer bytes, and offloaded weights (device_map with CPU/disk offload)
    are placeholders on the `meta` device: an in-memory edit would crash or silently change nothing.
    Checked on the tensors themselves, so a model dequantized to float on loading passes.
    """
    packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise UserError(f"the model's weights are quantized (e.g. --load-in-4bit; {packed[0]}): they cannot be "
                        "edited in memory; use --streaming to edit the full-precision shards")
    offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise UserError(f"{len(offloaded)} weights are offloaded (device map with CPU/disk offload, e.g. "
                        f"{offloaded[0]}): they cannot be edited in memory; use --streaming instead")
