"""The checkpoint format: the metadata our ``.safetensors`` files carry next to their weights, how it is parsed, the
metadata of the upstream release, and the guidance methods and architectures a file may name.

The metadata is a flat str -> str mapping (:meth:`CheckpointMetadata.to_strings`); reading it back
(:func:`parse_metadata`) bounds every JSON value first (:mod:`annealing.untrusted`), since files come from strangers.
Reading a whole file is :mod:`annealing.checkpoint_reader`; writing one is :mod:`annealing.checkpoint_writer`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import untrusted
from .errors import CheckpointError, show
from .learn_to_guide import LearnToGuideConfig, LearnToGuideNet
from .model import GuidanceModelConfig, GuidanceScaleModel
from .training_grid import FlowGrid, TrainingGrid, VPGrid, grid_from_dict

FORMAT_NAME = "annealing-guidance"
#: 2: the training grid is described completely (``training_grid``) and the guidance method is named (``method``).
#: Version 1 files (only ``sampling_steps``) are read with the grid their trainer used.
FORMAT_VERSION = 2
#: The guidance method a checkpoint implements, and the architecture and network class of each.
METHODS = ("annealing", "learn_to_guide")
ARCHITECTURES = {"annealing": (GuidanceModelConfig, GuidanceScaleModel), "learn_to_guide": (LearnToGuideConfig, LearnToGuideNet)}
ModelConfig = GuidanceModelConfig | LearnToGuideConfig
GuidanceNetwork = GuidanceScaleModel | LearnToGuideNet

PREDICTION_SPACES = ("epsilon", "velocity")
#: ddpm_index: DDPM timestep 0..999 of a discrete VP model; sigma_x1000: flow sigma * 1000 (SD3); sigma: flow sigma (Flux).
TIMESTEP_CONVENTIONS = ("ddpm_index", "sigma_x1000", "sigma")
#: Families we know; other lower-case names are accepted for models we have not met yet.
KNOWN_FAMILIES = ("sdxl", "sd15", "sd2", "sd3", "flux", "toy2d")
_FAMILY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")

SDXL_LATENT_NUMEL = 4 * 128 * 128  # SDXL at 1024x1024
MAX_LATENT_NUMEL = 1 << 40  # far above any latent (a 16-channel 8K video latent of 1000 frames is 2^33)


@dataclass(frozen=True)
class CheckpointMetadata:
    """How a checkpoint must be used, stored next to its weights.

    model_family:         the diffusion family it was trained on (sdxl, sd15, sd3, ...).
    prediction_space:     the space delta is measured in: "epsilon" (noise) or "velocity" (flow matching).
    timestep_convention:  the MLP's timestep input: "ddpm_index", "sigma_x1000" or "sigma".
    trained_latent_numel: latent elements per sample at the training resolution (for delta-norm normalisation), or None.
    training_grid:        the sampling grid it was trained on (:mod:`annealing.training_grid`); it fixes what w means.
                          Default: the grid of the timestep convention's usual model (upstream SDXL's 50-step DDIM grid for
                          ddpm_index, SD3's 28-step flow grid otherwise).
    training:             provenance: steps, images, lambda_min, lambda_max, base_model, source, ... (JSON-serialisable).
    method:               the guidance method the weights implement: "annealing" (w in CFG++ units from the timestep, ||delta||
                          and lambda) or "learn_to_guide" (a CFG scale from the step's timesteps and the prompt embedding).
    """

    model_family: str = "sdxl"
    prediction_space: str = "epsilon"
    timestep_convention: str = "ddpm_index"
    trained_latent_numel: int | None = SDXL_LATENT_NUMEL
    training_grid: TrainingGrid | None = None
    training: dict = field(default_factory=dict)
    method: str = "annealing"
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if not isinstance(self.model_family, str) or not _FAMILY_PATTERN.match(self.model_family):
            raise ValueError(f"model_family must be a short lower-case name such as {', '.join(KNOWN_FAMILIES)}; got {show(self.model_family)}")
        if self.prediction_space not in PREDICTION_SPACES:
            raise ValueError(f"prediction_space must be one of {PREDICTION_SPACES}, got {show(self.prediction_space)}")
        if self.timestep_convention not in TIMESTEP_CONVENTIONS:
            raise ValueError(f"timestep_convention must be one of {TIMESTEP_CONVENTIONS}, got {show(self.timestep_convention)}")
        value = self.trained_latent_numel
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_LATENT_NUMEL):
            raise ValueError(f"trained_latent_numel must be an integer from 1 to {MAX_LATENT_NUMEL} or None, got {show(value)}")
        if not isinstance(self.training, dict):
            raise ValueError(f"training must be a dict, got {type(self.training).__name__}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {show(self.method)}")
        grid = self.training_grid
        if grid is None:
            grid = VPGrid() if self.timestep_convention == "ddpm_index" else FlowGrid()
            object.__setattr__(self, "training_grid", grid)
        if not isinstance(grid, (VPGrid, FlowGrid)):
            raise ValueError(f"training_grid must be a VPGrid or FlowGrid, got {type(grid).__name__}")
        if (grid.kind == "vp") != (self.timestep_convention == "ddpm_index"):
            raise ValueError(f"a {grid.kind} training grid does not go with timestep convention {self.timestep_convention!r} "
                             "(ddpm_index needs a vp grid; sigma and sigma_x1000 a flow grid)")

    @property
    def sampling_steps(self) -> int:
        """Steps of the training grid (the paper's N; upstream: 50)."""
        return self.training_grid.num_steps

    def to_strings(self, config: ModelConfig) -> dict[str, str]:
        """The safetensors metadata (a flat str -> str mapping)."""
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),  # written in the current format, whatever version it was read from
            "architecture": json.dumps(config.to_dict(), sort_keys=True),
            "model_family": self.model_family,
            "prediction_space": self.prediction_space,
            "timestep_convention": self.timestep_convention,
            "trained_latent_numel": "" if self.trained_latent_numel is None else str(self.trained_latent_numel),
            "training_grid": json.dumps(self.training_grid.to_dict(), sort_keys=True),
            "training": json.dumps(self.training, sort_keys=True),
            "method": self.method,
        }

    def to_dict(self) -> dict:
        """JSON-ready form (the grid as its dict)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["training_grid"] = self.training_grid.to_dict()
        return data

    def replace(self, **changes) -> CheckpointMetadata:
        """A copy with ``changes``; ``sampling_steps`` changes the grid's step count, and a timestep convention of the other
        kind (DDPM index vs flow sigma) brings that kind's default grid unless ``training_grid`` is given too."""
        steps = changes.pop("sampling_steps", None)
        convention = changes.get("timestep_convention")
        if convention is not None and "training_grid" not in changes and (convention == "ddpm_index") != (self.training_grid.kind == "vp"):
            changes["training_grid"] = None
        new = dataclasses.replace(self, **changes)
        if steps is not None:
            new = dataclasses.replace(new, training_grid=dataclasses.replace(new.training_grid, num_steps=steps))
        return new


