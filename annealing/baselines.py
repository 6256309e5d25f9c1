"""The guidance methods annealing is compared against, as pure tensor functions (host-agnostic, like the rest of the core).

Conventions, as in :mod:`annealing.guidance`: tensors are batch-first (B, ...); ``d_cond``/``d_uncond`` are the
conditional and unconditional x0-predictions a sampler hook sees (D_c, D_u); ``sigma`` is the x-space noise level
(x = alpha x0 + sigma eps). "CFG scale" means the ordinary convention w = 1 is no guidance and
D = D_u + w (D_c - D_u). Every function returns the guided x0-prediction (or a scale), so the 2D benchmark and the
ComfyUI nodes (``nodes/tvcfg.py``, ``nodes/adg.py``) can feed it to any sampler. The benchmark in ``training/toy`` runs
each of them.

Sources: CFG (Ho and Salimans, 2022); CFG++ (Chung et al., 2024); APG (Sadat et al., 2024, "Eliminating oversaturation
and artifacts of high guidance scales in diffusion models"); stage-wise / TV-CFG (Jin, Shi, Gu, arXiv 2509.22007);
Angle Domain Guidance (Jin, Xiao, Liu, Gu, arXiv 2506.11039); guidance on a limited interval (Kynkaanniemi et al., 2024).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .broadcast import batch_view

# --------------------------------------------------------------------------------------------------------------- helpers


def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product over everything but the batch dimension, keeping dims for broadcasting."""
    return (a * b).reshape(a.shape[0], -1).sum(dim=1).reshape(-1, *([1] * (a.dim() - 1)))


# ---------------------------------------------------------------------------------------------------------------------- CFG
# (CFG++, which renoises with the unconditional prediction, is a sampler step: annealing.cfgpp_step.)


