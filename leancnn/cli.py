"""The one entry point: `leancnn <command>`. Each command is a registered object in
leancnn.commands (one file each); this builds the parser from the registry."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .commands import COMMANDS, GROUPS
from .errors import LeancnnError
from .version import __version__


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        self.exit(2, f"leancnn: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="leancnn", description="Make CNNs cheaper to run, and measure it honestly.")
    parser.add_argument("--version", action="version", version=f"leancnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name in COMMANDS:
        command = COMMANDS.get(name)()
        group, _, leaf = name.rpartition(" ")
        if group and group not in groups:
            help_text, description = GROUPS[group]
            holder = sub.add_parser(group, help=help_text, description=description)
            groups[group] = holder.add_subparsers(dest=f"{group}_command", metavar=f"{group.upper()}_COMMAND",
                                                  parser_class=Parser, required=True)
        parent = groups[group] if group else sub
        child = parent.add_parser(leaf, help=command.help, description=command.description or command.help)
        command.add_arguments(child)
        child.set_defaults(command_object=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]   # for a command that re-launches itself
    command = getattr(args, "command_object", None)
    if command is None:
        parser.print_help()
        return 2
    try:
        return command.run(args)
    except LeancnnError as exc:
        print(f"leancnn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leancnn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
