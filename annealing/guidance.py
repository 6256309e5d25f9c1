"""Annealing guidance math, host-agnostic: pure functions on tensors, the user's options, and the guide.

Conventions (ComfyUI's; docs/design.md, section 1): x-space x = alpha * x0 + sigma * eps, with alpha = 1 for EPS and V-prediction
models and alpha = 1 - sigma for CONST (flow) models. A sampler hook has sigma per sample and the x0-predictions D_c (cond)
and D_u (uncond). From these:

    delta_eps = alpha * (D_c - D_u) / sigma          (= eps_u - eps_c)
    delta_vel =         (D_c - D_u) / sigma          (= v_u - v_c, v = dx/dsigma: eps for EPS, eps - x0 for flow)
    w         = MLP(t(sigma), ||delta|| * sqrt(trained_numel / numel), lambda)           (CFG++ units on the training grid)
    D_g       = D_u + w * factor * (D_c - D_u)

where ``factor`` is decided per evaluation by :func:`annealing.scale_rule.evaluation_scale` (anchored: k_train(sigma), the
training grid's k, so w * k_train is one CFG scale per noise level; per_step: the k of the sampler's own step; as_is: 1).
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass

import torch

from .broadcast import as_batch, batch_view
from .domain_check import MAX_DELTA_NORM_MULTIPLE
from .lambda_rule import check_lambda
from .model import W_LIMIT
from .recorder import GuidanceRecorder
from .samplers import SamplerInfo, sampler_step_end
from .scale_rule import MODES, check_mode, evaluation_scale, learned_s_from
from .schedules import check_sampling, locate_on_schedule, signal_scale
from .training_grid import GridLookup

# --------------------------------------------------------------------------------------------------------- pure functions


def delta_norm_from_difference(sigma: torch.Tensor, difference_norm: torch.Tensor, sampling: str, space: str) -> torch.Tensor:
    """||delta|| in ``space`` from ||D_c - D_u|| (per sample): the norm of delta without building it.

    epsilon: alpha * ||D_c - D_u|| / sigma;  velocity: ||D_c - D_u|| / sigma.
    """
    sigma = sigma.to(torch.float32)
    if space == "epsilon":
        if check_sampling(sampling) != "const":  # alpha = 1
            return difference_norm / sigma
        return difference_norm * signal_scale(sigma, sampling) / sigma
    if space == "velocity":
        check_sampling(sampling)
        return difference_norm / sigma
    raise ValueError(f"space must be 'epsilon' or 'velocity', got {space!r}")


def per_sample_norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm over everything but the batch dimension, shape (B,), float32; overflow-safe (a sum of squares of values
    around 1e20 overflows float32). On the CPU it is summed in float32 and redone in float64 only when that overflowed
    (reading a CPU value back costs nothing there); on an accelerator it is summed in float64, which needs no read-back,
    or scaled by the largest value where float64 is missing (Apple MPS)."""
    flat = tensor.reshape(tensor.shape[0], -1)
    if flat.device.type == "cpu":
        if flat.dtype == torch.float64:
            return torch.linalg.vector_norm(flat, dim=1).to(torch.float32)
        norm = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32)
        # one sum and one read instead of isfinite's five ops: finite norms sum to a finite value unless they are near
        # float32's limit, which only sends them down the exact float64 path below
        if math.isfinite(float(norm.sum())) or not bool(torch.isfinite(flat).all()):
            return norm
        return torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64).to(torch.float32)
    if flat.device.type == "mps":  # no float64 there
        peak = flat.detach().abs().amax(dim=1, keepdim=True).to(torch.float32).clamp_min(1e-30)
        return (torch.linalg.vector_norm(flat.to(torch.float32) / peak, dim=1) * peak[:, 0]).to(torch.float32)
    return torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64).to(torch.float32)


def delta_norm_scale(latent_numel: int, trained_latent_numel: int | None) -> float:
    """sqrt(trained / numel): makes ||delta|| at another resolution look like it did at the training resolution."""
    if not trained_latent_numel:
        return 1.0
    return math.sqrt(trained_latent_numel / latent_numel)


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
    return guided_ddim_step(z, pred_uncond, pred_cond, w, alpha, sigma, alpha_next, sigma_next, prediction, renoise="uncond")


