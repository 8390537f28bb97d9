"""DPO / SFT with LoRA on the demo model: refusals removed by DPO on `pairs` data, the output
contract, merged = base + adapter, adapter-only output, bad input, and `accelerate launch`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cli.main import main
from pipeline.cli.tune import add_parsers
from pipeline.io.output import sha256_file
from pipeline.tuning.tune import HEAL, TuneConfig, heal, quiet_renames, tune
from tests.test_pairs import abliterated_demo, demo_pairs_file

ROOT = Path(__file__).resolve().parents[1]
# A CPU budget: 16 DPO steps of 8 pairs, LoRA r16 / alpha 32, beta 0.1 (the defaults otherwise).
DPO = TuneConfig(max_steps=16, batch_size=8, grad_accum=1, max_length=96, learning_rate=3e-4, scheduler="constant",
                 keep_adapter=True, logging_steps=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def quick_eval():
    from pipeline.evaluation.evaluate import EvalConfig

    return EvalConfig(max_new_tokens=24, perplexity=False)


@pytest.fixture(scope="module")
def dpo(tmp_path_factory):
    pairs = demo_pairs_file()
    out = tmp_path_factory.mktemp("tune") / "demo-dpo"
    summary = tune("demo", str(pairs), out, DPO, eval_cfg=quick_eval())  # its time: bench/bench_tune.py
    return out, summary


def test_dpo_on_pairs_removes_refusals(dpo):
    out, summary = dpo
    results = json.loads((out / "eval_results.json").read_text())
    n = results["num_prompts"]["harmful"]
    for side in ("base", "model"):  # each rate is the refusals counted on the evaluation prompts
        assert results["refusal_rate"][side] == pytest.approx(results["refusals"][side]["total"] / n)
    assert results["refusal_rate"] == summary["eval"]["refusal_rate"]
    assert results["num_prompts"]["harmful"] == 80  # the held-out demo-harmful evaluation prompts
    assert results["prompt_sources"]["harmful"] == {"source": "demo-harmful", "split": "eval"}
    assert results["refusal_rate"]["base"] >= 0.9
    assert results["refusal_rate"]["model"] <= 0.5, results["samples"]
    assert results["kl_divergence"] <= 0.1


def test_dpo_keeps_harmless_answers(dpo):
    from pipeline.evaluation.evaluate import generate
    from pipeline.io.demo import expected_answers
    from pipeline.io.loading import load_model
    from pipeline.io.prompts import load_prompts

    out, _ = dpo
    tuned = load_model(str(out))
    harmless = list(load_prompts("demo-harmless").eval_prompts)
    answers = generate(tuned.model, tuned.tokenizer, harmless, 48)
    expected = expected_answers()
    correct = sum(a.strip() == expected[p] for p, a in zip(harmless, answers, strict=True))
    assert correct / len(harmless) >= 0.8


def test_output_contract(dpo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = dpo
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["kind"] == "dpo" and recipe["method"] == "dpo" and recipe["base_model"] == "demo"
    params = recipe["parameters"]
    assert params["loss"] == "sigmoid" and params["beta"] == 0.1
    assert (params["lora_r"], params["lora_alpha"], params["max_steps"]) == (16, 32, 16)
    assert recipe["data"]["examples"] >= 100 and recipe["datasets"] == [] and recipe["seed"] == 0
    assert recipe["prompts"]["harmful"]["source"] == "demo-harmful"
    assert {"torch", "transformers", "trl", "peft"} <= set(recipe["versions"])
    assert list(recipe["shards"]) == ["model.safetensors"]
    for name, digest in recipe["shards"].items():
        assert sha256_file(out / name) == digest
    for name in ("config.json", "generation_config.json", "tokenizer.json", "eval_results.json"):
        assert (out / name).exists(), name
    assert not (out / "README.md").exists()
    assert not list(out.parent.glob(".*"))  # no temporary or training folders left
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 6 and tok.decode(tok("hi there")["input_ids"]) == "hi there"


def test_merged_logits_equal_base_plus_adapter(dpo, demo_loaded):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.io.loading import local_path

    out, _ = dpo
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(local_path("demo")).eval()
    with quiet_renames():
        with_adapter = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    tok = demo_loaded.tokenizer
    texts = tok.apply_chat_template([[{"role": "user", "content": "Tell me about the Dalai Lama."}],
                                     [{"role": "user", "content": "Explain volcanoes to me."}]],
                                    add_generation_prompt=True, tokenize=False)
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        a = merged(**enc).logits
        b = with_adapter(**enc).logits
        plain = demo_loaded.model(**enc).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert not torch.allclose(a, plain, atol=1e-3)  # the adapter did change the model


def test_sft_adapter_only_loads_with_peft(tmp_path, demo_loaded):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.io.loading import local_path

    out = tmp_path / "sft-adapter"
    cfg = TuneConfig(method="sft", adapter_only=True, max_steps=2, batch_size=4, grad_accum=1, max_length=64,
                     learning_rate=1e-3, lora_r=4, lora_alpha=8, target_modules="q_proj,v_proj")
    summary = tune("demo", "demo-answers", out, cfg, evaluate=False)
    assert summary["eval"] is None and not (out / "eval_results.json").exists()
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["kind"] == "sft" and recipe["parameters"]["loss"] == "nll" and recipe["adapter_only"] is True
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert Path(config["base_model_name_or_path"]) == local_path("demo").resolve()
    base = AutoModelForCausalLM.from_pretrained(local_path("demo"))
    with quiet_renames():
        model = PeftModel.from_pretrained(base, str(out))
        assert AutoPeftModelForCausalLM.from_pretrained(str(out)) is not None
    assert len([n for n, _ in model.named_parameters() if "lora_A" in n]) == 12  # 6 layers x (q, v)


def test_heal_with_given_pairs_records_both_stages(tmp_path):
    out = tmp_path / "healed"
    cfg = TuneConfig(max_steps=1, batch_size=2, grad_accum=1, max_length=64, learning_rate=1e-4)
    summary = heal(abliterated_demo(), "demo", out, cfg, data=str(demo_pairs_file()), evaluate=False)
    recipe = summary["recipe"]
    assert recipe["kind"] == "dpo" and recipe["base_model"] == "demo" and recipe["heal_pairs"] is None
    assert recipe["tuned_model"] == str(abliterated_demo())
    assert recipe["abliteration"]["kind"] == "abliterated"
    # SFT (the default) heals on the chosen side of the same pairs: the abliterated model's answers.
    sft = heal(abliterated_demo(), "demo", tmp_path / "sft", cfg.model_copy(update={"method": "sft"}),
               data=str(demo_pairs_file()), evaluate=False)["recipe"]
    assert sft["kind"] == "sft" and sft["data"]["kind"] == "sft"
    assert sft["data"]["examples"] == recipe["data"]["examples"]


def test_distillation_heals_with_the_pairs_it_makes(tmp_path):
    from safetensors.torch import load_file

    from pipeline.errors import UserError

    cfg = HEAL.model_copy(update={"max_steps": 2, "batch_size": 2, "grad_accum": 1, "max_length": 64})
    with pytest.raises(UserError, match="drop --data"):
        heal(abliterated_demo(), "demo", tmp_path / "given", cfg, data=str(demo_pairs_file()), evaluate=False)
    summary = heal(abliterated_demo(), "demo", tmp_path / "healed", cfg, evaluate=False, max_new_tokens=16)
    recipe = summary["recipe"]
    assert recipe["kind"] == "distill" and recipe["parameters"]["loss"] == "forward_kl"
    assert recipe["heal_pairs"]["refusal_pairs"] > 0 and recipe["heal_pairs"]["harmless_pairs"] > 0
    assert (tmp_path / "healed" / "heal_pairs.jsonl").is_file() and not list(tmp_path.glob(".*"))
    # Two steps moved the merged weights away from the abliterated ones (LoRA's B starts at zero).
    before = load_file(str(abliterated_demo() / "model.safetensors"))
    after = load_file(str(tmp_path / "healed" / "model.safetensors"))
    moved = [k for k in before if k.endswith("q_proj.weight") and not torch.equal(before[k], after[k])]
    assert len(moved) == 6


def test_add_parsers_registers_the_commands():
    import argparse

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tune", "demo", "--data", "d.jsonl", "--out", "o", "--loss", "ipo", "--beta", "0.2",
                              "--lora-r", "8", "--lora-alpha", "16", "--max-steps", "5", "--adapter-only"])
    assert callable(args.func) and (args.loss, args.beta, args.lora_r, args.adapter_only) == ("ipo", 0.2, 8, True)
    for argv in (["pairs", "--model", "a", "--edited", "b", "--out", "p.jsonl"],
                 ["steer", "demo", "--positive", "a", "--negative", "b", "--k", "-1", "--out", "o"],
                 ["steer", "--monitor", "ft", "--vector", "w.safetensors", "--base", "demo"]):
        assert callable(parser.parse_args(argv).func)


@pytest.mark.parametrize(
    "content,extra,needle",
    [
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen"\n', [], "line 2 is not valid JSON"),
        ('{"prompt": "a", "chosen": "b"}\n', [], "line 1: missing column 'rejected'"),
        ("\n", [], "is empty"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', ["--method", "sft", "--loss", "hinge"],
         "not a sft loss"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', ["--beta", "0"], "--beta"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', ["--method", "distill"], "abliterate --heal"),
        ('{"prompt": "a", "completion": "b"}\n', [], "missing column 'chosen'"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', ["--max-examples", "0"], "--max-examples"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', ["--harmful", "no_such_file.txt"], "not found"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', ["--eval-markers-file", "none.json"],
         "markers file not found"),
    ],
)
def test_bad_input_is_one_line_before_any_training(tmp_path, capsys, content, extra, needle):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    code = main(["tune", "demo", "--data", str(data), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and needle in err, err
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_existing_output_is_kept(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code = main(["tune", "demo", "--data", "demo-pairs", "--out", str(out)])
    assert code == 2 and "already exists" in capsys.readouterr().err


def launch(tmp_path, mode: list[str], threads: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`accelerate launch ... -m pipeline.tune` (1 step, 4 pairs, no evaluation) in a subprocess."""
    out = tmp_path / "launched"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": threads}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "pipeline.tune", "demo", "--data", "demo-pairs", "--max-examples", "4", "--out", str(out),
           "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--max-length", "64", "--no-eval"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["kind"] == "dpo" and recipe["data"]["examples"] == 4
    assert recipe["command"].startswith("python -m pipeline tune demo --data demo-pairs")
    assert (out / "model.safetensors").exists() and not list(tmp_path.glob(".*"))
    return proc, out


def test_accelerate_launch_single_process_cpu(tmp_path):
    """The training entry point runs unchanged under `accelerate launch` (1 CPU process, 1 step)."""
    proc, out = launch(tmp_path, ["--cpu", "--num_processes", "1"], "1")
    assert f"output: {out}" in proc.stdout


def test_accelerate_launch_two_processes_cpu(tmp_path):
    """Data parallel over 2 CPU processes (gloo): both train, only the main process writes the output."""
    proc, out = launch(tmp_path, ["--multi_gpu", "--num_processes", "2"], "1")
    assert proc.stdout.count("training a LoRA adapter") == 2
    assert proc.stdout.count(f"output: {out}") == 1
