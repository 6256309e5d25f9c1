"""Training throughput (images/s) and peak memory.

    python benchmarks/train_throughput.py                      # tiny SD1.5/SDXL/SD3 models on CPU, the whole trainer
    python benchmarks/train_throughput.py --full-sdxl          # full-size SDXL UNet (random weights) on a CUDA GPU
    python benchmarks/train_throughput.py --full-sdxl --dry-run  # build the full config on the meta device (no memory)

Tiny mode runs ``python -m training``'s trainer end to end (image decoding, VAE, text encoders, both passes, backward,
AdamW) on 64 px images, each model in its own subprocess so the peak resident memory is that run's alone. Images/s
excludes model loading. The number is a pipeline-overhead check, not a prediction of real-model speed.

Full-SDXL mode measures Algorithm 1's loss + backward + AdamW step with a full-size SDXL UNet (2.57 B parameters, config
written out in ``training.tiny_models.SDXL_UNET_CONFIG``; random weights, nothing downloaded) on 1024 px latents
(4 x 128 x 128) and random 77 x 2048 text embeddings; VAE and text encoders are excluded (run them once with
``python -m training embed`` and they cost little next to 4 UNet passes). Peak memory is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_child(kind: str, steps: int, accumulation: int, batch: int, checkpointing: bool, threads: int) -> dict:
    """One tiny-model training run in this process; returns the measured numbers."""
    import torch

    from training.config import TrainConfig
    from training.tiny_models import make_image_dataset, make_tiny_model
    from training.trainer import train

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model(kind, root / kind)
        data = make_image_dataset(root / "data", count=32)
        config = TrainConfig(model=str(model), dataset=str(data), output=str(root / "out"), resolution=64, max_steps=steps,
                             gradient_accumulation=accumulation, batch_size=batch, num_workers=0, device="cpu", checkpoint_every=10**6,
                             gradient_checkpointing=checkpointing)
        result = train(config, progress=False)
    return {"kind": kind, "images_per_second": result.images_per_second, "images": result.images_seen, "seconds": result.seconds,
            "peak_rss_mib": result.peak_memory_bytes / 2**20, "gradient_checkpointing": checkpointing, "batch": batch}


def run_tiny(args) -> None:
    import torch

    print(f"tiny models on CPU: torch {torch.__version__}, {args.threads} thread(s), {args.steps} steps x {args.accumulation} micro-batches of {args.batch}, 64 px")
    print(f"{'model':6} {'grad ckpt':>9} {'images/s':>9} {'peak RSS MiB':>13}")
    for kind in args.kinds.split(","):
        for checkpointing in (False, True):
            cmd = [sys.executable, __file__, "--child", kind, "--steps", str(args.steps), "--accumulation", str(args.accumulation),
                   "--batch", str(args.batch), "--threads", str(args.threads)] + (["--checkpointing"] if checkpointing else [])
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{kind}: failed\n{done.stderr[-2000:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{kind:6} {'on' if checkpointing else 'off':>9} {row['images_per_second']:9.2f} {row['peak_rss_mib']:13.0f}")


def build_full_sdxl(device, dtype):
    import torch
    from diffusers import UNet2DConditionModel

    from training.tiny_models import SDXL_UNET_CONFIG

    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    return unet.to(dtype).requires_grad_(False).eval()


def full_sdxl_backend(unet, device, dtype, resolution: int = 1024):
    """A UNetBackend around a bare UNet (no VAE, no text encoders)."""
    from types import SimpleNamespace

    from annealing.schedules import scaled_linear_alphas_cumprod
    from training.algorithm import CADSConfig
    from training.backends import ModelInfo, UNetBackend
    from training.tiny_models import SDXL_UNET_CONFIG

    info = ModelInfo(family="sdxl", prediction_type="epsilon", pipeline_class="StableDiffusionXLPipeline", scheduler_class="DDIMScheduler",
                     scheduler_config={}, source=Path("sdxl-random"), config_folder=Path("."), network_config=dict(SDXL_UNET_CONFIG))
    scheduler = SimpleNamespace(alphas_cumprod=scaled_linear_alphas_cumprod().float())
    return UNetBackend(info, unet, None, None, dtype, device, CADSConfig(), resolution, "zeros", scheduler=scheduler)


def run_full_sdxl(args) -> None:
    import torch

    import annealing
    from training.algorithm import annealing_loss
    from training.backends import TextCondition
    from training.trainer import peak_memory_bytes

    if args.dry_run:
        unet = build_full_sdxl("meta", torch.bfloat16)
        count = sum(p.numel() for p in unet.parameters())
        print(f"full-size SDXL UNet config builds: {count / 1e9:.3f} B parameters (meta device, nothing allocated)")
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--full-sdxl needs a CUDA device (--dry-run only checks the config; --device cpu --latent-size 16 runs the loop slowly)")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
    size = args.latent_size
    torch.manual_seed(0)
    unet = build_full_sdxl(device, dtype)
    backend = full_sdxl_backend(unet, device, dtype, resolution=size * 8)
    grid = backend.grid(50)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"full-size SDXL UNet on {name}: {sum(p.numel() for p in unet.parameters()) / 1e9:.2f} B params in {dtype}, "
          f"{size * 8} px latents (4 x {size} x {size}), {args.steps} timed micro-batches after {args.warmup} warm-up")
    print(f"{'batch':>5} {'grad ckpt':>9} {'images/s':>9} {'s/image':>8} {'peak GiB':>9}" + ("" if cuda else " (process peak RSS)"))
    for batch in [int(b) for b in args.full_batches.split(",")]:
        for checkpointing in (True, False):
            if checkpointing:
                unet.enable_gradient_checkpointing()
            else:
                unet.disable_gradient_checkpointing()
            mlp = annealing.GuidanceScaleModel().to(device)
            opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=0.01)
            gen = torch.Generator(device=device).manual_seed(0)
            x0 = torch.randn(batch, 4, size, size, device=device, generator=gen)
            cond = TextCondition(torch.randn(batch, 77, 2048, device=device, generator=gen), torch.randn(batch, 1280, device=device, generator=gen))
            uncond = TextCondition(torch.zeros(1, 77, 2048, device=device), torch.zeros(1, 1280, device=device))
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                for i in range(args.warmup + args.steps):
                    if i == args.warmup:
                        if cuda:
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                    terms = annealing_loss(backend, mlp, x0, cond, uncond, grid, generator=gen)
                    terms.total.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                peak = peak_memory_bytes(device) / 2**30
                rate = batch * args.steps / seconds
                print(f"{batch:5d} {'on' if checkpointing else 'off':>9} {rate:9.3f} {1 / rate:8.3f} {peak:9.1f}")
            except torch.cuda.OutOfMemoryError:
                print(f"{batch:5d} {'on' if checkpointing else 'off':>9} {'out of memory':>28}")
            del mlp, opt
            if cuda:
                torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="sd15,sdxl,sd3", help="tiny models to run")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps (tiny) or timed micro-batches (full SDXL)")
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the tiny runs")
    parser.add_argument("--full-sdxl", action="store_true", help="full-size SDXL UNet with random weights on CUDA")
    parser.add_argument("--full-batches", default="1,2", help="micro-batch sizes for --full-sdxl")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="with --full-sdxl: build the config on the meta device only")
    parser.add_argument("--device", default="cuda", help="with --full-sdxl: cuda (default) or cpu (slow; for checking the loop)")
    parser.add_argument("--latent-size", type=int, default=128, help="with --full-sdxl: latent side (128 = 1024 px)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(tiny_child(args.child, args.steps, args.accumulation, args.batch, args.checkpointing, args.threads)))
    elif args.full_sdxl:
        run_full_sdxl(args)
    else:
        run_tiny(args)


if __name__ == "__main__":
    main()
