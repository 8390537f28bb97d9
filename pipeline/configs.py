"""Generate argparse flags from the stage configs, so every setting is documented once.

Each pydantic field becomes `--field-name` with the field's description as its
help. Flags default to None: a flag the user did not give is left out, and the
config's own default applies. A nested config (a kernel) becomes
`--<field>-<subfield>` flags that are gathered into a dict of overrides.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError

from pipeline.errors import UserError


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def add_config_args(parser: argparse.ArgumentParser, cls: type[BaseModel], prefix: str = "", skip=()) -> None:
    group = parser.add_argument_group(cls.__doc__.strip().splitlines()[0] if cls.__doc__ else cls.__name__)
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        ann = _unwrap_optional(field.annotation)
        if _is_model(ann):
            add_config_args(parser, ann, prefix=f"{prefix}{name}-")
            continue
        flag = "--" + f"{prefix}{name}".replace("_", "-")
        dest = f"{prefix}{name}".replace("-", "_")
        default = field.default
        help_text = f"{field.description or ''} (default: {default})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": dest, "default": None, "help": help_text}
        if ann is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(ann) is Literal:
            kwargs["choices"] = list(get_args(ann))
        elif ann in (int, float):
            kwargs["type"] = ann
            kwargs["metavar"] = "N" if ann is int else "X"
        group.add_argument(flag, **kwargs)


def _values(cls: type[BaseModel], ns: argparse.Namespace, prefix: str, skip) -> dict:
    values: dict[str, Any] = {}
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        ann = _unwrap_optional(field.annotation)
        if _is_model(ann):
            nested = _values(ann, ns, f"{prefix}{name}_", ())
            if nested:
                values[name] = nested
            continue
        value = getattr(ns, f"{prefix}{name}".replace("-", "_"), None)
        if value is not None:
            values[name] = value
    return values


def config_from_args(cls: type[BaseModel], ns: argparse.Namespace, prefix: str = "", skip=(), **extra):
    """Build the config from the flags that were given; invalid values become one-line UserErrors."""
    values = {**_values(cls, ns, prefix.replace("-", "_"), skip), **extra}
    try:
        return cls(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        if not err["loc"]:  # a model validator's own message already names the flag
            raise UserError(str(err["msg"]).removeprefix("Value error, ")) from exc
        flag = "--" + (prefix + "-".join(str(p) for p in err["loc"])).replace("_", "-")
        raise UserError(f"{flag}: {err['msg']} (got {err.get('input')!r})") from exc


def build_config(cls: type[BaseModel], options: dict[str, Any]):
    """Build a config from a dict of settings (a YAML job or the UI), keeping only its own fields.

    Keys may use dashes or underscores; nested configs take `attn_strength`-style keys.
    """
    flat = {str(k).replace("-", "_"): v for k, v in options.items()}
    ns = argparse.Namespace(**flat)
    return config_from_args(cls, ns)
