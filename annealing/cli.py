"""Command line of the core library.

    python -m annealing inspect CKPT                 metadata, the CFG-equivalent scale per lambda, and tables of w
    python -m annealing convert IN OUT [options]     upstream .pt (or any readable checkpoint) -> our .safetensors
    python -m annealing plot CKPT --out FILE.png     omega and w against timestep, heatmaps over (timestep, delta norm)

Writing commands check their output before any work: a folder, a missing folder or a suffix they cannot write is refused,
and an existing file unless --force is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .atomic_write import atomic_write
from .checkpoint_format import PREDICTION_SPACES, TIMESTEP_CONVENTIONS
from .checkpoint_reader import load_guidance_model
from .checkpoint_writer import convert_checkpoint
from .errors import AnnealingError
from .plots import DELTA_NORM_MULTIPLES, DELTA_NORMS_HELP, omega_profile, parse_lambdas

TABLE_LAMBDAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _lambda_list(text: str) -> list[float]:
    try:
        return list(parse_lambdas(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def w_table(model, lambdas=TABLE_LAMBDAS, delta_norm: float | None = None, rows: int = 6) -> str:
    """A text table of w: one row per timestep (noisiest first), one column per lambda."""
    import numpy as np

    from .plots import timestep_axis, w_grid

    timesteps, _, label = timestep_axis(model)
    picks = timesteps[np.linspace(0, len(timesteps) - 1, rows).round().astype(int)]
    delta_norm = float(model.config.delta_embed_normalization) if delta_norm is None else delta_norm
    width = len(label)
    header = f"{label:>{width}} | " + " ".join(f"lam={lam:<5g}" for lam in lambdas)
    lines = [f"w at ||delta|| = {delta_norm:g}", header, "-" * len(header)]
    grids = {lam: w_grid(model, picks, np.array([delta_norm]), lam)[0] for lam in lambdas}
    for i, t in enumerate(picks):
        lines.append(f"{t:>{width}.4g} | " + " ".join(f"{grids[lam][i]:<9.4f}" for lam in lambdas))
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    model = load_guidance_model(args.checkpoint)
    meta, config = model.metadata, model.config
    params = sum(p.numel() for p in model.parameters())
    if args.json:
        print(json.dumps({"file": args.checkpoint, "format": model.source_format, "parameters": params,
                          "architecture": config.to_dict(), "metadata": meta.to_dict()}, indent=2, sort_keys=True))
        return 0
    print(f"file:                 {args.checkpoint} ({model.source_format})")
    print(f"parameters:           {params:,}  (MLP {config.hidden_size} x {config.n_layers} hidden layers)")
    if meta.method == "learn_to_guide":
        print(f"prompt embedding:     {config.prompt_embedding}, {config.prompt_dim} wide")
    print(f"model family:         {meta.model_family}")
    if meta.method != "learn_to_guide":
        print(f"delta space:          {meta.prediction_space}")
    print(f"timestep convention:  {meta.timestep_convention}")
    print(f"trained latent size:  {meta.trained_latent_numel if meta.trained_latent_numel else 'unknown'} elements per sample")
    print(f"training grid:        {meta.training_grid.describe()}")
    print(f"method:               {meta.method}")
    print(f"format version:       {meta.format_version}")
    print(f"training:             {json.dumps(meta.training, sort_keys=True)}")
    print(f"architecture:         {json.dumps(config.to_dict(), sort_keys=True)}")
    if meta.method == "learn_to_guide":
        print()
        print(learned_table(model))
        return 0
    base = float(config.delta_embed_normalization)
    print()
    print(omega_table(model, [m * base for m in DELTA_NORM_MULTIPLES]))
    for norm in (base, 4 * base):
        print()
        print(w_table(model, delta_norm=norm))
    return 0


def learned_table(model, rows: int = 8) -> str:
    """A learn_to_guide checkpoint's CFG scale 1 + omega along its training grid, for the zero prompt embedding."""
    import numpy as np
    import torch

    from .plots import learned_scale

    grid = model.metadata.training_grid
    sigmas = grid.sigmas()[:-1].numpy()
    picks = np.linspace(0, len(sigmas) - 1, min(rows, len(sigmas))).round().astype(int)
    scale = learned_scale(model, torch.zeros(model.config.prompt_dim), sigmas[picks])
    lines = [f"CFG scale 1 + omega along the training grid (zero prompt embedding; the real scale depends on the prompt, read as "
             f"the {model.config.prompt_embedding} embedding, {model.config.prompt_dim} wide):", "grid step | sigma     | CFG scale"]
    lines += [f"{i:>9} | {sigmas[i]:<9.4g} | {scale[j]:.3f}" for j, i in enumerate(picks)]
    return "\n".join(lines)


