"""Writing guidance-scale checkpoints: our ``.safetensors`` with full metadata (:mod:`annealing.checkpoint_format`),
written atomically (:mod:`annealing.atomic_write`), and conversion of any readable checkpoint into it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .atomic_write import atomic_write
from .checkpoint_format import ARCHITECTURES, CheckpointMetadata, GuidanceNetwork
from .checkpoint_reader import load_guidance_model
from .errors import CheckpointError


def save_guidance_model(model: GuidanceNetwork, path: str | os.PathLike, metadata: CheckpointMetadata | None = None) -> None:
    """Write ``model`` as our ``.safetensors`` with full metadata (``metadata`` defaults to ``model.metadata``)."""
    from safetensors.torch import save_file

    metadata = metadata or model.metadata
    if metadata is None:
        raise CheckpointError(path, "no metadata given: say which model family, prediction space and timestep convention it is for")
    if not isinstance(model.config, ARCHITECTURES[metadata.method][0]):
        raise CheckpointError(path, f"the metadata says method {metadata.method!r} but the network is a {type(model).__name__}")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(path, f"refusing to save: weight {key} contains NaN or inf values")
    strings = metadata.to_strings(model.config)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=strings))


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, **metadata_changes) -> CheckpointMetadata:
    """Convert any readable checkpoint (upstream ``.pt`` included) to our ``.safetensors`` (``dst`` must have that suffix);
    returns the metadata written."""
    if Path(src).resolve() == Path(dst).resolve():
        raise CheckpointError(dst, "the output must differ from the input")
    if not os.fspath(dst).lower().endswith(".safetensors"):  # what is written is safetensors: a .pt name would mislead every other tool
        raise CheckpointError(dst, "the converted checkpoint is a .safetensors file; give the output that suffix")
    model = load_guidance_model(src)
    try:
        metadata = model.metadata.replace(**metadata_changes)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(dst, f"invalid metadata option: {exc}") from None
    save_guidance_model(model, dst, metadata)
    return metadata
