"""Wan 2.1 text-to-video (T2V 1.3B and 14B): WanTransformer3DModel on 5-D latents (B, 16, F, H/8, W/8) of the
AutoencoderKLWan video VAE (F = (frames - 1) / 4 + 1; a 1-frame clip, an image, is F = 1), flow matching with velocity
v = eps - x0, text from UMT5-XXL.

Exactly as ``diffusers.WanPipeline``:
* conditioning: the prompt cleaned by the pipeline's own ``prompt_clean``, tokenized to 512 tokens, the encoder's last
  hidden state cut to the prompt's tokens and zero-padded back to 512 (no mask reaches the transformer); the negative
  prompt defaults to "" (the unconditional embedding);
* latents: the VAE posterior normalised per channel, (x - latents_mean) / latents_std;
* the network call: ``transformer(hidden_states, timestep = sigma x 1000, encoder_hidden_states)``; CFG is
  uncond + w (cond - uncond) with no rescale;
* the grid: the folder's UniPCMultistepScheduler with ``use_flow_sigmas`` at its ``flow_shift`` (3 for the 480p 1.3B, 5
  for 720p). annealing.training_grid cannot describe UniPC's spacing of u (linspace(1, 1/T, N + 1)[:-1]); training
  uses, and records, the simple spacing at the same shift, at most 1/T away in u (training.backends.flow).
"""

from __future__ import annotations

import torch

from annealing.training_grid import FlowGrid

from ..algorithm import SamplingGrid
from ..errors import TrainingError
from .conditioning import TextCondition
from .flow import FlowSchedule
from .interface import FamilyBackend, ModelInfo, PipelineIndex, check_side
from .loading import import_diffusers, load_components

TEXT_TOKENS = 512  # WanPipeline's max_sequence_length


