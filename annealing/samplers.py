"""What a host sampler does with the guided prediction: which samplers renoise with the unconditional prediction,
which take an ancestral step, where that step ends (sigma_down), and so the k of the sampler's own step. Host-agnostic:
sampler names are plain strings (ComfyUI's names, which follow k-diffusion's ``sample_<name>`` functions).

Why it matters (docs/design.md, section 3): a sampler that renoises with the unconditional prediction (``*_cfg_pp``) takes
D = D_u + s (D_c - D_u) with s in CFG++ units; a step of it equals an ordinary step with CFG scale s * k_step, where
k_step = renoise_factor(sigma, sigma_end) and sigma_end is where the step's Euler move ends: sigma_next for plain
first-order samplers, sigma_down for ancestral ones (the noise added afterwards does not depend on D).
:mod:`annealing.scale_rule` uses this to give every sampler the scale it needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .schedules import check_sampling, locate_on_schedule, renoise_factor

CFG_PP_SUFFIX = "_cfg_pp"
#: CFG++ samplers named the other way round (ComfyUI 0.35's ``cfgpp_ud10_ab``, an Adams-Bashforth CFG++ Euler).
CFG_PP_PREFIX = "cfgpp_"

#: Ancestral samplers whose deterministic move ends at sigma_down (then noise sigma_up is added).
ANCESTRAL_SAMPLERS = frozenset({"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "res_multistep_ancestral"})

#: Samplers whose step with the k of their own step reproduces the CFG++ step exactly (first-order, one call per step).
EXACT_WITH_K_FACTOR = frozenset({"euler", "ddim", "euler_ancestral"})

#: Samplers whose next state is built from the x0-prediction alone plus fresh noise (LCM: x = D, then renoise): the CFG++
#: step's x0 is reproduced with w as is; a k factor would over-guide by k.
X0_ONLY_SAMPLERS = frozenset({"lcm"})

#: Samplers that read the unconditional prediction themselves and then step as an ordinary sampler at a multiple of the
#: scale they are given: ComfyUI's SamplerEulerCFG++ "alternative" (``sample_euler_pp``) steps x + dt (2 eps_D - eps_u),
#: which is plain Euler at twice the CFG scale. They are not CFG++ samplers (no k factor); the scale is divided instead.
GUIDANCE_MULTIPLE = {"euler_pp": 2.0}

#: Ancestral samplers whose sigma_down ComfyUI computes with the variance-exploding formula even for flow models.
VE_SIGMA_DOWN_SAMPLERS = frozenset({"res_multistep_ancestral"})

# k-diffusion-style function names that differ from the sampler's public name.
_FUNCTION_ALIASES = {"sample_unipc": "uni_pc", "sample_unipc_bh2": "uni_pc_bh2", "dpm_fast_function": "dpm_fast", "dpm_adaptive_function": "dpm_adaptive"}


def sampler_name_from_function(function) -> str | None:
    """The sampler name behind a sampling function: ``sample_euler_cfg_pp`` -> ``euler_cfg_pp``.

    Unwraps functools.partial; drops k-diffusion's ``_RF`` suffix (the flow variant of the same sampler).
    Returns None when the function has no recognisable name.
    """
    while hasattr(function, "func"):  # functools.partial
        function = function.func
    name = getattr(function, "__name__", None)
    if not isinstance(name, str) or not name:
        return None
    if name in _FUNCTION_ALIASES:
        return _FUNCTION_ALIASES[name]
    if name.startswith("sample_"):
        name = name[len("sample_") :]
    if name.endswith("_RF"):
        name = name[: -len("_RF")]
    return name


def renoises_with_uncond(sampler_name: str | None) -> bool:
    """True for samplers whose name says they renoise with the unconditional prediction: ComfyUI's ``*_cfg_pp`` and
    ``cfgpp_*``. A host can also tell it from what the sampler does (:attr:`SamplerInfo.reads_uncond`)."""
    return bool(sampler_name) and (sampler_name.endswith(CFG_PP_SUFFIX) or sampler_name.startswith(CFG_PP_PREFIX))


def is_ancestral(sampler_name: str | None) -> bool:
    """True for the ancestral samplers in :data:`ANCESTRAL_SAMPLERS` and their ``_cfg_pp`` twins."""
    if sampler_name and sampler_name.endswith(CFG_PP_SUFFIX):
        sampler_name = sampler_name[: -len(CFG_PP_SUFFIX)]
    return sampler_name in ANCESTRAL_SAMPLERS


def ancestral_sigma_down(sigma: torch.Tensor, sigma_next: torch.Tensor, sampling: str, eta: float = 1.0) -> torch.Tensor:
    """Where an ancestral step's deterministic move ends, as ComfyUI/k-diffusion compute it.

    EPS / V-prediction (variance exploding x-space):
        sigma_up   = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))
        sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    CONST (rectified flow):
        sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    eta = 0 gives sigma_next (a plain step); sigma_next = 0 gives 0. Per sample, no host synchronisation.
    """
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    sigma = sigma.to(torch.float32)
    sigma_next = sigma_next.to(device=sigma.device, dtype=torch.float32)
    if eta == 0:
        return sigma_next
    safe_sigma = sigma.clamp_min(1e-12)
    if check_sampling(sampling) == "const":
        down = sigma_next * (1 + (sigma_next / safe_sigma - 1) * eta)
    else:
        variance = (sigma_next**2 * (sigma**2 - sigma_next**2) / safe_sigma**2).clamp_min(0)
        sigma_up = torch.minimum(sigma_next, eta * variance.sqrt())
        down = (sigma_next**2 - sigma_up**2).clamp_min(0).sqrt()
    return torch.where(sigma_next > 0, down, torch.zeros_like(down))


@dataclass(frozen=True)
class SamplerInfo:
    """What a host says about the sampler that runs: its name (ComfyUI / k-diffusion style, None when unknown), the eta
    of an ancestral sampler (1 = full ancestral noise), and whether it reads the unconditional prediction itself (in
    ComfyUI: it adds its own post-CFG function, as every CFG++ sampler does), whatever its name."""

    name: str | None = None
    eta: float = 1.0
    reads_uncond: bool = False

    def __post_init__(self):
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not math.isfinite(self.eta) or self.eta < 0:
            object.__setattr__(self, "eta", 1.0)  # a host's odd extra option is not the user's fault: full ancestral noise

    @property
    def renoises_with_uncond(self) -> bool:
        """A CFG++ sampler: by its name, or because it reads the unconditional prediction and is not one of the known
        samplers that do so for another reason (:data:`GUIDANCE_MULTIPLE`)."""
        return renoises_with_uncond(self.name) or (self.reads_uncond and self.name not in GUIDANCE_MULTIPLE)

    @property
    def known(self) -> bool:
        """False for a sampler that reads the unconditional prediction and whose name the pack does not know: it is
        treated as a CFG++ sampler, which can only be approximate."""
        return not self.reads_uncond or renoises_with_uncond(self.name) or self.name in GUIDANCE_MULTIPLE

    @property
    def guidance_multiple(self) -> float:
        """The CFG scale this sampler applies per unit of the scale it is given (2 for ``euler_pp``, else 1)."""
        return GUIDANCE_MULTIPLE.get(self.name, 1.0)

    @property
    def x0_only(self) -> bool:
        return self.name in X0_ONLY_SAMPLERS


def sampler_step_end(sigma: torch.Tensor, sample_sigmas: torch.Tensor, sampling: str, sampler: SamplerInfo):
    """Where the running sampler's step that holds an evaluation at ``sigma`` (B,) moves to deterministically:
    (end, start, step, on_schedule), each (B,). ``end`` is the schedule's next sigma (intermediate evaluations: the end
    of the step in progress) or, for ancestral samplers and their ``_cfg_pp`` twins, the step's sigma_down as ComfyUI
    computes it for that sampler (``start`` is the step's first sigma). No host synchronisation.
    """
    sigma = sigma.to(torch.float32)
    step, schedule_next, on_schedule = locate_on_schedule(sigma, sample_sigmas)
    start = sample_sigmas.to(device=sigma.device, dtype=torch.float32).reshape(-1)[step]
    if not is_ancestral(sampler.name):
        return schedule_next, start, step, on_schedule
    ve = sampler.name in VE_SIGMA_DOWN_SAMPLERS or renoises_with_uncond(sampler.name)  # these use k-diffusion's VE formula as is
    return ancestral_sigma_down(start, schedule_next, "eps" if ve else sampling, sampler.eta), start, step, on_schedule


def sampler_step_factor(sigma: torch.Tensor, sample_sigmas: torch.Tensor, sampling: str, sampler: SamplerInfo):
    """k of the running sampler's own step for an evaluation at ``sigma`` (B,): (k_step, step, on_schedule), each (B,).

    A step with CFG++ scale s equals an ordinary step with CFG scale s * k_step; the step ends where
    :func:`sampler_step_end` says. No host synchronisation.
    """
    sigma = sigma.to(torch.float32)
    if sampler.name == "euler_ancestral_cfg_pp" and check_sampling(sampling) == "const":
        # ComfyUI's CFG++ ancestral Euler on a flow model: x' = a_next D + down eps_u, down = a_next * VE-down(s / a, s_next / a_next)
        step, schedule_next, on_schedule = locate_on_schedule(sigma, sample_sigmas)
        start = sample_sigmas.to(device=sigma.device, dtype=torch.float32).reshape(-1)[step]
        a_start, a_next = (1 - start).clamp_min(1e-12), (1 - schedule_next).clamp_min(1e-12)
        down = a_next * ancestral_sigma_down(start / a_start, schedule_next / a_next, "eps", sampler.eta)
        numerator = sigma * a_next
        denominator = (numerator - down * (1 - sigma)).clamp_min(1e-12)
        return torch.where(down > 0, numerator / denominator, torch.ones_like(sigma)), step, on_schedule
    end, _, step, on_schedule = sampler_step_end(sigma, sample_sigmas, sampling, sampler)
    return renoise_factor(sigma, end, sampling), step, on_schedule
