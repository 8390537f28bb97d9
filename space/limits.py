"""Caps on what one job of the app may cost, read from the environment when a job starts.

| variable | default | caps |
|---|---|---|
| ABLITERATOR_MAX_TRIALS | 50 | trials of the automatic search |
| ABLITERATOR_MAX_NEW_TOKENS | 256 | new tokens per evaluation prompt (also select_tokens and the chat) |
| ABLITERATOR_MAX_STEPS | 500 | training steps of DPO / weight steering (also the search's fit_steps) |
| ABLITERATOR_MAX_PROMPTS | 512 | prompts per class; select_prompts, wide_prompts, confirm_prompts, max_examples |
| ABLITERATOR_MAX_PARAMS | 2e9 | parameters of a Hub model (from its safetensors metadata) |
| ABLITERATOR_MAX_MODEL_GB | 10 | size of a Hub model's weight files |
| ABLITERATOR_CACHE_GB | 50 | the Hub download cache, pruned (least recently used first) after each job |

The model's size is read from the Hub's metadata with the visitor's token before anything is
downloaded. A job above a cap is refused with one line naming the cap and its variable; a setting
left alone whose default is above its cap runs at the cap.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import AuthError, HubError, UserError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".gguf")
GB = 1024**3


def _env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return float(raw)
    except ValueError:
        log.warning("%s=%r is not a number: using %g", name, raw, default)
        return default


@dataclass(frozen=True)
class Limits:
    max_trials: int
    max_new_tokens: int
    max_steps: int
    max_prompts: int
    max_params: float
    max_model_bytes: float
    cache_bytes: float

    @classmethod
    def from_env(cls) -> Limits:
        return cls(
            max_trials=int(_env("ABLITERATOR_MAX_TRIALS", 50)),
            max_new_tokens=int(_env("ABLITERATOR_MAX_NEW_TOKENS", 256)),
            max_steps=int(_env("ABLITERATOR_MAX_STEPS", 500)),
            max_prompts=int(_env("ABLITERATOR_MAX_PROMPTS", 512)),
            max_params=_env("ABLITERATOR_MAX_PARAMS", 2e9),
            max_model_bytes=_env("ABLITERATOR_MAX_MODEL_GB", 10) * GB,
            cache_bytes=_env("ABLITERATOR_CACHE_GB", 50) * GB,
        )


# option -> (Limits field, environment variable)
CAPPED = {
    "trials": ("max_trials", "ABLITERATOR_MAX_TRIALS"),
    "max_new_tokens": ("max_new_tokens", "ABLITERATOR_MAX_NEW_TOKENS"),
    "select_tokens": ("max_new_tokens", "ABLITERATOR_MAX_NEW_TOKENS"),
    "max_steps": ("max_steps", "ABLITERATOR_MAX_STEPS"),
    "max_prompts": ("max_prompts", "ABLITERATOR_MAX_PROMPTS"),
    "select_prompts": ("max_prompts", "ABLITERATOR_MAX_PROMPTS"),
    "wide_prompts": ("max_prompts", "ABLITERATOR_MAX_PROMPTS"),
    "confirm_prompts": ("max_prompts", "ABLITERATOR_MAX_PROMPTS"),
    "fit_steps": ("max_steps", "ABLITERATOR_MAX_STEPS"),
    "max_examples": ("max_prompts", "ABLITERATOR_MAX_PROMPTS"),
}
# Unbounded by default (None: every prompt, every example): on the app they default to their cap, since a Hub
# dataset may be huge and weight steering's steps grow with its examples.
DEFAULT_TO_CAP = ("max_prompts", "max_examples")


def _cap(limits: Limits, key: str) -> int:
    return int(getattr(limits, CAPPED[key][0]))


def resolved_defaults(options: dict[str, Any]) -> dict[str, float]:
    """The value each capped key not in `options` will take: its stage config's default as `options` resolve it
    (with --wide-prompts, the search's fit_steps and confirm_prompts default to 0)."""
    from pipeline.configs import build_config
    from pipeline.orchestrator.options import stage_config_classes

    missing = [key for key in CAPPED if options.get(key) is None]
    found: dict[str, float] = {}
    for cls in stage_config_classes():
        try:
            cfg = build_config(cls, options)
        except UserError:  # a bad value: its stage reports it when the job starts
            continue
        for key in missing:
            value = getattr(cfg, key, None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                found[key] = max(found.get(key, value), value)
    return found


def apply_limits(options: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """`options` checked against the caps; `DEFAULT_TO_CAP` default to their cap, and a default above its cap (the
    search's 40 fit steps under ABLITERATOR_MAX_STEPS=20) is lowered to it."""
    options = {**options, **{key: _cap(limits, key) for key in DEFAULT_TO_CAP
                             if options.get(key) is None}}  # an explicit null is no way around the cap
    for key, (field, env) in CAPPED.items():
        value = options.get(key)
        if value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue  # the stage config reports a non-number with its own message
        cap = getattr(limits, field)
        if number > cap:
            raise UserError(f"{key} = {value} is above this app's limit of {cap} ({env})")
    lowered = {key: _cap(limits, key) for key, default in resolved_defaults(options).items()
               if default > getattr(limits, CAPPED[key][0])}
    for key, cap in lowered.items():
        log.info("%s defaults above this app's limit: using %d (%s)", key, cap, CAPPED[key][1])
    return {**options, **lowered}


def _size_of(info: Any) -> tuple[int | None, int]:
    """(parameter count from the safetensors metadata, or None; bytes of the weight files)."""
    params = getattr(getattr(info, "safetensors", None), "total", None)
    size = sum(s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(WEIGHT_SUFFIXES))
    return params, size


def check_model_size(model_id: str, revision: str | None, token: str | bool, limits: Limits) -> Any:
    """The Hub's ModelInfo of `model_id` read with `token`, after checking its size against the caps."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(token=token).model_info(model_id, revision=revision, files_metadata=True)
    except GatedRepoError:
        raise AuthError(f"model {model_id!r} is gated: accept its terms on the Hub with your account") from None
    except RepositoryNotFoundError:
        raise UserError(f"model {model_id!r} not found: check the id (a private model needs you to sign in "
                        "with an account that can read it)") from None
    except RevisionNotFoundError:
        raise UserError(f"revision {revision!r} not found for model {model_id!r}") from None
    except (HfHubHTTPError, OSError) as err:
        raise HubError(f"cannot read the metadata of {model_id!r} from the Hub: {str(err).splitlines()[0]}") from None
    params, size = _size_of(info)
    if params is None and not size:
        raise UserError(f"model {model_id!r} has no safetensors weights listed on the Hub: its size is unknown")
    if params is not None and params > limits.max_params:
        raise UserError(f"model {model_id!r} has {params / 1e9:.2f}B parameters, above this app's limit of "
                        f"{limits.max_params / 1e9:.2f}B (ABLITERATOR_MAX_PARAMS)")
    if size > limits.max_model_bytes:
        raise UserError(f"model {model_id!r} weighs {size / GB:.1f} GB, above this app's limit of "
                        f"{limits.max_model_bytes / GB:.1f} GB (ABLITERATOR_MAX_MODEL_GB)")
    return info


def _repos(cache_dir: Path | None) -> list[Any]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return list(scan_cache_dir(cache_dir).repos)
    except CacheNotFound:
        return []


def _delete(repo: Any, cache_dir: Path | None) -> None:
    from huggingface_hub import scan_cache_dir

    hashes = [rev.commit_hash for rev in repo.revisions]
    scan_cache_dir(cache_dir).delete_revisions(*hashes).execute()


def prune_hub_cache(max_bytes: float, cache_dir: Path | None = None) -> list[str]:
    """Delete least recently used repos from the Hub cache until it holds at most `max_bytes`."""
    repos = sorted(_repos(cache_dir), key=lambda r: max(r.last_accessed, r.last_modified))
    total, removed = sum(r.size_on_disk for r in repos), []
    for repo in repos:
        if total <= max_bytes:
            break
        _delete(repo, cache_dir)
        total -= repo.size_on_disk
        removed.append(repo.repo_id)
    return removed


def forget(model_id: str, cache_dir: Path | None = None) -> bool:
    """Delete a model from the Hub cache (a private or gated one, once its job is over): the cache serves
    files without asking the Hub when the Hub is unreachable, and the next visitor may not read them."""
    for repo in _repos(cache_dir):
        if repo.repo_type == "model" and repo.repo_id == model_id:
            _delete(repo, cache_dir)
            return True
    return False
