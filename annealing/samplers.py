"""What a host sampler does with the guided prediction: which samplers renoise with the unconditional prediction,
which take an ancestral step, and where that step ends (sigma_down). Host-agnostic: sampler names are plain strings
(ComfyUI's names, which follow k-diffusion's ``sample_<name>`` functions).

Why it matters (docs/spec): the annealing MLP predicts w in CFG++ units. A sampler that renoises with the unconditional
prediction (``*_cfg_pp``) takes D_g = D_u + w (D_c - D_u) as is. Any other sampler renoises with the guided prediction, so the
guide scales w by k = renoise_factor(sigma, sigma_end) where sigma_end is where the step's Euler move ends: sigma_next for
plain first-order samplers, sigma_down for ancestral ones (the noise added afterwards does not depend on D).
"""

from __future__ import annotations

import math

import torch

from .schedules import check_sampling

CFG_PP_SUFFIX = "_cfg_pp"

#: Ancestral samplers whose deterministic move ends at sigma_down (then noise sigma_up is added).
ANCESTRAL_SAMPLERS = frozenset({"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "res_multistep_ancestral"})

#: Samplers where the k factor reproduces the CFG++ step exactly (first-order, one model call per step).
EXACT_WITH_K_FACTOR = frozenset({"euler", "ddim", "euler_ancestral"})

#: Samplers whose next state is built from the x0-prediction alone plus fresh noise (LCM: x = D, then renoise): the CFG++
#: step's x0 is reproduced with w as is; a k factor would over-guide by k.
X0_ONLY_SAMPLERS = frozenset({"lcm"})

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
    """True for samplers that renoise with the unconditional prediction (ComfyUI's ``*_cfg_pp``)."""
    return bool(sampler_name) and sampler_name.endswith(CFG_PP_SUFFIX)


def takes_w_as_is(sampler_name: str | None) -> bool:
    """True where w must be applied unchanged: ``*_cfg_pp`` samplers, and samplers that use only the x0-prediction (lcm)."""
    return renoises_with_uncond(sampler_name) or sampler_name in X0_ONLY_SAMPLERS


def is_ancestral(sampler_name: str | None) -> bool:
    """True for the ancestral samplers in :data:`ANCESTRAL_SAMPLERS` (not their ``_cfg_pp`` twins, which need no k)."""
    return sampler_name in ANCESTRAL_SAMPLERS


def k_factor_exactness(sampler_name: str | None, renoise_as_is: bool) -> str:
    """'exact', 'approximate' or 'mismatched': whether the guided step equals the trained CFG++ step for this sampler.

    'mismatched': a forced mode that contradicts the sampler (w as is under a sampler that renoises with the guided
    prediction under-guides by k; the k factor under a *_cfg_pp sampler applies k twice).
    """
    if sampler_name is None:
        return "approximate"
    if renoise_as_is != takes_w_as_is(sampler_name):
        return "mismatched"
    if renoise_as_is:
        return "exact" if renoises_with_uncond(sampler_name) else "approximate"
    return "exact" if sampler_name in EXACT_WITH_K_FACTOR else "approximate"


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
