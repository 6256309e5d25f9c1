"""Metrics of the benchmark, all computed per class against the exact conditional distribution and averaged over classes.

* ``sw``        sliced Wasserstein-2 distance to exact samples of p(x | c) (same count; 128 random directions).  Lower is better.
* ``mmd``       squared MMD (unbiased) to exact samples, Gaussian kernel of bandwidth = the mode std, x 1000, on the first
                1000 samples of each class (it is quadratic in the count).                                   Lower is better.
* ``off``       fraction of samples off the data manifold: unconditional log-density log p(x) below the level that
                exact data reaches 99% of the time (so exact samples score ~0.01).                          Lower is better.
* ``align``     mean true posterior p(c | x) of the intended class c under the clean mixture.               Higher is better.
* ``coverage``  fraction of (class, mode) pairs whose mode gets at least half of its fair share (1 / modes per class)
                of the class's samples (nearest-mode assignment).                                           Higher is better (1 = all modes).

Exact samples themselves do not score align = 1: neighbouring modes of different classes overlap, so the true
conditional puts some mass where the other class is likelier. Guidance raises align above that by moving samples
away from the overlaps, at a cost in sw/mmd (the distribution is no longer p(x | c)) and, when overdone, in ``off``.
"""

from __future__ import annotations

import torch

from .problem import RingProblem

METRICS = ("sw", "mmd", "off", "align", "coverage")
MMD_MAX = 1000
HIGHER_IS_BETTER = {"sw": False, "mmd": False, "off": False, "align": True, "coverage": True}


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, directions: torch.Tensor) -> float:
    """SW2 = sqrt(mean_theta W2^2(<x, theta>, <y, theta>)) for equal-size sets (1D W2 by sorting)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"sliced_wasserstein needs equal sample counts, got {x.shape[0]} and {y.shape[0]}")
    px = (x.double() @ directions.T).sort(dim=0).values
    py = (y.double() @ directions.T).sort(dim=0).values
    return float((px - py).pow(2).mean().sqrt())


def mmd_squared(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Unbiased MMD^2 with k(a, b) = exp(-||a - b||^2 / (2 h^2)); can be slightly negative for equal distributions."""
    x, y = x.float(), y.float()

    def kernel(a, b):
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth**2))

    n, m = x.shape[0], y.shape[0]
    kxx = (kernel(x, x).sum() - n) / (n * (n - 1))
    kyy = (kernel(y, y).sum() - m) / (m * (m - 1))
    return float(kxx + kyy - 2 * kernel(x, y).mean())


def manifold_threshold(problem: RingProblem, generator: torch.Generator, count: int = 200_000, quantile: float = 0.01) -> float:
    """The log-density level below which only ``quantile`` of exact (unconditional) data falls."""
    labels = torch.randint(0, problem.num_classes, (count,), generator=generator)
    logp = problem.log_density(problem.sample(labels, generator, torch.float64))
    return float(torch.quantile(logp, quantile))


class Evaluator:
    """Scores samples of every class against exact samples drawn once per seed (``reference``)."""

    def __init__(self, problem: RingProblem, reference: torch.Tensor, labels: torch.Tensor, off_threshold: float, generator: torch.Generator):
        self.problem = problem
        self.reference = reference.double()
        self.labels = labels
        self.off_threshold = off_threshold
        angles = torch.rand(128, generator=generator, dtype=torch.float64) * torch.pi
        self.directions = torch.stack([angles.cos(), angles.sin()], dim=1)

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        problem, samples = self.problem, samples.double()
        if not torch.isfinite(samples).all():
            raise ValueError("samples contain NaN or inf")
        sw, mmd, coverage = [], [], []
        mode_class = problem.mode_class()
        nearest = problem.nearest_mode(samples)
        for c in range(problem.num_classes):
            mine, ref = self.labels == c, self.labels == c
            sw.append(sliced_wasserstein(samples[mine], self.reference[ref], self.directions))
            mmd.append(1000 * mmd_squared(samples[mine][:MMD_MAX], self.reference[ref][:MMD_MAX], problem.mode_std))
            counts = torch.bincount(nearest[mine], minlength=problem.num_modes)[mode_class == c].double()
            share = counts / mine.sum()
            coverage.append(float((share >= 0.5 / problem.modes_per_class).double().mean()))
        off = float((problem.log_density(samples) < self.off_threshold).double().mean())
        posterior = problem.class_posterior(samples)
        align = float(posterior.gather(1, self.labels.reshape(-1, 1)).mean())
        count = problem.num_classes
        return {"sw": sum(sw) / count, "mmd": sum(mmd) / count, "off": off, "align": align, "coverage": sum(coverage) / count}
