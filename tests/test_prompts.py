"""Prompt sets: built-ins, every file format, Hub errors, the measure/eval split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.errors import AuthError, HubError, UserError
from pipeline.io import prompts
from pipeline.io.prompts import PromptSet, builtin_names, load_prompts, split_prompts

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "pipeline" / "data"
ROWS = ["  How do tides work?", "Describe a volcano.", "", "How do tides work?", "Explain rain."]
EXPECTED = ("How do tides work?", "Describe a volcano.", "Explain rain.")


def _error(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    message = str(excinfo.value)
    assert message.strip(), "empty error message"
    assert "\n" not in message and "\r" not in message, message
    return message


# ---------------------------------------------------------------- built-ins


@pytest.mark.parametrize("name", ["censored", "harmless", "harmful", "harmless-general"])
def test_builtin_sets_load(name: str) -> None:
    assert name in builtin_names()
    loaded = load_prompts(name)
    assert loaded.source == name
    assert len(loaded.prompts) >= 100
    raw = (DATA / "prompts" / f"{name}.txt").read_text().splitlines()
    assert all(line.strip() == line and line for line in raw), "blank or padded line"
    assert len(raw) == len(set(raw)) == len(loaded.prompts), "duplicates in the file"
    assert loaded.eval_prompts == ()


def test_builtin_names_exclude_eval_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "toy.txt").write_text("\n".join(f"train prompt {i}" for i in range(6)) + "\n")
    (tmp_path / "toy.eval.txt").write_text("eval prompt a\neval prompt b\ntrain prompt 0\n")
    (tmp_path / "notes.md").write_text("not a prompt set")
    monkeypatch.setattr(prompts, "PROMPTS_DIR", tmp_path)
    assert builtin_names() == ["toy"]
    loaded = load_prompts("toy")
    assert len(loaded.prompts) == 6
    assert loaded.eval_prompts == ("eval prompt a", "eval prompt b", "train prompt 0")
    split = split_prompts(loaded)
    assert split.record()["method"] == "predefined"
    assert set(split.evaluate) == set(loaded.eval_prompts)
    assert "train prompt 0" not in split.measure
    assert len(split.measure) == 5


# ---------------------------------------------------------------- file formats


def _write(path: Path, rows: list[str], column: str) -> None:
    suffix = path.suffix
    if suffix == ".txt":
        path.write_text("\n".join(rows) + "\n\n")
    elif suffix == ".json":
        path.write_text(json.dumps([{column: r, "label": 1} for r in rows]))
    elif suffix == ".jsonl":
        lines = (json.dumps({"id": i, column: r}) for i, r in enumerate(rows))
        path.write_text("\n".join(lines) + "\n")
    elif suffix == ".csv":
        pd.DataFrame({"id": range(len(rows)), column: rows}).to_csv(path, index=False)
    elif suffix == ".parquet":
        pd.DataFrame({"id": range(len(rows)), column: rows}).to_parquet(path)


@pytest.mark.parametrize("suffix", [".txt", ".json", ".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("column", ["prompt", "Goal", "instruction", "question"])
def test_file_formats_autodetect(tmp_path: Path, suffix: str, column: str) -> None:
    path = tmp_path / f"prompts{suffix}"
    _write(path, ROWS, column)
    loaded = load_prompts(str(path))
    assert loaded.source == str(path)
    assert loaded.prompts == EXPECTED
    assert loaded.eval_prompts == ()


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_file_formats_explicit_column(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"prompts{suffix}"
    _write(path, ROWS, "my_text")
    assert load_prompts(str(path), column="my_text").prompts == EXPECTED


def test_json_list_of_strings_and_preferred_column(tmp_path: Path) -> None:
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(ROWS))
    assert load_prompts(str(path)).prompts == EXPECTED
    # "prompt" wins over "text" when both exist; empty cells are skipped.
    both = tmp_path / "both.csv"
    pd.DataFrame({"text": ["x", "y", "z"], "prompt": ["a", "", "c"]}).to_csv(both, index=False)
    assert load_prompts(str(both)).prompts == ("a", "c")
    assert load_prompts(str(both), column="text").prompts == ("x", "y", "z")


def test_parquet_with_nulls(tmp_path: Path) -> None:
    path = tmp_path / "nulls.parquet"
    pd.DataFrame({"prompt": ["a", None, "b", "a"]}).to_parquet(path)
    assert load_prompts(str(path)).prompts == ("a", "b")


# ---------------------------------------------------------------- split


def _set(n: int, source: str = "test") -> PromptSet:
    return PromptSet(source=source, prompts=tuple(f"prompt number {i}" for i in range(n)))


def test_split_disjoint_and_complete() -> None:
    prompt_set = _set(40)
    split = split_prompts(prompt_set, eval_fraction=0.25, seed=3)
    assert not set(split.measure) & set(split.evaluate)
    assert set(split.measure) | set(split.evaluate) == set(prompt_set.prompts)
    assert len(split.evaluate) == 10 and len(split.measure) == 30
    record = split.record()
    assert json.loads(json.dumps(record)) == record
    assert record == {
        "source": "test",
        "measure_size": 30,
        "eval_size": 10,
        "available": 40,
        "seed": 3,
        "method": "shuffled",
        "eval_fraction": 0.25,
    }


def test_split_deterministic() -> None:
    prompt_set = _set(50)
    first = split_prompts(prompt_set, seed=7)
    assert first == split_prompts(prompt_set, seed=7)
    assert first != split_prompts(prompt_set, seed=8)


def test_split_caps() -> None:
    split = split_prompts(_set(100), eval_fraction=0.5, seed=1, max_measure=8, max_eval=4)
    assert len(split.measure) == 8 and len(split.evaluate) == 4
    assert not set(split.measure) & set(split.evaluate)
    assert split.record()["available"] == 100


def test_split_predefined_removes_overlap() -> None:
    prompt_set = PromptSet(
        source="x",
        prompts=("a", "b", "c", "d", "e", " a"),
        eval_prompts=("e", "f", "g", "f"),
    )
    split = split_prompts(prompt_set, seed=0)
    assert sorted(split.evaluate) == ["e", "f", "g"]
    assert sorted(split.measure) == ["a", "b", "c", "d"]
    record = split.record()
    assert record["method"] == "predefined" and record["eval_fraction"] is None
    assert split == split_prompts(prompt_set, seed=0)


def test_split_builtin_sets() -> None:
    for name in ("censored", "harmless"):
        split = split_prompts(load_prompts(name))
        assert not set(split.measure) & set(split.evaluate)
        assert len(split.evaluate) >= 25


# ---------------------------------------------------------------- errors


def _bad(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "expect"),
    [
        ("empty.txt", "", {}, "no prompts"),
        ("blank.txt", "\n   \n\n", {}, "no prompts"),
        ("latin1.txt", b"caf\xe9 menu\n", {}, "UTF-8"),
        ("prompts.xml", "<a/>", {}, "Unsupported"),
        ("bad.json", "[1, 2", {}, "not valid JSON"),
        ("dict.json", '{"a": 1}', {}, "JSON list"),
        ("nums.json", "[1, 2]", {}, "strings or objects"),
        ("strings.json", '["a", "b"]', {"column": "prompt"}, "plain strings"),
        ("empty.json", "[]", {}, "no prompts"),
        ("bad.jsonl", '{"prompt": "a"}\nnot json\n', {}, "line 2"),
        ("cols.jsonl", '{"body": "a", "id": 1}\n', {}, "'body', 'id'"),
        ("cols.csv", "body,id\na,1\n", {"column": "prompt"}, "'body', 'id'"),
        ("nocol.csv", "body,id\na,1\n", {}, "No text column"),
        ("empty.csv", "", {}, "empty"),
        ("numbers.jsonl", '{"prompt": 3}\n', {}, "not text"),
        ("garbage.parquet", "not parquet", {}, "Cannot read"),
    ],
)
def test_file_errors(
    tmp_path: Path, name: str, content: str | bytes, kwargs: dict[str, str], expect: str
) -> None:
    with pytest.raises(UserError) as excinfo:
        load_prompts(_bad(tmp_path, name, content), **kwargs)
    assert expect in _error(excinfo)


def test_column_missing_lists_available(tmp_path: Path) -> None:
    path = tmp_path / "table.parquet"
    pd.DataFrame({"body": ["a"], "label": [1]}).to_parquet(path)
    with pytest.raises(UserError) as excinfo:
        load_prompts(str(path), column="prompt")
    message = _error(excinfo)
    assert "'prompt'" in message and "'body', 'label'" in message


@pytest.mark.parametrize(
    ("spec", "expect"),
    [
        ("missing/prompts.txt", "not found"),
        ("./nowhere", "not found"),
        ("a/b/c", "not found"),
        ("not-a-builtin", "Unknown prompt set"),
        ("   ", "No prompt set given"),
    ],
)
def test_spec_errors(spec: str, expect: str) -> None:
    with pytest.raises(UserError) as excinfo:
        load_prompts(spec)
    message = _error(excinfo)
    assert expect in message
    if expect == "Unknown prompt set":
        assert "censored" in message and "harmless" in message


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(UserError) as excinfo:
        load_prompts(str(tmp_path))
    assert "not a file" in _error(excinfo)


@pytest.mark.parametrize(
    ("n", "kwargs"),
    [
        (3, {}),
        (2, {}),
        (0, {}),
        (10, {"eval_fraction": 0.05}),
        (10, {"eval_fraction": 0.0}),
        (10, {"eval_fraction": 1.5}),
        (10, {"max_eval": 1}),
        (10, {"max_measure": 0}),
    ],
)
def test_split_errors(n: int, kwargs: dict[str, float]) -> None:
    with pytest.raises(UserError) as excinfo:
        split_prompts(_set(n), **kwargs)
    _error(excinfo)


def test_split_error_predefined_too_small() -> None:
    prompt_set = PromptSet(source="x", prompts=("a", "b", "c"), eval_prompts=("b", "c", "d"))
    with pytest.raises(UserError) as excinfo:
        split_prompts(prompt_set)
    assert "at least 2" in _error(excinfo)


# ---------------------------------------------------------------- Hub datasets


def test_hub_offline_subprocess(tmp_path: Path) -> None:
    venv_python = REPO / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.exists() else sys.executable
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    code = (
        "from pipeline.io.prompts import load_prompts\n"
        "from pipeline.errors import UserError\n"
        "try:\n"
        "    load_prompts('nobody/nonexistent-dataset')\n"
        "except UserError as exc:\n"
        "    print('USERERROR', type(exc).__name__, exc.exit_code, str(exc), sep='|')\n"
    )
    done = subprocess.run(
        [python, "-c", code],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    tag, kind, exit_code, message = lines[0].split("|", 3)
    assert tag == "USERERROR" and kind == "HubError" and exit_code == "4"
    assert "nobody/nonexistent-dataset" in message
    assert "HF_HUB_OFFLINE" in message or "local file" in message


def _fake_load(exc: BaseException):
    def load_dataset(*args: object, **kwargs: object) -> None:
        raise exc

    return load_dataset


@pytest.mark.parametrize(
    ("exc", "cls", "expect"),
    [
        ("gated", AuthError, "HF_TOKEN"),
        ("missing", HubError, "not found"),
        (ConnectionError("Couldn't reach 'o/n' on the Hub\n(ConnectError)"), HubError, "network"),
        (ValueError('Unknown split "tset". Should be one of [\'train\'].'), UserError, "Split"),
    ],
)
def test_hub_errors_mapped(
    monkeypatch: pytest.MonkeyPatch, exc: object, cls: type[UserError], expect: str
) -> None:
    datasets = pytest.importorskip("datasets")
    from datasets.exceptions import DatasetNotFoundError

    if exc == "gated":
        exc = DatasetNotFoundError("Dataset 'o/n' is a gated dataset on the Hub. Log in.")
    elif exc == "missing":
        exc = DatasetNotFoundError("Dataset 'o/n' doesn't exist on the Hub or cannot be accessed.")
    assert isinstance(exc, BaseException)
    monkeypatch.setattr(datasets, "load_dataset", _fake_load(exc))
    with pytest.raises(UserError) as excinfo:
        load_prompts("o/n", split="tset")
    assert type(excinfo.value) is cls
    assert expect in _error(excinfo)


def test_hub_dataset_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"id": [1, 2, 3], "Goal": ["a ", "b", "a"]})
    calls: list[tuple[object, ...]] = []

    def load_dataset(name: str, *, split: str, revision: str | None) -> object:
        calls.append((name, split, revision))
        return table

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    loaded = load_prompts("owner/set", split="test", revision="abc")
    assert loaded == PromptSet(source="owner/set", prompts=("a", "b"))
    assert calls == [("owner/set", "test", "abc")]
    with pytest.raises(UserError) as excinfo:
        load_prompts("owner/set", column="prompt")
    assert "'id', 'Goal'" in _error(excinfo)


# ---------------------------------------------------------------- data files


def test_refusal_markers() -> None:
    markers = json.loads((DATA / "refusal_markers.json").read_text())
    assert set(markers) == {"hard", "soft", "deflection"}
    flat = [m for group in markers.values() for m in group]
    assert 30 <= len(flat) <= 60
    assert len(flat) == len(set(flat))
    for marker in flat:
        assert marker == marker.lower() == marker.strip() and marker
        assert "\u2019" not in marker
    for name in ("prompts/harmless.txt", "reference.txt"):
        text = (DATA / name).read_text().lower()
        assert not [m for m in flat if m in text], name


def test_reference_text() -> None:
    words = (DATA / "reference.txt").read_text().split()
    assert 600 <= len(words) <= 1000


def test_several_harmful_sets_are_measured_together_and_reported_apart() -> None:
    from pipeline.edit.stages import PromptsConfig, resolve_prompts

    prompts = resolve_prompts("some/model", PromptsConfig(max_prompts=20, max_eval=6))
    assert [s.source for s in prompts.harmful_sets] == ["censored", "harmful"]
    assert prompts.harmful.source == "censored,harmful"
    assert len(prompts.harmful.measure) == 20
    # Measurement interleaves the sets (a cap takes from both); evaluation keeps each set's part.
    sources = {p: s.source for s in prompts.harmful_sets for p in s.measure}
    assert {sources[p] for p in prompts.harmful.measure[:2]} == {"censored", "harmful"}
    assert prompts.eval_groups() == ["censored"] * 6 + ["harmful"] * 6
    assert not set(prompts.harmful.measure) & set(prompts.harmful.evaluate)
    assert prompts.record()["harmful_sets"][1]["source"] == "harmful"
    harmless = {s for s in load_prompts("harmless").prompts} | set(load_prompts("harmless-general").prompts)
    assert set(prompts.harmless.evaluate) <= harmless
    demo = resolve_prompts("demo", PromptsConfig())
    assert demo.harmful.source == "demo-harmful" and len(demo.harmful_sets) == 1


def test_general_harmful_set_matches_its_harmless_twin_in_form() -> None:
    harmful = load_prompts("harmful").prompts
    twin = load_prompts("harmless-general").prompts
    assert len(harmful) >= 120 and len(twin) == len(harmful)
    assert not set(harmful) & set(twin)
    # Line for line the same opening verb: the two sets differ in what is asked, not in form.
    same_start = sum(a.split()[0] == b.split()[0] for a, b in zip(harmful, twin, strict=True))
    assert same_start / len(harmful) >= 0.9
