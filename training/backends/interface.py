"""The one interface every model family implements, and what it shares.

A family is one module in this package with one class, a :class:`FamilyBackend` subclass, registered by one line in
:mod:`training.backends.registry`. The class says, in this order:

* what the family is, from its configs alone: :meth:`~FamilyBackend.matches` (does a pipeline folder's
  ``model_index.json`` name this family's network?) and :meth:`~FamilyBackend.describe` (read and check its configs,
  one-line errors, nothing loaded) -> :class:`ModelInfo`; :meth:`~FamilyBackend.latent_shape`,
  :meth:`~FamilyBackend.widths` and :meth:`~FamilyBackend.training_grid` answer from that record alone;
* how to load its frozen network in the precision asked for: :meth:`~FamilyBackend.load` (local files only);
* how prompts become its conditioning: :meth:`~FamilyBackend.encode_text` (precomputed embeddings skip it);
* its noise schedule and the grid its pipelines sample on: :meth:`~FamilyBackend.training_grid` and :meth:`grid`;
* one network call: :meth:`~FamilyBackend.predict`, which :meth:`predict_pair` calls once with the batch 2B
  [uncond; cond] (:class:`training.algorithm.DenoiserBackend` is what the losses see).

Class attributes say the rest: ``key`` (``--model`` detection's answer and the checkpoint's ``model_family``), ``title``,
the default resolution and frames, ``video`` (reads clips), ``prediction`` (epsilon or velocity), the half precision it
runs in on a GPU, whether its pipeline pads prompts to the longest (``pads_to_longest``) and the block classes FSDP
wraps (``block_classes``).

Everything else (CADS, the unconditional embedding, VAE encoding with a scalar or per-channel latent normalisation,
gradients only where pass 2 needs them) is shared here.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from annealing.training_grid import FlowGrid, TrainingGrid, VPGrid

from ..algorithm import CADSConfig, SamplingGrid, cads_perturb
from ..errors import TrainingError
from .conditioning import TextCondition

#: Bytes a JSON config of a pipeline folder may have (real ones are a few KiB; a tokenizer's are read by transformers).
MAX_CONFIG_BYTES = 4 * 2**20


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a config file, bounded; one-line errors naming the file."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise TrainingError(f"{path}: {what} is larger than {MAX_CONFIG_BYTES // 2**20} MiB")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"{path.parent}: missing {path.name} ({what})") from None
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
        raise TrainingError(f"{path}: cannot read {what} ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise TrainingError(f"{path}: {what} is not a JSON object")
    return data


class PipelineIndex:
    """A diffusers pipeline folder as detection sees it: ``model_index.json`` and, read on demand, its components' configs."""

    def __init__(self, folder: Path, source: Path, single_file: bool):
        self.folder, self.source, self.single_file = folder, source, single_file
        self.index = read_json(folder / "model_index.json", "the pipeline index")
        self.pipeline_class = str(self.index.get("_class_name", "?"))
        self._configs: dict[str, dict] = {}

    def component(self, name: str) -> str | None:
        """The class name of a component (``["diffusers", "UNet2DConditionModel"]`` -> its second part), None if absent."""
        entry = self.index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
            return entry[1]
        return None

    def config(self, subfolder: str, file: str = "config.json", what: str | None = None) -> dict:
        key = f"{subfolder}/{file}"
        if key not in self._configs:
            self._configs[key] = read_json(self.folder / subfolder / file, what or f"the {subfolder} config")
        return self._configs[key]

    def scheduler_config(self) -> dict:
        return self.config("scheduler", "scheduler_config.json", "the scheduler config")


