"""The Space's event handlers: settings -> job -> streamed outputs. No layout here (see space/ui.py).

The two job handlers share one signature, so the API endpoints `abliterate_and_publish` and
`run_without_publishing` take the same named inputs; every input but the model has a default.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import gradio as gr

from pipeline.errors import UserError
from space import auth, chat, limits, policy
from space.joblog import JobLog, stage_html
from space.jobs import HEAVY, JobRequest, JobResult, JobRunner

log = logging.getLogger(__name__)

# The job endpoints' outputs, in order (named in the API by their components' labels; docs/API.md).
OUTPUTS = ("log", "status", "stage", "summary", "directions", "strengths", "pareto", "download", "card", "link")
STATES = ("chat_key", "job")  # per-session, not part of the API
BUTTONS = {"abliterate": "Abliterate and publish", "dpo": "Tune (DPO) and publish", "steer": "Steer and publish"}
_IMAGE_REF = re.compile(r"\]\(((?:directions|strengths|pareto)\.png)\)")


def _number(value: Any, kind: type, name: str) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}: expected a number, got {value!r}") from None


def _extra(text: str | None) -> dict[str, Any]:
    if not (text or "").strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as err:
        raise UserError(f"extra settings: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise UserError("extra settings: expected a JSON object such as {\"select_prompts\": 8}")
    return data


def build_options(v: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The RunJob method and its options from the form's values."""
    method = v.get("method") or "abliterate"
    options: dict[str, Any] = {"max_new_tokens": _number(v.get("max_new_tokens", 64), int, "max new tokens")}
    if method == "abliterate":
        mode = str(v.get("mode") or "preset").strip().lower()
        options["method"] = v.get("edit_method") or "standard"
        if mode == "search":
            method = "auto"
            options["trials"] = _number(v.get("trials", 20), int, "trials")
        else:
            options["layer"] = str(v.get("layer") or "best").strip()
            options["preset"] = v.get("preset") or "standard"
        if mode == "manual":
            for comp in ("attn", "mlp"):
                for key in ("strength", "peak", "width"):
                    options[f"{comp}_{key}"] = _number(v.get(f"{comp}_{key}"), float, f"{comp} {key}")
    elif method == "dpo":
        options.update(data=(v.get("dpo_data") or "").strip(), max_steps=_number(v.get("dpo_steps"), int, "steps"),
                       learning_rate=_number(v.get("learning_rate"), float, "learning rate"),
                       lora_r=_number(v.get("lora_r"), int, "LoRA rank"), beta=_number(v.get("beta"), float, "beta"))
        options["logging_steps"] = 1  # the log shows every step and its loss
    elif method == "steer":
        options.update(positive=(v.get("steer_positive") or "").strip(),
                       negative=(v.get("steer_negative") or "").strip(), k=_number(v.get("steer_k"), float, "k"))
    else:
        raise UserError(f"unknown method {method!r}: use abliterate, dpo or steer")
    # Extra settings only from the allow-list; then sources (no server paths) and the caps on the whole.
    options = {**options, **policy.check_extra(_extra(v.get("extra_options")))}
    policy.check_sources(options)
    return method, limits.apply_limits(options, limits.Limits.from_env())


def summary_markdown(results: dict[str, Any]) -> str:
    from pipeline.evaluation.report import markdown_table

    rate, kl = results.get("refusal_rate") or {}, results.get("kl_divergence")

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f}%"

    head = f"**Refusal rate:** {pct(rate.get('base'))} → {pct(rate.get('model'))}"
    if kl is not None:
        head += f" · **KL divergence:** {kl:.4g}"
    return f"{head}\n\n{markdown_table(results)}"


def card_markdown(card: str, charts: dict[str, bytes]) -> str:
    """The card without its YAML front matter; its chart links inlined (the files are gone)."""
    from huggingface_hub import ModelCard

    body = ModelCard(card, ignore_metadata_errors=True).text.lstrip("\n") if card.startswith("---") else card

    def inline(match: re.Match[str]) -> str:
        data = charts.get(match.group(1))
        return f"](data:image/png;base64,{base64.b64encode(data).decode()})" if data else "]()"

    return _IMAGE_REF.sub(inline, body)


