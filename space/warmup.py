"""Space start-up: heavy imports on the main thread, then the demo model found or built in the background.

Two threads importing transformers for the first time at once can fail ("cannot import name
'AutoModelForCausalLM' from 'transformers'"): its lazy module is not safe to resolve from two threads.
`preload()` resolves every name the jobs use on the calling (main) thread before any worker exists.
"""

from __future__ import annotations

import importlib
import logging
import threading

log = logging.getLogger(__name__)

# What the jobs reach for, resolved before any worker thread starts.
TRANSFORMERS_NAMES = (
    "AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "GenerationConfig", "GgufConfig",
    "PreTrainedTokenizerFast",
)
PIPELINE_MODULES = (
    "pipeline.orchestrator.run",
    "pipeline.evaluation.evaluate",
    "pipeline.edit.directions",
    "pipeline.edit.selection",
    "pipeline.io.gguf",
    "pipeline.publish.card",
    "pipeline.publish.push",
    "pipeline.io.demo",
)


def preload() -> None:
    """Import the heavy libraries and our stages on this thread."""
    import transformers

    for name in TRANSFORMERS_NAMES:
        getattr(transformers, name)
    for module in PIPELINE_MODULES:
        importlib.import_module(module)


def _build() -> None:
    from pipeline.io.demo import demo_path

    try:
        demo_path()
    except Exception as err:  # noqa: BLE001 - the first job will build it (and report the error) instead
        log.warning("could not prepare the demo model: %s", err)


def warm_demo_model() -> threading.Thread:
    """Preload on this thread, then find (or build) the demo model on a daemon thread."""
    preload()
    thread = threading.Thread(target=_build, name="demo-warmup", daemon=True)
    thread.start()
    return thread