@dataclass
class ModelInfo:
    """What a model is, from its configs alone (written by its family's ``describe``)."""

    family: str  # the registry key: sd15 | sd2 | sdxl | sd3 | wan21 | wan22 | qwen_image | chroma | ...
    prediction_type: str  # epsilon | v_prediction | flow
    pipeline_class: str
    scheduler_class: str
    scheduler_config: dict
    source: Path  # the folder or the single file
    config_folder: Path  # where the configs are (the folder itself, or --config-folder)
    single_file: bool = False
    has_t5: bool = False
    force_zeros_for_empty_prompt: bool = False
    network_config: dict = field(default_factory=dict)
    vae_config: dict = field(default_factory=dict)
    #: Family-specific facts from the configs (Wan 2.2's experts and boundary, a dynamic-shift rule, ...): JSON values.
    details: dict = field(default_factory=dict)

    @property
    def spec(self) -> type[FamilyBackend]:
        """The family's class (its module is imported on first use)."""
        from .registry import family_class

        return family_class(self.family)

    @property
    def prediction_space(self) -> str:
        return "velocity" if self.prediction_type == "flow" else "epsilon"

    @property
    def timestep_convention(self) -> str:
        return "sigma_x1000" if self.prediction_type == "flow" else "ddpm_index"

    @property
    def base_model(self) -> str:
        return self.source.name

    @property
    def default_resolution(self) -> int:
        return self.spec.resolution_default(self)

    @property
    def default_frames(self) -> int:
        return self.spec.default_frames

    def training_grid(self, num_steps: int, flow_spacing: str = "diffusers", resolution: int | None = None) -> TrainingGrid:
        return self.spec.training_grid(self, num_steps, flow_spacing, resolution)

    def condition_width(self) -> tuple[int, int | None]:
        return self.spec.widths(self)

    def prompt_embedding(self) -> tuple[str, int]:
        """(kind, width) of the prompt embedding a Learn to Guide network reads for this model: the pooled text embedding
        where the model has one (SDXL: TE2's projected pooled output; SD3: [TE1 pooled, TE2 pooled]), as ComfyUI's
        ``pooled_output``; else the mean of the token embeddings (SD1.x/SD2.x, Wan, Qwen-Image, Chroma), as its ``cross_attn``."""
        tokens, pooled = self.condition_width()
        return ("pooled", pooled) if pooled is not None else ("mean_tokens", tokens)

    def latent_shape(self, resolution: int, frames: int | None = None) -> tuple[int, ...]:
        """The shape of one latent as the network and ComfyUI see it: (C, H, W) for image families, (C, F, H, W) for the
        families with a video VAE (Wan; Qwen-Image with F = 1), checked against the family's downsampling and patching."""
        return tuple(self.spec.latent_shape(self, resolution, frames or self.default_frames))


@dataclass(frozen=True)
class LoadOptions:
    """What :meth:`FamilyBackend.load` is asked to load, and how."""

    device: torch.device
    dtype: torch.dtype  # the frozen network's (and the text encoders')
    resolution: int
    vae_dtype: torch.dtype = torch.float32
    load_network: bool = True
    load_vae: bool = True  # False: latents are precomputed (python -m training embed --latents)
    load_text_encoders: bool = True  # False: text embeddings are precomputed
    use_t5: bool = True  # SD3's optional T5
    uncond: str = "auto"  # auto | empty_prompt | zeros
    cads: CADSConfig = CADSConfig()
    gradient_checkpointing: bool = False
    frames: int = 1
    expert: str = "auto"  # Wan 2.2 A14B: high | low


def spatial_factor(vae_config: dict) -> int:
    """The VAE's spatial downsampling from its config (AutoencoderKL: 2^(blocks - 1); Wan/Qwen VAEs say it)."""
    if vae_config.get("scale_factor_spatial"):
        return int(vae_config["scale_factor_spatial"])
    if vae_config.get("temperal_downsample") is not None:
        return 2 ** len(vae_config["temperal_downsample"]) * int(vae_config.get("patch_size") or 1)
    return 2 ** (len(vae_config.get("block_out_channels", (0, 0, 0, 0))) - 1)


