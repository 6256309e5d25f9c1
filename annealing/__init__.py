"""Annealing guidance core: the guidance-scale model, its checkpoints, and the guidance math.

Host-agnostic (torch, safetensors and numpy only); the ComfyUI nodes and the training package build on it.

    >>> import annealing
    >>> model = annealing.load_guidance_model("annealing_sdxl.safetensors")   # or the upstream .pt
    >>> w = model(timestep, delta_norm, lam)                                    # (B,) tensors or floats -> (B,)
"""

from .checkpoint import (
    FORMAT_VERSION,
    CheckpointMetadata,
    convert_checkpoint,
    load_guidance_model,
    read_checkpoint,
    save_guidance_model,
    upstream_metadata,
)
from .errors import AnnealingError, CheckpointError
from .guidance import (
    AnnealingGuidance,
    AnnealingOptions,
    GuidanceRecorder,
    GuidanceTrace,
    cfgpp_step,
    delta_norm_from_difference,
    delta_norm_scale,
    locate_on_schedule,
    mlp_timestep,
    per_sample_norm,
    prediction_delta,
    renoise_factor,
)
from .model import GuidanceModelConfig, GuidanceScaleModel

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "AnnealingError",
    "AnnealingGuidance",
    "AnnealingOptions",
    "CheckpointError",
    "CheckpointMetadata",
    "GuidanceModelConfig",
    "GuidanceRecorder",
    "GuidanceScaleModel",
    "GuidanceTrace",
    "cfgpp_step",
    "convert_checkpoint",
    "delta_norm_from_difference",
    "delta_norm_scale",
    "load_guidance_model",
    "locate_on_schedule",
    "mlp_timestep",
    "per_sample_norm",
    "prediction_delta",
    "read_checkpoint",
    "renoise_factor",
    "save_guidance_model",
    "upstream_metadata",
]