def cfg(d_cond: torch.Tensor, d_uncond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance: D = D_u + w (D_c - D_u).

    Linear, so it is the same in x0-, eps- and velocity-space. ``scale`` w: scalar or (B,); w = 1 is the conditional
    model alone, w = 0 the unconditional one; typical image values 3..15 (SDXL default 7.5).
    """
    return d_uncond + batch_view(scale, d_cond) * (d_cond - d_uncond)


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

#: The stage-wise profiles of the official code (sqt24/tvcfg, guidance_schedulers.py), named as in our nodes.
STAGE_SCHEDULES = ("symmetric", "interval", "step_up", "step_down")

#: An evaluation this close (as a fraction of the step) to a schedule point is that point: noise levels a sampler
#: recomputes (sigma -> log sigma -> sigma) land within rounding of the point and must get its exact value.
SCHEDULE_POINT_FRACTION = 1e-4


@dataclass(frozen=True)
class StageWiseGuidance:
    """Stage-wise, time-varying CFG (TV-CFG; Jin, Shi, Gu, arXiv 2509.22007): the CFG scale follows a profile over
    normalised sampling time, scaled so that its time integral equals the nominal CFG scale w. A serialisable config
    (:meth:`to_dict`, :meth:`from_dict`); the defaults are the official code's.

    Time, as the official code: the N steps' timesteps t_0 > ... > t_{N-1} (the model's timestep at each step's starting
    noise level) over the largest, tau_i = t_i / t_0, with tau_N = 0 appended and dt_i = tau_i - tau_{i+1} (sum 1).
    Profiles g_i over the step index i = 0..N-1, with c = N // 2:

    * ``symmetric``: g_i = 1 + (2w - 2) r_i, r_i = i / c up to step c and (N - 1 - i) / (N - 1 - c) after it (r = 0 for
      N = 1): linear from 1 up to 2w - 1 at step c and back down to 1 at the last step (for even N the rise has one
      step more than the fall, as the official linspace construction).
    * ``interval``: v while interval_low < tau_i < interval_high (default 0.15, 0.78), 1 elsewhere.
    * ``step_up``: w / step_divisor while i / (N - 1) < switch, then w (default switch 0.25, divisor 3: early low
      weight); ``step_down``: w first, w / step_divisor after (early high weight).

    ``normalize`` (default on): symmetric and step_*: w_i = g_i w / sum_j g_j dt_j; interval: v = (w - sum of dt
    outside) / (sum of dt inside); when no step is inside (very few steps), w everywhere (the official code gives 1 there,
    the integral 1). Either way sum_i w_i dt_i = w. Off: w_i = g_i with v = w
    (the official runs of step_up / step_down turn it off, so their scales are exactly w / 3 and w).
    w is an ordinary CFG scale (1 = no guidance); the profiles assume w >= 1 (symmetric's integral vanishes near w = 0).
    """

    kind: str = "symmetric"
    interval_low: float = 0.15
    interval_high: float = 0.78
    switch: float = 0.25
    step_divisor: float = 3.0
    normalize: bool = True

    def __post_init__(self):
        if self.kind not in STAGE_SCHEDULES:
            raise ValueError(f"kind must be one of {STAGE_SCHEDULES}, got {self.kind!r}")
        if not 0.0 <= self.interval_low < self.interval_high <= 1.0:
            raise ValueError(f"need 0 <= interval_low < interval_high <= 1, got {self.interval_low} and {self.interval_high}")
        if not 0.0 <= self.switch <= 1.0:
            raise ValueError(f"switch must be in [0, 1], got {self.switch}")
        if not self.step_divisor > 0:
            raise ValueError(f"step_divisor must be > 0, got {self.step_divisor}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StageWiseGuidance:
        return cls(**data)

    # ----------------------------------------------------------------------------------------------------- profiles

    def _profile(self, p: torch.Tensor, tau: torch.Tensor, n: int, scale: float, inside) -> torch.Tensor:
        """g at fractional step positions p (and normalised times tau, for the interval), before normalisation."""
        if self.kind == "symmetric":
            c = n // 2
            q = p.clamp(max=n - 1)  # the last step keeps its value down to the schedule's end
            ramp = torch.where(q <= c, q / max(c, 1), (n - 1 - q) / max(n - 1 - c, 1))
            return 1 + (2 * scale - 2) * ramp
        if self.kind == "interval":
            return torch.where((tau > self.interval_low) & (tau < self.interval_high), inside, torch.ones_like(tau))
        early = p / max(n - 1, 1) < self.switch
        weak, strong = torch.full_like(p, scale / self.step_divisor), torch.full_like(p, scale)
        return torch.where(early, weak, strong) if self.kind == "step_up" else torch.where(early, strong, weak)

    def _scales(self, p: torch.Tensor, tau: torch.Tensor, tau_steps: torch.Tensor, dt: torch.Tensor, scale: float) -> torch.Tensor:
        """Normalised scales at positions (p, tau), the normalisation taken over the steps (tau_steps, dt)."""
        n = tau_steps.numel()
        if self.kind == "interval":
            inside_steps = (tau_steps > self.interval_low) & (tau_steps < self.interval_high)
            value = torch.full_like(tau_steps[:1], scale).squeeze(0)
            if not self.normalize:
                return self._profile(p, tau, n, scale, value)
            mass, rest = (dt * inside_steps).sum(), (dt * ~inside_steps).sum()
            some = mass > 0
            value = torch.where(some, (scale - rest) / torch.where(some, mass, torch.ones_like(mass)), value)
            # no step inside (one or two steps): constant w, the only schedule left whose integral is w
            return torch.where(some, self._profile(p, tau, n, scale, value), torch.full_like(tau, scale))
        g = self._profile(p, tau, n, scale, None)
        if not self.normalize:
            return g
        steps = torch.arange(n, device=tau_steps.device, dtype=tau_steps.dtype)
        total = (self._profile(steps, tau_steps, n, scale, None) * dt).sum()
        return g * scale / torch.where(total != 0, total, torch.ones_like(total))

    @staticmethod
    def _times(step_timesteps: torch.Tensor):
        """(tau_i, dt_i, t_max) from the steps' timesteps, as the official code: t / max(t), then 0 appended."""
        t_max = step_timesteps.max()
        tau = step_timesteps / t_max
        dt = tau - torch.cat([tau[1:], torch.zeros_like(tau[:1])])
        return tau, dt, t_max

    # ------------------------------------------------------------------------------------------------------- public

    def step_scales(self, step_timesteps, scale: float) -> torch.Tensor:
        """The scale of every step, (N,): what the official code hands its pipeline for these timesteps.

        ``step_timesteps``: the N steps' timesteps in any unit proportional to the model's (decreasing; diffusers'
        ``scheduler.timesteps``; SD3 flow: 1000 sigma; DDPM index). ``scale``: the nominal CFG scale w.
        """
        t = _real(torch.as_tensor(step_timesteps)).reshape(-1)
        if t.numel() < 1:
            raise ValueError("need at least one step")
        tau, dt, _ = self._times(t)
        return self._scales(torch.arange(t.numel(), device=t.device, dtype=t.dtype), tau, tau, dt, scale)

    def scale_at(self, sigma, sample_sigmas: torch.Tensor, scale: float, timestep=None) -> torch.Tensor:
        """The scale for a model evaluation at noise level ``sigma`` (scalar or (B,)) while a sampler runs the schedule
        ``sample_sigmas`` (N + 1 decreasing noise levels, the last one usually 0). Returns (B,).

        ``timestep`` maps noise levels to the model's timesteps (ComfyUI: ``model_sampling.timestep``); default: the
        noise level itself (a flow model's time up to a factor). At schedule point i this is exactly
        ``step_scales(timestep(sample_sigmas[:-1]), scale)[i]``. Between points i and i + 1 (the extra evaluations of
        heun, dpmpp_2s, uni_pc, ...) the profile is read at the evaluation's own time: at the fractional step
        p = i + f, f = (tau_i - tau) / (tau_i - tau_{i+1}); symmetric is linear between the steps' values, interval tests
        tau, step_* test p / (N - 1); same normalisation. Stays on the device (no host synchronisation).
        """
        sigma = torch.as_tensor(sigma)
        sigmas = _real(torch.as_tensor(sample_sigmas)).to(sigma.device).reshape(-1)
        sig = sigma.to(sigmas.dtype).reshape(-1)
        n = sigmas.numel() - 1
        if n < 1:
            return torch.full_like(sig, scale)
        to_time = timestep if timestep is not None else (lambda s: s)
        tau_steps, dt, t_max = self._times(to_time(sigmas[:-1]).to(sigmas.dtype))
        tau = to_time(sig).to(sigmas.dtype) / t_max
        # the step in progress, found by noise level (strictly decreasing; quantised timesteps may repeat)
        step = ((sigmas[:-1].unsqueeze(0) >= sig.unsqueeze(1)).sum(dim=1) - 1).clamp(0, n - 1)
        tau_ext = torch.cat([tau_steps, torch.zeros_like(tau_steps[:1])])
        start, end = tau_ext[step], tau_ext[step + 1]
        gap = start - end
        frac = torch.where(gap > 0, (start - tau) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(gap))
        frac = frac.clamp(0.0, 1.0)
        frac = torch.where(frac < SCHEDULE_POINT_FRACTION, torch.zeros_like(frac), frac)
        frac = torch.where(frac > 1 - SCHEDULE_POINT_FRACTION, torch.ones_like(frac), frac)
        return self._scales(step + frac, torch.lerp(start, end, frac), tau_steps, dt, scale)


def _real(t: torch.Tensor) -> torch.Tensor:
    """A floating tensor of at least float32 (integer timesteps, half-precision sigmas)."""
    return t.to(torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t.to(torch.float32)


# ------------------------------------------------------------------------------------------------- Angle Domain Guidance

#: ADG's cap on the rotated angle: pi / 3 (the official code writes it as 3.14 / 3).
ADG_MAX_ANGLE = math.pi / 3


def angle_domain_guidance(d_cond: torch.Tensor, d_uncond: torch.Tensor, scale, max_angle: float = ADG_MAX_ANGLE) -> torch.Tensor:
    """Angle Domain Guidance (Jin, Xiao, Liu, Gu, arXiv 2506.11039), per sample on flattened x0-predictions:

        theta  = angle(D_c, D_u) in [0, pi];       w' = max(w - 1, 0) + 1e-3
        theta' = clip(w' theta, -max_angle, max_angle)                        (max_angle = pi / 3)
        e      = (D_c - D_u) - (<D_c - D_u, D_u> / ||D_u||^2) D_u             (the part of the update orthogonal to D_u)
        D      = cos(theta') D_c + (sin(theta') / sin(theta)) e,              or cos(theta') D_c + w' e when sin(theta) <= 1e-3

    ``scale`` w: a CFG scale, scalar or (B,) (w = 1 gives D ~= D_c; the official default is 7). Guidance acts on the
    angle between the predictions, so the update stays bounded (theta' <= max_angle) however large w gets.
    Works on any x0-prediction (EPS, V-prediction and flow models alike). Computed in at least float32 and returned
    in the inputs' dtype. theta comes from atan2(||e|| ||D_u||, <D_c, D_u>): the same angle as arccos of the cosine
    similarity, without arccos's loss of precision at small angles.
    """
    work = torch.promote_types(d_cond.dtype, torch.float32)
    d_c, d_u = d_cond.to(work), d_uncond.to(work)
    w_prime = (batch_view(scale, d_c) - 1).clamp_min(0) + 1e-3
    u_sq = _flat_dot(d_u, d_u).clamp_min(1e-12)
    update = d_c - d_u
    e = update - _flat_dot(update, d_u) / u_sq * d_u
    theta = torch.atan2(_flat_dot(e, e).sqrt() * u_sq.sqrt(), _flat_dot(d_c, d_u))
    theta_new = (w_prime * theta).clamp(-max_angle, max_angle)
    sin_theta = torch.sin(theta)
    small = sin_theta <= 1e-3
    ratio = torch.where(small, w_prime.expand_as(sin_theta), torch.sin(theta_new) / torch.where(small, torch.ones_like(sin_theta), sin_theta))
    return (torch.cos(theta_new) * d_c + ratio * e).to(d_cond.dtype)


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
