"""The commands of `leancnn`, one file each; importing this package registers them all."""
from . import bench, compress, evaluate, export, profile, registries, report, runs, serve, train, zoo  # noqa: F401  (registration)
from .base import COMMANDS, GROUPS, Command, register_command, register_group

__all__ = ["COMMANDS", "GROUPS", "Command", "register_command", "register_group"]
