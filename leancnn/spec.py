"""Parsing of `name:key=value,key=value` specs (methods, attacks, budgets) into typed
dataclass options, and the one place that reads type hints: `parse_value` reads strings (specs,
command-line flags), `check_value` checks values that already have a type (TOML config)."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Sequence

from .errors import ConfigError


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'pgd:eps=0.1,steps=20' -> ('pgd', {'eps': '0.1', 'steps': '20'}).
    A bare word after the colon ('vip:sensitivity') becomes {'sensitivity': 'true'}."""
    name, _, rest = spec.strip().partition(":")
    if not name:
        raise ConfigError(f"empty name in spec {spec!r}")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        options[key.strip()] = value.strip() if eq else "true"
    return name.strip(), options


def strip_optional(hint: Any) -> Any:
    """`X | None` -> X; any other hint unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def parse_value(value: str | list[str], target: Any, where: str) -> Any:
    """A string (or a list of them, for list[...] hints) read as the type `target`:
    the one converter for spec options and command-line flags."""
    if typing.get_origin(target) is list:
        items = value if isinstance(value, list) else [v for v in value.split(",") if v.strip()]
        return [parse_value(item, typing.get_args(target)[0], where) for item in items]
    return _convert(value, target, where)


def _convert(value: str, target: Any, where: str) -> Any:
    origin = typing.get_origin(target)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(target) if a is not type(None)]
        if value.lower() in ("none", "null", "") and len(args) < len(typing.get_args(target)):
            return None
        for arg in args:
            try:
                return _convert(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: cannot read {value!r} as {target}")
    if typing.get_origin(target) is typing.Literal:
        choices = typing.get_args(target)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    try:
        if target is bool:
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if target is int:
            return int(value)
        if target is float:
            if "/" in value:  # '8/255' is how attack budgets are usually written
                num, den = value.split("/")
                return float(num) / float(den)
            return float(value)
        if target is str:
            return value
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not a valid {target.__name__}") from None
    raise ConfigError(f"{where}: unsupported option type {target}")


def check_value(key: str, value: Any, expected: Any, source: str) -> Any:
    """A value that already has a type (read from TOML) checked against the hint `expected`:
    the TOML side of the one place that reads type hints (parse_value is the string side)."""
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: key {key!r} must be one of {', '.join(args)}, got {value!r}")
        return value
    if args and type(None) in args:  # Optional
        if value is None:
            return None
        return check_value(key, value, next(a for a in args if a is not type(None)), source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: key {key!r} expects a list, got {type(value).__name__}")
        return [check_value(key, v, args[0], source) for v in value]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{source}: key {key!r} expects {expected.__name__}, got bool")
    if not isinstance(value, expected):
        raise ConfigError(f"{source}: key {key!r} expects {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def build_options(cls: type, raw: dict[str, str], where: str) -> Any:
    """Fill dataclass `cls` from string options, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            allowed = ", ".join(names) or "(none)"
            raise ConfigError(f"{where}: unknown option {key!r}; allowed: {allowed}")
        values[key] = parse_value(value, hints[key], f"{where} option {key!r}")
    return cls(**values)


def format_spec(name: str, options: Any, fields: Sequence[str] | None = None) -> str:
    """Inverse of split_spec + build_options, for records; `fields` limits it to those options."""
    if options is None or not dataclasses.is_dataclass(options):
        return name
    keys = fields if fields is not None else [f.name for f in dataclasses.fields(options)]
    items = [f"{key}={getattr(options, key)}" for key in keys]
    return f"{name}:{','.join(items)}" if items else name