def _image(data: bytes | None):
    if not data:
        return None
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def link_markdown(result: JobResult) -> str:
    if result.url:
        return f"### Published: [{result.repo_id}]({result.url})"
    return (f"### Not published\nThe card below is written for `{result.repo_id}`. Download the result (a zip of "
            "the model, its card and evaluation) to keep it; publishing with the same settings uploads this very "
            "result (for about an hour).")


def chosen_markdown(recipe: dict[str, Any]) -> str:
    """What the automatic search chose, in words (empty for other jobs)."""
    from pipeline.edit.search_report import describe
    from pipeline.edit.stages import describe_layer

    search = recipe.get("search")
    if not search:
        return ""
    layers = len((recipe.get("strengths") or {}).get("attn") or []) or 1
    front = search.get("pareto_front") or []
    params = next((t.get("params") for t in front if t.get("number") == search.get("chosen_trial")), None)
    try:
        what = f"trial {search.get('chosen_trial')}: {describe(params)}"
    except (KeyError, TypeError):  # a trial recorded without its parameters
        what = f"trial {search.get('chosen_trial')}: {recipe.get('method')} edit"
    where = describe_layer(recipe["layer"], layers) if isinstance(recipe.get("layer"), dict) else ""
    return f"**Chosen by the search:** {what}" + (f"; {where}" if where else "")


def chosen_settings(recipe: dict[str, Any]) -> dict[str, str]:
    """The form values a search chose (edit method, depth fraction), to show in the settings."""
    if not recipe.get("search"):
        return {}
    layer = recipe.get("layer") or {}
    out = {"edit_method": str(recipe.get("method") or "")}
    if isinstance(layer, dict) and isinstance(layer.get("fraction"), int | float):
        out["layer"] = f"{layer['fraction']:.2f}"
    return out


def _out(**named: Any) -> tuple:
    """One streamed update: the named outputs, every other one left as it is."""
    return tuple(named[name] if name in named else gr.skip() for name in (*OUTPUTS, *STATES))


def _job_state(log: JobLog, phase: str, **extra: Any) -> dict[str, Any]:
    return {"phase": phase, "method": log.method, "publish": log.publish, "stage": log.stage, **extra}


def _done(log: JobLog, result: JobResult) -> tuple:
    summary = summary_markdown(result.eval)
    chosen = chosen_markdown(result.recipe)
    if result.url:
        log.note(f"published: {result.url}")
        status = f"**Done.** Published to [{result.repo_id}]({result.url})."
    else:
        log.note("done: nothing was published; the result is ready to download")
        status = "**Done (not published).** Download the edited model below, read its card, or publish it."
    state = _job_state(log, "done", base_model=result.base_model, suggestions=result.suggestions,
                       chosen=chosen_settings(result.recipe), chat=bool(result.chat_key), kept=result.download)
    charts = result.charts
    return _out(log=log.text(), status=status, stage=stage_html(log, "done"),
                summary=f"{chosen}\n\n{summary}" if chosen else summary,
                directions=_image(charts.get("directions.png")), strengths=_image(charts.get("strengths.png")),
                pareto=_image(charts.get("pareto.png")), download=result.download,
                card=card_markdown(result.card, charts), link=link_markdown(result), chat_key=result.chat_key,
                job=state)


def _failed(log: JobLog, reason: str) -> Iterator[tuple]:
    """Show the failure on the page (status, stage bar, log kept), then end the event with it as the error."""
    where = log.stage_label().lower() if log.stage >= 0 else "before the job started"
    log.note(f"failed during {where}: {reason}" if log.stage >= 0 else f"failed {where}: {reason}")
    yield _out(log=log.text(), status=f"**Failed** ({where}): {reason}", stage=stage_html(log, "failed", reason),
               job=_job_state(log, "failed"))
    # Not shown as a toast (the page says it); API callers get the one line as the error.
    raise gr.Error(reason, visible=False, print_exception=False)


