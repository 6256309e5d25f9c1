"""Cost of one annealing guidance evaluation against plain CFG's combine, at SDXL's latent shape (4x128x128).

    python benchmarks/guidance_overhead.py [--threads 2] [--batches 1,2,4] [--checkpoint PATH] [--device cpu|cuda]

One evaluation = what the core does per model call: delta in the checkpoint's space, its per-sample norm, the MLP's
timestep and k_train from the grid table, the MLP, the scale rule, the guided x0 and the recorder append (anchored mode,
an ordinary sampler). Prints the median over many repeats in ms. benchmarks/comfy_step_overhead.py measures the same
inside a real ComfyUI sampling loop, hook and wrappers included.
The checkpoint defaults to the released one in ../shared/reference if present, else a random model of the same size
(the cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import annealing  # noqa: E402
from annealing import AnnealingGuidance, AnnealingOptions, GuidanceRecorder  # noqa: E402
from annealing.checkpoint_format import upstream_metadata  # noqa: E402

DEFAULT_CKPT = Path(__file__).resolve().parents[2] / "shared" / "reference" / "annealing_sdxl_upstream.pt"


def timed(fn, device, repeats):
    for _ in range(20):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def dispatched_ops(fn) -> int:
    """How many tensor operations one call dispatches: a load-independent measure of the fixed cost (on a GPU each is a
    kernel launch or a metadata op)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


def plain_cfg(d_c, d_u, scale=7.5):
    return d_u + scale * (d_c - d_u)


def annealing_step(guide, sigma, d_c, d_u, sigmas, recorder):
    if len(recorder) > 1000:  # a long sampling run, not an ever-growing list
        recorder.reset()
    return guide.guide(sigma, d_c, d_u, sampling="eps", sample_sigmas=sigmas, recorder=recorder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2, what CI has)")
    parser.add_argument("--batches", default="1,2,4", help="comma-separated batch sizes (default 1,2,4)")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CKPT), help="checkpoint to time (default: the released SDXL one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="dtype of the predictions")
    parser.add_argument("--repeats", type=int, default=200, help="timed repeats per case (default 200)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if Path(args.checkpoint).is_file():
        model = annealing.load_guidance_model(args.checkpoint, device=device)
    else:
        print(f"note: {args.checkpoint} not found; timing a random model of the same architecture")
        model = annealing.GuidanceScaleModel(metadata=upstream_metadata()).to(device).eval().requires_grad_(False)
    guide = AnnealingGuidance(model, AnnealingOptions(lam=0.4))
    sigmas = annealing.VPGrid(num_steps=30).sigmas().float().to(device)  # a 30-step run: not the training grid

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {args.threads} threads"
    print(f"device: {name}; torch {torch.__version__}; predictions {args.dtype}; latent 4x128x128 (SDXL 1024x1024)")
    print(f"{'batch':>5} | {'plain CFG combine (ms)':>22} | {'annealing evaluation (ms)':>25} | {'overhead (ms)':>13} | dispatched")
    print("-" * 100)
    for batch in [int(b) for b in args.batches.split(",")]:
        d_c = torch.randn(batch, 4, 128, 128, device=device, dtype=dtype)
        d_u = torch.randn(batch, 4, 128, 128, device=device, dtype=dtype)
        sigma = sigmas[10].expand(batch)
        recorder = GuidanceRecorder()
        cfg = functools.partial(plain_cfg, d_c, d_u)
        anneal = functools.partial(annealing_step, guide, sigma, d_c, d_u, sigmas, recorder)

        with torch.inference_mode():
            t_cfg = timed(cfg, device, args.repeats)
            t_anneal = timed(anneal, device, args.repeats)
            ops = dispatched_ops(anneal)
        print(f"{batch:>5} | {t_cfg:>22.3f} | {t_anneal:>25.3f} | {t_anneal - t_cfg:>13.3f} | {ops:>3} tensor ops per evaluation")


if __name__ == "__main__":
    from training.interrupt import exit_on_ctrl_c

    with exit_on_ctrl_c("nothing was written: run it again for the numbers"):
        main()
