"""Loading from the demo cache, a local folder and the (local) Hub."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import UserError
from pipeline.io.loading import LoadConfig, load_model, local_path
from tests.hub_fixtures import ALICE_TOKEN
from tests.tiny_models import save_tiny


def test_demo_and_dtype(demo_dir):
    loaded = load_model("demo", LoadConfig(dtype="bfloat16"))
    assert loaded.path == demo_dir
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token_id is not None


def test_local_folder(tmp_path):
    folder = save_tiny("qwen3", tmp_path / "m")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    assert local_path(str(folder)) == folder and cfg.model_type == "qwen3"
    with pytest.raises(UserError, match="config.json"):
        local_path(str(tmp_path))


def test_4bit_without_bitsandbytes_says_what_to_install():
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes installed")
    except ImportError:
        pass
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        load_model("demo", LoadConfig(load_in_4bit=True))


def test_hub_model_with_revision(tmp_path, hub, monkeypatch, demo_dir):
    """A model on the (local) Hub, private, fetched with a token at a given revision."""
    folder = save_tiny("llama", tmp_path / "m")
    with pytest.raises(UserError, match="tokenizer"):
        load_model(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((demo_dir / name).read_bytes())
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    hub.seed("alice/tiny", {"config.json": files["config.json"]}, private=True)
    commit = hub.seed("alice/tiny", files, private=True)
    with pytest.raises(UserError, match="HF_TOKEN"):
        local_path("alice/tiny", LoadConfig(revision=commit))
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    path = local_path("alice/tiny", LoadConfig(revision=commit))
    assert (path / "model.safetensors.index.json").read_bytes() == files["model.safetensors.index.json"]
    loaded = load_model("alice/tiny", LoadConfig(revision=commit))
    assert loaded.model.config.model_type == "llama"
