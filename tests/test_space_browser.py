"""The Space in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright, on the demo
model. The one-click flow with a token typed in the token field, then a failed job, a cancelled one and a
dry run whose result is downloaded; each end state is checked on the page and in screenshots at 1280 and
420 px wide (saved under tests/_output/), and the page must log no console errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import zipfile
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


SHOWN_ERRORS = """() => [...document.querySelectorAll('body *')]
  .filter(e => e.childElementCount === 0 && e.textContent.trim() === 'Error')
  .filter(e => { const r = e.getBoundingClientRect(); if (!r.width || !r.height) return false;
                 for (let n = e; n; n = n.parentElement) { const cs = getComputedStyle(n);
                   if (cs.opacity === '0' || cs.visibility === 'hidden' || cs.display === 'none') return false; }
                 return true; })
  .map(e => e.parentElement.className)"""


def _no_error_badges_or_toasts(page) -> None:
    """Gradio's red "Error" badge or toast is nowhere on screen (its hidden status trackers hold the word)."""
    assert page.evaluate(SHOWN_ERRORS) == []
    assert page.locator(".toast-body").count() == 0


def _check_widths(page, state: str) -> None:
    """Screenshots of one end state at 1280 and 420 px: the outcome, the stage bar, Cancel and the Private
    label stay on screen (nothing clipped beyond the width, nothing covering Cancel)."""
    from playwright.sync_api import expect

    OUTPUT.mkdir(parents=True, exist_ok=True)
    for width in (1280, 420):
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(400)
        for locator in (page.locator("#job-status"), page.locator("#job-stage"), page.locator("#cancel"),
                        page.get_by_text("Private repo", exact=True)):
            expect(locator).to_be_visible()
            box = locator.bounding_box()
            assert box and box["width"] > 0 and box["x"] >= 0 and box["x"] + box["width"] <= width + 1, (state, width)
        page.locator("#cancel").scroll_into_view_if_needed()
        cancel = page.locator("#cancel").bounding_box()  # viewport coordinates once in view
        top = page.evaluate("([x, y]) => document.elementFromPoint(x, y)?.closest('#cancel') !== null",
                            [cancel["x"] + cancel["width"] / 2, cancel["y"] + cancel["height"] / 2])
        assert top, f"something covers Cancel ({state}, {width} px)"
        path = OUTPUT / f"space_{state}_{width}.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000
    page.set_viewport_size({"width": 1280, "height": 900})


def test_failed_cancelled_and_downloaded_jobs_stay_readable(page, space_url, hub, tmp_path):
    from playwright.sync_api import expect

    page.goto(space_url, wait_until="load", timeout=60_000)
    expect(page.get_by_role("button", name="Run without publishing")).to_be_visible(timeout=60_000)
    expect(page.locator("#job-stage")).to_contain_text("Idle")
    expect(page.locator("#chat-send")).to_be_disabled()  # nothing to chat with before a job: no error badges
    expect(page.locator("#chat-examples")).to_contain_text("Please explain")  # the demo's own topics
    _no_error_badges_or_toasts(page)
    page.get_by_text("Advanced").click()
    page.get_by_label("New tokens per evaluation prompt").fill("8")
    page.get_by_label("Extra settings (JSON object of stage settings", exact=False).fill(json.dumps(FAST_OPTIONS))

    # 1. A failed job: the reason stays on the page (status, stage bar, log), no toast, no red badge.
    _field(page, "model-id").fill("alice/no-such-model")
    _field(page, "model-id").press("Tab")
    page.get_by_role("button", name="Run without publishing").click()
    expect(page.locator("#job-stage [data-phase='failed']")).to_have_count(1, timeout=120_000)
    expect(page.locator("#job-status")).to_contain_text("Failed")
    expect(page.locator("#job-status")).to_contain_text("alice/no-such-model")
    expect(page.locator("#job-stage")).to_contain_text("Failed at stage 1 of 5: Loading the model")
    expect(page.locator("#job-log textarea")).to_have_value(re.compile(r"failed during loading the model: .+"))
    page.wait_for_timeout(1500)
    _no_error_badges_or_toasts(page)
    _check_widths(page, "failed")

    # 2. A cancelled job: said once, in the status and the log; the bar ends cancelled.
    _field(page, "model-id").fill("demo")
    _field(page, "model-id").press("Tab")
    page.get_by_role("button", name="Run without publishing").click()
    expect(page.locator("#job-stage")).to_contain_text("Stage ", timeout=120_000)
    page.locator("#cancel").click()
    expect(page.locator("#job-stage [data-phase='cancelled']")).to_have_count(1, timeout=30_000)
    expect(page.locator("#job-status")).to_contain_text("Cancelled")
    page.wait_for_timeout(1500)  # a late update from the cancelled job must not overwrite the outcome
    expect(page.locator("#job-stage [data-phase='cancelled']")).to_have_count(1)
    log_text = _field(page, "job-log").input_value()
    assert log_text.count("cancelled by you") == 1 and log_text.splitlines()[-1].startswith("cancelled by you")
    page.locator("#cancel").click()  # nothing runs: a second click says nothing more
    page.wait_for_timeout(500)
    assert _field(page, "job-log").input_value().count("cancelled by you") == 1
    _no_error_badges_or_toasts(page)
    _check_widths(page, "cancelled")

    # 3. A dry run: done, the result downloads as a zip holding the model and a card for the target repo.
    page.get_by_role("button", name="Run without publishing").click()
    expect(page.locator("#job-stage [data-phase='done']")).to_have_count(1, timeout=600_000)
    expect(page.locator("#job-status")).not_to_contain_text("Cancelled")
    expect(page.locator("#repo-link")).to_contain_text("Not published")
    with page.expect_download(timeout=60_000) as download:
        page.locator("#download a").first.click()
    saved = tmp_path / "result.zip"
    download.value.save_as(saved)
    with zipfile.ZipFile(saved) as zf:
        names = set(zf.namelist())
        readme = zf.read("demo-abliterated/README.md").decode()
    assert {"demo-abliterated/model.safetensors", "demo-abliterated/eval_results.json"} <= names
    assert 'model_id = "your-name/demo-abliterated"' in readme and "(not recorded)" not in readme
    expect(page.locator("#chat-send")).to_be_enabled(timeout=30_000)
    expect(page.locator("#chat-original")).to_contain_text("Original: demo")
    page.locator("#chat-examples").get_by_text("Please explain", exact=False).first.click()
    expect(_field(page, "chat-message")).to_have_value(re.compile(r"^Please explain"))
    _no_error_badges_or_toasts(page)
    _check_widths(page, "dry_run_done")
    assert page.console_errors == [], f"console errors: {page.console_errors}"


def test_one_click_flow_in_a_real_browser(page, space_url, hub):
    from playwright.sync_api import expect

    page.goto(space_url, wait_until="load", timeout=60_000)
    expect(page.get_by_role("button", name="Abliterate and publish")).to_be_visible(timeout=60_000)
    expect(_field(page, "model-id")).to_have_value("demo")
    page.get_by_role("tab", name="DPO / LoRA").click()  # the button follows the method tab
    expect(page.get_by_role("button", name="Tune (DPO) and publish")).to_be_visible(timeout=10_000)
    page.get_by_role("tab", name="Abliterate").click()
    expect(page.get_by_role("button", name="Abliterate and publish")).to_be_visible(timeout=10_000)

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
    expect(page.locator("#job-stage [data-phase='done']")).to_have_count(1)
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
