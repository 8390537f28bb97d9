"""The app with untrusted visitors: a simulated Space (SYSTEM=spaces) whose owner's HF_TOKEN is set,
two users on the local Hub server (alice owns private repos, bob does not), and the app's own
handlers and job runner. No model is loaded unless a test says so; tiny models only."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from pipeline.errors import UserError
from tests.hub_fixtures import ALICE_TOKEN, BOB_TOKEN
from tests.tiny_models import tiny_model

PRIVATE = "alice/private-model"


@pytest.fixture
def space(monkeypatch):
    """A Hugging Face Space whose owner (alice) set her token as the Space secret HF_TOKEN."""
    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)


def _model_files(tmp_path: Path, name: str = "m") -> dict[str, bytes]:
    from tests.test_push import _tokenizer

    folder = tmp_path / name
    tiny_model("qwen3", vocab_size=320).save_pretrained(folder)  # room for the 300-token tokenizer below
    _tokenizer(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def private_model(hub, tmp_path):
    hub.seed(PRIVATE, _model_files(tmp_path), private=True)
    return PRIVATE


def _settings(**overrides):
    values = {"method": "abliterate", "mode": "preset", "max_new_tokens": 8, "extra_options": ""}
    return {**values, **overrides}


def _first(generator):
    """Run an endpoint function to its end: these checks fail it before any job starts (the page shows
    the failure first, then the event ends with it as the error)."""
    outputs = []
    for output in generator:
        outputs.append(output)
    return outputs


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("extra", [{"trust_remote_code": True}, {"markers_file": "/etc/passwd"},
                                   {"perplexity_file": "/etc/hostname"}, {"study": "/tmp/anywhere.journal"},
                                   {"vector": "/tmp/v.safetensors"}, {"device_map": "auto"}, {"epochs": 1000},
                                   {"data": "demo-pairs"}])
def test_extra_settings_outside_the_allow_list_are_refused_in_one_line(extra):
    from space import handlers

    with pytest.raises(UserError) as err:
        handlers.build_options(_settings(extra_options=json.dumps(extra)))
    message = str(err.value)
    assert repr(next(iter(extra))) in message and "allowed:" in message and "select_prompts" in message
    assert "\n" not in message


def test_trust_remote_code_is_refused_even_through_the_api_endpoint(space, hub):
    import gradio as gr

    from space import handlers

    with pytest.raises(gr.Error, match="trust-remote-code.*never settable"):
        _first(handlers.run_without_publishing(extra_options='{"trust-remote-code": true}'))


def test_allowed_settings_pass_and_are_capped(monkeypatch):
    from space import handlers

    method, options = handlers.build_options(_settings(extra_options='{"select-prompts": 4, "preset": "aggressive"}'))
    assert method == "abliterate" and options["select_prompts"] == 4 and options["preset"] == "aggressive"
    monkeypatch.setenv("ABLITERATOR_MAX_TRIALS", "5")
    monkeypatch.setenv("ABLITERATOR_MAX_NEW_TOKENS", "32")
    with pytest.raises(UserError, match=r"trials = 6 .*limit of 5 \(ABLITERATOR_MAX_TRIALS\)"):
        handlers.build_options(_settings(mode="search", trials=6))
    with pytest.raises(UserError, match="ABLITERATOR_MAX_NEW_TOKENS"):
        handlers.build_options(_settings(max_new_tokens=33))
    with pytest.raises(UserError, match="ABLITERATOR_MAX_NEW_TOKENS"):
        handlers.build_options(_settings(extra_options='{"select_tokens": 64}'))
    assert handlers.build_options(_settings(mode="search", trials=5))[1]["trials"] == 5
    monkeypatch.setenv("ABLITERATOR_MAX_PROMPTS", "100")
    with pytest.raises(UserError, match=r"wide_prompts = 256 .*limit of 100 \(ABLITERATOR_MAX_PROMPTS\)"):
        handlers.build_options(_settings(mode="search", trials=5, extra_options='{"wide_prompts": 256}'))
    options = handlers.build_options(_settings(mode="search", trials=5, extra_options='{"wide_prompts": 0}'))[1]
    assert options["wide_prompts"] == 0 and options["max_prompts"] == 100
    with pytest.raises(UserError, match=r"confirm_prompts = 101 .*limit of 100 \(ABLITERATOR_MAX_PROMPTS\)"):
        handlers.build_options(_settings(mode="search", trials=5, extra_options='{"confirm_prompts": 101}'))
    monkeypatch.setenv("ABLITERATOR_MAX_STEPS", "30")
    with pytest.raises(UserError, match=r"fit_steps = 40 .*limit of 30 \(ABLITERATOR_MAX_STEPS\)"):
        handlers.build_options(_settings(mode="search", trials=5, extra_options='{"fit_steps": 40}'))
    options = handlers.build_options(_settings(mode="search", trials=5,
                                               extra_options='{"fit_steps": 0, "confirm_prompts": 0}'))[1]
    assert options["fit_steps"] == 0 and options["confirm_prompts"] == 0


def test_defaults_above_a_cap_are_lowered_to_it(monkeypatch):
    """An operator's cap holds for settings the visitor left alone too: the search's default 40 fit steps and 32
    confirm prompts, the layer choice's 16 new tokens."""
    from pipeline.configs import build_config
    from pipeline.edit.directions import DirectionsConfig
    from pipeline.edit.search import SearchConfig
    from space import handlers

    defaults = SearchConfig()
    _, options = handlers.build_options(_settings(mode="search", trials=5))
    assert "fit_steps" not in options and "confirm_prompts" not in options  # under the default caps: untouched
    monkeypatch.setenv("ABLITERATOR_MAX_STEPS", str(defaults.fit_steps - 10))
    monkeypatch.setenv("ABLITERATOR_MAX_PROMPTS", str(defaults.confirm_prompts - 8))
    monkeypatch.setenv("ABLITERATOR_MAX_NEW_TOKENS", "12")
    _, options = handlers.build_options(_settings(mode="search", trials=5))
    search = build_config(SearchConfig, options)
    assert search.fit_steps == defaults.fit_steps - 10 and search.confirm_prompts == defaults.confirm_prompts - 8
    assert build_config(DirectionsConfig, options).select_tokens == 12 < DirectionsConfig().select_tokens
    # An explicit null is the default, not "unbounded".
    _, options = handlers.build_options(_settings(extra_options='{"max_prompts": null, "max_examples": null}'))
    assert options["max_prompts"] == options["max_examples"] == defaults.confirm_prompts - 8
    # Training data is bounded too: weight steering's steps grow with its examples.
    _, options = handlers.build_options(_settings(method="steer", steer_positive="demo-refusals",
                                                  steer_negative="demo-answers", steer_k=-1))
    assert options["max_examples"] == defaults.confirm_prompts - 8
    with pytest.raises(UserError, match=r"max_examples = 100 .*ABLITERATOR_MAX_PROMPTS"):
        handlers.build_options(_settings(method="steer", steer_positive="demo-refusals",
                                         steer_negative="demo-answers", steer_k=-1,
                                         extra_options='{"max_examples": 100}'))
    # --wide-prompts turns the fit and the confirm prompts off: nothing is filled in that would clash with it.
    _, options = handlers.build_options(_settings(mode="search", trials=5, extra_options='{"wide_prompts": 8}'))
    search = build_config(SearchConfig, options)
    assert search.wide_prompts == 8 and search.fit_steps == 0 and search.confirm_prompts == 0


