"""Whose token reads the Hub during a job.

A job (a CLI run, a YAML batch job, a Space visitor's job) sets its read token once, at its
boundary, with ``reading_as(token)``; every Hub read of the job (model snapshots, Hub datasets,
model metadata) passes ``token=read_token()`` to huggingface_hub or datasets explicitly:

* ``None`` (the default, CLI): the library's own choice: ``HF_TOKEN``, then the saved login;
* a string: that user's token (a signed-in Space visitor);
* ``False``: anonymous, never the environment's token.

A context variable rather than an argument through every stage: the value is per thread and per
job, so two jobs never see each other's token, and the stages (shared with the CLI) need no
extra parameter. On a Space (``SYSTEM=spaces``) a read outside any job is anonymous too: the
Space's ``HF_TOKEN`` is its owner's and serves no visitor.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Token = str | bool | None

_UNSET = object()
_TOKEN: ContextVar[object] = ContextVar("abliterator_hub_read_token", default=_UNSET)


@contextmanager
def reading_as(token: Token) -> Iterator[None]:
    """Within the block, Hub reads use `token` (see the module doc for None and False)."""
    mark = _TOKEN.set(token)
    try:
        yield
    finally:
        _TOKEN.reset(mark)


def read_token() -> Token:
    """The token for a Hub read now: the job's, else anonymous on a Space, else the library default."""
    token = _TOKEN.get()
    if token is _UNSET:
        return False if os.environ.get("SYSTEM") == "spaces" else None
    return token  # type: ignore[return-value]


def token_kwargs() -> dict[str, Token]:
    """`{"token": ...}` for a Hub call, or {} for the library default (keeps plain calls plain)."""
    token = read_token()
    return {} if token is None else {"token": token}


def check_access(repo_id: str, revision: str | None, repo_type: str = "model") -> None:
    """Within a job with its own identity, ask the Hub whether that identity may read `repo_id`.

    huggingface_hub's `snapshot_download` and `datasets.load_dataset` answer from the local cache
    when the Hub refuses (a private repo without a valid token gives 404, and they then serve
    the cached copy): on a shared machine the cache would hand one user's private model or
    dataset to another. Raises the Hub's own error (RepositoryNotFoundError, GatedRepoError, ...)
    for the caller to translate. With no job identity (the CLI: the machine's own user) nothing
    is asked.
    """
    token = read_token()
    if token is None:
        return
    from huggingface_hub import HfApi

    HfApi(token=token).repo_info(repo_id, revision=revision, repo_type=repo_type)
