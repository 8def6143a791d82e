"""A command of `leancnn`: a registered object with `add_arguments` and `run`.

A new command is one file in this package: a `Command` subclass with `name`, `help`
and the two methods, decorated with `register_command`. `name` may be two words
("zoo build") for a sub-command of a group registered with `register_group`.
Commands parse and print; the work they start lives in the layers below.
"""
from __future__ import annotations

import argparse
import json
import typing
from typing import Any, ClassVar

from ..config import TrainConfig, config_fields, config_help, load_config
from ..registry import Registry
from ..spec import parse_value, strip_optional


class Command:
    name: ClassVar[str] = ""
    help: ClassVar[str] = ""          # one line, in `leancnn --help`
    description: ClassVar[str] = ""   # a paragraph, in `leancnn NAME --help` (default: help)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the command's flags."""

    def run(self, args: argparse.Namespace) -> int:
        """Do it; return the exit status. Raise LeancnnError for bad input (one line, exit 2)."""
        raise NotImplementedError


COMMANDS: Registry[type[Command]] = Registry("command")
GROUPS: dict[str, tuple[str, str]] = {}   # group name -> (help, description)


def register_command(cls: type[Command]) -> type[Command]:
    COMMANDS.register(cls.name)(cls)
    return cls


def register_group(name: str, help: str, description: str = "") -> None:
    GROUPS[name] = (help, description or help)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig key (help from the field's metadata), plus repeatable --method.
    Values stay strings here and are read by `config_from_args`, through the spec parser."""
    defaults, help_text = TrainConfig(), config_help()
    for name, hint in config_fields().items():
        if name == "methods":
            continue
        flag, base = "--" + name.replace("_", "-"), strip_optional(hint)
        text = f"{help_text[name]} (default: {getattr(defaults, name)})"
        if base is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=text)
            continue
        choices = typing.get_args(base) if typing.get_origin(base) is typing.Literal else None
        parser.add_argument(flag, dest=name, nargs="+" if typing.get_origin(base) is list else None, choices=choices,
                            default=argparse.SUPPRESS, help=text)
    parser.add_argument("--method", dest="methods", action="append", default=argparse.SUPPRESS,
                        help="method spec, repeatable, applied in order: name:key=value,... (see `leancnn methods`)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """--config's file with the flags given on the command line over it."""
    hints = config_fields()
    overrides = {}
    for key, value in vars(args).items():
        if key not in hints:
            continue
        flag = "--" + key.replace("_", "-")
        overrides[key] = value if isinstance(value, bool) or key == "methods" else parse_value(value, hints[key], flag)
    return load_config(getattr(args, "config", None), overrides)
