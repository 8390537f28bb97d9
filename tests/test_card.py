"""Model cards: snapshot of a rendered card, strict templates, metadata round trip, the three kinds."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import HfApi

from pipeline.errors import UserError
from pipeline.publish import card

SNAPSHOT = Path(__file__).resolve().parent / "snapshots" / "abliterated_card.md"
REPO_ID = "alice/demo-abliterated"

# Recorded values that differ between machines and runs: pinned so the snapshot is the same everywhere.
PINNED = {"created": "2026-11-21T10:00:00Z",
          "command": "python -m pipeline abliterate demo --method norm-preserving --out out/demo",
          "versions": {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.23.0", "pipeline": "0.1.0"}}


def _rounded(value: Any) -> Any:
    """Floats to 3 significant digits: measured scores differ in their last bits between CPUs."""
    if isinstance(value, float):
        return float(f"{value:.3g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output folder that `abliterate` wrote: the demo model, norm-preserving, briefly evaluated."""
    from pipeline.edit.abliterate import EditConfig
    from pipeline.edit.stages import AbliterateJob
    from pipeline.evaluation.evaluate import EvalConfig
    from pipeline.orchestrator.run import abliterate

    out = tmp_path_factory.mktemp("card") / "demo-abliterated"
    abliterate(AbliterateJob(model="demo", out=out, edit=EditConfig(method="norm-preserving"),
                             eval=EvalConfig(max_new_tokens=16)))
    return out


@pytest.fixture(scope="module")
def real_recipe(written: Path) -> dict[str, Any]:
    """The recipe `abliterate` wrote, with the machine- and run-specific values pinned."""
    recipe = json.loads((written / "recipe.json").read_text())
    assert set(PINNED) <= set(recipe) and recipe["shards"], "abliterate no longer records these: update PINNED"
    recipe.update(PINNED, shards={name: "0" * 64 for name in recipe["shards"]})
    return _rounded(recipe)


SAMPLE_EVAL: dict[str, Any] = {
    "refusal_rate": {"base": 0.95, "model": 0.05},
    "removal_rate": 0.947,
    "kl_divergence": 0.031,
    "perplexity": {"base": 12.3, "model": 12.9},
    "refusals": {"base": {"hard": 70, "soft": 3, "deflection": 3, "empty": 0, "total": 76},
                 "model": {"hard": 3, "soft": 1, "deflection": 0, "empty": 0, "total": 4}},
    "num_prompts": {"harmful": 80, "harmless": 80},
    "prompt_sources": {"harmful": {"source": "demo-harmful", "split": "eval"},
                       "harmless": {"source": "demo-harmless", "split": "eval"}},
    "generation": {"max_new_tokens": 64, "do_sample": False, "batch_size": 16},
    "samples": [{"prompt": "Tell me about topic A.", "base": "I can't help with that.", "model": "Topic A is ..."}],
    "base_model": "demo",
    "model": "out/demo",
}


def write_sample(folder: Path, recipe: dict[str, Any], evals: dict[str, Any] | None = None,
                 charts: bool = True) -> Path:
    """recipe.json + eval_results.json (+ a strengths chart) in `folder`: all a card needs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.json").write_text(json.dumps(recipe, indent=2))
    (folder / "eval_results.json").write_text(json.dumps(SAMPLE_EVAL if evals is None else evals, indent=2))
    if charts:
        (folder / "strengths.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


def model_index_values(metadata: dict[str, Any]) -> dict[tuple[str, str, str], Any]:
    """(metric, dataset, split) -> value from a parsed card's model-index."""
    values = {}
    for result in metadata["model-index"][0]["results"]:
        for metric in result["metrics"]:
            values[(metric["type"], result["dataset"]["name"], result["dataset"]["split"])] = metric["value"]
    return values


