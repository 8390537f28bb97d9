"""What gets published is what was edited: streaming copies only model files, edits that cannot
take effect are refused, and the count of changed tensors counts only tensors that changed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.edit.abliterate import EditConfig, apply_in_memory, apply_streaming
from pipeline.edit.architectures import find_writers, hidden_size_of, model_type_of, num_layers_of
from pipeline.errors import UserError
from pipeline.io.output import weight_shards
from tests.tiny_models import save_tiny, tiny_model


def _unit(n: int, seed: int = 0) -> torch.Tensor:
    r = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


def test_streaming_copies_only_config_tokenizer_and_generation_files(tmp_path):
    src = save_tiny("llama", tmp_path / "src", max_shard_size="60KB")
    source_files = {
        "README.md": "---\nbase_model: someone/else\n---\n# The source's card",
        "eval_results.json": json.dumps({"refusal_rate": {"model": 0.0}}),
        "recipe.json": json.dumps({"kind": "abliterated"}),
        "directions.json": "{}",
        "LICENSE": "licence of the source",
        "notes.txt": "the source's notes",
        "tokenizer_config.json": "{}",
        "tokenizer.json": "{}",
        "special_tokens_map.json": "{}",
        "chat_template.jinja": "{{ messages }}",
        "merges.txt": "#version: 0.2",
        "vocab.json": "{}",
    }
    for name, text in source_files.items():
        (src / name).write_text(text)
    model = tiny_model("llama")
    apply_streaming(src, tmp_path / "dst", _unit(hidden_size_of(model.config)), EditConfig().placed(0.5),
                    num_layers_of(model.config), model_type_of(model.config))
    copied = {p.name for p in (tmp_path / "dst").iterdir() if not p.name.endswith(".safetensors")}
    assert copied == {"config.json", "generation_config.json", "model.safetensors.index.json",
                      "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "chat_template.jinja",
                      "merges.txt", "vocab.json"}
    assert {p.name for p in weight_shards(tmp_path / "dst")} == {p.name for p in weight_shards(src)}


def _zero_one_writer(model) -> str:
    """Zero the first attention writer: any edit of a zero tensor leaves it zero."""
    mt = model_type_of(model.config)
    params = dict(model.named_parameters())
    name = next(m.name for m in find_writers(mt, params) if m.component == "attn")
    with torch.no_grad():
        params[name].zero_()
    return name


def test_in_memory_count_is_the_tensors_that_really_changed():
    model = tiny_model("llama")
    mt, n = model_type_of(model.config), num_layers_of(model.config)
    writers = [m for m in find_writers(mt, dict(model.named_parameters())) if m.component in ("attn", "mlp")]
    _zero_one_writer(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    changed = apply_in_memory(model, _unit(hidden_size_of(model.config), 3), EditConfig().placed(0.5), n, mt)
    really = sum(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert changed == really == len(writers) - 1


def test_streaming_count_is_the_tensors_that_really_changed(tmp_path):
    model = tiny_model("llama")
    zeroed = _zero_one_writer(model)
    model.save_pretrained(tmp_path / "src")
    mt, n = model_type_of(model.config), num_layers_of(model.config)
    changed = apply_streaming(tmp_path / "src", tmp_path / "dst", _unit(hidden_size_of(model.config), 3),
                              EditConfig().placed(0.5), n, mt)
    a, b = (load_file(str(tmp_path / side / "model.safetensors")) for side in ("src", "dst"))
    really = sum(not torch.equal(a[k], b[k]) for k in a)
    assert changed == really and torch.equal(a[zeroed], b[zeroed])


def test_offloaded_weights_are_refused_before_an_edit_that_would_change_nothing():
    from accelerate import cpu_offload

    model = tiny_model("llama")
    cpu_offload(model, execution_device=torch.device("cpu"))  # weights become meta placeholders + hooks
    with pytest.raises(UserError, match="--streaming") as err:
        apply_in_memory(model, _unit(hidden_size_of(model.config)), EditConfig().placed(0.5),
                        num_layers_of(model.config), model_type_of(model.config))
    assert "\n" not in str(err.value)


def test_quantized_weights_are_refused_in_memory():
    model = tiny_model("llama")
    name = next(n for n, _ in model.named_parameters() if "o_proj" in n)
    module = model.get_submodule(name.rsplit(".", 1)[0])
    # What bitsandbytes leaves in place of a Linear weight: packed integer bytes.
    module.weight = torch.nn.Parameter(torch.zeros(module.weight.numel() // 2, 1, dtype=torch.uint8),
                                       requires_grad=False)
    with pytest.raises(UserError, match="quantized.*--streaming"):
        apply_in_memory(model, _unit(hidden_size_of(model.config)), EditConfig().placed(0.5),
                        num_layers_of(model.config), model_type_of(model.config))


def test_load_in_4bit_without_streaming_is_refused_with_one_line(tmp_path, capsys):
    from pipeline.cli.main import main

    src = save_tiny("llama", tmp_path / "src")
    code = main(["abliterate", str(src), "--out", str(tmp_path / "o"), "--load-in-4bit", "--no-eval"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--streaming" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()

