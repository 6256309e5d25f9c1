"""Stable Diffusion 2.x (base: epsilon at 512 px; 768-v: v-prediction at 768 px): the SD1.x UNet with an OpenCLIP text
encoder of width 1024, told apart by that width alone."""

from __future__ import annotations

from .interface import PipelineIndex
from .sd15 import SD15


class SD2(SD15):
    key = "sd2"
    title = "Stable Diffusion 2.x"
    default_resolution = 768  # 768-v; SD2-base (epsilon) is a 512 px model (registry.default_resolution)

    @classmethod
    def matches(cls, index: PipelineIndex) -> bool:
        config = cls.unet_config(index)
        return (config is not None and config.get("addition_embed_type") is None and config.get("class_embed_type") is None
                and config.get("cross_attention_dim") == 1024)

    @classmethod
    def resolution_default(cls, info) -> int:
        return 512 if info.prediction_type == "epsilon" else cls.default_resolution


FAMILY = SD2
