"""Pictures of a checkpoint and of a sampling run (matplotlib, object API only: no pyplot global state, safe in a server).

* :func:`plot_model_explorer`: how a checkpoint behaves: w against timestep for several lambdas at a few delta norms,
  and a heatmap of w over (timestep, delta norm) per lambda.
* :func:`plot_trace`: what a sampling run applied: w per batch item and step, the delta norm on a second axis, and the
  CFG-equivalent scale w * k that an ordinary sampler saw.
* :func:`figure_to_image` / :func:`save_figure`: an (H, W, 3) float array in [0, 1] or a PNG written atomically.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .guidance import GuidanceTrace

DEFAULT_LAMBDAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


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


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a PNG through a temporary file, so an interrupted run leaves no half-written image."""
    from .checkpoint import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def timestep_axis(model) -> tuple[np.ndarray, str]:
    """Timesteps to scan and an axis label, in the checkpoint's convention (noisiest on the left, like sampling)."""
    convention = model.metadata.timestep_convention if model.metadata is not None else "ddpm_index"
    if convention == "sigma":
        return np.linspace(1.0, 0.0, 101), "timestep (flow sigma)"
    if convention == "sigma_x1000":
        return np.linspace(1000.0, 0.0, 101), "timestep (flow sigma x 1000)"
    return np.linspace(999.0, 0.0, 101), "timestep (DDPM index)"


def delta_norm_axis(model, points: int = 81) -> np.ndarray:
    """Delta norms to scan: 0 .. 8 x the checkpoint's normalisation (0 .. 40 for the released SDXL checkpoint)."""
    return np.linspace(0.0, 8.0 * float(model.config.delta_embed_normalization), points)


@torch.no_grad()
def w_grid(model, timesteps: np.ndarray, delta_norms: np.ndarray, lam: float) -> np.ndarray:
    """w over the grid, shape (len(delta_norms), len(timesteps))."""
    t, d = np.meshgrid(timesteps, delta_norms)
    w = model(torch.from_numpy(t.ravel()).float(), torch.from_numpy(d.ravel()).float(), float(lam))
    return w.detach().cpu().numpy().reshape(d.shape)


def _title(model) -> str:
    meta = model.metadata
    source = os.path.basename(getattr(model, "source_path", "") or "") or "guidance model"
    if meta is None:
        return source
    return f"{source}  ({meta.model_family}, {meta.prediction_space}, {meta.timestep_convention})"


def plot_model_explorer(model, lambdas=DEFAULT_LAMBDAS, delta_norms=None, title: str | None = None, dpi: int = 100):
    """Top row: w against timestep, one panel per delta norm, one line per lambda. Bottom row: heatmaps of
    w over (timestep, delta norm), one per lambda. Returns a matplotlib Figure."""
    lambdas = [float(v) for v in lambdas]
    if not lambdas:
        raise ValueError("lambdas: give at least one value")
    for lam in lambdas:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lambdas: every value must be in [0, 1], got {lam}")
    timesteps, t_label = timestep_axis(model)
    scan = delta_norm_axis(model)
    if delta_norms is None:
        base = float(model.config.delta_embed_normalization)
        delta_norms = (0.2 * base, base, 2.0 * base, 4.0 * base)
    delta_norms = [float(v) for v in delta_norms]
    grids = {lam: w_grid(model, timesteps, scan, lam) for lam in lambdas}
    lines = {(lam, d): w_grid(model, timesteps, np.array([d]), lam)[0] for lam in lambdas for d in delta_norms}
    vmin = min(g.min() for g in grids.values())
    vmax = max(g.max() for g in grids.values())

    columns = max(len(delta_norms), min(len(lambdas), 4))
    heat_rows = -(-len(lambdas) // columns)
    fig = _figure(3.4 * columns, 3.0 * (1 + heat_rows), dpi)
    fig.suptitle(title or _title(model), fontsize=11)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    colors = [cmap(x) for x in np.linspace(0.0, 0.9, len(lambdas))]
    grid = fig.add_gridspec(1 + heat_rows, columns)
    for i, d in enumerate(delta_norms):
        ax = fig.add_subplot(grid[0, i])
        for color, lam in zip(colors, lambdas):
            ax.plot(timesteps, lines[(lam, d)], color=color, label=f"lambda {lam:g}")
        ax.set_xlim(timesteps[0], timesteps[-1])
        ax.set_title(f"||delta|| = {d:g}", fontsize=10)
        ax.set_xlabel(t_label)
        ax.set_ylabel("w (CFG++ units)")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    image = None
    for j, lam in enumerate(lambdas):
        ax = fig.add_subplot(grid[1 + j // columns, j % columns])
        image = ax.imshow(
            grids[lam], origin="lower", aspect="auto", cmap="magma", vmin=vmin, vmax=vmax,
            extent=(timesteps[0], timesteps[-1], scan[0], scan[-1]),
        )
        ax.set_title(f"w at lambda {lam:g}", fontsize=10)
        ax.set_xlabel(t_label)
        ax.set_ylabel("||delta||")
    fig.colorbar(image, ax=fig.axes[len(delta_norms):], shrink=0.9, label="w")
    return fig


def plot_trace(trace: GuidanceTrace, title: str | None = None, dpi: int = 100):
    """What a sampling run applied, per step and batch item. Top: w (solid, left axis) and the delta norm the MLP saw
    (dotted, right axis). Bottom: the CFG-equivalent scale w * k (ordinary CFG units, also under *_cfg_pp samplers).
    Steps outside the active range are shaded."""
    fig = _figure(8.0, 6.0, dpi)
    top, bottom = fig.subplots(2, 1, sharex=True)
    fig.suptitle(title or "Annealing guidance: applied schedule", fontsize=11)
    if not trace.steps:
        for ax in (top, bottom):
            ax.text(0.5, 0.5, "no guidance steps recorded yet: run a sampler first", ha="center", va="center", transform=ax.transAxes)
        return fig
    import matplotlib

    steps = np.asarray(trace.steps)
    w, cfg_scale, norm = trace["w"], trace["cfg_scale"], trace["mlp_delta_norm"]
    active = trace["active"].astype(bool)
    batch = w.shape[1]
    cmap = matplotlib.colormaps["tab10"]
    norm_axis = top.twinx()
    for b in range(batch):
        color = cmap(b % 10)
        label = f"item {b}" if batch > 1 else "w"
        top.plot(steps, w[:, b], color=color, marker="o", markersize=2.5, label=label)
        norm_axis.plot(steps, norm[:, b], color=color, linestyle=":", alpha=0.8)
        bottom.plot(steps, cfg_scale[:, b], color=color, marker="o", markersize=2.5)
    for ax in (top, bottom):
        for s in steps[~active[:, 0]]:
            ax.axvspan(s - 0.5, s + 0.5, color="0.85", zorder=0)
        ax.grid(alpha=0.3)
    top.set_ylabel("w (CFG++ units, solid)")
    norm_axis.set_ylabel("||delta|| seen by the MLP (dotted)")
    bottom.set_ylabel("CFG-equivalent scale w * k")
    shaded = " (grey: outside the active range, fallback CFG)" if (~active).any() else ""
    bottom.set_xlabel(f"sampling step{shaded}")
    top.legend(fontsize=8, loc="upper left", ncol=min(batch, 4))
    sig = trace["sigma"][:, 0]
    top.set_title(f"{len(steps)} steps, sigma {sig[0]:.3g} -> {sig[-1]:.3g}, {trace.evaluations} guidance evaluations", fontsize=9)
    return fig