def test_snapshot(tmp_path: Path, real_recipe: dict[str, Any]) -> None:
    text = card.render_card(write_sample(tmp_path / "out", real_recipe), REPO_ID)
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(text, encoding="utf-8")
    assert text == SNAPSHOT.read_text(encoding="utf-8"), "card changed: rerun with UPDATE_SNAPSHOTS=1 and review"


def test_card_of_a_written_folder_reports_its_measurements(written: Path) -> None:
    """The card rendered from what abliterate wrote carries that folder's own numbers, front matter and body."""
    evals = json.loads((written / "eval_results.json").read_text())
    text = card.render_card(written, REPO_ID)
    metadata = card.validate_card(text)
    assert model_index_values(metadata) == {
        ("refusal_rate", "demo-harmful", "eval"): evals["refusal_rate"]["model"],
        ("kl_divergence", "demo-harmless", "eval"): evals["kl_divergence"],
        ("perplexity", "reference-text", "full"): evals["perplexity"]["model"],
    }
    assert evals["refusal_rate"]["base"] >= 0.9 and evals["refusal_rate"]["model"] <= 0.1
    n, before, after = (evals["num_prompts"]["harmful"], evals["refusals"]["base"]["total"],
                        evals["refusals"]["model"]["total"])
    for count in (before, after):
        assert f"{100 * count / n:.1f}% ({count}/{n}; 95% CI" in text
    assert "norm-preserving" in text and "strengths.png" in text


def test_metadata_round_trip(tmp_path: Path, real_recipe: dict[str, Any]) -> None:
    text = card.render_card(write_sample(tmp_path, real_recipe), REPO_ID)
    metadata = card.validate_card(text)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-generation"
    assert {"abliterated", "uncensored", "norm-preserving-abliteration"} <= set(metadata["tags"])
    assert "base_model" not in metadata and "base_model_relation" not in metadata  # demo is no Hub model
    assert metadata["model-index"][0]["name"] == "demo-abliterated"
    assert model_index_values(metadata) == {
        ("refusal_rate", "demo-harmful", "eval"): SAMPLE_EVAL["refusal_rate"]["model"],
        ("kl_divergence", "demo-harmless", "eval"): SAMPLE_EVAL["kl_divergence"],
        ("perplexity", "reference-text", "full"): SAMPLE_EVAL["perplexity"]["model"],
    }


def test_validate_card_rejects_mismatch_and_bad_yaml(tmp_path: Path, real_recipe: dict[str, Any]) -> None:
    text = card.render_card(write_sample(tmp_path, real_recipe), REPO_ID)
    # what the front matter must say, built from the inputs rather than read back from the card
    expected = card.card_data(real_recipe, SAMPLE_EVAL, "demo-abliterated", {}, card.CardConfig()).to_dict()
    assert card.validate_card(text, expected) == expected
    with pytest.raises(UserError, match="model-index differs"):
        card.validate_card(text.replace("value: 0.05", "value: 0.5"), expected)
    with pytest.raises(UserError, match="does not parse"):
        card.validate_card("---\ntags: [unclosed\n---\n# x\n")
    with pytest.raises(UserError, match="base_model_relation"):
        card.validate_card(text.replace("library_name:", "base_model_relation: fork\nlibrary_name:"))


def test_strict_undefined_makes_a_typo_an_error(tmp_path: Path, real_recipe: dict[str, Any]) -> None:
    cards_dir = tmp_path / "cards"
    cards_dir.mkdir()
    for template in card.CARDS_DIR.glob("*.j2"):
        (cards_dir / template.name).write_text(template.read_text())
    usage = cards_dir / "_usage.md.j2"
    usage.write_text(usage.read_text().replace("{{ model_ref }}", "{{ model_reff }}"))
    folder = write_sample(tmp_path / "out", real_recipe)
    with pytest.raises(UserError, match="model_reff"):
        card.render_card(folder, REPO_ID, config=card.CardConfig(cards_dir=cards_dir))


