"""Build the demo model in the background when the Space starts, so the first job does not wait for it."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


def _build() -> None:
    from pipeline.demo import demo_path

    try:
        demo_path()
    except Exception as err:  # noqa: BLE001 - the first job will build it (and report the error) instead
        log.warning("could not prepare the demo model: %s", err)


def warm_demo_model() -> threading.Thread:
    """Start building (or finding in the cache) the demo model on a daemon thread."""
    thread = threading.Thread(target=_build, name="demo-warmup", daemon=True)
    thread.start()
    return thread
