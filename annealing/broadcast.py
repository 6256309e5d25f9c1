"""Per-sample values against batch-first tensors: the one place that shapes a scalar or a (B,) value for a batch."""

from __future__ import annotations

import torch

from .errors import show


def as_batch(value, batch: int, device: torch.device, dtype: torch.dtype = torch.float32, name: str = "value") -> torch.Tensor:
    """A Python number, a 0-d or a (B,) tensor as a (B,) tensor on ``device`` (numbers become a device fill: no host copy).

    Anything else (a tensor of another size, a number float() cannot hold, not a number at all) is a ValueError naming
    ``name``.
    """
    if not torch.is_tensor(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number or a tensor, got {type(value).__name__}")
        if isinstance(value, int) and value.bit_length() > 1000:  # float() would raise OverflowError
            raise ValueError(f"{name} must be a finite number, got {show(value)}")
        return torch.full((batch,), float(value), device=device, dtype=dtype)
    tensor = value.to(device=device, dtype=dtype).reshape(-1)
    if tensor.numel() == 1:
        return tensor.expand(batch)
    if tensor.numel() != batch:
        raise ValueError(f"expected a scalar or {batch} values (one per batch item), got {tuple(value.shape)}")
    return tensor


def batch_view(value, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) value viewed as (B, 1, ..., 1) against ``like`` (B, ...), in like's dtype and device; keeps autograd."""
    tensor = value if torch.is_tensor(value) else torch.tensor(float(value), device=like.device, dtype=like.dtype)
    if tensor.dim() == 0:
        return tensor.to(device=like.device, dtype=like.dtype)
    return tensor.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
