"""Reasoning models (qwen3, gpt-oss): the template's empty think block is pre-filled, KL is read at the
first answer token, measurement uses the same prompts, and an unfinished think is undetermined.

Tiny random models with their families' real chat templates (tests/chat_templates) and small
tokenizers that hold the same special tokens.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.evaluation.evaluate import EvalConfig, evaluate, first_token_logprobs
from pipeline.io.chat import format_prompts, think_prefill
from tests.tiny_models import tiny_chat_model, tiny_chat_tokenizer

PREFILL = {"qwen3": "<think>\n\n</think>\n\n", "gpt_oss": "<|channel|>final<|message|>"}
PROMPTS = ["Tell me about volcanoes.", "Explain the water cycle, please.", "Hi"]
# The token a model that never stops reasoning emits over and over.
THINKER = {"qwen3": "<think>", "gpt_oss": "<|channel|>"}


@pytest.fixture(scope="module", params=sorted(PREFILL))
def chat(request, one_thread):
    model, tok = tiny_chat_model(request.param)
    return request.param, model, tok


def test_prefill_is_read_from_the_template() -> None:
    for model_type, prefill in PREFILL.items():
        tok = tiny_chat_tokenizer(model_type)
        assert think_prefill(tok) == prefill
        assert format_prompts(tok, ["Hi"])[0].endswith(("assistant\n" if model_type == "qwen3" else "assistant")
                                                       + prefill)
        assert not format_prompts(tok, ["Hi"], prefill_think=False)[0].endswith(prefill)
    # A template that opens the block itself (Qwen3-Thinking style) is closed, not opened again.
    thinking = tiny_chat_tokenizer("qwen3")
    switch = ("{{- '<|im_start|>assistant\\n' }}\n    {%- if enable_thinking is defined and enable_thinking is false %}"
              "\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}")
    assert switch in thinking.chat_template
    thinking.chat_template = thinking.chat_template.replace(switch, "{{- '<|im_start|>assistant\\n<think>\\n' }}")
    assert format_prompts(thinking, ["Hi"], prefill_think=False)[0].endswith("assistant\n<think>\n")
    assert think_prefill(thinking) == "\n</think>\n\n"
    # A chat template without reasoning (ChatML, as the demo's) gets nothing.
    plain = tiny_chat_tokenizer("qwen3")
    plain.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert think_prefill(plain) == ""


def test_kl_reads_the_first_answer_token(chat) -> None:
    model_type, model, tok = chat
    logprobs = first_token_logprobs(model, tok, PROMPTS, batch_size=2)
    for i, text in enumerate(format_prompts(tok, PROMPTS)):
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert tok.decode(ids[0]).endswith(PREFILL[model_type])  # the last position is after the think block
        with torch.no_grad():
            expected = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        torch.testing.assert_close(logprobs[i], expected, atol=1e-4, rtol=1e-4)
    thinking = first_token_logprobs(model, tok, PROMPTS, batch_size=2, prefill_think=False)
    assert (thinking - logprobs).abs().max() > 1e-3  # without the pre-fill: another position


def test_measurement_and_layer_choice_read_the_same_prompts(chat) -> None:
    from pipeline.edit.activations import collect
    from pipeline.edit.selection import replies_with_activations

    _, model, tok = chat
    acts = collect(model, tok, PROMPTS, batch_size=2, keep_samples=True)  # the direction's means
    replied = replies_with_activations(model, tok, PROMPTS, tokens=2, batch_size=2)  # prompt filter, layer choice
    for i, text in enumerate(format_prompts(tok, PROMPTS)):
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        # hidden_states[1] is layer 0's raw output (the last entry alone is taken after the final norm).
        torch.testing.assert_close(acts.samples[i, 0], hidden[1][0, -1].float(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(replied.samples[i, 0], hidden[1][0, -1].float(), atol=1e-4, rtol=1e-4)


def test_evaluate_a_reasoning_model(chat) -> None:
    _, model, tok = chat
    cfg = EvalConfig(max_new_tokens=6, perplexity=False, num_samples=2)
    results = evaluate(model, tok, PROMPTS, PROMPTS[:2], cfg, base=(model, tok), groups=["a", "a", "b"])
    assert results["generation"]["prefill_think"] is True
    assert results["kl_divergence"] < 1e-6
    judged = results["num_prompts"]["harmful"] - results["undetermined"]["model"]
    assert results["refusals"]["model"]["total"] <= judged
    assert set(results["by_set"]) == {"a", "b"} and results["by_set"]["b"]["n"] == 1


def _endless_thinker(model, tok, token: str):
    """The model with an output layer that always picks ``token``: its reasoning never ends."""
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[tok.convert_tokens_to_ids(token)] = 10.0
    model.lm_head = head
    return model


def test_unfinished_thinking_is_undetermined_not_a_refusal(chat) -> None:
    import copy

    model_type, model, tok = chat
    thinker = _endless_thinker(copy.deepcopy(model), tok, THINKER[model_type])
    cfg = EvalConfig(max_new_tokens=5, perplexity=False, prefill_think=False)
    results = evaluate(thinker, tok, PROMPTS, [], cfg)
    assert results["undetermined"]["model"] == len(PROMPTS)
    assert results["refusals"]["model"]["total"] == 0  # not counted as refusals
    assert results["refusal_rate"]["model"] is None and results["refusal_interval"]["model"] is None
    assert all(THINKER[model_type] in s["model"] for s in results["samples"])
