"""Every guidance method of the benchmark as one DDIM loop in DDPM z-space with the exact ring denoiser.

At grid step i (timestep t_i, z = a_i x0 + s_i eps) a method sees eps_u, eps_c (exact) and the x0-predictions
D_u, D_c, and returns the x0 estimate and the noise to renoise with; the step is

    z_{i+1} = a_{i+1} x0_hat + s_{i+1} eps_renoise          (after the last grid point: a = 1, s = 0, i.e. x0_hat)

CFG-style methods renoise with their own guided noise (a plain DDIM step, what any ComfyUI sampler does with the D they
return); CFG++ and annealing renoise with eps_u (:func:`annealing.cfgpp_step`). The grid is upstream's: DDIM "leading"
timesteps (980, 960, ..., 0 for 50 steps) of SD's scaled-linear VP schedule, with set_alpha_to_one at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from annealing import AnnealingGuidance, AnnealingOptions, SamplerInfo, cfgpp_step, evaluation_scale, k_train, per_sample_norm
from annealing.baselines import StageWiseGuidance, angle_domain_guidance, apg, cfg, interval_scale
from annealing.training_grid import TrainingGrid
from training.algorithm import SamplingGrid

from .problem import RingProblem


@dataclass
class StepContext:
    """What a method sees at one step (all (B, 2) or (B,) tensors, float32)."""

    index: int
    num_steps: int
    z: torch.Tensor
    timestep: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    alpha_next: torch.Tensor
    sigma_next: torch.Tensor
    eps_u: torch.Tensor
    eps_c: torch.Tensor
    labels: torch.Tensor
    grid_timesteps: torch.Tensor | None = None  # every grid step's model timestep (schedules normalised over the run)

    def x0(self, eps: torch.Tensor) -> torch.Tensor:
        return (self.z - self.sigma * eps) / self.alpha

    def eps_of(self, x0: torch.Tensor) -> torch.Tensor:
        return (self.z - self.alpha * x0) / self.sigma

    @property
    def karras_sigma(self) -> torch.Tensor:
        """ComfyUI's x-space sigma = s / a."""
        return (self.sigma / self.alpha).expand(self.z.shape[0])

    @property
    def step_schedule(self) -> torch.Tensor:
        """[sigma, sigma_next] in x-space: the part of the sampler's schedule that the k of this step depends on."""
        return torch.stack([self.sigma / self.alpha, self.sigma_next / self.alpha_next]).reshape(2)

    def plain(self, eps_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A plain DDIM step with the guided noise."""
        return self.x0(eps_hat), eps_hat

    def from_x0(self, x0_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A plain DDIM step from a guided x0-prediction (what a sampler does with a hook's D)."""
        return x0_hat, self.eps_of(x0_hat)


class Method:
    """A guidance method at one setting. ``family`` groups the settings of a sweep; ``param`` is the swept value."""

    family = "?"
    param_name = "w"

    def __init__(self, param: float):
        self.param = float(param)

    @property
    def label(self) -> str:
        return f"{self.family} {self.param_name}={self.param:g}"

    def reset(self, batch: int) -> None:
        """Called before each trajectory batch (methods with state clear it here)."""

    def step(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class CFG(Method):
    family = "CFG"

    def step(self, ctx):
        return ctx.plain(cfg(ctx.eps_c, ctx.eps_u, self.param))


class CFGPlusPlus(Method):
    family = "CFG++"

    def step(self, ctx):
        _, x0_hat, _ = cfgpp_step(ctx.z, ctx.eps_u, ctx.eps_c, torch.full_like(ctx.timestep, self.param), ctx.alpha, ctx.sigma,
                                  ctx.alpha_next, ctx.sigma_next)
        return x0_hat, ctx.eps_u


class Annealing(Method):
    """w = MLP(t, ||eps_u - eps_c||, lambda), CFG++ step. Records every w in ``self.trace`` and the ||delta|| it saw in
    ``self.norms`` (steps x batch each)."""

    family = "annealing"
    param_name = "lambda"

    def __init__(self, param: float, model):
        super().__init__(param)
        self.model = model
        self.trace: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []

    def reset(self, batch):
        self.trace, self.norms = [], []

    def step(self, ctx):
        norm = per_sample_norm(ctx.eps_u - ctx.eps_c)
        with torch.no_grad():
            w = self.model(ctx.timestep, norm, self.param)
        self.trace.append(w)
        self.norms.append(norm)
        _, x0_hat, _ = cfgpp_step(ctx.z, ctx.eps_u, ctx.eps_c, w, ctx.alpha, ctx.sigma, ctx.alpha_next, ctx.sigma_next)
        return x0_hat, ctx.eps_u


class TVCFG(Method):
    """Stage-wise symmetric schedule around the nominal CFG scale (time integral over the grid's timesteps = param)."""

    family = "TV-CFG"
    param_name = "w_bar"

    def step(self, ctx):
        w = float(StageWiseGuidance().step_scales(ctx.grid_timesteps, self.param)[ctx.index])
        return ctx.plain(cfg(ctx.eps_c, ctx.eps_u, w))


class AngleDomain(Method):
    family = "ADG"

    def step(self, ctx):
        return ctx.from_x0(angle_domain_guidance(ctx.x0(ctx.eps_c), ctx.x0(ctx.eps_u), self.param))


class APG(Method):
    """APG with the paper's eta = 0 and momentum -0.5; the norm threshold is in x0 units of the toy (radius 1)."""

    family = "APG"

    def __init__(self, param, eta: float = 0.0, momentum: float = -0.5, norm_threshold: float = 1.0):
        super().__init__(param)
        self.eta, self.momentum, self.norm_threshold = eta, momentum, norm_threshold
        self.running = None

    def reset(self, batch):
        self.running = None

    def step(self, ctx):
        d, self.running = apg(ctx.x0(ctx.eps_c), ctx.x0(ctx.eps_u), self.param, eta=self.eta, norm_threshold=self.norm_threshold,
                              momentum=self.momentum, running=self.running)
        return ctx.from_x0(d)


class Interval(Method):
    """CFG only for Karras sigma in (0.28, 5.42] (the SD-XL interval of Kynkaanniemi et al.), no guidance elsewhere."""

    family = "interval"

    def step(self, ctx):
        w = interval_scale(ctx.karras_sigma, self.param).to(ctx.z.dtype)
        return ctx.plain(cfg(ctx.eps_c, ctx.eps_u, w))


class LearnedTable(Method):
    """Learn to Guide: CFG with a learned scale w(c, t) per class and grid step (``table``: (C, N) CFG scales)."""

    family = "learn-to-guide"
    param_name = ""

    def __init__(self, table: torch.Tensor):
        super().__init__(float("nan"))
        self.table = table.detach().float()

    @property
    def label(self) -> str:
        return "learn-to-guide"

    def step(self, ctx):
        return ctx.plain(cfg(ctx.eps_c, ctx.eps_u, self.table[ctx.labels, ctx.index]))


# ------------------------------------------------------------------- w read at another step count than it was trained on

#: The host sampler the readings below stand for: a plain first-order sampler that renoises with the D it is given.
DDIM = SamplerInfo("ddim")


class ReadCFGPlusPlus(Method):
    """CFG++ scale w, in CFG++ units on ``training_grid``, applied by a plain DDIM sampler at this run's step count with the
    scale the core's rule gives it (:func:`annealing.evaluation_scale`): ``anchored`` = CFG scale w * k_train(sigma) of the
    training grid, ``per_step`` = w * k of this run's own step, i.e. the CFG++ step at this step count.

    per_step is handed the step's own two sigmas rather than the whole schedule: the same k, without a (batch x steps)
    schedule search at every step (the study samples 6000 points at up to 200 steps)."""

    family = "CFG++"

    def __init__(self, param: float, mode: str, training_grid: TrainingGrid):
        super().__init__(param)
        self.mode, self.training_grid = mode, training_grid

    def step(self, ctx):
        sigma = ctx.karras_sigma
        anchor = k_train(self.training_grid, sigma).to(sigma.dtype)
        schedule = ctx.step_schedule if self.mode == "per_step" else None  # anchored needs no schedule
        rule = evaluation_scale(self.mode, sigma, anchor, sampling="eps", sampler=DDIM, sample_sigmas=schedule)
        return ctx.plain(cfg(ctx.eps_c, ctx.eps_u, self.param * rule.factor))


class ReadAnnealing(Method):
    """The annealing checkpoint through the pack's own hook (:meth:`annealing.AnnealingGuidance.guide`) under a plain DDIM
    sampler at this run's step count, in the given mode (anchored: the checkpoint's training grid fixes k, no schedule
    needed; per_step: the step's own two sigmas, as in :class:`ReadCFGPlusPlus`)."""

    family = "annealing"
    param_name = "lambda"

    def __init__(self, param: float, model, mode: str):
        super().__init__(param)
        self.mode = mode
        self.guidance = AnnealingGuidance(model, AnnealingOptions(lam=param, mode=mode))

    def step(self, ctx):
        schedule = ctx.step_schedule if self.mode == "per_step" else None
        with torch.no_grad():
            d = self.guidance.guide(ctx.karras_sigma, ctx.x0(ctx.eps_c), ctx.x0(ctx.eps_u), sampling="eps", sampler=DDIM,
                                    sample_sigmas=schedule)
        return ctx.from_x0(d)


@dataclass
class ToySampler:
    """The DDIM grid and the exact denoiser; ``run`` samples one method from given initial noise."""

    problem: RingProblem
    grid: SamplingGrid
    alphas_cumprod: torch.Tensor

    def schedule(self, index: int) -> tuple[float, float, float, float]:
        a, s = float(self.grid.alphas[index]), float(self.grid.sigmas[index])
        if index + 1 < len(self.grid):
            return a, s, float(self.grid.alphas[index + 1]), float(self.grid.sigmas[index + 1])
        return a, s, 1.0, 0.0

    def run(self, method: Method, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x0 samples (B, 2) from z_T = ``noise`` (B, 2) for class ``labels`` (B,)."""
        batch = noise.shape[0]
        cond = self.problem.one_hot(labels, noise.dtype)
        uncond = self.problem.uncond(batch, noise.dtype)
        method.reset(batch)
        z = noise
        steps = len(self.grid)
        for i in range(steps):
            a, s, a_n, s_n = self.schedule(i)
            t = self.grid.model_timesteps[i].expand(batch)
            eps_u = self.problem.eps(z, a, s, uncond)
            eps_c = self.problem.eps(z, a, s, cond)
            ctx = StepContext(i, steps, z, t, torch.tensor(a), torch.tensor(s), torch.tensor(a_n), torch.tensor(s_n), eps_u, eps_c, labels,
                              grid_timesteps=self.grid.model_timesteps)
            x0_hat, eps_renoise = method.step(ctx)
            z = a_n * x0_hat + s_n * eps_renoise
        return z
