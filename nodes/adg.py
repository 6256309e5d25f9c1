"""Angle Domain Guidance (Jin, Xiao, Liu, Gu, arXiv 2506.11039): a MODEL patch that guides through the angle between the
conditional and unconditional x0-predictions instead of extrapolating their difference. The maths is
:func:`annealing.baselines.angle_domain_guidance`."""

from __future__ import annotations

import math

from comfy_api.latest import io

from ..annealing.baselines import angle_domain_guidance
from .post_cfg import attach_guidance, nominal_scale
from .schema import OTHER_GUIDANCE_CATEGORY, sampler_scale_input

NAME = "Angle Domain Guidance"
OFFICIAL_SCALE = 7.0  # the official ADG_SD3 pipeline's default guidance_scale
OFFICIAL_CAP_DEGREES = 60.0  # ADG_MAX_ANGLE = pi / 3, in the widget's unit


def angle_guide(scale: float, max_angle: float):
    """The guide for :func:`.post_cfg.attach_guidance`: ADG on the x0-predictions (any prediction type)."""

    def guide(d_cond, d_uncond, args):
        return angle_domain_guidance(d_cond, d_uncond, nominal_scale(scale, args), max_angle)

    return guide


class AngleDomainGuidanceNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AngleDomainGuidance",
            display_name=NAME,
            category=OTHER_GUIDANCE_CATEGORY,
            description="Guidance in the angle domain (Jin et al., ICML 2025): steers by the angle between the conditional and "
            "unconditional x0-predictions (w' times it, capped) instead of extrapolating their difference, so the prediction's "
            "norm stays bounded: strong prompt guidance without CFG's colour over-saturation. A post-CFG patch for the plain "
            "KSampler and any guider that runs the model's cfg hooks.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (EPS, V-prediction or flow). It is cloned, never changed."),
                sampler_scale_input(
                    OFFICIAL_SCALE, "The guidance scale w: the guided angle is (w - 1) times the angle between the two predictions, capped. "
                    "Default 7 as the official code (its strength is not CFG's at the same number)."),
                io.Float.Input(
                    "max_angle_degrees", default=OFFICIAL_CAP_DEGREES, min=0.0, max=180.0, step=0.5,
                    tooltip="The cap on the rotated angle theta' (degrees). 60 = pi / 3, the official code's cap: however large w "
                    "is, the prediction turns at most this far.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The patched model, for KSampler or a guider.")],
        )

    @classmethod
    def execute(cls, model, scale, max_angle_degrees) -> io.NodeOutput:
        return io.NodeOutput(attach_guidance(model, NAME, angle_guide(float(scale), math.radians(float(max_angle_degrees)))))
