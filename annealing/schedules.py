"""Noise levels in the host's x-space, x = alpha * x0 + sigma * eps, and a sampler's schedule.

* Discrete VP models (SD1.x, SDXL; EPS or V-prediction): x-space is the Karras one, alpha = 1 and
  sigma_t = sqrt((1 - abar_t) / abar_t); the DDPM latent z_t equals x / sqrt(1 + sigma^2).
* Flow models (CONST: SD3, Flux): alpha = 1 - sigma, sigma in [0, 1].

The grids checkpoints are trained on (DDIM timesteps, flow sigmas) are in :mod:`annealing.training_grid`.
"""

from __future__ import annotations

import torch

#: "This sigma is schedule point j" when it is within SCHEDULE_RTOL of it, or within SCHEDULE_GAP_FRACTION of the gap to
#: its nearest neighbour (half-precision sigmas are rounded by up to 0.4%; 50-step schedules have gaps of ~10%).
SCHEDULE_RTOL = 1e-4
SCHEDULE_GAP_FRACTION = 0.1

SAMPLING_TYPES = ("eps", "v_prediction", "const")


def check_sampling(sampling: str) -> str:
    if sampling not in SAMPLING_TYPES:
        raise ValueError(f"sampling must be one of {SAMPLING_TYPES}, got {sampling!r}")
    return sampling


def signal_scale(sigma: torch.Tensor, sampling: str) -> torch.Tensor:
    """alpha(sigma) of x = alpha * x0 + sigma * eps: 1 for EPS/V-prediction, 1 - sigma for CONST (flow)."""
    if check_sampling(sampling) == "const":
        return 1.0 - sigma
    return torch.ones_like(sigma)


def renoise_factor(sigma: torch.Tensor, sigma_next: torch.Tensor, sampling: str) -> torch.Tensor:
    """k = sigma * alpha_next / (sigma * alpha_next - sigma_next * alpha), per sample.

    Scaling the guidance by k makes a first-order (Euler/DDIM) step sigma -> sigma_next equal the CFG++ step that
    renoises with the unconditional prediction. k = 1 when sigma_next = 0; k = 1 where the step is degenerate.
    """
    alpha = signal_scale(sigma, sampling)
    alpha_next = signal_scale(sigma_next, sampling)
    numerator = sigma * alpha_next
    denominator = numerator - sigma_next * alpha
    safe = denominator > 1e-12 * numerator.abs().clamp_min(1e-30)
    return torch.where(safe, numerator / torch.where(safe, denominator, torch.ones_like(denominator)), torch.ones_like(sigma))


def locate_on_schedule(sigma: torch.Tensor, sample_sigmas: torch.Tensor, rtol: float = SCHEDULE_RTOL):
    """Where ``sigma`` stands on a decreasing sampler schedule. Returns (step, sigma_next, on_schedule), each (B,).

    * sigma equal (to rtol) to schedule point i: step i, sigma_next = sigmas[i + 1].
    * sigma strictly between points i and i + 1 (an intermediate evaluation of heun, dpmpp_2s, uni_pc, ...):
      step i, sigma_next = sigmas[i + 1], the end of the step in progress (the documented fallback).
    * above the first point: step 0 with sigma_next = sigmas[1]; at or below the last point: sigma_next = 0.
    No host synchronisation: everything stays on the device.
    """
    if not torch.is_tensor(sample_sigmas) or sample_sigmas.numel() == 0:
        shown = f"shape {tuple(sample_sigmas.shape)}" if torch.is_tensor(sample_sigmas) else type(sample_sigmas).__name__
        raise ValueError(f"sample_sigmas (the sampler's schedule) must be a tensor of at least one sigma, got {shown}")
    sigmas = sample_sigmas.to(device=sigma.device, dtype=torch.float32).reshape(-1)
    sig = sigma.to(torch.float32).reshape(-1, 1)
    gaps = (sigmas[:-1] - sigmas[1:]).abs()
    if gaps.numel():
        left = torch.cat([gaps[:1], gaps])
        right = torch.cat([gaps, gaps[-1:]])
        neighbour_gap = torch.minimum(left, right)
    else:
        neighbour_gap = torch.zeros_like(sigmas)
    tol = torch.maximum(rtol * sigmas.abs().clamp_min(1e-8), SCHEDULE_GAP_FRACTION * neighbour_gap)
    close = (sigmas.unsqueeze(0) - sig).abs() <= tol
    above = (sigmas.unsqueeze(0) > sig + tol).sum(dim=1)  # schedule points strictly above sigma
    count = sigmas.shape[0]
    on_schedule = close.any(dim=1)
    # on a point: that point is index `above`; in between: the step in progress started at `above - 1`.
    step = torch.where(on_schedule, above, above - 1).clamp(0, max(count - 2, 0))
    next_index = (step + 1).clamp(max=count - 1)
    sigma_next = torch.where(next_index > step, sigmas[next_index], torch.zeros_like(sig[:, 0]))
    below_last = sig[:, 0] <= sigmas[-1] + tol[-1]
    sigma_next = torch.where(below_last, torch.zeros_like(sigma_next), sigma_next)
    return step, sigma_next, on_schedule


def continuous_timestep(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Float DDPM timestep of ``sigma`` by linear interpolation in log-sigma (the inverse of ComfyUI's ``sigma(t)``).

    Exact integers for sigmas on the DDPM grid, in between for intermediate sigmas, clamped to [0, T - 1].
    ``log_sigmas`` is increasing (timestep 0 first). Runs on the device without synchronising.
    """
    log_sigmas = log_sigmas.to(device=sigma.device, dtype=torch.float32)
    log_sigma = sigma.to(torch.float32).clamp_min(1e-12).log()
    count = log_sigmas.shape[0]
    high = torch.searchsorted(log_sigmas, log_sigma.reshape(-1).contiguous()).clamp(1, count - 1)
    low = high - 1
    frac = (log_sigma.reshape(-1) - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
    t = (low.to(torch.float32) + frac).clamp(0, count - 1)
    return t.reshape(sigma.shape)
