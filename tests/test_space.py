"""The Gradio Space end to end: the app on a free port, driven with gradio_client, publishing to the
local Hub-protocol server (tests/hub_server.py). Jobs run on the demo model with short evaluations."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hub_fixtures import ALICE_TOKEN, BOB_TOKEN

FAST = {"max_new_tokens": 8,
        "extra_options": json.dumps({"max_prompts": 16, "select_prompts": 4, "select_tokens": 4, "perplexity": False})}
TOKENS = (ALICE_TOKEN, BOB_TOKEN)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*no_silent_downcasting",
                                        "ignore:The copy keyword is deprecated")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def work_root(tmp_path_factory) -> Iterator[Path]:
    """Every temporary file of the app (job folders, Gradio's cache) goes under one folder."""
    root = tmp_path_factory.mktemp("space_tmp")
    old_tempdir, old_env = tempfile.tempdir, os.environ.get("GRADIO_TEMP_DIR")
    tempfile.tempdir = str(root)
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")
    yield root
    tempfile.tempdir = old_tempdir
    if old_env is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = old_env


@pytest.fixture(scope="module")
def app(hub_server, demo_dir, work_root) -> Iterator[tuple[object, str]]:
    from space.ui import build_demo

    demo = build_demo()
    port = _free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture
def runs(monkeypatch) -> list[dict]:
    """Wrap pipeline.orchestrator.run.run_job to record each job's timing, folder, neighbours and token."""
    import pipeline.orchestrator.run as run

    real, records = run.run_job, []

    def recording(job, progress=None, token=None):
        workdir = Path(job.out).parent
        record = {"workdir": workdir, "token": token, "repo": job.repo_id, "start": time.monotonic(),
                  "siblings": sorted(p.name for p in workdir.iterdir()),
                  "others_alive": [r["workdir"].exists() for r in records]}
        records.append(record)
        try:
            return real(job, progress, token)
        finally:
            record["end"] = time.monotonic()

    monkeypatch.setattr(run, "run_job", recording)
    return records


@pytest.fixture
def log_records() -> Iterator[list[logging.LogRecord]]:
    """Every Python log record emitted while the test runs, at every level."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root, handler = logging.getLogger(), Keep(logging.DEBUG)
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield records
    root.removeHandler(handler)
    root.setLevel(old_level)


def _client(url: str, token: str | None = None):
    from gradio_client import Client

    return Client(url, oauth_token=token, verbose=False)


def _submit(client, api_name: str = "/abliterate_and_publish", **kwargs):
    return client.submit(**{"model_id": "demo", **FAST, **kwargs}, api_name=api_name)


def _streamed_log(job) -> str:
    """Every log text the endpoint streamed, joined."""
    return "\n".join(str(out[0]) for out in job.outputs() if isinstance(out, (list, tuple)) and out)


def _job_workdirs(root: Path) -> list[Path]:
    return sorted(root.glob("abliterator-job-*"))


def _assert_no_token_on_disk(root: Path, tokens=TOKENS) -> None:
    for base in (root, Path(os.environ["HF_HOME"])):
        for path in (p for p in base.rglob("*") if p.is_file()):
            data = path.read_bytes()
            for token in tokens:
                assert token.encode() not in data, f"token written to {path}"


def _assert_published(hub, repo_id: str) -> dict[str, bytes]:
    files = hub.files(repo_id)
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    card = files["README.md"].decode()
    assert card.startswith("---") and "demo" in card
    results = json.loads(files["eval_results.json"])
    assert results["num_prompts"]["harmful"] > 0 and results["refusal_rate"]["base"] is not None
    for name, data in files.items():
        for token in TOKENS:
            assert token.encode() not in data, f"token uploaded in {name}"
    return files


def test_one_click_publishes_to_the_signed_in_users_repo(app, hub, work_root, runs, log_records, capfd):
    demo, url = app
    job = _submit(_client(url, ALICE_TOKEN), repo_id="", private=True)  # empty repo: the default name
    out = job.result(timeout=600)
    log_text, status, stage, summary, directions, strengths, pareto, download, card, link = out
    assert "Done" in stage and 'data-phase="done"' in stage and status.startswith("**Done.**")
    assert download is None  # published: nothing to download
    assert "alice/demo-abliterated" in link and hub.url in link
    assert hub.repo("alice/demo-abliterated").private
    _assert_published(hub, "alice/demo-abliterated")
    assert "Refusal rate" in summary and "| Metric | Base | This model |" in summary
    assert Path(directions).is_file() and Path(strengths).is_file()
    assert pareto is None  # no search, no Pareto chart
    assert "data:image/png;base64," in card and not card.startswith("---")
    assert "publishing to alice/demo-abliterated" in log_text and "published:" in log_text
    assert "abliterator-job-" not in log_text and "/tmp" not in log_text  # no server paths
    assert "direction from layer" in log_text and log_text.count("measuring refusal directions") == 1

    streamed, printed = _streamed_log(job), capfd.readouterr()
    lines = [r.getMessage() for r in log_records] + streamed.splitlines() + (printed.out + printed.err).splitlines()
    assert not [line for line in lines if ALICE_TOKEN in line], "token in a log line"
    assert [r["token"] for r in runs] == [ALICE_TOKEN]
    assert not _job_workdirs(work_root), "job folder left behind"
    _assert_no_token_on_disk(work_root)


def test_signed_out_publishing_is_refused_and_creates_nothing(app, hub, runs):
    from gradio_client.exceptions import AppError

    demo, url = app
    with pytest.raises(AppError, match="Sign in with Hugging Face"):
        _submit(_client(url), repo_id="alice/demo-abliterated").result(timeout=120)
    assert not hub.repos and not [p for _, p in hub.requests_log if p.startswith("/api/repos")]
    assert runs == []


def test_run_without_publishing_sends_nothing_keeps_the_result_then_chats_with_both_models(app, hub, work_root):
    import zipfile

    from safetensors.numpy import load

    from pipeline.io.demo import demo_path

    demo, url = app
    with pytest.raises(Exception, match="run a job first"):
        _client(url).predict("What happened in 1989?", [], [], api_name="/chat")
    assert _client(url).predict("  ", [], [], api_name="/chat") == ("", [], [])  # an empty message: nothing
    client = _client(url)  # one session: the chat uses the model this session's job edited
    out = _submit(client, api_name="/run_without_publishing", repo_id="").result(timeout=600)
    log_text, status, stage, summary, _, _, pareto, download, card, link = out
    assert "Not published" in link and "Refusal rate" in summary and 'data-phase="done"' in stage
    assert not hub.repos and not [p for _, p in hub.requests_log if p.startswith("/api/repos")]
    assert not _job_workdirs(work_root)
    # The card reads as the published one would: the target repo in the snippet, the command filled in.
    assert 'model_id = "your-name/demo-abliterated"' in card and "(not recorded)" not in card
    assert "python -m pipeline run demo --method abliterate --repo-id your-name/demo-abliterated" in card
    # The download holds the edited model, its card and its evaluation: the same numbers as the page.
    with zipfile.ZipFile(download) as zf:
        names = set(zf.namelist())
        assert {"demo-abliterated/model.safetensors", "demo-abliterated/README.md"} <= names
        assert not [n for n in names if "/." in n], "hidden work files in the download"
        results = json.loads(zf.read("demo-abliterated/eval_results.json"))
        edited = load(zf.read("demo-abliterated/model.safetensors"))
        assert zf.read("demo-abliterated/README.md").decode().count("your-name/demo-abliterated") >= 2
    assert f"{100 * results['refusal_rate']['model']:.1f}%" in summary.split("\n")[0]
    base = load((demo_path() / "model.safetensors").read_bytes())
    changed = [k for k in base if k in edited and not (base[k] == edited[k]).all()]
    assert set(edited) == set(base) and changed, "the download is not the edited model"
    box, left, right = client.predict("Tell me about the Eiffel Tower.", [], [], api_name="/chat")
    assert box == "" and [m["role"] for m in left] == ["user", "assistant"] == [m["role"] for m in right]
    assert left[1]["content"] and right[1]["content"]


def test_publishing_after_a_dry_run_uploads_the_kept_result_when_the_settings_match(app, hub):
    import zipfile

    demo, url = app
    client = _client(url, ALICE_TOKEN)  # one session: the dry run's result is kept for it

    def dry_run() -> bytes:
        out = _submit(client, api_name="/run_without_publishing", repo_id="alice/kept-abliterated").result(timeout=600)
        with zipfile.ZipFile(out[7]) as zf:
            return zf.read("kept-abliterated/model.safetensors")

    weights = dry_run()
    assert not hub.repos
    # Other settings than the dry run's: the model is made again, not the kept one.
    other = _submit(client, repo_id="alice/kept-abliterated", preset="aggressive").result(timeout=600)
    assert "found the result of your dry run" in other[0] and "measuring refusal directions" in other[0]
    assert hub.files("alice/kept-abliterated")["model.safetensors"] != weights

    weights = dry_run()
    out = _submit(client, repo_id="alice/kept-abliterated").result(timeout=600)
    log_text, status = out[0], out[1]
    assert status.startswith("**Done.**") and "reusing the edited model" in log_text
    assert "measuring" not in log_text and "evaluating" not in log_text  # nothing made again
    files = _assert_published(hub, "alice/kept-abliterated")
    assert files["model.safetensors"] == weights  # the very weights the user downloaded and read about
    card = files["README.md"].decode()
    assert "python -m pipeline run demo --method abliterate --repo-id alice/kept-abliterated" in card
    assert 'model_id = "alice/kept-abliterated"' in card and "your-name" not in card


def test_two_jobs_at_once_run_one_after_the_other_in_their_own_folders(app, hub, work_root, runs, log_records):
    demo, url = app
    job_a = _submit(_client(url, ALICE_TOKEN), repo_id="alice/first-abliterated")
    job_b = _submit(_client(url, BOB_TOKEN), repo_id="bob/second-abliterated")
    out_a, out_b = job_a.result(timeout=900), job_b.result(timeout=900)
    assert "alice/first-abliterated" in out_a[9] and "bob/second-abliterated" in out_b[9]
    _assert_published(hub, "alice/first-abliterated")
    _assert_published(hub, "bob/second-abliterated")

    first, second = sorted(runs, key=lambda r: r["start"])
    assert first["end"] <= second["start"], "the two jobs overlapped"
    assert first["workdir"] != second["workdir"]
    assert second["others_alive"] == [False], "the first job's folder was still there"
    assert first["siblings"] == [] and second["siblings"] == [], "a job found files in its fresh folder"
    tokens = {r["repo"]: r["token"] for r in runs}
    assert tokens == {"alice/first-abliterated": ALICE_TOKEN, "bob/second-abliterated": BOB_TOKEN}

    log_a, log_b = _streamed_log(job_a), _streamed_log(job_b)
    assert str(first["workdir"]) not in log_a + log_b  # the log names no server folder
    for text in (log_a, log_b, *(r.getMessage() for r in log_records)):
        assert ALICE_TOKEN not in text and BOB_TOKEN not in text
    assert "bob/" not in log_a and "alice/" not in log_b
    assert not _job_workdirs(work_root)
    _assert_no_token_on_disk(work_root)


def test_cancel_before_publishing_publishes_nothing(app, hub, work_root, monkeypatch):
    import pipeline.orchestrator.run as run
    from space.jobs import HEAVY

    real, cancelled, outcome = run.run_job, threading.Event(), {}

    def held_at_measuring(job, progress=None, token=None):
        def gated(message: str) -> None:
            if message.startswith("measuring"):  # hold the job here until the page has cancelled it
                cancelled.wait(120)
                time.sleep(2)  # let the cancellation reach the worker
            progress(message)

        try:
            return real(job, gated, token)
        except BaseException as exc:
            outcome["error"] = type(exc).__name__
            raise

    monkeypatch.setattr(run, "run_job", held_at_measuring)
    demo, url = app
    job = _submit(_client(url, ALICE_TOKEN), repo_id="alice/cancelled-abliterated")
    deadline = time.monotonic() + 300
    while "loading demo" not in _streamed_log(job) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _job_workdirs(work_root), "the job did not start"
    job.cancel()
    cancelled.set()
    assert HEAVY.acquire(timeout=300), "the cancelled job never stopped"
    HEAVY.release()
    assert outcome == {"error": "Cancelled"}
    assert not hub.repos, "a cancelled job created a repo"
    assert not [p for m, p in hub.requests_log if m == "POST" and "/commit/" in p]
    assert not _job_workdirs(work_root), "the cancelled job's folder was left behind"


def _last_outputs(job) -> list:
    """The outputs the page shows last (also after an error ended the event)."""
    return [out for out in job.outputs() if isinstance(out, (list, tuple))][-1]


def test_errors_stay_on_the_page_as_one_readable_line(app, hub, work_root):
    from gradio_client.exceptions import AppError

    demo, url = app
    client = _client(url, ALICE_TOKEN)
    job = _submit(client, api_name="/run_without_publishing", model_id="alice/no-such-model")
    with pytest.raises(AppError) as err:
        job.result(timeout=120)
    message = str(err.value).strip()
    assert "alice/no-such-model" in message and "Traceback" not in message and "\n" not in message
    # The page keeps the failure: a status line, the stage bar ended as failed, the log kept.
    log_text, status, stage = _last_outputs(job)[:3]
    assert status.startswith("**Failed**") and message in status
    assert 'data-phase="failed"' in stage and "Failed at stage 1 of 5: Loading the model" in stage
    assert log_text.splitlines()[-1].startswith("failed during loading the model: ")
    assert message in log_text.splitlines()[-1]
    with pytest.raises(AppError, match="not valid JSON"):
        _submit(client, extra_options="{oops").result(timeout=120)
    with pytest.raises(AppError, match="cannot publish to 'bob/x'"):
        _submit(client, repo_id="bob/x").result(timeout=120)
    assert not hub.repos and not _job_workdirs(work_root)


def test_automatic_search_shows_the_pareto_chart_and_what_it_chose(app, hub):
    demo, url = app
    out = _submit(_client(url), api_name="/run_without_publishing", mode="search", trials=2).result(timeout=900)
    log_text, summary, chart = out[0], out[3], out[6]
    assert Path(chart).is_file() and Path(chart).stat().st_size > 1000
    assert "**Chosen by the search:** trial " in summary and "of the depth" in summary
    numbered = [line for line in log_text.splitlines() if line.startswith("trial ")]
    trials = [line for line in numbered if line.split(":")[0].endswith(" of 2)")]
    assert [line.split(":")[0] for line in trials] == ["trial 0 (1 of 2)", "trial 1 (2 of 2)"]
    assert all("best so far: trial" in line for line in trials)
    extra = [line for line in numbered if line not in trials]  # the twins and the refined plain edit, each named
    assert all("a little stronger than the plain edit" in line or "the plain edit refined (" in line
               or "of the prompts seen by its replies" in line or "(the fitted span)" in line for line in extra), extra
    assert "|---|" not in log_text and ".journal" not in log_text


@pytest.mark.parametrize("settings", [
    {"method": "dpo", "dpo_data": "demo-pairs", "dpo_steps": 12, "learning_rate": 3e-4},
    {"method": "steer", "steer_positive": "demo-answers", "steer_negative": "demo-refusals", "steer_k": 2.0,
     "extra_options": json.dumps({"max_steps": 12, "learning_rate": 1e-3, "batch_size": 8,
                                  **json.loads(FAST["extra_options"])})},
], ids=["dpo", "steer"])
def test_tuning_methods_run_from_the_space(app, hub, settings):
    """DPO towards the answers and steering away from the refusals both lower the refusal rate the page shows."""
    demo, url = app
    out = _submit(_client(url), api_name="/run_without_publishing", **settings).result(timeout=900)
    log_text, summary, link = out[0], out[3], out[9]
    shown = re.search(r"\*\*Refusal rate:\*\* ([\d.]+)% → ([\d.]+)%", summary)
    assert shown, summary
    base, model = float(shown.group(1)), float(shown.group(2))
    # with 8 new tokens the markers see only part of the demo's refusals: both methods at least halve that part
    assert base > 0 and model <= base / 2, summary
    assert "Not published" in link and out[4] is None and out[6] is None
    if settings["method"] == "dpo":  # training reports each step and its loss as it goes
        steps = [line.split(",")[0] for line in log_text.splitlines() if line.startswith("training step")]
        assert steps == [f"training step {i} of 12" for i in range(1, 13)]


def test_queue_is_bounded_and_heavy_events_share_one_slot(app):
    from space.ui import HEAVY_ID, QUEUE_SETTINGS

    demo, _ = app
    assert demo.run_history is False  # Gradio's run history would keep the token field's value
    values = [c["props"].get("value") for c in demo.get_config_file()["components"]]
    assert "Sign in with Hugging Face" not in values  # locally: the token field, no OAuth button
    assert demo._queue.max_size == QUEUE_SETTINGS["max_size"] > 0
    heavy = [fn for fn in demo.fns.values() if fn.concurrency_id == HEAVY_ID]
    assert {fn.api_name for fn in heavy} >= {"abliterate_and_publish", "run_without_publishing", "chat"}
    assert all(fn.concurrency_limit == 1 for fn in heavy)


def test_the_api_names_its_outputs_and_types_its_inputs(app):
    from gradio_client import Client

    demo, url = app
    info = Client(url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(info) == {"/abliterate_and_publish", "/run_without_publishing", "/chat"}
    for name in ("/abliterate_and_publish", "/run_without_publishing"):
        returns = [r["label"] for r in info[name]["returns"]]
        assert returns == ["Log", "Outcome", "Stage", "Evaluation", "Refusal direction per layer",
                           "Edit strength per layer", "Pareto front of the search", "Edited model (zip, dry run)",
                           "Model card", "Repository"]
        types = {p["parameter_name"]: p["python_type"]["type"] for p in info[name]["parameters"]}
        assert types["model_id"] == "str" and types["trials"] == types["dpo_steps"] == "int"
    assert [p["parameter_name"] for p in info["/chat"]["parameters"]] == ["message", "left", "right"]
    assert not [r for e in info.values() for r in e["returns"] if r["label"].startswith("value_")]


def test_helpers_parse_settings_and_fill_defaults():
    from pipeline.errors import UserError
    from space import auth, handlers

    method, opts = handlers.build_options({"method": "abliterate", "mode": "search", "trials": 7,
                                           "max_new_tokens": 16, "extra_options": '{"target": 0.2}'})
    assert method == "auto" and opts["trials"] == 7 and opts["target"] == 0.2 and "layer" not in opts
    method, opts = handlers.build_options({"method": "abliterate", "mode": "manual", "attn_strength": 0.5,
                                           "attn_peak": 0.4, "attn_width": 1, "mlp_strength": 0, "mlp_peak": 0.5,
                                           "mlp_width": 1, "max_new_tokens": 64})
    assert method == "abliterate" and opts["attn_strength"] == 0.5 and opts["mlp_strength"] == 0.0
    assert handlers.build_options({"method": "steer", "steer_positive": "a", "steer_negative": "b",
                                   "steer_k": 2})[1]["k"] == 2.0
    with pytest.raises(UserError, match="not valid JSON"):
        handlers.build_options({"method": "dpo", "dpo_data": "demo-pairs", "dpo_steps": 2, "learning_rate": 1e-4,
                                "lora_r": 4, "beta": 0.1, "extra_options": "{nope"})
    assert auth.default_repo("alice", "Qwen/Qwen3-0.6B") == "alice/Qwen3-0.6B-abliterated"
    assert auth.default_repo(None, "demo") == ""
    assert handlers.retarget("org/Other", "dpo", "alice/demo-abliterated") == "alice/Other-dpo"
    assert handlers.retarget("org/Other", "dpo", "alice/my-name") == "alice/my-name"
    # the local Hub has no model search: its error is ignored, and the query is offered as typed
    assert auth.suggest_models("de") == ["demo", "de"]
    assert auth.suggest_models("alice/my-model") == ["demo", "alice/my-model"]
    assert auth.suggest_models("demo") == auth.suggest_models("") == ["demo"]
    assert "hf_" not in repr(__import__("space.jobs").jobs.JobRequest("demo", None, token=ALICE_TOKEN))


def test_signed_in_state_comes_from_the_token(hub):
    from space import handlers

    line, repo = handlers.who(BOB_TOKEN, "demo", "abliterate", "")
    assert "bob" in line and repo == "bob/demo-abliterated"
    line, repo = handlers.who("hf_not_a_token_000000000000000000", "demo", "abliterate", "x/y")
    assert "not accepted" in line and repo == "x/y"
    assert threading.active_count() < 200


def test_on_a_space_only_the_oauth_token_counts(monkeypatch):
    from space import auth

    monkeypatch.setenv("HF_TOKEN", BOB_TOKEN)  # the Space owner's secret: never used for a user's job
    monkeypatch.setenv("SYSTEM", "spaces")
    assert auth.resolve_token(None, "") is None
    assert auth.resolve_token(type("T", (), {"token": ALICE_TOKEN})(), "") == ALICE_TOKEN
    monkeypatch.delenv("SYSTEM")
    assert auth.resolve_token(None, "") == BOB_TOKEN  # locally, HF_TOKEN is the user's own
    assert auth.resolve_token(None, ALICE_TOKEN) == ALICE_TOKEN


def test_on_a_space_the_page_has_a_login_button_and_no_token_field(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "SYSTEM": "spaces", "SPACE_ID": "alice/abliterator", "OAUTH_CLIENT_ID": "x",
           "OAUTH_CLIENT_SECRET": "y", "OAUTH_SCOPES": "openid profile read-repos write-repos manage-repos",
           "OPENID_PROVIDER_URL": os.environ["HF_ENDPOINT"]}
    code = ("import json; from space.ui import build_demo; c = build_demo().get_config_file(); "
            "print(json.dumps([[x['props'].get('value'), x['props'].get('visible'), x['props'].get('elem_id')] "
            "for x in c['components']]))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    components = json.loads(done.stdout.strip().splitlines()[-1])
    assert any(value == "Sign in with Hugging Face" for value, _, _ in components)
    assert [visible for _, visible, elem in components if elem == "hf-token"] == [False]
