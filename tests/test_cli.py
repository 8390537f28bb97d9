"""Bad input through the real CLI: one line on stderr, exit code 2, no traceback, nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def prompt_files(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("only one prompt\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    return {"one": one, "empty": empty}


@pytest.mark.parametrize(
    "args,needle",
    [
        (["./no/such/model"], "does not exist"),
        (["demo", "--attn-strength", "-1"], "attn-strength"),
        (["demo", "--mlp-width", "0"], "mlp-width"),
        (["demo", "--layer", "99", "--directions", "DIRS"], "beyond the model's depth"),
        (["demo", "--layer", "1.7", "--directions", "DIRS"], "fraction"),
        (["demo", "--harmful", "ONE"], "at least 2"),
        (["demo", "--harmless", "EMPTY"], "EMPTY"),
        (["demo", "--harmful", "no_such_file.txt"], "not found"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(capsys, tmp_path, prompt_files, demo_dirs, args, needle):
    args = [a.replace("DIRS", str(demo_dirs)) for a in args]
    args = [a.replace("ONE", str(prompt_files["one"])).replace("EMPTY", str(prompt_files["empty"])) for a in args]
    needle = needle.replace("EMPTY", "empty")
    code, err = _run(capsys, "abliterate", *args, "--out", str(tmp_path / "out"), "--no-eval")
    line = _one_line_error(err)
    assert code == 2
    assert needle in (line.lower() if needle.islower() else line)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_never_deleted(capsys, tmp_path, demo_dirs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = _run(capsys, "abliterate", "demo", "--out", str(out), "--directions", str(demo_dirs), "--no-eval")
    assert code == 2 and "--overwrite" in _one_line_error(err)
    assert (out / "precious.txt").read_text() == "keep me"


def test_unknown_architecture_names_model_type_and_supported(capsys, tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 8}))
    code, err = _run(capsys, "abliterate", str(folder), "--out", str(tmp_path / "o"), "--no-eval")
    line = _one_line_error(err)
    assert code == 2 and "'gpt2'" in line and "llama" in line and "qwen3_moe" in line


def test_private_hub_model_without_token(capsys, tmp_path, hub):
    hub.seed("alice/secret-model", {"config.json": b'{"model_type": "llama"}'}, private=True)
    code, err = _run(capsys, "abliterate", "alice/secret-model", "--out", str(tmp_path / "o"), "--no-eval")
    line = _one_line_error(err)
    assert code == 2 and "HF_TOKEN" in line


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "abliterate", "./missing-model", "--out", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "Traceback" not in proc.stderr


def test_no_chat_template_falls_back_to_plain_prompts(caplog):
    from pipeline.io.chat import format_prompts

    class Plain:
        chat_template = None

    with caplog.at_level("WARNING"):
        assert format_prompts(Plain(), ["hello"]) == ["hello"]
    assert "no chat template" in caplog.text


def test_summary_lines_carry_intervals_and_on_topic_rate():
    from pipeline.cli.main import eval_lines
    from pipeline.evaluation.replies import rates, wilson_interval

    model = rates([None] + [True] * 2 + [False] * 9, [False] * 3 + [True] * 6 + [False] * 3)
    base = rates([True] * 12, [False] * 12)
    keys = ("refusal_rate", "refusal_interval", "on_topic_rate", "on_topic_interval", "undetermined")
    results = {**{k: {"base": base[k], "model": model[k]} for k in keys}, "num_prompts": {"harmful": 12},
               "kl_divergence": 0.0123, "perplexity": {"base": None, "model": None}}
    lines = eval_lines(results)
    lo, hi = wilson_interval(2, 11)
    assert lines[0] == (f"refusal rate: 100.0% (95% CI 75.8–100.0%) -> 18.2% (95% CI {100 * lo:.1f}–{100 * hi:.1f}%)"
                        " (12 prompts)")
    assert lines[1].startswith("on-topic answers: 0.0% (95% CI 0.0–24.2%) -> 54.5%")
    assert "undetermined (reasoning unfinished, not counted): 0 -> 1" in lines
    assert "note: only 12 harmful prompts: these rates are rough" in lines
    assert lines[-1] == "KL divergence (harmless, first answer token): 0.0123"