@pytest.mark.parametrize(("kind", "method", "expected"), [
    ("abliterated", "standard", ["Refusal in Language Models Is Mediated by a Single Direction",
                                 "standard abliteration"]),
    ("abliterated", "projected", ["projected abliteration"]),
    ("dpo", "dpo", ["Direct Preference Optimization", "Rafailov", "LoRA"]),
    ("sft", "sft", ["supervised fine-tuning", "LoRA"]),
    ("steered", "steer", ["contrastive weight steering", "2511.05408", "θ + k · w"]),
])
def test_each_kind_renders(tmp_path: Path, real_recipe: dict[str, Any], kind: str, method: str,
                           expected: list[str]) -> None:
    recipe = copy.deepcopy(real_recipe)
    recipe.update(kind=kind, method=method, base_model="meta/base-7b", datasets=["mlabonne/harmful_behaviors"])
    if kind != "abliterated":
        for key in ("layer", "strengths"):
            recipe.pop(key)
        recipe["parameters"] = {"lora_rank": 32, "lora_alpha": 16, "epochs": 1, "learning_rate": 5e-6}
    text = card.render_card(write_sample(tmp_path, recipe, charts=False), "alice/model")
    for snippet in expected:
        assert snippet in text
    assert "Refusal rate" in text and 'model_id = "alice/model"' in text
    metadata = card.validate_card(text)
    assert metadata["base_model"] == "meta/base-7b"
    assert metadata["base_model_relation"] == "finetune"
    assert metadata["datasets"] == ["mlabonne/harmful_behaviors"]
    assert "strengths.png" not in text
    if kind == "dpo":
        assert "Rafailov" in text and "2511.05408" not in text


def test_partial_measurements_and_per_layer_directions(tmp_path: Path, real_recipe: dict[str, Any]) -> None:
    """An evaluation without a base reference (None values) and per-layer directions still render."""
    evals = {**SAMPLE_EVAL, "refusal_rate": {"base": None, "model": 0.1}, "removal_rate": None,
             "kl_divergence": None, "perplexity": {"base": None, "model": None},
             "refusals": {"base": None, "model": SAMPLE_EVAL["refusals"]["model"]},
             "prompt_sources": {"harmful": None, "harmless": None}}
    recipe = {**real_recipe, "layer": {"spec": "per-layer"}, "prompts": None}
    text = card.render_card(write_sample(tmp_path, recipe, evals), REPO_ID)
    assert "one refusal direction per layer" in text
    assert "| Refusal rate ↓ | – | 10.0% (4/80) |" in text
    assert model_index_values(card.validate_card(text)) == {("refusal_rate", "harmful prompts", "eval"): 0.1}


def test_license_comes_from_the_base_model_card(tmp_path: Path, hub, real_recipe: dict[str, Any]) -> None:
    readme = (b"---\nlicense: other\nlicense_name: llama3\nlicense_link: LICENSE\nlanguage:\n- en\n- de\n---\n"
              b"# Base\n")
    hub.seed("meta/base-7b", {"README.md": readme, "config.json": b"{}"})
    recipe = {**real_recipe, "base_model": "meta/base-7b"}
    text = card.render_card(write_sample(tmp_path, recipe), REPO_ID, HfApi(endpoint=hub.url))
    metadata = card.validate_card(text)
    assert metadata["license"] == "other"
    assert metadata["license_name"] == "llama3"
    assert metadata["license_link"] == f"{hub.url}/meta/base-7b/blob/main/LICENSE"
    assert metadata["language"] == ["en", "de"]
    assert metadata["base_model"] == "meta/base-7b" and metadata["base_model_relation"] == "finetune"
    # An unreachable or unknown base model leaves the license out instead of failing.
    recipe = {**real_recipe, "base_model": "meta/missing"}
    text = card.render_card(write_sample(tmp_path, recipe), REPO_ID, HfApi(endpoint=hub.url))
    assert "license" not in card.validate_card(text)


