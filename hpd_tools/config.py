"""YAML recipes onto typed config dataclasses, strictly: an unknown key is an error
that names itself, and values are checked against the field's type."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import HPDError

T = TypeVar("T")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise HPDError(f"{where}: expected a mapping, got {type(value).__name__}")
        return build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except HPDError as exc:
                errors.append(str(exc))
        raise HPDError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if isinstance(value, str) and "/" in value:  # "I/N" spelling of a shard
            value = value.split("/")
        if not isinstance(value, (list, tuple)):
            raise HPDError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, typing.get_args(hint)))
    if origin is dict:
        if not isinstance(value, dict):
            raise HPDError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise HPDError(f"{where}: expected a list, got {value!r}")
        return list(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise HPDError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):  # int() would truncate 2.5 or fail on inf
                raise HPDError(f"{where}: expected an integer, got {value!r}")
            try:
                return int(value)
            except (TypeError, ValueError):
                raise HPDError(f"{where}: expected an integer, got {value!r}") from None
        return value
    if hint is float:
        if isinstance(value, bool):
            raise HPDError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise HPDError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise HPDError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """``cls(**values)`` with unknown keys refused and each value checked against its field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise HPDError(f"{where}: unknown key '{unknown[0]}'; known keys: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise HPDError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise HPDError(f"--config {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(values, dict):
        raise HPDError(f"--config {path}: expected a mapping of keys to values at the top level")
    return values
