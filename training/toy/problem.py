"""The 2D problem: a class-conditional Gaussian mixture on a ring, with exact diffusion denoisers.

K modes mu_k = R (cos(2 pi k / K), sin(2 pi k / K)), each N(mu_k, s^2 I). Class c owns the arc of K / C consecutive
modes k = c K/C, ..., (c + 1) K/C - 1, so neighbouring classes overlap where their end modes touch. A condition is
a vector of class weights q (one-hot for "class c"); the data distribution under q is

    p(x0 | q) = sum_k pi_k(q) N(x0; mu_k, s^2 I),     pi_k(q) = q_{class(k)} / (modes per class)

and the unconditional distribution is the uniform mixture over classes (q = 1/C), i.e. the whole ring.

Under the VP forward process z = a x0 + sig eps (a = sqrt(abar_t), sig = sqrt(1 - abar_t)), each component's z-marginal is
N(a mu_k, v I) with v = a^2 s^2 + sig^2, so the posterior is closed form:

    r_k(z)        = softmax_k(log pi_k - ||z - a mu_k||^2 / (2 v))                   (responsibilities, log-sum-exp)
    E[x0 | z]     = sum_k r_k (mu_k + (a s^2 / v) (z - a mu_k))
    E[eps | z]    = sum_k r_k (sig / v) (z - a mu_k)     = (z - a E[x0 | z]) / sig

which is what a perfectly trained eps-prediction network returns; it is differentiable in z (training back-propagates
through it). No denoiser is learned, so every difference between the benchmark's methods comes from the guidance.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from annealing.broadcast import batch_view
from training.algorithm import CADSConfig, cads_perturb


@dataclass(frozen=True)
class RingProblem:
    """The ring mixture. Defaults: 12 modes of std 0.2 on the unit circle (neighbours 2.6 std apart, so the ring is
    nearly continuous), 3 classes owning an arc of 4 modes each."""

    num_modes: int = 12
    num_classes: int = 3
    radius: float = 1.0
    mode_std: float = 0.2
    condition_leak: float = 0.5

    def __post_init__(self):
        if self.num_classes < 2 or self.num_modes % self.num_classes:
            raise ValueError(f"num_modes ({self.num_modes}) must be a multiple of num_classes ({self.num_classes}) >= 2")
        if not (self.radius > 0 and self.mode_std > 0):
            raise ValueError("radius and mode_std must be positive")
        if not 0.0 <= self.condition_leak < 1.0:
            raise ValueError(f"condition_leak must be in [0, 1), got {self.condition_leak}")

    @property
    def modes_per_class(self) -> int:
        return self.num_modes // self.num_classes

    def means(self, dtype=torch.float32) -> torch.Tensor:
        """(K, 2) mode centres."""
        return _ring_means(self.num_modes, self.radius).to(dtype)

    def mode_class(self) -> torch.Tensor:
        """(K,) class index of each mode."""
        return torch.arange(self.num_modes) // self.modes_per_class

    def one_hot(self, labels: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """(B,) class labels -> (B, C) condition vectors."""
        return torch.nn.functional.one_hot(labels.long(), self.num_classes).to(dtype)

    def uncond(self, batch: int, dtype=torch.float32) -> torch.Tensor:
        """The unconditional condition: all-zero vectors (read as the uniform class prior)."""
        return torch.zeros(batch, self.num_classes, dtype=dtype)

    def class_weights(self, cond: torch.Tensor) -> torch.Tensor:
        """Condition vectors (B, C) -> class weights q (B, C) on the simplex: relu(y) / sum relu(y), uniform if that is 0.

        One-hot vectors map to themselves; the all-zero (unconditional) vector maps to the uniform prior. With
        ``condition_leak`` rho > 0 the *model* is imperfect: q -> (1 - rho) q + rho / C, i.e. its conditional is
        (1 - rho) p(x0 | c) + rho p(x0), as an under-trained network whose conditional leaks towards the unconditional.
        """
        positive = cond.clamp_min(0)
        total = positive.sum(dim=1, keepdim=True)
        uniform = torch.full_like(positive, 1.0 / self.num_classes)
        q = torch.where(total > 1e-12, positive / total.clamp_min(1e-12), uniform)
        return (1 - self.condition_leak) * q + self.condition_leak * uniform if self.condition_leak else q

    def log_mode_weights(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, K) log pi_k(q); -inf-safe (tiny floor) for classes with zero weight."""
        q = self.class_weights(cond)[:, self.mode_class()] / self.modes_per_class
        return q.clamp_min(1e-30).log()

    # ------------------------------------------------------------------------------------------ sampling and densities

    def sample(self, labels: torch.Tensor, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
        """Exact samples x0 ~ p(x0 | class) for each label (B,) -> (B, 2)."""
        labels = labels.long()
        pick = torch.randint(0, self.modes_per_class, labels.shape, generator=generator)
        modes = labels * self.modes_per_class + pick
        noise = torch.randn(labels.shape[0], 2, generator=generator, dtype=torch.float64)
        return (self.means(torch.float64)[modes] + self.mode_std * noise).to(dtype)

    def component_log_joint(self, x: torch.Tensor, cond: torch.Tensor, alpha=1.0, sigma=0.0) -> torch.Tensor:
        """(B, K): log pi_k + log N(x; a mu_k, v I) with v = a^2 s^2 + sig^2 (the z-marginal at noise level (a, sig))."""
        alpha = batch_view(alpha, x)
        sigma = batch_view(sigma, x)
        var = alpha**2 * self.mode_std**2 + sigma**2
        means = self.means(x.dtype).to(x.device)
        alpha_k = alpha.unsqueeze(-1) if alpha.dim() == 2 else alpha  # (B, 1, 1) per sample or a scalar
        sq = (x.unsqueeze(1) - alpha_k * means.unsqueeze(0)).pow(2).sum(-1)
        return self.log_mode_weights(cond).to(x.dtype) - sq / (2 * var) - torch.log(2 * math.pi * var)

    def log_density(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) log p(x | q) of clean points; ``cond=None`` gives the unconditional density (the ring)."""
        cond = self.uncond(x.shape[0], x.dtype) if cond is None else cond
        return torch.logsumexp(self.component_log_joint(x, cond), dim=1)

    def class_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) p(c | x) of clean points under the unconditional mixture (uniform class prior)."""
        resp = torch.softmax(self.component_log_joint(x, self.uncond(x.shape[0], x.dtype)), dim=1)
        out = torch.zeros(x.shape[0], self.num_classes, dtype=x.dtype)
        return out.index_add_(1, self.mode_class().to(x.device), resp)

    def nearest_mode(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) index of the closest mode centre."""
        return torch.cdist(x, self.means(x.dtype)).argmin(dim=1)

    # ------------------------------------------------------------------------------------------------- exact denoiser

    def posterior_mean(self, z: torch.Tensor, alpha, sigma, cond: torch.Tensor) -> torch.Tensor:
        """E[x0 | z] under condition ``cond`` (B, C) at z = a x0 + sig eps; alpha/sigma scalars or (B,)."""
        a = batch_view(alpha, z)
        resp = torch.softmax(self.component_log_joint(z, cond, alpha, sigma), dim=1)  # (B, K)
        var = a**2 * self.mode_std**2 + batch_view(sigma, z) ** 2
        means = self.means(z.dtype).to(z.device)
        mean_x0 = resp @ means
        return mean_x0 + (a * self.mode_std**2 / var) * (z - a * mean_x0)

    def eps(self, z: torch.Tensor, alpha, sigma, cond: torch.Tensor) -> torch.Tensor:
        """E[eps | z] = (z - a E[x0 | z]) / sig: the exact epsilon-prediction."""
        return (z - batch_view(alpha, z) * self.posterior_mean(z, alpha, sigma, cond)) / batch_view(sigma, z)


@functools.lru_cache(maxsize=16)
def _ring_means(num_modes: int, radius: float) -> torch.Tensor:
    angle = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
    return radius * torch.stack([angle.cos(), angle.sin()], dim=1)


class ExactRingDenoiser:
    """The :class:`training.algorithm.DenoiserBackend` of the benchmark: exact eps of the ring mixture at DDPM z_t.

    ``predict(z, t, cond)`` takes the DDPM timestep t (0..T-1, per sample) and reads abar_t from ``alphas_cumprod``.
    ``perturb`` is the analogue of CADS: :func:`training.algorithm.cads_perturb` applied to the class vector itself
    (noise, then rescaling to the vector's own mean and std), so at high noise levels the condition is blurred into a random
    mix of classes and near t = 0 it is left as is, exactly as CADS treats a prompt embedding.
    """

    prediction = "epsilon"

    def __init__(self, problem: RingProblem, alphas_cumprod: torch.Tensor, cads: CADSConfig = CADSConfig()):
        self.problem = problem
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.cads = cads

    def schedule(self, model_timestep: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod[model_timestep.round().long().cpu()].to(dtype)
        return abar.sqrt(), (1 - abar).sqrt()

    def predict(self, z: torch.Tensor, model_timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.schedule(torch.as_tensor(model_timestep).reshape(-1).expand(z.shape[0]), z.dtype)
        return self.problem.eps(z, alpha, sigma, cond.to(z.dtype))

    def predict_pair(self, z: torch.Tensor, model_timestep: torch.Tensor, cond: torch.Tensor,
                     uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(uncond, cond) from one call on [z; z], as the image backends do (the loss calls only this)."""
        batch = z.shape[0]
        timesteps = torch.as_tensor(model_timestep).reshape(-1).expand(batch)
        out = self.predict(torch.cat([z, z]), torch.cat([timesteps, timesteps]),
                           torch.cat([uncond.expand(batch, -1), cond.expand(batch, -1).to(uncond.dtype)]))
        return out[:batch], out[batch:]

    def perturb(self, cond: torch.Tensor, t_fraction: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return cads_perturb(cond, t_fraction, self.cads, generator)
