"""Exception types of the annealing core.

Every problem with a checkpoint file raises :class:`CheckpointError` with a one-line message that names the file
and the problem, so a UI can show it as is.
"""

from __future__ import annotations

import os


class AnnealingError(Exception):
    """Base class of every error raised on purpose by this package."""


class CheckpointError(AnnealingError, ValueError):
    """A guidance checkpoint could not be read, is malformed, or cannot be written."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = " ".join(str(problem).split())  # always one line
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{self.problem}")