def check_side(resolution: int, factor: int, patch: int, what: str = "resolution") -> int:
    """resolution // factor, refusing a resolution the VAE and the patch size do not divide."""
    if resolution % (factor * patch):
        raise TrainingError(f"{what} {resolution} is not a multiple of {factor * patch} (the VAE's downsampling factor {factor}"
                            f"{f' x the transformer patch size {patch}' if patch > 1 else ''})")
    return resolution // factor


class FamilyBackend:
    """One model family: the interface (see the module docstring) and the parts all families share.

    ``predict`` builds an autograd graph only when its input requires grad (pass 2): pass 1's predictions do not depend
    on the MLP, so they run under ``no_grad`` (same values, no stored activations, no checkpoint recomputation).
    """

    # ------------------------------------------------------------------------------------------------ what a family is
    key: ClassVar[str] = ""
    title: ClassVar[str] = ""  # for messages and docs: "Wan 2.1 text-to-video (1.3B, 14B)"
    default_resolution: ClassVar[int] = 1024
    default_frames: ClassVar[int] = 1
    video: ClassVar[bool] = False  # reads clips: frames > 1 allowed
    prediction: ClassVar[str] = "epsilon"  # the space of predict's output: epsilon | velocity
    #: The pipeline pads a batch's prompts to the longest of them, masked (Qwen-Image): precomputed rows are then stored
    #: trimmed to their own tokens, so a batch is padded as the pipeline would pad it.
    pads_to_longest: ClassVar[bool] = False
    #: Class names of the network's repeated blocks (FSDP wraps each one: training.backends.sharding).
    block_classes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def matches(cls, index: PipelineIndex) -> bool:
        """Whether ``model_index.json`` names this family's network (cheap; detection asks each family in registry order)."""
        raise NotImplementedError

    @classmethod
    def describe(cls, index: PipelineIndex) -> ModelInfo:
        """Read and check the configs of a folder this family matched; one-line :class:`TrainingError` for what it cannot train."""
        raise NotImplementedError

    @classmethod
    def resolution_default(cls, info: ModelInfo) -> int:
        return cls.default_resolution

    @classmethod
    def half_precision(cls, info: ModelInfo) -> str:
        """The half precision the network runs in: fp16 (the default on a GPU: it keeps ||delta|| within 1 % where bf16
        does not, docs/training.md), or bf16 for networks whose activations overflow fp16 (ComfyUI runs them in bf16 or
        fp32 only: Qwen-Image, Wan 2.2 TI2V-5B)."""
        return "fp16"

    @classmethod
    def check_options(cls, info: ModelInfo, expert: str = "auto", fsdp: bool = False, precision: str = "auto") -> None:
        """Refuse run options this model does not take (one line, before anything is loaded)."""
        if expert != "auto":
            raise TrainingError(f"{info.source}: --expert {expert} applies to two-expert models (Wan 2.2 A14B) only; this is one network")
        if fsdp and not cls.block_classes:
            raise TrainingError(f"{info.source}: --fsdp needs the network's block classes, which the {cls.key} family does not name")
        if precision == "fp16" and cls.half_precision(info) != "fp16":
            raise TrainingError(f"{info.source}: {cls.title} overflows float16 (ComfyUI runs it in bf16 or fp32 only); use --precision bf16 "
                                "or fp32 (auto picks bf16 on a GPU)")

    @classmethod
    def latent_shape(cls, info: ModelInfo, resolution: int, frames: int = 1) -> tuple[int, ...]:
        """(C, H, W) of the latents of a resolution x resolution image (families with a video VAE override it)."""
        if frames != 1:
            raise TrainingError(f"{info.source}: {cls.title or cls.key} is an image model; frames must be 1, got {frames}")
        patch = int(info.network_config.get("patch_size", 1) or 1)
        side = check_side(resolution, spatial_factor(info.vae_config), patch)
        return (int(info.vae_config.get("latent_channels", 4)), side, side)

    @classmethod
    def widths(cls, info: ModelInfo) -> tuple[int, int | None]:
        """(token embedding width, pooled width or None) the network expects, from its config."""
        raise NotImplementedError

    @classmethod
    def training_grid(cls, info: ModelInfo, num_steps: int, flow_spacing: str = "diffusers", resolution: int | None = None) -> TrainingGrid:
        """The grid training samples on, from the model's own schedule (recorded in the checkpoint: it fixes what w means)."""
        raise NotImplementedError

    @classmethod
    def load(cls, info: ModelInfo, options: LoadOptions) -> FamilyBackend:
        """Load the frozen components the options ask for (local files only) and wrap them in this class."""
        raise NotImplementedError

    def encode_text(self, captions: list[str]) -> TextCondition:
        """Prompts -> the conditioning the network reads (float32), exactly as the family's pipeline encodes them."""
        raise NotImplementedError

    def predict(self, z: torch.Tensor, model_timestep: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """The network's prediction (float32, ``prediction`` space) at z (B, *latent_shape) for per-sample timesteps
        (B,) in the grid's ``model_timesteps`` units, under ``cond``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ shared
    def __init__(self, info: ModelInfo, network, vae, text: dict | None, dtype: torch.dtype, device, cads: CADSConfig,
                 resolution: int, uncond_mode: str, scheduler=None, frames: int = 1, expert: str = "auto"):
        self.info, self.network, self.vae, self.text = info, network, vae, text
        self.dtype, self.device, self.cads, self.resolution = dtype, torch.device(device), cads, resolution
        self.uncond_mode, self.scheduler, self.frames, self.expert = uncond_mode, scheduler, frames, expert
        self.grid_note: str | None = None  # set by ``grid`` where the recorded grid is the nearest one to the pipeline's
        for module in (network, vae, *(text or {}).values()):
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one latent at this run's resolution and frames (``latent_shape`` answers for any)."""
        return self.info.latent_shape(self.resolution, self.frames)

    def perturb(self, cond: TextCondition, t_fraction: torch.Tensor, generator: torch.Generator | None) -> TextCondition:
        """CADS on the token embeddings and the pooled embeddings alike (the mask is kept)."""
        pooled = None if cond.pooled is None else cads_perturb(cond.pooled, t_fraction, self.cads, generator)
        return TextCondition(cads_perturb(cond.embeds, t_fraction, self.cads, generator), pooled, cond.mask)

    def predict_pair(self, z: torch.Tensor, model_timestep: torch.Tensor, cond: TextCondition,
                     uncond: TextCondition) -> tuple[torch.Tensor, torch.Tensor]:
        """(uncond, cond) predictions from one network call on [z; z] (pooled embeddings, masks and time ids ride along
        in ``predict``). Conditions of different token counts without masks, which cannot share a batch, take two calls."""
        batch = z.shape[0]
        both = TextCondition.stack_pair(uncond, cond, batch)
        if both is None:
            return self.predict(z, model_timestep, uncond), self.predict(z, model_timestep, cond)
        timesteps = model_timestep.reshape(-1).expand(batch)
        out = self.predict(torch.cat([z, z]), torch.cat([timesteps, timesteps]), both)
        return out[:batch], out[batch:]

    def _grad_context(self, z: torch.Tensor):
        return contextlib.nullcontext() if z.requires_grad and torch.is_grad_enabled() else torch.no_grad()

    def condition_width(self) -> tuple[int, int | None]:
        return self.info.condition_width()

    def grid(self, num_steps: int, flow_spacing: str = "diffusers") -> SamplingGrid:
        """The sampling grid training draws from (``flow_spacing`` matters for flow models only)."""
        grid = self.info.training_grid(num_steps, flow_spacing, self.resolution)
        convention = "ddpm_index" if isinstance(grid, VPGrid) else "sigma_x1000"
        return SamplingGrid.from_training_grid(grid, convention).to(self.device)

    def provenance(self) -> dict:
        """Family facts for the checkpoint's ``training`` record (JSON values): what a user of the checkpoint needs to know
        about the schedule and latents it was trained on beyond the grid itself. ``trained_latent_shape`` is one latent's
        shape as the network and ComfyUI see it, [C, H, W] or [C, F, H, W] (until the metadata has a field for it)."""
        out = {"trained_latent_shape": list(self.sample_shape)}
        if self.info.prediction_type == "flow":
            grid = self.info.training_grid(2, "simple", self.resolution)
            out["flow_shift"] = float(grid.shift) if isinstance(grid, FlowGrid) else None
        return out

    # -- latents
    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def vae_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels as the VAE takes them: (B, 3, H, W) images for a 2-D VAE; (B, 3, F, H, W) for a video VAE."""
        return pixels

    @torch.no_grad()
    def latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior of pixels in [-1, 1], float32, before the latent normalisation."""
        if self.vae is None:
            raise TrainingError("the VAE was not loaded (training with precomputed latents)")
        posterior = self.vae.encode(self.vae_input(pixels).to(self.device, self._vae_dtype())).latent_dist
        return posterior.mean.to(torch.float32), posterior.std.to(torch.float32)

    def normalise_latents(self, raw: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the network's latents: (x - shift) * scaling, or per channel (x - mean) / std (Wan, Qwen-Image)."""
        config = self.info.vae_config
        if config.get("latents_mean") is not None:
            shape = (1, -1) + (1,) * (raw.dim() - 2)
            mean = torch.tensor(config["latents_mean"], dtype=torch.float32, device=raw.device).reshape(shape)
            inverse_std = 1.0 / torch.tensor(config["latents_std"], dtype=torch.float32, device=raw.device).reshape(shape)
            return (raw.float() - mean) * inverse_std  # as the pipelines write it (multiplying by 1 / std)
        shift = config.get("shift_factor") or 0.0
        return (raw.float() - shift) * float(config.get("scaling_factor", 1.0))

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> float32 latents: a sample of the VAE posterior, normalised."""
        if self.vae is None:
            raise TrainingError("the VAE was not loaded (training with precomputed latents)")
        posterior = self.vae.encode(self.vae_input(pixels).to(self.device, self._vae_dtype())).latent_dist
        return self.normalise_latents(posterior.sample(generator=generator).to(torch.float32))

    def batch_latents(self, batch: dict, generator: torch.Generator | None) -> torch.Tensor:
        """A collated batch's latents: drawn from its precomputed posterior, or encoded from its pixels by the VAE."""
        if "latent_mean" in batch:
            return self.latents_from_distribution(batch["latent_mean"], batch["latent_std"], generator)
        return self.encode_images(batch["pixels"], generator)

    def latents_from_distribution(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Precomputed posterior (mean, std) -> normalised latents, drawn as ``DiagonalGaussianDistribution.sample`` draws."""
        mean, std = mean.to(self.device, torch.float32), std.to(self.device, torch.float32)
        gen_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=torch.float32).to(mean.device)
        return self.normalise_latents(mean + std * noise)

    # -- text
    def _ids(self, tokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def _need_text(self) -> None:
        if self.text is None:
            raise TrainingError("text encoders were not loaded (training with precomputed embeddings)")

    def unconditional(self, store_uncond: dict | None = None) -> TextCondition:
        """The unconditional embedding (batch 1): the empty prompt, or zeros where the pipeline uses zeros."""
        if store_uncond is not None:
            empty = TextCondition(store_uncond["embeds"], store_uncond.get("pooled"), store_uncond.get("mask")).to(self.device, torch.float32)
        else:
            empty = self.encode_text([""])
        if self.uncond_mode == "zeros":
            return TextCondition(torch.zeros_like(empty.embeds), None if empty.pooled is None else torch.zeros_like(empty.pooled), empty.mask)
        return empty

