"""Edits of one strength (pipeline/edit/search_refine.py): moves, matching to a refusal likelihood or to generated
refusals, refinement."""

from __future__ import annotations

import pytest
import torch

from pipeline.edit import directions as dirs
from pipeline.edit import search_space as space
from pipeline.edit.abliterate import EditConfig
from pipeline.edit.search import SearchConfig
from pipeline.edit.search_refine import (
    MOVES,
    REPLY_FACTORS,
    match_strength,
    moves_from,
    raise_by_replies,
    refine,
    seen_score,
    strengthen,
)
from pipeline.edit.search_workbench import Part, Workbench, split_parts
from pipeline.edit.stages import default_edit
from pipeline.evaluation.evaluate import EvalConfig, reference

PLAIN = {"method": "standard", "layer": 0.6,
         "attn.kind": "gaussian", "attn.strength": 1.0, "attn.shift": 0.0, "attn.width": 0.35,
         "mlp.kind": "tent", "mlp.max_weight": 1.4, "mlp.shift": 0.29, "mlp.min_weight": 0.2, "mlp.distance": 0.5}


def _changed(a: dict, b: dict) -> dict:
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def test_each_move_changes_one_role_of_each_kernel_within_the_space():
    moved = {m.name: m.apply(PLAIN) for m in MOVES}
    assert _changed(PLAIN, moved["towards attention"]) == {"attn.strength": (1.0, 1.15), "mlp.max_weight": (1.4, 1.19)}
    assert _changed(PLAIN, moved["towards MLP"]) == {"attn.strength": (1.0, 0.85), "mlp.max_weight": (1.4, 1.5)}
    assert _changed(PLAIN, moved["narrower"]) == {"attn.width": (0.35, 0.28), "mlp.distance": (0.5, 0.4)}
    assert _changed(PLAIN, moved["wider"]) == {"attn.width": (0.35, 0.4375), "mlp.distance": (0.5, 0.625)}
    assert _changed(PLAIN, moved["earlier"]) == {"attn.shift": (0.0, -0.04), "mlp.shift": (0.29, 0.25)}
    assert _changed(PLAIN, moved["later"]) == {"attn.shift": (0.0, 0.04), "mlp.shift": (0.29, 0.3)}  # clamped
    names = [name for name, _ in moves_from(PLAIN, search_method=True)]
    assert names[:2] == ["method projected", "method norm-preserving"] and len(names) == 2 + len(MOVES)
    assert [n for n, _ in moves_from(PLAIN, search_method=False)] == [m.name for m in MOVES]
    off = {k: v for k, v in PLAIN.items() if not k.startswith("mlp.")} | {"mlp.kind": "off"}
    assert moves_from(off, False)[0][1] == off | {"attn.strength": 1.15}  # an MLP switched off stays off
    edge = PLAIN | {"attn.shift": 0.3, "mlp.shift": 0.3}
    assert "later" not in [n for n, _ in moves_from(edge, False)]  # a move that changes nothing is left out


@pytest.fixture(scope="module")
def bench(demo_loaded, demo_prompts, demo_dirs, one_thread):
    split = split_parts(demo_prompts.harmful.evaluate, demo_prompts.harmless.evaluate, demo_prompts.eval_groups(),
                        0.5)
    cfg = EvalConfig(max_new_tokens=12, perplexity=False)
    parts = {k: Part(hf, hl, gr, reference(demo_loaded.model, demo_loaded.tokenizer, hf, hl, cfg))
             for k, (hf, hl, gr) in split.items()}
    return Workbench(demo_loaded, dirs.load(demo_dirs), parts, cfg)


