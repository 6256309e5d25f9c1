"""Learn to Guide (Galashov et al., arXiv 2510.00815): the training objective, shared by the image trainer and the 2D
benchmark (``training.toy.learn_to_guide``).

A guided step t -> s from noised real data must land where the same data noised to s lies. For a clean sample x0 with
prompt c and m particles:

    s  ~ U[S_min, 1 - zeta - delta],  dt ~ U[delta, 1 - zeta - s],  t = s + dt       normalised times u in (0, 1)
    z_t^j   = a_t x0 + s_t eps^j                                   j = 1..m, independent noises
    p_hat^j = p_u + (1 + omega) (p_c - p_u),   omega = net(t, s, c) >= 0     (CFG scale 1 + omega; p = eps or velocity)
    z_s^j   = a_s x0_hat^j + s_s eps_hat^j                         one DDIM step (a flow Euler step for velocity models),
                                                                   renoised with the guided noise as ordinary CFG does
    y^k     = a_s x0 + s_s eps'^k                                  k = 1..m, fresh noisings of the same x0
    loss    = D({z_s^j}, {y^k})   [ + gamma_R L_R,  L_R = -E[R(x0_hat(z_t, c; omega), c)]:  the reward variant ]

The times are continuous and the gap t - s is at least delta (the paper's ~0.1; it reports 0.01 worse), so no step
starts at pure noise or ends on clean data and the network learns omega over the 2-D region of (s, t); at sampling s is
where the sampler's own step ends. A normalised time u is the timestep over T: on a DDPM schedule u = tau / T (tau
rounded to the model's integer timesteps, the only ones it was trained on: a resolution of 1 / T = 0.001), on a flow
schedule u = sigma.

z_s is affine in omega (z_s = A + omega B, A and B from the frozen predictions), so the frozen model runs once per particle
without a graph (one call of batch 2m per image through ``predict_pair``) and the gradient reaches omega without any
backward through the diffusion model. D, per image, is one of the paper's MMDs between the two particle sets:

* ``energy`` (the paper's default): the MMD family of its eq. 9 with the distance kernel -||x - y||^beta,

      D_{beta, lambda} = 2 E||X - Y||^beta - lambda (E||X - X'||^beta + E||Y - Y'||^beta),

  beta in (0, 2], lambda in [0, 1]; beta = lambda = 1 (the defaults) is the energy distance. beta = 2, lambda = 1
  estimates 2 ||E X - E Y||^2, the linear-kernel MMD, which compares only the sets' means (this module's ``l2`` before:
  it needs no name of its own);
* ``l2`` (the paper's eq. 21): the cross term alone, E||X - Y||^2 over independent pairs (beta = 2, lambda = 0, halved):
  the squared distance of the means plus both sets' spreads, so it also penalises the guided particles' spread.

Both are estimated without bias: a set's distances to itself skip its zero diagonal (the U-statistic), and the cross
term averages all m x m pairs. The plain V-statistic adds lambda (1/m) x each set's spread, which with m = 4 rewards
collapsing the guided particles, i.e. more guidance. Image losses are per latent element: D_{beta, lambda} divided by
numel^(beta / 2), l2 by numel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from annealing.broadcast import batch_view
from annealing.guidance import guided_ddim_step
from annealing.training_grid import VPGrid

from .algorithm import DenoiserBackend, SamplingGrid

OBJECTIVES = ("energy", "l2")
#: torch.cdist would switch to a matrix-product formula for more than 25 points, whose self-distances are not exactly 0
#: (and whose gradient there is not defined); the direct formula costs nothing at these set sizes.
_DIRECT = "donot_use_mm_for_euclid_dist"


# ----------------------------------------------------------------------------------------------------------- the distances


def mmd_distance(x: torch.Tensor, y: torch.Tensor, beta: float = 1.0, lam: float = 1.0, unbiased: bool = True) -> torch.Tensor:
    """D_{beta, lambda} of the module docstring between particle sets x (G, P, D) and y (G, Q, D), batched over the G
    groups -> (G,). unbiased: a set's self-distances averaged over its P (P - 1) pairs i != j (needs P, Q >= 2); else
    the V-statistic (all P^2 pairs, the zero diagonal included)."""
    if not 0.0 < beta <= 2.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"the MMD needs beta in (0, 2] and lambda in [0, 1], got beta {beta!r} and lambda {lam!r}")
    cross = torch.cdist(x, y, compute_mode=_DIRECT).pow(beta).mean(dim=(1, 2))
    if lam == 0.0:
        return 2 * cross
    return 2 * cross - lam * (_within(x, beta, unbiased) + _within(y, beta, unbiased))


def _within(v: torch.Tensor, beta: float, unbiased: bool) -> torch.Tensor:
    """E||V - V'||^beta within each group: over the pairs i != j (unbiased), or over all P^2 pairs."""
    count = v.shape[1]
    distances = torch.cdist(v, v, compute_mode=_DIRECT)
    if not unbiased:
        return distances.pow(beta).mean(dim=(1, 2))
    if count < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 particles per set, got {count}")
    i, j = torch.triu_indices(count, count, offset=1, device=v.device)  # each pair once; the zero diagonal never enters a power
    return distances[:, i, j].pow(beta).mean(dim=1)


