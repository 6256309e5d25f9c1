"""Annealing guidance math, host-agnostic: pure functions on tensors plus one small stateful wrapper.

Conventions (those of ComfyUI, see docs/spec): x-space x = alpha * x0 + sigma * eps, with alpha = 1 for EPS and
V-prediction models and alpha = 1 - sigma for CONST (flow) models. A sampler hook has the input x, sigma per
sample, and the x0-predictions D_c (cond) and D_u (uncond). From these:

    delta_eps = alpha * (D_c - D_u) / sigma          (= eps_u - eps_c)
    delta_vel =         (D_c - D_u) / sigma          (= v_u - v_c, v = dx/dsigma: eps for EPS, eps - x0 for flow)
    w         = MLP(timestep(sigma), ||delta|| * sqrt(trained_numel / numel), lambda)
    D_g       = D_u + w * k * (D_c - D_u)

``k`` makes an Euler/DDIM step sigma -> sigma_next with D_g land exactly where the CFG++ step (guided x0,
renoised with the unconditional noise) with scale w lands:

    k = sigma * alpha_next / (sigma * alpha_next - sigma_next * alpha)       (EPS: sigma / (sigma - sigma_next); 1 at the last step)

Samplers that already renoise with the unconditional prediction (ComfyUI's ``*_cfg_pp``) take w as is (k = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .schedules import check_sampling, signal_scale

#: "This sigma is schedule point j" when it is within SCHEDULE_RTOL of it, or within SCHEDULE_GAP_FRACTION of the gap to
#: its nearest neighbour (half-precision sigmas are rounded by up to 0.4%; 50-step schedules have gaps of ~10%).
SCHEDULE_RTOL = 1e-4
SCHEDULE_GAP_FRACTION = 0.1


# --------------------------------------------------------------------------------------------------------- pure functions


def per_sample(value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or (B,) tensor as a float32 (B,) tensor on ``device``."""
    tensor = torch.as_tensor(value, device=device, dtype=torch.float32).reshape(-1)
    return tensor.expand(batch) if tensor.numel() == 1 else tensor


