"""Training configuration: defaults from the paper, overridable from a YAML/TOML file and then from the command line.

Precedence: dataclass defaults < config file < command-line flags. Keys of a config file are the field names below
(dashes or underscores); an unknown key or a value of the wrong type is a one-line :class:`TrainingError`.
Values are only ever parsed as data (``yaml.safe_load`` / ``tomllib``), never evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annealing

from .backends import FAMILIES
from .data import IMAGE_EXTENSIONS
from .errors import TrainingError
from .files import read_text, shown
from .video import MAX_CLIP_PIXELS

# name -> help text; the order is the order of ``--help``.
HELP = {
    "model": "diffusers pipeline folder (model_index.json) or a single-file .safetensors checkpoint",
    "config_folder": "for a single-file checkpoint: a local diffusers folder of the same architecture that provides the configs and tokenizers",
    "dataset": "folder of images with same-named .txt captions (img2dataset layout) or a .jsonl manifest of {image, caption}",
    "output": "output folder (checkpoints, resume state, log and report)",
    "embeddings": "folder written by `python -m training embed`: precomputed text embeddings, the text encoders are then not loaded",
    "method": "annealing|learn-to-guide: what to train. annealing: the paper's guidance MLP w(t, ||delta||, lambda) (Algorithm 1); "
              "learn-to-guide: a CFG scale 1 + omega(t, s, prompt) per sampling step (Galashov et al., arXiv 2510.00815; the "
              "lambda, CADS, balance, delta and mlp settings are annealing's and do not apply)",
    "output_name": "file name of the trained checkpoint without extension (default annealing_<family>, or learn_to_guide_<family>)",
    "model_family": f"family name written into the checkpoint metadata, one of {', '.join(FAMILIES)} (default: detected)",
    "resolution": "square training resolution in pixels (default: the family's: 1024 for SDXL, SD3, Qwen-Image and Chroma, 768 for SD2, "
                  "512 for SD1.x, 480 for Wan 2.1, 704 for Wan 2.2)",
    "frames": "video families (Wan): frames per clip, 1 + 4k (default 81, the pipelines'; 1 trains on images, each a one-frame clip); "
              "image families: 1",
    "frame_stride": "video families: read every N-th frame of a clip",
    "expert": "auto|high|low: Wan 2.2 A14B trains one checkpoint per expert, high (transformer, t >= the boundary) or low (transformer_2); "
              "auto for every other model",
    "fsdp": "shard the frozen network across the processes with HF Accelerate's FSDP (FSDP2, one unit per transformer block), for networks "
            "too large for one GPU; needs several processes (accelerate launch / torchrun)",
    "caption_extension": "caption file extension in an image folder",
    "skip_missing_captions": "skip images without a caption instead of stopping with an error",
    "seed": "random seed; the same seed and config give the same weights",
    "lr": "AdamW learning rate (paper: 1e-3)",
    "weight_decay": "AdamW weight decay (paper: 0.01)",
    "batch_size": "micro-batch size per process",
    "gradient_accumulation": "micro-batches per optimizer step (paper: batch 1 x 16 accumulation)",
    "images": "training images to draw in total; steps = images / (batch_size x gradient_accumulation x processes) (paper: 20000)",
    "max_steps": "optimizer steps (overrides --images)",
    "grid_steps": "sampling grid timesteps are drawn from (paper: 50); learn-to-guide draws continuous times and only records this "
                  "grid in its checkpoint (the explorer draws along it)",
    "flow_spacing": "flow models: diffusers|simple spacing of the grid; diffusers = the diffusers pipeline's own (SD3: "
                    "FlowMatchEulerDiscreteScheduler's, last sigma 0.0089 at 28 steps, shift 3; Qwen-Image, Chroma: linspace(1, 1/N); Wan's "
                    "UniPC: its nearest, the simple one), simple = ComfyUI's simple scheduler (last sigma 0.100); recorded in the checkpoint",
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
    "resume": "continue the run whose resume state is in the output folder (its output name too); Ctrl-C saves one",
    "overwrite": "start again in an output folder that holds this run, removing its files (checkpoints, resume state, log, report); "
                 "another run's files are never removed",
    "device": "auto|cpu|cuda (accelerate picks the device per process; cpu forces the CPU)",
    "l2g_particles": "learn-to-guide: particles per image, m (paper: 4); the frozen model runs on 2m latents per image",
    "l2g_objective": "learn-to-guide: energy|l2, the distance between the guided and the true particle sets (paper: energy, "
                     "its eq. 9 MMD with --l2g-beta and --l2g-lambda, the energy distance at their defaults; l2: its eq. 21, "
                     "E||x_s(omega) - x_s||^2 over independent pairs)",
    "l2g_beta": "learn-to-guide, energy objective: the distance kernel's exponent beta in (0, 2] (1: the energy distance; the paper "
                "ablates 0.1 to 1.75, best near 1)",
    "l2g_lambda": "learn-to-guide, energy objective: the weight lambda in [0, 1] of the sets' self-distances (1: the energy "
                  "distance; 0: the cross term alone)",
    "l2g_s_min": "learn-to-guide: the smallest normalised time s is drawn from, S_min (ours: 0.001)",
    "l2g_zeta": "learn-to-guide: t stays below 1 - zeta, away from pure noise (ours: 0.001)",
    "l2g_delta": "learn-to-guide: the smallest gap t - s, delta (paper: about 0.1; it reports 0.01 worse)",
    "l2g_time_input": "learn-to-guide: log_snr|cosine, how t and s enter the network (paper: log_snr, the log-SNR through a small "
                      "MLP; cosine: the pack's earlier cosine features of t / 1000)",
    "l2g_reward": "learn-to-guide: none|clip; clip adds gamma_R x the negated CLIP score of the guided x0-prediction (the paper's "
                  "reward variant; needs --l2g-reward-model)",
    "l2g_reward_model": "learn-to-guide: a local CLIP folder (transformers CLIPModel with model.safetensors and its tokenizer) for "
                        "--l2g-reward clip; nothing is downloaded",
    "l2g_reward_weight": "learn-to-guide: gamma_R, the reward term's weight (ours: 1; the paper's value was not available to us)",
    "l2g_hidden": "learn-to-guide: hidden width of the network's head (ours: 128)",
    "l2g_layers": "learn-to-guide: hidden-to-hidden layers of the head (ours: 2)",
    "l2g_projection": "learn-to-guide: width the prompt embedding is projected to (ours: 32)",
    "l2g_initial_scale": "learn-to-guide: the CFG scale the untrained network gives at every step and prompt (ours: 3)",
}


#: Settings with a fixed set of values (checked by ``validate`` and offered as choices by the CLI).
CHOICES = {
    "balance": ("auto", "on", "off"),
    "uncond": ("auto", "empty_prompt", "zeros"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "flow_spacing": ("diffusers", "simple"),
    "device": ("auto", "cpu", "cuda"),
    "method": ("annealing", "learn-to-guide"),
    "l2g_objective": ("energy", "l2"),
    "expert": ("auto", "high", "low"),
    "l2g_time_input": ("log_snr", "cosine"),
    "l2g_reward": ("none", "clip"),
}
#: The families ``--model-family`` may name: those the training package has a backend for (one registry, training.backends).
#: Not an argparse choice, so a wrong name is the same one-line error from a flag or a config file.
FAMILY_CHOICE = {"model_family": FAMILIES}


#: Inclusive bounds of every integer setting (``None`` stays allowed where the field allows it). They keep a stranger's
#: config from asking for gigabytes or a run of centuries; each is far beyond any sensible value.
INT_BOUNDS = {
    "seed": (0, 2**63 - 1),  # torch generators take 64-bit seeds; the data order adds the epoch to it
    "resolution": (8, 4096),
    "frames": (1, 257),
    "frame_stride": (1, 64),
    "batch_size": (1, 1024),
    "gradient_accumulation": (1, 65536),
    "images": (1, 10**9),
    "max_steps": (1, 10**9),
    "grid_steps": (2, 1000),
    "mlp_hidden": (1, 2048),  # 16 times the paper's 128; with the paper's 3 layers 13 M parameters (the core allows 33.5 M in all)
    "mlp_layers": (0, 16),
    "num_workers": (0, 64),
    "checkpoint_every": (1, 10**9),
    "keep_checkpoints": (0, 10**4),
    "log_every": (1, 10**9),
    "l2g_particles": (2, 64),  # the frozen model's batch is 2 x particles x batch_size
    "l2g_hidden": (1, 2048),
    "l2g_layers": (0, 16),
    "l2g_projection": (1, 1024),  # the core's bound on an embedding width
}
#: (low, high, low excluded, high excluded) of every float setting; NaN and infinity are always refused.
FLOAT_BOUNDS = {
    "lr": (0.0, 1.0, True, False),
    "weight_decay": (0.0, 10.0, False, False),
    "lambda_min": (0.0, 1.0, False, False),
    "lambda_max": (0.0, 1.0, False, False),
    "cads_noise_scale": (0.0, 10.0, False, False),
    "cads_tau1": (0.0, 1.0, False, False),
    "cads_tau2": (0.0, 1.0, False, False),
    "cads_psi": (0.0, 1.0, False, False),
    "delta_weight": (0.0, 1e6, False, False),
    "balance_momentum": (0.0, 1.0, False, True),
    "delta_normalization": (0.0, 1e6, True, False),
    "max_grad_norm": (0.0, 1e6, False, False),
    "l2g_initial_scale": (1.0, 100.0, True, False),  # 1 + omega, omega > 0: at omega = 0 the ReLU output has no gradient
    "l2g_beta": (0.0, 2.0, True, False),
    "l2g_lambda": (0.0, 1.0, False, False),
    "l2g_s_min": (0.0, 1.0, True, True),
    "l2g_zeta": (0.0, 1.0, True, True),
    "l2g_delta": (0.0, 1.0, True, True),
    "l2g_reward_weight": (0.0, 1e6, False, False),
}
#: Settings of one method only; the other method does not read them (a run says which of them were set).
ANNEALING_SETTINGS = ("lambda_min", "lambda_max", "cads", "cads_noise_scale", "cads_tau1", "cads_tau2", "cads_psi", "delta_weight", "balance",
                      "balance_momentum", "mlp_hidden", "mlp_layers", "delta_normalization", "gradient_checkpointing")
L2G_SETTINGS = ("l2g_particles", "l2g_objective", "l2g_beta", "l2g_lambda", "l2g_s_min", "l2g_zeta", "l2g_delta", "l2g_time_input",
                "l2g_hidden", "l2g_layers", "l2g_projection", "l2g_initial_scale", "l2g_reward", "l2g_reward_model", "l2g_reward_weight")
PATH_SETTINGS = ("model", "config_folder", "dataset", "output", "embeddings", "l2g_reward_model")
MAX_PATH_CHARS = 4096
MAX_NAME_CHARS = 128
#: A config file holds about 45 short settings (~2 KB); anything far larger is not one.
MAX_CONFIG_BYTES = 64 * 1024
#: Nesting a flat mapping of settings needs 2 levels; deeper input is refused before it can exhaust the parser's stack.
MAX_YAML_DEPTH = 8
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_CAPTION_EXTENSION = re.compile(r"^\.[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}$")
_NAME_PUNCTUATION = set("_-.+ ()[]")


def _bound(value: int) -> str:
    return "2^63 - 1" if value == 2**63 - 1 else f"{value:,}".replace(",", "_") if value >= 10**6 else str(value)


def valid_file_stem(name: str) -> bool:
    """A plain file name: no separators, no drive, not hidden (our temp files start with a dot), nothing Windows trims."""
    return (
        0 < len(name) <= MAX_NAME_CHARS
        and (name[0].isalnum() or name[0] == "_")
        and name[-1] not in ". "
        and all(c.isalnum() or c in _NAME_PUNCTUATION for c in name)
    )



# ---------------------------------------------------------------------------------------------------- validation rules
# Each check returns the one-line problem, or None. ``TrainConfig.validate`` runs them in table order.

#: Settings without which nothing can run.
REQUIRED = ("model", "dataset", "output")


def _type_problem(f: dataclasses.Field, value) -> str | None:
    if value is None and "None" in str(f.type):
        return None
    kind = _field_kind(f)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool)
    return None if ok else f"{f.name} must be {_KIND_NAMES[kind]}, got {shown(value)}"


def _int_problem(name: str, value: int, bounds: tuple[int, int]) -> str | None:
    low, high = bounds
    return None if low <= value <= high else f"{name} must be an integer in [{_bound(low)}, {_bound(high)}], got {shown(value)}"


def _float_problem(name: str, value: float, bounds: tuple[float, float, bool, bool]) -> str | None:
    low, high, open_low, open_high = bounds
    if math.isfinite(value) and (low < value if open_low else low <= value) and (value < high if open_high else value <= high):
        return None
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    return f"{name} must be a finite number in {interval}, got {shown(value)}"


def _choice_problem(name: str, value: str, allowed: tuple[str, ...]) -> str | None:
    return None if value in allowed else f"{name} must be one of {', '.join(allowed)}; got {shown(value)}"


def _path_problem(name: str, value: str, _rule=None) -> str | None:
    if value and "\0" not in value and len(value) <= MAX_PATH_CHARS:
        return None
    return f"{name} must be a path of 1 to {MAX_PATH_CHARS} characters without NUL bytes, got {shown(value)}"


#: (settings -> their rule, the check that applies it), for the settings whose rule is a bound, a set or a path.
FIELD_TABLES = (
    (INT_BOUNDS, _int_problem),
    (FLOAT_BOUNDS, _float_problem),
    (CHOICES, _choice_problem),
    (FAMILY_CHOICE, _choice_problem),
    (dict.fromkeys(PATH_SETTINGS), _path_problem),
)


def _resolution_rule(c: TrainConfig) -> str | None:
    return f"resolution must be a multiple of 8, got {c.resolution}" if c.resolution is not None and c.resolution % 8 else None


def _clip_size_rule(c: TrainConfig) -> str | None:
    if c.frames is None or c.frames * (c.resolution or 1024) ** 2 <= MAX_CLIP_PIXELS:
        return None
    return f"frames x resolution^2 must be at most {MAX_CLIP_PIXELS:,} pixels per clip, got {c.frames} frames at {c.resolution or 1024} px"


def _lambda_rule(c: TrainConfig) -> str | None:
    return None if c.lambda_min <= c.lambda_max else f"need 0 <= lambda_min <= lambda_max <= 1, got {c.lambda_min} and {c.lambda_max}"


def _cads_rule(c: TrainConfig) -> str | None:
    return None if c.cads_tau2 > c.cads_tau1 else f"cads_tau2 must exceed cads_tau1, got {c.cads_tau1} and {c.cads_tau2}"


def _caption_extension_rule(c: TrainConfig) -> str | None:
    if not _CAPTION_EXTENSION.match(c.caption_extension):
        return f"caption_extension must be a dot and 1 to 31 letters, digits, _ . or -, got {shown(c.caption_extension)}"
    if c.caption_extension.lower() in IMAGE_EXTENSIONS:
        return f"caption_extension must not be an image extension, got {shown(c.caption_extension)}"
    return None


def _output_name_rule(c: TrainConfig) -> str | None:
    if c.output_name is None or valid_file_stem(c.output_name):
        return None
    return (f"output_name must be a file name without extension: 1 to {MAX_NAME_CHARS} letters, digits, spaces or _ - . + ( ) [ ], "
            f"starting with a letter, digit or _ (no folders), got {shown(c.output_name)}")


def _resume_rule(c: TrainConfig) -> str | None:
    if c.resume and c.overwrite:
        return "resume and overwrite exclude each other: --resume continues the run in the output folder, --overwrite starts it again"
    return None


def _annealing_network_rule(c: TrainConfig) -> str | None:
    try:  # the core's own architecture bounds (it may be stricter than ours)
        annealing.GuidanceModelConfig(hidden_size=c.mlp_hidden, n_layers=c.mlp_layers, delta_embed_normalization=c.delta_normalization)
    except ValueError as exc:
        return f"guidance MLP settings (mlp_hidden, mlp_layers, delta_normalization): {exc}"
    return None


def _l2g_network_rule(c: TrainConfig) -> str | None:
    if c.method != "learn-to-guide":
        return None
    try:  # the prompt width is the model's, known once its configs are read; 1 checks everything else now
        c.l2g_network_config(prompt_dim=1)
    except ValueError as exc:
        return f"learn-to-guide network settings (l2g_hidden, l2g_layers, l2g_projection): {exc}"
    return None


def _l2g_times_rule(c: TrainConfig) -> str | None:
    if c.method != "learn-to-guide":
        return None
    try:
        c.l2g_time_region()
    except ValueError as exc:
        return f"learn-to-guide times (l2g_s_min, l2g_delta, l2g_zeta): {exc}"
    return None


def _l2g_reward_rule(c: TrainConfig) -> str | None:
    if c.method == "learn-to-guide" and c.l2g_reward == "clip" and not c.l2g_reward_model:
        return "l2g_reward clip needs l2g_reward_model, a local CLIP folder (--l2g-reward-model DIR)"
    return None


#: Rules of several settings together, or beyond one setting's type, bound and set; checked after the tables.
RULES = (_resolution_rule, _clip_size_rule, _lambda_rule, _cads_rule, _caption_extension_rule, _output_name_rule, _resume_rule,
         _annealing_network_rule, _l2g_network_rule, _l2g_times_rule, _l2g_reward_rule)

@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults are the paper's (AdamW 1e-3, wd 0.01, batch 1 x 16, 50-step grid,
    20k images, MLP 128 x 3); ``None`` means "chosen from the model" where the help says so."""

    model: str | None = None
    config_folder: str | None = None
    dataset: str | None = None
    output: str | None = None
    embeddings: str | None = None
    method: str = "annealing"
    output_name: str | None = None
    model_family: str | None = None
    resolution: int | None = None
    frames: int | None = None
    frame_stride: int = 1
    expert: str = "auto"
    fsdp: bool = False
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
    overwrite: bool = False
    device: str = "auto"
    l2g_particles: int = 4
    l2g_objective: str = "energy"
    l2g_beta: float = 1.0
    l2g_lambda: float = 1.0
    l2g_s_min: float = 0.001
    l2g_zeta: float = 0.001
    l2g_delta: float = 0.1
    l2g_time_input: str = "log_snr"
    l2g_hidden: int = 128
    l2g_layers: int = 2
    l2g_projection: int = 32
    l2g_initial_scale: float = 3.0
    l2g_reward: str = "none"
    l2g_reward_model: str | None = None
    l2g_reward_weight: float = 1.0

    def validate(self, need_paths: bool = True) -> TrainConfig:
        """Check every setting's type, finiteness, range and name; raise a one-line TrainingError naming the setting.

        Runs before anything is read or loaded, so a bad value never costs a model load or a training run. The rules are
        the tables above and :data:`RULES`, checked in that order; the first problem found is the one reported."""
        for name in REQUIRED if need_paths else ():
            if not getattr(self, name):
                raise TrainingError(f"--{name.replace('_', '-')} is required ({HELP[name]})")
        for f in config_fields():
            problem = _type_problem(f, getattr(self, f.name))
            if problem:
                raise TrainingError(problem)
        for table, check in FIELD_TABLES:
            for name, rule in table.items():
                value = getattr(self, name)
                problem = None if value is None else check(name, value, rule)
                if problem:
                    raise TrainingError(problem)
        for rule in RULES:
            problem = rule(self)
            if problem:
                raise TrainingError(problem)
        return self

    def l2g_network_config(self, prompt_dim: int, prompt_embedding: str = "pooled", normalization: float = 1000.0):
        """The :class:`annealing.LearnToGuideConfig` these settings describe, for a prompt embedding of that width and
        timesteps normalised by ``normalization`` (a DDPM schedule's T; 1000 for flow sigma x 1000): its time inputs are
        clamped to the region training draws them from, [S_min, 1 - zeta]."""
        return annealing.LearnToGuideConfig(prompt_dim=prompt_dim, prompt_embedding=prompt_embedding, projection_size=self.l2g_projection,
                                            hidden_size=self.l2g_hidden, n_layers=self.l2g_layers, time_input=self.l2g_time_input,
                                            time_min=self.l2g_s_min, time_max=1.0 - self.l2g_zeta, t_embed_normalization=float(normalization))

    def l2g_time_region(self):
        """The :class:`training.learn_to_guide.TimeRegion` (s, t) are drawn from."""
        from .learn_to_guide import TimeRegion

        return TimeRegion(s_min=self.l2g_s_min, zeta=self.l2g_zeta, delta=self.l2g_delta)

    def inapplicable(self) -> list[str]:
        """The settings this run does not use that differ from their defaults: the other method's, and within Learn to
        Guide the energy objective's beta and lambda under l2, the reward's settings without a reward."""
        names = list(ANNEALING_SETTINGS if self.method == "learn-to-guide" else L2G_SETTINGS)
        if self.method == "learn-to-guide":
            names += ["l2g_beta", "l2g_lambda"] if self.l2g_objective == "l2" else []
            names += ["l2g_reward_model", "l2g_reward_weight"] if self.l2g_reward == "none" else []
        defaults = {f.name: f.default for f in config_fields()}
        return [name for name in names if getattr(self, name) != defaults[name]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


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
            try:
                return float(value)
            except OverflowError:  # a 400-digit integer: out of range, which validate() then says
                return math.inf if value > 0 else -math.inf
    elif isinstance(value, str):
        return value
    raise TrainingError(f"{source}: {name} must be {_KIND_NAMES[kind]}, got {shown(value)}")


def _safe_yaml_loader():
    """``yaml.SafeLoader`` that refuses aliases (a 400-byte "billion laughs" file expands to gigabytes through them, and a
    flat mapping of settings never needs one) and nesting deeper than a config file can use."""
    import yaml

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                line = self.peek_event().start_mark.line + 1
                raise TrainingError(f"line {line}: YAML aliases (*name) are not allowed in config files; write the value out")
            if self.depth >= MAX_YAML_DEPTH:
                raise TrainingError(f"line {self.peek_event().start_mark.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels")
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return Loader


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML (.yaml/.yml) or TOML (.toml) config file into checked ``TrainConfig`` keyword arguments.

    The file is bounded (a regular file of at most ``MAX_CONFIG_BYTES``, UTF-8) before it is parsed, YAML aliases are
    refused, and no error message echoes more than a short piece of a value."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise TrainingError(f"{path}: config files must end in .yaml, .yml or .toml")
    if not path.exists():
        raise TrainingError(f"{path}: config file not found")
    text = read_text(path, MAX_CONFIG_BYTES, "config file")
    try:
        if suffix in (".yaml", ".yml"):
            loader = _safe_yaml_loader()(text)
            try:
                data = loader.get_single_data()
            finally:
                loader.dispose()
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ImportError:
                    raise TrainingError("TOML configs need Python 3.11+ or `pip install tomli`; or use YAML") from None
            data = tomllib.loads(text)
    except TrainingError as exc:
        raise TrainingError(f"{path}: {exc}") from None
    except RecursionError:
        raise TrainingError(f"{path}: cannot parse the config file (nested too deeply)") from None
    except Exception as exc:  # yaml.YAMLError / tomllib.TOMLDecodeError / ValueError for a number too long to convert
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"{path}: cannot parse the config file ({first[:200]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainingError(f"{path}: the config file must be a mapping of settings, found a {type(data).__name__}")
    known = {f.name for f in config_fields()}
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_") if isinstance(key, str) else None
        if name not in known:
            raise TrainingError(f"{path}: unknown setting {shown(key)}")
        values[name] = coerce(name, value, str(path))
    return values


def build_config(file_values: dict[str, Any], cli_values: dict[str, Any]) -> TrainConfig:
    """defaults < file < command line (``cli_values`` holds only the flags that were given)."""
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    return TrainConfig(**merged)