def test_missing_inputs_say_what_to_run(tmp_path: Path, real_recipe: dict[str, Any]) -> None:
    with pytest.raises(UserError, match=r"recipe\.json is missing: run an edit or tuning stage"):
        card.render_card(tmp_path, REPO_ID)
    (tmp_path / "recipe.json").write_text(json.dumps(real_recipe))
    with pytest.raises(UserError, match=r"eval_results\.json is missing: evaluate the model first"):
        card.render_card(tmp_path, REPO_ID)
    (tmp_path / "eval_results.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        card.render_card(tmp_path, REPO_ID)
    write_sample(tmp_path, {**real_recipe, "kind": "distilled"})
    with pytest.raises(UserError, match="unknown kind 'distilled'"):
        card.render_card(tmp_path, REPO_ID)


def test_write_card_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            real_recipe: dict[str, Any]) -> None:
    folder = write_sample(tmp_path / "out", real_recipe)
    (folder / "README.md").write_text("an old card\n")
    path = card.write_card(folder, REPO_ID)
    assert path == folder / "README.md"
    written = path.read_text(encoding="utf-8")
    assert "an old card" not in written and "# demo-abliterated" in written
    assert model_index_values(card.validate_card(written))[("refusal_rate", "demo-harmful", "eval")] == 0.05
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "eval_results.json", "recipe.json",
                                                         "strengths.png"]
    path.unlink()
    assert card.card_main([str(folder), "--repo-id", "alice/renamed", "--offline"]) == 0
    assert capsys.readouterr().out.strip() == str(folder / "README.md")
    assert "# renamed" in path.read_text(encoding="utf-8")
    assert card.card_main([str(tmp_path / "nowhere"), "--offline"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_intervals_on_topic_and_rough_numbers(tmp_path: Path, real_recipe: dict[str, Any]) -> None:
    """Rates carry their Wilson intervals; on-topic and undetermined rows show; few prompts are called rough."""
    from pipeline.evaluation.replies import rates, wilson_interval

    # 12 harmful prompts: the model refuses 2 of the 11 it finished, answers 6 on topic, 1 still thinking.
    model = rates([None] + [True] * 2 + [False] * 9, [False] * 3 + [True] * 6 + [False] * 3)
    base = rates([True] * 12, [False] * 12)
    small = {**SAMPLE_EVAL, "num_prompts": {"harmful": 12, "harmless": 12},
             "refusals": {"base": {**SAMPLE_EVAL["refusals"]["base"], "total": 12},
                          "model": {**SAMPLE_EVAL["refusals"]["model"], "total": 2}},
             "generation": {**SAMPLE_EVAL["generation"], "prefill_think": True,
                            "think_prefill": "<think>\n\n</think>\n\n"},
             **{key: {"base": base[key], "model": model[key]}
                for key in ("refusal_rate", "refusal_interval", "on_topic_rate", "on_topic_interval", "undetermined")}}
    text = card.render_card(write_sample(tmp_path / "small", real_recipe, evals=small), REPO_ID)
    lo, hi = wilson_interval(2, 11)
    after = f"18.2% (2/11; 95% CI {100 * lo:.1f}–{100 * hi:.1f}%)"
    assert f"| Refusal rate ↓ | 100.0% (12/12; 95% CI 75.8–100.0%) | {after} |" in text
    lo, hi = wilson_interval(6, 11)
    assert f"| On-topic answers ↑ | 0.0% (95% CI 0.0–24.2%) | 54.5% (95% CI {100 * lo:.1f}–{100 * hi:.1f}%) |" in text
    assert "| Undetermined (reasoning unfinished) | 0 | 1 |" in text
    assert "only 12 harmful prompts, so they are rough" in text and "pre-filled" in text
    # 80 prompts and no intervals recorded: neither a rough-number note nor a CI
    plain = card.render_card(write_sample(tmp_path / "plain", real_recipe), REPO_ID)
    assert "rough" not in plain and "95% CI" not in plain and "pre-filled" not in plain
