"""One Space job: run `pipeline.run.run_job` in its own temporary folder, on a worker thread.

The UI consumes `JobRunner.events()`: log lines as they come, then the result. Every job
holds `HEAVY` while it runs, so even a job whose page was cancelled (its worker stops at the
next stage boundary) never overlaps the next one. Cancelling raises `Cancelled` inside the
worker at its next progress message; publishing is the last step, so a job cancelled before
it publishes nothing. The working folder is a `tempfile.TemporaryDirectory`, removed when the
job ends however it ends. The user's token lives only in the request object (never in its
repr), is passed to `run_job` (which reads the Hub with it, or anonymously without one) and is
scrubbed from every log line. A Hub model's size is checked against space/limits.py before
anything is downloaded; afterwards a private model leaves the download cache.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import AuthError, UserError
from pipeline.push import scrub
from pipeline.sources import is_hub_id
from space import auth, limits

log = logging.getLogger(__name__)

HEAVY = threading.Lock()  # one job (or chat generation) on the hardware at a time
WORK_PREFIX = "abliterator-job-"
CHARTS = ("directions.png", "strengths.png", "pareto.png")
STAGES = (
    ("load", "Loading the model", ("loading ",)),
    ("measure", "Measuring refusal directions", ("measuring", "reusing directions", "direction")),
    ("edit", "Editing / training", ("editing", "training", "search", "trial", "saving the chosen", "wrote ")),
    ("evaluate", "Evaluating", ("evaluating",)),
    ("card", "Writing the model card", ("writing the model card",)),
    ("push", "Publishing", ("publishing", "uploading")),
)


class Cancelled(BaseException):  # noqa: N818 - like KeyboardInterrupt: not caught by `except Exception`
    """The user cancelled the job."""


@dataclass(frozen=True)
class JobRequest:
    model_id: str
    repo_id: str | None
    method: str = "abliterate"
    private: bool = False
    publish: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    token: str | None = field(default=None, repr=False)


@dataclass
class JobResult:
    eval: dict[str, Any]
    url: str | None
    repo_id: str | None
    card: str
    charts: dict[str, bytes]
    chat_key: str | None = None


def stage_of(message: str) -> int | None:
    """Index in STAGES of the stage a progress message belongs to (None: no stage change)."""
    text = message.strip().lower()
    if text.startswith("published"):
        return len(STAGES)
    for i, (_, _, keys) in enumerate(STAGES):
        if text.startswith(keys):
            return i
    return None


def check_publish(request: JobRequest) -> None:
    """Refuse publishing without a token, before anything runs."""
    if request.publish and not request.token:
        raise AuthError(
            "Sign in with Hugging Face (or paste a write token) to publish; "
            "or use \"Run without publishing\" to try the edit first."
        )


def resolve_repo(request: JobRequest) -> JobRequest:
    """Fill in the default repo and check the user may write there (fails fast, before the long job)."""
    from huggingface_hub import HfApi

    from pipeline.push import check_namespace, check_repo_id, hub_error, writable_namespaces

    if not request.publish:
        return request
    try:
        user, allowed = writable_namespaces(HfApi(token=request.token))
    except Exception as err:  # noqa: BLE001 - any Hub failure becomes one line
        raise hub_error(err, "checking the token", request.token) from None
    repo_id = (request.repo_id or "").strip() or auth.default_repo(user, request.model_id, request.method)
    check_repo_id(repo_id)
    check_namespace(repo_id, user, allowed)
    return JobRequest(request.model_id, repo_id, request.method, request.private, True, request.options,
                      request.token)


def _run_job_module():
    from pipeline import run

    return run


def _collect(out: Path, summary: dict[str, Any]) -> JobResult:
    charts = {name: (out / name).read_bytes() for name in CHARTS if (out / name).is_file()}
    card = (out / "README.md").read_text(encoding="utf-8") if (out / "README.md").is_file() else ""
    return JobResult(summary["eval"], summary.get("url"), summary.get("repo_id"), card, charts)


def _check_size(request: JobRequest, progress: Callable[[str], None], caps: limits.Limits) -> Any:
    """The Hub's metadata of a Hub model, read as this user, after checking it against the caps (else None)."""
    if not is_hub_id(request.model_id):
        return None
    progress(f"checking the size of {request.model_id} on the Hub")
    return limits.check_model_size(request.model_id, request.options.get("revision"), request.token or False, caps)