class Wan21(FamilyBackend):
    key = "wan21"
    title = "Wan 2.1 text-to-video (1.3B, 14B)"
    default_resolution = 480  # the 1.3B is a 480p model (480 x 832); training is square
    default_frames = 81  # the pipeline's default: 21 latent frames
    video = True
    prediction = "velocity"
    block_classes = ("WanTransformerBlock",)
    pipelines = ("WanPipeline",)

    # ------------------------------------------------------------------------------------------------ detection
    @classmethod
    def is_wan(cls, index: PipelineIndex) -> bool:
        return index.component("transformer") == "WanTransformer3DModel" or index.component("transformer_2") == "WanTransformer3DModel"

    @classmethod
    def is_wan22(cls, index: PipelineIndex) -> bool:
        """Wan 2.2: a second (low-noise) expert, per-token timesteps (TI2V-5B) or the 48-channel VAE."""
        if index.component("transformer_2") is not None or index.index.get("boundary_ratio") is not None or index.index.get("expand_timesteps"):
            return True
        return index.config("vae", what="the VAE config").get("z_dim") == 48

    @classmethod
    def matches(cls, index: PipelineIndex) -> bool:
        return cls.is_wan(index) and not cls.is_wan22(index)

    @classmethod
    def check_pipeline(cls, index: PipelineIndex) -> None:
        if index.pipeline_class not in cls.pipelines:
            raise TrainingError(f"{index.folder}: {index.pipeline_class} is not supported; only text-to-video folders ({', '.join(cls.pipelines)}) "
                                "are trained (image-to-video, VACE and animate pipelines condition on more than text)")

    @classmethod
    def describe(cls, index: PipelineIndex, details: dict | None = None) -> ModelInfo:
        cls.check_pipeline(index)
        folder = index.folder
        subfolder = "transformer" if index.component("transformer") else "transformer_2"
        network_config = index.config(subfolder, what="the transformer config")
        vae_config = index.config("vae", what="the VAE config")
        channels = vae_config.get("z_dim", 16)
        for key in ("latents_mean", "latents_std"):
            values = vae_config.get(key)
            if not (isinstance(values, list) and len(values) == channels and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
                raise TrainingError(f"{folder}: the VAE config's {key} must be {channels} numbers (one per latent channel)")
        if any(v <= 0 for v in vae_config["latents_std"]):
            raise TrainingError(f"{folder}: the VAE config's latents_std must be positive")
        if network_config.get("in_channels") != channels or network_config.get("out_channels", channels) != channels:
            raise TrainingError(f"{folder}: the transformer takes {network_config.get('in_channels')} channels, the VAE makes {channels} "
                                "(an image-to-video model?); only text-to-video is supported")
        if network_config.get("image_dim") is not None:
            raise TrainingError(f"{folder}: the transformer has an image encoder input (image_dim): an image-to-video model, not supported")
        scheduler_config = index.scheduler_config()
        FlowSchedule.from_config(folder, scheduler_config, "diffusers", allow_dynamic=False)
        return ModelInfo(family=cls.key, prediction_type="flow", pipeline_class=index.pipeline_class,
                         scheduler_class=str(scheduler_config.get("_class_name", "")), scheduler_config=scheduler_config,
                         source=index.source, config_folder=folder, single_file=index.single_file, network_config=network_config,
                         vae_config=vae_config, details=details or {})

    @classmethod
    def schedule(cls, info: ModelInfo) -> FlowSchedule:
        return FlowSchedule.from_config(info.config_folder, info.scheduler_config, "diffusers", allow_dynamic=False)

    @classmethod
    def latent_shape(cls, info: ModelInfo, resolution: int, frames: int = 1) -> tuple[int, ...]:
        temporal = int(info.vae_config.get("scale_factor_temporal") or 4)
        if frames < 1 or (frames - 1) % temporal:
            raise TrainingError(f"frames must be 1 + {temporal} k for the Wan VAE (1, {1 + temporal}, {1 + 2 * temporal}, ... 81), got {frames}")
        patch = info.network_config.get("patch_size", (1, 2, 2))
        if int(patch[0]) != 1:
            raise TrainingError(f"{info.source}: a temporal patch size of {patch[0]} is not supported")
        spatial = int(info.vae_config.get("scale_factor_spatial") or 8)
        side = check_side(resolution, spatial, int(patch[1]))
        return (int(info.vae_config.get("z_dim", 16)), (frames - 1) // temporal + 1, side, side)

    @classmethod
    def widths(cls, info: ModelInfo) -> tuple[int, int | None]:
        return int(info.network_config.get("text_dim", 4096)), None

    @classmethod
    def training_grid(cls, info: ModelInfo, num_steps: int, flow_spacing: str = "diffusers", resolution: int | None = None) -> FlowGrid:
        return cls.schedule(info).choose(num_steps, flow_spacing).grid

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def network_subfolder(cls, info: ModelInfo, expert: str) -> str:
        return "transformer"

    @classmethod
    def load(cls, info: ModelInfo, options):
        import_diffusers("WanPipeline", "WanTransformer3DModel", "AutoencoderKLWan")
        subfolder = cls.network_subfolder(info, options.expert) if options.load_network else "transformer"  # embed loads no network
        network, vae, text, scheduler = load_components(info, options, subfolder)
        mode = "empty_prompt" if options.uncond == "auto" else options.uncond
        return cls(info, network, vae, text, options.dtype, options.device, options.cads, options.resolution, mode, scheduler=scheduler,
                   frames=options.frames, expert=options.expert)

    # ------------------------------------------------------------------------------------------------ training
    def grid(self, num_steps: int, flow_spacing: str = "diffusers") -> SamplingGrid:
        schedule = self.schedule(self.info)
        if flow_spacing == "diffusers":
            schedule.check_scheduler(self.scheduler, num_steps, None, self.info.source)
        choice = schedule.choose(num_steps, flow_spacing)
        self.grid_note = choice.note
        return SamplingGrid.from_training_grid(choice.grid, "sigma_x1000").to(self.device)

    def _pipeline(self):
        """A WanPipeline holding only the text parts: its own ``encode_prompt`` makes the conditioning."""
        from diffusers import WanPipeline

        return WanPipeline(tokenizer=self.text["tokenizer"], text_encoder=self.text["text_encoder"], vae=None, scheduler=None)

    def encode_text(self, captions: list[str]) -> TextCondition:
        self._need_text()
        with torch.no_grad():
            embeds, _ = self._pipeline().encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=TEXT_TOKENS,
                                                       device=self.device)
        return TextCondition(embeds.float())

    def vae_input(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.unsqueeze(2) if pixels.dim() == 4 else pixels  # an image is a one-frame clip

    def network_timestep(self, model_timestep: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """sigma x 1000 as the pipeline passes it (float32: bf16 cannot represent most timesteps)."""
        return model_timestep.to(torch.float32)

    def predict(self, z: torch.Tensor, model_timestep: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        batch = z.shape[0]
        cond = cond.expand(batch) if cond.batch == 1 and batch > 1 else cond
        with self._grad_context(z):
            return self.network(hidden_states=z.to(self.dtype), timestep=self.network_timestep(model_timestep, z),
                                encoder_hidden_states=cond.embeds.to(self.dtype)).sample.float()

    def provenance(self) -> dict:
        schedule = self.schedule(self.info)
        out = {"trained_latent_shape": list(self.sample_shape), "frames": self.frames, "flow_shift": schedule.shift,
               "scheduler": schedule.scheduler_class}
        return dict(out, grid_note=self.grid_note) if self.grid_note else out


FAMILY = Wan21
