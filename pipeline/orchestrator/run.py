"""The one orchestrator: load, measure, edit, evaluate, write — used by the UI, the CLI and CI."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.edit import directions as dirs
from pipeline.edit import stages
from pipeline.edit.abliterate import EditConfig, check_editable_in_memory
from pipeline.edit.stages import AbliterateJob
from pipeline.errors import UserError
from pipeline.io.loading import LoadConfig, Loaded, free_memory, is_gguf, load_model
from pipeline.io.output import EVAL_FILE, check_target, staged_folder, write_json, write_recipe
from pipeline.orchestrator import fingerprint
from pipeline.progress import Progress, say

log = logging.getLogger(__name__)


def directions_only(model: str, out: Path, load: LoadConfig, prompts_cfg, measure, progress=None,
                    loaded: Loaded | None = None) -> dirs.Directions:
    """Measure and save directions (the `directions` command); `loaded`: the model, already loaded."""
    prompts = stages.resolve_prompts(model, prompts_cfg)
    if loaded is None:
        say(progress, f"loading {model}")
        loaded = load_model(model, load)
    say(progress, "measuring refusal directions")
    d = stages.measure_directions(loaded, prompts, measure, progress=progress)
    dirs.save(d, out)
    return d


def abliterate(job: AbliterateJob, progress: Progress | None = None, loaded: Loaded | None = None) -> dict:
    """Run one abliteration into job.out; returns a summary (paths, layer, evaluation).

    `loaded`: the base model when the caller has it already (it measured the directions): each
    model is loaded once per job, and the in-memory edit changes this very model.
    """
    check_target(job.out, job.overwrite)
    if job.streaming and is_gguf(job.model, job.load):
        raise UserError("--streaming edits safetensors shards: a GGUF file is dequantized and edited in memory "
                        "(drop --streaming)")
    if job.load.load_in_4bit and not job.streaming:  # the in-memory edit would edit packed 4-bit bytes
        raise UserError("--load-in-4bit needs --streaming: the 4-bit model is only measured, and the edit is "
                        "applied to the full-precision shards on disk")
    prompts = stages.resolve_prompts(job.model, job.prompts)
    if job.directions_file:
        d = dirs.load(job.directions_file)
        if loaded is not None and not job.streaming:
            check_editable_in_memory(loaded.model)
    else:
        if loaded is None:
            say(progress, f"loading {job.model}")
            loaded = load_model(job.model, job.load)
        if not job.streaming:  # fail now, not after the base evaluation, when offloaded weights cannot be edited
            check_editable_in_memory(loaded.model)
        say(progress, "measuring refusal directions")
        d = stages.measure_directions(loaded, prompts, job.measure, job.edit, progress)
    direction, layer_info, edit = stages.chosen_direction(d, job.layer, job.edit)
    num_layers = d.num_layers
    plan = stages.strength_plan(edit, num_layers)
    say(progress, stages.describe_layer(layer_info, num_layers))
    selection = d.info.get("selection") or {}
    if selection.get("weak"):
        say(progress, f"warning: the chosen direction left {selection['refusal_ablated']:.0%} of the selection "
                      "prompts refused: the edit may remove little (try other --harmful prompts or --auto)")

    reference = None
    if job.evaluate and (loaded is not None or not job.streaming):
        loaded = loaded or load_model(job.model, job.load)
        reference = _base_reference(loaded, prompts, job, progress)

    with staged_folder(job.out, job.overwrite) as tmp:
        say(progress, "editing weights" + (" (streaming)" if job.streaming else ""))
        if job.streaming:
            changed = stages.edit_streaming(job.model, job.load, direction, edit, tmp)
        else:
            loaded = loaded or load_model(job.model, job.load)
            changed = stages.edit_and_save_in_memory(loaded, direction, edit, tmp)
        dirs.save(d, tmp)
        stages.plot_strengths(plan, tmp / "strengths.png")
        source = loaded.source if loaded is not None else None
        rec = write_recipe(tmp, stages.recipe(job.model, job.load, edit, layer_info, prompts, plan, d, source))
        results = None
        if job.evaluate:
            edited = None if job.streaming else loaded
            results = _evaluate(job, tmp, edited, prompts, reference, progress)
            write_json(tmp / EVAL_FILE, results)
    say(progress, f"wrote {job.out}")
    return {"out": str(job.out), "changed_tensors": changed, "layer": layer_info, "recipe": rec, "eval": results}


def _base_reference(loaded: Loaded, prompts: stages.Prompts, job: AbliterateJob, progress):
    say(progress, "evaluating the base model")
    return stages.base_reference(loaded.model, loaded.tokenizer, prompts, job.eval, job.model)


def _evaluate(job: AbliterateJob, folder: Path, loaded: Loaded | None, prompts: stages.Prompts, reference,
              progress) -> dict:
    """The edited model against the base; `loaded` None: read the edited model from `folder`."""
    say(progress, "evaluating the edited model")
    if reference is None:
        base = load_model(job.model, job.load)
        reference = _base_reference(base, prompts, job, progress)
        del base
        free_memory()
    if loaded is None:  # streaming: the edited model exists only on disk
        loaded = load_model(str(folder), job.load)
    return stages.evaluate_model(loaded.model, loaded.tokenizer, prompts, job.eval, reference, str(job.out),
                                 job.model)


class RunJob(BaseModel):
    """One job from model to Hub: edit or tune, evaluate, write the card, push."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="Hub id, local folder, or 'demo'.")
    repo_id: str | None = Field(None, description="Target Hub repo OWNER/NAME (required unless push is off).")
    method: Literal["abliterate", "auto", "dpo", "steer"] = Field("abliterate", description="What to do to the model.")
    out: Path | None = Field(None, description="Output folder (default: out/<owner>--<name>-<method>).")
    private: bool = Field(False, description="Create the Hub repo as private.")
    push: bool = Field(True, description="Upload the result to the Hub.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Stage settings by config field name, e.g. {preset: aggressive}."
    )

    @field_validator("options")
    @classmethod
    def _known_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        from pipeline.orchestrator.options import check_option_keys

        return check_option_keys(options)

    def output_dir(self) -> Path:
        from pipeline.orchestrator.fingerprint import default_folder_name

        return self.out or Path("out") / default_folder_name(self.model, self.method)


