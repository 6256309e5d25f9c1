"""Pictures of a checkpoint and of a sampling run (matplotlib, object API only: no pyplot global state, safe in a server).

* :func:`plot_model_explorer`: how a checkpoint behaves: the CFG-equivalent scale omega = w * k_train over its training
  grid's noise levels and w itself, per lambda at a few delta norms, and heatmaps of w over (timestep, delta norm).
* :func:`plot_trace`: what a sampling run applied, per batch item and step: omega (ordinary CFG units, the main curve),
  the MLP's w and the delta norm it saw.
* :func:`figure_to_image` / :func:`figure_to_tensor` / :func:`save_figure`: an (H, W, 3) array, a ComfyUI IMAGE, or a PNG
  written atomically.
* :func:`parse_lambdas`: the lambda list of the explorer node and of ``python -m annealing plot``.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .lambda_rule import check_lambda
from .recorder import GuidanceTrace
from .training_grid import GridLookup, VPGrid, k_train

DEFAULT_LAMBDAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
MAX_LAMBDAS = 12
#: Delta norms of the line panels, in units of the checkpoint's delta normalisation (5, 10, 20, 30 for the SDXL checkpoint).
DELTA_NORM_MULTIPLES = (1.0, 2.0, 4.0, 6.0)


def parse_lambdas(text) -> tuple[float, ...]:
    """'0.1, 0.4 0.8' -> (0.1, 0.4, 0.8): commas or spaces, every value in [0, 1], 1 to 12 values; ValueError naming the bad one."""
    parts = [p for p in str(text).replace(",", " ").split() if p]
    if not parts:
        raise ValueError("give at least one lambda in [0, 1], e.g. 0.2, 0.4, 0.8")
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            value = part[:20]  # the rule refuses it, in its own words
        values.append(check_lambda(value))
    if len(values) > MAX_LAMBDAS:
        raise ValueError(f"at most {MAX_LAMBDAS} lambdas, got {len(values)}")
    return tuple(values)


def _figure(width: float, height: float, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_to_image(fig) -> np.ndarray:
    """Render a figure to a float32 RGB array (H, W, 3) in [0, 1]."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return rgba[..., :3].astype(np.float32) / 255.0


def figure_to_tensor(fig) -> torch.Tensor:
    """A figure as a ComfyUI IMAGE: float32 (1, H, W, 3) in [0, 1]."""
    return torch.from_numpy(figure_to_image(fig).copy()).unsqueeze(0)


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a PNG through a temporary file, so an interrupted run leaves no half-written image."""
    from .atomic_write import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# ------------------------------------------------------------------------------------------------------------ explorer


def timestep_axis(model) -> tuple[np.ndarray, np.ndarray, str]:
    """(timesteps, sigmas, label): the scan in the checkpoint's timestep convention (noisiest on the left, like sampling)
    and the x-space sigma of each point on its training grid's schedule."""
    meta = model.metadata
    grid = meta.training_grid
    if isinstance(grid, VPGrid):
        count = grid.num_train_timesteps
        timesteps = np.linspace(count - 1, 0.0, 101)
        log_sigmas = grid.schedule_sigmas().log().numpy()
        return timesteps, np.exp(np.interp(timesteps, np.arange(count), log_sigmas)), "timestep (DDPM index)"
    sigmas = np.linspace(1.0, 0.0, 101)
    if meta.timestep_convention == "sigma":
        return sigmas, sigmas, "timestep (flow sigma)"
    return sigmas * 1000.0, sigmas, "timestep (flow sigma x 1000)"


def delta_norm_axis(model, points: int = 81) -> np.ndarray:
    """Delta norms to scan: 0 .. 8 x the checkpoint's normalisation (0 .. 40 for the released SDXL checkpoint)."""
    return np.linspace(0.0, 8.0 * float(model.config.delta_embed_normalization), points)


@torch.no_grad()
def w_grid(model, timesteps: np.ndarray, delta_norms: np.ndarray, lam: float) -> np.ndarray:
    """w over the grid, shape (len(delta_norms), len(timesteps))."""
    t, d = np.meshgrid(timesteps, delta_norms)
    w = model(torch.from_numpy(t.ravel()).float(), torch.from_numpy(d.ravel()).float(), float(lam))
    return w.detach().cpu().numpy().reshape(d.shape)


def anchored_factor(model, sigmas: np.ndarray) -> np.ndarray:
    """k_train at each sigma of the checkpoint's training grid (see :mod:`annealing.training_grid`)."""
    return k_train(model.metadata.training_grid, torch.from_numpy(np.asarray(sigmas, dtype=np.float64))).numpy()