def _bcast(per_batch: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_batch.reshape(-1, *([1] * (like.dim() - 1)))


def prediction_delta(sigma: torch.Tensor, d_cond: torch.Tensor, d_uncond: torch.Tensor, sampling: str, space: str) -> torch.Tensor:
    """uncond - cond prediction difference, in ``space`` ("epsilon" or "velocity"), float32, from x0-predictions.

    sigma: (B,) per sample. See the module docstring for the formulas; the sign does not matter (only the norm is used).
    """
    sigma = per_sample(sigma, d_cond.shape[0], d_cond.device)
    diff = (d_cond.to(torch.float32) - d_uncond.to(torch.float32)) / _bcast(sigma, d_cond)
    if space == "epsilon":
        return diff * _bcast(signal_scale(sigma, sampling), d_cond)
    if space == "velocity":
        check_sampling(sampling)
        return diff
    raise ValueError(f"space must be 'epsilon' or 'velocity', got {space!r}")


def delta_norm_from_difference(sigma: torch.Tensor, difference_norm: torch.Tensor, sampling: str, space: str) -> torch.Tensor:
    """||delta|| in ``space`` from ||D_c - D_u|| (per sample): the norm of :func:`prediction_delta` without building delta.

    epsilon: alpha * ||D_c - D_u|| / sigma;  velocity: ||D_c - D_u|| / sigma.
    """
    sigma = sigma.to(torch.float32)
    if space == "epsilon":
        return difference_norm * signal_scale(sigma, sampling) / sigma
    if space == "velocity":
        check_sampling(sampling)
        return difference_norm / sigma
    raise ValueError(f"space must be 'epsilon' or 'velocity', got {space!r}")


def per_sample_norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm over everything but the batch dimension, float32, shape (B,)."""
    return tensor.reshape(tensor.shape[0], -1).to(torch.float32).norm(dim=1)


def delta_norm_scale(latent_numel: int, trained_latent_numel: int | None) -> float:
    """sqrt(trained / numel): makes ||delta|| at another resolution look like it did at the training resolution."""
    if not trained_latent_numel:
        return 1.0
    return math.sqrt(trained_latent_numel / latent_numel)


def mlp_timestep(sigma: torch.Tensor, convention: str, sigma_to_timestep=None) -> torch.Tensor:
    """The MLP's timestep input for ``sigma`` in a checkpoint's convention.

    ddpm_index: ``sigma_to_timestep(sigma)`` (the host's discrete schedule, e.g. ``schedules.continuous_timestep``);
    sigma_x1000: 1000 * sigma (SD3-style flow); sigma: sigma itself (Flux-style flow).
    """
    if convention == "ddpm_index":
        if sigma_to_timestep is None:
            raise ValueError("the checkpoint's timestep convention is ddpm_index: pass sigma_to_timestep (the model's sigma -> timestep)")
        return sigma_to_timestep(sigma).to(torch.float32)
    if convention == "sigma_x1000":
        return sigma.to(torch.float32) * 1000.0
    if convention == "sigma":
        return sigma.to(torch.float32)
    raise ValueError(f"unknown timestep convention {convention!r}")


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


def _schedule_value(value, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) schedule value broadcastable against ``like`` (B, ...), keeping autograd and dtype."""
    tensor = value if torch.is_tensor(value) else torch.tensor(float(value), device=like.device, dtype=like.dtype)
    return tensor.reshape(-1, *([1] * (like.dim() - 1))) if tensor.dim() == 1 else tensor


def cfgpp_step(
    z: torch.Tensor,
    pred_uncond: torch.Tensor,
    pred_cond: torch.Tensor,
    w: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    alpha_next: torch.Tensor,
    sigma_next: torch.Tensor,
    prediction: str = "epsilon",
):
    """One CFG++ step z_t -> z_next that renoises with the unconditional noise (Algorithm 1 of the paper).

    Works in any parametrisation z = alpha * x0 + sigma * eps (DDPM: alpha = sqrt(abar), sigma = sqrt(1 - abar);
    flow: alpha = 1 - sigma). Predictions are noise ("epsilon") or flow velocity ("velocity", v = eps - x0, flow only):

        pred_hat = pred_u + w (pred_c - pred_u)
        x0_hat   = x0(z, pred_hat);   eps_u = eps(z, pred_u)
        z_next   = alpha_next * x0_hat + sigma_next * eps_u

    All schedule arguments are per sample (B,) or scalars. Returns (z_next, x0_hat, pred_hat). Differentiable in w.
    This is the one implementation shared by inference tests, training and the 2D benchmark.
    """
    a, s, a_n, s_n = (_schedule_value(v, z) for v in (alpha, sigma, alpha_next, sigma_next))
    pred_hat = pred_uncond + _bcast(w, z) * (pred_cond - pred_uncond)
    if prediction == "epsilon":
        x0_hat = (z - s * pred_hat) / a
        eps_u = pred_uncond
    elif prediction == "velocity":
        x0_hat = z - s * pred_hat
        eps_u = z + a * pred_uncond
    else:
        raise ValueError(f"prediction must be 'epsilon' or 'velocity', got {prediction!r}")
    return a_n * x0_hat + s_n * eps_u, x0_hat, pred_hat


# ------------------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class AnnealingOptions:
    """What a user sets. Validated on creation.

    lam:                  trade-off in [0, 1]; higher = stronger prompt alignment, lower = quality. Paper default 0.4.
    normalize_delta_norm: scale ||delta|| by sqrt(trained_numel / numel) so other resolutions see in-range inputs (default on;
                          off reproduces upstream exactly).
    w_min, w_max:         optional clamp of the MLP's w (CFG++ units); None = no clamp.
    active_start, active_end: fraction of the schedule (0 = first step, 1 = end) where annealing applies; outside,
                          plain CFG with scale ``fallback_cfg`` (ordinary CFG units, whatever the sampler).
    fallback_cfg:         CFG scale outside the active range (1 = no guidance there).
    """

    lam: float = 0.4
    normalize_delta_norm: bool = True
    w_min: float | None = None
    w_max: float | None = None
    active_start: float = 0.0
    active_end: float = 1.0
    fallback_cfg: float = 1.0

    def __post_init__(self):
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lambda must be a number in [0, 1], got {self.lam!r}")
        for name in ("w_min", "w_max"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be finite or None, got {value!r}")
        if self.w_min is not None and self.w_max is not None and self.w_min > self.w_max:
            raise ValueError(f"w_min ({self.w_min}) must not exceed w_max ({self.w_max})")
        if not 0.0 <= self.active_start < self.active_end <= 1.0:
            raise ValueError(f"need 0 <= active_start < active_end <= 1, got {self.active_start} and {self.active_end}")
        if not math.isfinite(self.fallback_cfg) or self.fallback_cfg < 0:
            raise ValueError(f"fallback_cfg must be a finite number >= 0, got {self.fallback_cfg!r}")

    @property
    def full_range(self) -> bool:
        return self.active_start == 0.0 and self.active_end == 1.0


# ----------------------------------------------------------------------------------------------------------- recorder


RECORD_FIELDS = ("sigma", "timestep", "delta_norm", "mlp_delta_norm", "w", "k", "cfg_scale", "step", "on_schedule", "active")


@dataclass
class GuidanceTrace:
    """What was applied, one row per sampling step (``steps``) and one column per batch item.

    w is in CFG++ units (the MLP's output, or fallback_cfg / k outside the active range); k is the factor applied to it
    (1 under samplers that renoise with the uncond); cfg_scale = w * k_step is the CFG-equivalent scale of the step in
    ordinary CFG units, whatever the sampler (fallback_cfg outside the active range). ``evaluations`` counts every
    guidance call, including intermediate ones.
    """

    steps: list
    values: dict = field(default_factory=dict)
    evaluations: int = 0

    def __getitem__(self, name):
        return self.values[name]

    @property
    def batch_size(self) -> int:
        return 0 if not self.steps else self.values["w"].shape[1]

    def to_dict(self) -> dict:
        return {"steps": list(self.steps), "evaluations": self.evaluations, **{k: v.tolist() for k, v in self.values.items()}}


class GuidanceRecorder:
    """Keeps every guidance evaluation's per-sample values as device tensors; converts once in :meth:`trace`.

    Recording never synchronises the device (no ``.item()``/``.cpu()`` in the sampling step).
    """

    def __init__(self):
        self._rows: list[dict[str, torch.Tensor]] = []

    def reset(self) -> None:
        self._rows = []

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, **values: torch.Tensor) -> None:
        self._rows.append({name: values[name].detach() for name in RECORD_FIELDS})

    def trace(self) -> GuidanceTrace:
        """One row per schedule step: the last evaluation made exactly on that step's sigma (an intermediate
        evaluation only where a step has none on its sigma)."""
        if not self._rows:
            return GuidanceTrace(steps=[], values={}, evaluations=0)
        stacked = {name: torch.stack([row[name].reshape(-1) for row in self._rows]).cpu() for name in RECORD_FIELDS}
        chosen: dict[int, tuple[int, bool]] = {}  # step -> (row, made exactly on the step's sigma)
        for row, (step, exact) in enumerate(zip(stacked["step"][:, 0].tolist(), stacked["on_schedule"][:, 0].tolist())):
            if exact or step not in chosen:  # the last exact evaluation wins; else the first intermediate one
                chosen[step] = (row, bool(exact))
        steps = sorted(chosen)
        rows = torch.tensor([chosen[s][0] for s in steps], dtype=torch.long)
        values = {name: stacked[name][rows].numpy() for name in RECORD_FIELDS if name != "step"}
        return GuidanceTrace(steps=steps, values=values, evaluations=len(self._rows))


# ---------------------------------------------------------------------------------------------------------- the guide


class AnnealingGuidance:
    """Applies a guidance-scale model inside any sampler: ``guide(...)`` returns the guided x0-prediction.

    Holds the model and the user's :class:`AnnealingOptions`; keeps no state between calls except the optional recorder.
    """

    def __init__(self, model, options: AnnealingOptions | None = None):
        if getattr(model, "metadata", None) is None:
            raise ValueError("the guidance model has no metadata; load it with annealing.load_guidance_model")
        self.model = model
        self.options = options or AnnealingOptions()

    def guide(
        self,
        sigma: torch.Tensor,
        d_cond: torch.Tensor,
        d_uncond: torch.Tensor,
        *,
        sampling: str,
        sigma_to_timestep=None,
        sample_sigmas: torch.Tensor | None = None,
        sigma_next: torch.Tensor | None = None,
        sampler_renoises_with_uncond: bool = False,
        recorder: GuidanceRecorder | None = None,
    ) -> torch.Tensor:
        """The guided x0-prediction D_g for one model evaluation.

        sigma:          (B,) or scalar noise level of this evaluation.
        d_cond/d_uncond: x0-predictions, any float dtype; D_g comes back in d_cond's dtype.
        sampling:       "eps", "v_prediction" or "const" (the host model's type).
        sigma_to_timestep: the host's sigma -> DDPM timestep (needed by ddpm_index checkpoints).
        sample_sigmas:  the running sampler's schedule (decreasing, ending at 0); gives sigma_next and the progress.
        sigma_next:     overrides the schedule's next sigma (e.g. an ancestral step's sigma_down).
        sampler_renoises_with_uncond: True under *_cfg_pp samplers: w is applied as is (k = 1).
        recorder:       optional :class:`GuidanceRecorder`.
        """
        check_sampling(sampling)
        meta, opts = self.model.metadata, self.options
        batch, device = d_cond.shape[0], d_cond.device
        sigma = per_sample(sigma, batch, device)

        # D_c - D_u once: its norm gives ||delta|| and it is reused for the guided prediction (the hot path runs every step).
        difference = d_cond.to(torch.float32) - d_uncond.to(torch.float32)
        norm = delta_norm_from_difference(sigma, per_sample_norm(difference), sampling, meta.prediction_space)
        scale = delta_norm_scale(difference[0].numel(), meta.trained_latent_numel) if opts.normalize_delta_norm else 1.0
        mlp_norm = norm * scale
        timestep = mlp_timestep(sigma, meta.timestep_convention, sigma_to_timestep)
        w = self.model(timestep, mlp_norm, opts.lam).to(device)
        if opts.w_min is not None or opts.w_max is not None:
            w = w.clamp(min=opts.w_min, max=opts.w_max)

        if sample_sigmas is not None:
            step, schedule_next, on_schedule = locate_on_schedule(sigma, sample_sigmas)
            steps_total = max(sample_sigmas.shape[0] - 1, 1)
            if sigma_next is None:
                sigma_next = schedule_next
        else:
            if sigma_next is None and not sampler_renoises_with_uncond:
                raise ValueError("renoising needs the sampler's schedule: pass sample_sigmas or sigma_next")
            if not opts.full_range:
                raise ValueError("an active range needs the sampler's schedule: pass sample_sigmas")
            step = torch.zeros(batch, dtype=torch.long, device=device)
            on_schedule = torch.zeros(batch, dtype=torch.bool, device=device)
            steps_total = 1
        k_step = renoise_factor(sigma, per_sample(sigma_next, batch, device), sampling) if sigma_next is not None else torch.ones_like(sigma)
        k = torch.ones_like(k_step) if sampler_renoises_with_uncond else k_step

        if opts.full_range:
            active = torch.ones(batch, dtype=torch.bool, device=device)
        else:
            progress = step.to(torch.float32) / steps_total
            active = (progress >= opts.active_start) & ((progress < opts.active_end) | (opts.active_end >= 1.0))
            # Outside the range: ordinary CFG at fallback_cfg, i.e. fallback_cfg / k in CFG++ units.
            w = torch.where(active, w, opts.fallback_cfg / k_step)

        guided = torch.addcmul(d_uncond.to(torch.float32), difference, _bcast(w * k, difference)).to(d_cond.dtype)
        if recorder is not None:
            recorder.record(
                sigma=sigma, timestep=timestep, delta_norm=norm, mlp_delta_norm=mlp_norm, w=w, k=k, cfg_scale=w * k_step,
                step=step, on_schedule=on_schedule, active=active,
            )
        return guided
