"""Learn to Guide's time input, measured on the 2D benchmark: the paper's log-SNR through a small MLP against the pack's
earlier cosine features [u, cos u, cos 2u, cos 3u] of u = t / 1000 (``--l2g-time-input``), everything else the same.

For each time input, model (the leaky one of the main run, and the perfect one of ``--leak 0``) and seed, the 2D
benchmark's Learn to Guide is trained (``training.toy.learn_to_guide``: continuous (s, t), the unbiased energy distance,
omega >= 0), its loss is measured on held-out draws (the same 16 batches for every network), and it samples the ring with
plain DDIM at 20, 50 and 200 steps (s = the sampler's next time at each step count: 50 is the benchmark's grid, 20 and 200
have steps longer and shorter than any it trained on), scored against exact samples by the benchmark's metrics.

    python benchmarks/l2g_time_input.py                 # 3 seeds (about 3 min on one core)
    python benchmarks/l2g_time_input.py --seeds 0       # one seed

Prints one row per (time input, leak): mean over the seeds (± std where there are several).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from annealing.training_grid import VPGrid
from training.algorithm import SamplingGrid
from training.learn_to_guide import learn_to_guide_loss
from training.toy.learn_to_guide import LearnToGuideConfig, scale_table, train_learn_to_guide
from training.toy.metrics import Evaluator, manifold_threshold
from training.toy.problem import ExactRingDenoiser, RingProblem
from training.toy.samplers import LearnedTable, ToySampler

STEP_COUNTS = (20, 50, 200)
HELD_OUT_BATCHES = 16
SAMPLES_PER_CLASS = 2000


@torch.no_grad()
def held_out_loss(net, problem: RingProblem, grid: SamplingGrid, config: LearnToGuideConfig) -> float:
    backend = ExactRingDenoiser(problem, grid.training_grid.alphas_cumprod())
    labels = torch.arange(problem.num_classes).repeat_interleave(config.batch_per_class)
    cond, total = problem.one_hot(labels), 0.0
    generator = torch.Generator().manual_seed(999)  # the same draws for every network
    for _ in range(HELD_OUT_BATCHES):
        x0 = problem.sample(labels, generator)
        terms = learn_to_guide_loss(backend, net, x0, cond, problem.uncond(1), grid, cond, particles=config.particles,
                                    region=config.region, generator=generator)
        total += float(terms.total)
    return total / HELD_OUT_BATCHES


def measure(time_input: str, leak: float, seed: int) -> dict:
    problem = RingProblem(condition_leak=leak)
    grid = SamplingGrid.vp_ddim(50)
    config = LearnToGuideConfig(time_input=time_input)
    net = train_learn_to_guide(problem, grid, config, seed, progress=False)
    generator = torch.Generator().manual_seed(10_000 + seed)  # as the benchmark draws its reference and noise
    threshold = manifold_threshold(problem, generator)
    labels = torch.arange(problem.num_classes).repeat_interleave(SAMPLES_PER_CLASS)
    evaluator = Evaluator(problem, problem.sample(labels, generator), labels, threshold, generator)
    noise = torch.randn(labels.shape[0], 2, generator=generator)
    row = {"loss": held_out_loss(net, problem, grid, config)}
    abar = VPGrid().alphas_cumprod()
    for steps in STEP_COUNTS:
        run_grid = SamplingGrid.vp_ddim(steps)
        table = scale_table(net, problem, run_grid)
        metrics = evaluator(ToySampler(problem, run_grid, abar).run(LearnedTable(table), noise, labels))
        row[f"sw{steps}"], row[f"align{steps}"] = metrics["sw"], metrics["align"]
        if steps == 50:
            row["omega_first"], row["omega_last"] = float(table[:, 0].mean() - 1), float(table[:, -1].mean() - 1)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    columns = ["loss", *(f"sw{n}" for n in STEP_COUNTS), "align50", "omega_first", "omega_last"]
    print(f"{'time input':10} {'leak':>4}  " + "  ".join(f"{c:>15}" for c in columns))
    for leak in (0.5, 0.0):
        for time_input in ("log_snr", "cosine"):
            rows = [measure(time_input, leak, seed) for seed in args.seeds]
            cells = []
            for c in columns:
                values = [r[c] for r in rows]
                spread = f" ±{statistics.stdev(values):.4f}" if len(values) > 1 else ""
                cells.append(f"{statistics.mean(values):.4f}{spread}".rjust(15))
            print(f"{time_input:10} {leak:4g}  " + "  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    from training.interrupt import exit_on_ctrl_c

    with exit_on_ctrl_c("nothing was written; run the same command again"):
        raise SystemExit(main())
