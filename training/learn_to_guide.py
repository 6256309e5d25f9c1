"""Learn to Guide (Galashov et al., arXiv 2510.00815): the training objective, shared by the image trainer and the 2D
benchmark (``training.toy.learn_to_guide``).

A guided step t -> s from noised real data must land where the same data noised to s lies. For a clean sample x0 with
prompt c, grid point t and s the grid's next point (clean data after the last one), with m particles:

    z_t^j   = a_t x0 + s_t eps^j                                   j = 1..m, independent noises
    p_hat^j = p_u + (1 + omega) (p_c - p_u),   omega = net(t, s, c) >= 0     (CFG scale 1 + omega; p = eps or velocity)
    z_s^j   = a_s x0_hat^j + s_s eps_hat^j                         one DDIM step (a flow Euler step for velocity models),
                                                                   renoised with the guided noise as ordinary CFG does
    y^k     = a_s x0 + s_s eps'^k                                  k = 1..m, fresh noisings of the same x0
    loss    = D({z_s^j}, {y^k})

z_s is affine in omega (z_s = A + omega B, A and B from the frozen predictions), so the frozen model runs once per particle
without a graph (one call of batch 2m per image through ``predict_pair``) and the gradient reaches omega without any
backward through the diffusion model. D, per image, is an MMD between the two particle sets:

* ``energy`` (the paper's default): the energy distance, the MMD of the distance kernel,
  2 E||X - Y|| - E||X - X'|| - E||Y - Y'||;
* ``l2``: the MMD of the linear kernel, which is the squared distance between the two sets' means (our reading of the
  paper's l2 variant: with fresh noisings on one side, particles have no partner to be compared with one by one).

Both are estimated without bias (a set's distances to itself skip the zero diagonal; the means' distance subtracts each
set's spread / m): the plain V-statistic adds (1/m) x each set's spread, which with m = 4 rewards collapsing the guided
particles, i.e. more guidance. The 2D benchmark keeps the V-statistic its published numbers were made with.
Image losses are per latent element: the energy distance divided by sqrt(numel), the l2 distance by numel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from annealing.broadcast import batch_view
from annealing.guidance import guided_ddim_step
from annealing.training_grid import VP_CLEAN_TIMESTEP

from .algorithm import DenoiserBackend, SamplingGrid

OBJECTIVES = ("energy", "l2")
#: torch.cdist would switch to a matrix-product formula for more than 25 points, whose self-distances are not exactly 0
#: (and whose gradient there is not defined); the direct formula costs nothing at these set sizes.
_DIRECT = "donot_use_mm_for_euclid_dist"


def energy_distance(x: torch.Tensor, y: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Energy distance between particle sets x (G, P, D) and y (G, Q, D), batched over the G groups -> (G,).

    unbiased: the U-statistic (self-distances averaged over the P (P - 1) pairs i != j; needs P, Q >= 2); else the
    V-statistic (all P^2 pairs, the zero diagonal included)."""
    xy = torch.cdist(x, y, compute_mode=_DIRECT).mean(dim=(1, 2))
    if not unbiased:
        xx = torch.cdist(x, x, compute_mode=_DIRECT).mean(dim=(1, 2))
        yy = torch.cdist(y, y, compute_mode=_DIRECT).mean(dim=(1, 2))
        return 2 * xy - xx - yy
    return 2 * xy - _within(x) - _within(y)


def _within(v: torch.Tensor) -> torch.Tensor:
    count = v.shape[1]
    if count < 2:
        raise ValueError(f"the unbiased energy distance needs at least 2 particles per set, got {count}")
    return torch.cdist(v, v, compute_mode=_DIRECT).sum(dim=(1, 2)) / (count * (count - 1))


def mean_distance_sq(x: torch.Tensor, y: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """||mean(x) - mean(y)||^2 per group for sets (G, P, D), (G, Q, D) -> (G,): the MMD of the linear kernel.

    unbiased: minus each set's spread (its sample variance summed over D, divided by its size), the part of the plain
    estimate that does not vanish with more data."""
    out = (x.mean(dim=1) - y.mean(dim=1)).pow(2).sum(dim=-1)
    if unbiased:
        out = out - _spread(x) / x.shape[1] - _spread(y) / y.shape[1]
    return out


def _spread(v: torch.Tensor) -> torch.Tensor:
    count = v.shape[1]
    if count < 2:
        raise ValueError(f"the unbiased l2 distance needs at least 2 particles per set, got {count}")
    return (v - v.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2)) / (count - 1)


