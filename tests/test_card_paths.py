"""A published card names Hub ids only: a local model or prompt file is described in words, and no
path of the machine that made the model appears anywhere in it."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard

from pipeline.publish import card


def _local_job_folder(tmp_path: Path) -> tuple[Path, Path]:
    """recipe.json + eval_results.json as `abliterate` writes them for a local model and local prompts."""
    machine = tmp_path / "home" / "me" / "secret-project"
    machine.mkdir(parents=True)
    harmful, harmless = machine / "harmful.txt", machine / "harmless.jsonl"
    harmful.write_text("a\nb\n")
    harmless.write_text('{"text": "c"}\n')
    model = machine / "my-model"
    prompts = {role: {"source": str(path), "measure_size": 1, "eval_size": 1, "seed": 0, "method": "shuffled",
                      "eval_fraction": 0.25} for role, path in (("harmful", harmful), ("harmless", harmless))}
    recipe = {
        "kind": "abliterated", "base_model": str(model), "base_revision": None, "method": "standard",
        "parameters": {"method": "standard", "preset": "standard"}, "layer": {"spec": "best", "index": 2},
        "strengths": {"attn": [1.0, 1.0], "mlp": [1.0, 1.0], "embed": 0.0}, "prompts": prompts,
        # what the old code recorded: a local path taken for a Hub dataset, beside a real one
        "datasets": [str(harmful), "mlabonne/harmful_behaviors"],
        "seed": 0, "search": {"study": str(machine / "o.study.journal")},
        "command": f"python -m pipeline abliterate {model} --harmful {harmful} --harmless={harmless} "
                   f"--out {machine / 'out'}",
        "versions": {"python": "3.11.7"}, "shards": {"model.safetensors": "00"}, "created": "2026-01-01T00:00:00Z",
    }
    evals = {
        "refusal_rate": {"base": 1.0, "model": 0.0}, "kl_divergence": 0.01, "perplexity": {"base": 9.0, "model": 9.5},
        "perplexity_source": {"source": str(machine / "reference.txt"), "split": "full"},
        "num_prompts": {"harmful": 1, "harmless": 1},
        "prompt_sources": {"harmful": {"source": str(harmful), "split": "eval"},
                           "harmless": {"source": str(harmless), "split": "eval"}},
        "generation": {"max_new_tokens": 8, "do_sample": False},
    }
    folder = machine / "out"
    folder.mkdir()
    (folder / "recipe.json").write_text(json.dumps(recipe))
    (folder / "eval_results.json").write_text(json.dumps(evals))
    return folder, machine


def test_a_local_model_and_local_prompts_leave_no_path_in_the_card(tmp_path):
    folder, machine = _local_job_folder(tmp_path)
    text = card.render_card(folder, None)
    assert str(tmp_path) not in text and "secret-project" not in text and "/home/me" not in text
    metadata = ModelCard(text).data.to_dict()
    assert "base_model" not in metadata
    assert metadata["datasets"] == ["mlabonne/harmful_behaviors"]
    for result in metadata["model-index"][0]["results"]:
        assert "/" not in result["dataset"]["name"] and "/" not in result["dataset"]["type"]
    assert "a local model folder (its path is not published)" in text
    assert "a local file (its path is not published)" in text
    assert 'model_id = "path/to/out"' in text


def test_prompt_files_are_not_recorded_as_hub_datasets(tmp_path):
    from pipeline.edit.stages import PromptsConfig, resolve_prompts

    harmful = tmp_path / "sub" / "harmful.txt"
    harmful.parent.mkdir()
    harmful.write_text("\n".join(f"harmful request {i}" for i in range(8)))
    prompts = resolve_prompts("demo", PromptsConfig(harmful=str(harmful)))
    assert prompts.harmful.source == str(harmful) and prompts.hub_datasets() == []
