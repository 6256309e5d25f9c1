"""``python -m training [train] ...`` and ``python -m training embed ...``.

train: every :class:`training.config.TrainConfig` field is a flag (``--grid-steps 28``, ``--no-cads``); ``--config
file.yaml|toml`` supplies defaults that flags override. embed: writes precomputed text embeddings for a dataset so
training can skip loading the text encoders (see :mod:`training.data`).
Errors in the input are one line on stderr and exit status 2, before any training starts. Ctrl-C ends every command with
one line saying what was kept and how to go on, and exit status 130 (:mod:`training.interrupt`).
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from annealing.errors import AnnealingError

from .config import CHOICES, HELP, _field_kind, build_config, config_fields, read_config_file
from .errors import TrainingError
from .interrupt import exit_on_ctrl_c, staged_folder

EXAMPLES = """examples:
  python -m training --model ./sdxl-base --dataset ./laion-20k --output ./runs/sdxl
  python -m training --config training/configs/sd3.yaml --model ./sd3-medium --dataset data.jsonl --output ./runs/sd3
  python -m training --method learn-to-guide --config training/configs/sdxl.yaml --model ./sdxl-base --dataset ./laion-20k --output ./runs/l2g
  accelerate launch --multi_gpu --num_processes 4 -m training --config training/configs/sdxl.yaml ...
  python -m training embed --model ./sdxl-base --dataset ./laion-20k --output ./laion-20k-sdxl-embeds
  python -m training plot ./runs/sdxl
