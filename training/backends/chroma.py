"""Chroma (the Flux architecture, 8.9B, trained to use real CFG): ChromaTransformer2DModel on 2 x 2-packed latents of the
Flux AutoencoderKL (16 channels, 4-D as ComfyUI's Flux latent format), flow matching with velocity v = eps - x0, text
from T5-XXL.

Exactly as ``diffusers.ChromaPipeline``:
* conditioning: the pipeline's own T5 encoding (512 tokens, padded to max length) with its attention mask, which keeps
  one padding token after the prompt; the negative prompt defaults to "";
* latents: (x - shift_factor) * scaling_factor;
* the network call: ``transformer(packed, timestep = sigma, encoder_hidden_states, txt_ids = 0, img_ids = (0, row,
  col), attention_mask = [text mask, ones over the image tokens])``; CFG is uncond + w (cond - uncond);
* the grid: sigmas = linspace(1, 1/N, N), shifted by the scheduler's fixed shift or, with ``use_dynamic_shifting``, by
  the resolution-dependent shift exp(mu) (mu linear in the token count (H/16)(W/16)): FlowGrid describes both exactly;
  the rule and the resolution trained are recorded with the grid.
"""

from __future__ import annotations

import torch

from ..errors import TrainingError
from .conditioning import TextCondition
from .flow import FlowSchedule
from .interface import ModelInfo, PipelineIndex, check_side
from .qwen_image import QwenImage

TEXT_TOKENS = 512  # ChromaPipeline's max_sequence_length


class Chroma(QwenImage):
    """Shares Qwen-Image's flow schedule handling (dynamic shift from the image's token count) and loading."""

    key = "chroma"
    title = "Chroma"
    default_resolution = 1024
    pads_to_longest = False  # always 512 tokens; the padding the mask covers is part of the pipeline's input
    block_classes = ("ChromaTransformerBlock", "ChromaSingleTransformerBlock")
    needs = ("ChromaPipeline", "ChromaTransformer2DModel", "AutoencoderKL")

    @classmethod
    def half_precision(cls, info: ModelInfo) -> str:
        return "fp16"  # ComfyUI runs Chroma in fp16 too

    @classmethod
    def matches(cls, index: PipelineIndex) -> bool:
        return index.component("transformer") == "ChromaTransformer2DModel"

    @classmethod
    def describe(cls, index: PipelineIndex) -> ModelInfo:
        folder = index.folder
        if index.pipeline_class != "ChromaPipeline":
            raise TrainingError(f"{folder}: {index.pipeline_class} is not supported; only text-to-image ChromaPipeline folders are trained")
        network_config = index.config("transformer", what="the transformer config")
        vae_config = index.config("vae", what="the VAE config")
        channels = int(vae_config.get("latent_channels", 16))
        if network_config.get("in_channels") != channels * 4 or int(network_config.get("patch_size", 1)) != 1:
            raise TrainingError(f"{folder}: the transformer's {network_config.get('in_channels')} input channels do not fit the VAE's {channels} "
                                "latent channels packed 2 x 2")
        scheduler_config = index.scheduler_config()
        FlowSchedule.from_config(folder, scheduler_config, "simple", allow_dynamic=True)
        return ModelInfo(family=cls.key, prediction_type="flow", pipeline_class=index.pipeline_class,
                         scheduler_class=str(scheduler_config.get("_class_name", "")), scheduler_config=scheduler_config,
                         source=index.source, config_folder=folder, single_file=index.single_file, network_config=network_config,
                         vae_config=vae_config)

    @classmethod
    def latent_shape(cls, info: ModelInfo, resolution: int, frames: int = 1) -> tuple[int, ...]:
        if frames != 1:
            raise TrainingError(f"{info.source}: Chroma is an image model; frames must be 1, got {frames}")
        side = check_side(resolution, 8, 2)  # 2 x 2 packing
        return (int(info.vae_config.get("latent_channels", 16)), side, side)

    @classmethod
    def image_tokens(cls, info: ModelInfo, resolution: int) -> int:
        return (cls.latent_shape(info, resolution)[1] // 2) ** 2

    @classmethod
    def widths(cls, info: ModelInfo) -> tuple[int, int | None]:
        return int(info.network_config.get("joint_attention_dim", 4096)), None

    @classmethod
    def pipeline_name(cls) -> str:
        return "ChromaPipeline"

    def _pipeline(self):
        from diffusers import ChromaPipeline

        return ChromaPipeline(scheduler=None, vae=None, text_encoder=self.text["text_encoder"], tokenizer=self.text["tokenizer"], transformer=None)

    def encode_text(self, captions: list[str]) -> TextCondition:
        self._need_text()
        with torch.no_grad():
            embeds, mask = self._pipeline()._get_t5_prompt_embeds(captions, max_sequence_length=TEXT_TOKENS, device=self.device)
        return TextCondition(embeds.float(), None, mask)

    def vae_input(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def predict(self, z: torch.Tensor, model_timestep: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        from diffusers import ChromaPipeline

        batch, channels, height, width = z.shape
        cond = cond.expand(batch) if cond.batch == 1 and batch > 1 else cond
        packed = ChromaPipeline._pack_latents(z.to(self.dtype), batch, channels, height, width)
        image_ids = ChromaPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, z.device, self.dtype)
        text_ids = torch.zeros(cond.tokens, 3, device=z.device, dtype=self.dtype)
        mask = None
        if cond.mask is not None:  # the pipeline's _prepare_attention_mask: the text mask, then every image token
            mask = torch.cat([cond.mask.to(self.dtype), torch.ones(batch, packed.shape[1], device=z.device, dtype=self.dtype)], dim=1)
        with self._grad_context(z):
            out = self.network(hidden_states=packed, timestep=model_timestep.to(torch.float32) / 1000,
                               encoder_hidden_states=cond.embeds.to(self.dtype), txt_ids=text_ids, img_ids=image_ids, attention_mask=mask,
                               return_dict=False)[0]
            out = out.reshape(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
            return out.reshape(batch, channels, height, width).float()


FAMILY = Chroma
