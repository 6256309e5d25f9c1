"""How much each precision of the frozen network corrupts delta = pred_u - pred_c and ||delta||.

    python benchmarks/delta_precision.py                               # full-size SDXL UNet on the CPU, 128 px (16 x 16 latent)
    python benchmarks/delta_precision.py --device cuda --latent-size 128   # the same at 1024 px on a GPU
    python benchmarks/delta_precision.py --model wan21_1.3b --frames 5     # Wan 2.1 T2V 1.3B (flow, velocity), 5 frames at 128 px
    python benchmarks/delta_precision.py --model wan21 --device cuda --latent-size 60 --frames 81   # Wan 2.1 14B at 480 px

``--model`` picks the network: ``sdxl`` (the UNet, epsilon) or a Wan transformer (``wan21_1.3b``, ``wan21`` = 14B, ``wan22`` =
TI2V-5B, ``wan22_a14b`` = one A14B expert), built from ``training.tiny_models.FULL_SIZE`` (random weights): the largest of
them this 24 GiB CPU holds in float32 next to its half-precision copy is the 1.3B. For Wan the timesteps are flow
timesteps (1000 sigma, z = (1 - sigma) x0 + sigma eps), the text is 512 x 4096 (UMT5's width) with the prompt's first
``--text-tokens`` rows random and the rest zero, as WanPipeline pads, and the unconditional rows are zeros.

delta is a small difference of two large predictions, so a rounding error that is small on each prediction can be large on
delta. This builds the full-size SDXL base UNet from its config (``training.tiny_models.SDXL_UNET_CONFIG``, 2.57 B parameters,
random weights: nothing is downloaded), computes the unconditional and conditional predictions the way the trainer does (one
batch of 2B: uncond and cond concatenated) in float32 as the reference, and then in every setting of ``--settings``:

* ``fp32``          float32 weights, uncond and cond in two separate calls of batch B: float32's own rounding noise
                    (what changes with the batch composition), the floor every other setting is compared with;
* ``bf16``/``fp16`` weights and inputs cast to bfloat16/float16, no autocast (``--precision bf16|fp16``);
* ``fp16-autocast``/``bf16-autocast``  float32 weights under ``torch.autocast`` (matmuls and convolutions in half precision,
                    normalisations and softmax in float32). Their results can equal the plain half-precision ones: the
                    weights are rounded to the same half values, and elementwise ops follow the half-precision outputs of
                    the convolutions either way (on the CPU, bf16 autocast and bf16 weights agree bit for bit on a small UNet).

Random weights make cond and uncond differ more than a trained model's do, and the error on delta grows as delta shrinks
against the predictions. The conditional embedding is therefore also scaled towards the unconditional one (zeros, as SDXL base's
``force_zeros_for_empty_prompt``) by ``--cond-scales``, which sweeps r = ||delta|| / ||pred_u|| over the range a trained model
is in. Every row prints r and, per setting, the relative error of the predictions, of the delta vector and of ||delta||
(median and maximum over the timesteps of ``--timesteps``). Only one model is held at a time (about 10 GB in float32).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SETTINGS = ("fp32", "fp16-autocast", "bf16-autocast", "bf16", "fp16")


def build_unet(device, seed: int):
    """The full-size SDXL UNet in float32 with weights that depend only on ``seed`` (built on the CPU, then moved)."""
    import torch
    from diffusers import UNet2DConditionModel

    from training.tiny_models import SDXL_UNET_CONFIG

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SDXL_UNET_CONFIG).requires_grad_(False).eval().to(device)


def build_network(model: str, device, seed: int):
    """The network ``--model`` names, in float32, weights depending only on ``seed``."""
    if model == "sdxl":
        return build_unet(device, seed)
    import diffusers
    import torch

    from training.tiny_models import FULL_SIZE

    class_name, config = FULL_SIZE[model]
    torch.manual_seed(seed)
    return getattr(diffusers, class_name)(**config).requires_grad_(False).eval().to(device)


def make_wan_inputs(args, device, channels: int):
    """z at each flow timestep (one latent of ``--frames`` frames), text rows at each conditioning scale, zeros for uncond."""
    import torch

    gen = torch.Generator().manual_seed(args.seed + 1)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    scales = [float(s) for s in args.cond_scales.split(",")]
    frames = (args.frames - 1) // 4 + 1
    shape = (len(timesteps), channels, frames, args.latent_size, args.latent_size)
    x0, eps = torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen, dtype=torch.float64)
    sigma = torch.tensor(timesteps, dtype=torch.float64).reshape(-1, 1, 1, 1, 1) / 1000
    z = ((1 - sigma) * x0 + sigma * eps).float()
    embeds = torch.zeros(512, 4096)
    embeds[: args.text_tokens] = torch.randn(args.text_tokens, 4096, generator=gen)
    rows_z, rows_t, rows_e = [], [], []
    for i, t in enumerate(timesteps):
        for scale in [0.0, *scales]:
            rows_z.append(z[i])
            rows_t.append(float(t))
            rows_e.append(embeds * scale)
    batch = {"z": torch.stack(rows_z).to(device), "t": torch.tensor(rows_t, device=device), "embeds": torch.stack(rows_e).to(device)}
    return batch, timesteps, scales


def make_inputs(args, device):
    """z_t at each timestep, random text embeddings at each conditioning scale, and zeros for the unconditional branch."""
    import torch

    from annealing.training_grid import VPGrid

    if args.model != "sdxl":
        from training.tiny_models import FULL_SIZE

        return make_wan_inputs(args, device, FULL_SIZE[args.model][1]["in_channels"])
    gen = torch.Generator().manual_seed(args.seed + 1)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    scales = [float(s) for s in args.cond_scales.split(",")]
    size = args.latent_size
    abar = VPGrid().alphas_cumprod()  # SDXL's scaled_linear betas 0.00085..0.012
    x0 = torch.randn(len(timesteps), 4, size, size, generator=gen, dtype=torch.float64)
    eps = torch.randn(len(timesteps), 4, size, size, generator=gen, dtype=torch.float64)
    a = abar[timesteps].sqrt().reshape(-1, 1, 1, 1)
    z = (a * x0 + (1 - a**2).sqrt() * eps).float()
    embeds, pooled = torch.randn(1, 77, 2048, generator=gen), torch.randn(1, 1280, generator=gen)
    # rows: for each timestep one uncond sample, then one cond sample per scale
    rows_z, rows_t, rows_e, rows_p = [], [], [], []
    for i, t in enumerate(timesteps):
        for scale in [0.0, *scales]:
            rows_z.append(z[i])
            rows_t.append(float(t))
            rows_e.append(embeds[0] * scale)
            rows_p.append(pooled[0] * scale)
    resolution = size * 8
    batch = {
        "z": torch.stack(rows_z).to(device),
        "t": torch.tensor(rows_t, device=device),
        "embeds": torch.stack(rows_e).to(device),
        "pooled": torch.stack(rows_p).to(device),
        "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32, device=device),
    }
    return batch, timesteps, scales


def predict(unet, batch, dtype, autocast, device, rows=None, chunk: int = 0):
    """The network's predictions for ``rows`` of the batch (all by default), float32 output, ``chunk`` rows per call."""
    import torch

    index = torch.arange(batch["z"].shape[0]) if rows is None else rows
    outs = []
    step = chunk or len(index)
    for start in range(0, len(index), step):
        part = index[start : start + step].to(batch["z"].device)
        n = len(part)
        context = torch.autocast(device.type, dtype=autocast, cache_enabled=False) if autocast else torch.autocast(device.type, enabled=False)
        with torch.no_grad(), context:
            if "pooled" not in batch:  # a Wan transformer, called as WanPipeline calls it (float32 timesteps)
                out = unet(hidden_states=batch["z"][part].to(dtype), timestep=batch["t"][part], encoder_hidden_states=batch["embeds"][part].to(dtype)).sample
            else:
                kwargs = {"text_embeds": batch["pooled"][part].to(dtype), "time_ids": batch["time_ids"].expand(n, -1).to(dtype)}
                out = unet(batch["z"][part].to(dtype), batch["t"][part], encoder_hidden_states=batch["embeds"][part].to(dtype),
                           added_cond_kwargs=kwargs).sample
        outs.append(out.float())
    return torch.cat(outs)


