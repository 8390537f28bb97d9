"""Side-by-side chat with the original and the edited model.

The original and the edited model of a job are loaded while the job runs (the edited one from
its working folder before the folder is removed, the original with that user's Hub token) and
kept in memory under a random key; the page holds only the key. The chat answers with those
two models only, never with a model named by the caller. The cache keeps few jobs, so memory
stays bounded however many users come.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

CHAT_TOKENS = int(os.environ.get("ABLITERATOR_CHAT_TOKENS") or 96)


class ModelCache:
    """A small LRU of loaded models (pipeline.io.loading.Loaded) by key."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# key -> (original, edited) of one job; the page holds only the key.
JOBS = ModelCache(int(os.environ.get("ABLITERATOR_CHAT_KEEP") or 2))


def keep_edited(folder: Path, base_model: str) -> str:
    """Load a job's edited model (in `folder`) and its original for the chat; returns their key.

    Called inside the job, so the original is read from the Hub with that user's token; the chat
    never loads a model by a name the caller gives.
    """
    from pipeline.io.loading import load_model

    key = uuid.uuid4().hex
    JOBS.put(key, (load_model(base_model), load_model(str(folder))))
    return key


def suggestions(model_id: str, options: dict[str, Any] | None = None, count: int = 3) -> list[str]:
    """Prompts worth asking both models: the job's held-out evaluation prompts, harmful then harmless
    (for `demo`, questions on its refused and its ordinary topics, in phrasings it was not trained on).
    Empty when the prompts cannot be read (the chat still works)."""
    from pipeline.configs import build_config
    from pipeline.edit import stages

    try:
        prompts = stages.resolve_prompts(model_id, build_config(stages.PromptsConfig, options or {}))
    except Exception:  # noqa: BLE001 - suggestions are a convenience, never a reason to fail
        return []
    picked: list[str] = []
    for part in (prompts.harmful.evaluate, prompts.harmless.evaluate):
        step = max(1, len(part) // count)  # spread over the set: neighbours often share a topic
        picked += [str(p) for p in part[::step][:count]]
    return picked


def answer(loaded: Any, prompt: str, max_new_tokens: int | None = None) -> str:
    from pipeline.evaluation.evaluate import generate
    from space.limits import Limits

    tokens = min(max_new_tokens or CHAT_TOKENS, Limits.from_env().max_new_tokens)
    return generate(loaded.model, loaded.tokenizer, [prompt], tokens, 1)[0].strip()


def replies(prompt: str, chat_key: str | None) -> tuple[str, str]:
    """(original's answer, edited model's answer) to one prompt, from the job behind `chat_key`."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise UserError("type a message first")
    pair = JOBS.get(chat_key) if chat_key else None
    if pair is None:
        raise UserError("no edited model to chat with: run a job first (the chat keeps the last few results)")
    original, edited = pair
    return answer(original, prompt), answer(edited, prompt)
