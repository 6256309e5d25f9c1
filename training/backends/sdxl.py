"""SDXL base and its fine-tunes (Pony, Illustrious, NoobAI, ...): the UNet with ``addition_embed_type == "text_time"``.

Conditioning, as the pipeline's ``encode_prompt``: [penultimate hidden state of TE1, penultimate hidden state of TE2]
and TE2's projected pooled output; time ids (R, R, 0, 0, R, R) at the training resolution R. With
``force_zeros_for_empty_prompt`` (SDXL base) the unconditional embedding is zeros, as the pipeline makes it.
"""

from __future__ import annotations

import torch

from ..errors import TrainingError
from .conditioning import TextCondition
from .interface import ModelInfo, PipelineIndex
from .unet import UNetFamily


class SDXL(UNetFamily):
    key = "sdxl"
    title = "SDXL (incl. Pony/Illustrious/NoobAI fine-tunes)"
    default_resolution = 1024
    text_parts = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))

    @classmethod
    def matches(cls, index: PipelineIndex) -> bool:
        config = cls.unet_config(index)
        return config is not None and config.get("addition_embed_type") == "text_time"

    @classmethod
    def describe(cls, index: PipelineIndex) -> ModelInfo:
        if index.component("text_encoder") is None:
            raise TrainingError(f"{index.folder}: the SDXL refiner (no first text encoder) is not supported; use a base model")
        return super().describe(index)

    @classmethod
    def widths(cls, info: ModelInfo) -> tuple[int, int | None]:
        cfg = info.network_config
        return cfg["cross_attention_dim"], cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        r = self.resolution
        self.time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=self.device)

    def added_conditions(self, cond: TextCondition, batch: int) -> dict:
        return {"added_cond_kwargs": {"text_embeds": cond.pooled.to(self.dtype), "time_ids": self.time_ids.expand(batch, -1).to(self.dtype)}}

    def encode_text(self, captions: list[str]) -> TextCondition:
        self._need_text()
        with torch.no_grad():
            o1 = self.text["text_encoder"](self._ids(self.text["tokenizer"], captions), output_hidden_states=True)
            o2 = self.text["text_encoder_2"](self._ids(self.text["tokenizer_2"], captions), output_hidden_states=True)
            embeds = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
            return TextCondition(embeds.float(), o2.text_embeds.float())


FAMILY = SDXL
