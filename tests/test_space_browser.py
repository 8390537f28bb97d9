"""The Space in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright runs the
one-click flow on the demo model with a token typed in the token field, waits for the repo link,
saves a screenshot under tests/_output/ and checks the page logged no console errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hub_fixtures import ALICE_TOKEN

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
OUTPUT = Path(__file__).resolve().parent / "_output"
SCREENSHOT = OUTPUT / "space_browser.png"
FAST_OPTIONS = {"max_prompts": 16, "select_prompts": 4, "select_tokens": 4, "perplexity": False}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*no_silent_downcasting",
                                        "ignore:The copy keyword is deprecated")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing and running as root."""
    if not Path(CHROMIUM).exists() and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        done = subprocess.run(["apt-get", "install", "-y", "chromium"], env=env, capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
            subprocess.run(["apt-get", "install", "-y", "chromium"], env=env, capture_output=True, check=False)
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium, as root)")
    return CHROMIUM


@pytest.fixture(scope="module")
def space_url(hub_server, demo_dir) -> Iterator[str]:
    from space.ui import build_demo

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = build_demo()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture
def page(chromium):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.console_errors = []  # type: ignore[attr-defined]
        page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
        page.on("pageerror", lambda e: page.console_errors.append(f"page error: {e}"))
        try:
            yield page
        finally:
            context.close()
            browser.close()


def _field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def test_one_click_flow_in_a_real_browser(page, space_url, hub):
    from playwright.sync_api import expect

    page.goto(space_url, wait_until="load", timeout=60_000)
    expect(page.get_by_role("button", name="Abliterate and publish")).to_be_visible(timeout=60_000)
    expect(_field(page, "model-id")).to_have_value("demo")

    _field(page, "hf-token").fill(ALICE_TOKEN)
    _field(page, "hf-token").press("Tab")  # blur: the app looks the user up and fills the repo field
    expect(_field(page, "repo-id")).to_have_value("alice/demo-abliterated", timeout=30_000)
    expect(page.locator("#signed-in")).to_contain_text("alice")

    page.get_by_text("Advanced").click()
    page.get_by_label("New tokens per evaluation prompt").fill("8")
    page.get_by_label("Extra settings (JSON object of stage settings", exact=False).fill(json.dumps(FAST_OPTIONS))
    page.get_by_role("button", name="Abliterate and publish").click()

    link = page.locator("#repo-link a")
    expect(link).to_have_text("alice/demo-abliterated", timeout=600_000)
    assert link.get_attribute("href").startswith(f"{hub.url}/alice/demo-abliterated")
    expect(page.locator("#job-log textarea")).to_have_value(re.compile(r"published: "), timeout=10_000)
    page.get_by_placeholder("Ask both models something").fill("What is the capital of France?")
    page.get_by_role("button", name="Send").click()
    for side in ("chat-original", "chat-edited"):
        expect(page.locator(f"#{side} [data-testid='bot']")).to_have_count(1, timeout=120_000)
        expect(page.locator(f"#{side} [data-testid='user']")).to_have_count(1)
    page.get_by_text("Model card", exact=True).click()
    expect(page.locator("#model-card img").first).to_be_visible(timeout=10_000)
    page.wait_for_timeout(500)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    files = hub.files("alice/demo-abliterated")
    assert {"model.safetensors", "README.md", "eval_results.json"} <= set(files)
    assert ALICE_TOKEN not in page.content(), "the token is shown in the page"
    stored = page.evaluate("JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])")
    assert ALICE_TOKEN not in stored, "the token was saved in the browser"
    assert page.evaluate("async () => (await indexedDB.databases()).map(d => d.name)") == []
    expect(page.get_by_text("Runs", exact=True)).to_have_count(0)  # no run history (it would keep inputs)
    assert SCREENSHOT.stat().st_size > 10_000
    assert page.console_errors == [], f"console errors: {page.console_errors}"
