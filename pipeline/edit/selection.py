"""Choosing measurement prompts and the direction's layer by the base model's own behaviour.

Two questions decide whether an abliteration does anything on a real model, and neither can be
answered by a threshold tuned on one model:

- *Which prompts measure the direction?* Only those the base model treats as labelled: a
  "harmful" prompt it answers anyway carries no refusal, and a "harmless" one it refuses carries
  some. A short greedy reply of each measurement prompt decides (as the refusal-direction paper's
  code filters its sets).
- *Which layer's direction?* Every layer across the middle of the depth is a candidate. Each
  candidate's edit is applied to the loaded weights and reverted (`WeightEdits`) and scored cheaply in
  one forward pass: the log-probability the edited model still gives to the base model's *own*
  refusal prefix on held-out harmful prompts, and the first-token KL on harmless ones. The few best
  then generate, and the one that removes the most refusals (in steps of 5 points, so noise does not
  win) with the least KL is chosen (`pipeline.edit.directions.choose_layer`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.io.chat import batched, format_prompts, input_device, prepare_tokenizer

log = logging.getLogger(__name__)
REFUSAL_TOKENS = 4  # tokens of the base's refusal scored under ablation ("I'm sorry,")
MIN_REFUSED = 4


@dataclass(frozen=True)
class Measured:
    """Prompts with their last-token residuals and (when generated) the base's replies."""

    prompts: tuple[str, ...]
    samples: torch.Tensor  # [n, layers, hidden] float32
    replies: tuple[tuple[int, ...], ...] | None = None  # reply token ids, when generated
    refused: tuple[bool, ...] | None = None

    def subset(self, keep: Sequence[bool]) -> Measured:
        idx = [i for i, k in enumerate(keep) if k]
        return Measured(
            tuple(self.prompts[i] for i in idx),
            self.samples[idx],
            None if self.replies is None else tuple(self.replies[i] for i in idx),
            None if self.refused is None else tuple(self.refused[i] for i in idx),
        )


def replies_with_activations(
    model: Any, tokenizer: Any, prompts: Sequence[str], tokens: int, batch_size: int | None = None
) -> Measured:
    """Short greedy replies, whether each is a refusal, and the residuals read during the same pass."""
    from pipeline.edit.activations import PrefillCapture
    from pipeline.evaluation.evaluate import classify, decode_reply, generate_tokens, is_refusal, load_markers

    # The prompts end with the template's empty think block (as in evaluation), so a reasoning model's
    # residuals and replies are read where its answer starts.
    with PrefillCapture(model) as capture:
        pairs = generate_tokens(model, tokenizer, list(prompts), tokens, batch_size, after_batch=capture.take)
    markers = load_markers()
    replies = tuple(tuple(r) for r, _ in pairs)
    refused = tuple(is_refusal(classify(decode_reply(tokenizer, r), markers)) for r in replies)
    return Measured(tuple(prompts), torch.stack([a for _, a in pairs]), replies, refused)


def keep_labelled(harmful: Measured, harmless: Measured) -> tuple[Measured, Measured, dict[str, Any]]:
    """The harmful prompts the base refused and the harmless ones it answered."""
    kept_h = harmful.subset(harmful.refused)
    if len(kept_h.prompts) < MIN_REFUSED:
        raise UserError(
            f"the base model refused only {len(kept_h.prompts)} of {len(harmful.prompts)} harmful measurement "
            "prompts: there is no refusal to measure (give prompts it refuses with --harmful, or "
            "--no-filter-prompts)"
        )
    kept_b = harmless.subset([not x for x in harmless.refused])
    if len(kept_b.prompts) < MIN_REFUSED:
        log.warning("the base model refused most harmless prompts: measuring on all of them")
        kept_b = harmless
    record = {
        "harmful": {"kept": len(kept_h.prompts), "of": len(harmful.prompts)},
        "harmless": {"kept": len(kept_b.prompts), "of": len(harmless.prompts)},
    }
    log.info("measurement prompts kept: harmful %d/%d, harmless %d/%d", len(kept_h.prompts),
             len(harmful.prompts), len(kept_b.prompts), len(harmless.prompts))
    return kept_h, kept_b, record


