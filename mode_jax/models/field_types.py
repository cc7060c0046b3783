"""Type checks for the model config dataclasses, from their annotations.

A config.json holding `"hidden_size": "64"` or `"merge_kernel_size": 2` would otherwise reach
jax as a shape and fail deep inside it; each config's `__post_init__` calls `check` first so the
error names the field.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

import numpy as np


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_int(value) or isinstance(value, float | np.floating)
    if hint is bool:
        return isinstance(value, bool | np.bool_)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(
            _matches(v, a) for v, a in zip(value, args, strict=True))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this checker does not read


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        plural = {int: "integers", float: "numbers"}.get(args[0], "values")
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {plural}" if plural != "values" else "a list"
        return f"a list of {len(args)} {plural}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check(config: Any) -> None:
    """Raise ValueError naming every field of the dataclass `config` whose value has the wrong
    type for its annotation."""
    hints = _hints(type(config))
    bad = [f"{f.name} must be {_describe(hints[f.name])}, got {getattr(config, f.name)!r}"
           for f in dataclasses.fields(config)
           if not _matches(getattr(config, f.name), hints[f.name])]
    if bad:
        raise ValueError("; ".join(bad))
