"""The search's bench: the evaluation prompts split three ways, and the loaded model with the base model's side of
each part measured once, on which trials apply edits in place and revert them exactly."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from pipeline.edit import directions as dirs
from pipeline.edit import stages
from pipeline.edit.abliterate import EditConfig, apply_in_memory
from pipeline.edit.architectures import find_writers, model_type_of, num_layers_of
from pipeline.edit.direction_fit import fit_directions
from pipeline.edit.search_space import to_edit
from pipeline.errors import UserError
from pipeline.evaluation.evaluate import (
    EvalConfig,
    classify,
    evaluate,
    first_token_logprobs,
    is_refusal,
    kl_divergence,
    kl_per_prompt,
    markers_for,
    reference,
    require_base_refusals,
)
from pipeline.evaluation.likelihood import refusal_likelihood
from pipeline.io.loading import Loaded

if TYPE_CHECKING:  # search.py imports this module
    from pipeline.edit.search import SearchConfig


def held_out(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """(kept, held out) indices of ``n`` prompts: every 1/fraction-th is held out, so each of several
    concatenated prompt sets gives its share to both sides."""
    held = [i for i in range(n) if int((i + 1) * fraction) > int(i * fraction)]
    return [i for i in range(n) if i not in set(held)], held


@dataclass(frozen=True)
class Part:  # one share of the evaluation prompts, with the base model's side measured once
    harmful: tuple[str, ...]
    harmless: tuple[str, ...]
    groups: tuple[str, ...]  # the prompt set of each harmful prompt, for refusal rates per set
    ref: Any  # BaseReference


Split = dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]]  # part: (harmful, harmless, groups)


def split_parts(harmful: Sequence[str], harmless: Sequence[str], groups: Sequence[str],
                test_fraction: float) -> Split:
    """trial / confirm / test prompts: the test part holds ``test_fraction``, the rest is halved."""
    def take(items: Sequence[str], idx: list[int]) -> tuple[str, ...]:
        return tuple(items[i] for i in idx)

    hf_rest, hf_test = held_out(len(harmful), test_fraction)
    hl_rest, hl_test = held_out(len(harmless), test_fraction)
    hf_trial, hf_confirm = (take(hf_rest, x) for x in held_out(len(hf_rest), 0.5))
    hl_trial, hl_confirm = (take(hl_rest, x) for x in held_out(len(hl_rest), 0.5))
    parts = {"trial": (take(harmful, hf_trial), take(harmless, hl_trial), take(groups, hf_trial)),
             "confirm": (take(harmful, hf_confirm), take(harmless, hl_confirm), take(groups, hf_confirm)),
             "test": (take(harmful, hf_test), take(harmless, hl_test), take(groups, hf_test))}
    if any(not p[0] or not p[1] for p in parts.values()):
        raise UserError(f"the search splits the evaluation prompts into trial, confirm and test parts, and "
                        f"{len(harmful)} harmful / {len(harmless)} harmless are too few: give more prompts "
                        "(--max-eval, --eval-fraction) or change --test-fraction")
    return parts


def measured_parts(loaded: Loaded, split: Split, eval_cfg: EvalConfig, model_id: str) -> dict[str, Part]:
    """Each part of ``split`` (see `split_parts`) with the base model's side measured once; perplexity on the
    test part only, where the chosen edit is reported."""
    parts = {}
    for name, (harmful, harmless, groups) in split.items():
        cfg = eval_cfg if name == "test" else eval_cfg.model_copy(update={"perplexity": False})
        ref = reference(loaded.model, loaded.tokenizer, harmful, harmless, cfg, model_id=model_id)
        parts[name] = Part(harmful, harmless, groups, ref)
    return parts


def _resolved(model_id: str, cfg: stages.PromptsConfig, n: int) -> stages.Prompts:
    """The same prompt sets as ``cfg``, with up to ``n`` measurement prompts per class."""
    return stages.resolve_prompts(model_id, cfg.model_copy(update={"max_prompts": max(2, n)}))


def _outside(chain: stages.PromptSplit, wider: stages.PromptSplit) -> tuple[str, ...]:
    """``wider``'s measurement prompts that the chain neither measured nor evaluates, in order."""
    taken = set(chain.measure) | set(chain.evaluate)
    return tuple(p for p in wider.measure if p not in taken)


def wider_prompts(model_id: str, cfg: stages.PromptsConfig, prompts: stages.Prompts, n: int
                  ) -> tuple[stages.Prompts, tuple[str, ...]] | None:
    """Prompts for directions measured from more than the chain's ``prompts``: every prompt of the same sets
    outside the evaluation prompts, up to ``n`` per class. The harmless ones the chain did not measure go
    alternately to that measurement and to a pool (returned) for the confirm part's KL, so that it ranks
    finalists on prompts no measurement used. None when there are no more prompts than the chain measured."""
    more = _resolved(model_id, cfg, n)
    rest = _outside(prompts.harmless, more.harmless)
    if len(more.harmful.measure) <= len(prompts.harmful.measure) and not rest:
        return None
    harmless = replace(more.harmless, measure=(*prompts.harmless.measure, *rest[0::2]))
    return replace(more, harmless=harmless), tuple(rest[1::2])


