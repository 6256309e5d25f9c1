"""The training package's one error type: a problem with the training input, reported in one line."""

from __future__ import annotations

from annealing.errors import AnnealingError


class TrainingError(AnnealingError):
    """A problem with the training input (model, data, config, output) reported in one line before training starts."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
