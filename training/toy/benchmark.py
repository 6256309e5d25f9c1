"""The benchmark run: train the learned methods, sample every method from identical noise, score, collect results.

For each seed: exact reference samples, initial noise z_T ~ N(0, I) shared by every method, the annealing MLP trained
with Algorithm 1 and the Learn to Guide network trained with its self-consistency loss, each saved as a checkpoint in the
output folder (then loaded back from the file for sampling, so the benchmark exercises the inference path), and one
sampling run per method setting.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import annealing
from annealing.training_grid import VPGrid, grid_step_factors
from training.algorithm import SamplingGrid

from .learn_to_guide import LearnToGuideConfig, scale_table, train_learn_to_guide
from .metrics import METRICS, Evaluator, manifold_threshold
from .problem import RingProblem
from .samplers import (
    APG,
    CFG,
    TVCFG,
    AngleDomain,
    Annealing,
    CFGPlusPlus,
    Interval,
    LearnedTable,
    Method,
    ReadAnnealing,
    ReadCFGPlusPlus,
    ToySampler,
)
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
#: The step-count study: settings sampled at other step counts than the training grid's, in both readings of w
#: (annealing.scale_rule). CFG++ w = 0.2 is CFG++'s best SW2 on the 50-step grid; annealing at the paper's default
#: lambda only, since lambda barely changes annealing here and each lambda would add ~30 s of MLP calls per seed.
STEP_STUDY_SETTINGS = {"CFG++": [0.2], "annealing": [0.4]}
STEP_STUDY_MODES = ("anchored", "per_step")
DEFAULT_STEP_COUNTS = (10, 20, 50, 100, 200)
QUICK_STEP_COUNTS = (10, 50)
#: Probe of the MLP's response to ||delta|| at the first grid timestep, lambda 0 (reported with the w trajectories).
DELTA_PROBE = (0.05, 0.5)
#: A trajectory counts as non-monotone when its w rises by more than this between two steps (float noise is ~1e-6).
MONOTONE_TOLERANCE = 1e-3


@dataclass
class BenchmarkConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    samples_per_class: int = 2000
    sampling_steps: int = 50
    quick: bool = False
    #: step counts of the step-count study (empty: no study)
    step_counts: tuple[int, ...] = DEFAULT_STEP_COUNTS
    problem: RingProblem = field(default_factory=RingProblem)
    annealing_training: AnnealingTrainConfig = field(default_factory=AnnealingTrainConfig)
    learn_to_guide: LearnToGuideConfig = field(default_factory=LearnToGuideConfig)

    @classmethod
    def quick_mode(cls, seeds=(0,), samples_per_class: int = 300) -> BenchmarkConfig:
        return cls(
            seeds=tuple(seeds), samples_per_class=samples_per_class, quick=True, step_counts=QUICK_STEP_COUNTS,
            annealing_training=AnnealingTrainConfig(steps=250),
            learn_to_guide=LearnToGuideConfig(iterations=60),
        )

    @property
    def grids(self) -> dict[str, list[float]]:
        return QUICK_GRIDS if self.quick else FULL_GRIDS

    @property
    def step_study_settings(self) -> dict[str, list[float]]:
        return STEP_STUDY_SETTINGS

    def to_dict(self) -> dict:
        return {
            "seeds": list(self.seeds), "samples_per_class": self.samples_per_class, "sampling_steps": self.sampling_steps,
            "quick": self.quick, "problem": asdict(self.problem), "annealing_training": asdict(self.annealing_training),
            "learn_to_guide": asdict(self.learn_to_guide), "grids": self.grids,
            "step_counts": list(self.step_counts), "step_study_settings": self.step_study_settings if self.step_counts else {},
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
    timing = {"train_annealing_s": 0.0, "train_learn_to_guide_s": 0.0, "sampling_s": 0.0, "metrics_s": 0.0, "step_study_s": 0.0}

    rows: dict[str, dict] = {}  # label -> row with per-seed metrics
    samples_seed0: dict[str, torch.Tensor] = {}
    traces: dict[float, torch.Tensor] = {}
    checkpoints, l2g_checkpoints, l2g_tables, train_logs = [], [], {}, {}
    first_model = None
    study: dict[tuple, dict[str, list[float]]] = {}  # (family, param, mode, steps) -> per-seed metrics
    w_stats: dict[float, dict] = {}
    study_runs = len(config.step_counts) * len(STEP_STUDY_MODES) * sum(len(v) for v in config.step_study_settings.values())
    runs_per_seed = 2 + sum(len(v) for v in config.grids.values()) + study_runs  # + exact + learn-to-guide
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
        first_model = model if seed == config.seeds[0] else first_model
        checkpoints.append(path.name)
        tail = max(1, len(history["loss"]) // 10)
        train_logs[seed] = {k: sum(v[-tail:]) / tail for k, v in history.items()}
        timing["train_annealing_s"] += time.perf_counter() - started

        started = time.perf_counter()
        net = train_learn_to_guide(problem, grid, config.learn_to_guide, seed, progress)
        l2g_path = out_dir / f"learn_to_guide_toy2d_seed{seed}.safetensors"
        annealing.save_guidance_model(net, l2g_path)
        table = scale_table(annealing.load_guidance_model(l2g_path), problem, grid)  # sample with what was written
        l2g_checkpoints.append(l2g_path.name)
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
            if isinstance(method, Annealing) and seed == config.seeds[0]:
                trace = torch.stack(method.trace).cpu()  # (steps, batch)
                w_stats[method.param] = trajectory_stats(trace, torch.stack(method.norms).cpu(), grid.model_timesteps,
                                                         grid_step_factors(grid.training_grid)[1])
                if method.param in TRACE_LAMBDAS:
                    traces[method.param] = trace

        started = time.perf_counter()
        for steps in config.step_counts:
            run_grid = grid if steps == config.sampling_steps else SamplingGrid.vp_ddim(steps)
            run_sampler = ToySampler(problem, run_grid, alphas_cumprod)
            for mode in STEP_STUDY_MODES:
                readings = [ReadCFGPlusPlus(w, mode, grid.training_grid) for w in config.step_study_settings["CFG++"]]
                readings += [ReadAnnealing(lam, model, mode) for lam in config.step_study_settings["annealing"]]
                for method in readings:
                    metrics = evaluator(run_sampler.run(method, noise, labels))
                    per_seed = study.setdefault((method.family, method.param_name, method.param, mode, steps), {m: [] for m in METRICS})
                    for m in METRICS:
                        per_seed[m].append(metrics[m])
                    bar.update(1)
        timing["step_study_s"] += time.perf_counter() - started
    bar.close()

    methods_out = []
    for row in rows.values():
        methods_out.append({
            "family": row["family"], "param_name": row["param_name"],
            "param": None if math.isnan(row["param"]) else row["param"], "label": row["label"],
            "metrics": {m: _summary(row["per_seed"][m]) for m in METRICS},
        })
    first = config.seeds[0]
    probe_t = grid.model_timesteps[:1].expand(len(DELTA_PROBE))
    with torch.no_grad():
        probe_w = first_model(probe_t, torch.tensor(DELTA_PROBE), 0.0).tolist()
    return {
        "config": config.to_dict(),
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
        "methods": methods_out,
        "annealing_checkpoints": checkpoints,
        "learn_to_guide_checkpoints": l2g_checkpoints,
        "annealing_training_final": train_logs,
        "learn_to_guide_w": {str(k): v for k, v in l2g_tables.items()},
        "timesteps": grid.model_timesteps.tolist(),
        "step_study": {
            "training_steps": config.sampling_steps, "step_counts": list(config.step_counts), "modes": list(STEP_STUDY_MODES),
            "rows": [
                {"family": family, "param_name": name, "param": param, "mode": mode, "steps": steps,
                 "metrics": {m: _summary(values[m]) for m in METRICS}}
                for (family, name, param, mode, steps), values in study.items()
            ],
        },
        # seed 0's trajectories, per lambda (see trajectory_stats), and the MLP's response to ||delta|| at the first timestep
        "annealing_w": {"seed": first, "monotone_tolerance": MONOTONE_TOLERANCE, "per_lambda": {f"{k:g}": v for k, v in w_stats.items()},
                        "delta_probe": {"timestep": float(probe_t[0]), "lambda": 0.0, "delta_norms": list(DELTA_PROBE), "w": probe_w}},
        # for the plots only (not serialised)
        "_samples": samples_seed0,
        "_labels": labels,
        "_traces": traces,
    }


def trajectory_stats(w: torch.Tensor, norms: torch.Tensor, timesteps: torch.Tensor, k: torch.Tensor) -> dict:
    """What the w(t) trajectories of one lambda do (``w``, ``norms``: steps x batch, in sampling order; ``k``: the k of
    each step): the mean w at the first and last step, the range of all w, the largest spread (max - min over samples)
    and std at any step with its timestep, the fraction of trajectories that rise anywhere (by more than
    MONOTONE_TOLERANCE), the 1st and 99th percentiles of the ||delta|| the MLP saw, and the CFG-equivalent scale
    omega = w * k (mean over samples) at the first step and at its peak."""
    w, norms = w.double(), norms.double()
    omega = w.mean(dim=1) * k.double()
    spread = w.max(dim=1).values - w.min(dim=1).values
    std = w.std(dim=1)
    rises = (w[1:] - w[:-1] > MONOTONE_TOLERANCE).any(dim=0)
    low, high = torch.quantile(norms.reshape(-1), torch.tensor([0.01, 0.99], dtype=torch.float64)).tolist()
    return {
        "w_mean_first": float(w[0].mean()), "w_mean_last": float(w[-1].mean()), "w_min": float(w.min()), "w_max": float(w.max()),
        "max_spread": float(spread.max()), "t_max_spread": float(timesteps[int(spread.argmax())]),
        "max_std": float(std.max()), "t_max_std": float(timesteps[int(std.argmax())]),
        "non_monotone_fraction": float(rises.double().mean()), "trajectories": int(w.shape[1]),
        "delta_norm_p01": low, "delta_norm_p99": high,
        "omega_mean_first": float(omega[0]), "omega_mean_peak": float(omega.max()), "t_omega_peak": float(timesteps[int(omega.argmax())]),
    }
