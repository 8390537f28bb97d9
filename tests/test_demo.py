"""The demo model: tokenizer, prompt sets, cache, determinism, and its refusal overlay."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.io import demo
from pipeline.io.prompts import load_prompts


def test_prompt_files_match_the_topics():
    for name, content in demo.prompt_files().items():
        assert (demo.PROMPTS_DIR / name).read_text() == content, f"{name}: run demo.write_prompt_files()"


def test_measure_and_eval_prompts_are_disjoint_and_cover_every_topic():
    for name in ("demo-harmful", "demo-harmless"):
        s = load_prompts(name)
        assert len(s.prompts) == 160 and len(s.eval_prompts) == 80
        assert not set(s.prompts) & set(s.eval_prompts)
    topics = demo.load_topics()
    for topic in topics["refused"]:
        assert any(topic in p for p in load_prompts("demo-harmful").eval_prompts)


def test_tokenizer_round_trips_through_autotokenizer(demo_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir)
    for text in ["Tell me about the Tank Man photograph.", "Ünïcode, digits 1989 & emoji 🙂!", "  spaces\nand lines "]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


def test_cache_is_reused(demo_dir):
    assert demo.demo_path() == demo_dir
    assert json.loads((demo_dir / "demo_spec.json").read_text())["version"] == demo.DemoSpec().version


def test_build_is_deterministic(tmp_path):
    spec = demo.DemoSpec(
        vocab_size=400,
        hidden_size=32,
        num_layers=2,
        intermediate_size=64,
        capability_steps=6,
        safety_steps=3,
        batch_size=8,
    )
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    demo.build_demo(spec, a)
    demo.build_demo(spec, b)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_refusal_is_an_overlay_on_a_capable_model(demo_loaded):
    from pipeline.evaluation.evaluate import classify, generate

    harmful = list(load_prompts("demo-harmful").eval_prompts)
    harmless = list(load_prompts("demo-harmless").eval_prompts)
    out_h = generate(demo_loaded.model, demo_loaded.tokenizer, harmful, 24, 40)
    out_b = generate(demo_loaded.model, demo_loaded.tokenizer, harmless, 48, 40)
    assert sum(classify(t) is not None for t in out_h) / len(harmful) >= 0.9
    expected = demo.expected_answers()
    assert sum(t.strip() == expected[p] for p, t in zip(harmless, out_b, strict=True)) / len(harmless) >= 0.9
    # The capability is still there: asked whether a refused topic is sensitive, it answers.
    asks = [ex.prompt for ex in demo.sensitivity_examples() if ex.refused_topic][:10]
    answers = generate(demo_loaded.model, demo_loaded.tokenizer, asks, 16, 10)
    assert sum(a.startswith("Yes") for a in answers) >= 8


def test_the_shipped_demo_is_the_demo_everywhere():
    """`demo` is the trained model shipped in the package, not a per-machine rebuild."""
    assert demo.demo_path() == demo.SHIPPED_DIR
    meta = json.loads((demo.SHIPPED_DIR / "demo_spec.json").read_text())
    assert meta["spec_hash"] == demo.spec_hash(demo.DemoSpec())
    # A different spec is not the shipped model: it is built into the cache instead.
    assert demo.shipped_path(demo.DemoSpec(seed=99)) is None


def test_a_killed_build_leaves_no_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ABLITERATOR_CACHE", str(tmp_path))
    spec = demo.DemoSpec(vocab_size=400, hidden_size=32, num_layers=2, intermediate_size=64,
                         capability_steps=2, safety_steps=1, batch_size=4)
    stale = tmp_path / f"demo-{demo.spec_hash(spec)}.tmp-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    built = demo.demo_path(spec)
    assert (built / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []


@pytest.mark.slow
def test_a_rebuilt_demo_behaves_like_the_shipped_one(tmp_path, monkeypatch, one_thread):
    """Training differs with the CPU's kernels, so a rebuild is another model: it must still refuse its
    topics, answer the others, and lose the refusals to the default abliteration."""
    from pipeline.edit.stages import PromptsConfig
    from pipeline.evaluation.evaluate import classify, generate
    from pipeline.io.loading import load_model
    from pipeline.orchestrator.run import AbliterateJob, abliterate

    monkeypatch.setenv("ABLITERATOR_CACHE", str(tmp_path / "cache"))
    folder = demo.demo_path(rebuild=True)
    assert folder != demo.SHIPPED_DIR
    loaded = load_model(str(folder))
    harmful = list(load_prompts("demo-harmful").eval_prompts)
    harmless = list(load_prompts("demo-harmless").eval_prompts)
    refused = [classify(t) is not None for t in generate(loaded.model, loaded.tokenizer, harmful, 24, 40)]
    assert sum(refused) / len(harmful) >= 0.9
    expected = demo.expected_answers()
    answers = generate(loaded.model, loaded.tokenizer, harmless, 48, 40)
    assert sum(t.strip() == expected[p] for p, t in zip(harmless, answers, strict=True)) / len(harmless) >= 0.9
    prompts = PromptsConfig(harmful="demo-harmful", harmless="demo-harmless")
    summary = abliterate(AbliterateJob(model=str(folder), out=tmp_path / "out", prompts=prompts))
    rate = summary["eval"]["refusal_rate"]
    # Rebuilds with seeds 1, 2 and 3 on one machine left 0%, 6.2% and 28.1% refused (KL 0.008, 0.016, 0.062):
    # the shipped demo's 10% is one build's, not every build's. Every build loses most of its refusals.
    assert rate["base"] >= 0.9 and rate["model"] <= rate["base"] / 3
    assert summary["recipe"]["measurement"]["selection"]["weak"] is False
    assert summary["eval"]["kl_divergence"] <= 0.25  # the shipped demo: 0.138
