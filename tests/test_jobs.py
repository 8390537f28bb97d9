"""`python -m pipeline run`: model to (local) Hub in one command, batch recipes, stage reuse."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.cli.main import main
from tests.hub_fixtures import ALICE_TOKEN


@pytest.fixture
def alice(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    monkeypatch.setenv("ABLITERATOR_PUSH_BACKOFF_S", "0")


def test_run_publishes_weights_card_and_results_then_reuses_stages(hub, alice, tmp_path, capsys):
    out = tmp_path / "demo-out"
    code = main(["run", "demo", "--repo-id", "alice/demo-abliterated", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    files = hub.files("alice/demo-abliterated")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "recipe.json", "eval_results.json"):
        assert files[name] == (out / name).read_bytes(), name
    results = json.loads(files["eval_results.json"])
    assert results["refusal_rate"]["base"] >= 0.9 and results["refusal_rate"]["model"] <= 0.1
    card = files["README.md"].decode()
    assert "model-index" in card and f"{results['kl_divergence']:.4f}"[:5] in card
    assert ALICE_TOKEN not in printed.out + printed.err
    assert all(ALICE_TOKEN.encode() not in data for data in files.values())

    # A second run finds every stage finished and only re-publishes.
    (out / "README.md").unlink()
    code = main(["run", "demo", "--repo-id", "alice/demo-abliterated", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "reusing the edited model" in printed and "measuring" not in printed


def test_interrupted_run_resumes_after_the_measurement(hub, tmp_path, capsys):
    out = tmp_path / "o"
    work = tmp_path / ".o.work" / "directions"
    assert main(["run", "demo", "--no-push", "--out", str(out)]) == 0
    assert (work / "directions.json").exists()
    # Lose everything after the measurement: the edit and evaluation are redone, the measurement reused.
    import shutil

    shutil.rmtree(out)
    capsys.readouterr()
    assert main(["run", "demo", "--no-push", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reusing directions measured earlier" in printed
    assert json.loads((out / "eval_results.json").read_text())["refusal_rate"]["model"] <= 0.1


def test_batch_recipe_continues_past_a_failed_job(hub, alice, tmp_path, capsys):
    recipe = tmp_path / "jobs.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "defaults": {"private": True},
                "jobs": [
                    {"model": "./no-such-model", "repo_id": "alice/broken", "out": str(tmp_path / "a")},
                    {
                        "model": "demo",
                        "repo_id": "alice/demo-batch",
                        "out": str(tmp_path / "b"),
                        "options": {"preset": "aggressive"},
                    },
                ],
            }
        )
    )
    code = main(["run", "--recipe", str(recipe)])
    printed = capsys.readouterr()
    assert code == 2
    assert "./no-such-model [abliterate] failed" in printed.out and "demo [abliterate] ok" in printed.out
    assert hub.repo("alice/demo-batch").private
    recipe_json = json.loads(hub.files("alice/demo-batch")["recipe.json"])
    assert recipe_json["parameters"]["preset"] == "aggressive"


def test_run_without_repo_id_or_with_bad_recipe(tmp_path, capsys):
    assert main(["run", "demo"]) == 2
    assert "--repo-id" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs: [{model: demo, method: nonsense}]")
    assert main(["run", "--recipe", str(bad)]) == 2
    assert "method" in capsys.readouterr().err
