"""Cost of the load-time domain check (annealing/domain_check.py) against loading a checkpoint.

    python benchmarks/load_check.py [--threads 1] [--checkpoint PATH] [--repeats 50]

Prints the median and the best over repeats, in ms: a whole ``load_guidance_model`` (the check included), the same load
without the check, the check alone, and the points it evaluates. The checkpoint defaults to the released one in ../shared/reference if present, else a random model
of the same architecture saved to a temporary file (the cost does not depend on the weights), plus, for scale, the largest
architecture the bounds allow.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import annealing  # noqa: E402
import annealing.checkpoint_reader as reader  # noqa: E402
from annealing.checkpoint_format import upstream_metadata  # noqa: E402
from annealing.domain_check import annealing_domain_points, check_domain  # noqa: E402

DEFAULT_CKPT = Path(__file__).resolve().parents[2] / "shared" / "reference" / "annealing_sdxl_upstream.pt"


def timed_ms(fn, repeats: int) -> tuple[float, float]:
    """(median, best) over ``repeats`` calls, in ms: on a shared machine the best is the closer to an idle one."""
    fn()  # warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), min(samples)


def row(name: str, path: Path, repeats: int) -> str:
    model = annealing.load_guidance_model(path)
    points = annealing_domain_points(model)[0].shape[0]  # thinned for networks too large to check at every point
    load = timed_ms(lambda: annealing.load_guidance_model(path), repeats)
    reader.check_domain = lambda *args: None  # the same load without the check
    try:
        bare = timed_ms(lambda: annealing.load_guidance_model(path), repeats)
    finally:
        reader.check_domain = check_domain
    check = timed_ms(lambda: check_domain(model, path), repeats)
    params = sum(p.numel() for p in model.parameters())
    return (f"{name:<38} | {params:>10,} | {points:>6,} | {load[0]:>8.2f} / {load[1]:<8.2f} | {bare[0]:>8.2f} / {bare[1]:<8.2f} | "
            f"{check[0]:>8.2f} / {check[1]:<8.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CKPT), help="checkpoint to time (default: the released SDXL one)")
    parser.add_argument("--repeats", type=int, default=50, help="timed repeats (default 50)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"device: {platform.processor() or platform.machine()}, {args.threads} threads; torch {torch.__version__}")
    print(f"{'checkpoint':<38} | {'parameters':>10} | {'points':>6} | {'load, median / best':<19} | {'without the check':<19} | "
          "the check alone (ms)")
    print("-" * 128)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(args.checkpoint)
        if not path.is_file():
            print(f"note: {path} not found; timing a random model of the same architecture")
            path = Path(folder) / "released_architecture.safetensors"
            annealing.save_guidance_model(annealing.GuidanceScaleModel(metadata=upstream_metadata()), path)
        print(row(path.name, path, args.repeats))
        largest = Path(folder) / "largest.safetensors"  # 4096 wide, 1 hidden layer: 16.8 million parameters
        annealing.save_guidance_model(annealing.GuidanceScaleModel(annealing.GuidanceModelConfig(hidden_size=4096, n_layers=1),
                                                                   upstream_metadata()), largest)
        print(row("4096 x 1 hidden layer (bounds' scale)", largest, max(3, args.repeats // 10)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