@pytest.mark.parametrize("field,value", [("extra_options", '{"harmful": "/etc/hosts"}'),
                                         ("extra_options", '{"harmless": "../secrets.txt"}'),
                                         ("dpo_data", "/root/prefs.jsonl"), ("steer_positive", "~/notes.json")])
def test_no_server_paths_as_sources_on_a_space(space, field, value):
    from space import handlers

    method = "dpo" if field == "dpo_data" else "steer" if field.startswith("steer") else "abliterate"
    values = _settings(method=method, dpo_data="demo-pairs", dpo_steps=2, learning_rate=1e-4, lora_r=4, beta=0.1,
                       steer_positive="demo-answers", steer_negative="demo-refusals", steer_k=1.0)
    values[field] = value
    with pytest.raises(UserError, match="files on the server are not accepted"):
        handlers.build_options(values)


def test_built_in_sets_and_hub_datasets_are_accepted_on_a_space(space):
    from space import handlers

    _, options = handlers.build_options(_settings(extra_options='{"harmful": "mlabonne/harmful_behaviors", '
                                                                '"harmless": "harmless"}'))
    assert options["harmful"] == "mlabonne/harmful_behaviors"


def test_paths_stay_usable_on_a_local_app_bound_to_loopback(monkeypatch, tmp_path):
    from space import handlers

    monkeypatch.delenv("SYSTEM", raising=False)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "127.0.0.1")
    prompts = tmp_path / "mine.txt"
    assert handlers.build_options(_settings(extra_options=json.dumps({"harmful": str(prompts)})))[1]["harmful"]
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")  # reachable by others: treated like a Space
    with pytest.raises(UserError, match="files on the server"):
        handlers.build_options(_settings(extra_options=json.dumps({"harmful": str(prompts)})))


