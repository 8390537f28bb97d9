"""The option keys a job accepts (YAML jobs, `run` flags, the Space's settings), so a typo is an error.

`pipeline.configs.build_config` builds each stage config from the one options dict and
keeps only that config's own fields; without this check a misspelt key (`trails: 5`) would be
dropped silently and the job would run with the default.
"""

from __future__ import annotations

import difflib
from functools import cache
from typing import Any

# The stage configs a job's options fill in (module, class); the `run` command's flags come from them too.
STAGE_CONFIGS = (
    ("pipeline.io.loading", "LoadConfig"),
    ("pipeline.edit.stages", "PromptsConfig"),
    ("pipeline.edit.directions", "DirectionsConfig"),
    ("pipeline.edit.abliterate", "EditConfig"),
    ("pipeline.evaluation.evaluate", "EvalConfig"),
    ("pipeline.edit.search", "SearchConfig"),
    ("pipeline.tuning.tune", "TuneConfig"),
    ("pipeline.tuning.steer", "SteerConfig"),
)

# Options that `pipeline.orchestrator.run` reads itself rather than through a stage config.
RUN_KEYS = ("layer", "streaming", "data", "positive", "negative", "k", "vector")


def _fields(cls: Any, prefix: str = "") -> list[str]:
    from pipeline.configs import _is_model, _unwrap_optional

    names = []
    for name, field in cls.model_fields.items():
        if field.exclude:  # internal fields are not settings
            continue
        inner = _unwrap_optional(field.annotation)
        names += _fields(inner, f"{prefix}{name}_") if _is_model(inner) else [f"{prefix}{name}"]
    return names


def stage_config_classes() -> list[Any]:
    """The stage config classes of `STAGE_CONFIGS` that are installed (an optional stage, tuning, may not be)."""
    import importlib

    classes = []
    for module, name in STAGE_CONFIGS:
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except ImportError:
            continue
    return classes


@cache
def valid_option_keys() -> tuple[str, ...]:
    """Every key an options dict may hold (underscore spelling; dashes are accepted too)."""
    keys = set(RUN_KEYS)
    for cls in stage_config_classes():
        keys.update(_fields(cls))
    return tuple(sorted(keys))


def normal_key(key: Any) -> str:
    return str(key).strip().replace("-", "_")


def unknown_key_message(key: str, valid: tuple[str, ...] | list[str], what: str = "option") -> str:
    """One line: the unknown key, the closest valid one, and every valid key."""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {key!r}{hint}; valid {what}s: {', '.join(valid)}"


def check_option_keys(options: dict[str, Any]) -> dict[str, Any]:
    """`options` unchanged, or ValueError naming the first unknown key and the valid ones."""
    valid = valid_option_keys()
    for key in options:
        if normal_key(key) not in valid:
            raise ValueError(unknown_key_message(str(key), valid))
    return options
