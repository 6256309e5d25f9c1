"""Frozen diffusion models as :class:`training.algorithm.DenoiserBackend`: SD1.x/SD2.x and SDXL UNets (epsilon or
v-prediction, reported to the algorithm as epsilon) and SD3-family transformers (flow matching, velocity).

Detection reads only JSON configs, so a wrong folder fails in a second, before anything heavy is loaded:
* ``model_index.json`` with a ``transformer`` of class ``SD3Transformer2DModel``      -> sd3   (flow, velocity)
* ``unet/config.json`` with ``addition_embed_type == "text_time"``                    -> sdxl  (Pony, Illustrious, NoobAI, ...)
* another UNet with ``cross_attention_dim == 1024``                                   -> sd2
* another UNet                                                                        -> sd15
The prediction type comes from ``scheduler/scheduler_config.json``: epsilon and v_prediction UNets are supported
(v is turned into eps = sqrt(abar) v + sqrt(1 - abar) z); ``sample`` is refused; FlowMatch* schedulers mean velocity.

Conditioning (checked against the pipelines' ``encode_prompt``):
* sd15/sd2: last hidden state of the CLIP text encoder;
* sdxl:     [penultimate hidden of TE1, penultimate hidden of TE2] and TE2's projected pooled output; time ids (R, R, 0, 0, R, R);
* sd3:      [penultimate hiddens of TE1, TE2] zero-padded to the joint width, followed by T5 (or 256 zero tokens without T5);
            pooled = [TE1 pooled, TE2 pooled].
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from annealing.training_grid import BETA_SCHEDULES, FlowGrid, TrainingGrid, VPGrid

from .algorithm import CADSConfig, SamplingGrid, cads_perturb
from .errors import TrainingError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # training never downloads; a missing file is an error, not a fetch

SUPPORTED = "SD1.x/SD2.x UNets, SDXL UNets (incl. Pony/Illustrious/NoobAI fine-tunes) and SD3-family transformers"
DEFAULT_RESOLUTION = {"sd15": 512, "sd2": 768, "sdxl": 1024, "sd3": 1024}  # sd2: 768 for the v-prediction models, 512 for SD2-base
#: The families this package trains (``--model-family`` and ``ModelInfo.family`` take these names); the one list of them.
FAMILIES = tuple(DEFAULT_RESOLUTION)


def default_resolution(family: str, prediction_type: str) -> int:
    """The resolution a model was trained at: SD2-base (epsilon) is a 512 px model, SD2 768-v a 768 px one."""
    return 512 if family == "sd2" and prediction_type == "epsilon" else DEFAULT_RESOLUTION[family]
SD3_T5_TOKENS = 256


@dataclass
class ModelInfo:
    """What a model is, from its configs alone."""

    family: str  # sd15 | sd2 | sdxl | sd3
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

    @property
    def prediction_space(self) -> str:
        return "velocity" if self.prediction_type == "flow" else "epsilon"

    @property
    def timestep_convention(self) -> str:
        return "sigma_x1000" if self.prediction_type == "flow" else "ddpm_index"

    @property
    def base_model(self) -> str:
        return self.source.name

    def training_grid(self, num_steps: int, flow_spacing: str = "diffusers") -> TrainingGrid:
        """The grid training samples on, from the model's own schedule: upstream's DDIM grid (leading spacing, offset 0)
        on the scheduler's betas, or the flow grid at the scheduler's shift, spaced as diffusers' FlowMatchEulerDiscrete
        scheduler does (the SD3 pipelines' grid) or as ComfyUI's simple scheduler (``flow_spacing="simple"``)."""
        cfg = self.scheduler_config
        if self.prediction_type == "flow":
            return FlowGrid(num_steps=num_steps, shift=float(cfg.get("shift", 1.0)), spacing=flow_spacing,
                            num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)))
        return VPGrid(num_steps=num_steps, beta_schedule=cfg.get("beta_schedule", "scaled_linear"),
                      beta_start=float(cfg.get("beta_start", 0.00085)), beta_end=float(cfg.get("beta_end", 0.012)),
                      num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)))

    def condition_width(self) -> tuple[int, int | None]:
        """(token embedding width, pooled width or None) the network expects, from its config."""
        cfg = self.network_config
        if self.family == "sd3":
            return cfg["joint_attention_dim"], cfg["pooled_projection_dim"]
        pooled = None
        if self.family == "sdxl":
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        return cfg["cross_attention_dim"], pooled

    def prompt_embedding(self) -> tuple[str, int]:
        """(kind, width) of the prompt embedding a Learn to Guide network reads for this model: the pooled text embedding
        where the model has one (SDXL: TE2's projected pooled output; SD3: [TE1 pooled, TE2 pooled]), as ComfyUI's
        ``pooled_output``; else the mean of the token embeddings (SD1.x/SD2.x), as its ``cross_attn``."""
        tokens, pooled = self.condition_width()
        return ("pooled", pooled) if pooled is not None else ("mean_tokens", tokens)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, H, W) of the VAE latents of a resolution x resolution image."""
        factor = 2 ** (len(self.vae_config.get("block_out_channels", (0, 0, 0, 0))) - 1)
        patch = int(self.network_config.get("patch_size", 1) or 1)  # SD3 transformers cut the latent into patch x patch tokens
        if resolution % (factor * patch):
            raise TrainingError(f"resolution {resolution} is not a multiple of {factor * patch} (the VAE's downsampling factor {factor}"
                                f"{f' x the transformer patch size {patch}' if patch > 1 else ''})")
        return (int(self.vae_config.get("latent_channels", 4)), resolution // factor, resolution // factor)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"{path.parent}: missing {path.name} ({what})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"{path}: cannot read {what} ({exc})") from None
    if not isinstance(data, dict):
        raise TrainingError(f"{path}: {what} is not a JSON object")
    return data


def detect_model(model: str | os.PathLike, config_folder: str | os.PathLike | None = None) -> ModelInfo:
    """Classify a diffusers folder or a single-file checkpoint (with a config folder) from its configs; one-line errors."""
    source = Path(model)
    if not source.exists():
        raise TrainingError(f"{source}: model not found")
    single_file = source.is_file()
    if single_file:
        if source.suffix.lower() != ".safetensors":
            raise TrainingError(f"{source}: single-file checkpoints must be .safetensors (pickled .ckpt files are not loaded)")
        if config_folder is None:
            raise TrainingError(
                f"{source}: a single-file checkpoint needs --config-folder, a local diffusers folder of the same architecture "
                "(offline training cannot fetch configs from the hub)"
            )
        folder = Path(config_folder)
        if not folder.is_dir():
            raise TrainingError(f"{folder}: --config-folder must be a diffusers folder")
    else:
        folder = source
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        hint = " (this looks like a single component; pass the pipeline folder)" if (folder / "config.json").is_file() else ""
        raise TrainingError(f"{folder}: not a diffusers pipeline folder, no model_index.json{hint}")
    index = _read_json(index_path, "the pipeline index")
    pipeline_class = str(index.get("_class_name", "?"))

    def component(name):
        entry = index.get(name)
        return entry[1] if isinstance(entry, list) and len(entry) == 2 else None

    network_config: dict = {}
    if component("transformer") is not None:
        if component("transformer") != "SD3Transformer2DModel":
            raise TrainingError(f"{folder}: unsupported model {pipeline_class} ({component('transformer')}); supported: {SUPPORTED}")
        family = "sd3"
        network_config = _read_json(folder / "transformer" / "config.json", "the transformer config")
    elif component("unet") == "UNet2DConditionModel":
        network_config = _read_json(folder / "unet" / "config.json", "the UNet config")
        if network_config.get("addition_embed_type") == "text_time":
            if component("text_encoder") is None:
                raise TrainingError(f"{folder}: the SDXL refiner (no first text encoder) is not supported; use a base model")
            family = "sdxl"
        elif network_config.get("addition_embed_type") is None and network_config.get("class_embed_type") is None:
            family = "sd2" if network_config.get("cross_attention_dim") == 1024 else "sd15"
        else:
            raise TrainingError(f"{folder}: unsupported UNet conditioning in {pipeline_class}; supported: {SUPPORTED}")
        if network_config.get("in_channels", 4) != 4:
            raise TrainingError(f"{folder}: the UNet takes {network_config.get('in_channels')} input channels (an inpainting/depth model?); only 4 are supported")
    else:
        raise TrainingError(f"{folder}: unsupported model {pipeline_class}; supported: {SUPPORTED}")

    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json", "the scheduler config")
    scheduler_class = str(scheduler_config.get("_class_name", ""))
    if scheduler_class.startswith("FlowMatch"):
        if family != "sd3":
            raise TrainingError(f"{folder}: a flow-matching scheduler with a UNet is not supported")
        if scheduler_config.get("use_dynamic_shifting"):
            raise TrainingError(f"{folder}: schedulers with dynamic (resolution-dependent) shifting are not supported")
        prediction = "flow"
    else:
        if family == "sd3":
            raise TrainingError(f"{folder}: an SD3 transformer needs a flow-matching scheduler, found {scheduler_class}")
        if "EDM" in scheduler_class or scheduler_config.get("beta_schedule") is None:
            raise TrainingError(f"{folder}: {scheduler_class or 'the scheduler'} has no DDPM beta schedule (an EDM/continuous-time model such as "
                                f"Playground v2.5?); supported: {SUPPORTED}")
        if scheduler_config.get("beta_schedule") not in BETA_SCHEDULES or scheduler_config.get("trained_betas") is not None:
            raise TrainingError(f"{folder}: beta schedule {scheduler_config.get('beta_schedule')!r} is not supported (supported: "
                                f"{', '.join(BETA_SCHEDULES)})")
        if scheduler_config.get("rescale_betas_zero_snr"):
            raise TrainingError(f"{folder}: zero-terminal-SNR schedules (rescale_betas_zero_snr) are not supported")
        prediction = scheduler_config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise TrainingError(f"{folder}: unsupported prediction type {prediction!r} (supported: epsilon, v_prediction, flow matching)")
    vae_config = _read_json(folder / "vae" / "config.json", "the VAE config")
    if vae_config.get("latents_mean") is not None:
        raise TrainingError(f"{folder}: the VAE normalises latents per channel (latents_mean/latents_std), which is not supported")
    has_t5 = family == "sd3" and component("text_encoder_3") is not None
    return ModelInfo(
        family=family,
        prediction_type=prediction,
        pipeline_class=pipeline_class,
        scheduler_class=scheduler_class,
        scheduler_config=scheduler_config,
        source=source,
        config_folder=folder,
        single_file=single_file,
        has_t5=has_t5,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
        network_config=network_config,
        vae_config=vae_config,
    )


# ------------------------------------------------------------------------------------------------------------ conditioning


@dataclass
class TextCondition:
    """Token embeddings (B, L, D) and, for SDXL/SD3, pooled embeddings (B, P)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device, dtype=None) -> TextCondition:
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)

        return TextCondition(move(self.embeds), move(self.pooled))

    def expand(self, batch: int) -> TextCondition:
        def grow(t):
            return None if t is None else t.expand(batch, *t.shape[1:])

        return TextCondition(grow(self.embeds), grow(self.pooled))

    def repeat_interleave(self, repeats: int) -> TextCondition:
        """Each row ``repeats`` times in a row (Learn to Guide's particles of one image share its prompt)."""

        def grow(t):
            return None if t is None else t.repeat_interleave(repeats, dim=0)

        return TextCondition(grow(self.embeds), grow(self.pooled))

    @property
    def batch(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def stack_pair(first: TextCondition, second: TextCondition, batch: int) -> TextCondition | None:
        """[first; second] along the batch, each expanded to ``batch`` rows; None when their shapes cannot be stacked."""
        first = first.expand(batch) if first.batch == 1 else first
        second = second.expand(batch) if second.batch == 1 else second
        if first.embeds.shape != second.embeds.shape or (first.pooled is None) != (second.pooled is None):
            return None
        if first.pooled is not None and first.pooled.shape != second.pooled.shape:
            return None

        def join(a, b):
            return None if a is None else torch.cat([a, b.to(a.dtype)])

        return TextCondition(join(first.embeds, second.embeds), join(first.pooled, second.pooled))


# ------------------------------------------------------------------------------------------------------------ backends


class FrozenDiffusionBackend:
    """Common part of the backends: the frozen network, VAE, optional text encoders, and the training grid.

    ``predict`` builds an autograd graph only when its input requires grad (pass 2): pass 1's predictions do not depend
    on the MLP, so they run under ``no_grad`` (same values, no stored activations, no checkpoint recomputation).
    """

    prediction = "epsilon"

    def __init__(self, info: ModelInfo, network, vae, text: dict | None, dtype: torch.dtype, device: torch.device,
                 cads: CADSConfig, resolution: int, uncond_mode: str, scheduler=None):
        self.info, self.network, self.vae, self.text = info, network, vae, text
        self.dtype, self.device, self.cads, self.resolution = dtype, torch.device(device), cads, resolution
        self.uncond_mode = uncond_mode
        self.scheduler = scheduler
        for module in (network, vae, *(text or {}).values()):
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()

    # -- DenoiserBackend
    def perturb(self, cond: TextCondition, t_fraction: torch.Tensor, generator: torch.Generator | None) -> TextCondition:
        """CADS on the token embeddings and the pooled embeddings alike."""
        pooled = None if cond.pooled is None else cads_perturb(cond.pooled, t_fraction, self.cads, generator)
        return TextCondition(cads_perturb(cond.embeds, t_fraction, self.cads, generator), pooled)

    def predict_pair(self, z: torch.Tensor, model_timestep: torch.Tensor, cond: TextCondition,
                     uncond: TextCondition) -> tuple[torch.Tensor, torch.Tensor]:
        """(uncond, cond) predictions from one network call on [z; z] (SDXL's pooled embeddings and time ids ride along
        in ``predict``). Conditions of different token counts, which cannot share a batch, take two calls."""
        batch = z.shape[0]
        both = TextCondition.stack_pair(uncond, cond, batch)
        if both is None:
            return self.predict(z, model_timestep, uncond), self.predict(z, model_timestep, cond)
        timesteps = model_timestep.reshape(-1).expand(batch)
        out = self.predict(torch.cat([z, z]), torch.cat([timesteps, timesteps]), both)
        return out[:batch], out[batch:]

    def _grad_context(self, z: torch.Tensor):
        return contextlib.nullcontext() if z.requires_grad and torch.is_grad_enabled() else torch.no_grad()

    # -- images
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> float32 latents (sample of the VAE posterior - shift) * scaling."""
        vae_dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(pixels.to(self.device, vae_dtype)).latent_dist
        latents = posterior.sample(generator=generator).to(torch.float32)
        shift = self.vae.config.shift_factor or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    # -- text
    def _ids(self, tokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def encode_text(self, captions: list[str]) -> TextCondition:
        raise NotImplementedError

    def unconditional(self, store_uncond: dict | None = None) -> TextCondition:
        """The unconditional embedding (batch 1): the empty prompt, or zeros where the pipeline uses zeros."""
        if store_uncond is not None:
            empty = TextCondition(store_uncond["embeds"], store_uncond.get("pooled")).to(self.device, torch.float32)
        else:
            empty = self.encode_text([""])
        if self.uncond_mode == "zeros":
            return TextCondition(torch.zeros_like(empty.embeds), None if empty.pooled is None else torch.zeros_like(empty.pooled))
        return empty

    def grid(self, num_steps: int, flow_spacing: str = "diffusers") -> SamplingGrid:
        """The sampling grid (``flow_spacing`` matters for flow models only)."""
        raise NotImplementedError

    def condition_width(self) -> tuple[int, int | None]:
        """(token embedding width, pooled width or None) the network expects."""
        return self.info.condition_width()


class UNetBackend(FrozenDiffusionBackend):
    """SD1.x / SD2.x / SDXL UNets; v-prediction outputs are converted to eps so delta is always in epsilon space."""

    prediction = "epsilon"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float64)
        self._abar_device = self.alphas_cumprod.to(self.device, torch.float32)
        r = self.resolution
        self.time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=self.device)

    def grid(self, num_steps: int, flow_spacing: str = "diffusers") -> SamplingGrid:
        grid = self.info.training_grid(num_steps)
        if not torch.allclose(grid.alphas_cumprod(), self.alphas_cumprod, rtol=1e-5, atol=1e-7):
            raise TrainingError(f"{self.info.source}: the scheduler's alphas_cumprod differ from its {grid.beta_schedule} betas "
                                f"{grid.beta_start:g}..{grid.beta_end:g}; such a schedule cannot be recorded in the checkpoint")
        return SamplingGrid.from_training_grid(grid).to(self.device)


    def predict(self, z: torch.Tensor, model_timestep: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        batch = z.shape[0]
        cond = cond.expand(batch) if cond.batch == 1 and batch > 1 else cond
        kwargs = {}
        if self.info.family == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(self.dtype), "time_ids": self.time_ids.expand(batch, -1).to(self.dtype)}
        with self._grad_context(z):
            out = self.network(z.to(self.dtype), model_timestep, encoder_hidden_states=cond.embeds.to(self.dtype), **kwargs).sample.float()
            if self.info.prediction_type == "v_prediction":
                abar = self._abar_device[model_timestep.round().long()].reshape(-1, *([1] * (z.dim() - 1)))
                out = abar.sqrt() * out + (1 - abar).sqrt() * z.float()
        return out

    def encode_text(self, captions: list[str]) -> TextCondition:
        if self.text is None:
            raise TrainingError("text encoders were not loaded (training with precomputed embeddings)")
        with torch.no_grad():
            if self.info.family != "sdxl":
                te = self.text["text_encoder"]
                return TextCondition(te(self._ids(self.text["tokenizer"], captions))[0].float())
            o1 = self.text["text_encoder"](self._ids(self.text["tokenizer"], captions), output_hidden_states=True)
            o2 = self.text["text_encoder_2"](self._ids(self.text["tokenizer_2"], captions), output_hidden_states=True)
            embeds = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
            return TextCondition(embeds.float(), o2.text_embeds.float())


class SD3Backend(FrozenDiffusionBackend):
    """SD3-family flow transformers: the network predicts the velocity v = eps - x0 at x = (1 - s) x0 + s eps."""

    prediction = "velocity"

    def grid(self, num_steps: int, flow_spacing: str = "diffusers") -> SamplingGrid:
        grid = self.info.training_grid(num_steps, flow_spacing)
        if flow_spacing == "diffusers" and hasattr(self.scheduler, "set_timesteps"):
            # the folder's own scheduler must agree: options the grid does not describe (karras/exponential/beta sigmas,
            # shift_terminal, ...) would make the recorded grid wrong
            import copy

            scheduler = copy.deepcopy(self.scheduler)
            scheduler.set_timesteps(num_steps)
            theirs = torch.as_tensor(scheduler.sigmas, dtype=torch.float64).cpu()
            if theirs.shape != grid.sigmas().shape or not torch.allclose(theirs, grid.sigmas(), rtol=1e-5, atol=1e-6):
                raise TrainingError(f"{self.info.source}: the scheduler's {num_steps}-step sigmas differ from a shift-{grid.shift:g} "
                                    "flow grid; train with --flow-spacing simple or a plain FlowMatchEulerDiscreteScheduler config")
        return SamplingGrid.from_training_grid(grid, "sigma_x1000").to(self.device)


    def predict(self, z: torch.Tensor, model_timestep: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        batch = z.shape[0]
        cond = cond.expand(batch) if cond.batch == 1 and batch > 1 else cond
        with self._grad_context(z):
            # float32 timesteps, as the pipeline passes them: bf16 cannot even represent 981 exactly
            return self.network(hidden_states=z.to(self.dtype), timestep=model_timestep.to(torch.float32),
                                encoder_hidden_states=cond.embeds.to(self.dtype),
                                pooled_projections=cond.pooled.to(self.dtype)).sample.float()

    def encode_text(self, captions: list[str]) -> TextCondition:
        if self.text is None:
            raise TrainingError("text encoders were not loaded (training with precomputed embeddings)")
        with torch.no_grad():
            o1 = self.text["text_encoder"](self._ids(self.text["tokenizer"], captions), output_hidden_states=True)
            o2 = self.text["text_encoder_2"](self._ids(self.text["tokenizer_2"], captions), output_hidden_states=True)
            clip = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
            pooled = torch.cat([o1.text_embeds, o2.text_embeds], dim=-1)
            joint = self.info.network_config["joint_attention_dim"]
            if "text_encoder_3" in self.text:
                tok = self.text["tokenizer_3"]
                ids = tok(captions, padding="max_length", max_length=SD3_T5_TOKENS, truncation=True, add_special_tokens=True,
                          return_tensors="pt").input_ids.to(self.device)
                t5 = self.text["text_encoder_3"](ids)[0]
            else:
                t5 = torch.zeros(len(captions), SD3_T5_TOKENS, joint, dtype=clip.dtype, device=clip.device)
            clip = torch.nn.functional.pad(clip, (0, joint - clip.shape[-1]))
            return TextCondition(torch.cat([clip, t5.to(clip.dtype)], dim=-2).float(), pooled.float())


# ------------------------------------------------------------------------------------------------------------ loading


def _import_diffusers():
    try:
        import diffusers
        import transformers  # noqa: F401
    except ImportError as exc:
        raise TrainingError(f"training needs the optional dependencies: pip install -e '.[train]' ({exc})") from None
    return diffusers


def load_backend(info: ModelInfo, *, device, dtype: torch.dtype, resolution: int, load_text_encoders: bool = True,
                 use_t5: bool = True, uncond: str = "auto", cads: CADSConfig = CADSConfig(),
                 gradient_checkpointing: bool = False, vae_dtype: torch.dtype = torch.float32, text_only: bool = False) -> FrozenDiffusionBackend:
    """Load the frozen components (local files only) and wrap them in the right backend.

    ``text_only`` loads just the tokenizers and text encoders (for ``python -m training embed``)."""
    diffusers = _import_diffusers()
    import transformers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = str(info.config_folder)
    common = {"local_files_only": True}
    transformers.utils.logging.disable_progress_bar()  # per-component "Loading weights" bars would bury the training bar
    diffusers.utils.logging.disable_progress_bar()
    try:
        if info.single_file:
            pipeline_cls = getattr(diffusers, info.pipeline_class)
            extra = {"text_encoder_3": None, "tokenizer_3": None} if info.family == "sd3" and not (use_t5 and load_text_encoders) else {}
            if info.family in ("sd15", "sd2"):
                extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            pipe = pipeline_cls.from_single_file(str(info.source), config=folder, torch_dtype=dtype, **common, **extra)
            components = dict(pipe.components)
            network = None if text_only else components["transformer" if info.family == "sd3" else "unet"]
            vae = None if text_only else components["vae"].to(vae_dtype)
            text = None
            if load_text_encoders:
                names = ["tokenizer", "text_encoder"] + (["tokenizer_2", "text_encoder_2"] if info.family in ("sdxl", "sd3") else [])
                if info.family == "sd3" and use_t5 and components.get("text_encoder_3") is not None:
                    names += ["tokenizer_3", "text_encoder_3"]
                text = {n: components[n] for n in names}
            scheduler = components["scheduler"]
            del pipe, components
        else:
            network = vae = None
            if text_only:
                pass
            elif info.family == "sd3":
                network = diffusers.SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype, **common)
            else:
                network = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **common)
            if not text_only:
                vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=vae_dtype, **common)
            scheduler = getattr(diffusers, info.scheduler_class).from_pretrained(folder, subfolder="scheduler", **common)
            text = None
            if load_text_encoders:
                text = {"tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **common)}
                first = CLIPTextModelWithProjection if info.family == "sd3" else CLIPTextModel
                text["text_encoder"] = first.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype, **common)
                if info.family in ("sdxl", "sd3"):
                    text["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", **common)
                    text["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", torch_dtype=dtype, **common)
                if info.family == "sd3" and info.has_t5 and use_t5:
                    from transformers import AutoTokenizer, T5EncoderModel

                    text["tokenizer_3"] = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_3", **common)
                    text["text_encoder_3"] = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3", torch_dtype=dtype, **common)
    except TrainingError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"{info.source}: cannot load the model ({type(exc).__name__}: {first[:300]})") from None

    for module in (network, vae, *(text or {}).values()):
        if isinstance(module, torch.nn.Module):
            module.to(device)
    if gradient_checkpointing and network is not None:
        network.enable_gradient_checkpointing()  # diffusers' default: non-reentrant, gradients still reach the input
    mode = uncond
    if mode == "auto":
        mode = "zeros" if info.family == "sdxl" and info.force_zeros_for_empty_prompt else "empty_prompt"
    cls = SD3Backend if info.family == "sd3" else UNetBackend
    return cls(info, network, vae, text, dtype, device, cads, resolution, mode, scheduler=scheduler)
