"""The benchmark run: train the learned methods, sample every method from identical noise, score, collect results.

For each seed: exact reference samples, initial noise z_T ~ N(0, I) shared by every method, the annealing MLP trained
with Algorithm 1 and saved as a checkpoint in the output folder (then loaded back from the file for sampling, so the
benchmark exercises the inference path), the Learn-to-Guide table, and one sampling run per method setting.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import annealing
from annealing.training_grid import VPGrid
from training.algorithm import SamplingGrid

from .learn_to_guide import LearnToGuideConfig, train_learn_to_guide
from .metrics import METRICS, Evaluator, manifold_threshold
from .problem import RingProblem
from .samplers import APG, CFG, TVCFG, AngleDomain, Annealing, CFGPlusPlus, Interval, LearnedTable, Method, ToySampler
from .train import AnnealingTrainConfig, save_toy_checkpoint, train_annealing

#: Swept settings per method (CFG scales; CFG++ and annealing in their own units). Quick mode keeps a few of each.
FULL_GRIDS = {
    "CFG": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0],
    "CFG++": [0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0],
    "annealing": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
    "TV-CFG": [1.25, 1.5, 2.0, 3.0, 5.0],
    "ADG": [1.5, 2.0, 3.0, 5.0, 8.0],
    "APG": [1.5, 2.0, 3.0, 5.0, 8.0],
    "interval": [1.5, 2.0, 3.0, 5.0, 8.0],
}
QUICK_GRIDS = {
    "CFG": [1.0, 3.0],
    "CFG++": [0.2, 1.0],
    "annealing": [0.0, 0.4, 1.0],
    "TV-CFG": [3.0],
    "ADG": [3.0],
    "APG": [3.0],
    "interval": [3.0],
}
FAMILIES = {"CFG": CFG, "CFG++": CFGPlusPlus, "TV-CFG": TVCFG, "ADG": AngleDomain, "APG": APG, "interval": Interval}
#: lambdas whose per-sample w(t) trajectories are kept for the plot
TRACE_LAMBDAS = (0.0, 0.4, 1.0)


@dataclass
class BenchmarkConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    samples_per_class: int = 2000
    sampling_steps: int = 50
    quick: bool = False
    problem: RingProblem = field(default_factory=RingProblem)
    annealing_training: AnnealingTrainConfig = field(default_factory=AnnealingTrainConfig)
    learn_to_guide: LearnToGuideConfig = field(default_factory=LearnToGuideConfig)

    @classmethod
    def quick_mode(cls, seeds=(0,), samples_per_class: int = 300) -> BenchmarkConfig:
        return cls(
            seeds=tuple(seeds), samples_per_class=samples_per_class, quick=True,
            annealing_training=AnnealingTrainConfig(steps=250),
            learn_to_guide=LearnToGuideConfig(iterations=40),
        )

    @property
    def grids(self) -> dict[str, list[float]]:
        return QUICK_GRIDS if self.quick else FULL_GRIDS

    def to_dict(self) -> dict:
        return {
            "seeds": list(self.seeds), "samples_per_class": self.samples_per_class, "sampling_steps": self.sampling_steps,
            "quick": self.quick, "problem": asdict(self.problem), "annealing_training": asdict(self.annealing_training),
            "learn_to_guide": asdict(self.learn_to_guide), "grids": self.grids,
        }


def _summary(values: list[float]) -> dict:
    tensor = torch.tensor(values, dtype=torch.float64)
    std = float(tensor.std()) if len(values) > 1 else 0.0
    return {"mean": float(tensor.mean()), "std": std, "per_seed": values}


def run_benchmark(config: BenchmarkConfig, out_dir: Path, progress: bool = True) -> dict:
    """Run everything; writes the annealing checkpoints into ``out_dir`` and returns the results (plus samples for plots)."""
    if config.annealing_training.sampling_steps != config.sampling_steps:
        raise ValueError(f"annealing is trained on {config.annealing_training.sampling_steps} steps but sampled with {config.sampling_steps}")
    problem = config.problem
    alphas_cumprod = VPGrid().alphas_cumprod()
    grid = SamplingGrid.vp_ddim(config.sampling_steps)
    sampler = ToySampler(problem, grid, alphas_cumprod)
    n = config.samples_per_class
    labels = torch.arange(problem.num_classes).repeat_interleave(n)
    timing = {"train_annealing_s": 0.0, "train_learn_to_guide_s": 0.0, "sampling_s": 0.0, "metrics_s": 0.0}

    rows: dict[str, dict] = {}  # label -> row with per-seed metrics
    samples_seed0: dict[str, torch.Tensor] = {}
    traces: dict[float, torch.Tensor] = {}
    checkpoints, l2g_tables, train_logs = [], {}, {}
    runs_per_seed = 2 + sum(len(v) for v in config.grids.values())  # + exact + learn-to-guide
    bar = tqdm(total=runs_per_seed * len(config.seeds), desc="toy benchmark", disable=not progress)

    def record(method_key: tuple, metrics: dict, samples: torch.Tensor, seed: int):
        family, param_name, param, label = method_key
        row = rows.setdefault(label, {"family": family, "param_name": param_name, "param": param, "label": label, "per_seed": {m: [] for m in METRICS}})
        for m in METRICS:
            row["per_seed"][m].append(metrics[m])
        if seed == config.seeds[0]:
            samples_seed0[label] = samples
        bar.update(1)

    for seed in config.seeds:
        generator = torch.Generator().manual_seed(10_000 + seed)
        threshold = manifold_threshold(problem, generator)
        reference = problem.sample(labels, generator)
        evaluator = Evaluator(problem, reference, labels, threshold, generator)
        noise = torch.randn(labels.shape[0], 2, generator=generator)
        exact = problem.sample(labels, generator)

        started = time.perf_counter()
        model, history = train_annealing(problem, alphas_cumprod, config.annealing_training, seed, progress)
        path = out_dir / f"annealing_toy2d_seed{seed}.safetensors"
        save_toy_checkpoint(model, path)
        model = annealing.load_guidance_model(path)  # sample with what was written, as a user would
        checkpoints.append(path.name)
        tail = max(1, len(history["loss"]) // 10)
        train_logs[seed] = {k: sum(v[-tail:]) / tail for k, v in history.items()}
        timing["train_annealing_s"] += time.perf_counter() - started

        started = time.perf_counter()
        table = train_learn_to_guide(problem, grid, config.learn_to_guide, seed, progress)
        l2g_tables[seed] = table.tolist()
        timing["train_learn_to_guide_s"] += time.perf_counter() - started

        methods: list[Method] = [FAMILIES[f](p) for f in FAMILIES for p in config.grids[f]]
        methods += [Annealing(lam, model) for lam in config.grids["annealing"]]
        methods.append(LearnedTable(table))

        started = time.perf_counter()
        record(("exact", "", float("nan"), "exact samples"), evaluator(exact), exact, seed)
        timing["metrics_s"] += time.perf_counter() - started
        for method in methods:
            started = time.perf_counter()
            samples = sampler.run(method, noise, labels)
            timing["sampling_s"] += time.perf_counter() - started
            started = time.perf_counter()
            metrics = evaluator(samples)
            timing["metrics_s"] += time.perf_counter() - started
            record((method.family, method.param_name, method.param, method.label), metrics, samples, seed)
            if isinstance(method, Annealing) and seed == config.seeds[0] and method.param in TRACE_LAMBDAS:
                traces[method.param] = torch.stack(method.trace).cpu()  # (steps, batch)
    bar.close()

    methods_out = []
    for row in rows.values():
        methods_out.append({
            "family": row["family"], "param_name": row["param_name"],
            "param": None if math.isnan(row["param"]) else row["param"], "label": row["label"],
            "metrics": {m: _summary(row["per_seed"][m]) for m in METRICS},
        })
    return {
        "config": config.to_dict(),
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
        "methods": methods_out,
        "annealing_checkpoints": checkpoints,
        "annealing_training_final": train_logs,
        "learn_to_guide_w": {str(k): v for k, v in l2g_tables.items()},
        "timesteps": grid.model_timesteps.tolist(),
        # for the plots only (not serialised)
        "_samples": samples_seed0,
        "_labels": labels,
        "_traces": traces,
    }
