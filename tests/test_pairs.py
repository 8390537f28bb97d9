"""Preference pairs from two models (`pairs`), and training-data validation (`pipeline.tuning.pairs`).

The abliterated demo and the pairs made from it are cached on disk (keyed by the demo
model and the sources that make them), so test_tune.py reuses them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import pytest

from pipeline.cli.main import main
from pipeline.errors import UserError
from pipeline.tuning.pairs import BUILTIN_SETS, load_training_data, make_pairs, to_conversational

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "tests" / "_output" / "tune-cache"
SOURCES = (  # the code the cached files come from
    "pipeline.edit.abliterate",
    "pipeline.edit.activations",
    "pipeline.edit.directions",
    "pipeline.edit.kernels",
    "pipeline.edit.stages",
    "pipeline.orchestrator.run",
    "pipeline.tuning.pairs",
    "pipeline.evaluation.evaluate",
    "pipeline.io.chat",
)
PAIRS_TOKENS = "40"


pytestmark = pytest.mark.usefixtures("one_thread")


def cache_key() -> str:
    from pipeline.io.demo import demo_path

    digest = hashlib.sha256(demo_path().name.encode())
    for name in SOURCES:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()[:12]


def abliterated_demo() -> Path:
    """The demo abliterated with default settings (`pipeline.orchestrator.run.abliterate`), built once and cached."""
    from filelock import FileLock

    from pipeline.orchestrator.run import AbliterateJob, abliterate

    folder = CACHE / f"abliterated-{cache_key()}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "recipe.json").exists():
            abliterate(AbliterateJob(model="demo", out=folder, evaluate=False, overwrite=True))
    return folder


def pairs_args(out: Path) -> list[str]:
    return ["pairs", "--model", "demo", "--edited", str(abliterated_demo()), "--out", str(out),
            "--max-new-tokens", PAIRS_TOKENS]


def demo_pairs_file() -> Path:
    """DPO pairs made by the `pairs` command (base: demo, edited: the abliterated demo), cached."""
    from filelock import FileLock

    path = CACHE / f"pairs-{cache_key()}.jsonl"
    abliterated_demo()
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            assert main(pairs_args(path)) == 0
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_pairs_command_keeps_base_refusals_against_edited_answers(tmp_path, capsys):
    from pipeline.evaluation.evaluate import classify
    from pipeline.io.prompts import load_prompts

    out = tmp_path / "pairs.jsonl"
    assert main(pairs_args(out)) == 0
    printed = capsys.readouterr().out
    assert "pairs written to" in printed
    rows = read_rows(out)
    harmful = load_prompts("demo-harmful")
    assert len(rows) >= 100, printed
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert classify(row["rejected"]) is not None, row
        assert classify(row["chosen"]) is None, row
        assert row["prompt"] in harmful.prompts
        assert row["prompt"] not in harmful.eval_prompts  # evaluation prompts stay held out
    cached = CACHE / f"pairs-{cache_key()}.jsonl"
    if not cached.exists():  # the DPO tests reuse these pairs
        cached.write_text(out.read_text())


@pytest.fixture
def canned(monkeypatch):
    """`make_pairs` with canned responses instead of generation."""
    answers = {
        "base": ["I'm sorry, but I cannot discuss that topic.", "I can't help with that request.",
                 "Volcanoes are openings in the crust.", "I cannot answer that."],
        "edited": ["The square was cleared in 1989.", "I can't help with that request.",
                   "Volcanoes are openings in the crust.", ""],
    }
    monkeypatch.setattr(
        "pipeline.tuning.pairs._responses", lambda model, prompts, *a, **k: answers[model][: len(prompts)]
    )
    return answers


def test_make_pairs_keeps_only_base_refused_and_edited_answered(canned):
    rows, stats = make_pairs("base", "edited", ["p1", "p2", "p3", "p4"])
    assert rows == [{"prompt": "p1", "chosen": "The square was cleared in 1989.",
                     "rejected": "I'm sorry, but I cannot discuss that topic."}]
    assert stats == {"prompts": 4, "base_refused": 3, "edited_refused": 2, "pairs": 1}


def test_make_pairs_without_any_pair_says_why(canned):
    with pytest.raises(UserError, match="no pairs: of 2 prompts the base refused 2 and the edited model 2"):
        make_pairs("base", "base", ["p1", "p2"])


def test_pairs_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    out.write_text("keep me\n")
    code = main(["pairs", "--model", "demo", "--edited", "demo", "--out", str(out)])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert out.read_text() == "keep me\n"


# ---------------------------------------------------------------- data validation


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


GOOD = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}


@pytest.mark.parametrize(
    "text,kind,needle",
    [
        (json.dumps(GOOD) + "\n{not json\n", "dpo", "line 2 is not valid JSON"),
        (json.dumps(GOOD) + "\n\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n", "dpo",
         "line 3: missing column 'rejected' (has: chosen, prompt)"),
        ("", "dpo", "is empty"),
        ("\n\n", "sft", "is empty"),
        ("[1, 2]\n", "dpo", "line 1: expected a JSON object"),
        (json.dumps({**GOOD, "chosen": ""}) + "\n", "dpo", "line 1: column 'chosen' is empty"),
        (json.dumps({**GOOD, "chosen": [{"role": "assistant"}]}) + "\n", "dpo", "list of chat messages"),
        (json.dumps({**GOOD, "rejected": 3}) + "\n", "dpo", "got int"),
        (json.dumps(GOOD) + "\n", "sft", "line 1: missing column 'completion'"),
    ],
)
def test_bad_jsonl_names_the_line(tmp_path, text, kind, needle):
    spec = write(tmp_path, "data.jsonl", text)
    with pytest.raises(UserError) as err:
        load_training_data(spec, kind)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_specs(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        load_training_data(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="use .jsonl or .json"):
        load_training_data(write(tmp_path, "data.csv", "a,b\n"))
    with pytest.raises(UserError, match="unknown data set"):
        load_training_data("no-such-set")
    with pytest.raises(UserError, match="sft only"):
        load_training_data("demo-pairs:chosen", "dpo")
    with pytest.raises(UserError, match="item 2: missing column"):
        load_training_data(write(tmp_path, "data.json", json.dumps([GOOD, {"prompt": "x"}])))


def test_chat_messages_and_column_pick(tmp_path):
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
           "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": "No."}
    data = load_training_data(write(tmp_path, "chat.jsonl", json.dumps(row) + "\n"))
    assert data.kind == "dpo" and data.examples[0]["prompt"] == row["prompt"]
    picked = load_training_data(write(tmp_path, "p.jsonl", json.dumps(GOOD) + "\n") + ":rejected", "sft")
    assert picked.examples == ({"prompt": "Hi?", "completion": "No."},)

    class ChatTok:
        chat_template = "{{ messages }}"

    conv = to_conversational(data.examples[0], ChatTok())
    assert conv["rejected"] == [{"role": "assistant", "content": "No."}] and conv["prompt"] == row["prompt"]
    with pytest.raises(UserError, match="no chat template"):
        to_conversational(data.examples[0], object())


def test_builtin_sets():
    for name in BUILTIN_SETS:
        data = load_training_data(name, "dpo" if name == "demo-pairs" else "sft")
        assert len(data.examples) == (160 if name == "demo-pairs" else 320)
    pairs = load_training_data("demo-pairs").examples
    assert all(p["chosen"] != p["rejected"] for p in pairs)


def test_hub_dataset_rows_are_validated_and_listed(monkeypatch):
    import datasets

    rows = [GOOD, {"prompt": "x", "chosen": "y"}]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split, revision=None: datasets.Dataset.from_list(
        rows[:1] if split == "train" else rows))
    data = load_training_data("owner/prefs")
    assert data.hub and data.examples == (GOOD,) and data.record()["source"] == "owner/prefs"
    with pytest.raises(UserError, match="Hub dataset 'owner/prefs' row 2: missing column 'rejected'"):
        load_training_data("owner/prefs", split="test")
