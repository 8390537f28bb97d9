"""Directions fitted to the plain edit (`pipeline.edit.direction_fit`, `SearchConfig.fit_steps`) on the demo model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pipeline.edit import directions as dirs
from pipeline.edit import stages
from pipeline.edit.abliterate import EditConfig, apply_in_memory
from pipeline.edit.direction_fit import fit_directions, removing, writer_hooks
from pipeline.edit.search import SearchConfig, search
from pipeline.edit.stages import PromptsConfig, resolve_prompts
from pipeline.errors import UserError
from pipeline.evaluation.evaluate import EvalConfig
from pipeline.orchestrator.run import AbliterateJob
from pipeline.publish.card import render_card

CHAIN = PromptsConfig(max_prompts=16)


def _logits(loaded, prompts: list[str]) -> torch.Tensor:
    from pipeline.io.chat import format_prompts, prepare_tokenizer

    prepare_tokenizer(loaded.tokenizer)
    enc = loaded.tokenizer(format_prompts(loaded.tokenizer, prompts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return loaded.model(**enc).logits


def test_the_hooks_remove_what_the_weight_edit_removes(demo_loaded, demo_dirs, demo_prompts):
    d = dirs.load(demo_dirs)
    direction, _, placed = stages.chosen_direction(d, "best", EditConfig())
    hooks = writer_hooks(demo_loaded.model, placed, d.num_layers)
    assert hooks and {s for _, s in hooks} - {0.0}
    q = direction[0] if direction.dim() == 3 else direction[None]
    prompts = list(demo_prompts.harmful.evaluate[:4])
    base = _logits(demo_loaded, prompts)
    with removing(hooks, lambda: q):
        hooked = _logits(demo_loaded, prompts)
    state = {k: v.clone() for k, v in demo_loaded.model.state_dict().items()}
    try:
        apply_in_memory(demo_loaded.model, direction, placed, d.num_layers, demo_loaded.model.config.model_type)
        edited = _logits(demo_loaded, prompts)
    finally:
        demo_loaded.model.load_state_dict(state)
    assert (edited - base).abs().max() > 1e-2  # the edit changes the output ...
    assert torch.allclose(hooked, edited, atol=1e-4)  # ... and the hooks change it the same way
    assert torch.equal(_logits(demo_loaded, prompts), base)  # no hook is left behind


def test_fitting_turns_a_direction_away_from_the_harmless_mean_and_keeps_the_plain_edits_effect(
        demo_loaded, demo_dirs, demo_prompts):
    """A direction mixed with the harmless mean spends the edit on what harmless prompts use: the fit must turn it
    away from that mean, lowering the KL on the harmless prompts it was fitted to while the harmful ones keep the
    plain edit's next-token distributions (the objective's own terms; refusals in generated replies are measured
    on a real model in bench/README.md)."""
    d = dirs.load(demo_dirs)
    layer = d.suggested_layer
    mixed = d.directions.clone()
    mixed[layer] = dirs.unit(d.directions[layer] + 0.6 * dirs.unit(d.harmless_mean[layer]))
    d = dataclasses.replace(d, directions=mixed, set_directions=None)
    before = {k: v.clone() for k, v in demo_loaded.model.state_dict().items()}
    grads = [p.requires_grad for p in demo_loaded.model.parameters()]
    lines: list[str] = []
    fitted = fit_directions(demo_loaded, d, EditConfig(), demo_prompts.harmful.measure, demo_prompts.harmless.measure,
                            steps=20, learning_rate=0.02, say=lines.append)
    record = fitted.info["fit"]
    assert record["steps"] == 20 and record["harmful"] == len(demo_prompts.harmful.measure)
    assert record["harmless"] == len(demo_prompts.harmless.measure)
    (held0, held1), (kl0, kl1) = record["held"], record["kl"]
    assert held0 < 1e-4  # the plain edit is its own teacher (stored in bfloat16)
    assert kl1 < 0.7 * kl0, record
    assert held1 < 0.2 * kl0, record
    moved = fitted.directions[layer]
    assert abs(float(moved.norm()) - 1) < 1e-5
    mean = dirs.unit(d.harmless_mean[layer])
    assert abs(float(moved @ mean)) < abs(float(mixed[layer] @ mean))  # less of the harmless mean
    others = [i for i in range(d.num_layers) if i != layer]
    assert torch.equal(fitted.directions[others], mixed[others])  # only the chosen layer's
    assert torch.equal(fitted.projected[layer], dirs.project_out_harmless(moved, d.harmless_mean[layer]))
    assert "fit" not in d.info and torch.equal(d.directions, mixed)  # the input is not changed
    after = demo_loaded.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert [p.requires_grad for p in demo_loaded.model.parameters()] == grads  # as it was
    assert any("fitted the directions in 20 steps" in line for line in lines)


def test_nothing_is_fitted_with_zero_steps_or_per_layer_directions(demo_loaded, demo_dirs, demo_prompts):
    d = dirs.load(demo_dirs)
    h, b = demo_prompts.harmful.measure, demo_prompts.harmless.measure
    assert fit_directions(demo_loaded, d, EditConfig(), h, b, steps=0, learning_rate=0.01) is d
    lines: list[str] = []
    assert fit_directions(demo_loaded, d, EditConfig(per_layer=True), h, b, steps=5, learning_rate=0.01,
                          say=lines.append) is d
    assert "not possible" in lines[0]


def test_fit_and_wide_prompts_are_one_choice(tmp_path):
    job = AbliterateJob(model="demo", out=tmp_path / "out")
    with pytest.raises(UserError, match="choose one"):
        search(job, SearchConfig(trials=1, study=tmp_path / "s.journal", fit_steps=5, wide_prompts=64), None)


def test_the_search_removes_the_fitted_directions_and_keeps_the_plain_edits_counterpart(tmp_path, demo_loaded):
    job = AbliterateJob(model="demo", out=tmp_path / "out", prompts=CHAIN,
                        eval=EvalConfig(max_new_tokens=12, perplexity=False))
    lines: list[str] = []
    cfg = SearchConfig(trials=3, study=tmp_path / "s.journal")  # the default fit
    result = search(job, cfg, lines.append, demo_loaded)
    s = result["search"]
    chain = resolve_prompts("demo", CHAIN)
    sizes = {"harmful": len(chain.harmful.measure), "harmless": len(chain.harmless.measure)}
    wide = s["directions"]["wide"]
    assert s["directions"]["chain"] == sizes and wide == sizes | {"fit": wide["fit"]}  # measured by the chain
    report = json.loads((tmp_path / "out" / "search.json").read_text())
    sources = [t["params"]["source"] for t in sorted(report["trials_all"], key=lambda t: t["number"])]
    assert sources[:3] == ["chain", "wide", "wide"]
    assert {0, 1} <= {t["number"] for t in s["finalists"]}  # the plain edit and the same edit, fitted
    # The fitted one is raised by its replies, not by the likelihood, which the fit does not keep.
    assert any(line.startswith("raising by replies: x1.00 refuses") for line in lines)
    raised = {1} | {int(k) for k, v in s["twins"].items() if v == 1}
    assert set(s["by_replies"]) <= raised
    assert all(t["likelihood"] is None for t in s["finalists"] if t["number"] in s["by_replies"])
    assert any(line.startswith(f"fitted the directions in {cfg.fit_steps} steps") for line in lines)
    record = s["directions"]["wide"]["fit"]
    assert record["steps"] == cfg.fit_steps and "fit" not in s["directions"]["chain"]
    saved = dirs.load(tmp_path / "out")
    assert ("fit" in saved.info) == (s["directions"]["chosen"] == "wide")  # the saved directions are the chosen's
    # The card says which directions the chosen edit removes (here made to be the fitted ones).
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    for chosen, expected in (("wide", True), ("chain", False)):
        recipe["search"]["directions"]["chosen"] = chosen
        (tmp_path / "out" / "recipe.json").write_text(json.dumps(recipe))
        text = render_card(tmp_path / "out", None)
        assert (f"fitted to the default edit: {cfg.fit_steps} gradient steps" in text) == expected
        assert (f"{record['kl'][0]:.4f} → {record['kl'][1]:.4f}" in text) == expected
        assert ("set by its generated replies" in text) == (expected and s["chosen_trial"] in s["by_replies"])
    # ... and whether its strength was matched by replies, from the summary's by_replies.
    recipe["search"]["directions"]["chosen"] = "wide"
    for by_replies, expected in (([recipe["search"]["chosen_trial"]], True), ([], False)):
        recipe["search"]["by_replies"] = by_replies
        (tmp_path / "out" / "recipe.json").write_text(json.dumps(recipe))
        assert ("set by its generated replies" in render_card(tmp_path / "out", None)) == expected


def test_the_fitted_span_refuses_no_more_evaluation_prompts_at_a_lower_kl(demo_loaded, demo_dirs, demo_prompts):
    """By generated replies on the evaluation prompts, which the fit never saw: the span fitted from the mixed one
    (previous test) refuses no more harmful prompts and costs less KL on the harmless ones, at the same weights."""
    from pipeline.evaluation.evaluate import evaluate, reference

    d = dirs.load(demo_dirs)
    layer = d.suggested_layer
    mixed = d.directions.clone()
    mixed[layer] = dirs.unit(d.directions[layer] + 0.6 * dirs.unit(d.harmless_mean[layer]))
    d = dataclasses.replace(d, directions=mixed, set_directions=None)
    fitted = fit_directions(demo_loaded, d, EditConfig(), demo_prompts.harmful.measure, demo_prompts.harmless.measure,
                            steps=20, learning_rate=0.02)
    harmful, harmless = demo_prompts.harmful.evaluate, demo_prompts.harmless.evaluate
    cfg = EvalConfig(max_new_tokens=16, perplexity=False)
    base = reference(demo_loaded.model, demo_loaded.tokenizer, harmful, harmless, cfg)
    results = {}
    for name, x in (("mixed", d), ("fitted", fitted)):
        direction, _, placed = stages.chosen_direction(x, "best", EditConfig())
        with removing(writer_hooks(demo_loaded.model, placed, x.num_layers), lambda q=direction: q[None]):
            results[name] = evaluate(demo_loaded.model, demo_loaded.tokenizer, harmful, harmless, cfg, base=base)
    refused = {k: r["refusals"]["model"]["total"] for k, r in results.items()}
    kl = {k: r["kl_divergence"] for k, r in results.items()}
    assert refused["mixed"] < results["mixed"]["refusals"]["base"]["total"]  # the edit removes refusal at all
    assert refused["fitted"] <= refused["mixed"], (refused, kl)
    assert kl["fitted"] < 0.8 * kl["mixed"], (refused, kl)
