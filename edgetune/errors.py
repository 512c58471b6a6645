"""The one error type edgetune raises for bad input.

The CLI turns an :class:`EdgetuneError` into a single line on stderr and exit code 2, with no
traceback. Anything else that escapes is a bug in edgetune, not in the user's input.
"""
from __future__ import annotations


class EdgetuneError(Exception):
    """A problem with the user's input or environment, described in one line."""

    def __init__(self, message: str):
        # One line, always: a multi-line message would read as a traceback in a terminal.
        super().__init__(" ".join(str(message).split()))


class DataError(EdgetuneError):
    """A dataset file that cannot be used; the message names ``file:line`` where it can."""


class ArtifactError(EdgetuneError):
    """A compiled directory, run or adapter that is missing, corrupt or mismatched."""


class MissingDependency(EdgetuneError):
    """An optional part was used without its package; the message says what to install."""