def unmeasured_prompts(model_id: str, cfg: stages.PromptsConfig, prompts: stages.Prompts, n: int
                       ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Up to ``n`` harmful and ``n`` harmless prompts of the same sets that neither the chain's measurement nor
    its evaluation uses: (harmful, harmless, the set of each harmful one)."""
    wanted = max(len(prompts.harmful.measure), len(prompts.harmless.measure)) + n
    more = _resolved(model_id, cfg, wanted)
    harmful, harmless = _outside(prompts.harmful, more.harmful)[:n], _outside(prompts.harmless, more.harmless)[:n]
    sets = {p: s.source for s in more.harmful_sets or (more.harmful,) for p in s.measure}
    return harmful, harmless, tuple(sets.get(p, more.harmful.source) for p in harmful)


def confirm_on_more(split: Split, job: stages.AbliterateJob, prompts: stages.Prompts, n: int,
                    say: Callable[[str], None]) -> Split:
    """``split`` with up to ``n`` unmeasured prompts per class (`unmeasured_prompts`) added to its confirm part."""
    if n < 1:
        return split
    extra = unmeasured_prompts(job.model, job.prompts, prompts, n)
    if not extra[0] and not extra[1]:  # the chain measured every prompt (the demo, or the app's max_prompts)
        return split
    harmful, harmless, groups = split["confirm"]
    # not "confirming ...": the app's job log would take that for the stage after the search
    say(f"the confirm part gets {len(extra[0])} harmful / {len(extra[1])} harmless unmeasured prompts more "
        "(--confirm-prompts)")
    return {**split, "confirm": (harmful + extra[0], harmless + extra[1], groups + extra[2])}


def prepare_own_directions(loaded: Loaded, d: dirs.Directions, prompts: stages.Prompts, split: Split,
                           job: stages.AbliterateJob, cfg: SearchConfig, prefill_think: bool,
                           say: Callable[[str], None]) -> tuple[tuple[dirs.Directions, stages.Prompts] | None, Split]:
    """The search's own directions with the prompts that measured them (None when it has none), and ``split``
    with the confirm part's harmless prompts extended by the pool `wider_prompts` kept unmeasured."""
    more = wider_prompts(job.model, job.prompts, prompts, cfg.wide_prompts) if cfg.wide_prompts else None
    if more is not None:
        say(f"measuring the search's own directions from {len(more[0].harmful.measure)} harmful / "
            f"{len(more[0].harmless.measure)} harmless prompts (--wide-prompts)")
        pooled = job.measure.model_copy(update={"set_directions": False})
        harmful, harmless, groups = split["confirm"]
        split = {**split, "confirm": (harmful, harmless + more[1], groups)}
        return (stages.measure_directions(loaded, more[0], pooled, job.edit, say), more[0]), split
    if cfg.fit_steps:
        say(f"fitting the search's own directions to the plain edit ({cfg.fit_steps} steps on the measurement "
            "prompts)")
        fitted = fit_directions(loaded, d, job.edit, prompts.harmful.measure, prompts.harmless.measure, cfg.fit_steps,
                                cfg.fit_learning_rate, weight=cfg.fit_weight, prefill_think=prefill_think, say=say)
        return ((fitted, prompts) if fitted is not d else None), split
    return None, split


def refusal_of(results: dict) -> float:
    """The refusal rate an edit is scored by: with every reply undetermined (reasoning that never ended)
    there is none, and such an edit is as bad as one that refuses everything."""
    rate = results["refusal_rate"]["model"]
    return 1.0 if rate is None else rate


def centre_of(d: dirs.Directions) -> float:
    """The suggested layer as a fraction of the depth: where per-layer trials centre their kernels."""
    return d.suggested_layer / max(1, d.num_layers - 1)


class Workbench:
    """The loaded model with the base side of each prompt part; edits are applied in place and reverted exactly.
    ``wide``: directions measured from more prompts, which trials whose ``source`` is "wide" remove."""

    def __init__(self, loaded: Loaded, d: dirs.Directions, parts: dict[str, Part], eval_cfg: EvalConfig,
                 embed: bool = False, wide: dirs.Directions | None = None) -> None:
        self.model, self.tokenizer, self.d, self.parts = loaded.model, loaded.tokenizer, d, parts
        self.sources = {"chain": d} | ({"wide": wide} if wide is not None else {})
        self.loaded = loaded
        self.eval_cfg = eval_cfg
        self.trial_cfg = eval_cfg.model_copy(update={"perplexity": False})  # perplexity: chosen edit only
        self.markers = markers_for(eval_cfg)
        require_base_refusals(parts["trial"].ref, self.markers)
        refused = {k: sum(is_refusal(classify(r, self.markers)) for r in p.ref.responses) for k, p in parts.items()}
        self.base_rates = {k: refused[k] / len(p.harmful) for k, p in parts.items()}
        seen = ("trial", "confirm")
        self.base_rate = sum(refused[k] for k in seen) / sum(len(parts[k].harmful) for k in seen)
        # the base's refusals on the prompts the search sees: what `likelihood` asks an edit to start
        said = [(q, r) for k in seen for q, r in zip(parts[k].harmful, parts[k].ref.responses, strict=True)
                if is_refusal(classify(r, self.markers))]
        self.refusals = ([q for q, _ in said], [r for _, r in said])
        self.seen_harmless = parts["trial"].harmless + parts["confirm"].harmless
        self.seen_logprobs = torch.cat([parts[k].ref.logprobs for k in seen])
        config = self.model.config
        self.num_layers, self.model_type = num_layers_of(config), model_type_of(config)
        self.centre = centre_of(d)
        params = dict(self.model.named_parameters())
        writers = [m for m in find_writers(self.model_type, params) if embed or m.component != "embed"]
        self.params = {m.name: params[m.name] for m in writers}
        self.saved = {name: p.detach().to("cpu", copy=True) for name, p in self.params.items()}
        self.eval_seconds = 0.0
        self.done: dict[tuple, tuple[dict, dict]] = {}  # `run`'s results by edit and part

    @contextmanager
    def restoring(self) -> Iterator[None]:
        """Whatever happens to the writers inside, they hold the base weights (bit for bit) afterwards."""
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.data.copy_(self.saved[name])

    def evaluate(self, part: str, **kwargs: Any) -> dict:
        p = self.parts[part]
        cfg = self.eval_cfg if part == "test" else self.trial_cfg
        return evaluate(self.model, self.tokenizer, p.harmful, p.harmless, cfg, base=p.ref, markers=self.markers,
                        groups=p.groups, **kwargs)

    def edit_of(self, params: dict[str, Any], base: EditConfig) -> tuple[EditConfig, str, str]:
        """(edit, layer spec, direction source) of a trial's parameters."""
        source = params.get("source", "chain")
        if source not in self.sources:
            raise UserError(f"this search has no '{source}' directions: continue the study with the settings it "
                            "was made with, or choose another --study")
        return (*to_edit(params, base, centre_of(self.sources[source])), source)

    @contextmanager
    def applied(self, edit: EditConfig, spec: str, source: str = "chain") -> Iterator[dict]:
        """The edit in place inside (yields its layer info); the base weights again afterwards."""
        direction, layer, edit = stages.chosen_direction(self.sources[source], spec, edit)
        with self.restoring():
            apply_in_memory(self.model, direction, edit, self.num_layers, self.model_type)
            yield layer

    def run(self, edit: EditConfig, spec: str, source: str = "chain", part: str = "trial",
            likelihood: bool = False) -> tuple[dict, dict]:
        """Evaluate one edit on one part (in place, reverted afterwards): (eval results, layer info); with
        ``likelihood``, the results hold its refusal likelihood and per-prompt KL on the prompts seen too.
        An edit already evaluated on that part is not evaluated again (raising an edit by its replies evaluates
        the twin it then runs as a trial and confirms); such a run's ``eval_seconds`` is 0."""
        key = (edit.model_dump_json(), spec, source, part, likelihood)
        if key in self.done:
            self.eval_seconds = 0.0
            return self.done[key]
        with self.applied(edit, spec, source) as layer:
            began = time.monotonic()
            results = self.evaluate(part)
            self.eval_seconds = time.monotonic() - began  # the evaluation alone, for the overhead of a trial
            if likelihood:
                results["refusal_likelihood"], results["kl_prompts"] = self.likelihood(), self.kls()
        self.done[key] = results, layer
        return results, layer

    def likelihood(self) -> float | None:
        """The model's refusal likelihood on the base's refusals of the prompts the search sees."""
        return refusal_likelihood(self.model, self.tokenizer, *self.refusals, prefill_think=self.eval_cfg.prefill_think,
                                  batch_size=self.eval_cfg.batch_size)

    def kls(self) -> tuple[float, ...]:
        """First-token KL of the model as it is now, per harmless prompt seen (for paired comparisons)."""
        logprobs = first_token_logprobs(self.model, self.tokenizer, self.seen_harmless, self.eval_cfg.batch_size,
                                        self.eval_cfg.prefill_think)
        return tuple(round(float(x), 7) for x in kl_per_prompt(self.seen_logprobs, logprobs))

    def probe(self, edit: EditConfig, spec: str, source: str = "chain") -> tuple[float | None, float]:
        """(refusal likelihood, first-token KL) of an edit on the prompts the search sees, without generating."""
        with self.applied(edit, spec, source):
            logprobs = first_token_logprobs(self.model, self.tokenizer, self.seen_harmless, self.eval_cfg.batch_size,
                                            self.eval_cfg.prefill_think)
            return self.likelihood(), kl_divergence(self.seen_logprobs, logprobs)
