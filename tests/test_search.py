"""Automatic search on the demo model: reaches the target, restores weights, resumes, refuses bad input."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

import pytest
import torch
from pydantic import ValidationError

from pipeline.edit import directions as dirs
from pipeline.edit import search as se
from pipeline.edit import search_space as space
from pipeline.edit import search_workbench
from pipeline.edit.abliterate import EditConfig, strengths
from pipeline.edit.search import Scored, SearchConfig, choose, pareto_front, search
from pipeline.errors import UserError
from pipeline.evaluation.evaluate import EvalConfig, reference
from pipeline.orchestrator.run import AbliterateJob

FAST = EvalConfig(max_new_tokens=12)
FIRST, MORE = 6, 2  # trials of the first run, then of the resumed run: a budget of 8 in all
TRIALS = FIRST + MORE


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(model, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    changed = [k for k in state if not torch.equal(state[k], snapshot[k])]
    assert not changed, changed[:5]


@pytest.fixture(scope="module")
def demo_d(demo_dirs):
    return dirs.load(demo_dirs)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, demo_loaded, demo_d):
    """A search of FIRST trials, then the same study continued by MORE trials into another folder."""
    root = tmp_path_factory.mktemp("search")
    study = root / "demo.study.journal"
    before = _snapshot(demo_loaded.model)
    lines: list[str] = []
    job = AbliterateJob(model="demo", out=root / "first", eval=FAST.model_copy(update={"perplexity": False}))
    # The study's mechanics with the chain's directions alone; the default fitted directions and their twin
    # raised by replies are searched in test_direction_fit.
    first = search(job, SearchConfig(trials=FIRST, study=study, fit_steps=0), lines.append, demo_loaded, demo_d)
    weights_after_first = _snapshot(demo_loaded.model)
    job2 = AbliterateJob(model="demo", out=root / "second", eval=FAST)
    second = search(job2, SearchConfig(trials=MORE, study=study, fit_steps=0), lines.append, demo_loaded, demo_d)
    return {"root": root, "first": first, "second": second, "lines": lines, "before": before,
            "after_first": weights_after_first}


def test_small_budget_reaches_target_on_held_out_prompts(searched):
    second = searched["second"]  # the study after all TRIALS trials
    results = json.loads((searched["root"] / "second" / "eval_results.json").read_text())
    assert results["num_prompts"]["harmful"] == 40  # the test half of demo-harmful's 80 evaluation prompts
    assert results["prompt_sources"]["harmful"]["split"] == "eval (search test part)"
    assert results["refusal_rate"]["base"] >= 0.9
    # The target (10%) lies within the 95% interval of the test count: 40 prompts cannot tell 5% from
    # 12.5% (the plain edit itself scored 5-7.5% here), while a search that missed scores 25% or more.
    assert results["refusal_interval"]["model"][0] <= 0.1 < results["refusal_interval"]["base"][0]
    assert results["kl_divergence"] <= 0.1
    assert results["perplexity"]["model"] is not None
    summary = second["search"]
    assert summary["prompts"] == {"trial": {"harmful": 20, "harmless": 20}, "confirm": {"harmful": 20, "harmless": 20},
                                  "test": {"harmful": 40, "harmless": 40}}
    # The plain edit (trial 0) was re-scored with the best Pareto trials and its lowest-KL peers, and compared
    # on the test part.
    finalists = {t["number"]: t for t in summary["finalists"]}
    assert 0 in finalists and summary["chosen_trial"] in finalists
    assert 1 < len(finalists) <= 2 * SearchConfig().finalists + 1
    plain, chosen = summary["plain_edit_on_test"], summary["chosen_on_test"]
    assert chosen["refusal"] == results["refusal_rate"]["model"]
    # On the prompts it chose on, the choice refuses at most one prompt more than the plain edit, at no higher KL.
    assert finalists[summary["chosen_trial"]]["refusal"] <= finalists[0]["refusal"] + 1 / 40 + 1e-9
    assert finalists[summary["chosen_trial"]]["kl"] <= finalists[0]["kl"] + 1e-12
    assert 0 <= plain["refusal"] <= 1 and plain["kl"] > 0


def test_parts_are_disjoint_and_every_set_is_in_each(demo_prompts):
    harmful, harmless = demo_prompts.harmful.evaluate, demo_prompts.harmless.evaluate
    groups = ["a"] * 40 + ["b"] * 40
    parts = se.split_parts(harmful, harmless, groups, 0.5)
    seen = [set(parts[k][0]) for k in se.PARTS]
    assert sum(len(x) for x in seen) == len(harmful) and set().union(*seen) == set(harmful)
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])
    for name, (hf, hl, gr) in parts.items():
        assert len(hl) == len(hf), name
        assert sorted(set(gr)) == ["a", "b"] and abs(gr.count("a") - gr.count("b")) <= 1, name
        assert [groups[harmful.index(p)] for p in hf] == list(gr)  # each prompt keeps its set's name
    assert len(parts["test"][0]) == 40 and len(se.split_parts(harmful, harmless, groups, 0.25)["test"][0]) == 20
    with pytest.raises(UserError, match="too few"):
        se.split_parts(harmful[:2], harmless[:2], groups[:2], 0.5)


def test_weights_are_restored_exactly_after_the_search(searched, demo_loaded):
    _assert_same_weights(demo_loaded.model, searched["before"])
    for name, tensor in searched["after_first"].items():
        assert torch.equal(tensor, searched["before"][name]), name


def test_output_folder_holds_the_chosen_edit_and_the_report(searched):
    from transformers import AutoModelForCausalLM

    out, first = searched["root"] / "second", searched["second"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "recipe.json", "eval_results.json",
                 "search.json", "pareto.png", "strengths.png", "directions.safetensors"):
        assert (out / name).exists(), name
    recipe = json.loads((out / "recipe.json").read_text())
    report = json.loads((out / "search.json").read_text())
    assert recipe["search"]["chosen_trial"] == report["chosen_trial"] == first["search"]["chosen_trial"]
    twins = {int(k): v for k, v in report["twins"].items()}  # stronger twins of finalists (`calibrate`)
    refined = {int(k): v for k, v in report["refined"].items()}  # the plain edit refined (`refined_trial`)
    assert len(refined) <= 1  # once per study: the continued run did not refine again
    assert recipe["search"]["trials"] == TRIALS + len(twins) + len(refined) == len(report["trials_all"])
    assert recipe["kind"] == "abliterated" and recipe["method"] in space.METHODS
    chosen = next(t for t in report["trials_all"] if t["number"] == report["chosen_trial"])
    edit, spec = space.to_edit(chosen["params"], EditConfig())
    assert recipe["parameters"] == edit.model_dump(mode="json")
    assert recipe["layer"]["spec"] == spec
    assert recipe["strengths"] == json.loads(json.dumps(strengths(edit, 6)))
    front, finalists = {t["number"] for t in report["pareto_front"]}, {t["number"] for t in report["finalists"]}
    plain = next(t for t in report["trials_all"] if t["number"] == 0)
    peers = {t["number"] for t in report["trials_all"] if t["refusal"] <= plain["refusal"]}  # trial 0 among them
    assert report["chosen_trial"] in finalists <= front | peers | set(twins) | set(refined) and 0 in finalists
    assert set(twins.values()) <= finalists
    rescored = {t["number"]: t for t in report["finalists"]}
    by_replies = set(report["by_replies"])  # the fitted counterpart, matched by its replies (`reply_twin`)
    for number in set(twins) - by_replies:  # a little past the plain edit's strength
        assert rescored[number]["likelihood"] < rescored[0]["likelihood"]
    for number in by_replies & set(twins):  # refusing no more of the prompts seen, by generated replies
        assert rescored[number]["likelihood"] is None
        assert rescored[number]["refusal"] <= rescored[0]["refusal"] + 1e-9
    for number in refined:  # at its strength, never weaker
        assert rescored[number]["likelihood"] <= rescored[0]["likelihood"] + 1e-9
    assert "| trial |" in report["table"]
    edited = AutoModelForCausalLM.from_pretrained(out)
    assert edited.config.num_hidden_layers == 6


def test_progress_has_one_line_per_trial_with_scores_and_eta(searched):
    lines = [line for line in searched["lines"] if line.startswith("trial ")]
    assert len(lines) == TRIALS
    assert all("refusal" in line and "KL" in line and "elapsed" in line and "left" in line for line in lines)
    assert all("best so far: trial " in line for line in lines)
    assert any(line.startswith("confirming trial 0 on 40 prompts") for line in searched["lines"])
    assert any(line.startswith("Pareto front:") for line in searched["lines"])


def test_resumed_study_continues(searched):
    old = json.loads((searched["root"] / "first" / "search.json").read_text())["trials_all"]
    new = json.loads((searched["root"] / "second" / "search.json").read_text())["trials_all"]
    numbers = [t["number"] for t in new]
    assert len(old) == FIRST and len(new) == TRIALS  # grew by the new --trials
    assert sorted(numbers) == list(range(TRIALS))  # no trial number repeated
    by_number = {t["number"]: t for t in new}
    for trial in old:  # earlier trials are kept as they were
        assert by_number[trial["number"]]["params"] == trial["params"]
        assert by_number[trial["number"]]["refusal"] == trial["refusal"]
    old_params = [t["params"] for t in old]
    assert all(by_number[n]["params"] not in old_params for n in range(FIRST, TRIALS))
    assert searched["second"]["search"]["trials"] == TRIALS and searched["second"]["search"]["trials_run"] == MORE


def test_workbench_restores_weights_even_when_evaluation_fails(demo_loaded, demo_prompts, demo_d, monkeypatch):
    harmful, harmless = demo_prompts.harmful.evaluate[:4], demo_prompts.harmless.evaluate[:4]
    cfg = EvalConfig(max_new_tokens=12, perplexity=False)
    ref = reference(demo_loaded.model, demo_loaded.tokenizer, harmful, harmless, cfg)
    before = _snapshot(demo_loaded.model)
    part = search_workbench.Part(tuple(harmful), tuple(harmless), ("demo-harmful",) * 4, ref)
    bench = se.Workbench(demo_loaded, demo_d, dict.fromkeys(se.PARTS, part), cfg)
    edits = [
        (EditConfig(method="norm-preserving", mlp={"kind": "off"}), "0.55"),
        (EditConfig(method="projected", per_layer=True, preset="aggressive"), "per-layer"),
    ]
    for edit, spec in edits:
        results, layer = bench.run(edit, spec)
        assert results["kl_divergence"] > 0 and layer["spec"] == spec
        _assert_same_weights(demo_loaded.model, before)

    def boom(*args, **kwargs):
        assert not torch.equal(demo_loaded.model.state_dict()["model.layers.2.self_attn.o_proj.weight"],
                               before["model.layers.2.self_attn.o_proj.weight"])  # the edit is in place
        raise RuntimeError("boom")

    monkeypatch.setattr(search_workbench, "evaluate", boom)
    with pytest.raises(RuntimeError, match="boom"):
        bench.run(EditConfig(), "0.4")
    _assert_same_weights(demo_loaded.model, before)


def test_first_trial_of_a_new_study_is_the_plain_edit(demo_d):
    cfg = SearchConfig(search_per_layer=True)
    params = space.from_edit(EditConfig(), demo_d, cfg)
    edit, spec = space.to_edit(params, EditConfig())
    plan, default = strengths(edit, 6), strengths(EditConfig().placed(demo_d.suggested_layer / 5), 6)
    assert plan["attn"] == pytest.approx(default["attn"]) and plan["mlp"] == pytest.approx(default["mlp"])
    assert edit.method == "standard" and not edit.per_layer
    assert float(spec) == pytest.approx(demo_d.suggested_layer / 5, abs=0.005)
    centre = demo_d.suggested_layer / 5
    per_layer, spec = space.to_edit(space.from_edit(EditConfig(per_layer=True), demo_d, cfg), EditConfig(), centre)
    assert per_layer.per_layer and spec == "per-layer"
    assert strengths(per_layer, 6)["attn"] == pytest.approx(default["attn"])


def test_the_plain_edits_neighbours_each_change_one_thing(demo_d):
    cfg = SearchConfig()
    plain = space.from_edit(EditConfig(), demo_d, cfg)
    variants = space.neighbours(plain, cfg)
    changed = [sorted(k for k in plain if v[k] != plain[k]) for v in variants]
    assert changed == [["method"], ["method"], ["attn.strength", "mlp.strength"], ["attn.width", "mlp.width"]]
    assert {v["method"] for v in variants[:2]} == {"projected", "norm-preserving"}
    centre = plain["layer"]
    base = strengths(space.to_edit(plain, EditConfig())[0], 24)
    weaker = strengths(space.to_edit(variants[2], EditConfig())[0], 24)
    narrower = strengths(space.to_edit(variants[3], EditConfig())[0], 24)
    peak = round(centre * 23)
    for comp in ("attn", "mlp"):
        assert weaker[comp][peak] == pytest.approx(0.85 * base[comp][peak], rel=1e-3)
        assert narrower[comp][peak] == pytest.approx(base[comp][peak], rel=0.05)  # same peak, less reach
        assert narrower[comp][0] < base[comp][0] and narrower[comp][23] < base[comp][23]
    assert [v["method"] for v in space.neighbours(plain, SearchConfig(search_method=False)) if "method" in v] == \
        ["standard", "standard"]  # without a method search only the kernels vary


def test_a_new_study_starts_with_the_plain_edit_then_its_neighbours(searched):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(searched["root"] / "demo.study.journal")))
    trials = optuna.load_study(study_name=se.STUDY_NAME, storage=storage).trials
    assert trials[0].user_attrs.get("default") and not any(t.user_attrs.get("default") for t in trials[1:])
    assert [bool(t.user_attrs.get("neighbour")) for t in trials[:6]] == [False, True, True, True, True, False]
    assert {t.params["method"] for t in trials[:3]} == set(space.METHODS)


def test_trial_kernels_sit_at_the_trials_layer_plus_their_shift():
    params = {"method": "standard", "layer": 0.6,
              "attn.kind": "gaussian", "attn.strength": 1.0, "attn.shift": -0.2, "attn.width": 0.2,
              "mlp.kind": "tent", "mlp.max_weight": 1.2, "mlp.shift": 0.3, "mlp.min_weight": 0.0, "mlp.distance": 0.3}
    edit, spec = space.to_edit(params, EditConfig())
    assert spec == "0.60" and edit.attn.peak == pytest.approx(0.4) and edit.mlp.position == pytest.approx(0.9)
    plan = strengths(edit, 11)  # layer i sits at i / 10 of the depth
    assert max(range(11), key=lambda i: plan["attn"][i]) == 4 and max(range(11), key=lambda i: plan["mlp"][i]) == 9
    edge, _ = space.to_edit(params | {"layer": 0.9}, EditConfig())
    assert edge.mlp.position == 1.0  # clamped to the last layer
    per_layer = {k: v for k, v in params.items() if k != "layer"} | {"directions": "per-layer"}
    placed, spec = space.to_edit(per_layer, EditConfig(), centre=0.5)
    assert spec == "per-layer" and placed.attn.peak == pytest.approx(0.3)
    with pytest.raises(ValueError, match="centre"):
        space.to_edit(per_layer, EditConfig())


def _s(number: int, refusal: float, kl: float) -> Scored:
    return Scored(number, refusal, kl, {}, {})


def _study(trials: list[Scored]):
    import optuna

    study = optuna.create_study(directions=["minimize", "minimize"])
    for t in trials:
        study.add_trial(optuna.trial.create_trial(values=[t.refusal, t.kl]))
    return study


def test_choice_rule_and_pareto_front():
    trials = [_s(0, 0.025, 0.02), _s(1, 0.0, 0.05), _s(2, 0.08, 0.01), _s(3, 0.5, 0.001), _s(4, 0.6, 0.03)]
    assert [t.number for t in pareto_front(_study(trials))] == [1, 0, 2, 3]  # 4 is beaten by 0 on both
    best, rule = choose(trials, base_rate=1.0, target=0.1)
    assert best.number == 2 and "lowest KL" in rule  # lowest KL among refusal <= 10%
    best, _ = choose(trials, base_rate=1.0, target=0.01)
    assert best.number == 1  # none at <= 1%: the lowest refusal
    best, _ = choose([_s(0, 0.3, 0.2), _s(1, 0.3, 0.1), _s(2, 0.5, 0.0)], base_rate=1.0, target=0.1)
    assert best.number == 1  # ties on refusal go to the lower KL
    best, rule = choose(trials, base_rate=1.0, target=0.1, max_kl=0.005)
    assert best.number == 3 and "KL ≤ 0.005" in rule
    # With the plain edit within the target, nothing refusing more than it is chosen, however low its KL.
    best, rule = choose(trials, base_rate=1.0, target=0.1, default=trials[1])
    assert best.number == 1 and "plain edit" in rule
    best, _ = choose(trials, base_rate=1.0, target=0.1, default=trials[0])
    assert best.number == 0  # trial 2's lower KL comes with more refusals than the plain edit
    best, rule = choose(trials, base_rate=1.0, target=0.1, default=trials[1], slack=0.025)
    assert best.number == 0 and "0.0% + 2.5%" in rule  # one prompt more of 40 is within the count's noise
    best, _ = choose(trials, base_rate=1.0, target=0.05, default=trials[0], slack=0.1)
    assert best.number == 0  # the slack never lifts the cap above the target (trial 2 refuses 8% > 5%)
    best, _ = choose(trials, base_rate=1.0, target=0.1, default=_s(9, 0.5, 0.2))
    assert best.number == 2  # a plain edit outside the target does not hold the others back
    assert [t.number for t in se.rank(trials, 0.1)] == [2, 0, 1, 3, 4]
    with pytest.raises(UserError, match="none of the 2 trials lowered"):
        choose([_s(0, 1.0, 0.0), _s(1, 1.0, 0.1)], base_rate=1.0, target=0.1)


def test_scaling_a_trial_raises_its_peak_weights_within_the_space(demo_d):
    plain = space.from_edit(EditConfig(), demo_d, SearchConfig())
    assert space.strength_cap(plain) == pytest.approx(1.5)  # peak weights 1.0, the space's ceiling 1.5
    twin = space.scaled(plain, 1.2)
    assert {k for k in plain if twin[k] != plain[k]} == {"attn.strength", "mlp.strength"}
    assert twin["attn.strength"] == pytest.approx(1.2) and space.strength_cap(twin) == pytest.approx(1.25)
    tent = {"attn.kind": "tent", "attn.max_weight": 0.75, "attn.min_weight": 0.5, "mlp.kind": "off"}
    assert space.scaled(tent, 2.0) == tent | {"attn.max_weight": 1.5}
    assert space.strength_cap(tent) == pytest.approx(2.0)


@pytest.mark.parametrize("trials", [0, -1])
def test_zero_or_negative_trials(tmp_path, trials):
    with pytest.raises(ValidationError):
        SearchConfig(trials=trials)
    from pipeline.configs import add_config_args, config_from_args

    parser = argparse.ArgumentParser()
    add_config_args(parser, SearchConfig)
    with pytest.raises(UserError, match="--trials"):
        config_from_args(SearchConfig, parser.parse_args(["--trials", str(trials)]))
    with pytest.raises(UserError, match="at least 1"):  # direct calls are checked too, before any loading
        search(AbliterateJob(model="demo", out=tmp_path / "o"), SearchConfig.model_construct(trials=trials))


def test_search_flags_do_not_collide_with_abliterate_flags():
    from pipeline.configs import add_config_args
    from pipeline.edit.directions import DirectionsConfig
    from pipeline.edit.stages import PromptsConfig
    from pipeline.io.loading import LoadConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--out"), parser.add_argument("--layer"), parser.add_argument("--directions")
    for cls in (LoadConfig, PromptsConfig, DirectionsConfig, EditConfig, SearchConfig):
        add_config_args(parser, cls)
    add_config_args(parser, EvalConfig, prefix="eval-")
    ns = parser.parse_args(["--trials", "3", "--study", "s.journal", "--no-search-method", "--seed", "1"])
    assert ns.trials == 3 and ns.search_method is False and ns.seed == 1


@pytest.mark.parametrize("content", [os.urandom(256), b"not a journal\n{\"op_code\": 99}\n"])
def test_unreadable_study_file(tmp_path, content):
    study = tmp_path / "bad.journal"
    study.write_bytes(b"\xff\xfe" + content)
    job = AbliterateJob(model="demo", out=tmp_path / "out")
    with pytest.raises(UserError, match="cannot read study file") as info:
        search(job, SearchConfig(trials=1, study=study))
    assert "\n" not in str(info.value) and str(study) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_study_of_another_model_or_prompts_is_refused(tmp_path):
    path = tmp_path / "s.journal"
    with se.quiet_optuna():
        se.open_study(path, SearchConfig(), {"model": "demo", "max_new_tokens": 16})
        se.open_study(path, SearchConfig(), {"model": "demo", "max_new_tokens": 16})  # same context: fine
        with pytest.raises(UserError, match="other max_new_tokens, model"):
            se.open_study(path, SearchConfig(), {"model": "other", "max_new_tokens": 64})


def test_base_that_refuses_nothing(tmp_path, demo_loaded, demo_d):
    from pipeline.edit.stages import PromptsConfig

    job = AbliterateJob(model="demo", out=tmp_path / "out", prompts=PromptsConfig(harmful="demo-harmless"),
                        eval=EvalConfig(max_new_tokens=12, perplexity=False))
    with pytest.raises(UserError, match="nothing to remove"):
        search(job, SearchConfig(trials=1), None, demo_loaded, demo_d)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("change", "needle"),
                         [({"streaming": True}, "--streaming"), ({"evaluate": False}, "--no-eval")])
def test_incompatible_job_settings(tmp_path, change, needle):
    with pytest.raises(UserError, match=needle):
        search(AbliterateJob(model="demo", out=tmp_path / "o", **change), SearchConfig(trials=1))


def test_card_compares_the_chosen_and_plain_edits_on_the_test_part(searched, tmp_path):
    import shutil

    from pipeline.publish.card import render_card

    text = render_card(searched["root"] / "second", "someone/demo-searched")
    found = searched["second"]["search"]
    assert "### Automatic search" in text and f"over {found['trials']} trials" in text
    refined = found["refined"].get(found["chosen_trial"])
    origin = f" (the default edit refined at its strength: {refined})" if refined else ""
    assert f"trial {found['chosen_trial']}{origin}, lowest KL" in text and "(40 harmful prompts)" in text
    row = next(line for line in text.splitlines() if line.startswith("| KL divergence from base ↓ | ")
               and line.count("|") == 4)
    plain, chosen = (float(c) for c in row.split("|")[2:4])
    assert plain == pytest.approx(found["plain_edit_on_test"]["kl"], abs=6e-5)
    assert chosen == pytest.approx(found["chosen_on_test"]["kl"], abs=6e-5)
    copy = tmp_path / "refined"  # had the refined edit been chosen, the card names its moves
    shutil.copytree(searched["root"] / "second", copy)
    recipe = json.loads((copy / "recipe.json").read_text())
    recipe["search"]["refined"] = {str(found["chosen_trial"]): "method projected + towards attention"}
    (copy / "recipe.json").write_text(json.dumps(recipe))
    assert (f"trial {found['chosen_trial']} (the default edit refined at its strength: method projected + towards "
            "attention), lowest KL") in render_card(copy, "someone/demo-searched")


def test_the_plain_edit_refined_at_its_strength_joins_the_finalists_once(tmp_path, demo_loaded, demo_d):
    """At the plain edit's own strength (no margin) the demo's plain edit has moves that keep less KL."""
    before, study, lines = _snapshot(demo_loaded.model), tmp_path / "r.journal", []
    cfg = SearchConfig(trials=2, study=study, twins=False, refine=1, neighbours=False)
    job = AbliterateJob(model="demo", out=tmp_path / "a", eval=FAST.model_copy(update={"perplexity": False}))
    first = search(job, cfg, lines.append, demo_loaded, demo_d)["search"]
    (number, moves), = first["refined"].items()
    assert number == 2 and any(line.startswith(f"trial 2: the plain edit refined ({moves})") for line in lines)
    finalists = {t["number"]: t for t in first["finalists"]}
    refined, plain = finalists[number], finalists[0]
    assert refined["params"] != plain["params"]
    assert refined["likelihood"] <= plain["likelihood"] + 1e-9  # as strong on the prompts seen
    assert refined["kl"] < plain["kl"]  # and cheaper: what the moves were taken for
    again = search(replace(job, out=tmp_path / "b"), cfg.model_copy(update={"trials": 1}), lines.append,
                   demo_loaded, demo_d)["search"]
    assert again["refined"] == first["refined"] and number in {t["number"] for t in again["finalists"]}
    assert sum(line.startswith("refining the plain edit") for line in lines) == 1  # not refined again
    _assert_same_weights(demo_loaded.model, before)


def test_the_plain_edits_counterpart_is_the_same_edit_with_the_wider_direction():
    plain = Scored(0, 0.1, 0.03, {"source": "chain", "method": "standard", "layer": 0.78}, {})
    same = Scored(1, 0.1, 0.04, {"source": "wide", "method": "standard", "layer": 0.78}, {})
    moved = Scored(2, 0.1, 0.02, {"source": "wide", "method": "standard", "layer": 0.8}, {})
    assert se.counterpart([plain, moved, same], plain) is same
    assert se.counterpart([plain, moved], plain) is None
    assert se.counterpart([plain, same], None) is None
    no_source = replace(plain, params={"method": "standard", "layer": 0.78})  # a search without wider directions
    assert se.counterpart([no_source, same], no_source) is None