def stream(publish: bool, values: dict[str, Any], oauth_token: Any) -> Iterator[tuple]:
    """Run one job; stream the log and stage, then its outcome: done, failed or cancelled."""
    field_token = values.pop("hf_token", None)
    last = values.pop("job", None) or {}  # this session's previous job (server-side state, never the caller's)
    log = JobLog(str(values.get("method") or "abliterate"), publish)
    try:
        method, options = build_options(values)
        log.method = method
        model_id = policy.check_model(str(values.get("model_id") or "").strip() or "demo")
        # Resolved for unpublished runs too: the job reads the Hub as this user (their private models load,
        # nobody else's do); None means anonymous reads.
        token = auth.resolve_token(oauth_token, field_token)
        request = JobRequest(model_id, values.get("repo_id"), method, bool(values.get("private")), publish,
                             options, token=token, kept=last.get("kept") if last.get("phase") == "done" else None)
        runner = JobRunner(request, keep_for_chat=chat.keep_edited).start()
    except UserError as err:
        yield from _failed(log, str(err))
        return
    what = "publish" if publish else "dry run"
    yield _out(log="", status=f"**Running** ({what}): {model_id}, {method}.", stage=stage_html(log, "waiting"),
               summary="", directions=None, strengths=None, pareto=None, download=None, card="", link="",
               job=_job_state(log, "running"))
    try:
        for kind, value in runner.events():
            if kind == "log":
                changed = log.add(value)  # the stage, or its detail (trial, step), moved on
                update = {"log": log.text()}
                if changed:
                    update.update(stage=stage_html(log), job=_job_state(log, "running"))
                yield _out(**update)
            elif kind == "result":
                yield _done(log, value)
            elif kind == "failed":
                yield from _failed(log, value)
            elif kind == "cancelled":  # the worker saw the cancel before the page did
                yield cancel_job(_job_state(log, "running"), log.text())
            else:
                yield _out()
    finally:
        runner.cancel()  # no-op after the end; stops the worker when the page cancelled or left


def abliterate_and_publish(
    model_id: str = "demo", repo_id: str = "", private: bool = False, method: str = "abliterate",
    mode: str = "preset", preset: str = "standard", edit_method: str = "standard", layer: str = "best",
    attn_strength: float = 1.0, attn_peak: float = 0.5, attn_width: float = 0.35, mlp_strength: float = 1.0,
    mlp_peak: float = 0.5, mlp_width: float = 0.35, trials: int = 20, dpo_data: str = "demo-pairs",
    dpo_steps: int = 16, learning_rate: float = 5e-4, lora_r: int = 16, beta: float = 0.1,
    steer_positive: str = "demo-answers", steer_negative: str = "demo-refusals", steer_k: float = 2.0,
    max_new_tokens: int = 64, extra_options: str = "", hf_token: str = "", job: dict | None = None,
    oauth_token: gr.OAuthToken | None = None,
) -> Iterator[tuple]:
    """Abliterate (or tune) the model, evaluate it, write its card and publish it to the Hub.

    Args:
        model_id: Hub model id, or `demo` (on a public app, no server folders).
        repo_id: target repo OWNER/NAME (default: {user}/{model}-abliterated).
        private: create the repo as private.
        method: abliterate, dpo or steer.
        mode: for abliterate: preset, manual or search.
        max_new_tokens: tokens generated per evaluation prompt.
        extra_options: JSON object of allowed stage settings (space/policy.py), e.g. {"select_prompts": 8}.
        hf_token: a write token (locally); on a Space, sign in instead.
        job: the session's last job (server-side state, not an API input): a publish after a dry run with
            the same settings uploads the dry run's result instead of making it again.
    """
    values = {k: v for k, v in locals().items() if k != "oauth_token"}
    yield from stream(True, values, oauth_token)


def run_without_publishing(
    model_id: str = "demo", repo_id: str = "", private: bool = False, method: str = "abliterate",
    mode: str = "preset", preset: str = "standard", edit_method: str = "standard", layer: str = "best",
    attn_strength: float = 1.0, attn_peak: float = 0.5, attn_width: float = 0.35, mlp_strength: float = 1.0,
    mlp_peak: float = 0.5, mlp_width: float = 0.35, trials: int = 20, dpo_data: str = "demo-pairs",
    dpo_steps: int = 16, learning_rate: float = 5e-4, lora_r: int = 16, beta: float = 0.1,
    steer_positive: str = "demo-answers", steer_negative: str = "demo-refusals", steer_k: float = 2.0,
    max_new_tokens: int = 64, extra_options: str = "", hf_token: str = "", job: dict | None = None,
    oauth_token: gr.OAuthToken | None = None,
) -> Iterator[tuple]:
    """The same job without the upload: evaluate the edit and read its card first."""
    values = {k: v for k, v in locals().items() if k != "oauth_token"}
    yield from stream(False, values, oauth_token)


