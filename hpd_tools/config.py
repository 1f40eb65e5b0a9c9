"""The config dataclasses' fields and their command-line flags in one place
(``option``), and YAML recipes onto those dataclasses, strictly: an unknown key
is an error that names itself, and values are checked against the field's type."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from .errors import HPDError

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, *, help: str | dict[str, str], flag: str | None = None, choices: Sequence[str] | None = None,
           default_factory: Any = dataclasses.MISSING, form: str | None = None) -> Any:
    """A config field that is also a flag of its command (hpd_tools/cli.py makes
    the flags from these fields, so each field's help and default live here only).

    ``flag``: the flag where it is not ``--`` and the name with dashes: ``--cache``
    for ``caches``, ``--no-reuse`` for a flag that turns a true field off,
    ``--pack/--no-pack`` for both spellings, ``--{}-field`` for the flags of a
    nested dataclass's fields (``help`` is then one text per nested field).
    ``choices``: the values the field takes, offered by the CLI and checked by
    ``check_choices``. ``form="comma"``: a list written ``a,b`` in one flag.
    A list is a repeatable flag, a dict a repeatable ``KEY=VALUE`` flag, a
    two-number tuple a flag of two values."""
    metadata = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None, "form": form}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def flag_of(cls: type, name: str) -> str:
    """The flag of field ``name`` of ``cls`` as the command line spells it (errors name it)."""
    flag = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("flag")
    return (flag or "--" + name.replace("_", "-")).split("/")[0]


def check_choices(config: Any) -> None:
    """Each field declared with ``choices`` holds one of them (recipes and Python
    callers reach here without the CLI's check)."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise HPDError(f"{flag_of(type(config), f.name)} {value}: choose {', '.join(choices)}")


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