def synchronize(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def errors(pred, ref, timesteps, scales):
    """Per (timestep, scale): r = ||d_ref|| / ||u_ref||, relative errors of the predictions, of d and of ||d||."""
    per_t = len(scales) + 1
    out = {}
    for i, _ in enumerate(timesteps):
        u_ref, u = ref[i * per_t].double(), pred[i * per_t].double()
        for j, scale in enumerate(scales):
            c_ref, c = ref[i * per_t + 1 + j].double(), pred[i * per_t + 1 + j].double()
            d_ref, d = u_ref - c_ref, u - c
            row = out.setdefault(scale, {"r": [], "pred": [], "delta": [], "norm": []})
            row["r"].append(float(d_ref.norm() / u_ref.norm()))
            row["pred"].append(max(float((u - u_ref).norm() / u_ref.norm()), float((c - c_ref).norm() / c_ref.norm())))
            row["delta"].append(float((d - d_ref).norm() / d_ref.norm()))
            row["norm"].append(float(abs(d.norm() - d_ref.norm()) / d_ref.norm()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="sdxl", choices=("sdxl", "wan21_1.3b", "wan21", "wan22", "wan22_a14b"), help="the network (see above)")
    parser.add_argument("--latent-size", type=int, default=16, help="latent side (16 = 128 px; 128 = SDXL's 1024 px)")
    parser.add_argument("--frames", type=int, default=5, help="Wan: video frames, 1 + 4k (5: 2 latent frames)")
    parser.add_argument("--text-tokens", type=int, default=64, help="Wan: the prompt's tokens (the rest of the 512 rows are zeros)")
    parser.add_argument("--timesteps", default="980,500,20", help="DDPM timesteps (SDXL's 50-step grid runs 980, 960, ..., 0); Wan: 1000 sigma")
    parser.add_argument("--cond-scales", default="1,0.3,0.1,0.03", help="conditional embedding = scale x random embedding")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--chunk", type=int, default=0, help="rows per network call (0: all at once)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    batch, timesteps, scales = make_inputs(args, device)
    rows = batch["z"].shape[0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    shape = " x ".join(str(n) for n in batch["z"].shape[1:])
    what = "SDXL UNet" if args.model == "sdxl" else f"{args.model} transformer"
    print(f"full-size {what} (random weights, seed {args.seed}) on {name}; torch {torch.__version__}; latent {shape}; timesteps {timesteps}; "
          f"cond scales {scales}; {rows} rows per setting")

    unet = build_network(args.model, device, args.seed)
    start = time.perf_counter()
    reference = predict(unet, batch, torch.float32, None, device, chunk=args.chunk)
    synchronize(device)
    print(f"reference: float32, uncond and cond in one batch, {time.perf_counter() - start:.1f} s")
    results = {}
    weights = "fp32"
    for setting in settings:
        if setting in ("bf16", "fp16"):
            wanted = torch.bfloat16 if setting == "bf16" else torch.float16
            if weights != "fp32":  # cast from float32 weights, never from the other half type
                del unet
                gc.collect()
                unet = build_network(args.model, device, args.seed)
            from training.backends.loading import cast_like_from_pretrained

            cast_like_from_pretrained(unet, wanted)  # as the trainer's from_pretrained(torch_dtype=...) loads it (Wan keeps its norms in fp32)
            weights = setting
            dtype, autocast = wanted, None
        elif setting == "fp32":
            if weights != "fp32":
                raise SystemExit("list fp32 and the autocast settings before bf16/fp16")
            dtype, autocast = torch.float32, None
        else:
            if weights != "fp32":
                raise SystemExit("list the autocast settings before bf16/fp16")
            dtype, autocast = torch.float32, (torch.float16 if setting == "fp16-autocast" else torch.bfloat16)
        start = time.perf_counter()
        if setting == "fp32":  # uncond rows and cond rows in two calls, as the old 4-call trainer did
            per_t = len(scales) + 1
            uncond_rows = torch.arange(0, rows, per_t)
            cond_rows = torch.tensor([i for i in range(rows) if i % per_t])
            pred = torch.empty_like(reference)
            pred[uncond_rows] = predict(unet, batch, dtype, None, device, uncond_rows, args.chunk)
            pred[cond_rows] = predict(unet, batch, dtype, None, device, cond_rows, args.chunk)
        else:
            pred = predict(unet, batch, dtype, autocast, device, chunk=args.chunk)
        synchronize(device)
        seconds = time.perf_counter() - start
        finite = bool(torch.isfinite(pred).all())
        results[setting] = (errors(pred, reference, timesteps, scales), seconds, finite)
        print(f"{setting}: {seconds:.1f} s{'' if finite else ' (NON-FINITE OUTPUT)'}", flush=True)
    del unet
    gc.collect()

    def pct(values):
        values = sorted(values)
        return f"{100 * values[len(values) // 2]:.3g} / {100 * values[-1]:.3g}"

    print("\nrelative errors against the float32 reference, in %, as median / max over the timesteps")
    print(f"{'setting':14} {'cond scale':>10} {'r = |d|/|u|':>12} {'predictions':>14} {'delta vector':>14} {'||delta||':>14}")
    for setting, (table, _, _) in results.items():
        for scale in scales:
            row = table[scale]
            r = sorted(row["r"])[len(row["r"]) // 2]
            print(f"{setting:14} {scale:10g} {r:12.3g} {pct(row['pred']):>14} {pct(row['delta']):>14} {pct(row['norm']):>14}")


if __name__ == "__main__":
    from training.interrupt import exit_on_ctrl_c

    with exit_on_ctrl_c("nothing was written: run it again for the numbers"):
        main()
