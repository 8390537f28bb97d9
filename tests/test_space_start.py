"""A fresh Space start, as a new Space container sees it: a new interpreter, an empty model cache, and a
job submitted the moment the app answers, while the start-up warm-up is still running."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST = {"max_new_tokens": 8,
        "extra_options": json.dumps({"max_prompts": 16, "select_prompts": 4, "select_tokens": 4, "perplexity": False})}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, limit: float = 180) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the app did not answer in time")


def test_first_job_on_a_fresh_start_works_while_the_warmup_runs(tmp_path):
    from gradio_client import Client

    port = _free_port()
    cache = tmp_path / "cache"
    env = {**os.environ, "ABLITERATOR_CACHE": str(cache), "GRADIO_SERVER_PORT": str(port),
           "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_until_up(url, proc)
        client = Client(url, verbose=False)
        out = client.submit(model_id="demo", **FAST, api_name="/run_without_publishing").result(timeout=600)
        summary = str(out[3])  # outputs: log, outcome, stage, evaluation, ... (docs/API.md)
        assert "Refusal rate" in summary and "not available" not in summary and "Done" in str(out[1])
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert "cannot import name" not in log
    # Nothing half-built is left in the cache (with the shipped demo, nothing is built at all).
    leftovers = [p for p in cache.rglob("*") if ".tmp-" in p.name] if cache.exists() else []
    assert leftovers == []
