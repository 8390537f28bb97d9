"""Automatic search over edit parameters: Optuna multi-objective TPE on (refusal rate, KL divergence).

Load and measure once; each trial samples an edit (the chain's directions or the search's own from more
prompts, layer fraction or per-layer directions, method, a kernel per component), applies it in place,
evaluates it against one base reference and restores the residual writers from a copy taken once: a trial costs
one evaluation, never a load. The study lives in a journal file (re-running continues it).

The evaluation prompts are split three ways, so the numbers reported are not the ones the choice was made on:
trials are scored on the *trial* part; the best few Pareto trials and the plain edit (trial 0) are re-scored
on the *confirm* part too (twice the prompts, so noise on a handful cannot pick the winner). A finalist with a
lower KL than the plain edit is first tried again a little stronger than the plain edit (`calibrate`: its weights
raised until its refusal likelihood is below the plain edit's), since most such finalists are merely weaker;
the plain edit is refined at that same strength (`refined_trial`, `search_refine`) into one more finalist. The plain
edit made with directions fitted to it (`direction_fit`) is raised by its generated replies instead (`reply_twin`):
the fit keeps the plain edit's replies, not the base's refusal openings, so their likelihood does not compare.
The chosen one (lowest KL with refusal <= target × base rate, never above the plain edit's nor weaker than it,
else lowest refusal) is saved like a plain abliteration and evaluated, beside the plain edit, on the *test*
part that no trial saw.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.edit import directions as dirs
from pipeline.edit import stages
from pipeline.edit.abliterate import EditConfig
from pipeline.edit.search_choice import Scored, choose, counterpart, finalists_of, rank
from pipeline.edit.search_refine import match_strength, raise_by_replies, refine, seen_score, strengthen
from pipeline.edit.search_report import describe, fmt_time, front_table, plot_pareto
from pipeline.edit.search_space import from_edit, neighbours, scaled, suggest
from pipeline.edit.search_study import STUDY_NAME, open_study, quiet_optuna
from pipeline.edit.search_workbench import (
    Workbench,
    confirm_on_more,
    measured_parts,
    prepare_own_directions,
    refusal_of,
    split_parts,
)
from pipeline.errors import UserError
from pipeline.evaluation.evaluate import EvalConfig
from pipeline.io.loading import Loaded, load_model
from pipeline.io.output import EVAL_FILE, check_target, staged_folder, write_json, write_recipe
from pipeline.progress import Progress

if TYPE_CHECKING:  # run.py may import this module: no import cycle at run time
    from pipeline.edit.stages import AbliterateJob

log = logging.getLogger(__name__)
__all__ = ["STUDY_NAME", "SearchConfig", "open_study", "quiet_optuna", "search"]
SEARCH_FILE, PARETO_PNG = "search.json", "pareto.png"
PARTS = ("trial", "confirm", "test")


class SearchConfig(BaseModel):
    """Automatic search (--auto): Optuna over the edit parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trials: int = Field(40, ge=1, description="Trials to run now; they add to those already in the study.")
    study: Path | None = Field(None, description="Optuna journal file of the study, <out>.study.journal when "
                               "unset; re-running with the same file continues the study.")
    target: float = Field(0.1, gt=0, le=1, description="Refusal target as a fraction of the base model's "
                          "refusal rate: the lowest-KL trial at or below it is chosen.")
    search_max_kl: float | None = Field(
        None, gt=0, description="Never choose a trial whose KL divergence exceeds this (when any stays below).")
    search_seed: int = Field(0, description="Seed of the Optuna sampler.")
    search_method: bool = Field(
        True, description="Search the method (standard, projected, norm-preserving); else keep --method.")
    allow_mlp_off: bool = Field(True, description="Let the search switch the MLP edit off.")
    search_per_layer: bool = Field(
        False, description="Also try each layer's own direction (per-layer) instead of one direction.")
    start_from_default: bool = Field(
        True, description="Make the first trial of a new study the plain edit (--method, --preset, layer best).")
    test_fraction: float = Field(
        0.5, gt=0, lt=1, description="Share of the evaluation prompts held out as the final test: no trial sees "
        "them; eval_results.json and the card report them.")
    neighbours: bool = Field(
        True, description="After the plain edit, try its near variants (each other method, a weaker and a narrower "
        "kernel) before sampling: the plain edit is strong on real models, and random start-up trials rarely land "
        "near it.")
    finalists: int = Field(
        4, ge=1, description="Best Pareto trials re-scored on the confirm part before choosing; as many of the "
        "lowest-KL trials refusing no more than the plain edit, and the plain edit itself, are re-scored too.")
    twins: bool = Field(
        True, description="Also re-score each finalist of lower KL than the plain edit with its weights raised until "
        "it is a little stronger than the plain edit by refusal likelihood (a new trial each): a lower KL is most "
        "often a weaker edit.")
    twin_margin: float = Field(
        0.05, ge=0, le=1, description="How much stronger than the plain edit twins are made: this share of the way "
        "the plain edit moved the refusal likelihood down from the base model's.")
    refine_margin: float = Field(
        0.0, ge=0, le=1, description="As --twin-margin, for the refined edit. 0: at the plain edit's own strength "
        "(never weaker: a matched edit lands at or below its refusal likelihood), so it competes on KL alone.")
    wide_prompts: int = Field(
        0, ge=0, description="Also measure a refusal direction from up to this many prompts per class (every prompt "
        "of the same sets outside the evaluation prompts; the harmless ones the chain did not measure are shared "
        "between this measurement and the confirm part's KL) and let trials remove it instead of the chain's; the "
        "plain edit keeps the chain's, and the plain edit made with this one is always a finalist. It is one "
        "direction pooled over the harmful sets (one per set from 234/143 prompts cost Qwen2.5 three times the "
        "chain's KL). 0 (default): off. On Qwen2.5 (256) every Pareto trial used it, yet none was as strong as the "
        "plain edit at a clearly lower KL on the prompts seen, and it adds about 8 minutes to a 36-minute search. "
        "Nothing is measured when the chain already took every prompt (the demo). Setting it turns the default "
        "--fit-steps and --confirm-prompts off.")
    fit_steps: int = Field(
        40, ge=0, description="Gradient steps fitting the chain's directions to the plain edit (`direction_fit`): "
        "at the chosen layer, the span moves to lower the first-token KL on harmless measurement prompts while the "
        "harmful ones keep the plain edit's next-token distributions along its own replies; trials may remove the "
        "fitted span instead. The plain edit made with it is always a finalist, raised by its generated replies on "
        "the prompts seen (weights x1.1 ... x1.5) until it refuses a little less than the plain edit "
        "(--twin-margin). About 8 s a step on Qwen2.5-0.5B on 2 cores. 0: off. Without it (and --confirm-prompts) "
        "40 trials on Qwen2.5-0.5B kept the plain edit on both prompt draws measured; with both, the choice beat it "
        "on the test part on all three draws measured (bench/README.md).")
    confirm_prompts: int = Field(
        32, ge=0, description="Also confirm finalists on up to this many harmful and as many harmless prompts of the "
        "same sets that neither measurement nor evaluation uses (the confirm part grows by them): a finalist's "
        "refusal count then moves in smaller steps, at the cost of generating their replies once per finalist "
        "(on Qwen2.5-0.5B, 32 more: about 70 s a finalist on 2 cores). Nothing is added when the chain measured "
        "every prompt (the demo; the app). 0: off. Not with --wide-prompts, which measures from those prompts.")
    fit_learning_rate: float = Field(0.002, gt=0, description="Adam step size of --fit-steps (unit directions).")
    fit_weight: float = Field(
        4.0, gt=0, description="Weight of keeping the plain edit's effect on harmful prompts against lowering the KL "
        "on harmless ones, in --fit-steps (both KL divergences; 1 gave up too much: 20 of 96 refused against 9).")
    refine: int = Field(
        0, ge=0, description="Rounds of refining the plain edit at --refine-margin's strength: each round tries every "
        "small move (method, attention/MLP balance, kernel reach and place) matched to that strength by refusal "
        "likelihood (forward passes, no generation) and keeps the one with the least KL; the result runs as one "
        "more trial. 0 (default): off. On Qwen2.5 its 7.5% lower KL on the 32 harmless prompts seen was 0.3% on "
        "231 others (bench/bench_kl_holdout.py): a few dozen prompts cannot rank shapes this close.")

    @model_validator(mode="before")
    @classmethod
    def _wide_instead(cls, data: Any) -> Any:
        """--wide-prompts alone turns off the default --fit-steps and --confirm-prompts, which it cannot run with;
        setting either with it is an error (`_check_job`)."""
        if isinstance(data, dict) and data.get("wide_prompts"):
            data = {"fit_steps": 0, "confirm_prompts": 0} | data
        return data


