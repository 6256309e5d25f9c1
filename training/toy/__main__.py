"""Command line of the 2D guidance benchmark: ``python -m training.toy --out DIR [--quick] [--force] [--seeds ...] [--samples N]
[--step-counts N ...]``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from training.interrupt import exit_on_ctrl_c, is_empty_but_staging, staged_folder

DESCRIPTION = """\
2D guidance benchmark with known ground truth (no model download, CPU only).

A class-conditional Gaussian mixture on a ring (12 modes, 3 classes owning an arc of 4 modes each) is sampled with
exact denoisers on SD's VP schedule (50 DDIM steps), so every difference between methods comes from the guidance.
The model's conditional leaks towards the unconditional (--leak), as an imperfect network's does, so that some
guidance is needed to reach the true conditional and too much overshoots it.
Compared on identical initial noise: CFG, CFG++, annealing guidance (the MLP is trained here with the paper's
Algorithm 1 and saved as a checkpoint), the stage-wise schedule (TV-CFG), Angle Domain Guidance, APG, guidance on
a limited interval, and Learn to Guide (a learned CFG scale 1 + omega(c, s, t), trained as the paper trains it). Metrics, per class against exact samples: sliced
Wasserstein-2 and MMD (fidelity, lower is better), the fraction of samples off the data manifold (lower is better),
alignment = mean true p(c | x) (higher is better) and mode coverage (higher is better).

The step-count study samples CFG++ and annealing at other step counts than the training grid's (--step-counts), with
w read anchored to the training grid (the pack's default) and per step (the paper's CFG++ step at that step count).

Writes into --out: results.json, results.md (the tables, also printed), toy-front.png, toy-samples.png,
toy-w-trajectories.png, toy-step-counts.png, annealing_toy2d_seed<S>.safetensors and learn_to_guide_toy2d_seed<S>.safetensors.
See docs/toy-benchmark.md.
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.toy", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing; must be empty unless --force)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test mode (< 30 s): 1 seed, 300 samples per class, short training, 2-3 settings per method")
    parser.add_argument("--force", action="store_true", help="write into a non-empty output folder, overwriting earlier results")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds (each: reference samples, initial noise, training); default 0 1 2, or 0 with --quick")
    parser.add_argument("--samples", type=int, default=None, help="samples per class and method (default 2000, or 300 with --quick)")
    parser.add_argument("--steps", type=int, default=50,
                        help="DDIM sampling steps, also the grid annealing and Learn to Guide train on (default 50, as upstream)")
    parser.add_argument("--leak", type=float, default=0.5,
                        help="how much the model's conditional leaks towards the unconditional, rho in [0, 1): the conditional "
                             "denoiser is exact for (1 - rho) p(x | c) + rho p(x), like an under-trained network (default 0.5; "
                             "0 = a perfect conditional model, where any guidance only trades fidelity for alignment)")
    parser.add_argument("--step-counts", type=int, nargs="*", default=None, metavar="N",
                        help="step counts of the step-count study: CFG++ w = 0.2 and annealing at lambda 0.4, whose w is in "
                             "CFG++ units on the --steps grid, sampled at N steps in both readings of w, anchored to the "
                             "training grid and per_step (default 10 20 50 100 200; 10 50 with --quick; the option with no "
                             "values skips the study)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the tensors are small, more threads only add overhead)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser.parse_args(argv)


def fail(message: str) -> None:
    print(f"python -m training.toy: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def build_config(args: argparse.Namespace):
    """The run's :class:`BenchmarkConfig` from the parsed (and validated) options."""
    from .benchmark import BenchmarkConfig
    from .problem import RingProblem

    if args.quick:
        config = BenchmarkConfig.quick_mode(seeds=tuple(args.seeds or (0,)), samples_per_class=args.samples or 300)
    else:
        config = BenchmarkConfig(seeds=tuple(args.seeds or (0, 1, 2)), samples_per_class=args.samples or 2000)
    if args.step_counts is not None:
        config.step_counts = tuple(args.step_counts)
    config.problem = RingProblem(condition_leak=args.leak)
    config.sampling_steps = args.steps
    config.annealing_training = dataclasses.replace(config.annealing_training, sampling_steps=args.steps)
    return config


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.samples is not None and args.samples < 10:
        fail(f"--samples must be at least 10, got {args.samples}")
    if args.seeds is not None and (any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds)):
        fail(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    if not 2 <= args.steps <= 1000:
        fail(f"--steps must be in [2, 1000], got {args.steps}")
    if args.step_counts and (any(not 2 <= n <= 1000 for n in args.step_counts) or len(set(args.step_counts)) != len(args.step_counts)):
        fail(f"--step-counts must be distinct integers in [2, 1000], got {args.step_counts}")
    if not 0.0 <= args.leak < 1.0:
        fail(f"--leak must be in [0, 1), got {args.leak}")
    if args.threads < 1:
        fail(f"--threads must be >= 1, got {args.threads}")
    out = args.out
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a folder")
    if out.is_dir() and not is_empty_but_staging(out) and not args.force:  # what a killed run staged is no result
        fail(f"--out {out} is not empty; pass --force to overwrite its results")
    with exit_on_ctrl_c(f"nothing was written to {out}: run the same command again"):
        return run(args, out)


def run(args: argparse.Namespace, out: Path) -> int:
    import torch

    from .benchmark import run_benchmark
    from .report import write_report

    torch.set_num_threads(args.threads)
    config = build_config(args)
    existed = out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create --out {out}: {exc.strerror or exc}")
    started, cpu_started = time.perf_counter(), time.process_time()
    with staged_folder(out, created=not existed) as staging:  # all or nothing: Ctrl-C or a failure leaves no partial results
        results = run_benchmark(config, staging, progress=not args.no_progress)
        results["timing_s"]["total_s"] = round(time.perf_counter() - started, 2)
        # CPU time too: on a shared machine the wall clock says more about the other jobs than about the benchmark
        results["timing_s"]["cpu_s"] = round(time.process_time() - cpu_started, 2)
        results["threads"] = args.threads
        table = write_report(results, config.problem, staging)
    print(table)
    print(f"wrote {out}/results.json, results.md and plots in {results['timing_s']['total_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
