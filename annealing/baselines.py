"""The guidance methods annealing is compared against, as pure tensor functions (host-agnostic, like the rest of the core).

Conventions, as in :mod:`annealing.guidance`: tensors are batch-first (B, ...); ``d_cond``/``d_uncond`` are the
conditional and unconditional x0-predictions a sampler hook sees (D_c, D_u); ``sigma`` is the x-space noise level
(x = alpha x0 + sigma eps). "CFG scale" means the ordinary convention w = 1 is no guidance and
D = D_u + w (D_c - D_u). Every function returns the guided x0-prediction (or a scale), so the 2D benchmark and,
later, ComfyUI nodes can feed it to any sampler. The benchmark in ``training/toy`` runs each of them.

Sources: CFG (Ho and Salimans, 2022); CFG++ (Chung et al., 2024); APG (Sadat et al., 2024, "Eliminating oversaturation
and artifacts of high guidance scales in diffusion models"); stage-wise / TV-CFG (Jin, Shi, Gu, arXiv 2509.22007);
Angle Domain Guidance (Jin, Xiao, Liu, Gu, arXiv 2506.11039); guidance on a limited interval (Kynkaanniemi et al., 2024).
"""

from __future__ import annotations

import math

import torch

from .broadcast import batch_view
from .schedules import renoise_factor

# --------------------------------------------------------------------------------------------------------------- helpers


def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product over everything but the batch dimension, keeping dims for broadcasting."""
    return (a * b).reshape(a.shape[0], -1).sum(dim=1).reshape(-1, *([1] * (a.dim() - 1)))


# -------------------------------------------------------------------------------------------------------------- CFG, CFG++


def cfg(d_cond: torch.Tensor, d_uncond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance: D = D_u + w (D_c - D_u).

    Linear, so it is the same in x0-, eps- and velocity-space. ``scale`` w: scalar or (B,); w = 1 is the conditional
    model alone, w = 0 the unconditional one; typical image values 3..15 (SDXL default 7.5).
    """
    return d_uncond + batch_view(scale, d_cond) * (d_cond - d_uncond)


def cfgpp_equivalent_scale(scale, sigma: torch.Tensor, sigma_next: torch.Tensor, sampling: str = "eps") -> torch.Tensor:
    """The CFG scale that makes a plain first-order (Euler/DDIM) step sigma -> sigma_next land where CFG++ lands.

    CFG++ (Chung et al.) renoises with the unconditional prediction:  x0_hat = D_u + w (D_c - D_u), then
    x_next = alpha_next x0_hat + sigma_next eps_u. Feeding a plain sampler D = D_u + w k (D_c - D_u) with

        k = sigma alpha_next / (sigma alpha_next - sigma_next alpha)      (EPS: sigma / (sigma - sigma_next); 1 at the last step)

    gives the same step (see :func:`annealing.renoise_factor`). Returns w * k per sample. ``scale`` w is in CFG++ units,
    typically in [0, 1] (lambda of the CFG++ paper; 0.6 to 0.8 on SDXL); w = 1 is the conditional model alone.
    For the step itself in DDPM z-space use :func:`annealing.cfgpp_step`.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32).reshape(-1)
    return torch.as_tensor(scale, dtype=torch.float32) * renoise_factor(sigma, sigma_next.expand_as(sigma), sampling)


# ---------------------------------------------------------------------------------------------------------------------- APG


def apg(
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor,
    scale,
    *,
    eta: float = 0.0,
    norm_threshold: float = 0.0,
    momentum: float = 0.0,
    running: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive Projected Guidance (Sadat et al.). Returns (D, running) where ``running`` is the momentum state to pass
    to the next step (start with None; reset it for every new trajectory).

        g   = D_c - D_u;            g = g + momentum * running        (running average; momentum beta in [-1, 1), 0 = off)
        g   = g * min(1, r / ||g||)                                   (norm threshold r > 0; r = 0 disables it)
        g_par = (<g, D_c> / ||D_c||^2) D_c,  g_orth = g - g_par       (per sample, over the flattened prediction)
        D   = D_c + (w - 1) (g_orth + eta * g_par)

    ``scale`` w is a CFG scale (w = 1: no guidance; with eta = 1, r = 0 and momentum = 0, APG is exactly CFG).
    The paper recommends eta = 0 (drop the parallel part, which causes oversaturation), momentum -0.5 and a model-dependent r.
    ComfyUI's APG node returns D_c + w' g_orth_par with its cfg w'; it equals this function at w = w' + 1.
    ``running`` holds the momentum-averaged g *before* the threshold, as in the paper and the ComfyUI node.
    """
    if norm_threshold < 0:
        raise ValueError(f"norm_threshold must be >= 0 (0 disables it), got {norm_threshold}")
    guidance = d_cond - d_uncond
    if momentum != 0 and running is not None:
        guidance = guidance + momentum * running
    new_running = guidance
    if norm_threshold > 0:
        norm = guidance.reshape(guidance.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (guidance.dim() - 1)))
        guidance = guidance * torch.clamp(norm_threshold / norm.clamp_min(1e-12), max=1.0)
    cond_sq = _flat_dot(d_cond, d_cond).clamp_min(1e-12)
    parallel = _flat_dot(guidance, d_cond) / cond_sq * d_cond
    orthogonal = guidance - parallel
    out = d_cond + (batch_view(scale, d_cond) - 1) * (orthogonal + eta * parallel)
    return out, new_running