"""


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train an annealing-guidance checkpoint (a guidance-scale MLP) for a local SD1.x/SD2.x, SDXL or SD3-family model, "
        "or with --method learn-to-guide a Learn to Guide network (a CFG scale per sampling step and prompt). "
        "Subcommands: `embed` precomputes text embeddings (python -m training embed --help); `plot OUTPUT` draws the training curves.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or TOML file of settings (flags given here override it)")
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        kind = _field_kind(f)
        default_text = "" if f.default is None else f" (default: {f.default})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=HELP[f.name] + default_text)
        else:
            options = {"choices": CHOICES[f.name]} if f.name in CHOICES else {"metavar": f.name.upper()}
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=HELP[f.name] + default_text, **options)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def embed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training embed",
        description="Encode every distinct caption of a dataset with the model's text encoders and write an embeddings folder "
        "(index.json + safetensors shards) for `python -m training --embeddings FOLDER`.",
    )
    parser.add_argument("--model", required=True, help=HELP["model"])
    parser.add_argument("--config-folder", help=HELP["config_folder"])
    parser.add_argument("--dataset", required=True, help=HELP["dataset"])
    parser.add_argument("--output", required=True, help="embeddings folder to write")
    parser.add_argument("--caption-extension", default=".txt", help=HELP["caption_extension"])
    parser.add_argument("--skip-missing-captions", action="store_true", help=HELP["skip_missing_captions"])
    parser.add_argument("--batch-size", type=int, default=8, help="captions per text-encoder call (default: 8)")
    parser.add_argument("--shard-size", type=int, default=512, help="captions per shard file (default: 512)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="storage dtype (default: float16)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the text encoders run (default: auto)")
    parser.add_argument("--sd3-t5", action=argparse.BooleanOptionalAction, default=True, help=HELP["sd3_t5"])
    parser.add_argument("--latents", action="store_true", help="also encode every sample with the VAE (once) and store its posterior, so "
                        "training with --embeddings loads neither the text encoders nor the VAE")
    parser.add_argument("--resolution", type=int, help="with --latents: " + HELP["resolution"])
    parser.add_argument("--frames", type=int, help="with --latents: " + HELP["frames"])
    parser.add_argument("--frame-stride", type=int, default=1, help="with --latents: " + HELP["frame_stride"] + " (default: 1)")
    parser.add_argument("--latent-dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                        help="storage dtype of the latents (default: float16)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run_train(argv: list[str]) -> int:
    args = vars(train_parser().parse_args(argv))
    quiet = args.pop("quiet")
    config_file = args.pop("config")
    file_values = read_config_file(config_file) if config_file else {}
    from .trainer import train

    train(build_config(file_values, args), progress=not quiet)  # Ctrl-C: raises Interrupted, saying what it kept
    return 0


def run_embed(argv: list[str]) -> int:
    import torch

    from .backends import default_resolution, detect_model, load_backend
    from .config import TrainConfig
    from .data import scan_dataset, write_embeddings, write_latents
    from .run_folder import ensure_writable

    args = embed_parser().parse_args(argv)
    if args.batch_size < 1 or args.shard_size < 1:
        raise TrainingError("--batch-size and --shard-size must be >= 1")
    output = Path(args.output)
    ensure_writable(output)
    info = detect_model(args.model, args.config_folder)
    scan = scan_dataset(args.dataset, args.caption_extension, args.skip_missing_captions, videos=info.spec.video)
    resolution = args.resolution or default_resolution(info.family, info.prediction_type)
    frames = args.frames or info.default_frames
    if args.latents:  # the training settings' own bounds, then the family's latent shape
        TrainConfig(resolution=resolution, frames=frames, frame_stride=args.frame_stride).validate(need_paths=False)
        latent_shape = info.latent_shape(resolution, frames)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    compute_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    backend = load_backend(info, device=device, dtype=compute_dtype, resolution=resolution, use_t5=args.sd3_t5, uncond="empty_prompt",
                           load_network=False, load_vae=args.latents, frames=frames)

    def encode(captions):
        cond = backend.encode_text(captions)
        parts = {"embeds": cond.embeds, "pooled": cond.pooled, "mask": cond.mask}
        return {k: v for k, v in parts.items() if v is not None}

    # all or nothing: Ctrl-C or a failure leaves the folder as it was; index.json, which names the shards, is moved last
    latents = None
    with staged_folder(output, last=("index.json",)) as staging:
        if args.latents:
            latents = write_latents(staging, scan.samples, scan.root, backend.latent_distribution, resolution=resolution,
                                    frames=frames if info.spec.video else None, frame_stride=args.frame_stride, latent_shape=latent_shape,
                                    dtype=getattr(torch, args.latent_dtype), progress=not args.quiet)
        index = write_embeddings(staging, [s.caption for s in scan.samples], encode, encode([""]), model_family=info.family,
                                 base_model=info.base_model, dtype=getattr(torch, args.dtype), shard_size=args.shard_size,
                                 batch_size=args.batch_size, progress=not args.quiet, latents=latents, trim_to_mask=backend.pads_to_longest)
    line = f"wrote {index['count']} caption embeddings in {len(index['shards'])} shard(s) to {output}"
    if latents is not None:
        line += f"; latents of {len(latents['files'])} samples ({latents['skipped_count']} unreadable, skipped)"
    print(line)
    return 0


def run_plot(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m training plot", description="Plot train_log.jsonl of a training output folder.")
    parser.add_argument("output", help="training output folder (or its train_log.jsonl)")
    parser.add_argument("--image", help="PNG to write (default: OUTPUT/training_curves.png)")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if not output.exists():
        raise TrainingError(f"{output}: no such folder or file")
    if args.image and Path(args.image).suffix.lower() != ".png":
        raise TrainingError(f"--image {args.image}: the curves are written as PNG, give a file name ending in .png")
    from .plots import plot_training_log

    print(f"wrote {plot_training_log(args.output, args.image)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with exit_on_ctrl_c("stopped; nothing was written: run the same command again"):
            if argv and argv[0] == "embed":
                return run_embed(argv[1:])
            if argv and argv[0] == "plot":
                return run_plot(argv[1:])
            if argv and argv[0] == "train":
                argv = argv[1:]
            return run_train(argv)
    except (TrainingError, AnnealingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        # a write outside atomic_write (the log) on a full disk: one line, as atomic_write says it
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: no space left on device{where}", file=sys.stderr)
        return 2
