"""What a visitor of the app may ask for: the settings it accepts, and which models and sources.

Every visitor is untrusted when the app is public: on a Hugging Face Space (``SYSTEM=spaces``) or
bound to anything but the loopback interface (``GRADIO_SERVER_NAME=0.0.0.0``). Then the model is
`demo` or a Hub id, and every prompt or data source a built-in name or a Hub dataset id: a path
would read the server's own files (cached snapshots of private models, secrets) and could publish
them. Whatever the binding, "Extra settings" take only the keys in ``ALLOWED_EXTRA``:
``trust_remote_code`` (runs a repository's code), paths (``markers_file``, ``perplexity_file``,
``study``, ``vector``) and memory or placement settings are never settable from the app. Caps on
the work a job may ask for are in space/limits.py. See docs/SECURITY.md.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any

from pipeline.errors import UserError
from pipeline.io.sources import is_hub_id, is_name
from pipeline.orchestrator.options import normal_key

_KERNEL = tuple(f"{comp}_{key}" for comp in ("attn", "mlp")
                for key in ("kind", "strength", "peak", "width", "max_weight", "position", "min_weight", "distance"))
ALLOWED_EXTRA: tuple[str, ...] = tuple(sorted({
    # prompts (sources are checked below)
    "harmful", "harmless", "split", "column", "eval_fraction", "max_prompts", "seed",
    # measuring and choosing the direction
    "batch_size", "clip", "validation_fraction", "min_accuracy", "min_separation", "max_depth", "select",
    "select_prompts", "select_tokens", "max_kl", "max_eval", "filter_prompts", "filter_tokens", "min_depth",
    "select_finalists", "min_removal", "set_directions", "set_contrast", "min_answered", "per_set",
    # the edit
    "method", "preset", "kernel", "embed_strength", "per_layer", "layer", "streaming", *_KERNEL,
    # evaluation
    "max_new_tokens", "num_samples", "prefill_think", "perplexity",
    # automatic search (not `study`: a file path)
    "trials", "target", "search_max_kl", "search_seed", "search_method", "allow_mlp_off", "search_per_layer",
    "start_from_default", "test_fraction", "finalists", "wide_prompts", "fit_steps", "confirm_prompts",
    # tuning and steering (not `epochs`: unbounded work; `max_steps` and `max_examples` are capped)
    "loss", "beta", "lora_r", "lora_alpha", "lora_dropout", "learning_rate", "max_steps", "warmup", "scheduler",
    "data_split", "max_examples",
    # loading (not trust_remote_code, device_map, load_in_4bit)
    "revision", "dtype", "gguf_file",
}))
GGUF_NAME = re.compile(r"^[\w.\-]+\.gguf$", re.IGNORECASE)  # a file of the Hub repo, never a path
SOURCE_KEYS = ("harmful", "harmless", "data", "positive", "negative")
LOOPBACK_NAMES = ("localhost",)


def on_spaces() -> bool:
    """True when running on a Hugging Face Space (the Hub sets SYSTEM=spaces)."""
    return os.environ.get("SYSTEM") == "spaces"


def bound_to_loopback() -> bool:
    """True when the app listens on the loopback interface only (GRADIO_SERVER_NAME, default 127.0.0.1)."""
    host = (os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1").strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to a public interface, so it is not trusted
        return False


def public() -> bool:
    """True when visitors are untrusted: on a Space, or reachable beyond this machine."""
    return on_spaces() or not bound_to_loopback()


def check_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """The extra settings with normalised keys; UserError on the first key outside the allow-list."""
    checked = {}
    for key, value in extra.items():
        name = normal_key(key)
        if name not in ALLOWED_EXTRA:
            why = " (never settable from the app)" if name == "trust_remote_code" else ""
            raise UserError(f"extra settings: {key!r} is not allowed here{why}; allowed: {', '.join(ALLOWED_EXTRA)}")
        if name == "gguf_file" and not (isinstance(value, str) and GGUF_NAME.match(value)):
            raise UserError(f"extra settings: gguf_file {value!r} must be a .gguf file name in the model's repo")
        checked[name] = value
    return checked


def check_model(model_id: str) -> str:
    """On a public app the model is `demo` or a Hub id: a folder would read the server's files."""
    model_id = (model_id or "").strip()
    if public() and model_id != "demo" and not is_hub_id(model_id):
        raise UserError(f"model {model_id!r}: give a Hub model id (owner/name) or demo; "
                        "folders on the server are not accepted here")
    return model_id


def check_sources(options: dict[str, Any]) -> None:
    """On a public app every prompt or data source is a built-in name or a Hub dataset id."""
    if not public():
        return
    for key in SOURCE_KEYS:
        value = options.get(key)
        if value in (None, ""):
            continue
        parts = value.split(",") if isinstance(value, str) else [value]
        if not all(isinstance(p, str) and (is_name(p.strip()) or is_hub_id(p.strip())) for p in parts):
            raise UserError(f"{key}: {value!r} is not a built-in set or a Hub dataset id (owner/name); "
                            "files on the server are not accepted here")
