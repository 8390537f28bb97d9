"""Tuning defaults on a model they were not tuned on: a second toy chat model, built like the demo but with
another seed and another (smaller) vocabulary, so its weights, tokenizer and refusal direction all differ.

DPO with every default must remove its refusals, and abliterate-then-heal must bring its KL divergence back
down without bringing the refusals back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.edit.abliterate import EditConfig
from pipeline.edit.stages import PromptsConfig
from pipeline.evaluation.evaluate import EvalConfig
from pipeline.io.demo import DemoSpec, build_demo
from pipeline.orchestrator.run import AbliterateJob, abliterate
from pipeline.tuning.tune import HEAL, TuneConfig, heal, tune

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TOY = DemoSpec(seed=7, vocab_size=640)
PROMPTS = PromptsConfig(harmful="demo-harmful", harmless="demo-harmless", max_prompts=160, max_eval=80)
EVAL = EvalConfig(max_new_tokens=24)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("toy")
    build_demo(TOY, root / "model")
    # The edit on every layer at full strength (the paper's; `standard` before it was centred on the
    # direction's layer): on this 6-layer toy the centred default leaves 32.5% refused, too weak a start
    # for a healing test. Healing is what is tested here, not the edit's defaults.
    every_layer = EditConfig(attn={"width": 2.0}, mlp={"width": 2.0})
    ablit = abliterate(AbliterateJob(model=str(root / "model"), out=root / "abliterated", prompts=PROMPTS,
                                     eval=EVAL, edit=every_layer))
    return {"root": root, "model": str(root / "model"), "abliterated": root / "abliterated", "eval": ablit["eval"]}


def test_the_toy_refuses_and_abliteration_damages_it(toy):
    rate = toy["eval"]["refusal_rate"]
    assert rate["base"] >= 0.9  # a refusing model, like the demo
    assert rate["model"] <= 0.2
    assert toy["eval"]["kl_divergence"] > 0.01  # something for healing to repair


def test_default_dpo_removes_the_refusals_of_a_model_it_was_not_tuned_on(toy):
    from pipeline.edit.stages import resolve_prompts
    from pipeline.io.output import write_jsonl
    from pipeline.tuning.pairs import make_pairs

    prompts = resolve_prompts(toy["model"], PROMPTS).harmful.measure
    rows, stats = make_pairs(toy["model"], str(toy["abliterated"]), prompts, max_new_tokens=24)
    data = write_jsonl(rows, toy["root"] / "pairs.jsonl")
    summary = tune(toy["model"], str(data), toy["root"] / "dpo", TuneConfig(max_length=96), prompts_cfg=PROMPTS,
                   eval_cfg=EVAL)
    rate = summary["eval"]["refusal_rate"]
    assert stats["pairs"] >= 20
    assert rate["base"] >= 0.9 and rate["model"] <= 0.5, rate


def test_heal_lowers_kl_and_keeps_refusals_removed(toy):
    out = toy["root"] / "healed"
    summary = heal(toy["abliterated"], toy["model"], out, HEAL.model_copy(update={"max_length": 96}),
                   prompts_cfg=PROMPTS,
                   eval_cfg=EVAL, max_new_tokens=24)
    before, after = toy["eval"], summary["eval"]
    assert after["kl_divergence"] < before["kl_divergence"], (before["kl_divergence"], after["kl_divergence"])
    assert after["refusal_rate"]["model"] <= before["refusal_rate"]["model"] + 0.05
    recipe = json.loads((out / "recipe.json").read_text())
    pairs = recipe["heal_pairs"]
    assert pairs["refusal_pairs"] > 0 and pairs["harmless_pairs"] > 0
    assert pairs["pairs"] == pairs["refusal_pairs"] + pairs["harmless_pairs"]
    assert recipe["abliteration_eval"]["kl_divergence"] == pytest.approx(before["kl_divergence"])
    card = _card(out)
    rows = [[c.strip() for c in line.split("|")[2:5]] for line in card.splitlines()
            if line.startswith("| KL divergence from base")]
    healing = [r for r in rows if r[0] == "0" and all(c.replace(".", "", 1).isdigit() for c in r[1:])]
    assert len(healing) == 1  # base, after abliteration, after healing (4 significant digits)
    assert [float(c) for c in healing[0][1:]] == pytest.approx([before["kl_divergence"], after["kl_divergence"]],
                                                               rel=1e-3)
    assert "### Healing" in card


def _card(folder: Path) -> str:
    from pipeline.publish.card import render_card

    return render_card(folder, "someone/toy-healed")
