"""Fit measured refusal directions to the edit that removes them, aiming at the same strength for less KL.

A mean difference over a few dozen prompts points partly along what harmless prompts use too, and removing that
part costs KL without removing more refusal: on Qwen2.5-Coder-0.5B the directions measured from three draws of
the same prompt sets cost up to five times each other's KL at equal strength (bench/README.md). `fit_directions`
starts from the measured span at the chosen layer and moves it by gradient steps, with the edit applied as hooks
on the residual writers (the edit's own per-layer strengths, the standard method's projection), to lower the
first-token KL against the base on the harmless measurement prompts while the harmful measurement prompts keep
the plain edit's own next-token distributions along its greedy replies (the plain edit is the teacher). Only
measurement prompts are used, so the evaluation (and the search's parts) stay unseen.

An earlier objective (the base's refusal openings no more likely than under the plain edit) was gamed: the model
went on refusing in other words. Keeping the plain edit's whole distribution along its compliant replies leaves no
such way out. On Qwen2.5-Coder-0.5B, at 1.2 times the plain edit's weights, the fitted span refused as many unseen
harmful prompts as the plain edit at 21% of its KL where the measured directions were poor (seed-1 draw), and 8
against 9 of 96 at equal KL where they were good (seed 0; bench/README.md).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from pipeline.edit import directions as dirs
from pipeline.edit.abliterate import EditConfig, orthonormal, strength_of, strengths
from pipeline.edit.architectures import find_writers
from pipeline.evaluation.evaluate import generate_tokens, kl_per_prompt
from pipeline.io.chat import format_prompts, input_device, prepare_tokenizer
from pipeline.io.loading import Loaded

log = logging.getLogger(__name__)
Say = Callable[[str], None]


def writer_hooks(model: Any, edit: EditConfig, num_layers: int) -> list[tuple[torch.nn.Module, float]]:
    """The modules whose outputs the edit changes, with their strengths; empty when a writer is not a module of
    its own (e.g. experts stored as one tensor), where an output hook would not match the weight edit."""
    plan = strengths(edit, num_layers)
    modules = dict(model.named_modules())
    out = []
    for match in find_writers(model.config.model_type, [n for n, _ in model.named_parameters()]):
        s = strength_of(match, plan)
        module = modules.get(match.name.rsplit(".", 1)[0])
        if not s:
            continue
        if not isinstance(module, torch.nn.Linear | torch.nn.Embedding) or match.name.endswith(".bias"):
            return []
        out.append((module, float(s)))
    return out


@contextmanager
def removing(hooks: list[tuple[torch.nn.Module, float]], basis: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Inside: each hooked module's output loses ``strength`` times its part in the span of ``basis()`` (orthonormal
    rows), as the standard weight edit does, differentiably in the basis."""
    state: dict[str, torch.Tensor] = {}

    def hook(strength: float) -> Callable:
        def remove(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            q = state["q"].to(output.dtype)
            return output - strength * (output @ q.T) @ q
        return remove

    handles = [m.register_forward_hook(hook(s)) for m, s in hooks]
    try:
        state["q"] = basis()
        yield
    finally:
        for h in handles:
            h.remove()


def _logprobs(model: Any, tokenizer: Any, rows: list[list[int]], keep: int) -> torch.Tensor:
    enc = tokenizer.pad({"input_ids": rows}, return_tensors="pt")
    device = input_device(model)
    logits = model(**{k: v.to(device) for k, v in enc.items()}, use_cache=False, logits_to_keep=keep).logits
    return torch.log_softmax(logits.float(), dim=-1)


def kl_along(model: Any, tokenizer: Any, rows: list[tuple[list[int], list[int]]],
             teacher: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(mean KL(teacher || model) per reply token, the model's log-probs at each reply token) along each reply
    after its prompt; the KL is 0 without a ``teacher`` (log-probs per row, as this returns them)."""
    logp = _logprobs(model, tokenizer, [p + r for p, r in rows], max(len(r) for _, r in rows) + 1)[:, :-1]
    own = [logp[b, logp.shape[1] - len(r):] for b, (_, r) in enumerate(rows)]
    if teacher is None:
        return logp.new_zeros(()), own
    return torch.stack([kl_per_prompt(t.float(), x).mean() for t, x in zip(teacher, own, strict=True)]).mean(), own


def first_token_kl(model: Any, tokenizer: Any, rows: list[list[int]], base: torch.Tensor) -> torch.Tensor:
    """Mean KL(base || model) of the first answer token over ``rows`` (``base``: their unedited log-probs)."""
    return kl_per_prompt(base, _logprobs(model, tokenizer, rows, 1)[:, -1]).mean()


def _chats(tokenizer: Any, prompts: Sequence[str], prefill_think: bool) -> list[list[int]]:
    return [tokenizer(c, add_special_tokens=False)["input_ids"] for c in format_prompts(tokenizer, prompts,
                                                                                         prefill_think=prefill_think)]


def _batches(n: int, size: int, rng: random.Random) -> list[int]:
    return rng.sample(range(n), min(size, n))


def _scores(model: Any, tokenizer: Any, hooks: list, q: torch.Tensor, replies: list, teacher: list, harmless: list,
            base: torch.Tensor, size: int) -> tuple[float, float]:
    """(KL to the plain edit along its replies, harmless first-token KL) of the span ``q`` over all the fitting
    prompts."""
    with torch.no_grad(), removing(hooks, lambda: q):
        held = sum(float(kl_along(model, tokenizer, replies[i:i + size], teacher[i:i + size])[0]) *
                   len(replies[i:i + size]) for i in range(0, len(replies), size)) / len(replies)
        kl = sum(float(first_token_kl(model, tokenizer, harmless[i:i + size], base[i:i + size])) *
                 len(harmless[i:i + size]) for i in range(0, len(harmless), size)) / len(harmless)
    return held, kl


def _teacher(model: Any, tokenizer: Any, hooks: list, q: torch.Tensor, prompts: Sequence[str], chats: list,
             reply_tokens: int, size: int, prefill_think: bool) -> tuple[list, list]:
    """The plain edit's greedy replies to ``prompts`` (rows: chat ids, reply ids) and its log-probs along them."""
    with torch.no_grad(), removing(hooks, lambda: q):
        said = generate_tokens(model, tokenizer, list(prompts), reply_tokens, size, prefill_think)
        replies = [(c, r) for c, r in zip(chats, said, strict=True) if r]
        teacher = [x.to(torch.bfloat16) for i in range(0, len(replies), size)
                   for x in kl_along(model, tokenizer, replies[i:i + size])[1]]
    return replies, teacher


def fit_directions(loaded: Loaded, d: dirs.Directions, edit: EditConfig, harmful: Sequence[str],
                   harmless: Sequence[str], steps: int, learning_rate: float, batch_size: int = 8,
                   weight: float = 4.0, seed: int = 0, prefill_think: bool = True, reply_tokens: int = 12,
                   say: Say | None = None) -> dirs.Directions:
    """``d`` with its span at the suggested layer fitted to ``edit`` (the plain edit: kernels, strengths) on the
    measurement prompts; ``d`` itself when there is nothing to fit (per-layer edits, writers that are not modules,
    no reply to fit to). Each step: first-token KL against the base on ``batch_size`` harmless prompts plus
    ``weight`` times the KL against the plain edit along its own greedy replies (``reply_tokens``) to as many
    harmful prompts."""
    from pipeline.edit import stages

    say = say or log.info
    model, tokenizer = loaded.model, loaded.tokenizer
    direction, _, placed = stages.chosen_direction(d, "best", edit)
    hooks = writer_hooks(model, placed, d.num_layers) if not edit.per_layer else []
    if steps < 1 or not hooks:
        if steps >= 1:
            say("fitting the directions: not possible for this edit or architecture; the measured ones are used")
        return d
    prepare_tokenizer(tokenizer)
    start = (direction[0] if direction.dim() == 3 else direction[None]).double()
    replies, teacher = _teacher(model, tokenizer, hooks, start.float(), harmful,
                                _chats(tokenizer, harmful, prefill_think), reply_tokens, batch_size, prefill_think)
    if len(replies) < 2:
        say("fitting the directions: the plain edit gave fewer than two replies to fit to; the measured ones are used")
        return d
    plain = _chats(tokenizer, harmless, prefill_think)
    with torch.no_grad():
        base = torch.cat([_logprobs(model, tokenizer, plain[i:i + batch_size], 1)[:, -1]
                          for i in range(0, len(plain), batch_size)])
    before = _scores(model, tokenizer, hooks, start.float(), replies, teacher, plain, base, batch_size)
    rows = torch.nn.Parameter(start.clone())

    def basis() -> torch.Tensor:
        return orthonormal(rows).float()

    grads = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        _descend(model, tokenizer, hooks, basis, rows, (replies, teacher), (plain, base), steps, learning_rate,
                 batch_size, weight, seed, say)
    finally:
        for p, g in zip(model.parameters(), grads, strict=True):
            p.requires_grad_(g)
    with torch.no_grad():
        q = basis()
    after = _scores(model, tokenizer, hooks, q, replies, teacher, plain, base, batch_size)
    say(f"fitted the directions in {steps} steps: on the measurement prompts KL to the plain edit on harmful "
        f"prompts {before[0]:.4f} -> {after[0]:.4f}, KL to the base on harmless ones {before[1]:.4f} -> {after[1]:.4f}")
    return _with_span(d, q, {"steps": steps, "learning_rate": learning_rate, "weight": weight,
                             "harmful": len(replies), "harmless": len(plain), "reply_tokens": reply_tokens,
                             "held": [before[0], after[0]], "kl": [before[1], after[1]]})


def _descend(model: Any, tokenizer: Any, hooks: list, basis: Callable[[], torch.Tensor], rows: torch.nn.Parameter,
             harmful: tuple[list, list], harmless: tuple[list, torch.Tensor], steps: int, learning_rate: float,
             batch_size: int, weight: float, seed: int, say: Say) -> None:
    (replies, teacher), (plain, base) = harmful, harmless
    rng = random.Random(seed)
    opt = torch.optim.Adam([rows], lr=learning_rate)
    for step in range(steps):
        with removing(hooks, basis):
            hi = _batches(len(replies), batch_size, rng)
            held, _ = kl_along(model, tokenizer, [replies[i] for i in hi], [teacher[i] for i in hi])
            bi = _batches(len(plain), batch_size, rng)
            kl = first_token_kl(model, tokenizer, [plain[i] for i in bi], base[bi])
            loss = kl + weight * held
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            rows.div_(rows.norm(dim=1, keepdim=True))
        if step % 10 == 9 or step == steps - 1:
            say(f"fitting the directions: step {step + 1}/{steps}, batch KL to the plain edit {held.item():.4f}, "
                f"to the base {kl.item():.4f}")


def _with_span(d: dirs.Directions, q: torch.Tensor, record: dict[str, Any]) -> dirs.Directions:
    """A copy of ``d`` whose directions at the suggested layer span ``q`` (k orthonormal rows)."""
    layer = d.suggested_layer
    info = {**d.info, "fit": record}
    if d.set_directions is not None and len(d.set_directions) == len(q):
        sets = d.set_directions.clone()
        sets[:, layer] = q
        return replace(d, set_directions=sets, info=info)
    pooled = d.directions.clone()
    pooled[layer] = q[0]
    projected = d.projected.clone()
    projected[layer] = dirs.project_out_harmless(q[0], d.harmless_mean[layer])
    return replace(d, directions=pooled, projected=projected, info=info)