@torch.inference_mode()
def refusal_logprob(
    model: Any, tokenizer: Any, prompts: Sequence[str], refusals: Sequence[Sequence[int]],
    batch_size: int = 32, k: int = REFUSAL_TOKENS,
) -> float:
    """Mean over prompts of the log-probability of the base's own refusal prefix (its first k tokens).

    The joint probability, not a per-token mean: once the first token is forced, the rest of a refusal
    is likely whatever the direction does, so the decision sits in the first tokens.
    """
    prepare_tokenizer(tokenizer)
    texts = format_prompts(tokenizer, prompts)  # with the template's empty think block, as the replies were made
    rows = [
        (tokenizer(t, add_special_tokens=False)["input_ids"], list(r[:k]))
        for t, r in zip(texts, refusals, strict=True)
        if len(r)
    ]
    device, pad = input_device(model), tokenizer.pad_token_id
    total, count = 0.0, 0
    for chunk in batched(sorted(rows, key=lambda x: len(x[0]) + len(x[1])), batch_size):
        width = max(len(p) + len(r) for p, r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, r) in enumerate(chunk):
            seq = p + r
            ids[i, width - len(seq):] = torch.tensor(seq)
            mask[i, width - len(seq):] = 1
        keep = max(len(r) for _, r in chunk) + 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                       logits_to_keep=keep).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # position j predicts token j+1 of the kept tail
        for i, (_, r) in enumerate(chunk):
            target = torch.tensor(r, device=logp.device)
            row = logp[i, keep - 1 - len(r):]
            total += float(row.gather(-1, target[:, None]).sum())
            count += 1
    return total / max(1, count)


class WeightEdits:
    """Apply an edit to the loaded model's residual writers and restore them, bit for bit, afterwards.

    Layers are tested with the weight edit itself, not with hooks that ablate the direction from the
    residual stream: the hooks also remove what the embedding and the attention sinks hold along the
    direction, which the edit leaves alone, and on real models their KL has little to do with the edit's.
    """

    def __init__(self, model: Any, edit: Any) -> None:
        from pipeline.edit.architectures import find_writers, model_type_of, num_layers_of

        self.model, self.edit = model, edit
        self.num_layers, self.model_type = num_layers_of(model.config), model_type_of(model.config)
        params = dict(model.named_parameters())
        matches = find_writers(self.model_type, params)
        self.params = {m.name: params[m.name] for m in matches if edit.embed_strength or m.component != "embed"}
        self.saved = {name: p.detach().to("cpu", copy=True) for name, p in self.params.items()}

    @contextmanager
    def applied(self, direction: torch.Tensor, layer: int, edit: Any = None) -> Iterator[None]:
        """The edit of ``direction`` taken at ``layer``, its kernels centred there as the written edit's are
        (``edit`` replaces this object's edit for once; it must touch no more tensors)."""
        from pipeline.edit.abliterate import apply_in_memory

        edit = (edit or self.edit).placed(layer / max(1, self.num_layers - 1))
        try:
            apply_in_memory(self.model, direction, edit, self.num_layers, self.model_type)
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.data.copy_(self.saved[name])


def candidate_layers(num_layers: int, min_depth: float, max_depth: float) -> list[int]:
    """Layers whose fraction of depth lies in [min_depth, max_depth] (at least one)."""
    last = max(1, num_layers - 1)
    lo, hi = math.ceil(min_depth * last - 1e-9), math.floor(max_depth * last + 1e-9)
    layers = [i for i in range(num_layers) if lo <= i <= hi]
    return layers or [min(num_layers - 1, max(0, round((min_depth + max_depth) / 2 * last)))]