@pytest.fixture(scope="module")
def plain(bench):
    params = space.from_edit(default_edit(bench.d, "best", EditConfig()), bench.d, SearchConfig())
    likelihood, kl = bench.probe(*space.to_edit(params, EditConfig(), bench.centre))
    moved = bench.likelihood() - likelihood  # how far the plain edit moved it from the base model's
    assert moved > 0
    return params, likelihood, kl, moved


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("factor", [0.7, 1.3])
def test_a_weaker_or_stronger_edit_is_matched_to_the_target_strength(bench, plain, factor):
    params, target, plain_kl, moved = plain
    before, tol = _snapshot(bench.model), 0.02 * moved
    edit = space.scaled(params, factor)
    found = match_strength(bench, edit, EditConfig(), target, tol)
    likelihood, kl = bench.probe(*space.to_edit(space.scaled(edit, found.factor), EditConfig(), bench.centre))
    assert target - tol <= likelihood <= target and (likelihood, kl) == (found.likelihood, found.kl)
    assert 0.9 <= factor * found.factor <= 1.1  # back near the plain edit's weights, from which it was scaled
    assert kl == pytest.approx(plain_kl, rel=0.1)
    raised = strengthen(bench, edit, EditConfig(), target, tol)
    assert (raised is None) == (factor > 1)  # strengthen only ever raises
    assert all(torch.equal(v, before[k]) for k, v in bench.model.state_dict().items())


def test_refinement_keeps_less_kl_at_the_same_strength(bench, plain):
    params, plain_likelihood, plain_kl, moved = plain
    target, tol = plain_likelihood - 0.05 * moved, 0.02 * moved
    lines: list[str] = []
    found = refine(bench, params, EditConfig(), target, tol, rounds=2, search_method=True, say=lines.append)
    assert found is not None, "\n".join(lines)
    assert target - tol <= found.start.likelihood <= target and target - tol <= found.matched.likelihood <= target
    assert found.matched.kl < found.start.kl * 0.99  # each move taken gained at least 1%
    likelihood, kl = bench.probe(*space.to_edit(found.params, EditConfig(), bench.centre))
    assert (likelihood, kl) == (found.matched.likelihood, found.matched.kl)  # the params hold the matched factor
    assert 1 <= len(found.path) <= 2 and len(lines) >= len(moves_from(params, True))
    assert refine(bench, params, EditConfig(), target, tol, rounds=2, search_method=True, min_gain=1.0) is None


def test_a_workbench_evaluates_an_edit_once_per_part(bench, plain):
    edit = space.to_edit(plain[0], EditConfig(), bench.centre)
    first, _ = bench.run(*edit, part="confirm")
    assert bench.eval_seconds > 0
    again, _ = bench.run(*edit, part="confirm")
    assert again is first and bench.eval_seconds == 0  # not evaluated again
    other, _ = bench.run(*space.to_edit(space.scaled(plain[0], 0.5), EditConfig(), bench.centre), part="confirm")
    assert bench.eval_seconds > 0 and other["kl_divergence"] < first["kl_divergence"]  # a weaker edit: less KL


def test_an_edit_is_raised_by_its_replies_to_the_first_factor_refusing_as_little(bench, plain):
    params, base = plain[0], EditConfig()
    reference = seen_score(bench, space.scaled(params, 0.9), base)
    weak = space.scaled(params, 0.7)
    start = seen_score(bench, weak, base)
    assert start[0] > reference[0] and start[1] < reference[1]  # weaker than the reference by its replies
    found = raise_by_replies(bench, weak, base, (reference[0], float("inf")), reference[0])
    assert found is not None and found.factor > 1
    assert (found.refusal, found.kl) == seen_score(bench, space.scaled(weak, found.factor), base)
    assert found.refusal <= reference[0] and found.kl > start[1]
    lower = [f for f in REPLY_FACTORS if f < found.factor]
    assert all(seen_score(bench, space.scaled(weak, f), base)[0] > reference[0] for f in lower)  # the first one
    # An edit that reaches the plain edit's KL before its refusal is not raised: nothing is gained.
    assert raise_by_replies(bench, weak, base, (reference[0], start[1]), reference[0]) is None
