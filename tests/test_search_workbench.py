"""The search's own directions from more prompts (`wider_prompts`, `SearchConfig.wide_prompts`) on the demo model."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.edit import directions as dirs
from pipeline.edit.search import SearchConfig, search
from pipeline.edit.search_workbench import split_parts, unmeasured_prompts, wider_prompts
from pipeline.edit.stages import PromptsConfig, resolve_prompts
from pipeline.errors import UserError
from pipeline.evaluation.evaluate import EvalConfig
from pipeline.orchestrator.run import AbliterateJob

CHAIN = PromptsConfig(max_prompts=16)  # the chain measures from 16 per class; the demo has 160 outside evaluation


def test_wider_prompts_take_every_prompt_outside_evaluation_and_share_the_new_harmless_ones():
    chain = resolve_prompts("demo", CHAIN)
    more, pool = wider_prompts("demo", CHAIN, chain, 256)
    evaluated = set(chain.harmful.evaluate) | set(chain.harmless.evaluate)
    assert more.harmful.evaluate == chain.harmful.evaluate and more.harmless.evaluate == chain.harmless.evaluate
    assert len(more.harmful.measure) == 160 and not set(more.harmful.measure) & evaluated
    assert more.harmless.measure[:16] == chain.harmless.measure  # the chain's own first, then half of the rest
    new = more.harmless.measure[16:]
    assert len(new) == 72 and len(pool) == 72
    assert not set(pool) & (set(more.harmless.measure) | evaluated)  # KL on prompts no measurement used
    assert len(set(new) | set(pool)) == 144
    capped, _ = wider_prompts("demo", CHAIN, chain, 40)
    assert len(capped.harmful.measure) == 40
    everything = PromptsConfig()  # the demo's chain already takes every prompt: nothing more to measure
    assert wider_prompts("demo", everything, resolve_prompts("demo", everything), 256) is None


def test_unmeasured_prompts_lie_outside_the_chains_measurement_and_evaluation():
    chain = resolve_prompts("demo", CHAIN)
    harmful, harmless, groups = unmeasured_prompts("demo", CHAIN, chain, 40)
    assert len(harmful) == 40 and len(harmless) == 40 and len(set(harmful)) == 40
    assert not set(harmful) & (set(chain.harmful.measure) | set(chain.harmful.evaluate))
    assert not set(harmless) & (set(chain.harmless.measure) | set(chain.harmless.evaluate))
    assert set(groups) <= {s.source for s in chain.harmful_sets or (chain.harmful,)} and len(groups) == 40
    everything = PromptsConfig()  # the demo's chain takes every prompt: none is left
    assert unmeasured_prompts("demo", everything, resolve_prompts("demo", everything), 40) == ((), (), ())


def test_confirm_prompts_grow_the_confirm_part_and_leave_the_others(tmp_path, demo_loaded):
    chain = resolve_prompts("demo", CHAIN)
    split = split_parts(chain.harmful.evaluate, chain.harmless.evaluate, chain.eval_groups(), 0.5)
    job = AbliterateJob(model="demo", out=tmp_path / "out", prompts=CHAIN,
                        eval=EvalConfig(max_new_tokens=12, perplexity=False))
    lines: list[str] = []
    s = search(job, SearchConfig(trials=1, study=tmp_path / "s.journal", confirm_prompts=24), lines.append,
               demo_loaded)["search"]
    sizes = {k: {"harmful": len(v[0]), "harmless": len(v[1])} for k, v in split.items()}
    assert s["prompts"] == sizes | {"confirm": {"harmful": sizes["confirm"]["harmful"] + 24,
                                                "harmless": sizes["confirm"]["harmless"] + 24}}
    seen = sizes["trial"]["harmful"] + sizes["confirm"]["harmful"] + 24
    assert any(line.startswith(f"confirming trial 0 on {seen} prompts") for line in lines)
    with pytest.raises(UserError, match="--confirm-prompts and --wide-prompts"):
        search(job, SearchConfig(trials=1, study=tmp_path / "t.journal", confirm_prompts=8, wide_prompts=8),
               None, demo_loaded)


@pytest.fixture(scope="module")
def wide_search(tmp_path_factory, demo_loaded):
    root = tmp_path_factory.mktemp("wide")
    job = AbliterateJob(model="demo", out=root / "out", prompts=CHAIN,
                        eval=EvalConfig(max_new_tokens=12, perplexity=False))
    lines: list[str] = []
    before = {k: v.clone() for k, v in demo_loaded.model.state_dict().items()}
    result = search(job, SearchConfig(trials=3, study=root / "s.journal", wide_prompts=256), lines.append, demo_loaded)
    after = demo_loaded.model.state_dict()
    restored = all(torch.equal(after[k], v) for k, v in before.items())
    return {"root": root, "result": result, "lines": lines, "restored": restored}


def test_the_plain_edit_keeps_the_chains_directions_and_the_next_trials_remove_the_wider_ones(wide_search):
    s = wide_search["result"]["search"]
    assert s["directions"]["chain"] == {"harmful": 16, "harmless": 16}
    assert s["directions"]["wide"] == {"harmful": 160, "harmless": 16 + 72}
    report = json.loads((wide_search["root"] / "out" / "search.json").read_text())
    sources = [t["params"]["source"] for t in sorted(report["trials_all"], key=lambda t: t["number"])]
    assert sources[:3] == ["chain", "wide", "wide"] and set(sources[3:]) <= {"wide"}  # twins keep their source
    finalists = {t["number"]: t for t in s["finalists"]}
    assert 0 in finalists and 1 in finalists  # the plain edit and its counterpart with the wider direction
    for twin, of in s["twins"].items():  # matched to a little stronger than the plain edit by refusal likelihood
        assert finalists[int(twin)]["likelihood"] < finalists[0]["likelihood"]
        assert finalists[int(twin)]["params"]["source"] == sources[int(of)]
    plain, wide_plain = sorted(report["trials_all"], key=lambda t: t["number"])[:2]
    assert plain["params"] | {"source": "wide"} == wide_plain["params"]  # the plain edit, the wider direction
    assert (plain["refusal"], plain["kl"]) != (wide_plain["refusal"], wide_plain["kl"])  # another direction
    assert s["prompts"]["confirm"]["harmless"] == s["prompts"]["trial"]["harmless"] + 72  # + the KL pool
    assert wide_search["restored"]
    shown = [line for line in wide_search["lines"] if line.startswith("trial ") and "/3]" in line]
    assert ["(own direction)" in line.split("|")[0] for line in shown] == [False, True, True]
    assert any("measuring the search's own directions from 160 harmful / 88 harmless" in x
               for x in wide_search["lines"])


def test_the_saved_directions_and_recipe_are_those_of_the_chosen_trial(wide_search):
    out = wide_search["root"] / "out"
    s = wide_search["result"]["search"]
    chosen = s["directions"]["chosen"]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["prompts"]["harmful"]["measure_size"] == s["directions"][chosen]["harmful"]
    saved = dirs.load(out)
    assert saved.info["prompts_split"]["harmful"]["measure_size"] == s["directions"][chosen]["harmful"]


@pytest.mark.parametrize("chosen", ["wide", "chain"])
def test_the_card_says_when_the_chosen_edit_removes_the_searchs_own_directions(wide_search, tmp_path, chosen):
    import shutil

    from pipeline.publish.card import render_card

    copy = tmp_path / "out"
    shutil.copytree(wide_search["root"] / "out", copy)
    recipe = json.loads((copy / "recipe.json").read_text())
    recipe["search"]["directions"]["chosen"] = chosen
    (copy / "recipe.json").write_text(json.dumps(recipe))
    sentence = "removes the search's own refusal directions, measured from 160 harmful and 88 harmless prompts"
    assert (sentence in render_card(copy, "someone/demo-searched")) == (chosen == "wide")


def test_wide_prompts_alone_turn_the_default_fit_and_confirm_prompts_off():
    from pipeline.configs import build_config

    default = SearchConfig()
    assert default.fit_steps > 0 and default.confirm_prompts > 0  # on by default: they beat the plain edit on Qwen
    wide = build_config(SearchConfig, {"wide_prompts": 64})  # as the CLI and the app build it
    assert (wide.wide_prompts, wide.fit_steps, wide.confirm_prompts) == (64, 0, 0)
    both = build_config(SearchConfig, {"wide_prompts": 64, "confirm_prompts": 8})  # given together: _check_job refuses
    assert (both.fit_steps, both.confirm_prompts) == (0, 8)
    assert build_config(SearchConfig, {"wide_prompts": 0}).fit_steps == default.fit_steps
