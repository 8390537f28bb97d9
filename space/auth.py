"""Who the user is and which token a job may use.

On a Space (``SYSTEM=spaces``) the only token is the signed-in user's OAuth token: the
Space's own ``HF_TOKEN`` belongs to its owner and is never used for a user's job. Locally,
the token comes from the token field, else, when the app listens on loopback only, from
``HF_TOKEN`` or the saved login (bound to 0.0.0.0, every visitor would get it). Tokens are
passed to the job that needs them and kept nowhere else.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any

from space import policy

log = logging.getLogger(__name__)

SUFFIXES = {"abliterate": "abliterated", "auto": "abliterated", "dpo": "dpo", "steer": "steered"}
SUGGEST_TIMEOUT_S = 3.0
_SAFE = re.compile(r"[^\w.-]+")
_REACHABLE: list = [False, -1e9]  # [answered, when]


def on_spaces() -> bool:
    """True when running on a Hugging Face Space (the Hub sets SYSTEM=spaces)."""
    return policy.on_spaces()


def _token_value(oauth_token: Any) -> str | None:
    value = getattr(oauth_token, "token", oauth_token)
    return value.strip() if isinstance(value, str) and value.strip() else None


def resolve_token(oauth_token: Any = None, field_token: str | None = None) -> str | None:
    """The token for this user's job: OAuth, else the token field, else HF_TOKEN/login of the machine, but
    only for an app bound to loopback: then the visitor is the machine's own user. On a Space or on
    0.0.0.0 any visitor could use that token."""
    token = _token_value(oauth_token) or _token_value(field_token)
    if token or policy.public():
        return token
    from huggingface_hub import get_token

    return get_token() or None


def user_name(token: str | None) -> str | None:
    """The Hub user name of a token, or None (no token, bad token, Hub unreachable)."""
    if not token:
        return None
    from huggingface_hub import HfApi

    try:
        return HfApi(token=token).whoami().get("name") or None
    except Exception:  # noqa: BLE001 - unknown user: the repo field stays for the user to fill
        log.info("could not look up the Hub user of the given token")
        return None


def model_name(model_id: str) -> str:
    """The last path part of a model id or folder, safe for a repo name."""
    name = Path((model_id or "demo").strip().rstrip("/")).name or "model"
    return _SAFE.sub("-", name).strip("-.") or "model"


def default_repo(user: str | None, model_id: str, method: str = "abliterate") -> str:
    """`{user}/{model}-abliterated` (or -dpo / -steered), empty when the user is unknown."""
    if not user:
        return ""
    return f"{user}/{model_name(model_id)}-{SUFFIXES.get(method, 'abliterated')}"


def is_default_repo(repo_id: str | None, model_id: str | None = None) -> bool:
    """True for an empty repo field or one still holding a default we filled in (any model/method)."""
    repo_id = (repo_id or "").strip()
    if not repo_id:
        return True
    name = repo_id.split("/")[-1]
    return any(name.endswith(f"-{s}") for s in SUFFIXES.values()) and (
        model_id is None or name.startswith(model_name(model_id) + "-")
    )


def _hub_reachable() -> bool:
    """One quick request (no retries), remembered for a minute: list_models retries for ~20 s offline."""
    now = time.monotonic()
    if now - _REACHABLE[1] < 60:
        return _REACHABLE[0]
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    ok = False
    if not constants.HF_HUB_OFFLINE:
        try:
            ok = get_session().head(constants.ENDPOINT, timeout=SUGGEST_TIMEOUT_S).status_code < 500
        except Exception:  # noqa: BLE001 - unreachable: no suggestions
            ok = False
    _REACHABLE[:] = [ok, now]
    return ok


def _search(query: str, limit: int, answer: queue.Queue) -> None:
    from huggingface_hub import HfApi

    try:
        if _hub_reachable():
            # anonymous on a public app: the machine's token could list its owner's private models
            api = HfApi(token=False if policy.public() else None)
            models = api.list_models(search=query, limit=limit, sort="downloads", pipeline_tag="text-generation")
            answer.put([m.id for m in models])
    except Exception:  # noqa: BLE001 - suggestions are optional: Hub error, bad query
        pass
    answer.put([])


def suggest_models(query: str, limit: int = 10) -> list[str]:
    """Hub model ids matching `query` (with `demo` first); an offline Hub gives just `demo` and the query."""
    query = (query or "").strip()
    found: list[str] = []
    if len(query) >= 2 and query != "demo":
        answer: queue.Queue = queue.Queue()
        threading.Thread(target=_search, args=(query, limit, answer), daemon=True).start()
        try:
            found = answer.get(timeout=SUGGEST_TIMEOUT_S)
        except queue.Empty:
            found = []
    choices = ["demo"] + [m for m in found if m != "demo"]
    if query and query not in choices:
        choices.insert(1, query)
    return choices