def _work_dir(out: Path) -> Path:
    """Where finished intermediate stages live, so a re-run can reuse them."""
    return out.with_name(f".{out.name}.work")


def _configs(options: dict[str, Any], *classes):
    from pipeline.configs import build_config

    return [build_config(cls, options) for cls in classes]


def _abliterate_stage(job: RunJob, out: Path, progress: Progress | None) -> None:
    """Measure (or reuse) the directions, edit, evaluate: the base model is loaded once for all three."""
    from pipeline.evaluation import evaluate as ev

    load, prompts, measure, edit, eval_cfg = _configs(
        job.options, LoadConfig, stages.PromptsConfig, dirs.DirectionsConfig, EditConfig, ev.EvalConfig
    )
    streaming = bool(job.options.get("streaming", False))
    work = _work_dir(out) / "directions"
    expected = fingerprint.stage_fingerprints(job.model, job.method, job.options)["directions"]
    loaded = None
    if (work / dirs.DIRECTIONS_JSON).exists() and fingerprint.matches(work, "directions", expected):
        say(progress, f"reusing directions measured earlier ({work})")
    else:
        if work.exists():  # our own hidden work folder, measured for another model, prompts or settings
            shutil.rmtree(work)
        say(progress, f"loading {job.model}")
        loaded = load_model(job.model, load)
        directions_only(job.model, work, load, prompts, measure, progress, loaded=loaded)
        fingerprint.record(work, directions=expected)
    ajob = AbliterateJob(
        model=job.model,
        out=out,
        layer=str(job.options.get("layer", "best")),
        directions_file=work,
        streaming=streaming,
        load=load,
        prompts=prompts,
        measure=measure,
        edit=edit,
        eval=eval_cfg,
    )
    abliterate(ajob, progress, loaded=loaded)


def _produce(job: RunJob, out: Path, progress: Progress | None) -> None:
    if job.method == "abliterate":
        _abliterate_stage(job, out, progress)
    elif job.method == "auto":
        from pipeline.edit.search import SearchConfig, search
        from pipeline.evaluation import evaluate as ev

        load, prompts, measure, edit, eval_cfg, search_cfg = _configs(
            job.options,
            LoadConfig,
            stages.PromptsConfig,
            dirs.DirectionsConfig,
            EditConfig,
            ev.EvalConfig,
            SearchConfig,
        )
        ajob = AbliterateJob(
            model=job.model, out=out, load=load, prompts=prompts, measure=measure, edit=edit, eval=eval_cfg
        )
        search(ajob, search_cfg, progress=progress or print)
    else:
        _tune_stage(job, out, progress)


