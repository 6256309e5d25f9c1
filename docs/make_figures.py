"""Regenerates the pictures of the pack's own plots in the docs (the 2D benchmark's four come from its run, copied in by
python -m training.toy.checked_docs).

    python docs/make_figures.py --toy-checkpoint results/toy/annealing_toy2d_seed0.safetensors [--upstream PATH]

* docs/images/schedule-plot.png: what the Annealing Schedule Plot node draws after a run (``annealing.plots.plot_trace``),
  here for the 2D benchmark's trained checkpoint: lambda 0.4, anchored mode (the default), Euler in ComfyUI's x-space at
  the 50 sigmas of its training grid, through ``annealing.AnnealingGuidance`` with the exact ring-mixture denoiser,
  3 samples (one per class).
* docs/images/schedule-plot-modes.png: the same checkpoint at 20 Euler steps, anchored (top) and per_step (bottom):
  what the mode changes when the step count is not the training grid's.
* docs/images/upstream-explorer.png: ``python -m annealing plot`` of the released SDXL checkpoint (skipped when absent;
  the file is read where it lies, never copied into the repository).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import annealing  # noqa: E402
from annealing.plots import figure_to_image, plot_model_explorer, plot_trace, save_figure  # noqa: E402
from annealing.training_grid import VPGrid  # noqa: E402
from training.toy.problem import RingProblem  # noqa: E402

IMAGES = ROOT / "docs" / "images"
LAMBDA = 0.4


def toy_schedule_run(checkpoint: Path, mode: str, steps: int, lam: float = LAMBDA, seed: int = 0) -> annealing.GuidanceTrace:
    """Euler in x-space (x = x0 + sigma eps, ComfyUI's EPS convention) on the ``steps``-step DDIM grid's sigmas, with the
    guidance hook of the pack; returns what the Schedule Plot node would be given."""
    problem = RingProblem()
    sigmas = VPGrid(num_steps=steps).sigmas()
    guide = annealing.AnnealingGuidance(annealing.load_guidance_model(checkpoint), annealing.AnnealingOptions(lam=lam, mode=mode))
    labels = torch.arange(problem.num_classes)
    cond, uncond = problem.one_hot(labels, torch.float64), problem.uncond(labels.shape[0], torch.float64)

    def denoise(x, sigma, condition):  # the DDPM latent is z = a x with a = 1 / sqrt(1 + sigma^2), its noise level sigma a
        alpha = 1 / (1 + sigma**2).sqrt()
        return problem.posterior_mean(x * alpha[:, None], alpha, sigma * alpha, condition)

    recorder = annealing.GuidanceRecorder()
    x = sigmas[0] * torch.randn(labels.shape[0], 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for i in range(steps):
        s = sigmas[i].expand(labels.shape[0])
        d = guide.guide(s, denoise(x, s, cond), denoise(x, s, uncond), sampling="eps", sampler=annealing.SamplerInfo("euler"),
                        sample_sigmas=sigmas, recorder=recorder)
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - d) / sigmas[i]
    return recorder.trace()


def _title(mode: str, steps: int) -> str:
    """Short enough to clear the plot's legend at natural size."""
    return f"Schedule Plot: 2D benchmark checkpoint, lambda {LAMBDA:g}, euler, {steps} steps, mode {mode}"


def same_y_ranges(figures) -> None:
    """One y-range per row (omega, w) across ``figures``, so stacked plots compare at a glance."""
    for row in (0, 1):
        axes = [fig.axes[row] for fig in figures]
        low = min(ax.get_ylim()[0] for ax in axes)
        high = max(ax.get_ylim()[1] for ax in axes)
        for ax in axes:
            ax.set_ylim(0.0 if row == 0 else low, high)


def save_stacked(figures, path: Path) -> None:
    """Several figures of equal width, one above the other, as one PNG."""
    import matplotlib.image

    stacked = np.concatenate([figure_to_image(fig) for fig in figures], axis=0)
    matplotlib.image.imsave(path, stacked)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy-checkpoint", type=Path, required=True, help="a checkpoint written by python -m training.toy")
    parser.add_argument("--upstream", type=Path, default=ROOT.parent / "shared" / "reference" / "annealing_sdxl_upstream.pt",
                        help="the released SDXL checkpoint (default: ../shared/reference/annealing_sdxl_upstream.pt)")
    args = parser.parse_args(argv)
    trace = toy_schedule_run(args.toy_checkpoint, "anchored", 50)
    save_figure(plot_trace(trace, title=_title("anchored", 50)), IMAGES / "schedule-plot.png")
    omega = trace["omega"]  # the README says under the picture which regime this is: these are its numbers
    print(f"wrote {IMAGES / 'schedule-plot.png'}: omega {omega[0].min():.1f}-{omega[0].max():.1f} at the first step, "
          f"peak {omega.max():.1f}")
    modes = [plot_trace(toy_schedule_run(args.toy_checkpoint, mode, 20), title=_title(mode, 20)) for mode in ("anchored", "per_step")]
    same_y_ranges(modes)
    save_stacked(modes, IMAGES / "schedule-plot-modes.png")
    print(f"wrote {IMAGES / 'schedule-plot-modes.png'}")
    if args.upstream.is_file():
        save_figure(plot_model_explorer(annealing.load_guidance_model(args.upstream)), IMAGES / "upstream-explorer.png")
        print(f"wrote {IMAGES / 'upstream-explorer.png'}")
    else:
        print(f"skipped upstream-explorer.png: {args.upstream} not found")


if __name__ == "__main__":
    main()