def upstream_metadata(checkpoint: dict | None = None) -> CheckpointMetadata:
    """Metadata for the released SDXL checkpoint (SDXL base 1.0, epsilon, DDPM index, 1024x1024), trained on diffusers'
    DDIM grid: 50 steps, leading spacing, steps_offset 0, scaled_linear betas 0.00085..0.012 (timesteps 980, 960, ..., 0).
    Provenance from the file is kept only when it is sane (a stranger's file may put anything there)."""
    checkpoint = checkpoint if isinstance(checkpoint, dict) else {}
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    diffusion = config.get("diffusion") if isinstance(config.get("diffusion"), dict) else {}
    steps = diffusion.get("num_timesteps", 50)
    steps = steps if isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= 1000 else 50
    training = {"source": "annealing-guidance upstream release (arXiv 2506.24108)", "base_prediction_type": "epsilon"}
    model_id = diffusion.get("model_id")
    if isinstance(model_id, str) and len(model_id) <= 256 and model_id.isprintable():
        training["base_model"] = model_id
    step = checkpoint.get("step")
    if isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 2**53:
        training["steps"] = step
    return CheckpointMetadata(training_grid=VPGrid(num_steps=steps), training=training)



def parse_architecture(path: Path, raw, method: str = "annealing") -> ModelConfig:
    if not isinstance(raw, dict):
        raise CheckpointError(path, f"invalid architecture config: expected a mapping, got {show(raw)}")
    if method not in ARCHITECTURES:
        raise CheckpointError(path, f"unknown guidance method {show(method)} (this pack reads {', '.join(METHODS)}); update the pack")
    try:
        return ARCHITECTURES[method][0].from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid architecture config: {exc}") from None


