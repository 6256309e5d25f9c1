"""Algorithm 1 of the paper, independent of any particular diffusion model.

One training example (per sample b, lambda_b ~ U[lambda_min, lambda_max], grid index i uniform over all but the last):

    z_i      = alpha_i x0 + sigma_i eps
    pass 1:  p_u = f(z_i, t_i, empty), p_c = f(z_i, t_i, CADS(prompt))
             w = MLP(t_i, ||p_u - p_c||, lambda);   (z_{i+1}, x0_hat, p_hat) = cfgpp_step(...)   (annealing.cfgpp_step)
    pass 2:  delta' = f(z_{i+1}, t_{i+1}, empty) - f(z_{i+1}, t_{i+1}, prompt)          (clean prompt, gradient flows)
    loss     = mean_b[(1 - lambda_b) mean (p_hat - target)^2] + delta_weight * mean_b[lambda_b mean delta'^2]

with target = eps for noise-prediction models and eps - x0 for flow (velocity) models. The frozen model is any
:class:`DenoiserBackend`; the image backends (UNet, SD3 transformer) and the 2D benchmark's exact Gaussian-mixture
denoiser all train through :func:`annealing_loss`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from annealing import cfgpp_step, per_sample_norm
from annealing.training_grid import TrainingGrid, VPGrid


class DenoiserBackend(Protocol):
    """A frozen diffusion model as the training loop sees it.

    prediction: "epsilon" (noise) or "velocity" (flow matching, v = eps - x0) — the space of ``predict``'s output.
    The loss only calls ``predict_pair``: both branches of a pass in one network call of batch 2B, as the authors' trainer
    does (two calls of batch B cost more than one of 2B, and the loss is the same).
    """

    prediction: str

    def predict(self, z: torch.Tensor, model_timestep: torch.Tensor, cond: Any) -> torch.Tensor:
        """The network's prediction at z for per-sample timesteps (B,) under conditioning ``cond``."""

    def predict_pair(self, z: torch.Tensor, model_timestep: torch.Tensor, cond: Any, uncond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(unconditional, conditional) predictions at z, from one call on the batch [z; z] with [uncond; cond]."""

    def perturb(self, cond: Any, t_fraction: torch.Tensor, generator: torch.Generator | None) -> Any:
        """``cond`` with CADS noise for per-sample t/T in [0, 1] (see :func:`cads_perturb`)."""


@dataclass(frozen=True)
class SamplingGrid:
    """The sampling grid training draws timesteps from, noisiest first, all tensors of length N (float32).

    alphas, sigmas:  z = alpha * x0 + sigma * eps at each grid point (DDPM z-space for VP grids).
    model_timesteps: the timestep the network is conditioned on.
    mlp_timesteps:   the MLP's timestep input, in the checkpoint's convention.
    t_fractions:     t / T in [0, 1], for CADS.
    training_grid:   the core's description of the grid (recorded in the checkpoint: it fixes what w means).
    start, stop:     the points whose steps training may draw (a step starts at one of them): all by default; a part of
                     the grid for a network that samples only part of it (Wan 2.2 A14B's experts, see ``restricted``).
    """

    alphas: torch.Tensor
    sigmas: torch.Tensor
    model_timesteps: torch.Tensor
    mlp_timesteps: torch.Tensor
    t_fractions: torch.Tensor
    timestep_convention: str
    training_grid: TrainingGrid
    start: int = 0
    stop: int | None = None

    def __len__(self) -> int:
        return self.alphas.shape[0]

    @classmethod
    def from_training_grid(cls, grid: TrainingGrid, timestep_convention: str | None = None) -> SamplingGrid:
        """VP grids: DDPM timesteps of the DDIM grid, MLP timestep = DDPM index. Flow grids: the network and (by default)
        the MLP see sigma * 1000 ("sigma_x1000"; "sigma" for Flux-style checkpoints)."""
        if isinstance(grid, VPGrid):
            if timestep_convention not in (None, "ddpm_index"):
                raise ValueError(f"a DDPM grid's timestep convention is ddpm_index, got {timestep_convention!r}")
            abar = grid.alphas_cumprod()
            steps = grid.timesteps()
            a = abar[steps]
            t = steps.to(torch.float32)
            return cls(a.sqrt().float(), (1 - a).sqrt().float(), t, t, t / abar.shape[0], "ddpm_index", grid)
        convention = timestep_convention or "sigma_x1000"
        if convention not in ("sigma_x1000", "sigma"):
            raise ValueError(f"a flow grid's timestep convention is sigma_x1000 or sigma, got {convention!r}")
        sigmas = grid.sigmas()[:-1].to(torch.float32)
        mlp = sigmas * 1000 if convention == "sigma_x1000" else sigmas
        return cls(1 - sigmas, sigmas, sigmas * 1000, mlp, sigmas, convention, grid)

    @classmethod
    def vp_ddim(cls, num_steps: int = 50) -> SamplingGrid:
        """Upstream's DDIM grid on SD's scaled_linear schedule: timesteps 980, 960, ..., 0 for 50 steps."""
        return cls.from_training_grid(VPGrid(num_steps=num_steps))

    def to(self, device) -> SamplingGrid:
        moved = (getattr(self, f).to(device) for f in ("alphas", "sigmas", "model_timesteps", "mlp_timesteps", "t_fractions"))
        return SamplingGrid(*moved, self.timestep_convention, self.training_grid, self.start, self.stop)

    def restricted(self, start: int, stop: int) -> SamplingGrid:
        """The same grid with training's steps starting only at points start..stop - 1 (the next point of the last one may
        lie beyond ``stop``: a step ends where the grid goes next)."""
        if not 0 <= start < stop <= len(self):
            raise ValueError(f"a grid part must satisfy 0 <= start < stop <= {len(self)}, got {start}, {stop}")
        return dataclasses.replace(self, start=start, stop=stop)

    def draw_range(self, needs_next: bool) -> tuple[int, int]:
        """[low, high) of the point a step starts from; ``needs_next``: the step's end must be a grid point too."""
        stop = len(self) if self.stop is None else self.stop
        if needs_next:
            stop = min(stop, len(self) - 1)
        return self.start, max(stop, self.start + 1)


@dataclass(frozen=True)
class CADSConfig:
    """Condition-annealed prompt perturbation on the conditional branch (defaults of the authors' training)."""

    noise_scale: float = 0.025
    tau1: float = 0.0
    tau2: float = 1.0
    psi: float = 1.0
    enabled: bool = True


def cads_perturb(y: torch.Tensor, t_fraction: torch.Tensor, config: CADSConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """gamma = clamp((tau2 - t/T) / (tau2 - tau1), 0, 1);  y' = sqrt(gamma) y + s sqrt(1 - gamma) n;
    then rescale y' to y's per-sample mean and std and mix: psi * rescaled + (1 - psi) * y'."""
    if not config.enabled:
        return y
    shape = (-1,) + (1,) * (y.dim() - 1)
    span = max(config.tau2 - config.tau1, 1e-8)
    gamma = ((config.tau2 - t_fraction.to(y.device, torch.float32)) / span).clamp(0, 1).reshape(shape).to(y.dtype)
    noise = torch.randn(y.shape, generator=generator, device=y.device if generator is None else generator.device, dtype=y.dtype).to(y.device)
    noisy = gamma.sqrt() * y + config.noise_scale * (1 - gamma).sqrt() * noise
    dims = tuple(range(1, y.dim()))
    if not dims:
        return noisy
    mean_in, std_in = y.mean(dim=dims, keepdim=True), y.std(dim=dims, keepdim=True)
    mean_out, std_out = noisy.mean(dim=dims, keepdim=True), noisy.std(dim=dims, keepdim=True)
    rescaled = (noisy - mean_out) / std_out.clamp_min(1e-12) * std_in + mean_in
    return config.psi * rescaled + (1 - config.psi) * noisy


@dataclass
class LossTerms:
    """One batch's loss and what went into it (all tensors; ``total`` carries the gradient)."""

    total: torch.Tensor
    quality: torch.Tensor  # mean_b (1 - lambda) ||p_hat - target||^2 (eps or velocity term)
    alignment: torch.Tensor  # mean_b lambda ||delta_next||^2, before delta_weight
    w: torch.Tensor  # (B,) guidance scales of pass 1
    lam: torch.Tensor  # (B,)
    grid_index: torch.Tensor  # (B,)


def annealing_loss(
    backend: DenoiserBackend,
    mlp: torch.nn.Module,
    x0: torch.Tensor,
    cond: Any,
    uncond: Any,
    grid: SamplingGrid,
    *,
    lam: torch.Tensor | None = None,
    grid_index: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    lambda_range: tuple[float, float] = (0.0, 1.0),
    delta_weight: float = 1.0,
    generator: torch.Generator | None = None,
) -> LossTerms:
    """The loss of Algorithm 1 for a batch of clean latents ``x0`` (B, ...). Random draws come from ``generator``
    unless ``lam``, ``grid_index`` or ``noise`` are given (tests pass them to check the value by hand)."""
    batch, device = x0.shape[0], x0.device
    if len(grid) < 2:
        raise ValueError("the sampling grid needs at least 2 points")

    def draw(shape, kind):
        fn = torch.rand if kind == "uniform" else torch.randn
        gen_device = generator.device if generator is not None else device
        return fn(shape, generator=generator, device=gen_device).to(device)

    if lam is None:
        low, high = lambda_range
        lam = low + (high - low) * draw((batch,), "uniform")
    if grid_index is None:
        low, high = grid.draw_range(needs_next=True)  # the whole grid but its last point, unless restricted
        grid_index = low + (draw((batch,), "uniform") * (high - low)).long().clamp(max=high - low - 1)
    if noise is None:
        noise = draw(x0.shape, "normal").to(x0.dtype)
    lam, grid_index = lam.to(device, torch.float32), grid_index.to(device)
    nxt = grid_index + 1

    a, s = grid.alphas[grid_index], grid.sigmas[grid_index]
    a_n, s_n = grid.alphas[nxt], grid.sigmas[nxt]
    shape = (-1,) + (1,) * (x0.dim() - 1)
    z = a.reshape(shape).to(x0.dtype) * x0 + s.reshape(shape).to(x0.dtype) * noise

    # pass 1: uncond and CADS-perturbed cond at z_t, one network call of batch 2B
    t_model = grid.model_timesteps[grid_index]
    pred_u, pred_c = backend.predict_pair(z, t_model, backend.perturb(cond, grid.t_fractions[grid_index], generator), uncond)
    pred_u, pred_c = pred_u.float(), pred_c.float()
    w = mlp(grid.mlp_timesteps[grid_index], per_sample_norm(pred_u - pred_c), lam)
    z_next, _, pred_hat = cfgpp_step(z.float(), pred_u, pred_c, w, a, s, a_n, s_n, backend.prediction)

    target = noise if backend.prediction == "epsilon" else noise - x0
    quality = ((1 - lam) * (pred_hat - target.float()).pow(2).reshape(batch, -1).mean(dim=1)).mean()

    # pass 2: clean prompt at the next grid point; the frozen model stays differentiable w.r.t. its input
    t_next = grid.model_timesteps[nxt]
    z_next = z_next.to(x0.dtype)
    next_u, next_c = backend.predict_pair(z_next, t_next, cond, uncond)
    delta_next = next_u.float() - next_c.float()
    alignment = (lam * delta_next.pow(2).reshape(batch, -1).mean(dim=1)).mean()

    total = quality + delta_weight * alignment
    return LossTerms(total, quality.detach(), alignment.detach(), w.detach(), lam, grid_index)


class RunningBalance:
    """delta_weight = EMA(quality) / EMA(alignment): keeps the two terms comparable where their scales differ
    (flow models: the velocity term dwarfs the delta term). ``momentum`` is the EMA's keep-fraction."""

    def __init__(self, momentum: float = 0.99, max_weight: float = 1e4):
        self.momentum, self.max_weight = momentum, max_weight
        self.quality = self.alignment = None

    def update(self, terms: LossTerms) -> None:
        q, al = float(terms.quality), float(terms.alignment)
        if not (math.isfinite(q) and math.isfinite(al)):
            return
        m = self.momentum
        self.quality = q if self.quality is None else m * self.quality + (1 - m) * q
        self.alignment = al if self.alignment is None else m * self.alignment + (1 - m) * al

    @property
    def weight(self) -> float:
        if not self.quality or not self.alignment:
            return 1.0
        return min(self.quality / self.alignment, self.max_weight)
