"""Last-token residual activations of every decoder layer, as running means.

Each decoder layer gets a forward hook that reads its raw output (the residual
stream after that layer) at the last prompt position. `hidden_states` from
`output_hidden_states=True` is not used: its last entry is taken after the
final norm, which would silently rescale the last layer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pipeline.io.chat import auto_batch_size, batched, encode_batch, format_prompts, input_device

log = logging.getLogger(__name__)


@dataclass
class RunningMean:
    """Float64 sums, so memory does not grow with the number of prompts."""

    total: torch.Tensor | None = None
    count: int = 0

    def add(self, batch: torch.Tensor) -> None:
        summed = batch.to(torch.float64).sum(0).cpu()
        self.total = summed if self.total is None else self.total + summed
        self.count += batch.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("no activations collected")
        return self.total / self.count


@dataclass
class Activations:
    """Per-layer mean residual ([layers, hidden], float64) and optional per-prompt samples."""

    mean: torch.Tensor
    count: int
    samples: torch.Tensor | None = None  # [n, layers, hidden] float32, only when kept
    tokens: int = 0


def _unsort(rows: torch.Tensor, order: list[int]) -> torch.Tensor:
    out = torch.empty_like(rows)
    out[torch.tensor(order)] = rows
    return out


def decoder_layers(model) -> Sequence[torch.nn.Module]:
    return model.get_decoder().layers


class _LastTokenHooks:
    """Forward hooks capturing each layer's output at the last position."""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        self.captured: list[torch.Tensor | None] = [None] * len(layers)
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, index: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            # clone: a view would keep the layer's whole output alive until the next batch
            self.captured[index] = hidden[:, -1, :].detach().clone()

        return hook

    def stacked(self) -> torch.Tensor:
        # Layers may sit on different devices under device_map="auto".
        return torch.stack([t.to("cpu", torch.float32) for t in self.captured], dim=1)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class PrefillCapture(_LastTokenHooks):
    """Each layer's residual at the last prompt position during generation's first (prefill) pass.

    Generation reads every prompt once anyway: capturing there gives the measurement activations
    and the reply (to filter prompts by behaviour) for the price of the generation alone.
    """

    def __init__(self, model):
        super().__init__(decoder_layers(model))

    def _hook(self, index: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[1] > 1:  # the prompt pass; decoding steps see one token
                self.captured[index] = hidden[:, -1, :].detach().clone()

        return hook

    def take(self) -> list[torch.Tensor]:
        """One [layers, hidden] float32 row per prompt of the batch just generated."""
        return list(self.stacked())

    def __enter__(self) -> PrefillCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.inference_mode()
def collect(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int | None = None,
    keep_samples: bool = False,
    desc: str = "activations",
) -> Activations:
    """Mean last-token residual after every decoder layer over `prompts`."""
    batch_size = batch_size or auto_batch_size(model)
    texts = format_prompts(tokenizer, prompts)
    # Similar lengths in a batch waste less compute on padding; means do not depend on order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    texts = [texts[i] for i in order]
    device = input_device(model)
    hooks = _LastTokenHooks(decoder_layers(model))
    running, samples, tokens = RunningMean(), [], 0
    try:
        for chunk in tqdm(list(batched(texts, batch_size)), desc=desc, leave=False):
            enc = encode_batch(tokenizer, chunk, device)
            tokens += int(enc["attention_mask"].sum())
            # The logits are not needed: run the decoder stack only.
            model.get_decoder()(**enc, use_cache=False)
            acts = hooks.stacked()
            running.add(acts)
            if keep_samples:
                samples.append(acts)
    finally:
        hooks.remove()
    return Activations(
        mean=running.mean,
        count=running.count,
        samples=_unsort(torch.cat(samples), order) if samples else None,
        tokens=tokens,
    )