def omega_profile(model, lam: float, delta_norm: float) -> tuple[float, float, float]:
    """(first step, middle step, peak) of the CFG-equivalent scale omega = w * k_train over the training grid's points,
    at one delta norm."""
    grid = model.metadata.training_grid
    sigmas = grid.sigmas()[:-1]
    if isinstance(grid, VPGrid):
        timesteps = grid.timesteps().to(torch.float32)
    else:
        timesteps = sigmas.float() * (1000.0 if model.metadata.timestep_convention == "sigma_x1000" else 1.0)
    with torch.no_grad():
        w = model(timesteps, float(delta_norm), float(lam)).double()
    omega = w * k_train(grid, sigmas)
    return float(omega[0]), float(omega[len(omega) // 2]), float(omega.max())


def _title(model) -> str:
    meta = model.metadata
    source = os.path.basename(getattr(model, "source_path", "") or "") or "guidance model"
    return f"{source}  ({meta.model_family}, {meta.prediction_space}, {meta.timestep_convention}; trained on a {meta.training_grid.describe()})"


@torch.no_grad()
def learned_scale(model, prompt: torch.Tensor, sigmas: np.ndarray) -> np.ndarray:
    """A learn_to_guide checkpoint's CFG scale 1 + omega(t, s, prompt) at each sigma, s the training grid's next point."""
    lookup = GridLookup(model.metadata.training_grid, model.metadata.timestep_convention)
    timestep, _, next_timestep = lookup(torch.from_numpy(np.asarray(sigmas, dtype=np.float32)))
    return (1.0 + model(timestep, next_timestep, prompt.reshape(1, -1))).cpu().numpy()


def plot_learned_explorer(model, prompts: dict | None = None, title: str | None = None, dpi: int = 100):
    """A learn_to_guide checkpoint: its CFG scale 1 + omega for the step from each timestep to the training grid's next point,
    one line per prompt embedding in ``prompts`` (label -> (P,) tensor); without prompts, the zero embedding, said so."""
    timesteps, sigmas, t_label = timestep_axis(model)
    config = model.config
    if not prompts:
        prompts = {"zero embedding (no prompt given; the scale depends on the prompt)": torch.zeros(config.prompt_dim)}
    fig = _figure(8.5, 4.8, dpi)
    ax = fig.add_subplot(1, 1, 1)
    fig.suptitle(title or _title(model), fontsize=10)
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    for index, (label, prompt) in enumerate(prompts.items()):
        ax.plot(timesteps, learned_scale(model, prompt, sigmas), color=cmap(index % 10), label=label)
    ax.set_xlim(timesteps[0], timesteps[-1])
    ax.set_xlabel(t_label)
    ax.set_ylabel("CFG scale 1 + omega(t, s, prompt)\n(s: the training grid's next point)")
    ax.set_title(f"Learn to Guide: the step's CFG scale, prompt read as the {config.prompt_embedding} embedding ({config.prompt_dim} wide)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_model_explorer(model, lambdas=DEFAULT_LAMBDAS, delta_norms=None, title: str | None = None, dpi: int = 100, prompts=None):
    """Row 1: omega = w * k_train (ordinary CFG units) against timestep, one panel per delta norm, one line per lambda.
    Row 2: w (CFG++ units), same panels. Bottom rows: heatmaps of w over (timestep, delta norm), one per lambda, on one
    colour scale. Every row shares its y-range (said in the row's label). Returns a matplotlib Figure.
    A learn_to_guide checkpoint is drawn by :func:`plot_learned_explorer` (``prompts``; lambdas do not apply)."""
    if model.metadata.method == "learn_to_guide":
        return plot_learned_explorer(model, prompts, title, dpi)
    lambdas = parse_lambdas(" ".join(str(float(v)) for v in lambdas)) if not isinstance(lambdas, str) else parse_lambdas(lambdas)
    timesteps, sigmas, t_label = timestep_axis(model)
    scan = delta_norm_axis(model)
    base = float(model.config.delta_embed_normalization)
    delta_norms = [m * base for m in DELTA_NORM_MULTIPLES] if delta_norms is None else [float(v) for v in delta_norms]
    factor = anchored_factor(model, sigmas)
    grids = {lam: w_grid(model, timesteps, scan, lam) for lam in lambdas}
    lines = {(lam, d): w_grid(model, timesteps, np.array([d]), lam)[0] for lam in lambdas for d in delta_norms}
    vmin = min(g.min() for g in grids.values())
    vmax = max(g.max() for g in grids.values())

    columns = max(len(delta_norms), min(len(lambdas), 4))
    heat_rows = -(-len(lambdas) // columns)
    fig = _figure(3.4 * columns, 2.9 * (2 + heat_rows), dpi)
    fig.suptitle(title or _title(model), fontsize=10)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    colors = [cmap(x) for x in np.linspace(0.0, 0.9, len(lambdas))]
    grid = fig.add_gridspec(2 + heat_rows, columns)
    for row, (name, unit) in enumerate((("omega = w * k_train", "CFG scale"), ("w", "CFG++ units"))):
        first = None
        for i, d in enumerate(delta_norms):
            ax = fig.add_subplot(grid[row, i], sharey=first)
            first = first or ax
            for color, lam in zip(colors, lambdas):
                values = lines[(lam, d)] * factor if row == 0 else lines[(lam, d)]
                ax.plot(timesteps, values, color=color, label=f"{lam:g}")
            ax.set_xlim(timesteps[0], timesteps[-1])
            ax.set_title(f"{name}, ||delta|| = {d:g}", fontsize=9)
            ax.set_xlabel(t_label, fontsize=8)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_ylabel(f"{name}\n({unit}; same y-range across this row)", fontsize=8)
            else:
                ax.tick_params(labelleft=False)
        if row == 0:
            handles, labels = first.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title="lambda")
    image = None
    for j, lam in enumerate(lambdas):
        ax = fig.add_subplot(grid[2 + j // columns, j % columns])
        image = ax.imshow(
            grids[lam], origin="lower", aspect="auto", cmap="magma", vmin=vmin, vmax=vmax,
            extent=(timesteps[0], timesteps[-1], scan[0], scan[-1]),
        )
        ax.set_title(f"w at lambda {lam:g}", fontsize=9)
        ax.set_xlabel(t_label, fontsize=8)
        ax.set_ylabel("||delta||", fontsize=8)
    fig.colorbar(image, ax=fig.axes[2 * len(delta_norms):], shrink=0.9, label="w (CFG++ units, one scale for all heatmaps)")
    return fig


# --------------------------------------------------------------------------------------------------------------- runs


def _distinct_items(values: np.ndarray) -> list[list[int]]:
    """Batch items grouped where their curves coincide (so no legend entry names a line hidden under another)."""
    groups: list[list[int]] = []
    for b in range(values.shape[1]):
        for group in groups:
            if np.allclose(values[:, group[0]], values[:, b], rtol=1e-6, atol=1e-9, equal_nan=True):
                group.append(b)
                break
        else:
            groups.append([b])
    return groups


def plot_trace(trace: GuidanceTrace, title: str | None = None, note: str | None = None, dpi: int = 100, learned: bool = False):
    """What a sampling run applied, per step and batch item. Top: omega, the CFG-equivalent scale (ordinary CFG units,
    also under *_cfg_pp samplers). Bottom: the MLP's w (CFG++ units, solid) and the delta norm it saw (dotted, right axis).
    Steps outside the active range are shaded; ``note`` is written in red under the title (e.g. "these samples match no run").
    ``learned``: a learn_to_guide run, whose network gives the CFG scale itself (the bottom panel shows it again)."""
    fig = _figure(8.5, 6.0, dpi)
    top, bottom = fig.subplots(2, 1, sharex=True)
    fig.suptitle(title or "Annealing guidance: applied schedule", fontsize=10)
    if not trace.steps:
        for ax in (top, bottom):
            ax.text(0.5, 0.5, "no guidance steps recorded yet: run a sampler first", ha="center", va="center", transform=ax.transAxes)
        return fig
    import matplotlib

    steps = np.asarray(trace.steps)
    w, omega, norm = trace["w"], trace["omega"], trace["mlp_delta_norm"]
    active = trace["active"].astype(bool)
    cmap = matplotlib.colormaps["tab10"]
    norm_axis = bottom.twinx()
    groups = _distinct_items(np.concatenate([omega, w], axis=0))
    for index, group in enumerate(groups):
        color, b = cmap(index % 10), group[0]
        label = "items " + ", ".join(str(g) for g in group) if len(group) > 1 else f"item {b}"
        top.plot(steps, omega[:, b], color=color, marker="o", markersize=2.5, label=label)
        bottom.plot(steps, w[:, b], color=color, marker="o", markersize=2.5)
        norm_axis.plot(steps, norm[:, b], color=color, linestyle=":", alpha=0.8)
    for ax in (top, bottom):
        for s in steps[~active[:, 0]]:
            ax.axvspan(s - 0.5, s + 0.5, color="0.85", zorder=0)
        ax.grid(alpha=0.3)
        _integer_steps(ax)
    top.set_ylabel("omega: CFG-equivalent scale\n(ordinary CFG units)")
    bottom.set_ylabel("CFG scale 1 + omega from the network (solid)" if learned else "w (CFG++ units, solid)")
    norm_axis.set_ylabel("||delta|| (dotted; not read by the network)" if learned else "||delta|| seen by the MLP (dotted)")
    shaded = " (grey: outside the active range, plain CFG at the fallback scale)" if (~active).any() else ""
    bottom.set_xlabel(f"sampling step{shaded}")
    if len(groups) > 1:
        fig.legend(loc="outside right upper", fontsize=8)
    sig = trace["sigma"][:, 0]
    subtitle = f"{len(steps)} steps, sigma {sig[0]:.3g} -> {sig[-1]:.3g}, {trace.evaluations} guidance evaluations"
    top.set_title(subtitle, fontsize=9)
    if note:
        top.text(0.5, 1.16, note, transform=top.transAxes, ha="center", va="bottom", color="tab:red", fontsize=9)
    return fig
