"""The job as the page shows it, without running a model: the readable log and its stages, the stage bar's
end states, Cancel said once, labels that follow the method tab, and the reproduce command the card gets."""

from __future__ import annotations

import shlex

import pytest

# Messages in the order the pipeline sends them (paths already replaced by the job runner).
ABLITERATE = ["job: demo -> abliterate -> alice/demo-abliterated", "loading demo", "measuring refusal directions",
              "measuring refusal directions", "choosing the layer: testing 3 candidates (layers 2-4 of 6)",
              "direction from layer 4 of 6 (0.80 of the depth)", "editing weights", "wrote the result",
              "evaluating the base model", "evaluating the edited model", "writing the model card",
              "publishing to alice/demo-abliterated"]
SEARCH = ["job: demo -> auto -> not published", "loading demo", "measuring refusal directions",
          "evaluating the base model",
          "search: 3 new trials, 0 done before in the result.study.journal; base refusal rate 25.0%",
          "trial 0 [1/3]: refusal 10.0%, KL 0.1117 (standard, layer 0.80) | 1s elapsed, ~2s left",
          "trial 1 [2/3]: refusal 0.0%, KL 0.0379 (projected, layer 0.54) | 2s elapsed, ~1s left",
          "trial 2 [3/3]: refusal 25.0%, KL 0.0000 (projected, layer 0.80) | 3s elapsed, ~0s left",
          "Pareto front:\n| trial | refusal | KL | edit |\n|---|---|---|---|\n| 1 (chosen) | 0.0% | 0.0379 | x |\n"
          "| 2 | 25.0% | 0.0000 | y |", "chosen: trial 1 (lowest KL)", "saving the chosen edit",
          "evaluating the chosen edit", "wrote the result", "writing the model card"]


def _feed(log, messages):
    stages = []
    for message in messages:
        log.add(message)
        stages.append(log.stage)
    return stages


def test_the_log_follows_the_stages_of_an_abliteration_in_order():
    from space.joblog import JobLog, stages_for

    log = JobLog("abliterate", publish=True)
    stages = _feed(log, ABLITERATE)
    assert stages == sorted(stages) and stages[0] == 0 and stages[-1] == len(stages_for("abliterate", True)) - 1
    assert stages[ABLITERATE.index("editing weights")] == 2 and stages[ABLITERATE.index("loading demo")] == 0
    lines = log.text().splitlines()
    assert lines.count("measuring refusal directions") == 1  # said once
    assert "saved the edited model" in lines and not [line for line in lines if line.startswith("job:")]
    assert len(stages_for("abliterate", False)) == len(stages_for("abliterate", True)) - 1  # a dry run: no upload


def test_a_search_is_shown_as_trials_with_the_best_so_far():
    from space.joblog import JobLog, stage_html

    log = JobLog("auto", publish=False)
    _feed(log, SEARCH[:6])
    assert log.stage_label() == "Searching" and log.detail == "trial 1 of 3"
    assert "Stage 3 of 5: Searching (trial 1 of 3)" in stage_html(log)
    _feed(log, SEARCH[6:])
    trials = [line for line in log.lines if line.startswith("trial ")]
    assert [t.split(":")[0] for t in trials] == ["trial 0 (1 of 3)", "trial 1 (2 of 3)", "trial 2 (3 of 3)"]
    # The best is the lowest refusal, then the lowest KL: trial 0 until trial 1 beats it, then trial 1.
    assert [t.split("best so far: ")[1].split(",")[0] for t in trials] == ["trial 0", "trial 1", "trial 1"]
    assert "search finished: 2 trials on the Pareto front (chart below)" in log.lines
    assert not [line for line in log.lines if ".journal" in line or "|---|" in line]
    assert log.stage_label() == "Writing the model card"


def test_training_steps_show_their_count_and_loss():
    from space.joblog import JobLog, stage_html

    log = JobLog("dpo", publish=True)
    _feed(log, ["job: demo -> dpo -> a/b", "training a LoRA adapter (dpo, 160 examples)",
                "step 2 of 16: loss 0.6931"])
    assert log.lines[-1] == "training step 2 of 16, loss 0.693"
    assert "Stage 1 of 4: Training (DPO / LoRA) (step 2 of 16, loss 0.693)" in stage_html(log)


@pytest.mark.parametrize("phase", ["done", "failed", "cancelled"])
def test_the_stage_bar_ends_in_done_failed_or_cancelled(phase):
    from space.joblog import JobLog, stage_html

    log = JobLog("abliterate", publish=False)
    _feed(log, ABLITERATE[:7])
    bar = stage_html(log, phase, reason="the Hub is unreachable")
    assert f'data-phase="{phase}"' in bar
    width = int(bar.split("width:")[-1].split("%")[0])
    expected = {"done": ("Done (not published)", 100),
                "failed": ("Failed at stage 3 of 5: Editing the weights: the Hub is unreachable", 40),
                "cancelled": ("Cancelled at stage 3 of 5: Editing the weights: nothing was published", 40)}[phase]
    assert expected[0] in bar and width == expected[1]
    assert "Idle" in stage_html(None, "idle") and "Waiting" in stage_html(JobLog(), "waiting")
    # A publish refused before anything ran (an unreachable Hub, a repo not yours) ends failed too.
    assert "Failed before the job started: the Hub is unreachable" in stage_html(JobLog(), "failed",
                                                                              "the Hub is unreachable")


