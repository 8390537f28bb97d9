"""Progress reporting shared by the stages: a callback from the UI or CLI, else the log."""

from __future__ import annotations

import logging
from collections.abc import Callable

Progress = Callable[[str], None]

log = logging.getLogger("pipeline")


def say(progress: Progress | None, message: str) -> None:
    (progress or log.info)(message)