# ---------------------------------------------------------------------------------------------------- stage-wise (TV-CFG)


def tv_cfg_schedule(num_steps: int, mean_scale: float) -> torch.Tensor:
    """The "symmetric" stage-wise schedule of Jin, Shi, Gu: weak early, strong in the middle, weak late. (num_steps,) float64.

        tri_i = 1 - |2 i / (N - 1) - 1|          (0 at the first and last step, 1 in the middle; i = 0..N-1)
        w_i   = 1 + (w_bar - 1) tri_i / mean(tri)

    so w rises linearly from 1 to about 2 w_bar - 1 over the first half and falls back over the second, and the time
    average is exactly the nominal CFG scale ``mean_scale`` w_bar (>= 0; 1 = no guidance). N = 1 gives [w_bar].
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([float(mean_scale)], dtype=torch.float64)
    i = torch.arange(num_steps, dtype=torch.float64)
    tri = 1 - (2 * i / (num_steps - 1) - 1).abs()
    return 1 + (mean_scale - 1) * tri / tri.mean()


# ------------------------------------------------------------------------------------------------- Angle Domain Guidance


def angle_domain_guidance(d_cond: torch.Tensor, d_uncond: torch.Tensor, scale, max_angle: float = math.pi / 3) -> torch.Tensor:
    """Angle Domain Guidance (Jin, Xiao, Liu, Gu, arXiv 2506.11039), per sample on flattened x0-predictions:

        theta  = arccos(cos_sim(D_c, D_u));      w' = max(w - 1, 0) + 1e-3
        theta' = clip(w' theta, -max_angle, max_angle)                        (max_angle = pi / 3)
        e      = (D_c - D_u) - (<D_c - D_u, D_u> / ||D_u||^2) D_u             (the part of the update orthogonal to D_u)
        D      = cos(theta') D_c + (sin(theta') / sin(theta)) e,              or cos(theta') D_c + w' e when sin(theta) <= 1e-3

    ``scale`` w is a CFG scale (w = 1 gives D ~= D_c). Guidance acts on the angle between the predictions, so the
    update stays bounded (theta' <= pi / 3) however large w gets.
    """
    w_prime = (batch_view(scale, d_cond) - 1).clamp_min(0) + 1e-3
    dot = _flat_dot(d_cond, d_uncond)
    norms = (_flat_dot(d_cond, d_cond) * _flat_dot(d_uncond, d_uncond)).sqrt().clamp_min(1e-12)
    theta = torch.arccos((dot / norms).clamp(-1.0, 1.0))
    theta_new = (w_prime * theta).clamp(-max_angle, max_angle)
    update = d_cond - d_uncond
    e = update - _flat_dot(update, d_uncond) / _flat_dot(d_uncond, d_uncond).clamp_min(1e-12) * d_uncond
    sin_theta = torch.sin(theta)
    small = sin_theta <= 1e-3
    ratio = torch.where(small, w_prime.expand_as(sin_theta), torch.sin(theta_new) / torch.where(small, torch.ones_like(sin_theta), sin_theta))
    return torch.cos(theta_new) * d_cond + ratio * e


# ------------------------------------------------------------------------------------------------- limited-interval CFG


#: The interval Kynkaanniemi et al. report for SD-XL (Karras sigma): guidance only for 0.28 < sigma <= 5.42.
INTERVAL_SIGMA_LOW = 0.28
INTERVAL_SIGMA_HIGH = 5.42


def interval_scale(sigma: torch.Tensor, scale, sigma_low: float = INTERVAL_SIGMA_LOW, sigma_high: float = INTERVAL_SIGMA_HIGH) -> torch.Tensor:
    """Guidance on a limited interval (Kynkaanniemi et al., 2024): the CFG scale per sample,

        w(sigma) = w  if sigma_low < sigma <= sigma_high,  else 1

    ``sigma`` is the x-space noise level (Karras sigma for VP models), (B,) or scalar; defaults are their SD-XL interval
    (0.28, 5.42]. No guidance at the noisiest steps keeps the sample's layout diverse, none at the last steps keeps detail.
    """
    if not sigma_low < sigma_high:
        raise ValueError(f"need sigma_low < sigma_high, got {sigma_low} and {sigma_high}")
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
    inside = (sigma > sigma_low) & (sigma <= sigma_high)
    return torch.where(inside, torch.as_tensor(scale, dtype=torch.float32), torch.ones_like(sigma))
