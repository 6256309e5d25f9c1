"""What SD1.x, SD2.x and SDXL share: a UNet2DConditionModel on a discrete DDPM schedule (epsilon or v-prediction, reported to
the algorithm as epsilon: v is turned into eps = sqrt(abar) v + sqrt(1 - abar) z), CLIP text encoders, an AutoencoderKL.

The families (sd15.py, sd2.py, sdxl.py) differ in what claims a folder and in their conditioning. The prediction type
comes from ``scheduler/scheduler_config.json``: epsilon and v_prediction UNets are supported; ``sample`` is refused.
"""

from __future__ import annotations

import torch

from annealing.training_grid import BETA_SCHEDULES, VPGrid

from ..algorithm import SamplingGrid
from ..errors import TrainingError
from .interface import FamilyBackend, ModelInfo, PipelineIndex
from .loading import LOCAL, import_diffusers, load_errors, to_device


class UNetFamily(FamilyBackend):
    """SD1.x / SD2.x / SDXL UNets; v-prediction outputs are converted to eps so delta is always in epsilon space."""

    prediction = "epsilon"
    block_classes = ("BasicTransformerBlock", "ResnetBlock2D")

    # ------------------------------------------------------------------------------------------------ detection
    @classmethod
    def unet_config(cls, index: PipelineIndex) -> dict | None:
        if index.component("unet") != "UNet2DConditionModel" or index.component("transformer") is not None:
            return None
        return index.config("unet", what="the UNet config")

    @classmethod
    def describe(cls, index: PipelineIndex) -> ModelInfo:
        folder = index.folder
        network_config = cls.unet_config(index)
        if network_config.get("in_channels", 4) != 4:
            raise TrainingError(f"{folder}: the UNet takes {network_config.get('in_channels')} input channels (an inpainting/depth model?); only 4 are supported")
        scheduler_config = index.scheduler_config()
        scheduler_class = str(scheduler_config.get("_class_name", ""))
        if scheduler_class.startswith("FlowMatch"):
            raise TrainingError(f"{folder}: a flow-matching scheduler with a UNet is not supported")
        if "EDM" in scheduler_class or scheduler_config.get("beta_schedule") is None:
            from .registry import supported

            raise TrainingError(f"{folder}: {scheduler_class or 'the scheduler'} has no DDPM beta schedule (an EDM/continuous-time model such as "
                                f"Playground v2.5?); supported: {supported()}")
        if scheduler_config.get("beta_schedule") not in BETA_SCHEDULES or scheduler_config.get("trained_betas") is not None:
            raise TrainingError(f"{folder}: beta schedule {scheduler_config.get('beta_schedule')!r} is not supported (supported: "
                                f"{', '.join(BETA_SCHEDULES)})")
        if scheduler_config.get("rescale_betas_zero_snr"):
            raise TrainingError(f"{folder}: zero-terminal-SNR schedules (rescale_betas_zero_snr) are not supported")
        prediction = scheduler_config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise TrainingError(f"{folder}: unsupported prediction type {prediction!r} (supported: epsilon, v_prediction, flow matching)")
        vae_config = index.config("vae", what="the VAE config")
        return ModelInfo(family=cls.key, prediction_type=prediction, pipeline_class=index.pipeline_class, scheduler_class=scheduler_class,
                         scheduler_config=scheduler_config, source=index.source, config_folder=folder, single_file=index.single_file,
                         force_zeros_for_empty_prompt=bool(index.index.get("force_zeros_for_empty_prompt", False)),
                         network_config=network_config, vae_config=vae_config)

    @classmethod
    def widths(cls, info: ModelInfo) -> tuple[int, int | None]:
        return info.network_config["cross_attention_dim"], None

    @classmethod
    def training_grid(cls, info: ModelInfo, num_steps: int, flow_spacing: str = "diffusers", resolution: int | None = None) -> VPGrid:
        """Upstream's DDIM grid (leading spacing, offset 0) on the scheduler's betas."""
        cfg = info.scheduler_config
        return VPGrid(num_steps=num_steps, beta_schedule=cfg.get("beta_schedule", "scaled_linear"),
                      beta_start=float(cfg.get("beta_start", 0.00085)), beta_end=float(cfg.get("beta_end", 0.012)),
                      num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)))

    # ------------------------------------------------------------------------------------------------ loading
    #: The text components of the family: (tokenizer, encoder) subfolder pairs.
    text_parts: tuple[tuple[str, str], ...] = (("tokenizer", "text_encoder"),)

    @classmethod
    def load(cls, info: ModelInfo, options):
        diffusers = import_diffusers()
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        folder, dtype = str(info.config_folder), options.dtype
        network = vae = text = None
        with load_errors(info.source):
            if info.single_file:
                extra = {}
                if cls.key in ("sd15", "sd2"):
                    extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
                pipe = getattr(diffusers, info.pipeline_class).from_single_file(str(info.source), config=folder, torch_dtype=dtype, **LOCAL, **extra)
                components = dict(pipe.components)
                network = components["unet"] if options.load_network else None
                vae = components["vae"].to(options.vae_dtype) if options.load_vae else None
                if options.load_text_encoders:
                    text = {name: components[name] for pair in cls.text_parts for name in pair}
                scheduler = components["scheduler"]
                del pipe, components
            else:
                if options.load_network:
                    network = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **LOCAL)
                if options.load_vae:
                    vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=options.vae_dtype, **LOCAL)
                scheduler = getattr(diffusers, info.scheduler_class).from_pretrained(folder, subfolder="scheduler", **LOCAL)
                if options.load_text_encoders:
                    text = {}
                    for n, (tok, enc) in enumerate(cls.text_parts):
                        encoder_cls = CLIPTextModel if n == 0 else CLIPTextModelWithProjection
                        text[tok] = CLIPTokenizer.from_pretrained(folder, subfolder=tok, **LOCAL)
                        text[enc] = encoder_cls.from_pretrained(folder, subfolder=enc, torch_dtype=dtype, **LOCAL)
        to_device((network, vae, *(text or {}).values()), options.device)
        if options.gradient_checkpointing and network is not None:
            network.enable_gradient_checkpointing()  # diffusers' default: non-reentrant, gradients still reach the input
        mode = options.uncond
        if mode == "auto":
            mode = "zeros" if cls.key == "sdxl" and info.force_zeros_for_empty_prompt else "empty_prompt"
        return cls(info, network, vae, text, dtype, options.device, options.cads, options.resolution, mode, scheduler=scheduler)

    # ------------------------------------------------------------------------------------------------ training
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float64)
        self._abar_device = self.alphas_cumprod.to(self.device, torch.float32)

    def grid(self, num_steps: int, flow_spacing: str = "diffusers") -> SamplingGrid:
        grid = self.info.training_grid(num_steps)
        if not torch.allclose(grid.alphas_cumprod(), self.alphas_cumprod, rtol=1e-5, atol=1e-7):
            raise TrainingError(f"{self.info.source}: the scheduler's alphas_cumprod differ from its {grid.beta_schedule} betas "
                                f"{grid.beta_start:g}..{grid.beta_end:g}; such a schedule cannot be recorded in the checkpoint")
        return SamplingGrid.from_training_grid(grid).to(self.device)

    def added_conditions(self, cond, batch: int) -> dict:
        """Keyword arguments beyond the token embeddings (SDXL's pooled embeddings and time ids)."""
        return {}

    def predict(self, z: torch.Tensor, model_timestep: torch.Tensor, cond) -> torch.Tensor:
        batch = z.shape[0]
        cond = cond.expand(batch) if cond.batch == 1 and batch > 1 else cond
        kwargs = self.added_conditions(cond, batch)
        with self._grad_context(z):
            out = self.network(z.to(self.dtype), model_timestep, encoder_hidden_states=cond.embeds.to(self.dtype), **kwargs).sample.float()
            if self.info.prediction_type == "v_prediction":
                abar = self._abar_device[model_timestep.round().long()].reshape(-1, *([1] * (z.dim() - 1)))
                out = abar.sqrt() * out + (1 - abar).sqrt() * z.float()
        return out

    def normalise_latents(self, raw: torch.Tensor) -> torch.Tensor:
        """(x - shift) * scaling, or with a per-channel mean/std in the VAE config (x - mean) * scaling / std, as the SDXL
        pipeline decodes such latents (x * std / scaling + mean)."""
        config = self.info.vae_config
        if config.get("latents_mean") is None:
            return super().normalise_latents(raw)
        shape = (1, -1) + (1,) * (raw.dim() - 2)
        mean = torch.tensor(config["latents_mean"], dtype=torch.float32, device=raw.device).reshape(shape)
        std = torch.tensor(config["latents_std"], dtype=torch.float32, device=raw.device).reshape(shape)
        return (raw.float() - mean) * float(config.get("scaling_factor", 1.0)) / std

    def provenance(self) -> dict:
        return {"trained_latent_shape": list(self.sample_shape)}
