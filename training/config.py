"""Training configuration: defaults from the paper, overridable from a YAML/TOML file and then from the command line.

Precedence: dataclass defaults < config file < command-line flags. Keys of a config file are the field names below
(dashes or underscores); an unknown key or a value of the wrong type is a one-line :class:`TrainingError`.
Values are only ever parsed as data (``yaml.safe_load`` / ``tomllib``), never evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from annealing.errors import AnnealingError


class TrainingError(AnnealingError):
    """A problem with the training input (model, data, config, output) reported in one line before training starts."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# name -> help text; the order is the order of ``--help``.
HELP = {
    "model": "diffusers pipeline folder (model_index.json) or a single-file .safetensors checkpoint",
    "config_folder": "for a single-file checkpoint: a local diffusers folder of the same architecture that provides the configs and tokenizers",
    "dataset": "folder of images with same-named .txt captions (img2dataset layout) or a .jsonl manifest of {image, caption}",
    "output": "output folder (checkpoints, resume state, log and report)",
    "embeddings": "folder written by `python -m training embed`: precomputed text embeddings, the text encoders are then not loaded",
    "output_name": "file name of the trained checkpoint without extension (default annealing_<family>)",
    "model_family": "family name written into the checkpoint metadata (default: detected, e.g. sdxl, sd15, sd2, sd3)",
    "resolution": "square training resolution in pixels (default: 1024 for SDXL and SD3, 768 for SD2, 512 for SD1.x)",
    "caption_extension": "caption file extension in an image folder",
    "skip_missing_captions": "skip images without a caption instead of stopping with an error",
    "seed": "random seed; the same seed and config give the same weights",
    "lr": "AdamW learning rate (paper: 1e-3)",
    "weight_decay": "AdamW weight decay (paper: 0.01)",
    "batch_size": "micro-batch size per process",
    "gradient_accumulation": "micro-batches per optimizer step (paper: batch 1 x 16 accumulation)",
    "images": "training images to draw in total; steps = images / (batch_size x gradient_accumulation x processes) (paper: 20000)",
    "max_steps": "optimizer steps (overrides --images)",
    "grid_steps": "sampling grid timesteps are drawn from (paper: 50)",
    "flow_spacing": "flow models: diffusers|simple spacing of the grid; diffusers = FlowMatchEulerDiscreteScheduler's (last sigma "
                    "0.0089 at 28 steps, shift 3), simple = ComfyUI's simple scheduler (last sigma 0.100); recorded in the checkpoint",
    "lambda_min": "lower end of lambda ~ U[lambda_min, lambda_max]",
    "lambda_max": "upper end of lambda ~ U[lambda_min, lambda_max]",
    "cads": "CADS prompt perturbation on the conditional branch",
    "cads_noise_scale": "CADS noise scale s (authors: 0.025)",
    "cads_tau1": "CADS tau1 (authors: 0)",
    "cads_tau2": "CADS tau2 (authors: 1)",
    "cads_psi": "CADS rescale mix psi (authors: 1)",
    "delta_weight": "fixed weight of the alignment (delta) term when balancing is off",
    "balance": "auto|on|off: weight the alignment term by EMA(quality)/EMA(alignment); auto = on for flow models, off for epsilon models",
    "balance_momentum": "EMA keep-fraction of the running balance",
    "mlp_hidden": "hidden width of the guidance MLP (paper: 128)",
    "mlp_layers": "hidden 128x128 layers of the guidance MLP (paper: 3)",
    "delta_normalization": "||delta|| is divided by this before the MLP (released SDXL checkpoint: 5)",
    "uncond": "auto|empty_prompt|zeros: the unconditional embedding; auto = zeros for SDXL folders with force_zeros_for_empty_prompt, else the empty prompt",
    "sd3_t5": "load and use the SD3 T5 encoder when the model has one (off: zeros, as the pipeline does without T5)",
    "precision": "auto|fp32|bf16|fp16: dtype of the frozen model (the MLP always trains in float32); auto = fp16 on a GPU, fp32 on the "
                 "CPU. bf16 is not recommended: delta = uncond - cond is a small difference and bf16 puts errors of 3-27 percent on "
                 "||delta|| of a full-size SDXL UNet (fp16: under 1 percent; docs/training.md)",
    "gradient_checkpointing": "recompute the frozen model's activations in pass 2 (+2 forwards per image); auto (unset) = on only "
                              "when pass 2's activations, measured once at start, would not fit the free memory",
    "max_grad_norm": "clip the MLP gradient norm (0 = no clipping)",
    "num_workers": "data loader worker processes",
    "checkpoint_every": "write a checkpoint and the resume state every N optimizer steps",
    "keep_checkpoints": "periodic checkpoints to keep (the final one is always kept)",
    "log_every": "write a line to train_log.jsonl every N optimizer steps",
    "resume": "continue from the resume state in the output folder",
    "device": "auto|cpu|cuda (accelerate picks the device per process; cpu forces the CPU)",
}