Space = Callable[[Any, SearchConfig, EditConfig], dict[str, Any]]  # samples a trial's parameters


def run_trials(study: Any, bench: Workbench, cfg: SearchConfig, base: EditConfig,
               progress: Progress | None = print, space: Space = suggest) -> list[Scored]:
    """Run ``cfg.trials`` trials; each is told to the study as soon as it ends. Returns this run's trials."""
    from optuna.trial import TrialState

    if cfg.trials < 1:  # SearchConfig refuses it too; this guards direct calls
        raise UserError(f"--trials must be at least 1, got {cfg.trials}")
    start, done = time.monotonic(), []
    for i in range(cfg.trials):
        began = time.monotonic()
        trial = study.ask()
        try:
            params = space(trial, cfg, base)
            results, layer = bench.run(*bench.edit_of(params, base))
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        refusal, kl = refusal_of(results), results["kl_divergence"]
        trial.set_user_attr("result", {"layer": layer, "refusals": results["refusals"]["model"],
                                       "seconds": time.monotonic() - began, "eval_seconds": bench.eval_seconds})
        study.tell(trial, [refusal, kl])
        done.append(Scored(trial.number, refusal, kl, params, layer))
        elapsed, left = time.monotonic() - start, cfg.trials - i - 1
        eta = fmt_time(elapsed / (i + 1) * left)
        if progress:
            best = rank(done, bench.base_rates["trial"] * cfg.target)[0]
            progress(f"trial {trial.number} [{i + 1}/{cfg.trials}]: refusal {refusal:.1%}, KL {kl:.4f} "
                     f"({describe(params)}) | best so far: trial {best.number}, refusal {best.refusal:.1%}, "
                     f"KL {best.kl:.4f} | {fmt_time(elapsed)} elapsed, ~{eta} left")
    return done


