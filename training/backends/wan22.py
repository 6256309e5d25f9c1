"""Wan 2.2 text-to-video: TI2V-5B (the 48-channel, x16 AutoencoderKLWan, per-token timesteps) and T2V-A14B (two 14B
experts: ``transformer`` for high noise, ``transformer_2`` for low noise, switched at ``boundary_ratio`` x 1000).

A14B trains one checkpoint per expert, chosen by ``--expert high|low``, over that expert's own part of the grid: the
grid points whose timestep the pipeline gives to that expert (high: t >= boundary, low: t < boundary). Why not one
checkpoint across both: each expert is a different network with its own CFG scale (``guidance_scale`` and
``guidance_scale_2``) and its own ||delta|| statistics; ComfyUI runs the experts as two samplers with two models, so a
checkpoint per expert is what a guider per expert takes; and only one 14B expert is resident (28 GB in bf16, not 57).
Pass 2 of the high expert's last grid point starts below the boundary and runs on the high expert too: the alignment
term measures the guidance this expert applied, and the low expert is not loaded. The checkpoint records the expert
and its sigma range (``training["expert"]``, ``training["expert_sigma_range"]``).

Otherwise as Wan 2.1 (training.backends.wan21), with what ``diffusers.WanPipeline`` does for 2.2: TI2V-5B's
``expand_timesteps`` passes one timestep per latent token (all equal in text-to-video).
"""

from __future__ import annotations

import torch

from ..algorithm import SamplingGrid
from ..errors import TrainingError
from .interface import ModelInfo, PipelineIndex
from .wan21 import Wan21

EXPERTS = ("high", "low")


class Wan22(Wan21):
    key = "wan22"
    title = "Wan 2.2 text-to-video (TI2V-5B; A14B, one checkpoint per expert)"
    default_resolution = 704  # both are 720p models (TI2V-5B: 704 x 1280); training is square

    @classmethod
    def matches(cls, index: PipelineIndex) -> bool:
        return cls.is_wan(index) and cls.is_wan22(index)

    @classmethod
    def describe(cls, index: PipelineIndex, details: dict | None = None) -> ModelInfo:
        two = index.component("transformer_2") is not None
        boundary = index.index.get("boundary_ratio")
        if two:
            if index.component("transformer") is None:
                raise TrainingError(f"{index.folder}: a Wan 2.2 folder with a low-noise expert but no high-noise expert is not supported")
            if isinstance(boundary, bool) or not isinstance(boundary, (int, float)) or not 0 < boundary < 1:
                raise TrainingError(f"{index.folder}: a two-expert Wan 2.2 folder needs a boundary_ratio in (0, 1), got {str(boundary)[:40]}")
        details = {"variant": "a14b" if two else "ti2v_5b", "boundary_ratio": float(boundary) if two else None,
                   "expand_timesteps": bool(index.index.get("expand_timesteps"))}
        return super().describe(index, details)

    @classmethod
    def half_precision(cls, info: ModelInfo) -> str:
        # TI2V-5B overflows float16 (ComfyUI's WAN22_T2V: bf16 or fp32); A14B's experts are Wan 2.1 14B networks
        return "bf16" if info.details.get("variant") == "ti2v_5b" else "fp16"

    @classmethod
    def check_options(cls, info: ModelInfo, expert: str = "auto", fsdp: bool = False, precision: str = "auto") -> None:
        cls.check_expert(info, expert)
        super().check_options(info, "auto", fsdp, precision)

    @classmethod
    def check_expert(cls, info: ModelInfo, expert: str) -> None:
        if info.details.get("variant") == "a14b" and expert not in EXPERTS:
            raise TrainingError(f"{info.source}: Wan 2.2 A14B has two experts; train one checkpoint per expert with --expert high "
                                "(the high-noise transformer) or --expert low (transformer_2)")
        if info.details.get("variant") != "a14b" and expert != "auto":
            raise TrainingError(f"{info.source}: --expert {expert} applies to two-expert models (Wan 2.2 A14B) only; this is one network")

    @classmethod
    def network_subfolder(cls, info: ModelInfo, expert: str) -> str:
        cls.check_expert(info, expert)
        return "transformer_2" if expert == "low" else "transformer"

    @classmethod
    def boundary_timestep(cls, info: ModelInfo) -> float | None:
        ratio = info.details.get("boundary_ratio")
        return None if ratio is None else ratio * cls.schedule(info).num_train_timesteps

    def grid(self, num_steps: int, flow_spacing: str = "diffusers") -> SamplingGrid:
        grid = super().grid(num_steps, flow_spacing)
        boundary = self.boundary_timestep(self.info)
        if boundary is None:
            return grid
        high = int((grid.model_timesteps >= boundary).sum())  # timesteps fall along the grid: the first `high` points
        start, stop = (0, high) if self.expert == "high" else (high, len(grid))
        if stop - start < 1 or (self.expert == "low" and stop - start < 2):
            raise TrainingError(f"{self.info.source}: a {num_steps}-step grid has {stop - start} point(s) for the {self.expert}-noise expert; "
                                "use more --grid-steps")
        return grid.restricted(start, stop)

    def network_timestep(self, model_timestep: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        timestep = model_timestep.to(torch.float32)
        if not self.info.details.get("expand_timesteps"):
            return timestep
        # WanPipeline's expand_timesteps: one timestep per latent token after the (1, 2, 2) patching (all equal without an image)
        _, _, frames, height, width = z.shape
        patch = self.info.network_config.get("patch_size", (1, 2, 2))
        tokens = frames * (height // int(patch[1])) * (width // int(patch[2]))
        return timestep.reshape(-1, 1).expand(-1, tokens)

    def provenance(self) -> dict:
        out = dict(super().provenance(), variant=self.info.details.get("variant"))
        boundary = self.info.details.get("boundary_ratio")
        if boundary is not None:
            out.update(expert=self.expert, expert_boundary_sigma=boundary,
                       expert_sigma_range=[boundary, 1.0] if self.expert == "high" else [0.0, boundary],
                       expert_network="transformer" if self.expert == "high" else "transformer_2")
        return out


FAMILY = Wan22