@pytest.mark.parametrize("model", ["/root/.cache/huggingface/hub/models--alice--private-model/snapshots/abc",
                                   "./out/model", "~/models/x", "models/x/y", "C:\\models\\x"])
def test_the_model_field_takes_only_demo_or_a_hub_id_on_a_space(space, hub, model):
    import gradio as gr

    from space import handlers

    with pytest.raises(gr.Error, match="Hub model id"):
        _first(handlers.run_without_publishing(model_id=model))
    assert not hub.requests_log


def test_a_server_folder_is_refused_even_when_it_exists(space, tmp_path):
    from space import policy

    folder = tmp_path / "snap"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(UserError, match="folders on the server are not accepted"):
        policy.check_model(str(folder))
    assert policy.check_model("demo") == "demo" and policy.check_model("alice/x") == "alice/x"


# ------------------------------------------------------------------ tokens


def test_another_user_cannot_load_the_owners_private_model(space, private_model, tmp_path):
    """The core case: the Space's HF_TOKEN is alice's; bob's job (and a signed-out one) must not read her
    model, not even once her own job has put it in the machine's download cache."""
    from pipeline.io.hub_token import reading_as
    from pipeline.io.loading import local_path
    from space.jobs import JobRequest, run_isolated

    with reading_as(ALICE_TOKEN):  # the owner, signed in, reads her own model (now in the cache)
        assert (local_path(private_model) / "config.json").is_file()
    for token in (BOB_TOKEN, False):
        with reading_as(token), pytest.raises(UserError, match="not found"):
            local_path(private_model)
    for token in (BOB_TOKEN, None):  # whole jobs as bob and as a signed-out visitor
        request = JobRequest(private_model, None, publish=False, token=token,
                             options={"max_new_tokens": 8, "max_prompts": 8})
        with pytest.raises(UserError, match="not found"):
            run_isolated(request, lambda _: None, threading.Event())


def test_outside_a_job_a_space_reads_the_hub_anonymously(space, private_model):
    from pipeline.io.hub_token import read_token
    from pipeline.io.loading import local_path

    assert read_token() is False
    with pytest.raises(UserError, match="not found"):
        local_path(private_model)


def test_the_visitors_own_private_dataset_loads_with_their_token_only(space, hub):
    from pipeline.io.hub_token import reading_as
    from pipeline.io.prompts import load_prompts

    rows = "\n".join(json.dumps({"text": f"private prompt {i}"}) for i in range(6)) + "\n"
    hub.seed("bob/private-prompts", {"train.jsonl": rows.encode()}, repo_type="dataset", private=True)
    with reading_as(BOB_TOKEN):
        assert load_prompts("bob/private-prompts").prompts[0] == "private prompt 0"
    for token in (ALICE_TOKEN, False):
        with reading_as(token), pytest.raises(UserError, match="not found"):
            load_prompts("bob/private-prompts")


@pytest.mark.parametrize("host,falls_back", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                             ("0.0.0.0", False), ("192.168.1.5", False), ("my-host", False)])
def test_a_local_app_falls_back_to_the_machines_token_only_on_loopback(monkeypatch, host, falls_back):
    from space import auth

    monkeypatch.delenv("SYSTEM", raising=False)
    monkeypatch.setenv("HF_TOKEN", BOB_TOKEN)
    monkeypatch.setenv("GRADIO_SERVER_NAME", host)
    assert auth.resolve_token(None, "") == (BOB_TOKEN if falls_back else None)
    assert auth.resolve_token(None, ALICE_TOKEN) == ALICE_TOKEN


# ------------------------------------------------------------------ limits


