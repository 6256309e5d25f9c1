"""Stable Diffusion 1.x: a UNet with one CLIP text encoder; conditioning is its last hidden state (the pipeline's
``encode_prompt``). Claims every plain UNet2DConditionModel the SDXL and SD2 families did not claim."""

from __future__ import annotations

import torch

from ..errors import TrainingError
from .conditioning import TextCondition
from .interface import ModelInfo, PipelineIndex
from .unet import UNetFamily


class SD15(UNetFamily):
    key = "sd15"
    title = "Stable Diffusion 1.x"
    default_resolution = 512

    @classmethod
    def matches(cls, index: PipelineIndex) -> bool:
        return cls.unet_config(index) is not None

    @classmethod
    def describe(cls, index: PipelineIndex) -> ModelInfo:
        config = cls.unet_config(index)
        if config.get("addition_embed_type") is not None or config.get("class_embed_type") is not None:
            from .registry import supported

            raise TrainingError(f"{index.folder}: unsupported UNet conditioning in {index.pipeline_class}; supported: {supported()}")
        return super().describe(index)

    def encode_text(self, captions: list[str]) -> TextCondition:
        self._need_text()
        with torch.no_grad():
            return TextCondition(self.text["text_encoder"](self._ids(self.text["tokenizer"], captions))[0].float())


FAMILY = SD15
