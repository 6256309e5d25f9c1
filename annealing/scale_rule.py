"""Which guidance scale one model evaluation gets: the whole decision, for every mode and sampler, in one call.

The MLP's w is in CFG++ units on its training grid (:mod:`annealing.training_grid`). The guided prediction a sampler
receives is D = D_u + s (D_c - D_u), s = w * factor, and the CFG-equivalent scale of the evaluation (what an ordinary
sampler's CFG scale would have to be) is omega = w * cfg_factor:

============  ===========================================  ==============================  ===========================
mode          ordinary sampler (euler, dpmpp_2m, heun, ...)  ``*_cfg_pp`` sampler              meaning
============  ===========================================  ==============================  ===========================
anchored      factor = k_train(sigma)                        factor = k_train(sigma) / k_step  omega = w k_train(sigma): one
              (no schedule needed)                           (converted to the step's units)   CFG scale per noise level
per_step      factor = k_step                                factor = 1                       the paper's CFG++ step at the
                                                                                               sampler's own step count
as_is         factor = 1                                     factor = 1                       w unchanged
============  ===========================================  ==============================  ===========================

Learn to Guide checkpoints give an ordinary CFG scale 1 + omega(t, s, prompt) for the step from t to s, and the mode only
says where s comes from (:func:`learned_s_from`): a network trained on continuous (s, t) (the paper's draw, the pack's
trainer) was trained for any step, so s is where the running sampler's step ends in anchored and per_step alike (the
paper's rule; ancestral samplers: sigma_down, where the move the guided prediction drives ends, since the noise added
afterwards brings a sample of the marginal at sigma_down to the marginal at sigma_next); one trained on its grid's next
point (pack 0.2.0 and earlier) takes s from that grid in anchored mode and from the sampler in per_step mode. as_is
does not apply to them.

k_step is the k of the running sampler's own step (:func:`annealing.samplers.sampler_step_factor`: sigma_next, or
sigma_down for ancestral samplers). Samplers that build the next state from the x0-prediction alone (lcm) take w as
is in every mode: the trained CFG++ step's x0 is D_u + w (D_c - D_u). A sampler that applies m times the scale it gets
(:data:`annealing.samplers.GUIDANCE_MULTIPLE`, e.g. ``euler_pp``) gets factor / m, so omega stays the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .samplers import SamplerInfo, is_ancestral, sampler_step_factor

MODES = ("anchored", "per_step", "as_is")
#: One line per mode, for tooltips, --help and the docs.
MODE_HELP = {
    "anchored": "w read as a CFG scale anchored to the checkpoint's training grid: omega = w * k_train(sigma), one guidance "
    "function of the noise level for every sampler and step count (default).",
    "per_step": "w scaled by the k of the running sampler's own step: the paper's CFG++ step at the step count you pick "
    "(guidance grows with the number of steps).",
    "as_is": "w unchanged (the paper's CFG++ step only under *_cfg_pp samplers; under any other sampler it is almost no guidance).",
}


def learned_s_from(mode: str, trained_s: str) -> str:
    """Where a Learn to Guide checkpoint's s comes from under ``mode``: "sampler" (the end of the running sampler's step)
    or "training_grid" (the training grid's next point), for a network trained on ``trained_s`` ("continuous" or
    "grid_next", :data:`annealing.learn_to_guide.TRAINED_S`)."""
    check_mode(mode)
    return "training_grid" if mode == "anchored" and trained_s == "grid_next" else "sampler"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


@dataclass
class EvaluationScale:
    """The decision for one evaluation: per-sample (B,) float32 tensors on the evaluation's device, or None for 1
    (the common cases allocate nothing: this runs every sampling step).

    factor:        s = w * factor is the scale applied to D_c - D_u.
    cfg_factor:    omega = w * cfg_factor is the evaluation's CFG-equivalent scale (ordinary CFG units).
    sampler_units: converts an ordinary CFG scale into the scale this sampler must be given (1 / k_step under *_cfg_pp
                   samplers, 1 otherwise): used for plain CFG outside an active range.
    """

    factor: torch.Tensor | None
    cfg_factor: torch.Tensor | None
    sampler_units: torch.Tensor | None


def evaluation_scale(mode: str, sigma: torch.Tensor, k_train: torch.Tensor, *, sampling: str, sampler: SamplerInfo,
                     sample_sigmas: torch.Tensor | None) -> EvaluationScale:
    """The scale rule of the table above for one evaluation at ``sigma`` (B,), given k_train(sigma) (B,).

    ``sample_sigmas`` (the running sampler's schedule) is needed by per_step mode and by *_cfg_pp samplers; anchored mode
    with an ordinary sampler reads none. A missing schedule where one is needed is a ValueError.
    """
    check_mode(mode)
    if sampler.x0_only:  # the next state is built from the x0-prediction alone: the CFG++ step's x0 uses w as is
        return EvaluationScale(None, None, None)
    cfg_pp = sampler.renoises_with_uncond
    k_step = None
    if mode == "per_step" or cfg_pp:
        if sample_sigmas is None:
            if mode != "as_is":
                raise ValueError(f"{mode} mode under sampler {sampler.name or 'unknown'} needs the sampler's schedule (sample_sigmas)")
        else:
            k_step = sampler_step_factor(sigma, sample_sigmas, sampling, sampler)[0]
    sampler_units = 1.0 / k_step if cfg_pp and k_step is not None else None
    if mode == "anchored":
        rule = EvaluationScale(k_train * sampler_units if cfg_pp else k_train, k_train, sampler_units)
    elif mode == "per_step":
        rule = EvaluationScale(None if cfg_pp else k_step, k_step, sampler_units)
    else:  # as_is
        rule = EvaluationScale(None, k_step if cfg_pp else None, sampler_units)
    multiple = sampler.guidance_multiple
    if multiple == 1.0:
        return rule
    # a sampler that applies `multiple` times the scale it gets (euler_pp): the same CFG-equivalent scale, given divided
    units = 1.0 / multiple if rule.sampler_units is None else rule.sampler_units / multiple
    if mode == "as_is":  # w itself is given: the sampler makes it `multiple` times w
        return EvaluationScale(rule.factor, multiple if rule.cfg_factor is None else rule.cfg_factor * multiple, units)
    return EvaluationScale(1.0 / multiple if rule.factor is None else rule.factor / multiple, rule.cfg_factor, units)


def describe_rule(mode: str, sampler_name: str | None, grid_description: str, learned_trained_s: str | None = None) -> str:
    """One line for a plot title: what this mode does under this sampler (``learned_trained_s``: a Learn to Guide
    checkpoint's ``trained_s``; None for annealing)."""
    if learned_trained_s is not None:
        if learned_s_from(mode, learned_trained_s) == "training_grid":
            return f"s: the next point of the {grid_description}"
        ancestral = " (sigma_down)" if sampler_name and is_ancestral(sampler_name) else ""
        return f"s: the end of the sampler's own step{ancestral}" + ("" if sampler_name else " (sampler unknown)")
    sampler = SamplerInfo(sampler_name)
    if sampler.x0_only:
        return f"{sampler_name}: w as is (x0-only sampler, approximate)"
    if mode == "anchored":
        return f"anchored to the {grid_description}"
    if mode == "per_step":
        return "per step: k of the sampler's own step" + ("" if sampler_name else " (sampler unknown)")
    if sampler.renoises_with_uncond:
        return "w as is (CFG++ sampler)"
    return "w as is under a sampler that renoises with the guided prediction: under-guides by k"