def guided_ddim_step(z, pred_uncond, pred_cond, scale, alpha, sigma, alpha_next, sigma_next, prediction: str = "epsilon",
                     renoise: str = "guided"):
    """One guided DDIM step (eta 0) z_t -> z_next with scale ``scale``: ``renoise="guided"`` renoises with the guided
    noise (ordinary CFG, as Learn to Guide trains), ``"uncond"`` with the unconditional noise (CFG++, :func:`cfgpp_step`).
    Arguments and the (z_next, x0_hat, pred_hat) result as for :func:`cfgpp_step`; differentiable (and affine) in scale."""
    if renoise not in ("guided", "uncond"):
        raise ValueError(f"renoise must be 'guided' or 'uncond', got {renoise!r}")
    a, s, a_n, s_n = (batch_view(v, z) for v in (alpha, sigma, alpha_next, sigma_next))
    pred_hat = pred_uncond + batch_view(scale, z) * (pred_cond - pred_uncond)
    pred_noise = pred_hat if renoise == "guided" else pred_uncond
    if prediction == "epsilon":
        x0_hat, eps = (z - s * pred_hat) / a, pred_noise
    elif prediction == "velocity":
        x0_hat, eps = z - s * pred_hat, z + a * pred_noise
    else:
        raise ValueError(f"prediction must be 'epsilon' or 'velocity', got {prediction!r}")
    return a_n * x0_hat + s_n * eps, x0_hat, pred_hat


# ------------------------------------------------------------------------------------------------------------ options


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32, without dispatching a no-op cast when it is already (the guide runs every sampling step)."""
    return tensor if tensor.dtype == torch.float32 else tensor.to(torch.float32)


def _is_number(value) -> bool:
    """A finite real number (Python or NumPy; not a bool, not a tensor)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    if isinstance(value, int):
        return value.bit_length() <= 1000  # float() of a 400-digit integer raises OverflowError
    return math.isfinite(float(value))


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_device(name: str, value, device: torch.device) -> None:
    """A tensor on the meta device has no values: accepted only when the predictions are there too (a dry run)."""
    if torch.is_tensor(value) and value.device.type == "meta" and device.type != "meta":
        raise ValueError(f"{name} is a tensor on the meta device (a shape without values) while the predictions are on {device}")