def omega_table(model, delta_norms, lambdas=TABLE_LAMBDAS) -> str:
    """Per lambda, the range of the CFG-equivalent scale omega = w * k_train over the training grid, at a few delta norms:
    what the checkpoint gives as an ordinary CFG scale (anchored mode)."""
    head = "lambda | " + " | ".join(f"{f'||delta|| = {d:g}':<20}" for d in delta_norms)
    lines = ["CFG-equivalent scale omega = w * k_train on the training grid: first step / middle step / peak", head, "-" * len(head)]
    for lam in lambdas:
        cells = [f"{a:5.1f} /{b:5.1f} /{c:5.1f}" for a, b, c in (omega_profile(model, lam, d) for d in delta_norms)]
        lines.append(f"{lam:<6g} | " + " | ".join(f"{cell:<20}" for cell in cells))
    return "\n".join(lines)


def _output_problem(path: str, force: bool) -> str | None:
    """Why ``path`` cannot be written, checked before any work: a folder, a missing folder, or an existing file without --force."""
    if os.path.isdir(path):
        return f"{path}: is a directory; give the path of a file to write"
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return f"{path}: the folder {folder} does not exist"
    if os.path.exists(path) and not force:
        return f"{path}: already exists (use --force to overwrite)"
    return None


def image_format(path: str) -> str:
    """The image format ``path``'s suffix names (png, jpg, pdf, svg, ...: whatever matplotlib writes); ValueError otherwise."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = set(FigureCanvasBase.get_supported_filetypes()) - {"pgf"}  # pgf needs a LaTeX installation
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if suffix not in formats:
        named = f"a .{suffix} file" if suffix else "a file without a suffix"
        raise ValueError(f"{path}: matplotlib cannot write {named}; name it .{', .'.join(sorted(formats))}")
    return suffix


def cmd_convert(args) -> int:
    problem = _output_problem(args.output, args.force)
    if problem is None and not args.output.lower().endswith(".safetensors"):
        problem = f"{args.output}: convert writes a .safetensors file; give the output that suffix"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    changes = {}
    for name in ("model_family", "prediction_space", "timestep_convention", "trained_latent_numel", "sampling_steps"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    meta = convert_checkpoint(args.input, args.output, **changes)
    print(f"wrote {args.output}: {meta.model_family}, delta in {meta.prediction_space} space, timestep {meta.timestep_convention}, "
          f"trained at {meta.trained_latent_numel} latent elements, {meta.sampling_steps} steps")
    return 0


def cmd_plot(args) -> int:
    from .plots import plot_model_explorer

    problem = _output_problem(args.out, args.force)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    kind = image_format(args.out)  # before the file is read or anything drawn
    model = load_guidance_model(args.checkpoint)
    fig = plot_model_explorer(model, lambdas=args.lambdas, delta_norms=args.delta_norms, dpi=args.dpi)
    atomic_write(args.out, lambda tmp: fig.savefig(tmp, format=kind))
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m annealing", description="Inspect, convert and plot annealing guidance checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print metadata, parameter count and a table of w", description="Print a checkpoint's metadata, "
                       "parameter count and w over timesteps for several lambdas at two typical delta norms.")
    p.add_argument("checkpoint", help="an upstream .pt or one of our .safetensors files")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="convert a checkpoint (e.g. the upstream .pt) to .safetensors", description="Convert any readable "
                       "checkpoint to the project's .safetensors with full metadata. Defaults for the upstream file: sdxl, epsilon, "
                       "ddpm_index, 65536 latent elements (1024x1024), 50 steps.")
    p.add_argument("input", help="checkpoint to read (.pt or .safetensors; the format is detected from the content)")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--model-family", help="family it was trained for, e.g. sdxl, sd15, sd3 (default: keep)")
    p.add_argument("--prediction-space", choices=PREDICTION_SPACES, help="space delta is measured in (default: keep)")
    p.add_argument("--timestep-convention", choices=TIMESTEP_CONVENTIONS, help="the MLP's timestep input (default: keep)")
    p.add_argument("--trained-latent-numel", type=int, help="latent elements per sample at the training resolution (default: keep)")
    p.add_argument("--sampling-steps", type=int, help="sampling steps it was trained for (default: keep)")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("plot", help="plot w over timestep, delta norm and lambda to an image", description="Draw how a checkpoint behaves: "
                       "w against timestep for several lambdas at a few delta norms, and heatmaps of w over (timestep, delta norm).")
    p.add_argument("checkpoint", help="an upstream .pt or one of our .safetensors files")
    p.add_argument("--out", required=True, help="image file to write, in the format its suffix names (.png, .jpg, .pdf, .svg, ...)")
    p.add_argument("--lambdas", type=_lambda_list, default=list(TABLE_LAMBDAS), help="comma-separated lambdas (default 0,0.2,...,1)")
    p.add_argument("--delta-norms", type=_float_list, default=None, help=DELTA_NORMS_HELP)
    p.add_argument("--dpi", type=int, default=100, choices=range(30, 401), metavar="{30..400}", help="resolution of the image (default 100)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (AnnealingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `inspect ... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