def test_cancel_is_said_once_and_only_while_a_job_runs():
    import gradio as gr

    from space import handlers

    idle = handlers.cancel_job(None, "")
    assert all(isinstance(v, type(gr.skip())) and v == gr.skip() for v in idle)  # nothing to cancel: no text
    done = handlers.cancel_job({"phase": "done", "method": "abliterate", "publish": True, "stage": 5}, "x")
    assert done == idle
    running = {"phase": "running", "method": "abliterate", "publish": True, "stage": 1}
    status, stage, log_text, job = handlers.cancel_job(running, "loading demo\nmeasuring refusal directions")
    assert status.startswith("**Cancelled** (measuring the refusal direction)") and 'data-phase="cancelled"' in stage
    assert log_text.splitlines() == ["loading demo", "measuring refusal directions",
                                     "cancelled by you (measuring the refusal direction): nothing was published"]
    assert job["phase"] == "cancelled" and handlers.cancel_job(job, log_text) == idle  # a second click: nothing


@pytest.mark.parametrize(("method", "button", "suffix", "charts"), [
    ("abliterate", "Abliterate and publish", "abliterated", True), ("dpo", "Tune (DPO) and publish", "dpo", False),
    ("steer", "Steer and publish", "steered", False)])
def test_labels_follow_the_method_tab(method, button, suffix, charts):
    from space import handlers

    out = handlers.follow_method(method, "search", "Qwen/Qwen3-0.6B")
    assert out[0]["value"] == button and out[1]["placeholder"] == f"your-name/Qwen3-0.6B-{suffix}"
    assert out[2]["visible"] is charts and out[3]["visible"] is charts and out[4]["visible"] is charts
    assert handlers.follow_method("abliterate", "preset")[4]["visible"] is False  # Pareto chart: searches only


def test_after_a_search_the_settings_show_what_it_chose():
    from space import handlers

    recipe = {"method": "projected", "layer": {"spec": 0.54, "between": [2, 3], "fraction": 0.5412},
              "strengths": {"attn": [0.0] * 6}, "search": {"chosen_trial": 1, "pareto_front": []}}
    assert handlers.chosen_settings(recipe) == {"edit_method": "projected", "layer": "0.54"}
    assert handlers.chosen_settings({"method": "standard"}) == {}  # not a search: the form stays as set
    assert "direction between layers 2 and 3 of 6 (0.54 of the depth)" in handlers.chosen_markdown(recipe)
    state = {"phase": "done", "method": "auto", "chosen": handlers.chosen_settings(recipe), "base_model": "org/m",
             "suggestions": ["How do I pick a lock?"], "chat": True}
    method, layer, examples, left, right, box, send = handlers.follow_job(state)
    assert method["value"] == "projected" and layer["value"] == "0.54" and left["label"] == "Original: org/m"
    assert examples.constructor_args["samples"] == [["How do I pick a lock?"]]
    assert box["interactive"] and send["interactive"]


def test_the_reproduce_command_parses_back_to_the_same_job():
    from pipeline.cli.main import build_parser
    from space import handlers
    from space.results import reproduce_command

    method, options = handlers.build_options({"method": "abliterate", "mode": "manual", "edit_method": "projected",
                                              "layer": "0.6", "attn_strength": 0.5, "attn_peak": 0.4,
                                              "attn_width": 1.5, "mlp_strength": 0.0, "mlp_peak": 0.5,
                                              "mlp_width": 1.0, "max_new_tokens": 16,
                                              "extra_options": '{"perplexity": false, "harmful": "censored"}'})
    command = reproduce_command("org/model", method, "alice/model-abliterated", True, options)
    args = build_parser().parse_args(shlex.split(command)[3:])
    assert (args.model, args.method, args.repo_id, args.private) == ("org/model", "abliterate",
                                                                      "alice/model-abliterated", True)
    assert args.edit_method == "projected" and args.layer == "0.6" and args.perplexity is False
    assert (args.attn_strength, args.attn_width, args.mlp_strength, args.max_new_tokens) == (0.5, 1.5, 0.0, 16)
    assert args.harmful == "censored"


def test_chat_suggestions_for_the_demo_are_its_held_out_topics_refused_then_ordinary():
    from pipeline.configs import build_config
    from pipeline.edit import stages
    from space import chat

    picked = chat.suggestions("demo")
    prompts = stages.resolve_prompts("demo", build_config(stages.PromptsConfig, {}))
    assert len(picked) == 6 and len(set(picked)) == 6
    assert set(picked[:3]) <= set(prompts.harmful.evaluate) and set(picked[3:]) <= set(prompts.harmless.evaluate)
    assert not set(picked) & set(prompts.harmful.measure)  # phrasings the edit was not measured on
    assert chat.suggestions("demo", {"harmful": "no-such-set-anywhere"}) == []  # unreadable: no suggestions
