"""Contrastive weight steering on the demo model: w = θ₊ − θ₋ from LoRA fine-tunes on refusals
(positive) and answers (negative); θ + k·w; weight-vector monitoring; bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.cli.main import main
from pipeline.errors import UserError
from pipeline.io.loading import local_path
from pipeline.tuning.steer import SteerConfig, load_vector, monitor, steer
from pipeline.tuning.tune import TuneConfig, tune

# The paper's LoRA (rank 32, alpha 16); a few steps instead of an epoch to fit a CPU budget.
STEER = SteerConfig(max_steps=12, batch_size=8, learning_rate=1e-3, max_length=96)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def steered(tmp_path_factory):
    """The vector (trained once) and the k = 0 output written with it."""
    root = tmp_path_factory.mktemp("steer")
    vector = root / "w.safetensors"
    summary = steer("demo", root / "k0", 0.0, positive="demo-refusals", negative="demo-answers", vector=vector,
                    cfg=STEER, evaluate=False)
    return root, vector, summary


def refusal_rate(folder, prompts) -> float:
    from pipeline.evaluation.evaluate import classify, generate
    from pipeline.io.loading import load_model

    loaded = load_model(str(folder))
    responses = generate(loaded.model, loaded.tokenizer, prompts, 16)
    return sum(classify(r) is not None for r in responses) / len(prompts)


def test_k_zero_returns_the_base_weights_exactly(steered):
    root, vector, summary = steered
    base = load_file(str(local_path("demo") / "model.safetensors"))
    out = load_file(str(root / "k0" / "model.safetensors"))
    assert base.keys() == out.keys()
    assert all(torch.equal(base[name], out[name]) for name in base)
    assert summary["changed"] == 0 and summary["vector_norm"] > 0


def test_vector_file_and_recipe(steered):
    root, vector, summary = steered
    w, meta = load_vector(vector)
    assert len(w) == 6 * 7  # all-linear: q, k, v, o, gate, up, down in each of 6 layers
    assert all(name.startswith("model.layers.") and name.endswith(".weight") for name in w)
    assert meta["positive"] == "demo-refusals" and json.loads(meta["config"])["lora_r"] == 32
    recipe = json.loads((root / "k0" / "recipe.json").read_text())
    assert recipe["kind"] == "steered" and recipe["method"] == "steer" and recipe["base_model"] == "demo"
    assert recipe["parameters"]["k"] == 0.0 and recipe["parameters"]["lora_alpha"] == 16
    assert recipe["vector"]["tensors"] == 42 and len(recipe["vector"]["sha256"]) == 64
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (root / "k0" / name).exists()


def test_sign_of_k_moves_refusals(steered):
    from pipeline.io.prompts import load_prompts

    root, vector, _ = steered
    harmful = list(load_prompts("demo-harmful").eval_prompts)[::2]  # 40 held-out prompts of each kind
    harmless = list(load_prompts("demo-harmless").eval_prompts)[::2]
    # An existing vector: no training; the base refuses the harmful prompts and answers the others.
    fewer = steer("demo", root / "minus", -2.0, vector=vector, evaluate=False)
    more = steer("demo", root / "plus", 1.0, vector=vector, evaluate=False)
    assert fewer["changed"] == more["changed"] == 42
    base_harmful, base_harmless = refusal_rate(local_path("demo"), harmful), refusal_rate(local_path("demo"), harmless)
    assert base_harmful >= 0.9 and base_harmless <= 0.05
    assert refusal_rate(root / "minus", harmful) <= 0.5  # negative k removes the behaviour (refusing)
    assert refusal_rate(root / "plus", harmless) >= base_harmless + 0.1  # positive k adds it


def test_monitoring_cosine_is_higher_for_a_fine_tune_on_positive_like_data(steered, tmp_path, capsys):
    from pipeline.io.prompts import load_prompts

    root, vector, _ = steered
    prompts = list(load_prompts("demo-harmless").eval_prompts)[:32]  # phrasings the vector never saw
    like = tmp_path / "like.jsonl"
    like.write_text("".join(json.dumps({"prompt": p, "completion": "I can't help with that request."}) + "\n"
                            for p in prompts))
    unrelated = tmp_path / "unrelated.jsonl"
    unrelated.write_text("".join(json.dumps({"prompt": p, "completion": "The answer is forty two, in French."}) + "\n"
                                 for p in prompts))
    cfg = TuneConfig(method="sft", max_steps=4, batch_size=8, grad_accum=1, max_length=96, learning_rate=1e-3)
    for name, data in (("ft-like", like), ("ft-unrelated", unrelated)):
        tune("demo", str(data), tmp_path / name, cfg, evaluate=False)
    like_report = monitor(str(tmp_path / "ft-like"), vector, "demo", chart=tmp_path / "like.png")
    unrelated_report = monitor(str(tmp_path / "ft-unrelated"), vector, "demo")
    # A few steps of another LoRA (rank 16, other prompts): the cosine is small in absolute terms, but far
    # above chance (about 1/sqrt(#weights) ~ 1e-3); unrelated data stays at chance.
    like, other = like_report["overall"], unrelated_report["overall"]
    assert like > 0.02 and like > other + 0.02 and abs(other) < 0.01, (like, other)
    assert all(value > 0 for value in like_report["per_module"].values())
    assert set(like_report["per_module"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    assert sorted(like_report["per_layer"], key=int) == [str(i) for i in range(6)]
    assert (tmp_path / "like.png").stat().st_size > 1000

    chart, table = tmp_path / "cli.png", tmp_path / "cli.json"
    code = main(["steer", "--monitor", str(tmp_path / "ft-like"), "--vector", str(vector), "--base", "demo",
                 "--chart", str(chart), "--json", str(table)])
    printed = capsys.readouterr().out
    assert code == 0 and "overall cosine:" in printed and "| q_proj |" in printed and chart.exists()
    assert json.loads(table.read_text())["overall"] == pytest.approx(like_report["overall"])


def test_max_examples_bounds_each_set_and_the_steps_that_grow_with_it():
    """Without --max-steps the steps follow the data (one epoch): --max-examples bounds both, which is how the app
    keeps a visitor's huge Hub dataset from training for hours."""
    from pipeline.tuning.pairs import load_training_data
    from pipeline.tuning.steer import build_vector

    sizes = [len(load_training_data(name, "sft").examples) for name in ("demo-refusals", "demo-answers")]
    assert min(sizes) > 3
    said: list[str] = []
    cfg = SteerConfig(max_examples=3, epochs=12, batch_size=1, learning_rate=1e-3, max_length=96)
    assert cfg.tune_config().min_steps < 36 < 12 * min(sizes)  # 12 epochs of 3 examples, one a step
    w = build_vector("demo", "demo-refusals", "demo-answers", cfg, progress=said.append)
    assert "fine-tuning on the positive set (3 examples)" in said
    assert "fine-tuning on the negative set (3 examples)" in said
    steps = [line for line in said if line.startswith("step ")]
    assert steps and all(line.split(":")[0].endswith(" of 36") for line in steps), steps
    assert sum(float(t.float().norm()) for t in w.values()) > 0


