"""Annealing guidance core: the guidance-scale model, its checkpoints, the training grid, and the guidance math.

Host-agnostic (torch, safetensors and numpy only); the ComfyUI nodes and the training package build on it.

    >>> import annealing
    >>> model = annealing.load_guidance_model("annealing_sdxl.safetensors")   # or the upstream .pt
    >>> w = model(timestep, delta_norm, 0.4)                                    # (B,) tensors or floats -> (B,)
    >>> guide = annealing.AnnealingGuidance(model, annealing.AnnealingOptions(lam=0.4))
    >>> d_guided = guide.guide(sigma, d_cond, d_uncond, sampling="eps")         # inside any sampler
"""

from .checkpoint_format import FORMAT_VERSION, CheckpointMetadata, upstream_metadata
from .checkpoint_reader import load_guidance_model, read_checkpoint
from .checkpoint_writer import convert_checkpoint, save_guidance_model
from .errors import AnnealingError, CheckpointError
from .guidance import (
    AnnealingGuidance,
    AnnealingOptions,
    cfgpp_step,
    delta_norm_from_difference,
    delta_norm_scale,
    guided_ddim_step,
    per_sample_norm,
)
from .learn_to_guide import LearnToGuideConfig, LearnToGuideNet, prompt_embedding
from .model import GuidanceModelConfig, GuidanceScaleModel
from .recorder import GuidanceRecorder, GuidanceTrace
from .samplers import SamplerInfo
from .scale_rule import MODES, evaluation_scale
from .schedules import locate_on_schedule, renoise_factor
from .training_grid import FlowGrid, GridLookup, VPGrid, anchored_omega, k_train

__version__ = "0.2.0"

__all__ = [
    "FORMAT_VERSION",
    "MODES",
    "AnnealingError",
    "AnnealingGuidance",
    "AnnealingOptions",
    "CheckpointError",
    "CheckpointMetadata",
    "FlowGrid",
    "GridLookup",
    "GuidanceModelConfig",
    "GuidanceRecorder",
    "GuidanceScaleModel",
    "GuidanceTrace",
    "LearnToGuideConfig",
    "LearnToGuideNet",
    "SamplerInfo",
    "VPGrid",
    "anchored_omega",
    "cfgpp_step",
    "guided_ddim_step",
    "convert_checkpoint",
    "delta_norm_from_difference",
    "delta_norm_scale",
    "evaluation_scale",
    "k_train",
    "load_guidance_model",
    "locate_on_schedule",
    "per_sample_norm",
    "prompt_embedding",
    "read_checkpoint",
    "renoise_factor",
    "save_guidance_model",
    "upstream_metadata",
]
