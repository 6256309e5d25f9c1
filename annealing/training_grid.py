"""The sampling grid a checkpoint was trained on, and what it makes of the learned w at any noise level (the reasoning:
docs/design.md, sections 3 to 5).

The MLP's w is in CFG++ units on its training grid: one trained CFG++ step from grid point sigma_i to sigma_{i+1} moves the
guided x0 by w * (D_c - D_u), which is an ordinary CFG step with scale w * k_i, where

    k_i = sigma_i * alpha_{i+1} / (sigma_i * alpha_{i+1} - sigma_{i+1} * alpha_i)        (annealing.schedules.renoise_factor)

Anchoring k to the grid gives one CFG scale per noise level, whatever sampler or step count integrates it:

    k_train(sigma) = k_i at sigma = sigma_i, linear in log sigma in between, k_0 above the first point, k_{N-1} (= 1) below
                     the last one (its step ends at sigma = 0)
    omega(sigma)   = w(t(sigma), ||delta||, lambda) * k_train(sigma)

Two grid kinds, each fully described by its fields (stored in checkpoint metadata as JSON):

* :class:`VPGrid`: a discrete DDPM schedule (SD1.x, SD2.x, SDXL) sampled by DDIM at ``num_steps`` timesteps with diffusers'
  ``timestep_spacing`` (leading, trailing, linspace) and ``steps_offset``; the step after the last timestep ends at
  sigma = 0 (set_alpha_to_one). Upstream: 50 steps, leading, offset 0, scaled_linear betas 0.00085..0.012: 980, 960, ..., 0.
* :class:`FlowGrid`: a flow-matching schedule (SD3): shifted sigmas ``shift * u / (1 + (shift - 1) * u)``, with u spaced
  as diffusers' FlowMatchEulerDiscreteScheduler does (``diffusers``: u linear from 1 to shift(1/T), so the last sigma is
  0.0089 at 28 steps and shift 3) or linear from 1 to 1/N (``simple``, ComfyUI's simple scheduler up to its rounding).

Sigmas are x-space sigmas as a ComfyUI sampler sees them: Karras sigma sqrt((1 - abar) / abar) for VP grids, the flow sigma
for flow grids. Everything here is bounded (a grid described by a stranger's file cannot ask for a huge allocation).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .schedules import continuous_timestep, renoise_factor

VP_SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("scaled_linear", "linear")
FLOW_SPACINGS = ("diffusers", "simple")
#: Bounds on what a grid may describe: a checkpoint's metadata is read from strangers' files.
MAX_GRID_STEPS = 1000
MAX_TRAIN_TIMESTEPS = 10000


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_float(name: str, value, low: float, high: float, low_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        raise ValueError(f"{name} must be a number in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_noise_levels(grid, name: str, label: str, sigmas: torch.Tensor, decreasing: bool) -> None:
    """``sigmas`` (float64) must be finite, positive and strictly monotone in float32, the precision of the lookup table
    (:class:`GridLookup`): betas or a shift that make them infinite, zero or equal describe no schedule. ``label`` names
    an index (timestep, grid step) in the message."""
    values = sigmas.to(torch.float32)
    bad = ~(torch.isfinite(values) & (values > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        what = " or ".join(kind for kind, found in (("inf", torch.isinf(values).any()), ("0", (values == 0).any())) if found) or "NaN"
        raise ValueError(f"{grid.describe()}: {'every' if bool(bad.all()) else 'some'} {name} is {what} ({label} {i}: {float(sigmas[i]):g}); "
                         "a schedule needs finite, positive noise levels")
    steps = values[1:] - values[:-1]
    flat = (steps >= 0) if decreasing else (steps <= 0)
    if bool(flat.any()):
        i = int(flat.nonzero()[0])
        raise ValueError(f"{grid.describe()}: its {name}s are not strictly {'decreasing' if decreasing else 'increasing'} "
                         f"({label}s {i} and {i + 1}: {float(values[i]):g} and {float(values[i + 1]):g} in float32)")


@dataclass(frozen=True)
class VPGrid:
    """A DDIM grid on a discrete DDPM schedule (defaults: upstream's SDXL grid). See the module docstring."""

    num_steps: int = 50
    spacing: str = "leading"
    steps_offset: int = 0
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000

    kind: ClassVar[str] = "vp"
    #: The host sampling type whose x-space these sigmas live in (V-prediction models share it).
    sampling: ClassVar[str] = "eps"

    def __post_init__(self):
        _check_int("num_steps", self.num_steps, 1, MAX_GRID_STEPS)
        _check_int("num_train_timesteps", self.num_train_timesteps, 2, MAX_TRAIN_TIMESTEPS)
        if self.num_steps > self.num_train_timesteps:
            raise ValueError(f"num_steps ({self.num_steps}) must not exceed num_train_timesteps ({self.num_train_timesteps})")
        _check_choice("spacing", self.spacing, VP_SPACINGS)
        _check_int("steps_offset", self.steps_offset, 0, self.num_train_timesteps - 1)
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_float("beta_start", self.beta_start, 0.0, 1.0)
        _check_float("beta_end", self.beta_end, 0.0, 1.0)
        if self.beta_end < self.beta_start:
            raise ValueError(f"beta_end ({self.beta_end}) must not be below beta_start ({self.beta_start})")
        if self.spacing == "leading" and self.timesteps_raw()[0] >= self.num_train_timesteps:
            raise ValueError(f"steps_offset {self.steps_offset} puts the first timestep beyond {self.num_train_timesteps - 1}")
        _check_noise_levels(self, "sigma", "timestep", self.schedule_sigmas(), decreasing=False)  # the grid's are among them

    def alphas_cumprod(self) -> torch.Tensor:
        """abar_t of the whole DDPM schedule, float64, length num_train_timesteps."""
        count = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, count, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(self.beta_start, self.beta_end, count, dtype=torch.float64)
        return torch.cumprod(1.0 - betas, dim=0)

    def timesteps_raw(self) -> list[int]:
        count, steps = self.num_train_timesteps, self.num_steps
        if self.spacing == "leading":  # diffusers: (arange(N) * (T // N))[::-1] + steps_offset
            ratio = count // steps
            return [i * ratio + self.steps_offset for i in range(steps - 1, -1, -1)]
        if self.spacing == "trailing":  # diffusers: round(arange(T, 0, -T / N)) - 1
            ratio = count / steps
            return [round(count - i * ratio) - 1 for i in range(steps)]
        return [round(x) for x in torch.linspace(0, count - 1, steps, dtype=torch.float64).flip(0).tolist()]

    def timesteps(self) -> torch.Tensor:
        """The DDPM timesteps of the grid, noisiest first (long)."""
        return torch.tensor(self.timesteps_raw(), dtype=torch.long)

    def schedule_sigmas(self) -> torch.Tensor:
        """Karras sigma of every DDPM timestep (float64, increasing with t)."""
        abar = self.alphas_cumprod()
        return ((1.0 - abar) / abar).sqrt()

    def sigmas(self) -> torch.Tensor:
        """The grid's sigmas, noisiest first, followed by 0 (float64, length num_steps + 1)."""
        sigmas = self.schedule_sigmas()[self.timesteps()]
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    def sigma_to_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Float DDPM timestep of ``sigma`` on this schedule (exact on the schedule's points, interpolated in log sigma)."""
        return continuous_timestep(sigma, self._log_sigmas(sigma.device))

    def _log_sigmas(self, device) -> torch.Tensor:
        cache = self.__dict__.setdefault("_log_sigma_cache", {})
        key = str(device)
        if key not in cache:
            cache[key] = self.schedule_sigmas().log().to(device=device, dtype=torch.float32)
        return cache[key]

    def to_dict(self) -> dict:
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def describe(self) -> str:
        return (f"{self.num_steps}-step DDIM ({self.spacing}, offset {self.steps_offset}) on {self.beta_schedule} betas "
                f"{self.beta_start:g}..{self.beta_end:g}")


@dataclass(frozen=True)
class FlowGrid:
    """A flow-matching grid of shifted sigmas (defaults: SD3 with diffusers' spacing at 28 steps). See the module docstring."""

    num_steps: int = 28
    shift: float = 3.0
    spacing: str = "diffusers"
    num_train_timesteps: int = 1000

    kind: ClassVar[str] = "flow"
    sampling: ClassVar[str] = "const"

    def __post_init__(self):
        _check_int("num_steps", self.num_steps, 1, MAX_GRID_STEPS)
        _check_float("shift", self.shift, 0.0, 100.0)
        _check_choice("spacing", self.spacing, FLOW_SPACINGS)
        _check_int("num_train_timesteps", self.num_train_timesteps, 2, MAX_TRAIN_TIMESTEPS)
        _check_noise_levels(self, "sigma", "grid step", self.sigmas()[:-1], decreasing=True)

    def shifted(self, u: torch.Tensor) -> torch.Tensor:
        return self.shift * u / (1 + (self.shift - 1) * u)

    def sigmas(self) -> torch.Tensor:
        """The grid's sigmas, noisiest first, followed by 0 (float64, length num_steps + 1)."""
        steps = self.num_steps
        if self.spacing == "diffusers":
            # FlowMatchEulerDiscreteScheduler.set_timesteps: u from sigma_max = 1 to sigma_min = shift(1 / T), then shifted again
            low = float(self.shifted(torch.tensor(1.0 / self.num_train_timesteps, dtype=torch.float64)))
            u = torch.linspace(1.0, low, steps, dtype=torch.float64)
        else:
            u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
        sigmas = self.shifted(u)
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    def to_dict(self) -> dict:
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def describe(self) -> str:
        return f"{self.num_steps}-step flow grid (shift {self.shift:g}, {self.spacing} spacing)"


TrainingGrid = VPGrid | FlowGrid
GRID_KINDS = {"vp": VPGrid, "flow": FlowGrid}


def grid_from_dict(data: dict) -> TrainingGrid:
    """A grid from its JSON form; ValueError naming the field for anything unknown or out of range."""
    if not isinstance(data, dict):
        raise ValueError(f"a training grid is a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in GRID_KINDS:
        raise ValueError(f"training grid kind must be one of {', '.join(GRID_KINDS)}; got {kind!r}")
    cls = GRID_KINDS[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k != "kind" and k not in known)
    if unknown:
        raise ValueError(f"unknown training grid field {unknown[0]!r} for a {kind} grid")
    values = {k: v for k, v in data.items() if k != "kind"}
    for name in ("beta_start", "beta_end", "shift"):  # JSON writes 3.0 as 3.0 but a hand-written 3 is an int
        if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
            values[name] = float(values[name])
    return cls(**values)


# -------------------------------------------------------------------------------------------------------------- k_train


def grid_step_factors(grid: TrainingGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_i, k_i) for every grid point, noisiest first, float64: k of the trained step sigma_i -> sigma_{i+1}."""
    sigmas = grid.sigmas()
    return sigmas[:-1], renoise_factor(sigmas[:-1], sigmas[1:], grid.sampling)


def _interpolate(log_knots: torch.Tensor, values: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``values`` (M, C) over increasing ``log_knots`` (M,) at ``log_sigma`` (B,),
    constant beyond the ends: (B, C). Device-side, no host synchronisation."""
    count = log_knots.shape[0]
    if count == 1:
        return values.expand(log_sigma.shape[0], -1)
    high = torch.searchsorted(log_knots, log_sigma).clamp(1, count - 1)
    low = high - 1
    frac = ((log_sigma - log_knots[low]) / (log_knots[high] - log_knots[low])).clamp(0.0, 1.0)
    return torch.lerp(values[low], values[high], frac.unsqueeze(-1))


def k_train(grid: TrainingGrid, sigma: torch.Tensor) -> torch.Tensor:
    """k_train(sigma) of ``grid`` (see the module docstring): float64, sigma's shape. The pure form of :class:`GridLookup`."""
    sigmas, factors = grid_step_factors(grid)
    log_knots = sigmas.flip(0).log()
    flat = sigma.reshape(-1).to(torch.float64).clamp_min(1e-30).log()
    return _interpolate(log_knots, factors.flip(0).unsqueeze(-1), flat)[:, 0].reshape(sigma.shape)


def anchored_omega(w: torch.Tensor, sigma: torch.Tensor, grid: TrainingGrid) -> torch.Tensor:
    """omega(sigma) = w * k_train(sigma): the learned w (CFG++ units on ``grid``) read as an ordinary CFG scale."""
    return w * k_train(grid, sigma).to(w.dtype)


#: The timestep of clean data (sigma 0) on a DDPM schedule, one below its first index (DDIM's final step ends there).
VP_CLEAN_TIMESTEP = -1.0


class GridLookup:
    """What the guidance networks read for any sigma, from one table kept per device:
    ``lookup(sigma) -> (timestep, k_train, next_timestep)``.

    timestep:      the MLP's timestep input in the checkpoint's convention.
    k_train:       see the module docstring.
    next_timestep: the timestep where the trained step that starts at sigma ends (the training grid's next point; clean data
                   after the last one), linear in log sigma between grid points: Learn to Guide's s in anchored mode.

    VP grids: the table's knots are every DDPM timestep's log sigma: t is then the float DDPM index (exact on the schedule,
    interpolated in log sigma between, clamped to [0, T - 1]) and, since the grid's points are among the knots, k_train and
    next_timestep are exact too. Flow grids: knots at the grid's sigmas, and t = 1000 sigma ("sigma_x1000") or sigma ("sigma").
    One searchsorted and one gather per call; the first call on a device copies the table there once.
    """

    def __init__(self, grid: TrainingGrid, timestep_convention: str):
        self.grid, self.timestep_convention = grid, timestep_convention
        sigmas, factors = grid_step_factors(grid)
        grid_log_knots = sigmas.flip(0).log()
        if isinstance(grid, VPGrid):
            if timestep_convention != "ddpm_index":
                raise ValueError(f"a DDPM training grid goes with the ddpm_index timestep convention, not {timestep_convention!r}")
            steps = grid.timesteps().to(torch.float64)
            next_steps = torch.cat([steps[1:], torch.tensor([VP_CLEAN_TIMESTEP], dtype=torch.float64)])
            grid_values = torch.stack([factors, next_steps], dim=1).flip(0)
            log_knots = grid.schedule_sigmas().log()
            at_knots = _interpolate(grid_log_knots, grid_values, log_knots)
            values = torch.cat([torch.arange(log_knots.shape[0], dtype=torch.float64).unsqueeze(-1), at_knots], dim=1)
        else:
            if timestep_convention not in ("sigma_x1000", "sigma"):
                raise ValueError(f"a flow training grid goes with the sigma_x1000 or sigma timestep convention, not {timestep_convention!r}")
            unit = 1000.0 if timestep_convention == "sigma_x1000" else 1.0
            next_steps = torch.cat([sigmas[1:], torch.zeros(1, dtype=torch.float64)]) * unit
            log_knots, values = grid_log_knots, torch.stack([factors, next_steps], dim=1).flip(0)
        # One row per knot: [log sigma, values..., slopes to the next knot...]: one gather per call finds all of them.
        slopes = (values[1:] - values[:-1]) / (log_knots[1:] - log_knots[:-1]).unsqueeze(-1) if log_knots.shape[0] > 1 else values[:0]
        slopes = torch.cat([slopes, torch.zeros_like(values[:1])])
        self._channels = values.shape[1]
        self._rows = torch.cat([log_knots.unsqueeze(-1), values, slopes], dim=1).to(torch.float32)
        self._log_range = (float(self._rows[0, 0]), float(self._rows[-1, 0]))  # Python floats: no tensor indexing per call
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._on_device:
            rows = self._rows.to(device)
            self._on_device[key] = (rows[:, 0].contiguous(), rows)
        return self._on_device[key]

    def __call__(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(timestep, k_train, next_timestep) for ``sigma`` (B,), float32 on sigma's device."""
        log_knots, rows = self._table(sigma.device)
        sigma = sigma.reshape(-1).to(torch.float32)
        log_sigma = sigma.clamp_min(1e-30).log().clamp(*self._log_range)  # constant beyond the ends
        # clamped to the knots, searchsorted(right) - 1 lies in 0..M-1; the last row's slopes are zero
        row = rows[torch.searchsorted(log_knots, log_sigma, right=True) - 1]
        channels = self._channels
        found = torch.addcmul(row[:, 1 : 1 + channels], (log_sigma - row[:, 0]).unsqueeze(-1), row[:, 1 + channels :])
        if self.timestep_convention == "ddpm_index":
            return found[:, 0], found[:, 1], found[:, 2]
        timestep = sigma * 1000.0 if self.timestep_convention == "sigma_x1000" else sigma
        return timestep, found[:, 0], found[:, 1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep of any sigma in the checkpoint's convention; sigma 0 (clean data) is the clean timestep."""
        timestep = self(sigma)[0]
        clean = VP_CLEAN_TIMESTEP if self.timestep_convention == "ddpm_index" else 0.0
        return torch.where(sigma.reshape(-1) > 0, timestep, clean)