def _scored(trial: Any) -> Scored:
    return Scored(trial.number, trial.values[0], trial.values[1], dict(trial.params),
                  trial.user_attrs.get("result", {}).get("layer", {}))


def completed(study: Any) -> list[Scored]:
    from optuna.trial import TrialState

    return [_scored(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def default_trial(study: Any, trials: list[Scored]) -> Scored | None:
    """The plain edit of the study (enqueued as its first trial), when it completed."""
    marked = {t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get("default")}
    return next((t for t in trials if t.number in marked), None)


def confirm(bench: Workbench, finalists: list[Scored], base: EditConfig, say: Progress) -> list[Scored]:
    """Re-score each finalist on the trial and confirm parts together (the prompt-weighted mean)."""
    trial, more = bench.parts["trial"], bench.parts["confirm"]
    n1, n2 = len(trial.harmful), len(more.harmful)
    m1, m2 = len(trial.harmless), len(more.harmless)
    out = []
    for t in finalists:
        results, _ = bench.run(*bench.edit_of(t.params, base), part="confirm", likelihood=True)
        refusal = (t.refusal * n1 + refusal_of(results) * n2) / (n1 + n2)
        kl = (t.kl * m1 + results["kl_divergence"] * m2) / (m1 + m2)
        likelihood = results["refusal_likelihood"]
        out.append(t.rescored(refusal, kl, likelihood, results["kl_prompts"]))
        shown = "n/a" if likelihood is None else f"{likelihood:.4f}"
        say(f"confirming trial {t.number} on {n1 + n2} prompts: refusal {t.refusal:.1%} -> {refusal:.1%}, "
            f"KL {t.kl:.4f} -> {kl:.4f}, refusal likelihood {shown}")
    return out


@dataclass(frozen=True)
class Strength:  # the strengths finalists are raised to and refinement works at
    target: float  # refusal likelihood on the prompts seen: the plain edit's, less the twin margin
    tol: float  # how far below a target a matched edit may land
    plain_kl: float  # the plain edit's KL on the harmless prompts seen (probe)
    plain: float  # the plain edit's refusal likelihood there (probe)
    refine_target: float  # the plain edit's, less the refine margin


def strength_of(bench: Workbench, default: Scored | None, cfg: SearchConfig, base: EditConfig) -> Strength | None:
    """A little stronger than the plain edit (``cfg.twin_margin`` of the way it moved the refusal likelihood from
    the base model's): an edit matched to it exactly ties on the mean and flips a coin on each borderline prompt.
    Refinement works at ``cfg.refine_margin``: its moves compete with the plain edit on KL at its strength."""
    if default is None:
        return None
    plain, plain_kl = bench.probe(*bench.edit_of(default.params, base))
    unedited = bench.likelihood()
    if plain is None or unedited is None:
        return None
    moved = max(0.0, unedited - plain)
    return Strength(plain - cfg.twin_margin * moved, 0.02 * moved, plain_kl, plain, plain - cfg.refine_margin * moved)


def run_enqueued(study: Any, bench: Workbench, cfg: SearchConfig, base: EditConfig, params: dict[str, Any],
                 attrs: dict[str, Any], space: Space) -> Scored:
    """Run ``params`` as the study's next trial, with ``attrs`` as its user attributes."""
    study.enqueue_trial(params, user_attrs=attrs)
    return run_trials(study, bench, cfg.model_copy(update={"trials": 1}), base, None, space)[0]


def calibrate(study: Any, bench: Workbench, picks: list[Scored], default: Scored | None, strength: Strength | None,
              cfg: SearchConfig, base: EditConfig, say: Progress, space: Space) -> list[Scored]:
    """A finalist with a lower KL than the plain edit is often only weaker: it ties with it on the prompts seen
    and refuses more on the next ones. Each is tried with its weights raised to ``strength`` (`strengthen`);
    when its KL is still the lower, that twin runs as a new trial and joins the finalists, so the plain edit also
    meets edits of its own strength. The plain edit's `counterpart` is matched to ``strength`` whatever its KL,
    weakened or strengthened: a better-measured direction can be stronger at the same weights. Edits removing
    fitted directions are left to `reply_twin`."""
    if default is None or strength is None or not cfg.twins:
        return []
    twins: list[Scored] = []
    other = counterpart(picks, default)
    for t in picks:
        if cfg.fit_steps and t.params.get("source") == "wide":  # fitted: its likelihood does not compare
            continue  # (`reply_twin` raises the counterpart; on Qwen2.5 these probes took 12 of 65 minutes)
        if t is other:
            found = match_strength(bench, t.params, base, strength.target, strength.tol)
        else:
            found = None if t.number == default.number or t.kl >= default.kl else strengthen(
                bench, t.params, base, strength.target, strength.tol)
        if found is None or found.kl >= strength.plain_kl or found.factor == 1.0:  # 1.0: it is that strong
            continue
        twin = run_enqueued(study, bench, cfg, base, scaled(t.params, found.factor), {"twin_of": t.number}, space)
        say(f"trial {twin.number}: trial {t.number} with weights x{found.factor:.3f}, a little stronger than the "
            f"plain edit: refusal {twin.refusal:.1%}, KL {twin.kl:.4f}")
        twins.append(twin)
    return twins


def reply_twin(study: Any, bench: Workbench, picks: list[Scored], default: Scored | None, cfg: SearchConfig,
               base: EditConfig, say: Progress, space: Space) -> tuple[list[Scored], set[int]]:
    """The plain edit's fitted counterpart raised by its generated replies on the prompts seen until it refuses
    a little less than the plain edit (`raise_by_replies`, ``cfg.twin_margin`` of the way the plain edit moved the
    refusal rate), run as a new trial unless it is that strong as it is: (new trials, the numbers of the trials
    matched so, which the refusal likelihood guard does not judge). The fit keeps the plain edit's replies, not
    the base's refusal openings, so its likelihood does not compare: on Qwen2.5 the fitted span at the plain
    edit's weights had a likelihood of 0.553 to its 0.483, yet refused within one prompt of it on 96."""
    other = counterpart(picks, default)
    if other is None or default is None or not cfg.fit_steps or not cfg.twins:
        return [], set()
    plain = seen_score(bench, default.params, base)
    target = plain[0] - cfg.twin_margin * max(0.0, bench.base_rate - plain[0])
    found = raise_by_replies(bench, other.params, base, plain, target, say=say)
    if found is None:
        say(f"trial {other.number} (the fitted span) reaches neither the plain edit's refusal nor a lower KL")
        return [], set()
    if found.factor == 1.0:
        return [], {other.number}
    twin = run_enqueued(study, bench, cfg, base, scaled(other.params, found.factor),
                        {"twin_of": other.number, "by_replies": True}, space)
    say(f"trial {twin.number}: trial {other.number} with weights x{found.factor:.2f}, refusing {found.refusal:.1%} "
        f"of the prompts seen by its replies (plain edit {plain[0]:.1%}), KL {found.kl:.4f}")
    return [twin], {twin.number}


def refined_trial(study: Any, bench: Workbench, default: Scored | None, strength: Strength | None,
                  cfg: SearchConfig, base: EditConfig, say: Progress, space: Space) -> list[Scored]:
    """The plain edit refined at ``strength`` (`refine`), run as a new trial when it keeps less KL than the
    plain edit; once per study (a continued study keeps the one it has as a finalist)."""
    done = [_scored(t) for t in study.get_trials(deepcopy=False) if "refined" in t.user_attrs and t.values]
    if done or default is None or strength is None or cfg.refine < 1:
        return done
    say(f"refining the plain edit at its strength (refusal likelihood {strength.refine_target:.4f}), "
        f"up to {cfg.refine} rounds")
    found = refine(bench, default.params, base, strength.refine_target, strength.tol, cfg.refine, cfg.search_method,
                   say=say, first=(strength.plain, strength.plain_kl))
    if found is None or found.matched.kl >= strength.plain_kl:
        say("refining: no move keeps less KL at the plain edit's strength")
        return []
    moves = " + ".join(found.path)
    t = run_enqueued(study, bench, cfg, base, found.params, {"refined": moves}, space)
    say(f"trial {t.number}: the plain edit refined ({moves}), KL {found.matched.kl:.4f} against "
        f"{strength.plain_kl:.4f} on the prompts seen: refusal {t.refusal:.1%}, KL {t.kl:.4f}")
    return [t]


def pareto_front(study: Any) -> list[Scored]:
    """Trials that no other trial beats on both refusal and KL (Optuna's `best_trials`), sorted by refusal."""
    return sorted((_scored(t) for t in study.best_trials), key=lambda t: (t.refusal, t.kl, t.number))


@dataclass
class Outcome:
    trials: list[Scored]
    front: list[Scored]
    finalists: list[Scored]  # re-scored on the trial and confirm parts
    chosen: Scored  # as re-scored
    rule: str
    limit: float
    twins: dict[int, int]  # trial number -> the finalist it is a stronger twin of (`calibrate`)
    refined: dict[int, str]  # trial number -> the moves that refined the plain edit into it (`refined_trial`)
    by_replies: list[int]  # finalists matched to the plain edit by generated replies, not likelihood (`reply_twin`)

    def summary(self, cfg: SearchConfig, base_rate: float, ran: int) -> dict[str, Any]:
        return {"trials": len(self.trials), "trials_run": ran, "chosen_trial": self.chosen.number, "rule": self.rule,
                "target": cfg.target, "base_refusal_rate": base_rate, "refusal_limit": self.limit,
                "max_kl": cfg.search_max_kl, "pareto_front": [asdict(t) for t in self.front],
                "finalists": [asdict(t) for t in self.finalists], "twins": self.twins,
                "refined": self.refined, "by_replies": self.by_replies}


def _check_job(job: AbliterateJob, cfg: SearchConfig) -> None:
    if job.streaming:
        raise UserError("--auto edits the loaded model in memory: leave out --streaming")
    if not job.evaluate:
        raise UserError("--auto scores every trial by evaluation: leave out --no-eval")
    if job.load.load_in_4bit:
        raise UserError("--auto edits the weights in place, which 4-bit weights do not allow: drop --load-in-4bit")
    if cfg.trials < 1:
        raise UserError(f"--trials must be at least 1, got {cfg.trials}")
    if cfg.confirm_prompts and cfg.wide_prompts:
        raise UserError("--confirm-prompts and --wide-prompts both use the prompts outside measurement and evaluation: "
                        "choose one (--confirm-prompts 0 or --wide-prompts 0)")
    if cfg.fit_steps and cfg.wide_prompts:
        raise UserError("--fit-steps and --wide-prompts both give the search its own directions: choose one "
                        "(--fit-steps 0 or --wide-prompts 0)")
    check_target(job.out, job.overwrite)


def _prepare(job: AbliterateJob, cfg: SearchConfig, loaded: Loaded | None, d: dirs.Directions | None,
             say: Progress) -> tuple[Any, Workbench, dict[str, stages.Prompts], Path]:
    """Prompts (per direction source: what measured it), study (checked early), model, directions, base
    references: everything the trials need."""
    _check_job(job, cfg)
    eval_cfg = job.eval or EvalConfig()
    prompts = stages.resolve_prompts(job.model, job.prompts)
    split = split_parts(prompts.harmful.evaluate, prompts.harmless.evaluate, prompts.eval_groups(),
                        cfg.test_fraction)
    path = Path(cfg.study or f"{Path(job.out)}.study.journal")
    space = {"method": "searched" if cfg.search_method else job.edit.method, "allow_mlp_off": cfg.allow_mlp_off,
             "per_layer": "searched" if cfg.search_per_layer else job.edit.per_layer,
             "embed_strength": job.edit.embed_strength, "per_set": job.edit.per_set}
    context = {"model": job.model, "prompts": prompts.record(), "max_new_tokens": eval_cfg.max_new_tokens,
               "prefill_think": eval_cfg.prefill_think, "directions": str(job.directions_file or "measured"),
               "search space": space, "test_fraction": cfg.test_fraction, "wide_prompts": cfg.wide_prompts,
               "fit_steps": cfg.fit_steps, "fit_learning_rate": cfg.fit_learning_rate, "fit_weight": cfg.fit_weight
               } | ({"confirm_prompts": cfg.confirm_prompts} if cfg.confirm_prompts else {})  # older studies match
    study = open_study(path, cfg, context)
    if loaded is None:
        say(f"loading {job.model}")
        loaded = load_model(job.model, job.load)
    if d is None and job.directions_file:
        d = dirs.load(job.directions_file)
    elif d is None:
        say("measuring refusal directions")
        d = stages.measure_directions(loaded, prompts, job.measure, job.edit, say)
    own, split = prepare_own_directions(loaded, d, prompts, split, job, cfg, eval_cfg.prefill_think, say)
    split = confirm_on_more(split, job, prompts, cfg.confirm_prompts, say)
    sizes = ", ".join(f"{k} {len(v[0])}" for k, v in split.items())
    say(f"evaluating the base model (harmful prompts per part: {sizes})")
    parts = measured_parts(loaded, split, eval_cfg, job.model)
    bench = Workbench(loaded, d, parts, eval_cfg, embed=job.edit.embed_strength > 0, wide=own[0] if own else None)
    return study, bench, {"chain": prompts} | ({"wide": own[1]} if own else {}), path


def search(job: AbliterateJob, cfg: SearchConfig, progress: Progress | None = print,
           loaded: Loaded | None = None, directions: dirs.Directions | None = None,
           space: Space = suggest) -> dict[str, Any]:
    """Search edits for ``job`` (its edit gives the unsearched settings), save the chosen one into
    ``job.out``. A ``loaded`` model is reused and left with its original weights; ``space`` samples
    the trials (a benchmark compares other spaces with it)."""
    say = progress or log.info
    with quiet_optuna():
        study, bench, prompts, path = _prepare(job, cfg, loaded, directions, say)
        if "wide" not in bench.sources:  # nothing more to measure from: trials remove the chain's directions
            cfg = cfg.model_copy(update={"wide_prompts": 0, "fit_steps": 0})
        if cfg.start_from_default and not study.trials:
            enqueue_start(study, bench, cfg, job.edit)
        say(f"search: {cfg.trials} new trials, {len(completed(study))} done before in {path}; "
            f"base refusal rate {bench.base_rates['trial']:.1%} on the trial part")
        run_trials(study, bench, cfg, job.edit, say, space)
        trials = completed(study)
        front, default = pareto_front(study), default_trial(study, trials)
        picks = finalists_of(front, trials, default, cfg.target * bench.base_rates["trial"], cfg.finalists)
        picks += [t for t in [counterpart(trials, default)] if t is not None and t not in picks]
        strength = strength_of(bench, default, cfg, job.edit)
        picks += calibrate(study, bench, picks, default, strength, cfg, job.edit, say, space)
        raised, by_replies = reply_twin(study, bench, picks, default, cfg, job.edit, say, space)
        picks += raised + refined_trial(study, bench, default, strength, cfg, job.edit, say, space)
        trials = completed(study)
        finalists = [replace(t, likelihood=None) if t.number in by_replies else t
                     for t in confirm(bench, picks, job.edit, say)]
        default = next((t for t in finalists if default is not None and t.number == default.number), None)
        seen = len(bench.parts["trial"].harmful) + len(bench.parts["confirm"].harmful)
        chosen, rule = choose(finalists, bench.base_rate, cfg.target, cfg.search_max_kl, default, 1 / seen)
        marked = {k: {t.number: t.user_attrs[k] for t in study.get_trials(deepcopy=False) if k in t.user_attrs}
                  for k in ("twin_of", "refined")}
        result = Outcome(trials, front, finalists, chosen, rule, cfg.target * bench.base_rate, marked["twin_of"],
                         marked["refined"], sorted(by_replies))
    say("Pareto front:\n" + front_table(result.front, result.chosen.number).rstrip())
    say(f"chosen: trial {result.chosen.number} ({result.rule})")
    return _save(job, cfg, bench, prompts, result, path, default, say, study)


def enqueue_start(study: Any, bench: Workbench, cfg: SearchConfig, base: EditConfig) -> None:
    """The first trials of a new study: the plain edit, then its near variants (`neighbours`). With the search's
    own direction, the variants remove it, after the plain edit made with it (same layer, same kernels): a
    better-measured direction gains more than any shape near the plain edit (bench/README.md). The layer that
    direction's own measurement chose is not used there: on Qwen2.5 it was 13 where the chain's was 18, and the
    plain edit at 13 refused three times as often."""
    plain = from_edit(stages.default_edit(bench.d, "best", base), bench.d, cfg)
    study.enqueue_trial(plain, user_attrs={"default": True})
    near = plain | {"source": "wide"} if "wide" in bench.sources else plain
    variants = ([near] if near is not plain else []) + (neighbours(near, cfg) if cfg.neighbours else [])
    for variant in variants[:cfg.trials - 1]:  # none left waiting for a later run
        study.enqueue_trial(variant, user_attrs={"neighbour": True})


def _on_test(results: dict) -> dict[str, Any]:
    return {"refusal": results["refusal_rate"]["model"], "kl": results["kl_divergence"],
            "by_set": {k: v["model"] for k, v in (results.get("by_set") or {}).items()}}


def _save(job: AbliterateJob, cfg: SearchConfig, bench: Workbench, measured: dict[str, stages.Prompts],
          result: Outcome, path: Path, default: Scored | None, say: Progress, study: Any) -> dict[str, Any]:
    edit, spec, source = bench.edit_of(result.chosen.params, job.edit)
    d, prompts = bench.sources[source], measured[source]
    direction, layer, edit = stages.chosen_direction(d, spec, edit)
    plan = stages.strength_plan(edit, bench.num_layers)
    summary = {**result.summary(cfg, bench.base_rate, cfg.trials), "study": path.name,  # name only: published
               "prompts": {k: {"harmful": len(p.harmful), "harmless": len(p.harmless)} for k, p in bench.parts.items()},
               "directions": {k: {"harmful": len(p.harmful.measure), "harmless": len(p.harmless.measure)}
                              | ({"fit": bench.sources[k].info["fit"]} if "fit" in bench.sources[k].info else {})
                              for k, p in measured.items()} | {"chosen": source}}
    if default is not None and default.number != result.chosen.number:
        say("evaluating the plain edit on the test prompts, for comparison")
        plain = bench.edit_of(default.params, job.edit)
        summary["plain_edit_on_test"] = _on_test(bench.run(*plain, part="test")[0])
    sources = {k: {"source": getattr(prompts, k).source, "split": "eval (search test part)"}
               for k in ("harmful", "harmless")}
    with staged_folder(job.out, job.overwrite) as tmp, bench.restoring():
        say("saving the chosen edit")
        changed = stages.edit_and_save_in_memory(bench.loaded, direction, edit, tmp)
        dirs.save(d, tmp)
        stages.plot_strengths(plan, tmp / "strengths.png")
        say("evaluating the chosen edit on the test prompts")
        results = bench.evaluate("test", model_id=str(job.out), base_id=job.model, prompt_sources=sources)
        summary["chosen_on_test"] = _on_test(results)
        if default is not None and default.number == result.chosen.number:
            summary["plain_edit_on_test"] = summary["chosen_on_test"]
        rec = stages.recipe(job.model, job.load, edit, layer, prompts, plan, d, bench.loaded.source)
        rec = write_recipe(tmp, rec | {"search": summary})
        write_json(tmp / EVAL_FILE, results)
        report = {**summary, "config": cfg.model_dump(mode="json"), "trials_all": [asdict(t) for t in result.trials],
                  "table": front_table(result.front, result.chosen.number)}
        write_json(tmp / SEARCH_FILE, report)
        plot_pareto(study, result.chosen, result.limit, tmp / PARETO_PNG, [t.kl for t in result.trials])
    say(f"wrote {job.out}")
    return {"out": str(job.out), "changed_tensors": changed, "layer": layer, "recipe": rec, "eval": results,
            "search": summary}
