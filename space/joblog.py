"""A job as the page shows it: readable log lines, the stage it is in, and how it ended.

The pipeline reports progress as short messages ("loading demo", "trial 3 [4/20]: refusal ..."). `JobLog`
turns them into one readable line each (no repeats, no server paths, search trials as "trial 4 of 20"
with the best so far, training steps with their loss) and follows the stages of the job's method.
`stage_html` draws the stage bar for every phase a job can be in: waiting, running, done, failed or
cancelled; a job always ends in one of the last three.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

# Per method: (label, message prefixes that start the stage). A stage only ever moves forward.
_FIRST = ("job:", "checking the size", "waiting for the previous job")
_CARD = ("Writing the model card", ("writing the model card",))
_PUBLISH = ("Publishing", ("publishing", "uploading"))
STAGES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "abliterate": (
        ("Loading the model", (*_FIRST, "loading")),
        ("Measuring the refusal direction", ("measuring", "reusing directions", "choosing the layer")),
        ("Editing the weights", ("editing",)),
        ("Evaluating", ("evaluating",)),
        _CARD, _PUBLISH,
    ),
    "auto": (
        ("Loading the model", (*_FIRST, "loading")),
        ("Measuring directions and the base model", ("measuring", "choosing the layer", "evaluating the base")),
        ("Searching", ("search", "trial")),
        ("Evaluating the chosen edit", ("saving the chosen", "evaluating the chosen", "confirming")),
        _CARD, _PUBLISH,
    ),
    "dpo": (
        ("Training (DPO / LoRA)", (*_FIRST, "training", "step ", "trained")),
        ("Evaluating", ("evaluating",)),
        _CARD, _PUBLISH,
    ),
    "steer": (
        ("Training the steering pair (LoRA)", (*_FIRST, "fine-tuning", "step ", "using the steering vector")),
        ("Evaluating", ("evaluating",)),
        _CARD, _PUBLISH,
    ),
}
_JOURNAL = re.compile(r" in [^;]*\.journal;")
_TRIAL = re.compile(r"^trial (\d+) \[(\d+)/(\d+)\]: refusal ([\d.]+)%, KL ([\d.]+)(.*)$", re.DOTALL)
_STEP = re.compile(r"^step (\d+) of (-?\d+): loss ([\d.]+)")
_FRONT_ROW = re.compile(r"\|\s*\d+(?: \(chosen\))?\s*\|")
_COLORS = {"running": "var(--color-accent,#f97316)", "done": "#16a34a", "failed": "#dc2626", "cancelled": "#6b7280"}


def stages_for(method: str, publish: bool) -> list[str]:
    """The stage labels of a job (without publishing for a dry run)."""
    labels = [label for label, _ in STAGES.get(method, STAGES["abliterate"])]
    return labels if publish else labels[:-1]


@dataclass
class JobLog:
    """The readable log of one job and the stage it reached."""

    method: str = "abliterate"
    publish: bool = True
    lines: list[str] = field(default_factory=list)
    stage: int = -1
    detail: str = ""  # e.g. "trial 4 of 20" or "step 8 of 16, loss 0.61"
    _last: str = ""
    _best: tuple[float, float, int] | None = None

    @property
    def labels(self) -> list[str]:
        return stages_for(self.method, self.publish)

    def stage_label(self) -> str:
        return self.labels[self.stage] if 0 <= self.stage < len(self.labels) else "Starting"

    def add(self, message: str) -> bool:
        """Record one pipeline message; True when the stage (or its detail) changed."""
        message = str(message).strip()
        if not message or message == self._last:
            return False
        self._last = message
        before = (self.stage, self.detail)
        self._follow_stage(message)
        line = self._readable(message)
        if line:
            self.lines.append(line)
        return (self.stage, self.detail) != before

    def note(self, line: str) -> None:
        self.lines.append(line)

    def text(self) -> str:
        return "\n".join(self.lines)

    def _follow_stage(self, message: str) -> None:
        low = message.lower()
        for i, (_, keys) in enumerate(STAGES.get(self.method, STAGES["abliterate"])):
            if i > self.stage and i < len(self.labels) and low.startswith(keys):
                self.stage, self.detail = i, ""

    def _readable(self, message: str) -> str | None:
        if message.startswith("job: "):
            return None  # said in the status line
        if message.lower().startswith("pareto front"):
            rows = len(_FRONT_ROW.findall(message))
            return f"search finished: {rows} trial{'s' * (rows != 1)} on the Pareto front (chart below)"
        trial = _TRIAL.match(message)
        if trial:
            return self._trial_line(*trial.groups())
        step = _STEP.match(message)
        if step:
            done, total, loss = step.groups()
            self.detail = f"step {done} of {total}, loss {float(loss):.3f}" if int(total) > 0 else f"step {done}"
            return f"training {self.detail}"
        if message.startswith("search:"):
            return _JOURNAL.sub(";", message)  # the study file is the server's
        if message.startswith("wrote the result"):
            return "saved the edited model" + message.removeprefix("wrote the result")
        return " ".join(message.split()) if "\n" in message else message

    def _trial_line(self, number: str, i: str, total: str, refusal: str, kl: str, rest: str) -> str:
        self.detail = f"trial {i} of {total}"
        edit, _, tail = rest.strip().partition("|")
        # The trial's own number (as in the chart and the card), then how far the search is.
        line = f"trial {number} ({i} of {total}): refusal {refusal}%, KL {float(kl):.4f} {edit.strip()}".rstrip()
        if "best so far" in tail:  # the search reports its own best (by its choosing rule)
            best = tail.split("|")[0].strip()
        else:
            score = (float(refusal), float(kl), int(number))
            self._best = min(self._best or score, score)
            best = f"best so far: trial {self._best[2]}, refusal {self._best[0]:.1f}%, KL {self._best[1]:.4f}"
        return f"{line} · {best}"


def stage_html(log: JobLog | None, phase: str = "running", reason: str = "") -> str:
    """The stage bar. phase: idle, waiting, running, done, failed or cancelled."""
    if log is None or phase == "idle":
        label, done, total = "Idle: no job has run yet", 0, 1
    else:
        total = len(log.labels)
        where = "before the job started"
        if log.stage >= 0:
            where = f"at stage {log.stage + 1} of {total}: {log.stage_label()}"
        if phase == "waiting" or (phase == "running" and log.stage < 0):
            label, done = "Waiting for a free slot", 0
        elif phase == "running":
            detail = f" ({log.detail})" if log.detail else ""
            label, done = f"Stage {log.stage + 1} of {total}: {log.stage_label()}{detail}", log.stage
        elif phase == "done":
            label, done = "Done" + ("" if log.publish else " (not published)"), total
        elif phase == "failed":
            label, done = f"Failed {where}: {reason}", max(log.stage, 0)
        else:
            label, done = f"Cancelled {where}: nothing was published", max(log.stage, 0)
    width = round(100 * done / max(total, 1))
    color = _COLORS.get(phase, _COLORS["running"])
    track = "background:var(--neutral-200,#e5e7eb);border-radius:4px;height:10px;overflow:hidden"
    fill = f"background:{color};height:10px;width:{width}%;transition:width .4s"
    return (f'<div class="job-stage" data-phase="{phase}"><div style="margin-bottom:4px;color:'
            f'{color if phase in ("failed", "cancelled", "done") else "inherit"}">{html.escape(label)}</div>'
            f'<div style="{track}"><div style="{fill}"></div></div></div>')
