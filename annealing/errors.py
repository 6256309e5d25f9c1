"""Exception types of the annealing core.

Every problem with a checkpoint file raises :class:`CheckpointError` with a one-line message that names the file
and the problem, so a UI can show it as is.
"""

from __future__ import annotations

import os

#: The longest problem text a CheckpointError shows; longer ones (only hostile values get there) are cut at a word.
MAX_PROBLEM_CHARS = 400


def printable(text: str, limit: int | None = None) -> str:
    """``text`` safe to show in one terminal or UI line: control characters, escape codes and undecodable bytes become
    visible escapes (``\\x1b``), whitespace runs become one space, and past ``limit`` characters it is cut with a marker."""
    text = " ".join(str(text).split())
    if not text.isprintable():
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    if limit is not None and len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + f" ... ({len(text)} characters, shortened)"
    return text


def show(value, limit: int = 60) -> str:
    """A short, printable description of a value from an untrusted file, for an error message. Never walks containers
    (a file can nest them 100,000 deep) and never converts a huge integer to decimal (slow, and refused past 4300 digits)."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 128:
            return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
        return str(value)
    if isinstance(value, (str, bytes)):
        if len(value) > limit:
            return printable(repr(value[:limit])) + f"... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
        return printable(repr(value))
    return f"a {printable(type(value).__name__, 40)}"


class AnnealingError(Exception):
    """Base class of every error raised on purpose by this package."""


class CheckpointError(AnnealingError, ValueError):
    """A guidance checkpoint could not be read, is malformed, or cannot be written."""

    def __init__(self, path: str | bytes | os.PathLike | None, problem: str):
        try:
            self.path = None if path is None else os.fspath(path)
        except TypeError:  # not a path at all: keep it for the message, never fail while reporting a failure
            self.path = path
        self.problem = printable(problem, MAX_PROBLEM_CHARS)  # always one line, never a terminal escape
        where = ""
        if self.path is not None:
            shown = os.fsdecode(self.path) if isinstance(self.path, (str, bytes)) else show(self.path)
            where = f"{printable(shown)}: "
        super().__init__(f"{where}{self.problem}")
