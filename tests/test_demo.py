"""The demo model: tokenizer, prompt sets, cache, determinism, and its refusal overlay."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from pipeline import demo
from pipeline.prompts import load_prompts


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
    from pipeline.evaluate import classify, generate

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
