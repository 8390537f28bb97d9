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
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from pipeline.errors import UserError
from space import auth, chat, limits, policy
from space.jobs import HEAVY, STAGES, JobRequest, JobResult, JobRunner, stage_of

log = logging.getLogger(__name__)

OUTPUTS = ("log", "summary", "directions", "strengths", "pareto", "card", "link", "stage", "chat_key")
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
    from pipeline.evaluate import markdown_table

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
    return "### Not published\nThe edited model was evaluated and then deleted; run again to publish it."


def stage_html(stage: int, publish: bool = True) -> str:
    """A progress bar over the job's stages (stays visible while the log streams)."""
    total = len(STAGES) if publish else len(STAGES) - 1
    if stage < 0:
        label, done = "Waiting for a free slot", 0
    elif stage >= total:
        label, done = "Done", total
    else:
        label, done = f"Stage {stage + 1} of {total}: {STAGES[stage][1]}", stage
    width = round(100 * done / total)
    track = "background:var(--neutral-200,#e5e7eb);border-radius:4px;height:10px;overflow:hidden"
    fill = f"background:var(--color-accent,#f97316);height:10px;width:{width}%;transition:width .4s"
    return (f'<div class="job-stage"><div style="margin-bottom:4px">{label}</div>'
            f'<div style="{track}"><div style="{fill}"></div></div></div>')


def final_outputs(log_text: str, result: JobResult) -> tuple:
    pareto = result.charts.get("pareto.png")
    return (log_text, summary_markdown(result.eval), _image(result.charts.get("directions.png")),
            _image(result.charts.get("strengths.png")),
            gr.update(value=_image(pareto), visible=bool(pareto)),
            card_markdown(result.card, result.charts), link_markdown(result), stage_html(len(STAGES)),
            result.chat_key)


def _skip(log_text: str | None = None, stage: str | None = None) -> tuple:
    values = {"log": log_text, "stage": stage}
    return tuple(gr.skip() if values.get(name) is None else values[name] for name in OUTPUTS)


def stream(publish: bool, values: dict[str, Any], oauth_token: Any, progress: Any) -> Iterator[tuple]:
    """Run one job and stream (log, summary, charts, card, link, chat key) as it goes."""
    field_token = values.pop("hf_token", None)
    try:
        method, options = build_options(values)
        model_id = policy.check_model(str(values.get("model_id") or "").strip() or "demo")
        # Resolved for unpublished runs too: the job reads the Hub as this user (their private models load,
        # nobody else's do); None means anonymous reads.
        token = auth.resolve_token(oauth_token, field_token)
        request = JobRequest(model_id, values.get("repo_id"), method,
                             bool(values.get("private")), publish, options, token=token)
        runner = JobRunner(request, keep_for_chat=chat.keep_edited).start()
    except UserError as err:
        raise gr.Error(str(err), print_exception=False) from None
    lines: list[str] = []
    stage, start = -1, time.monotonic()
    progress(0.0, desc="Starting")
    yield ("", "", None, None, gr.update(value=None, visible=False), "", "", stage_html(-1), gr.skip())
    try:
        for kind, value in runner.events():
            if kind == "log":
                lines.append(f"[{time.monotonic() - start:6.1f}s] {value}")
                new = stage_of(value)
                changed = new is not None and new > stage
                if changed:
                    stage = new
                    desc = STAGES[stage][1] if stage < len(STAGES) else "Done"
                    progress(min(stage, len(STAGES)) / len(STAGES), desc=desc)
                yield _skip("\n".join(lines), stage_html(max(stage, 0), publish) if changed or stage < 0 else None)
            elif kind == "result":
                yield final_outputs("\n".join(lines), value)
            else:
                yield _skip()
    except UserError as err:
        raise gr.Error(str(err), print_exception=False) from None
    finally:
        runner.cancel()  # no-op after the end; stops the worker when the page cancelled or left


def abliterate_and_publish(
    model_id: str = "demo", repo_id: str = "", private: bool = False, method: str = "abliterate",
    mode: str = "preset", preset: str = "standard", edit_method: str = "standard", layer: str = "best",
    attn_strength: float = 1.0, attn_peak: float = 0.5, attn_width: float = 2.0, mlp_strength: float = 1.0,
    mlp_peak: float = 0.5, mlp_width: float = 2.0, trials: int = 20, dpo_data: str = "demo-pairs",
    dpo_steps: int = 16, learning_rate: float = 5e-4, lora_r: int = 16, beta: float = 0.1,
    steer_positive: str = "demo-answers", steer_negative: str = "demo-refusals", steer_k: float = 2.0,
    max_new_tokens: int = 64, extra_options: str = "", hf_token: str = "",
    oauth_token: gr.OAuthToken | None = None, progress: gr.Progress = gr.Progress(),
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
    """
    values = {k: v for k, v in locals().items() if k not in ("oauth_token", "progress")}
    yield from stream(True, values, oauth_token, progress)


def run_without_publishing(
    model_id: str = "demo", repo_id: str = "", private: bool = False, method: str = "abliterate",
    mode: str = "preset", preset: str = "standard", edit_method: str = "standard", layer: str = "best",
    attn_strength: float = 1.0, attn_peak: float = 0.5, attn_width: float = 2.0, mlp_strength: float = 1.0,
    mlp_peak: float = 0.5, mlp_width: float = 2.0, trials: int = 20, dpo_data: str = "demo-pairs",
    dpo_steps: int = 16, learning_rate: float = 5e-4, lora_r: int = 16, beta: float = 0.1,
    steer_positive: str = "demo-answers", steer_negative: str = "demo-refusals", steer_k: float = 2.0,
    max_new_tokens: int = 64, extra_options: str = "", hf_token: str = "",
    oauth_token: gr.OAuthToken | None = None, progress: gr.Progress = gr.Progress(),
) -> Iterator[tuple]:
    """The same job without the upload: evaluate the edit and read its card first."""
    values = {k: v for k, v in locals().items() if k not in ("oauth_token", "progress")}
    yield from stream(False, values, oauth_token, progress)


def chat_turn(message: str, model_id: str, chat_key: str | None, left: list | None, right: list | None):
    """Send one message to the original and the edited model of this session's last job.

    `model_id` (the model field) is not used: the chat answers with the two models that this
    session's own job loaded, never with a model named by the caller.
    """
    try:
        with HEAVY:
            base, edited = chat.replies(message, chat_key)
    except UserError as err:
        raise gr.Error(str(err), print_exception=False) from None
    user = {"role": "user", "content": message}
    left = [*(left or []), user, {"role": "assistant", "content": base}]
    right = [*(right or []), user, {"role": "assistant", "content": edited}]
    return "", left, right


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


def cancelled() -> str:
    return "Cancelled. A job stopped before its publishing step published nothing."
