"""Learn to Guide (Galashov et al., arXiv 2510.00815) on the ring: a learned CFG scale w(c, t) per class and grid step.

Their self-consistency objective, in the form used here: a guided DDIM step t -> s from noised real data should land on
the real data noised to s. For every class c, grid step i (t = t_i, s = t_{i+1}; the last step lands on clean data) and
clean sample x0 ~ p(x0 | c), with m = 4 particles:

    z_t^j   = a_t x0 + s_t eps^j                                        j = 1..m
    zhat^j  = a_s x0_hat(z_t^j) + s_s eps_hat(z_t^j),   eps_hat = eps_u + w_{c,i} (eps_c - eps_u)   (one CFG DDIM step)
    z_s^j   = a_s x0 + s_s eps'^j                                       (the forward process at s, same x0)
    loss    = mean over (c, i, x0) of ED({zhat^j}, {z_s^j}) + reg * mean (w - 1)^2

with ED the energy distance (the MMD of the distance kernel, no bandwidth to tune): 2 E||X - Y|| - E||X - X'|| - E||Y - Y'||,
here its V-statistic. The step and the energy distance are the image trainer's (``training.learn_to_guide``).
w(c, t) is piecewise linear in the grid index with a few knots per class (their w(c, s, t) network, evaluated only at
s = the next grid point of the benchmark's fixed grid); each iteration trains on a random subset of the steps. The small
``reg`` keeps steps where the loss is flat (early, where cond and uncond barely differ) near w = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from training.algorithm import SamplingGrid
from training.learn_to_guide import energy_distance, guided_step

from .problem import RingProblem


@dataclass(frozen=True)
class LearnToGuideConfig:
    iterations: int = 400
    steps_per_iteration: int = 10
    groups: int = 32  # clean samples per (class, step) cell
    particles: int = 4  # m: noisings of each clean sample
    knots: int = 8
    lr: float = 0.1
    reg: float = 1e-3


def knot_interpolation(num_steps: int, knots: int) -> torch.Tensor:
    """(N, knots) matrix of piecewise-linear hat functions over the grid index: w = 1 + basis @ omega."""
    position = torch.linspace(0, knots - 1, num_steps)
    return (1 - (position.unsqueeze(1) - torch.arange(knots)).abs()).clamp_min(0)


def train_learn_to_guide(problem: RingProblem, grid: SamplingGrid, config: LearnToGuideConfig, seed: int, progress: bool = True) -> torch.Tensor:
    """Returns the learned CFG-scale table w[c, i] (C, N), piecewise linear in i with ``config.knots`` knots per class."""
    generator = torch.Generator().manual_seed(seed)
    classes, steps, particles = problem.num_classes, len(grid), config.particles
    basis = knot_interpolation(steps, min(config.knots, steps))
    omega = torch.zeros(classes, basis.shape[1], requires_grad=True)  # w[c, i] = 1 + (basis @ omega[c])[i]
    optimizer = torch.optim.Adam([omega], lr=config.lr)
    alphas = torch.cat([grid.alphas, torch.ones(1)])
    sigmas = torch.cat([grid.sigmas, torch.zeros(1)])
    picked = min(config.steps_per_iteration, steps)
    col = lambda v: v.reshape(-1, 1)  # noqa: E731
    for _ in tqdm(range(config.iterations), desc=f"train learn-to-guide (seed {seed})", leave=False, disable=not progress):
        # G = C * picked * groups particle sets, each: one clean x0 noised m times
        step_ids = torch.randperm(steps, generator=generator)[:picked]
        cell_class = torch.arange(classes).repeat_interleave(picked)
        cell_step = step_ids.repeat(classes)
        group_class = cell_class.repeat_interleave(config.groups)
        group_step = cell_step.repeat_interleave(config.groups)
        labels = group_class.repeat_interleave(particles)
        idx = group_step.repeat_interleave(particles)
        a, s, a_n, s_n = alphas[idx], sigmas[idx], alphas[idx + 1], sigmas[idx + 1]
        cond, uncond = problem.one_hot(labels), problem.uncond(labels.shape[0])
        x0 = problem.sample(group_class, generator).repeat_interleave(particles, dim=0)
        z = col(a) * x0 + col(s) * torch.randn(x0.shape, generator=generator)
        with torch.no_grad():
            eps_u = problem.eps(z, a, s, uncond)
            eps_c = problem.eps(z, a, s, cond)
        table = 1 + omega @ basis.T  # (C, N)
        w = table[labels, idx]
        z_hat = guided_step(z, eps_u, eps_c, w, a, s, a_n, s_n)  # the image trainer's step
        target = col(a_n) * x0 + col(s_n) * torch.randn(x0.shape, generator=generator)
        shape = (group_class.shape[0], particles, 2)
        # the V-statistic this benchmark's published numbers were made with (images use the unbiased estimate)
        distance = energy_distance(z_hat.reshape(shape), target.reshape(shape), unbiased=False)
        loss = distance.mean() + config.reg * omega.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (1 + omega @ basis.T).detach()
