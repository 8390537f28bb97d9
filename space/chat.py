"""Side-by-side chat with the original and the edited model.

The edited model of a job is loaded from its working folder before the folder is removed and
kept in memory under a random key (the page holds only the key); the original is loaded on
first use. Both caches keep few models, so memory stays bounded however many users come.
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
    """A small LRU of loaded models (pipeline.loading.Loaded) by key."""

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


EDITED = ModelCache(int(os.environ.get("ABLITERATOR_CHAT_KEEP") or 2))
ORIGINAL = ModelCache(1)


def keep_edited(folder: Path) -> str:
    """Load the edited model in `folder` for the chat; returns its key."""
    from pipeline.loading import load_model

    key = uuid.uuid4().hex
    EDITED.put(key, load_model(str(folder)))
    return key


def original(model_id: str) -> Any:
    from pipeline.loading import load_model

    model_id = (model_id or "").strip()
    loaded = ORIGINAL.get(model_id)
    if loaded is None:
        loaded = load_model(model_id)
        ORIGINAL.put(model_id, loaded)
    return loaded


def answer(loaded: Any, prompt: str, max_new_tokens: int = CHAT_TOKENS) -> str:
    from pipeline.evaluate import generate

    return generate(loaded.model, loaded.tokenizer, [prompt], max_new_tokens, 1)[0].strip()


def replies(prompt: str, model_id: str, edited_key: str | None) -> tuple[str, str]:
    """(original's answer, edited model's answer) to one prompt."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise UserError("type a message first")
    edited = EDITED.get(edited_key) if edited_key else None
    if edited is None:
        raise UserError("no edited model to chat with: run a job first (the chat keeps the last few results)")
    return answer(original(model_id), prompt), answer(edited, prompt)
