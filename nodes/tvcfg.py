"""Stage-wise Guidance (TV-CFG): a MODEL patch whose CFG scale follows the stage-wise schedule of Jin, Shi, Gu
(arXiv 2509.22007) over the running sampler's own schedule. The schedule is :class:`annealing.baselines.StageWiseGuidance`."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..annealing.baselines import STAGE_SCHEDULES, StageWiseGuidance, cfg
from .post_cfg import attach_guidance, nominal_scale
from .schema import OTHER_GUIDANCE_CATEGORY, refused_by, sampler_scale_input
from .warn_once import warn_once

NAME = "Stage-wise Guidance (TV-CFG)"
DEFAULTS = StageWiseGuidance()

SCHEDULE_TOOLTIP = (
    "The profile of the CFG scale over sampling time (the official code's). symmetric (TV-CFG, the paper's method): rises "
    "linearly from 1 to 2w - 1 at the middle step and falls back to 1. interval: guidance only inside (interval_low, "
    "interval_high) of normalised time, 1 outside. step_up: w / step_divisor for the first switch fraction of the steps, "
    "then w (early low weight). step_down: the reverse (early high weight)."
)


def stage_wise_guide(schedule: StageWiseGuidance, scale: float):
    """The guide for :func:`.post_cfg.attach_guidance`: CFG at the schedule's scale for this evaluation's noise level."""

    def guide(d_cond, d_uncond, args):
        w = nominal_scale(scale, args)
        sample_sigmas = args.get("model_options", {}).get("transformer_options", {}).get("sample_sigmas")
        if sample_sigmas is None:  # a caller outside ComfyUI's sampling loop: no schedule to follow
            warn_once(f"{NAME}: the sampler's schedule (sample_sigmas) is unknown here: constant CFG at the nominal scale")
            return cfg(d_cond, d_uncond, w)
        # the model's own timestep gives normalised time, so intermediate evaluations get their own value
        scales = schedule.scale_at(args["sigma"], sample_sigmas, w, timestep=args["model"].model_sampling.timestep)
        return cfg(d_cond, d_uncond, scales)

    return guide


def check_time_axis(model) -> None:
    """TV-CFG reads normalised time as t / t_max from the model's timestep: refuse models whose timestep can be negative
    (EDM-style 0.25 log sigma), where that ratio means nothing."""
    sampling = model.get_model_object("model_sampling")
    if not (hasattr(sampling, "sigma_min") and hasattr(sampling, "sigma_max")):
        return
    times = sampling.timestep(torch.tensor([float(sampling.sigma_max), float(sampling.sigma_min)])).float()
    if not (times[0] > times[1] >= 0):
        raise ValueError(f"{NAME} needs a model whose timestep grows from 0 with the noise level; {type(sampling).__name__} "
                         f"gives {float(times[1]):.3g} .. {float(times[0]):.3g} (EDM-style log timesteps are not supported)")


class StageWiseGuidanceNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StageWiseGuidance",
            display_name=NAME,
            category=OTHER_GUIDANCE_CATEGORY,
            description="Time-varying CFG (Jin, Shi, Gu 2025): weak guidance early and late, strong in the middle, with the same "
            "time-averaged scale as plain CFG. A post-CFG patch for the plain KSampler and any guider that runs the model's "
            "cfg hooks; follows whatever sampler, scheduler and step count is running.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (EPS, V-prediction or flow). It is cloned, never changed."),
                sampler_scale_input(
                    0.0, "The nominal CFG scale w: the schedule's time integral over the run (sum of w_i * dt_i in normalised time) "
                    "equals it, so it compares with plain CFG at w."),
                io.Combo.Input("schedule", options=list(STAGE_SCHEDULES), default=DEFAULTS.kind, tooltip=SCHEDULE_TOOLTIP),
                io.Boolean.Input(
                    "normalize", default=DEFAULTS.normalize,
                    tooltip="Rescale the profile so its time integral is exactly w (the official code's default). Off: the raw "
                    "profile (symmetric 1 .. 2w - 1, interval w inside, step_* w / step_divisor and w), as the paper's step_up / "
                    "step_down runs.",
                ),
                io.Float.Input(
                    "interval_low", default=DEFAULTS.interval_low, min=0.0, max=1.0, step=0.01,
                    tooltip="interval only: guidance where normalised time t / t_max is above this (1 = the first step, 0 = clean). "
                    "Official 0.15.",
                ),
                io.Float.Input(
                    "interval_high", default=DEFAULTS.interval_high, min=0.0, max=1.0, step=0.01,
                    tooltip="interval only: guidance where normalised time t / t_max is below this; must exceed interval_low. "
                    "Official 0.78.",
                ),
                io.Float.Input(
                    "switch", default=DEFAULTS.switch, min=0.0, max=1.0, step=0.01,
                    tooltip="step_up / step_down only: the fraction of the steps (step index / (steps - 1)) before which the first "
                    "level applies. Official 0.25.",
                ),
                io.Float.Input(
                    "step_divisor", default=DEFAULTS.step_divisor, min=1.0, max=100.0, step=0.1,
                    tooltip="step_up / step_down only: the weak level is w / step_divisor (before normalisation). Official 3.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The patched model, for KSampler or a guider.")],
        )

    @classmethod
    def validate_inputs(cls, interval_low, interval_high):
        return refused_by(StageWiseGuidance, interval_low=interval_low, interval_high=interval_high)

    @classmethod
    def execute(cls, model, scale, schedule, normalize, interval_low, interval_high, switch, step_divisor) -> io.NodeOutput:
        config = StageWiseGuidance(kind=schedule, interval_low=float(interval_low), interval_high=float(interval_high),
                                   switch=float(switch), step_divisor=float(step_divisor), normalize=bool(normalize))
        check_time_axis(model)
        return io.NodeOutput(attach_guidance(model, NAME, stage_wise_guide(config, float(scale))))
