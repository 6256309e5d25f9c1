"""Noise schedules in the host's x-space, x = alpha * x0 + sigma * eps.

* Discrete VP models (SD1.x, SDXL; EPS or V-prediction): x-space is the Karras one, alpha = 1 and
  sigma_t = sqrt((1 - abar_t) / abar_t); the DDPM latent z_t equals x / sqrt(1 + sigma^2).
* Flow models (CONST: SD3, Flux): alpha = 1 - sigma, sigma in [0, 1].

These helpers let the core, the tests, the 2D benchmark and the training share one definition of the
schedules (and of the DDIM timestep grid upstream samples on).
"""

from __future__ import annotations

import torch

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


def scaled_linear_alphas_cumprod(num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """abar_t of SD1.x/SDXL's "scaled_linear" schedule (float64, length num_timesteps)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def vp_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Karras sigma of each DDPM timestep: sqrt((1 - abar) / abar)."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


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


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """diffusers DDIM "leading" grid with steps_offset 0, as upstream samples: 980, 960, ..., 0 for 50 steps."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    ratio = num_train_timesteps // num_steps
    return (torch.arange(num_steps - 1, -1, -1) * ratio).long()


def ddim_sigmas(num_steps: int, alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """Karras sigmas of the DDIM grid followed by 0: the schedule a ComfyUI sampler needs to retrace upstream's DDIM."""
    alphas_cumprod = scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    sigmas = vp_sigmas(alphas_cumprod)[ddim_timesteps(num_steps, alphas_cumprod.shape[0])]
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def flow_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """SD3-style flow schedule: sigmas linear in t from 1 to 1/steps... shifted by ``shift``, followed by 0."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    sigmas = shift * t / (1 + (shift - 1) * t)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)