def _tune_stage(job: RunJob, out: Path, progress: Progress | None) -> None:
    """DPO/LoRA or contrastive weight steering; both evaluate into the output folder themselves."""
    from pipeline.evaluation import evaluate as ev

    load, prompts, eval_cfg = _configs(job.options, LoadConfig, stages.PromptsConfig, ev.EvalConfig)
    common = {"load": load, "prompts_cfg": prompts, "eval_cfg": eval_cfg, "progress": progress}
    if job.method == "dpo":
        from pipeline.tuning.tune import TuneConfig, tune

        cfg = _configs({**job.options, "method": "dpo"}, TuneConfig)[0]
        tune(job.model, job.options.get("data", "demo-pairs"), out, cfg, **common)
        return
    from pipeline.tuning.steer import SteerConfig, steer

    cfg = _configs(job.options, SteerConfig)[0]
    opts = job.options
    positive, negative = opts.get("positive", "demo-refusals"), opts.get("negative", "demo-answers")
    vector = Path(opts["vector"]) if opts.get("vector") else None
    steer(
        job.model,
        out,
        float(opts.get("k", -2.0)),
        positive=positive,
        negative=negative,
        vector=vector,
        cfg=cfg,
        **common,
    )


def _evaluate_folder(job: RunJob, out: Path, progress: Progress | None) -> dict:
    """Evaluate a finished output folder again (its evaluation settings changed): base and edited, once each."""
    from pipeline.evaluation import evaluate as ev
    from pipeline.io.output import read_json

    load, prompts_cfg, eval_cfg = _configs(job.options, LoadConfig, stages.PromptsConfig, ev.EvalConfig)
    prompts = stages.resolve_prompts(job.model, prompts_cfg)
    ajob = AbliterateJob(model=job.model, out=out, load=load, eval=eval_cfg)
    write_json(out / EVAL_FILE, _evaluate(ajob, out, None, prompts, None, progress))
    return read_json(out / EVAL_FILE)


def _clear_stale(out: Path, progress: Progress | None) -> None:
    """Remove an output folder that an earlier `run` made with other settings; refuse any other folder."""
    if not out.exists():
        return
    if not fingerprint.read(out):
        raise UserError(f"output folder '{out}' exists but was not made by `run` (it has no fingerprint of its "
                        "settings): delete it or choose another --out")
    say(progress, f"the model, method, settings or prompts changed since {out} was made: making it again")
    shutil.rmtree(out)


def run_job(job: RunJob, progress: Progress | None = None, token: str | bool | None = None) -> dict:
    """The whole path from model to Hub; finished stages found on disk are reused.

    `token` reads the Hub for this job and writes the push: None means HF_TOKEN or the saved
    login (the CLI), False anonymous reads and no push (a signed-out Space visitor).
    """
    from pipeline.io.hub_token import reading_as

    with reading_as(token):
        return _run_job(job, progress, token)


def _run_job(job: RunJob, progress: Progress | None, token: str | bool | None) -> dict:
    from huggingface_hub import HfApi

    from pipeline.io.output import RECIPE_FILE, read_json
    from pipeline.publish.card import write_card
    from pipeline.publish.push import check_repo_id, push_folder

    if job.push:
        if not job.repo_id:
            raise UserError("a repo id is needed to publish (--repo-id OWNER/NAME), or turn publishing off")
        check_repo_id(job.repo_id)
    out = job.output_dir()
    fps = fingerprint.stage_fingerprints(job.model, job.method, job.options)
    if (out / RECIPE_FILE).exists() and fingerprint.matches(out, "edit", fps["edit"]):
        say(progress, f"reusing the edited model in {out}")
    else:
        _clear_stale(out, progress)
        _produce(job, out, progress)
        fingerprint.record(out, edit=fps["edit"])
        if (out / EVAL_FILE).exists():  # every method evaluates as it makes the model
            fingerprint.record(out, eval=fps["eval"])
    if (out / EVAL_FILE).exists() and fingerprint.matches(out, "eval", fps["eval"]):
        results = read_json(out / EVAL_FILE)
    else:
        results = _evaluate_folder(job, out, progress)
        fingerprint.record(out, eval=fps["eval"])
    api = HfApi(token=token) if isinstance(token, str) and token else None
    say(progress, "writing the model card")
    write_card(out, job.repo_id, api if job.push else None)
    url = None
    if job.push:
        say(progress, f"publishing to {job.repo_id}")
        url = push_folder(out, job.repo_id, private=job.private, api=api)
        say(progress, f"published: {url}")
    return {"out": str(out), "eval": results, "url": url, "repo_id": job.repo_id}
