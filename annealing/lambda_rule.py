"""lambda, the user's one knob (higher follows the prompt more, lower keeps image quality): its rule, written once.

:class:`annealing.AnnealingOptions` checks it when a user's settings are built, the model's public ``forward`` for direct
callers, and the plots' lambda lists for each value; all three say the same line.
"""

from __future__ import annotations

import math

import torch

from .errors import show

LAMBDA_MIN, LAMBDA_MAX = 0.0, 1.0


def _problem(shown: str) -> ValueError:
    return ValueError(f"lambda must be a number in [{LAMBDA_MIN:g}, {LAMBDA_MAX:g}], got {shown}")


def check_lambda(value) -> float:
    """``value`` as a float when it is a number in [0, 1] (a Python number, or a tensor of any shape whose values all lie
    there); otherwise ValueError, one line. A tensor on an accelerator is not read back (that would synchronise the device)
    and is returned as the nominal 0.0: only CPU tensors are checked."""
    if torch.is_tensor(value):
        if value.device.type != "cpu" or not value.numel():
            return 0.0
        if value.dtype == torch.bool:
            raise _problem("a bool tensor")
        low, high = float(value.min()), float(value.max())
        if not (LAMBDA_MIN <= low and high <= LAMBDA_MAX):  # NaN fails too
            raise _problem(f"values from {low:g} to {high:g}" if low != high else f"{low:g}")
        return low
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _problem(show(value, 20))
    if isinstance(value, int) and value.bit_length() > 64:  # float() of a 400-digit integer raises OverflowError
        raise _problem(show(value))
    number = float(value)
    if not (math.isfinite(number) and LAMBDA_MIN <= number <= LAMBDA_MAX):
        raise _problem(f"{number:g}")
    return number
