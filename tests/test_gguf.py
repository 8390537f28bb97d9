"""GGUF input: bad sources fail with one line before any work (loading real GGUF files: tests/test_real.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.io.loading import LoadConfig, is_gguf, load_model, local_path

ROOT = Path(__file__).resolve().parent.parent


def test_gguf_sources_are_recognised():
    assert is_gguf("models/x.GGUF")
    assert is_gguf("owner/repo", LoadConfig(gguf_file="model-Q4_K_M.gguf"))
    assert not is_gguf("owner/repo") and not is_gguf("demo")


@pytest.mark.parametrize(
    ("model", "cfg", "expect"),
    [
        ("missing/file.gguf", LoadConfig(), "does not exist"),
        ("x.gguf", LoadConfig(gguf_file="y.gguf"), "not both"),
        ("x.gguf", LoadConfig(load_in_4bit=True), "--load-in-4bit"),
    ],
)
def test_bad_gguf_sources(model, cfg, expect, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match=expect):
        load_model(model, cfg)


def test_a_folder_without_the_named_gguf_file(tmp_path):
    with pytest.raises(UserError, match="has no GGUF file 'q.gguf'"):
        load_model(str(tmp_path), LoadConfig(gguf_file="q.gguf"))


def test_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(UserError, match="not a readable GGUF file"):
        load_model(str(bad))


def test_commands_that_need_safetensors_say_so(tmp_path):
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"GGUF")
    with pytest.raises(UserError, match="GGUF file"):
        local_path(str(bad))


def test_streaming_a_gguf_file_is_a_one_line_error(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "abliterate", str(src), "--out", str(tmp_path / "out"), "--streaming"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--streaming" in done.stderr
    assert not (tmp_path / "out").exists()
