"""The Gradio Space: sign in, pick a model and a method, one click to abliterate and publish.

`build_demo()` only lays out components and wires events; the logic lives in
space/handlers.py (events), space/jobs.py (one isolated job), space/chat.py and space/auth.py.
"""

from __future__ import annotations

import inspect
import os

import gradio as gr

from space import auth, chat, handlers, limits
from space.joblog import stage_html

HEAVY_ID = "hardware"  # shared concurrency id: one job or chat generation at a time
QUEUE_SETTINGS = {"max_size": int(os.environ.get("ABLITERATOR_QUEUE_SIZE") or 16), "default_concurrency_limit": 1}
INTRO = """# Abliterator
Remove a model's refusal direction from its weights (**abliteration**), or tune it with **DPO / LoRA** or
**weight steering**; the result is evaluated before and after, gets a model card, and is published to your
Hugging Face account. The built-in `demo` model works offline."""


def _typed(component, json_type: str):
    """Declare the API type of a component whose own is too narrow (the model field's suggestions are not
    an enum: any Hub id is accepted; a trial count is a whole number)."""
    component.api_info = lambda: {"type": json_type}
    return component


def _sign_in(c: dict) -> None:
    with gr.Row(equal_height=True):
        if auth.on_spaces():
            gr.LoginButton(scale=0, min_width=260)
        c["hf_token"] = gr.Textbox(
            value="", label="Hugging Face token (write)", type="password",
            placeholder="hf_... (used for this job only)", visible=not auth.on_spaces(), scale=2, elem_id="hf-token",
        )
        c["signed_in"] = gr.Markdown("", elem_id="signed-in")


def _target(c: dict) -> None:
    with gr.Row(equal_height=True):
        c["model_id"] = gr.Dropdown(
            choices=["demo"], value="demo", label="Model (Hub id or demo)", allow_custom_value=True,
            filterable=True, scale=2, elem_id="model-id",
        )
        _typed(c["model_id"], "string")
        c["repo_id"] = gr.Textbox(value="", label="Target repo", placeholder="your-name/demo-abliterated", scale=2,
                                  elem_id="repo-id")
    # On its own line: squeezed into the row above, its label vanished on a narrow screen.
    c["private"] = gr.Checkbox(label="Private repo", value=False, elem_id="private")
    c["method"] = gr.Radio(["abliterate", "dpo", "steer"], value="abliterate", label="Method", visible=False)


def _abliterate_tab(c: dict) -> None:
    c["mode"] = gr.Radio([("Preset", "preset"), ("Manual", "manual"), ("Automatic search", "search")],
                         value="preset", label="Settings")
    with gr.Row():
        c["edit_method"] = gr.Dropdown(["standard", "projected", "norm-preserving"], value="standard",
                                       label="Edit method")
        c["preset"] = gr.Dropdown(["conservative", "standard", "aggressive"], value="standard", label="Preset")
        c["layer"] = gr.Textbox(value="best", label="Direction layer (best, index or depth fraction)")
    with gr.Group(visible=False) as manual:
        with gr.Row():
            c["attn_strength"] = gr.Slider(0, 2, value=1.0, step=0.05, label="Attention strength")
            c["attn_peak"] = gr.Slider(0, 1, value=0.5, step=0.05, label="Attention peak (depth)")
            c["attn_width"] = gr.Slider(0.05, 5, value=0.35, step=0.05, label="Attention width")
        with gr.Row():
            c["mlp_strength"] = gr.Slider(0, 2, value=1.0, step=0.05, label="MLP strength")
            c["mlp_peak"] = gr.Slider(0, 1, value=0.5, step=0.05, label="MLP peak (depth)")
            c["mlp_width"] = gr.Slider(0.05, 5, value=0.35, step=0.05, label="MLP width")
    max_trials = limits.Limits.from_env().max_trials
    c["trials"] = gr.Slider(1, max_trials, value=min(20, max_trials), step=1, label="Trial budget (automatic search)",
                            visible=False)
    _typed(c["trials"], "integer")
    c["_manual"] = manual