def _header_only_safetensors(rows: int, cols: int) -> bytes:
    """A safetensors header announcing one float32 [rows, cols] tensor (the Hub reads sizes from headers)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, rows * cols * 4]}})
    return len(header).to_bytes(8, "little") + header.encode()


def test_a_model_above_the_size_limit_is_refused_before_any_download(space, hub, monkeypatch, tmp_path):
    from space.jobs import JobRequest, run_isolated

    files = _model_files(tmp_path)
    files["model.safetensors"] = _header_only_safetensors(2000, 1000)  # 2M parameters
    hub.seed("bob/big-model", files)
    monkeypatch.setenv("ABLITERATOR_MAX_PARAMS", "1e6")
    with pytest.raises(UserError, match="ABLITERATOR_MAX_PARAMS") as err:
        run_isolated(JobRequest("bob/big-model", None, publish=False, token=BOB_TOKEN), lambda _: None,
                     threading.Event())
    assert "ABLITERATOR_MAX_PARAMS" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("ABLITERATOR_MAX_PARAMS", "1e9")
    monkeypatch.setenv("ABLITERATOR_MAX_MODEL_GB", "0.001")  # 1 MB: the 8 MB of weights are too much
    hub.seed("bob/big-model", {"model.safetensors": _header_only_safetensors(2000, 1000) + bytes(8_000_000)})
    with pytest.raises(UserError, match="ABLITERATOR_MAX_MODEL_GB"):
        run_isolated(JobRequest("bob/big-model", None, publish=False, token=BOB_TOKEN), lambda _: None,
                     threading.Event())
    assert not [path for _, path in hub.requests_log if "/resolve/" in path], "weights were downloaded"


def test_the_chat_uses_only_the_models_of_the_users_own_job(space, hub, private_model, tmp_path):
    from pipeline.io.hub_token import reading_as
    from space import chat, handlers

    edited = tmp_path / "edited"
    edited.mkdir()
    for name, data in _model_files(tmp_path, "e").items():
        (edited / name).write_bytes(data)
    with pytest.raises(Exception, match="run a job first"):
        handlers.chat_turn("hello", None, [], [])
    with reading_as(BOB_TOKEN):  # bob's job: his base model is a local tiny one here, loaded inside the job
        key = chat.keep_edited(edited, str(edited))
    hub.requests_log.clear()
    box, left, right = handlers.chat_turn("hello", key, [], [])  # the chat takes no model id at all
    assert box == "" and left[-1]["role"] == right[-1]["role"] == "assistant"
    assert not [path for _, path in hub.requests_log if "private-model" in path]


# ------------------------------------------------------------------ cache


def test_the_hub_cache_is_pruned_least_recently_used_first(hub, tmp_path):
    from huggingface_hub import snapshot_download

    from space.limits import forget, prune_hub_cache

    cache = tmp_path / "cache"
    for i, name in enumerate(("bob/old", "bob/new")):
        hub.seed(name, {"model.safetensors": bytes(100_000 + i), "config.json": b"{}"})
        folder = Path(snapshot_download(name, cache_dir=cache, token=False))
        stamp = 1_000_000_000 + i * 1000
        for path in folder.parent.parent.rglob("*"):
            os.utime(path, (stamp, stamp), follow_symlinks=False)
    assert prune_hub_cache(150_000, cache_dir=cache) == ["bob/old"]
    assert not (cache / "models--bob--old").exists() and (cache / "models--bob--new").exists()
    assert prune_hub_cache(150_000, cache_dir=cache) == []
    assert forget("bob/new", cache_dir=cache) and not (cache / "models--bob--new" / "snapshots").exists()


def test_several_sets_and_a_gguf_file_name_are_accepted_on_a_space_but_no_paths(space):
    from space import handlers

    _, options = handlers.build_options(_settings(extra_options='{"harmful": "censored,harmful", '
                                                                '"gguf_file": "model-Q4_K_M.gguf"}'))
    assert options["harmful"] == "censored,harmful" and options["gguf_file"] == "model-Q4_K_M.gguf"
    with pytest.raises(UserError, match="files on the server are not accepted"):
        handlers.build_options(_settings(extra_options='{"harmful": "censored,/etc/passwd"}'))
    with pytest.raises(UserError, match="gguf_file"):
        handlers.build_options(_settings(extra_options='{"gguf_file": "../../secret.gguf"}'))
