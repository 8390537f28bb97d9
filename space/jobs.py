"""One Space job: run `pipeline.orchestrator.run.run_job` in its own temporary folder, on a worker thread.

The UI consumes `JobRunner.events()`: log lines as they come, then the outcome (a result, a
failure in one line, or a cancellation). Every job
holds `HEAVY` while it runs, so even a job whose page was cancelled (its worker stops at the
next stage boundary) never overlaps the next one. Cancelling raises `Cancelled` inside the
worker at its next progress message; publishing is the last step, so a job cancelled before
it publishes nothing. The working folder is a `tempfile.TemporaryDirectory`, removed when the
job ends however it ends. The user's token lives only in the request object (never in its
repr), is passed to `run_job` (which reads the Hub with it, or anonymously without one) and is
scrubbed from every log line, like the job's server folder. A dry run keeps its result as a zip
(space/results.py) for the user to download. A Hub model's size is checked against space/limits.py before
anything is downloaded; afterwards a private model leaves the download cache.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import AuthError, UserError
from pipeline.io.output import RECORDED_COMMAND
from pipeline.io.sources import is_hub_id
from pipeline.publish.push import scrub
from space import auth, chat, limits, results

log = logging.getLogger(__name__)

HEAVY = threading.Lock()  # one job (or chat generation) on the hardware at a time
WORK_PREFIX = "abliterator-job-"
CHARTS = ("directions.png", "strengths.png", "pareto.png")


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
    kept: str | None = None  # this session's last dry-run zip: reused by a publish with the same settings


@dataclass
class JobResult:
    eval: dict[str, Any]
    url: str | None
    repo_id: str | None
    card: str
    charts: dict[str, bytes]
    chat_key: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    download: str | None = None  # a dry run's result as a zip
    base_model: str = ""
    suggestions: list[str] = field(default_factory=list)  # the job's own evaluation prompts, for the chat


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

    from pipeline.publish.push import check_namespace, check_repo_id, hub_error, writable_namespaces

    if not request.publish:
        return _dry_run_target(request)
    try:
        user, allowed = writable_namespaces(HfApi(token=request.token))
    except Exception as err:  # noqa: BLE001 - any Hub failure becomes one line
        raise hub_error(err, "checking the token", request.token) from None
    repo_id = (request.repo_id or "").strip() or auth.default_repo(user, request.model_id, request.method)
    check_repo_id(repo_id)
    check_namespace(repo_id, user, allowed)
    return dataclasses.replace(request, repo_id=repo_id)


def _dry_run_target(request: JobRequest) -> JobRequest:
    """The repo a dry run's card names: the one given, else the user's default, else a placeholder."""
    from pipeline.publish.push import check_repo_id

    repo_id = (request.repo_id or "").strip()
    try:
        check_repo_id(repo_id)
    except UserError:
        user = auth.user_name(request.token) if request.token else None
        repo_id = auth.default_repo(user or "your-name", request.model_id, request.method)
    return dataclasses.replace(request, repo_id=repo_id)


@contextmanager
def recorded_command(command: str) -> Iterator[None]:
    """Record `command` as the job's command line (the recipe and the card's "How to reproduce it")."""
    token = RECORDED_COMMAND.set(command)
    try:
        yield
    finally:
        RECORDED_COMMAND.reset(token)


def _run_job_module():
    from pipeline.orchestrator import run

    return run


def _collect(out: Path, summary: dict[str, Any]) -> JobResult:
    from pipeline.io.output import RECIPE_FILE, read_json

    charts = {name: (out / name).read_bytes() for name in CHARTS if (out / name).is_file()}
    card = (out / "README.md").read_text(encoding="utf-8") if (out / "README.md").is_file() else ""
    recipe = read_json(out / RECIPE_FILE) if (out / RECIPE_FILE).is_file() else {}
    return JobResult(summary["eval"], summary.get("url"), summary.get("repo_id"), card, charts,
                     recipe=recipe)


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
    from pipeline.io.hub_token import reading_as

    folders: list[tuple[str, str]] = []  # (server path, what the log says instead), longest first

    def progress(message: str) -> None:
        if cancel.is_set():
            raise Cancelled
        text = scrub(str(message), request.token)
        for path, name in folders:
            text = text.replace(path, name)
        say(text)

    if not HEAVY.acquire(blocking=False):
        say("waiting for the previous job to stop")
        HEAVY.acquire()
    caps, info = limits.Limits.from_env(), None
    read_token: str | bool = request.token or False
    try:
        request = resolve_repo(request)
        target = request.repo_id if request.publish else f"not published (card written for {request.repo_id})"
        progress(f"job: {request.model_id} -> {request.method} -> {target}")
        info = _check_size(request, progress, caps)
        with tempfile.TemporaryDirectory(prefix=WORK_PREFIX) as tmp:
            job = _make_job(request, tmp)
            folders[:] = [(str(job.output_dir()), "the result"), (tmp, "the job folder")]
            command = results.reproduce_command(request.model_id, request.method, request.repo_id,
                                                request.private, request.options)
            if request.publish and request.kept and results.unpack(request.kept, job.output_dir(), command):
                say("found the result of your dry run: it is published if the settings are the same")
            with recorded_command(command):
                summary = _run_job_module().run_job(job, progress, read_token)
            result = _collect(job.output_dir(), summary)
            result.base_model = request.model_id
            with reading_as(read_token):
                result.suggestions = chat.suggestions(request.model_id, request.options)
            if not request.publish:
                say("packing the result for download")
                result.download = str(results.pack(job.output_dir(), request.repo_id.split("/")[-1]))
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
            self._queue.put(("failed", scrub(str(err), self.request.token)))
        except ImportError as err:
            self._queue.put(("failed", f"{self.request.method} is not available in this build ({err})"))
        except Exception as err:  # noqa: BLE001 - reported as one line, logged for the operator
            log.error("job failed: %s: %s", type(err).__name__, scrub(str(err), self.request.token))
            detail = scrub(str(err), self.request.token)
            self._queue.put(("failed", f"unexpected error ({type(err).__name__}): {detail}"))

    def start(self) -> JobRunner:
        check_publish(self.request)
        self._thread.start()
        return self

    def cancel(self) -> None:
        self.cancel_event.set()

    def events(self, poll_s: float = 0.25) -> Iterator[tuple[str, Any]]:
        """("log", line) as they come, ("tick", None) while quiet, then the outcome: ("result", JobResult),
        ("failed", one-line reason) or ("cancelled", None)."""
        while True:
            try:
                kind, value = self._queue.get(timeout=poll_s)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    yield "failed", "the job stopped without a result"
                    return
                yield "tick", None
                continue
            yield kind, value
            if kind != "log":
                return