def energy_distance(x: torch.Tensor, y: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """The energy distance 2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| of sets (G, P, D), (G, Q, D) -> (G,):
    :func:`mmd_distance` at beta = lambda = 1."""
    return mmd_distance(x, y, 1.0, 1.0, unbiased)


def cross_distance_sq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E||X - Y||^2 over all P x Q pairs of sets (G, P, D), (G, Q, D) -> (G,): the paper's eq. 21, unbiased for
    independent X and Y."""
    return torch.cdist(x, y, compute_mode=_DIRECT).pow(2).mean(dim=(1, 2))


def set_distance(x: torch.Tensor, y: torch.Tensor, objective: str = "energy", beta: float = 1.0, lam: float = 1.0) -> torch.Tensor:
    """The image objective per group, per latent element, for sets (G, m, D): D_{beta, lambda} / D^(beta / 2)
    (``energy``) or eq. 21 / D (``l2``).

    Computed in float64 (float32 on MPS, which has none): distances of 65k-element latents are large numbers whose
    differences carry the signal."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    numel = x.shape[-1]
    wide = torch.float32 if x.device.type == "mps" else torch.float64
    x, y = x.to(wide), y.to(wide)
    if objective == "energy":
        return (mmd_distance(x, y, beta, lam) / numel ** (beta / 2)).float()
    return (cross_distance_sq(x, y) / numel).float()


# ----------------------------------------------------------------------------------------------------------- the step


def guided_step(z: torch.Tensor, pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale, alpha, sigma, alpha_next, sigma_next,
                prediction: str = "epsilon") -> torch.Tensor:
    """One CFG step z_t -> z_s with CFG scale ``scale``, renoised with the guided noise (DDIM, eta 0), in any
    parametrisation z = alpha x0 + sigma eps. Predictions are noise ("epsilon") or flow velocity ("velocity", v = eps - x0
    with alpha = 1 - sigma, where this is the flow Euler step z + (sigma_next - sigma) v_hat):

        p_hat = p_u + scale (p_c - p_u);   x0_hat = x0(z, p_hat);   eps_hat = eps(z, p_hat)
        z_s   = alpha_next x0_hat + sigma_next eps_hat

    Schedule values and ``scale`` are per sample (B,) or scalars; differentiable in ``scale`` (and affine in it)."""
    return guided_ddim_step(z, pred_uncond, pred_cond, scale, alpha, sigma, alpha_next, sigma_next, prediction, renoise="guided")[0]


# ----------------------------------------------------------------------------------------------------------- the times


@dataclass(frozen=True)
class TimeRegion:
    """Where (s, t) are drawn, in normalised time (module docstring): s ~ U[s_min, 1 - zeta - delta],
    dt ~ U[delta, 1 - zeta - s], t = s + dt. So s_min <= s < t <= 1 - zeta and t - s >= delta.

    s_min 0.001 and zeta 0.001 are ours (the paper's values were not available to us): the region reaches the last DDPM
    timestep (u = 0.999) and stops 0.001 short of pure noise and of clean data; delta 0.1 is the paper's (second-hand)."""

    s_min: float = 0.001
    zeta: float = 0.001
    delta: float = 0.1

    def __post_init__(self):
        for name in ("s_min", "zeta", "delta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
        if self.s_min + self.delta + self.zeta >= 1.0:
            raise ValueError(f"s_min + delta + zeta must be below 1 (the region of s is [s_min, 1 - zeta - delta]), got "
                             f"{self.s_min:g} + {self.delta:g} + {self.zeta:g}")

    @property
    def s_max(self) -> float:
        return 1.0 - self.zeta - self.delta

    @property
    def t_max(self) -> float:
        return 1.0 - self.zeta

    def draw(self, first: torch.Tensor, second: torch.Tensor, t_range: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, t) from two independent U[0, 1) draws per image (the first places s, the second the gap).

        ``t_range`` (a, b): a network that serves only part of the noise range (one expert of Wan 2.2 A14B) trains where
        its model runs, at t in [a, b]: then t ~ U[a, b] and s ~ U[s_min, t - delta] (our choice: the paper has no experts;
        the frozen model is called at t only, so only t must stay in the expert's range)."""
        if t_range is None:
            s = self.s_min + (self.s_max - self.s_min) * first
            return s, s + self.delta + (self.t_max - s - self.delta) * second
        low, high = t_range
        t = low + (high - low) * first
        return self.s_min + (t - self.delta - self.s_min) * second, t

    def expert_range(self, grid: SamplingGrid, normalization: float) -> tuple[float, float] | None:
        """The t range of a grid restricted to part of the schedule (:meth:`SamplingGrid.restricted`), in normalised time:
        from its lowest to its highest training point (the whole region's ends where the part reaches them); None for a
        whole grid."""
        points = len(grid)
        start, stop = grid.start, points if grid.stop is None else grid.stop
        if start == 0 and stop == points:
            return None
        u = grid.model_timesteps.detach().double().cpu() / normalization
        high = self.t_max if start == 0 else min(float(u[start]), self.t_max)
        low = self.s_min + self.delta if stop == points else max(float(u[stop - 1]), self.s_min + self.delta)
        if not low < high:
            raise ValueError(f"the grid part {start}..{stop} lies outside the Learn to Guide region (t in [{low:.3g}, {high:.3g}])")
        return low, high

    def t_density(self, t: torch.Tensor) -> torch.Tensor:
        """The marginal density of t: (1 / L) log(L / (1 - zeta - t)) on [s_min + delta, 1 - zeta], L = s_max - s_min."""
        span = self.s_max - self.s_min
        inside = (t >= self.s_min + self.delta) & (t < self.t_max)
        return torch.where(inside, torch.log(span / (self.t_max - t).clamp_min(1e-30)) / span, torch.zeros_like(t))


def noise_levels(grid: SamplingGrid, u: torch.Tensor, normalization: float = 1000.0):
    """(alpha, sigma, model timestep, network timestep) at normalised times ``u`` (B,) on the schedule of ``grid``
    (its ``training_grid``), float32 on u's device. DDPM: tau = round(u x normalization), clamped to the schedule's
    timesteps, z = sqrt(abar) x0 + sqrt(1 - abar) eps; flow: sigma = u, z = (1 - sigma) x0 + sigma eps, the model sees
    1000 sigma and the network sigma in the grid's convention."""
    schedule = grid.training_grid
    if isinstance(schedule, VPGrid):
        last = schedule.num_train_timesteps - 1
        tau = (u * normalization).round().clamp(0, last)
        abar = schedule.alphas_cumprod().to(device=u.device)[tau.long()].to(torch.float32)
        return abar.sqrt(), (1 - abar).sqrt(), tau, tau
    sigma = u.to(torch.float32)
    network = sigma * 1000 if grid.timestep_convention == "sigma_x1000" else sigma
    return 1 - sigma, sigma, sigma * 1000, network


# ----------------------------------------------------------------------------------------------------------- the loss


@dataclass
class GuideTerms:
    """One batch's Learn to Guide loss (``total`` carries the gradient), its parts and the CFG scales it used."""

    total: torch.Tensor
    scale: torch.Tensor  # (B,) CFG scale 1 + omega of each image's step
    s: torch.Tensor  # (B,) normalised times of the step t -> s
    t: torch.Tensor
    consistency: torch.Tensor  # the self-consistency term (detached)
    reward: torch.Tensor | None = None  # the mean reward R of the batch (detached), where the reward variant is on


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
    beta: float = 1.0,
    lam: float = 1.0,
    region: TimeRegion = TimeRegion(),
    times: tuple[torch.Tensor, torch.Tensor] | None = None,
    noise: torch.Tensor | None = None,
    target_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reward_weight: float = 0.0,
) -> GuideTerms:
    """The loss for clean latents ``x0`` (B, ...) with prompt embeddings ``prompt`` (B, P) (the network's input).

    Draws (from ``generator``, in this order, unless given): two uniforms per image for (s, t) (``region.draw``; ``times``
    gives (s, t) in normalised time instead); the particles' noises (B, m, ...); the target noises (B, m, ...).
    ``reward`` (the reward variant): latents x0_hat (B, ...) -> R (B,), differentiable; it scores each image's first
    particle's guided x0-prediction at t, and the loss adds -reward_weight x its mean."""
    batch, device, m = x0.shape[0], x0.device, particles
    if m < 2:
        raise ValueError(f"Learn to Guide needs at least 2 particles per image, got {m}")

    def draw(shape, kind):
        fn = torch.rand if kind == "uniform" else torch.randn
        gen_device = generator.device if generator is not None else device
        return fn(shape, generator=generator, device=gen_device).to(device)

    config = getattr(getattr(net, "module", net), "config", None)  # (a DDP-wrapped network keeps it on its module)
    normalization = float(getattr(config, "t_embed_normalization", 1000.0))
    if times is None:
        first = draw((batch,), "uniform")
        times = region.draw(first, draw((batch,), "uniform"), region.expert_range(grid, normalization))
    if noise is None:
        noise = draw((batch, m, *x0.shape[1:]), "normal")
    if target_noise is None:
        target_noise = draw((batch, m, *x0.shape[1:]), "normal")
    s_u, t_u = (v.to(device=device, dtype=torch.float32).reshape(batch) for v in times)
    a_t, sig_t, model_t, net_t = noise_levels(grid, t_u, normalization)
    a_s, sig_s, _, net_s = noise_levels(grid, s_u, normalization)
    rows = torch.arange(batch, device=device).repeat_interleave(m)  # particle j of image b is row b * m + j
    a, s, a_n, s_n = a_t[rows], sig_t[rows], a_s[rows], sig_s[rows]
    x0_rows = x0.float().repeat_interleave(m, dim=0)
    z = batch_view(a, x0_rows) * x0_rows + batch_view(s, x0_rows) * noise.reshape(batch * m, *x0.shape[1:]).float()
    with torch.no_grad():  # the frozen model never needs a graph: z_s is affine in omega
        pred_u, pred_c = backend.predict_pair(z.to(x0.dtype), model_t[rows], _per_particle(cond, m), _per_particle(uncond, m))
    scale = 1 + net(net_t, net_s, prompt)
    z_s, x0_hat, _ = guided_ddim_step(z, pred_u.float(), pred_c.float(), scale.repeat_interleave(m), a, s, a_n, s_n, backend.prediction)
    target = batch_view(a_n, x0_rows) * x0_rows + batch_view(s_n, x0_rows) * target_noise.reshape(batch * m, *x0.shape[1:]).float()
    consistency = set_distance(z_s.reshape(batch, m, -1), target.reshape(batch, m, -1), objective, beta, lam).mean()
    total, score = consistency, None
    if reward is not None:
        score = reward(x0_hat[::m])  # each image's first particle: an unbiased estimate of E[R], one decode per image
        total = total - reward_weight * score.mean()
        score = score.detach().mean()
    return GuideTerms(total, scale.detach(), s_u, t_u, consistency.detach(), score)

