"""Regenerates the README's pictures.

    python docs/make_figures.py --toy-checkpoint results/toy/annealing_toy2d_seed0.safetensors [--upstream PATH]

* docs/images/upstream-explorer.png: ``python -m annealing plot`` of the released SDXL checkpoint (skipped when absent).
* docs/images/schedule-plot.png: what the Annealing Schedule Plot node draws after a run, here for the 2D benchmark's
  trained checkpoint: a 50-step Euler run in ComfyUI's x-space through ``annealing.AnnealingGuidance`` (k factor), with
  the exact ring-mixture denoiser, 4 samples (one per class, plus a second of class 0), lambda 0.4.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import annealing  # noqa: E402
from annealing.plots import plot_model_explorer, plot_trace, save_figure  # noqa: E402
from annealing.schedules import continuous_timestep, ddim_sigmas, scaled_linear_alphas_cumprod, vp_sigmas  # noqa: E402
from training.toy.problem import RingProblem  # noqa: E402

IMAGES = ROOT / "docs" / "images"


def toy_schedule_run(checkpoint: Path, lam: float = 0.4, steps: int = 50, seed: int = 0) -> annealing.GuidanceTrace:
    problem = RingProblem()
    log_sigmas = vp_sigmas(scaled_linear_alphas_cumprod()).log().float()
    sigmas = ddim_sigmas(steps).double()
    guide = annealing.AnnealingGuidance(annealing.load_guidance_model(checkpoint), annealing.AnnealingOptions(lam=lam))
    labels = torch.tensor([0, 1, 2, 0])
    cond, uncond = problem.one_hot(labels, torch.float64), problem.uncond(4, torch.float64)

    def denoise(x, sigma, condition):  # Karras x = z / alpha: alpha = 1 / sqrt(1 + sigma^2), DDPM sigma = sigma * alpha
        alpha = 1 / (1 + sigma**2).sqrt()
        return problem.posterior_mean(x * alpha[:, None], alpha, sigma * alpha, condition)

    recorder = annealing.GuidanceRecorder()
    x = sigmas[0] * torch.randn(4, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for i in range(steps):
        s = sigmas[i].expand(4)
        d = guide.guide(s, denoise(x, s, cond), denoise(x, s, uncond), sampling="eps", sample_sigmas=sigmas, recorder=recorder,
                        sigma_to_timestep=lambda v: continuous_timestep(v, log_sigmas))
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - d) / sigmas[i]
    return recorder.trace()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy-checkpoint", type=Path, required=True, help="a checkpoint written by python -m training.toy")
    parser.add_argument("--upstream", type=Path, default=ROOT.parent / "shared" / "reference" / "annealing_sdxl_upstream.pt",
                        help="the released SDXL checkpoint (default: ../shared/reference/annealing_sdxl_upstream.pt)")
    args = parser.parse_args(argv)
    trace = toy_schedule_run(args.toy_checkpoint)
    save_figure(plot_trace(trace, title="Annealing Schedule Plot: 2D benchmark checkpoint, lambda 0.4, euler (k factor), 50 steps"),
                IMAGES / "schedule-plot.png")
    print(f"wrote {IMAGES / 'schedule-plot.png'}")
    if args.upstream.is_file():
        save_figure(plot_model_explorer(annealing.load_guidance_model(args.upstream), dpi=80), IMAGES / "upstream-explorer.png")
        print(f"wrote {IMAGES / 'upstream-explorer.png'}")
    else:
        print(f"skipped upstream-explorer.png: {args.upstream} not found")


if __name__ == "__main__":
    main()
