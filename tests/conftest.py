"""Test-wide setup.

huggingface_hub reads HF_ENDPOINT and friends at import, so they are set here,
before any test module imports it. The local Hub-protocol server
(tests/hub_server.py) binds the port chosen here.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HUB_PORT = int(os.environ.get("TEST_HUB_PORT") or _free_port())
os.environ["TEST_HUB_PORT"] = str(HUB_PORT)
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# datasets otherwise sends a download-count request off the loopback.
os.environ["HF_UPDATE_DOWNLOAD_COUNTS"] = "0"
os.environ.pop("HF_TOKEN", None)
# A private HF_HOME so no real login or cache on the machine leaks into tests.
_HF_HOME = Path(__file__).resolve().parent / "_output" / "hf_home"
_HF_HOME.mkdir(parents=True, exist_ok=True)
os.environ["HF_HOME"] = str(_HF_HOME)

pytest_plugins = ["tests.hub_fixtures", "tests.fixtures_demo"]