@dataclass(frozen=True)
class AnnealingOptions:
    """Everything a user sets, declared once and validated on creation (a ValueError naming the setting).

    lam:                  trade-off in [0, 1]; higher = stronger prompt alignment, lower = quality. Paper default 0.4.
    mode:                 how w (CFG++ units on the training grid) becomes the scale a sampler gets
                          (:mod:`annealing.scale_rule`): "anchored" (default), "per_step" or "as_is".
    normalize_delta_norm: scale ||delta|| by sqrt(trained_numel / numel) so other resolutions see in-range inputs (default on;
                          the same at the training resolution).
    w_min, w_max:         optional clamp of the MLP's w (CFG++ units); None = no clamp.
    active_start, active_end: fraction of the sampler's schedule (0 = first step, 1 = end) where annealing applies; outside,
                          plain CFG at the fallback scale.
    fallback_cfg:         the plain CFG scale outside the active range (ordinary CFG units, whatever the sampler); None =
                          the host's own CFG scale (KSampler's cfg), passed to each call.
    """

    lam: float = 0.4
    mode: str = "anchored"
    normalize_delta_norm: bool = True
    w_min: float | None = None
    w_max: float | None = None
    active_start: float = 0.0
    active_end: float = 1.0
    fallback_cfg: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "lam", check_lambda(self.lam))  # checked once, here: the guide's hot path does not again
        check_mode(self.mode)
        for name in ("w_min", "w_max"):
            value = getattr(self, name)
            if value is not None and not _is_number(value):
                raise ValueError(f"{name} must be a finite number or None, got {value!r}")
        if self.w_min is not None and self.w_max is not None and self.w_min > self.w_max:
            raise ValueError(f"w_min ({self.w_min}) must not exceed w_max ({self.w_max})")
        for name in ("active_start", "active_end"):
            if not _is_number(getattr(self, name)):
                raise ValueError(f"{name} must be a number in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 <= self.active_start < self.active_end <= 1.0:
            raise ValueError(f"need 0 <= active_start < active_end <= 1, got active_start {self.active_start} and active_end {self.active_end}")
        if self.fallback_cfg is not None and (not _is_number(self.fallback_cfg) or self.fallback_cfg < 0):
            raise ValueError(f"fallback_cfg must be a finite number >= 0 or None, got {self.fallback_cfg!r}")

    @property
    def full_range(self) -> bool:
        return self.active_start == 0.0 and self.active_end == 1.0


# ---------------------------------------------------------------------------------------------------------- the guide


class AnnealingGuidance:
    """Applies a guidance network inside any sampler: ``guide(...)`` returns the guided x0-prediction.

    Holds the network, the user's :class:`AnnealingOptions` and the checkpoint's grid lookup (the network's timestep,
    k_train and the training grid's next point for any sigma); keeps no state between calls except the optional recorder.
    Two methods, as ``model.metadata.method`` says:

    * annealing: w = MLP(t, ||delta||, lambda) in CFG++ units, turned into the sampler's scale by the mode's rule;
    * learn_to_guide: the CFG scale 1 + omega(t, s, prompt) of a step from t to s; it needs the prompt embedding. s is
      where the running sampler's step ends (its next noise level; sigma_down for ancestral samplers) in every mode for
      a network trained on continuous (s, t), the paper's way; for an earlier one trained on its grid's next point, that
      point of the training grid in anchored mode (:func:`annealing.scale_rule.learned_s_from`).

    Build it once per user setting (the options are checked when they are built, lambda included, and not again per
    evaluation) and move it with :meth:`to`; :meth:`guide` computes where its predictions are, moving itself there once if
    needed. Where w is not finite or beyond :data:`annealing.model.W_LIMIT` the evaluation gets plain CFG at the fallback
    scale for that sample, recorded by the recorder (``trace["fallback"]``; docs/design.md, section 6).
    """

    def __init__(self, model, options: AnnealingOptions | None = None):
        metadata = getattr(model, "metadata", None)
        if metadata is None:
            raise ValueError("the guidance model has no metadata; load it with annealing.load_guidance_model")
        self.model = model
        self.options = options or AnnealingOptions()
        self.method = metadata.method
        if self.method == "learn_to_guide" and self.options.mode == "as_is":
            raise ValueError("mode as_is applies to annealing's CFG++ units; a learn_to_guide checkpoint gives a CFG scale: use "
                             "anchored or per_step")
        self.lookup = GridLookup(metadata.training_grid, metadata.timestep_convention)
        # the guide's own copies on other devices (shared by all of them, so each is made once), see to()
        self._ready = all(p.dtype == torch.float32 for p in model.parameters())  # float32 already: usable where it is
        self._copies: dict[str, AnnealingGuidance] = {str(self.model.device): self} if self._ready else {}

    @property
    def device(self) -> torch.device:
        """Where the guide's network computes."""
        return self.model.device

    def to(self, device: str | torch.device) -> AnnealingGuidance:
        """This guide on ``device``: the same options and grid lookup, with the network as a float32 copy on that device.

        Like ``Tensor.to`` it returns the guide itself when its network is float32 on ``device`` already, and it never moves
        the network it was built with (a loaded model may serve other nodes). Each device's copy is made on the first call
        and kept, so calling ``guide.to(d_cond.device)`` on every evaluation costs one dictionary lookup. :meth:`guide` does
        it by itself when its predictions are on another device."""
        device = torch.device(device)
        if self._ready and _same_device(self.model.device, device):
            return self
        key = str(device)
        found = self._copies.get(key)
        if found is None:
            found = copy.copy(self)  # options, lookup (it keeps a table per device) and the shared _copies
            found.model = copy.deepcopy(self.model).to(device=device, dtype=torch.float32).requires_grad_(False)
            found._ready = True
            self._copies[key] = found
        return found

    def guide(
        self,
        sigma: torch.Tensor | float,
        d_cond: torch.Tensor,
        d_uncond: torch.Tensor,
        *,
        sampling: str,
        sampler: SamplerInfo | None = None,
        sample_sigmas: torch.Tensor | None = None,
        host_cfg: float = 1.0,
        prompt: torch.Tensor | None = None,
        recorder: GuidanceRecorder | None = None,
    ) -> torch.Tensor:
        """The guided x0-prediction D_g for one model evaluation, in d_cond's dtype.

        sigma:          (B,) or scalar noise level of this evaluation (x-space, as the sampler sees it).
        d_cond/d_uncond: x0-predictions of equal shape (B, ...), any float dtype; the math runs in float32.
        sampling:       "eps", "v_prediction" or "const" (the host model's type).
        sampler:        the running sampler (:class:`annealing.samplers.SamplerInfo`); None = an ordinary sampler.
        sample_sigmas:  the running sampler's schedule (decreasing, ending at 0). Needed by per_step mode, *_cfg_pp
                        samplers and an active range; anchored mode with an ordinary sampler needs none.
        host_cfg:       the host's own CFG scale, used outside the active range when ``options.fallback_cfg`` is None.
        prompt:         learn_to_guide only: the prompt embedding, (B, P) or (1, P) (:func:`annealing.prompt_embedding`).
        recorder:       optional :class:`annealing.GuidanceRecorder`.

        At sigma <= 0 the two predictions coincide and no guidance is applied (scale 1). fp16 results are clamped to
        fp16's range before the cast back. Outside the active range, and where w is not finite or beyond W_LIMIT, the
        scale is plain CFG at ``options.fallback_cfg`` or else ``host_cfg``, which must then be a finite number.
        Tensors on the meta device (shapes without values) are a dry run when the predictions are there too, and a
        ValueError otherwise; every bad input is one ValueError naming it.
        """
        check_sampling(sampling)
        if not (torch.is_tensor(d_cond) and torch.is_tensor(d_uncond)):
            raise ValueError(f"d_cond and d_uncond must be tensors, got {type(d_cond).__name__} and {type(d_uncond).__name__}")
        if d_cond.shape != d_uncond.shape:
            raise ValueError(f"d_cond and d_uncond must have the same shape, got {tuple(d_cond.shape)} and {tuple(d_uncond.shape)}")
        if d_cond.dim() < 1 or d_cond.shape[0] == 0 or d_cond.numel() == 0:
            raise ValueError(f"an empty batch cannot be guided (predictions of shape {tuple(d_cond.shape)})")
        if not (d_cond.is_floating_point() and d_uncond.is_floating_point()):
            raise ValueError(f"predictions must be floating point, got {d_cond.dtype} and {d_uncond.dtype}")
        device = d_cond.device
        for name, value in (("d_uncond", d_uncond), ("sigma", sigma), ("sample_sigmas", sample_sigmas), ("prompt", prompt)):
            _check_device(name, value, device)
        if not (self._ready and _same_device(self.model.device, device)):  # the network computes where the predictions are
            return self.to(device).guide(sigma, d_cond, d_uncond, sampling=sampling, sampler=sampler, sample_sigmas=sample_sigmas,
                                         host_cfg=host_cfg, prompt=prompt, recorder=recorder)
        meta, opts = self.model.metadata, self.options
        fallback_scale = host_cfg if opts.fallback_cfg is None else opts.fallback_cfg
        if opts.fallback_cfg is None and not _is_number(host_cfg):  # used outside the active range and where w falls back
            raise ValueError(f"cfg (the sampler's CFG scale, the fallback of annealing guidance) must be a finite number, got {host_cfg!r}")
        sampler = sampler or SamplerInfo()
        batch = d_cond.shape[0]
        sigma = as_batch(sigma, batch, device, name="sigma")
        positive = sigma > 0  # sigma 0: D_c = D_u = x, nothing to guide (and delta would divide by zero)

        # D_c - D_u once: its norm gives ||delta|| and it is reused for the guided prediction (the hot path runs every step).
        d_uncond32 = _float32(d_uncond)
        difference = _float32(d_cond) - d_uncond32
        norm = delta_norm_from_difference(sigma, per_sample_norm(difference), sampling, meta.prediction_space)
        norm = torch.where(positive, norm, 0.0)
        if self.method == "learn_to_guide":
            w, k_train, timestep = self._learned_scale(sigma, prompt, sampling, sampler, sample_sigmas)
            mlp_norm = norm  # recorded for the plot; the network does not read it
            mode, limit = "anchored", W_LIMIT + 1.0  # w = 1 + omega is a CFG scale already: only *_cfg_pp samplers convert it
        else:
            # Far outside anything seen in training the MLP's output is meaningless and can overflow: its input is bounded.
            bound = MAX_DELTA_NORM_MULTIPLE * self.model.config.delta_embed_normalization
            factor = delta_norm_scale(difference.numel() // batch, meta.trained_latent_numel) if opts.normalize_delta_norm else 1.0
            mlp_norm = (norm * factor).clamp(max=bound)
            timestep, k_train, _ = self.lookup(sigma)
            w, mode, limit = self.model.forward_trusted(timestep, mlp_norm, opts.lam), opts.mode, W_LIMIT  # lambda checked by the options
        if opts.w_min is not None or opts.w_max is not None:
            w = w.clamp(min=opts.w_min, max=opts.w_max)
        in_domain = w.abs() <= limit  # False for NaN: such a w is never applied (docs/design.md, section 6)

        rule = evaluation_scale(mode, sigma, k_train, sampling=sampling, sampler=sampler, sample_sigmas=sample_sigmas)
        scale = w if rule.factor is None else w * rule.factor
        omega = scale if rule.cfg_factor is rule.factor else (w if rule.cfg_factor is None else w * rule.cfg_factor)
        use_w, active = in_domain, None
        if not opts.full_range:
            if sample_sigmas is None:
                raise ValueError("an active range needs the sampler's schedule: pass sample_sigmas")
            step = locate_on_schedule(sigma, sample_sigmas)[0]
            progress = step.to(torch.float32) / max(sample_sigmas.shape[0] - 1, 1)
            active = (progress >= opts.active_start) & ((progress < opts.active_end) | (opts.active_end >= 1.0))
            use_w = active & in_domain
        # plain CFG outside the active range, and where w is not finite or beyond the limit (a fallback, recorded)
        plain = fallback_scale if rule.sampler_units is None else fallback_scale * rule.sampler_units  # in the sampler's units
        scale = torch.where(positive, torch.where(use_w, scale, plain), 1.0)

        guided = torch.addcmul(d_uncond32, difference, scale.view(-1, *([1] * (difference.dim() - 1))))
        if d_cond.dtype == torch.float16:  # keep an fp16 model's result finite
            guided = guided.clamp(torch.finfo(torch.float16).min, torch.finfo(torch.float16).max)
        if recorder is not None:  # the recorder works out where it fell back from in_domain, active and sigma, at the end
            omega = torch.where(positive, torch.where(use_w, omega, fallback_scale), 1.0)
            recorder.record(sigma, timestep, norm, mlp_norm, w, scale, omega, active, sample_sigmas, in_domain=in_domain)
        return guided if d_cond.dtype == torch.float32 else guided.to(d_cond.dtype)

    def _learned_scale(self, sigma, prompt, sampling, sampler, sample_sigmas):
        """learn_to_guide: (CFG scale 1 + omega, a factor of ones, t): omega for the step from t(sigma) to s."""
        if prompt is None:
            raise ValueError("a learn_to_guide checkpoint needs the prompt embedding (prompt=...)")
        timestep, _, next_timestep = self.lookup(sigma)
        if learned_s_from(self.options.mode, self.model.config.trained_s) == "sampler":
            if sample_sigmas is None:
                raise ValueError(f"{self.options.mode} mode with this learn_to_guide checkpoint takes s from the sampler's schedule: "
                                 "pass sample_sigmas")
            next_timestep = self.lookup.timestep(sampler_step_end(sigma, sample_sigmas, sampling, sampler)[0])
        scale = 1.0 + self.model(timestep, next_timestep, prompt)
        return scale, torch.ones_like(scale), timestep


__all__ = [
    "MODES",
    "AnnealingGuidance",
    "AnnealingOptions",
    "cfgpp_step",
    "guided_ddim_step",
    "delta_norm_from_difference",
    "delta_norm_scale",
    "per_sample_norm",
]