def _tune_tabs(c: dict) -> None:
    with gr.Tab("DPO / LoRA", id="dpo") as dpo:
        c["dpo_data"] = gr.Textbox(value="demo-pairs", label="Preference data (prompt/chosen/rejected: "
                                   ".jsonl file, Hub dataset or demo-pairs)")
        with gr.Row():
            c["dpo_steps"] = gr.Number(value=16, precision=0, minimum=1, label="Training steps")
            c["learning_rate"] = gr.Number(value=5e-4, label="Learning rate")
            c["lora_r"] = gr.Number(value=16, precision=0, minimum=1, label="LoRA rank")
            c["beta"] = gr.Number(value=0.1, label="DPO beta")
    with gr.Tab("Weight steering", id="steer") as steer:
        with gr.Row():
            c["steer_positive"] = gr.Textbox(value="demo-answers", label="Positive data (behaviour to add)")
            c["steer_negative"] = gr.Textbox(value="demo-refusals", label="Negative data (behaviour to remove)")
        c["steer_k"] = gr.Slider(-3, 3, value=2.0, step=0.1, label="k (steering strength)")
    c["_tabs"] = (dpo, steer)


def _settings(c: dict) -> None:
    with gr.Tabs():
        with gr.Tab("Abliterate", id="abliterate") as ablit:
            _abliterate_tab(c)
        _tune_tabs(c)
    for tab, name in ((ablit, "abliterate"), *zip(c.pop("_tabs"), ("dpo", "steer"), strict=True)):
        tab.select(lambda n=name: n, None, c["method"], api_visibility="private", queue=False)
    with gr.Accordion("Advanced", open=False):
        c["max_new_tokens"] = gr.Number(value=64, precision=0, minimum=1,
                                        maximum=limits.Limits.from_env().max_new_tokens,
                                        label="New tokens per evaluation prompt")
        c["extra_options"] = gr.Textbox(value="", label="Extra settings (JSON object of stage settings; the allowed "
                                        "keys are listed in docs/SECURITY.md)",
                                        placeholder='{"select_prompts": 8, "batch_size": 16}')


def _results(c: dict) -> None:
    c["link"] = gr.Markdown("", label="Repository", elem_id="repo-link")
    c["summary"] = gr.Markdown("", label="Evaluation", elem_id="summary")
    c["download"] = gr.File(label="Edited model (zip, dry run)", interactive=False, height=90, elem_id="download")
    with gr.Row():
        c["directions"] = gr.Image(label="Refusal direction per layer", type="pil", interactive=False)
        c["strengths"] = gr.Image(label="Edit strength per layer", type="pil", interactive=False)
    c["pareto"] = gr.Image(label="Pareto front of the search", type="pil", interactive=False, visible=False)
    with gr.Accordion("Chat: original vs edited", open=True):
        with gr.Row():
            c["left"] = gr.Chatbot(label="Original", height=280, elem_id="chat-original")
            c["right"] = gr.Chatbot(label="Edited", height=280, elem_id="chat-edited")
        with gr.Row():
            c["message"] = gr.Textbox(placeholder="Run a job first: then ask both models", label="Message",
                                      show_label=False,
                                      scale=4, interactive=False, elem_id="chat-message")
            c["send"] = gr.Button("Send", scale=1, interactive=False, elem_id="chat-send")
        samples = [[p] for p in chat.suggestions("demo")]
        c["examples"] = gr.Dataset(components=[c["message"]], samples=samples, type="values",
                                   label="Try asking (held-out evaluation prompts: refused topics, then ordinary)",
                                   elem_id="chat-examples")
    with gr.Accordion("Model card", open=False):
        c["card"] = gr.Markdown("", label="Model card", elem_id="model-card")


def _inputs(c: dict, fn) -> list:
    return [c[name] for name in inspect.signature(fn).parameters if name in c]


