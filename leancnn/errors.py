"""User-facing errors: one clear line, non-zero exit (2) from the CLI."""


class LeancnnError(Exception):
    """Bad input from the user: a config key, a file, an option. The message is
    one line naming what was wrong and what is allowed."""


class DataError(LeancnnError):
    """A dataset file that is missing, truncated or corrupt."""


class ConfigError(LeancnnError):
    """An unknown key, a wrong type or an unknown registry name."""


class TrainingDiverged(LeancnnError):
    """The loss became NaN or infinite."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what a
    one-line error quotes of a library's (often pages-long) message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