_DIGITS = re.compile(r"[0-9]{1,18}")


def parse_metadata(path: str | os.PathLike, meta: dict[str, str]) -> tuple[GuidanceModelConfig, CheckpointMetadata]:
    """Validate the string metadata of one of our safetensors files (JSON values bounded: untrusted.load_json)."""
    path = Path(path)
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(path, f"no annealing-guidance metadata (metadata 'format' is {show(meta.get('format'))}, expected {FORMAT_NAME!r})")
    raw_version = meta.get("format_version", "")
    if not isinstance(raw_version, str) or not _DIGITS.fullmatch(raw_version):
        raise CheckpointError(path, f"invalid format_version {show(raw_version)}")
    version = int(raw_version)
    if version > FORMAT_VERSION:
        raise CheckpointError(path, f"written by a newer format version {version} (this pack reads up to {FORMAT_VERSION}); update the pack")
    if version < 1:
        raise CheckpointError(path, f"invalid format_version {version}")

    def json_field(key):
        if key not in meta:
            raise CheckpointError(path, f"missing metadata {key!r}")
        try:
            value = untrusted.load_json(meta[key])
        except ValueError as exc:
            raise CheckpointError(path, f"metadata {key!r} {exc}") from None
        if not isinstance(value, dict):
            raise CheckpointError(path, f"metadata {key!r} must be a JSON object")
        return value

    def int_field(key):
        value = meta.get(key, "")
        if value == "":
            return None
        if not _DIGITS.fullmatch(value):
            raise CheckpointError(path, f"metadata {key!r} must be an integer, got {show(value)}")
        return int(value)

    method_name = meta.get("method", "annealing") if version >= 2 else "annealing"
    config = parse_architecture(path, json_field("architecture"), method_name)
    for key in ("model_family", "prediction_space", "timestep_convention"):
        if key not in meta:
            raise CheckpointError(path, f"missing metadata {key!r}")
    training = json_field("training")
    # read (and refuse) the raw fields first: the handler below is for the values' meaning, and would wrap their errors twice
    raw_grid = json_field("training_grid") if version >= 2 else None
    steps, latent_numel = int_field("sampling_steps") if version < 2 else None, int_field("trained_latent_numel")
    try:
        if version >= 2:
            grid, method = grid_from_dict(raw_grid), meta.get("method", "")
        else:
            grid, method = _version1_grid(meta["timestep_convention"], steps, training), "annealing"
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid training_grid: {exc}") from None
    try:
        metadata = CheckpointMetadata(
            model_family=meta["model_family"],
            prediction_space=meta["prediction_space"],
            timestep_convention=meta["timestep_convention"],
            trained_latent_numel=latent_numel,
            training_grid=grid,
            training=training,
            method=method,
            format_version=version,
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid metadata: {exc}") from None
    return config, metadata


def _version1_grid(convention: str, steps: int | None, training: dict) -> TrainingGrid:
    """The grid a version-1 file was trained on: our trainer's DDIM grid (leading, offset 0, SD's betas) for DDPM timesteps,
    its flow grid (u linear from 1 to 1/N, the model's shift) otherwise."""
    if convention == "ddpm_index":
        return VPGrid(num_steps=steps or 50)
    shift = training.get("flow_shift", 3.0)
    shift = float(shift) if isinstance(shift, (int, float)) and not isinstance(shift, bool) and abs(shift) < 1e300 else 3.0
    return FlowGrid(num_steps=steps or 28, shift=shift, spacing="simple")