def _wire_job(c: dict) -> None:
    outputs = [c[name] for name in (*handlers.OUTPUTS, *handlers.STATES)]
    # No Gradio progress overlay: the stage bar, the status line and the log say where the job is and how
    # it ended (an overlay would cover them with a red "Error" badge).
    common = {"outputs": outputs, "concurrency_id": HEAVY_ID, "concurrency_limit": 1, "show_progress": "hidden"}
    publish = c["publish"].click(handlers.abliterate_and_publish, _inputs(c, handlers.abliterate_and_publish),
                                 api_name="abliterate_and_publish", **common)
    dry = c["dry"].click(handlers.run_without_publishing, _inputs(c, handlers.run_without_publishing),
                         api_name="run_without_publishing", **common)
    follow_out = [c["edit_method"], c["layer"], c["examples"], c["left"], c["right"], c["message"], c["send"]]
    for event in (publish, dry):
        event.then(handlers.follow_job, c["job"], follow_out, api_visibility="private", queue=False)
    c["cancel"].click(handlers.cancel_job, [c["job"], c["log"]], [c["status"], c["stage"], c["log"], c["job"]],
                      cancels=[publish, dry], api_visibility="private", queue=False)


def _wire(c: dict) -> None:
    _wire_job(c)
    chat_in = [c["message"], c["chat_key"], c["left"], c["right"]]
    chat_out = [c["message"], c["left"], c["right"]]
    chat = {"concurrency_id": HEAVY_ID, "concurrency_limit": 1}
    c["send"].click(handlers.chat_turn, chat_in, chat_out, api_name="chat", **chat)
    c["message"].submit(handlers.chat_turn, chat_in, chat_out, api_visibility="private", **chat)
    c["examples"].click(lambda sample: sample[0], c["examples"], c["message"], api_visibility="private",
                        queue=False)
    who_in = [c["hf_token"], c["model_id"], c["method"], c["repo_id"]]
    c["hf_token"].blur(handlers.who, who_in, [c["signed_in"], c["repo_id"]], api_visibility="private",
                       concurrency_limit=4, show_progress="hidden")
    for source in (c["model_id"], c["method"]):
        source.change(handlers.retarget, [c["model_id"], c["method"], c["repo_id"]], c["repo_id"],
                      api_visibility="private", queue=False)
    for source in (c["method"], c["mode"], c["model_id"]):
        source.change(handlers.follow_method, [c["method"], c["mode"], c["model_id"]],
                      [c["publish"], c["repo_id"], c["directions"], c["strengths"], c["pareto"]],
                      api_visibility="private", queue=False)
    c["mode"].change(
        lambda m: (gr.update(visible=m == "manual"), gr.update(visible=m == "search"),
                   gr.update(visible=m == "preset"), gr.update(visible=m != "search")),
        c["mode"], [c.pop("_manual"), c["trials"], c["preset"], c["layer"]], api_visibility="private", queue=False,
    )
    c["model_id"].key_up(handlers.suggest, None, c["model_id"], api_visibility="private", concurrency_limit=4,
                         trigger_mode="always_last", show_progress="hidden")


class SpaceBlocks(gr.Blocks):
    """Blocks whose launch never keeps a run history: Gradio's would store every run's inputs (the token
    field included) in the browser, or in a Hub bucket."""

    def launch(self, *args, run_history: bool | None = False, **kwargs):
        return super().launch(*args, run_history=False if run_history is None else run_history, **kwargs)


def build_demo() -> gr.Blocks:
    """The whole Space (queue configured: bounded, one heavy job at a time)."""
    c: dict = {}
    with SpaceBlocks(title="Abliterator", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO)
        _sign_in(c)
        _target(c)
        _settings(c)
        with gr.Row():
            c["publish"] = gr.Button("Abliterate and publish", variant="primary", elem_id="publish")
            c["dry"] = gr.Button("Run without publishing", elem_id="dry-run")
            c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="cancel")
        c["status"] = gr.Markdown("", label="Outcome", elem_id="job-status")
        c["stage"] = gr.HTML(stage_html(None, "idle"), label="Stage", elem_id="job-stage")
        c["log"] = gr.Textbox(label="Log", lines=8, max_lines=16, autoscroll=True, interactive=False,
                              elem_id="job-log")
        _results(c)
        c["chat_key"], c["job"] = gr.State(None), gr.State(None)
        _wire(c)
        demo.load(handlers.who, [c["hf_token"], c["model_id"], c["method"], c["repo_id"]],
                  [c["signed_in"], c["repo_id"]], api_visibility="private", show_progress="hidden")
    demo.queue(**QUEUE_SETTINGS)
    return demo
