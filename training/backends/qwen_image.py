"""Qwen-Image (text-to-image, 20B MMDiT): QwenImageTransformer2DModel on 2 x 2-packed latents of the Wan-style
AutoencoderKLQwenImage (16 channels, a video VAE run on one frame), flow matching with velocity v = eps - x0, text from
Qwen2.5-VL.

Latents are kept as ComfyUI keeps them (its Wan21 latent format): (B, 16, 1, H/8, W/8), so ||delta|| is measured on the
tensor ComfyUI's guider sees; ``predict`` packs them for the transformer and unpacks its output. Exactly as
``diffusers.QwenImagePipeline``:
* conditioning: the pipeline's own ``encode_prompt`` (its chat template, the template's first 34 tokens dropped, the
  last hidden state, padded to the longest prompt with a token mask; no mask where every token counts). The pipeline
  applies CFG only with a negative prompt; the unconditional embedding is the empty prompt's, ComfyUI's empty negative;
* latents: (x - latents_mean) / latents_std per channel;
* the network call: ``transformer(packed, timestep = sigma, encoder_hidden_states, encoder_hidden_states_mask, img_shapes)``;
* CFG: the pipeline's ``true_cfg_scale`` rescales the guided prediction per token to the conditional one's norm. The
  annealing step is defined on the plain combination uncond + w (cond - uncond), which is also what ComfyUI's
  samplers apply to Qwen-Image, so training does not rescale;
* the grid: sigmas = linspace(1, 1/N, N) shifted by the resolution-dependent dynamic shift, shift = exp(mu) with mu
  linear in the token count (H/16)(W/16) (base_shift 0.5 at 256 tokens, max_shift 0.9 at 8192: shift 2.0 at 1024 px),
  then stretched to shift_terminal 0.02. annealing.training_grid cannot describe the stretch; training uses, and
  records, the unstretched grid at the trained resolution's shift, with the rule and the resolution in the checkpoint.
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

TEXT_TOKENS = 1024  # QwenImagePipeline's max_sequence_length


class QwenImage(FamilyBackend):
    key = "qwen_image"
    title = "Qwen-Image"
    default_resolution = 1024  # the pipeline's default (default_sample_size 128 x 8)
    prediction = "velocity"
    pads_to_longest = True  # encode_prompt pads to the batch's longest prompt
    block_classes = ("QwenImageTransformerBlock",)
    #: diffusers classes the family needs (older releases lack them: a one-line error says so).
    needs = ("QwenImagePipeline", "QwenImageTransformer2DModel", "AutoencoderKLQwenImage")

    @classmethod
    def matches(cls, index: PipelineIndex) -> bool:
        return index.component("transformer") == "QwenImageTransformer2DModel"

    @classmethod
    def describe(cls, index: PipelineIndex) -> ModelInfo:
        folder = index.folder
        if index.pipeline_class != "QwenImagePipeline":
            raise TrainingError(f"{folder}: {index.pipeline_class} is not supported; only text-to-image QwenImagePipeline folders are trained")
        network_config = index.config("transformer", what="the transformer config")
        vae_config = index.config("vae", what="the VAE config")
        channels = int(vae_config.get("z_dim", 16))
        patch = int(network_config.get("patch_size", 2))
        if network_config.get("in_channels") != channels * patch * patch or network_config.get("out_channels", channels) != channels:
            raise TrainingError(f"{folder}: the transformer's channels ({network_config.get('in_channels')} in) do not fit the VAE's {channels} "
                                f"latent channels packed {patch} x {patch}")
        if network_config.get("guidance_embeds"):
            raise TrainingError(f"{folder}: a guidance-distilled transformer (guidance_embeds) has no real CFG to anneal")
        for key in ("latents_mean", "latents_std"):
            values = vae_config.get(key)
            if not (isinstance(values, list) and len(values) == channels):
                raise TrainingError(f"{folder}: the VAE config's {key} must be {channels} numbers (one per latent channel)")
        scheduler_config = index.scheduler_config()
        FlowSchedule.from_config(folder, scheduler_config, "simple", allow_dynamic=True)
        return ModelInfo(family=cls.key, prediction_type="flow", pipeline_class=index.pipeline_class,
                         scheduler_class=str(scheduler_config.get("_class_name", "")), scheduler_config=scheduler_config,
                         source=index.source, config_folder=folder, single_file=index.single_file, network_config=network_config,
                         vae_config=vae_config)

    @classmethod
    def half_precision(cls, info: ModelInfo) -> str:
        return "bf16"  # its activations overflow float16 (ComfyUI: bf16 or fp32 only)

    @classmethod
    def schedule(cls, info: ModelInfo) -> FlowSchedule:
        return FlowSchedule.from_config(info.config_folder, info.scheduler_config, "simple", allow_dynamic=True)

    @classmethod
    def latent_shape(cls, info: ModelInfo, resolution: int, frames: int = 1) -> tuple[int, ...]:
        if frames != 1:
            raise TrainingError(f"{info.source}: Qwen-Image is an image model; frames must be 1, got {frames}")
        side = check_side(resolution, 8, int(info.network_config.get("patch_size", 2)))
        return (int(info.vae_config.get("z_dim", 16)), 1, side, side)

    @classmethod
    def image_tokens(cls, info: ModelInfo, resolution: int) -> int:
        """The packed image's token count, which sets the dynamic shift: (H/16) (W/16) at 8x VAE, 2 x 2 patches."""
        _, _, side, _ = cls.latent_shape(info, resolution)
        patch = int(info.network_config.get("patch_size", 2))
        return (side // patch) ** 2

    @classmethod
    def widths(cls, info: ModelInfo) -> tuple[int, int | None]:
        return int(info.network_config.get("joint_attention_dim", 3584)), None

    @classmethod
    def training_grid(cls, info: ModelInfo, num_steps: int, flow_spacing: str = "diffusers", resolution: int | None = None) -> FlowGrid:
        tokens = cls.image_tokens(info, resolution or cls.default_resolution)
        return cls.schedule(info).choose(num_steps, flow_spacing, tokens).grid

    @classmethod
    def load(cls, info: ModelInfo, options):
        import_diffusers(*cls.needs)
        network, vae, text, scheduler = load_components(info, options)
        mode = "empty_prompt" if options.uncond == "auto" else options.uncond
        return cls(info, network, vae, text, options.dtype, options.device, options.cads, options.resolution, mode, scheduler=scheduler)

    @classmethod
    def pipeline_name(cls) -> str:
        return "QwenImagePipeline"

    # ------------------------------------------------------------------------------------------------ training
    def tokens(self) -> int:
        return self.image_tokens(self.info, self.resolution)

    def grid(self, num_steps: int, flow_spacing: str = "diffusers") -> SamplingGrid:
        schedule = self.schedule(self.info)
        if flow_spacing == "diffusers":  # the folder's own scheduler must give what our reading of its config gives
            schedule.check_scheduler(self.scheduler, num_steps, self.tokens(), self.info.source)
        choice = schedule.choose(num_steps, flow_spacing, self.tokens())
        self.grid_note = choice.note
        return SamplingGrid.from_training_grid(choice.grid, "sigma_x1000").to(self.device)

    def _pipeline(self):
        import diffusers

        return getattr(diffusers, self.pipeline_name())(scheduler=None, vae=None, text_encoder=self.text["text_encoder"],
                                                        tokenizer=self.text["tokenizer"], transformer=None)

    def encode_text(self, captions: list[str]) -> TextCondition:
        self._need_text()
        with torch.no_grad():
            embeds, mask = self._pipeline().encode_prompt(captions, device=self.device, max_sequence_length=TEXT_TOKENS)
        if mask is None:  # every token counts; a mask of ones lets conditions of other lengths be padded to share a call
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return TextCondition(embeds.float(), None, mask)

    def vae_input(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.unsqueeze(2) if pixels.dim() == 4 else pixels

    def predict(self, z: torch.Tensor, model_timestep: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        from diffusers import QwenImagePipeline

        batch, channels, _, height, width = z.shape
        cond = cond.expand(batch) if cond.batch == 1 and batch > 1 else cond
        mask = cond.mask
        if mask is not None and bool(mask.bool().all()):
            mask = None  # as encode_prompt passes it when every token counts
        packed = QwenImagePipeline._pack_latents(z.to(self.dtype), batch, channels, height, width)
        with self._grad_context(z):
            out = self.network(hidden_states=packed, timestep=model_timestep.to(torch.float32) / 1000,
                               encoder_hidden_states=cond.embeds.to(self.dtype), encoder_hidden_states_mask=mask,
                               img_shapes=[[(1, height // 2, width // 2)]] * batch, return_dict=False)[0]
            return _unpack(out, channels, height, width).float()

    def provenance(self) -> dict:
        schedule = self.schedule(self.info)
        out = {"trained_latent_shape": list(self.sample_shape), "flow_shift": schedule.shift_at(self.tokens()), "shift_rule": schedule.rule(),
               "image_tokens": self.tokens(), "shift_terminal": schedule.shift_terminal}
        return dict(out, grid_note=self.grid_note) if self.grid_note else out


def _unpack(packed: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """(B, (H/2)(W/2), 4C) -> (B, C, 1, H, W): the inverse of the pipeline's ``_pack_latents``."""
    batch = packed.shape[0]
    out = packed.reshape(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(batch, channels, 1, height, width)


FAMILY = QwenImage
