"""Refusal likelihood (pipeline/evaluation/likelihood.py): how readily a model starts the base's refusals."""

from __future__ import annotations

import pytest
import torch

from pipeline.edit import directions as dirs
from pipeline.edit import stages
from pipeline.edit.abliterate import EditConfig, apply_in_memory
from pipeline.edit.architectures import model_type_of, num_layers_of
from pipeline.evaluation.evaluate import EvalConfig, classify, generate, is_refusal, markers_for
from pipeline.evaluation.likelihood import refusal_likelihood
from pipeline.io.chat import format_prompts


@pytest.fixture(scope="module")
def refusals(demo_loaded, demo_prompts, one_thread):
    """The demo's own greedy refusals of its held-out topics."""
    model, tok = demo_loaded.model, demo_loaded.tokenizer
    prompts = list(demo_prompts.harmful.evaluate[:24])
    markers = markers_for(EvalConfig())
    kept = [(p, r) for p, r in zip(prompts, generate(model, tok, prompts, 16), strict=True)
            if is_refusal(classify(r, markers))]
    assert len(kept) >= 12  # the demo refuses its held-out topics
    return [p for p, _ in kept], [r for _, r in kept]


def _by_hand(model, tok, prompt: str, reply: str, k: int) -> float:
    chat = tok(format_prompts(tok, [prompt])[0], add_special_tokens=False)["input_ids"]
    answer = tok(reply, add_special_tokens=False)["input_ids"][:k]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([chat + answer])).logits[0].float()
    logp = torch.log_softmax(logits[len(chat) - 1:-1], dim=-1)
    return float(logp[torch.arange(len(answer)), torch.tensor(answer)].mean().exp())


def test_padded_batches_score_each_prompt_as_alone(demo_loaded, refusals):
    model, tok = demo_loaded.model, demo_loaded.tokenizer
    prompts, replies = refusals[0][:5], refusals[1][:5]
    alone = [_by_hand(model, tok, p, r, 4) for p, r in zip(prompts, replies, strict=True)]
    batched = refusal_likelihood(model, tok, prompts, replies, max_tokens=4, batch_size=3)
    assert batched == pytest.approx(sum(alone) / len(alone), abs=1e-4)
    assert all(0 < a <= 1 for a in alone)
    one_by_one = refusal_likelihood(model, tok, prompts, replies, max_tokens=4, batch_size=1)
    assert one_by_one == pytest.approx(batched, abs=1e-4)


def test_it_falls_steadily_as_the_refusal_direction_is_removed(demo_loaded, demo_dirs, refusals):
    model, tok = demo_loaded.model, demo_loaded.tokenizer
    d = dirs.load(demo_dirs)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scores = [refusal_likelihood(model, tok, *refusals)]
    try:
        for strength in (0.5, 1.0):
            edit = EditConfig(attn={"strength": strength}, mlp={"strength": strength})
            direction, _, edit = stages.chosen_direction(d, "best", edit)
            apply_in_memory(model, direction, edit, num_layers_of(model.config), model_type_of(model.config))
            scores.append(refusal_likelihood(model, tok, *refusals))
            model.load_state_dict(snapshot)
    finally:
        model.load_state_dict(snapshot)
    base, half, full = scores
    assert base > half > full  # what the search's calibration relies on
    assert full < 0.8 * base


def test_nothing_to_score(demo_loaded):
    model, tok = demo_loaded.model, demo_loaded.tokenizer
    assert refusal_likelihood(model, tok, [], []) is None
    assert refusal_likelihood(model, tok, ["hello"], [""]) is None  # an empty reply has no tokens to read
    with pytest.raises(ValueError):
        refusal_likelihood(model, tok, ["a", "b"], ["only one"])
