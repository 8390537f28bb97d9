"""`run` reuses a finished stage only when it was made from the same model, revision, method, settings
and prompts; unknown option keys are errors; a batch survives a job that crashes."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from pipeline.cli.main import main
from pipeline.orchestrator.fingerprint import FINGERPRINT_FILE, stage_fingerprints
from pipeline.orchestrator.run import RunJob

FAST = ["--max-new-tokens", "8", "--no-perplexity", "--select-prompts", "4", "--select-tokens", "4",
        "--max-prompts", "16"]


def test_the_default_folder_names_the_owner():
    a, b = RunJob(model="orgA/X", push=False), RunJob(model="orgB/X", push=False)
    assert a.output_dir().name == "orgA--X-abliterate" and b.output_dir().name == "orgB--X-abliterate"
    assert RunJob(model="demo", method="dpo", push=False).output_dir().name == "demo-dpo"


def test_each_stage_fingerprint_follows_what_determines_it(tmp_path):
    prompts = tmp_path / "harmful.txt"
    prompts.write_text("first\nsecond\n")
    base = stage_fingerprints("org/X", "abliterate", {"harmful": str(prompts), "preset": "standard"})
    prompts.write_text("first\nchanged\n")  # same path, other content
    edited_file = stage_fingerprints("org/X", "abliterate", {"harmful": str(prompts), "preset": "standard"})
    assert all(edited_file[s] != base[s] for s in ("directions", "edit", "eval"))
    other_owner = stage_fingerprints("other/X", "abliterate", {"harmful": str(prompts), "preset": "standard"})
    revision = stage_fingerprints("org/X", "abliterate", {"harmful": str(prompts), "preset": "standard",
                                                          "revision": "v2"})
    assert other_owner["directions"] != edited_file["directions"] != revision["directions"]
    preset = stage_fingerprints("org/X", "abliterate", {"harmful": str(prompts), "preset": "aggressive"})
    assert preset["directions"] == edited_file["directions"] and preset["edit"] != edited_file["edit"]
    tokens = stage_fingerprints("org/X", "abliterate", {"harmful": str(prompts), "preset": "standard",
                                                        "max_new_tokens": 8})
    assert tokens["edit"] == edited_file["edit"] and tokens["eval"] != edited_file["eval"]
    method = stage_fingerprints("org/X", "auto", {"harmful": str(prompts), "preset": "standard"})
    assert method["edit"] != edited_file["edit"]


def test_a_rerun_with_other_prompts_measures_again_and_never_publishes_the_old_edit(hub, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", "demo", "--no-push", "--out", str(out), *FAST]) == 0
    first = json.loads((out / "recipe.json").read_text())
    assert (out / FINGERPRINT_FILE).is_file()

    harmful = tmp_path / "harmful.txt"  # other prompts: every stage must be made again
    from pipeline.io.prompts import load_prompts

    harmful.write_text("\n".join(load_prompts("demo-harmful").prompts[::2]) + "\n")
    capsys.readouterr()
    assert main(["run", "demo", "--no-push", "--out", str(out), "--harmful", str(harmful), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "reusing" not in printed and "measuring refusal directions" in printed
    second = json.loads((out / "recipe.json").read_text())
    assert first["prompts"]["harmful"]["source"] == "demo-harmful"
    assert second["prompts"]["harmful"]["source"] == str(harmful)

    assert main(["run", "demo", "--no-push", "--out", str(out), "--harmful", str(harmful), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "reusing the edited model" in printed and "evaluating" not in printed


def test_a_folder_not_made_by_run_is_never_reused(tmp_path, capsys):
    out = tmp_path / "someone-elses"
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps({"kind": "abliterated", "base_model": "orgA/X"}))
    (out / "eval_results.json").write_text("{}")
    assert main(["run", "demo", "--no-push", "--out", str(out), *FAST]) == 2
    assert "not made by `run`" in capsys.readouterr().err
    assert json.loads((out / "recipe.json").read_text())["base_model"] == "orgA/X"  # left untouched


def test_unknown_option_keys_are_rejected_naming_the_valid_ones(tmp_path, capsys):
    recipe = tmp_path / "jobs.yaml"
    recipe.write_text(yaml.safe_dump({"jobs": [{"model": "demo", "repo_id": "alice/x",
                                                "options": {"trails": 5, "preset": "standard"}}]}))
    assert main(["run", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert "'trails'" in err and "did you mean 'trials'" in err and "preset" in err and len(err.splitlines()) == 1
    recipe.write_text(yaml.safe_dump({"job": [{"model": "demo"}], "jobs": [{"model": "demo", "push": False}]}))
    assert main(["run", "--recipe", str(recipe)]) == 2
    assert "unknown key 'job'" in capsys.readouterr().err
    with pytest.raises(Exception, match="unknown option 'markers'"):
        RunJob(model="demo", push=False, options={"markers": "x.json"})


def test_a_crashing_job_is_reported_and_the_batch_continues(tmp_path, demo_dir, capsys):
    broken = tmp_path / "broken-model"
    shutil.copytree(demo_dir, broken)
    for shard in broken.glob("*.safetensors"):
        shard.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")  # a corrupt safetensors header
    recipe = tmp_path / "jobs.yaml"
    recipe.write_text(yaml.safe_dump({"defaults": {"push": False}, "jobs": [
        {"model": str(broken), "out": str(tmp_path / "a")},
        {"model": "./no-such-model", "out": str(tmp_path / "b")},
    ]}))
    code = main(["run", "--recipe", str(recipe)])
    printed = capsys.readouterr()
    assert code == 1, printed.err
    assert f"{broken} [abliterate] failed: unexpected error" in printed.out
    assert "./no-such-model [abliterate] failed" in printed.out  # the second job still ran
    assert "Traceback" not in printed.out + printed.err