def chat_turn(message: str, chat_key: str | None, left: list | None, right: list | None):
    """Send one message to the original and the edited model of this session's last job.

    The chat answers with the two models that this session's own job loaded, never with a model named
    by the caller. An empty message changes nothing.
    """
    if not (message or "").strip():
        return "", left or [], right or []
    try:
        with HEAVY:
            base, edited = chat.replies(message, chat_key)
    except UserError as err:
        raise gr.Error(str(err), print_exception=False) from None
    user = {"role": "user", "content": message}
    left = [*(left or []), user, {"role": "assistant", "content": base}]
    right = [*(right or []), user, {"role": "assistant", "content": edited}]
    return "", left, right


def cancel_job(job: dict[str, Any] | None, log_text: str | None) -> tuple:
    """(status, stage, log, job) after Cancel: said once, and only when a job was running."""
    if not job or job.get("phase") != "running":
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    log = JobLog(job["method"], job["publish"], lines=(log_text or "").splitlines(), stage=job["stage"])
    where = log.stage_label().lower() if log.stage >= 0 else "while waiting for a free slot"
    log.note(f"cancelled by you ({where}): nothing was published")
    return (f"**Cancelled** ({where}). Nothing was published.", stage_html(log, "cancelled"), log.text(),
            _job_state(log, "cancelled"))


def follow_job(job: dict[str, Any] | None) -> tuple:
    """After a job: the settings a search chose, the chat's suggestions, labels and whether it can be used."""
    job = job or {}
    if job.get("phase") != "done":
        return (gr.skip(),) * 7
    chosen, ready = job.get("chosen") or {}, bool(job.get("chat"))
    samples = [[p] for p in job.get("suggestions") or []]
    return (
        gr.update(value=chosen["edit_method"]) if chosen.get("edit_method") else gr.skip(),
        gr.update(value=chosen["layer"]) if chosen.get("layer") else gr.skip(),
        gr.Dataset(samples=samples) if samples else gr.skip(),
        gr.update(value=[], label=f"Original: {job.get('base_model')}"),
        gr.update(value=[], label=f"Edited ({job.get('method')})"),
        gr.update(interactive=ready, placeholder="Ask both models something" if ready else
                  "The chat is unavailable for this job"),
        gr.update(interactive=ready),
    )


def follow_method(method: str, mode: str, model_id: str = "demo") -> tuple:
    """(button, repo placeholder, direction chart, strength chart, Pareto chart) for the chosen method tab."""
    ablit = method == "abliterate"
    return (gr.update(value=BUTTONS.get(method, BUTTONS["abliterate"])),
            gr.update(placeholder=auth.default_repo("your-name", (model_id or "").strip() or "demo", method)),
            gr.update(visible=ablit), gr.update(visible=ablit), gr.update(visible=ablit and mode == "search"))


def who(field_token: str | None, model_id: str, method: str, repo_id: str,
        profile: gr.OAuthProfile | None = None) -> tuple[str, str]:
    """(sign-in line, repo field) for the current user; the repo is filled only while it is a default."""
    token = None if profile is not None else auth.resolve_token(None, field_token)
    name = getattr(profile, "username", None) or auth.user_name(token)
    if name:
        line = f"Signed in as **{name}**"
    elif token:
        line = "The token was not accepted by the Hub (or the Hub is unreachable)."
    elif auth.on_spaces():
        line = "Not signed in: sign in to publish."
    else:
        line = "No token: paste a write token (or set HF_TOKEN) to publish."
    if auth.is_default_repo(repo_id):
        repo_id = auth.default_repo(name, model_id, method) or repo_id
    return line, repo_id


def retarget(model_id: str, method: str, repo_id: str) -> str:
    """Follow a model or method change in the repo field while it still holds a default name."""
    owner = (repo_id or "").split("/")[0] if "/" in (repo_id or "") else None
    if owner and auth.is_default_repo(repo_id):
        return auth.default_repo(owner, model_id, method)
    return repo_id


def suggest(data: gr.KeyUpData) -> Any:
    return gr.update(choices=auth.suggest_models(data.input_value))