#: Settings with a fixed set of values (checked by ``validate`` and offered as choices by the CLI).
CHOICES = {
    "balance": ("auto", "on", "off"),
    "uncond": ("auto", "empty_prompt", "zeros"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "flow_spacing": ("diffusers", "simple"),
    "device": ("auto", "cpu", "cuda"),
}


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults are the paper's (AdamW 1e-3, wd 0.01, batch 1 x 16, 50-step grid,
    20k images, MLP 128 x 3); ``None`` means "chosen from the model" where the help says so."""

    model: str | None = None
    config_folder: str | None = None
    dataset: str | None = None
    output: str | None = None
    embeddings: str | None = None
    output_name: str | None = None
    model_family: str | None = None
    resolution: int | None = None
    caption_extension: str = ".txt"
    skip_missing_captions: bool = False
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 1
    gradient_accumulation: int = 16
    images: int = 20000
    max_steps: int | None = None
    grid_steps: int = 50
    flow_spacing: str = "diffusers"
    lambda_min: float = 0.0
    lambda_max: float = 1.0
    cads: bool = True
    cads_noise_scale: float = 0.025
    cads_tau1: float = 0.0
    cads_tau2: float = 1.0
    cads_psi: float = 1.0
    delta_weight: float = 1.0
    balance: str = "auto"
    balance_momentum: float = 0.99
    mlp_hidden: int = 128
    mlp_layers: int = 3
    delta_normalization: float = 5.0
    uncond: str = "auto"
    sd3_t5: bool = True
    precision: str = "auto"
    gradient_checkpointing: bool | None = None
    max_grad_norm: float = 1.0
    num_workers: int = 2
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    log_every: int = 10
    resume: bool = False
    device: str = "auto"
    # Filled in by the trainer (not settable): kept so a resume can check compatibility.
    extra: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------------------ validation
    def validate(self, need_paths: bool = True) -> TrainConfig:
        """Check ranges and choices; raise a one-line TrainingError naming the parameter."""
        if need_paths:
            for name in ("model", "dataset", "output"):
                if not getattr(self, name):
                    raise TrainingError(f"--{name.replace('_', '-')} is required ({HELP[name]})")
        positive = ("batch_size", "gradient_accumulation", "images", "grid_steps", "mlp_hidden", "checkpoint_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mlp_layers", "num_workers", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise TrainingError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainingError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise TrainingError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.grid_steps < 2 or self.grid_steps > 1000:
            raise TrainingError(f"grid_steps must be in [2, 1000], got {self.grid_steps}")
        if not 0.0 <= self.lambda_min <= self.lambda_max <= 1.0:
            raise TrainingError(f"need 0 <= lambda_min <= lambda_max <= 1, got {self.lambda_min} and {self.lambda_max}")
        for name in ("lr", "delta_normalization"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise TrainingError(f"{name} must be a positive number, got {value}")
        for name in ("weight_decay", "delta_weight", "max_grad_norm", "cads_noise_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise TrainingError(f"{name} must be a number >= 0, got {value}")
        if not 0.0 <= self.balance_momentum < 1.0:
            raise TrainingError(f"balance_momentum must be in [0, 1), got {self.balance_momentum}")
        if not 0.0 <= self.cads_psi <= 1.0:
            raise TrainingError(f"cads_psi must be in [0, 1], got {self.cads_psi}")
        if self.cads_tau2 <= self.cads_tau1:
            raise TrainingError(f"cads_tau2 must exceed cads_tau1, got {self.cads_tau1} and {self.cads_tau2}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise TrainingError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not self.caption_extension.startswith("."):
            raise TrainingError(f"caption_extension must start with a dot, got {self.caption_extension!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("extra")
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def config_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.name != "extra"]


def _field_kind(f: dataclasses.Field) -> type:
    """int, float, str or bool from the annotation ("int | None" -> int; annotations are strings here)."""
    first = str(f.type).split("|")[0].strip()
    return {"bool": bool, "int": int, "float": float, "str": str}[first]


def coerce(name: str, value: Any, source: str) -> Any:
    """Check a config-file value against the field's type (ints are accepted where floats are expected)."""
    f = {f.name: f for f in config_fields()}[name]
    if value is None:
        if "None" in str(f.type):
            return None
        raise TrainingError(f"{source}: {name} must not be null")
    kind = _field_kind(f)
    if name == "gradient_checkpointing" and value == "auto":
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, str):
        return value
    raise TrainingError(f"{source}: {name} must be a {kind.__name__}, got {value!r}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML (.yaml/.yml) or TOML (.toml) config file into checked ``TrainConfig`` keyword arguments."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ImportError:
                    raise TrainingError(f"{path}: TOML configs need Python 3.11+ or `pip install tomli`; or use YAML") from None
            data = tomllib.loads(text)
        else:
            raise TrainingError(f"{path}: config files must end in .yaml, .yml or .toml")
    except TrainingError:
        raise
    except Exception as exc:  # yaml.YAMLError / tomllib.TOMLDecodeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"{path}: cannot parse the config file ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainingError(f"{path}: the config file must be a mapping of settings, found a {type(data).__name__}")
    known = {f.name for f in config_fields()}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise TrainingError(f"{path}: unknown setting {key!r}")
        values[name] = coerce(name, value, str(path))
    return values


def build_config(file_values: dict[str, Any], cli_values: dict[str, Any]) -> TrainConfig:
    """defaults < file < command line (``cli_values`` holds only the flags that were given)."""
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    return TrainConfig(**merged)