def _clean_cache(request: JobRequest, info: Any, caps: limits.Limits) -> None:
    """After a job: drop a private or gated model from the download cache, keep the cache bounded."""
    try:
        if info is not None and (info.private or info.gated):
            limits.forget(request.model_id)
        limits.prune_hub_cache(caps.cache_bytes)
    except Exception as err:  # noqa: BLE001 - the job's outcome stands; the operator sees the warning
        log.warning("could not prune the Hub cache: %s", type(err).__name__)


def _make_job(request: JobRequest, tmp: str) -> Any:
    from pydantic import ValidationError

    run = _run_job_module()
    try:
        return run.RunJob(model=request.model_id.strip(), repo_id=request.repo_id, method=request.method,
                          out=Path(tmp) / auth.model_name(request.model_id), private=request.private,
                          push=request.publish, options=request.options)
    except ValidationError as err:
        first = err.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        raise UserError(f"{'.'.join(map(str, first['loc']))}: {message}") from None


def run_isolated(request: JobRequest, say: Callable[[str], None], cancel: threading.Event,
                 keep_for_chat: Callable[[Path, str], str | None] | None = None) -> JobResult:
    """Run one job in a fresh temporary folder (removed afterwards); `say` gets scrubbed log lines.

    Every Hub read of the job uses the user's token, or none (anonymous): never the machine's.
    """
    from pipeline.hub_token import reading_as

    def progress(message: str) -> None:
        if cancel.is_set():
            raise Cancelled
        say(scrub(str(message), request.token))

    if not HEAVY.acquire(blocking=False):
        say("waiting for the previous job to stop")
        HEAVY.acquire()
    caps, info = limits.Limits.from_env(), None
    read_token: str | bool = request.token or False
    try:
        request = resolve_repo(request)
        target = request.repo_id if request.publish else "not published"
        progress(f"job: {request.model_id} -> {request.method} -> {target}")
        info = _check_size(request, progress, caps)
        with tempfile.TemporaryDirectory(prefix=WORK_PREFIX) as tmp:
            progress(f"working folder: {tmp}")
            job = _make_job(request, tmp)
            summary = _run_job_module().run_job(job, progress, read_token)
            result = _collect(job.output_dir(), summary)
            if keep_for_chat is not None and not cancel.is_set():
                say("loading the original and the edited model for the chat")
                try:
                    with reading_as(read_token):
                        result.chat_key = keep_for_chat(job.output_dir(), request.model_id)
                except Exception as err:  # noqa: BLE001 - the job itself succeeded; only the chat is missing
                    say(scrub(f"the chat is unavailable: {type(err).__name__}: {err}", request.token))
        return result
    finally:
        _clean_cache(request, info, caps)
        HEAVY.release()


class JobRunner:
    """A job on a daemon thread; `events()` yields ("log", line) then ("result", JobResult)."""

    def __init__(self, request: JobRequest, keep_for_chat: Callable[[Path, str], str | None] | None = None) -> None:
        self.request = request
        self.keep_for_chat = keep_for_chat
        self.cancel_event = threading.Event()
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="abliterator-job", daemon=True)

    def _work(self) -> None:
        log.info("job started: %s -> %s (%s)", self.request.model_id, self.request.repo_id or "-", self.request.method)
        try:
            result = run_isolated(self.request, lambda line: self._queue.put(("log", line)), self.cancel_event,
                                  self.keep_for_chat)
            self._queue.put(("result", result))
        except Cancelled:
            self._queue.put(("cancelled", None))
        except UserError as err:
            self._queue.put(("error", err))
        except ImportError as err:
            self._queue.put(("error", UserError(f"{self.request.method} is not available in this build ({err})")))
        except Exception as err:  # noqa: BLE001 - reported as one line, logged for the operator
            log.error("job failed: %s: %s", type(err).__name__, scrub(str(err), self.request.token))
            detail = scrub(str(err), self.request.token)
            self._queue.put(("error", UserError(f"unexpected error ({type(err).__name__}): {detail}")))

    def start(self) -> JobRunner:
        check_publish(self.request)
        self._thread.start()
        return self

    def cancel(self) -> None:
        self.cancel_event.set()

    def events(self, poll_s: float = 0.25) -> Iterator[tuple[str, Any]]:
        """Log lines as they come, then the outcome: ("result", JobResult); errors are raised as UserError."""
        while True:
            try:
                kind, value = self._queue.get(timeout=poll_s)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise UserError("the job stopped without a result") from None
                yield "tick", None
                continue
            if kind == "error":
                raise value
            if kind == "cancelled":
                raise UserError("cancelled: nothing was published")
            yield kind, value
            if kind == "result":
                return
