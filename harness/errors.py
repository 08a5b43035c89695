"""The one family of user-facing errors: the CLI prints each as one line and exits 2.

Raise a subclass of `UserError` for anything the user can fix (a suite, a flag, a file on disk);
its message must be one line naming what is wrong and where (file, key, allowed values). Bugs
stay ordinary exceptions and keep their tracebacks.
"""
from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input: reported as one line, exit code 2."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class RegistryError(UserError):
    """An unknown name or a bad parameter of a registered loss, dataset or model."""


class SuiteError(UserError):
    """A problem with a suite file (names the file and the key path)."""


class DataError(UserError):
    """A dataset or data file that cannot be used as asked (names the file and the problem)."""


class BenchError(UserError):
    """A problem with a bench-loss configuration or bench file."""


class ResultsError(UserError):
    """A results directory that cannot be used (not writable, a path outside the results root, …)."""


MAX_MESSAGE = 400


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """Collapse whitespace and cut to `limit` characters so a message always stays one short line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def short_repr(value: object, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters (for values quoted in error messages)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
