"""The one orchestrator: load, measure, edit, evaluate, write — used by the UI, the CLI and CI."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import directions as dirs
from pipeline import stages
from pipeline.abliterate import EditConfig
from pipeline.architectures import num_layers_of
from pipeline.loading import LoadConfig, load_config, load_model, local_path
from pipeline.output import EVAL_FILE, check_target, staged_folder, write_json, write_recipe

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class AbliterateJob:
    """Everything one abliteration needs; each part is a stage's own config."""

    model: str
    out: Path
    layer: str = "best"
    directions_file: Path | None = None
    streaming: bool = False
    overwrite: bool = False
    evaluate: bool = True
    load: LoadConfig = field(default_factory=LoadConfig)
    prompts: stages.PromptsConfig = field(default_factory=stages.PromptsConfig)
    measure: dirs.DirectionsConfig = field(default_factory=dirs.DirectionsConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    eval: object | None = None  # pipeline.evaluate.EvalConfig; None: its defaults


def _say(progress: Progress | None, message: str) -> None:
    if progress:
        progress(message)
    else:
        log.info(message)


def directions_only(model: str, out: Path, load: LoadConfig, prompts_cfg, measure, progress=None) -> dirs.Directions:
    """Measure and save directions (the `directions` command)."""
    prompts = stages.resolve_prompts(model, prompts_cfg)
    _say(progress, f"loading {model}")
    loaded = load_model(model, load)
    _say(progress, "measuring refusal directions")
    d = stages.measure_directions(loaded, prompts, measure)
    dirs.save(d, out)
    return d


def abliterate(job: AbliterateJob, progress: Progress | None = None) -> dict:
    """Run one abliteration into job.out; returns a summary (paths, layer, evaluation)."""
    check_target(job.out, job.overwrite)
    prompts = stages.resolve_prompts(job.model, job.prompts)
    loaded = None
    if job.directions_file:
        d = dirs.load(job.directions_file)
    else:
        _say(progress, f"loading {job.model}")
        loaded = load_model(job.model, job.load)
        _say(progress, "measuring refusal directions")
        d = stages.measure_directions(loaded, prompts, job.measure)
    direction, layer_info = stages.chosen_direction(d, job.layer, job.edit)
    num_layers = d.num_layers
    plan = stages.strength_plan(job.edit, num_layers)
    _say(progress, f"direction: layer {layer_info}")

    reference = None
    if job.evaluate and (loaded is not None or not job.streaming):
        loaded = loaded or load_model(job.model, job.load)
        reference = _base_reference(loaded, prompts, job, progress)

    with staged_folder(job.out, job.overwrite) as tmp:
        _say(progress, "editing weights" + (" (streaming)" if job.streaming else ""))
        if job.streaming:
            changed = stages.edit_streaming(job.model, job.load, direction, job.edit, tmp)
        else:
            loaded = loaded or load_model(job.model, job.load)
            changed = stages.edit_and_save_in_memory(loaded, direction, job.edit, tmp)
        dirs.save(d, tmp)
        stages.plot_strengths(plan, tmp / "strengths.png")
        rec = write_recipe(tmp, stages.recipe(job.model, job.load, job.edit, layer_info, prompts, plan))
        results = None
        if job.evaluate:
            edited = None if job.streaming else loaded
            results = _evaluate(job, tmp, edited, prompts, reference, progress)
            write_json(tmp / EVAL_FILE, results)
    _say(progress, f"wrote {job.out}")
    return {"out": str(job.out), "changed_tensors": changed, "layer": layer_info, "recipe": rec, "eval": results}


def _base_reference(loaded, prompts, job: AbliterateJob, progress):
    from pipeline import evaluate as ev

    _say(progress, "evaluating the base model")
    cfg = job.eval or ev.EvalConfig()
    return ev.reference(
        loaded.model, loaded.tokenizer, prompts.harmful.evaluate, prompts.harmless.evaluate, cfg, model_id=job.model
    )


def _evaluate(job: AbliterateJob, folder: Path, loaded, prompts, reference, progress) -> dict:
    from pipeline import evaluate as ev

    cfg = job.eval or ev.EvalConfig()
    _say(progress, "evaluating the edited model")
    if reference is None:
        base = load_model(job.model, job.load)
        reference = _base_reference(base, prompts, job, progress)
        del base
    if loaded is None:  # streaming: the edited model exists only on disk
        loaded = load_model(str(folder), job.load)
    sources = {
        "harmful": {"source": prompts.harmful.source, "split": "eval"},
        "harmless": {"source": prompts.harmless.source, "split": "eval"},
    }
    return ev.evaluate(
        loaded.model,
        loaded.tokenizer,
        prompts.harmful.evaluate,
        prompts.harmless.evaluate,
        cfg,
        base=reference,
        model_id=str(job.out),
        base_id=job.model,
        prompt_sources=sources,
    )


def model_depth(model: str, load: LoadConfig) -> int:
    return num_layers_of(load_config(local_path(model, load), load))