def set_distance(x: torch.Tensor, y: torch.Tensor, objective: str = "energy") -> torch.Tensor:
    """The image objective per group, per latent element: energy distance / sqrt(D) or l2 / D, for sets (G, m, D).

    Computed in float64 (float32 on MPS, which has none): distances of 65k-element latents are large numbers whose
    differences carry the signal."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    numel = x.shape[-1]
    wide = torch.float32 if x.device.type == "mps" else torch.float64
    x, y = x.to(wide), y.to(wide)
    if objective == "energy":
        return (energy_distance(x, y) / math.sqrt(numel)).float()
    return (mean_distance_sq(x, y) / numel).float()


def guided_step(z: torch.Tensor, pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale, alpha, sigma, alpha_next, sigma_next,
                prediction: str = "epsilon") -> torch.Tensor:
    """One CFG step z_t -> z_s with CFG scale ``scale``, renoised with the guided noise (DDIM, eta 0), in any
    parametrisation z = alpha x0 + sigma eps. Predictions are noise ("epsilon") or flow velocity ("velocity", v = eps - x0
    with alpha = 1 - sigma, where this is the flow Euler step z + (sigma_next - sigma) v_hat):

        p_hat = p_u + scale (p_c - p_u);   x0_hat = x0(z, p_hat);   eps_hat = eps(z, p_hat)
        z_s   = alpha_next x0_hat + sigma_next eps_hat

    Schedule values and ``scale`` are per sample (B,) or scalars; differentiable in ``scale`` (and affine in it)."""
    return guided_ddim_step(z, pred_uncond, pred_cond, scale, alpha, sigma, alpha_next, sigma_next, prediction, renoise="guided")[0]


def next_points(grid: SamplingGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alphas, sigmas, network timesteps) of the point each grid step ends at, length N: the grid's next point, and clean
    data (alpha 1, sigma 0; timestep -1 on a DDPM grid, 0 on a flow grid, as ``annealing.GridLookup`` reads s) after the
    last one."""
    clean_t = VP_CLEAN_TIMESTEP if grid.timestep_convention == "ddpm_index" else 0.0
    one = grid.alphas.new_ones(1)
    return (torch.cat([grid.alphas[1:], one]), torch.cat([grid.sigmas[1:], one * 0]),
            torch.cat([grid.mlp_timesteps[1:], one * clean_t]))


@dataclass
class GuideTerms:
    """One batch's Learn to Guide loss (``total`` carries the gradient) and the CFG scales it used."""

    total: torch.Tensor
    scale: torch.Tensor  # (B,) CFG scale 1 + omega of each image's step
    grid_index: torch.Tensor  # (B,)


def _per_particle(cond: Any, particles: int) -> Any:
    """A conditioning of batch B repeated for the m particles of each image; batch 1 stays (the backend expands it)."""
    rows = cond.shape[0] if torch.is_tensor(cond) else cond.batch
    if rows == 1:
        return cond
    return cond.repeat_interleave(particles, dim=0) if torch.is_tensor(cond) else cond.repeat_interleave(particles)


def learn_to_guide_loss(
    backend: DenoiserBackend,
    net: torch.nn.Module,
    x0: torch.Tensor,
    cond: Any,
    uncond: Any,
    grid: SamplingGrid,
    prompt: torch.Tensor,
    *,
    particles: int = 4,
    objective: str = "energy",
    grid_index: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    target_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> GuideTerms:
    """The loss for clean latents ``x0`` (B, ...) with prompt embeddings ``prompt`` (B, P) (the network's input).

    Draws (from ``generator``, in this order, unless given): the grid index, uniform over all N points (the last steps to
    clean data); the particles' noises (B, m, ...); the target noises (B, m, ...)."""
    batch, device, m = x0.shape[0], x0.device, particles
    if m < 2:
        raise ValueError(f"Learn to Guide needs at least 2 particles per image, got {m}")

    def draw(shape, kind):
        fn = torch.rand if kind == "uniform" else torch.randn
        gen_device = generator.device if generator is not None else device
        return fn(shape, generator=generator, device=gen_device).to(device)

    if grid_index is None:
        low, high = grid.draw_range(needs_next=False)  # the whole grid unless restricted
        grid_index = low + (draw((batch,), "uniform") * (high - low)).long().clamp(max=high - low - 1)
    if noise is None:
        noise = draw((batch, m, *x0.shape[1:]), "normal")
    if target_noise is None:
        target_noise = draw((batch, m, *x0.shape[1:]), "normal")
    grid_index = grid_index.to(device)
    a_next, s_next, t_next = next_points(grid)
    rows = grid_index.repeat_interleave(m)  # particle j of image b is row b * m + j
    a, s, a_n, s_n = grid.alphas[rows], grid.sigmas[rows], a_next[rows], s_next[rows]
    x0_rows = x0.float().repeat_interleave(m, dim=0)
    z = batch_view(a, x0_rows) * x0_rows + batch_view(s, x0_rows) * noise.reshape(batch * m, *x0.shape[1:]).float()
    with torch.no_grad():  # the frozen model never needs a graph: z_s is affine in omega
        pred_u, pred_c = backend.predict_pair(z.to(x0.dtype), grid.model_timesteps[rows], _per_particle(cond, m),
                                              _per_particle(uncond, m))
    scale = 1 + net(grid.mlp_timesteps[grid_index], t_next[grid_index], prompt)
    z_s = guided_step(z, pred_u.float(), pred_c.float(), scale.repeat_interleave(m), a, s, a_n, s_n, backend.prediction)
    target = batch_view(a_n, x0_rows) * x0_rows + batch_view(s_n, x0_rows) * target_noise.reshape(batch * m, *x0.shape[1:]).float()
    per_image = set_distance(z_s.reshape(batch, m, -1), target.reshape(batch, m, -1), objective)
    return GuideTerms(per_image.mean(), scale.detach(), grid_index)