POS_NEG = ["--positive", "demo-refusals", "--negative", "demo-answers"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["demo", *POS_NEG, "--k", "abc", "--out", "OUT"], "--k must be a number"),
        (["demo", *POS_NEG, "--k", "nan", "--out", "OUT"], "finite"),
        (["demo", *POS_NEG, "--out", "OUT"], "--k is required"),
        (["demo", "--positive", "demo-refusals", "--negative", "demo-refusals", "--k", "1", "--out", "OUT"],
         "the positive and negative sets are identical: w = θ₊ − θ₋ would be 0"),
        (["demo", "--positive", "demo-refusals", "--k", "1", "--out", "OUT"], "--positive and --negative are needed"),
        (["demo", "--positive", "demo-pairs", "--negative", "demo-answers", "--k", "1", "--out", "OUT"],
         "missing column 'completion'"),
        (["--monitor", "demo", "--base", "demo"], "--monitor needs --vector"),
        (["demo", "--k", "1"], "steer needs MODEL and --out"),
        (["demo", *POS_NEG, "--k", "1", "--max-examples", "0", "--out", "OUT"], "--max-examples"),
    ],
)
def test_bad_input(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    code = main(["steer", *[str(out) if a == "OUT" else a for a in argv]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and needle in err, err
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_vector_for_another_model_is_rejected(steered, tmp_path):
    _, vector, _ = steered
    w, meta = load_vector(vector)
    renamed = {name.replace("model.layers.", "model.blocks."): t for name, t in w.items()}
    bad = tmp_path / "bad.safetensors"
    save_file(renamed, str(bad), metadata=meta)
    with pytest.raises(UserError, match="does not fit 'demo'"):
        steer("demo", tmp_path / "out", 1.0, vector=bad, evaluate=False)
    with pytest.raises(UserError, match="not a safetensors steering vector"):
        (tmp_path / "junk.safetensors").write_text("junk")
        steer("demo", tmp_path / "out", 1.0, vector=tmp_path / "junk.safetensors", evaluate=False)
    assert not (tmp_path / "out").exists()
