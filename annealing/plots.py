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

from . import figure_style as style
from .lambda_rule import check_lambda
from .recorder import GuidanceTrace
from .training_grid import GridLookup, VPGrid, k_train

DEFAULT_LAMBDAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
MAX_LAMBDAS = 12
#: Delta norms of the line panels, in units of the checkpoint's delta normalisation (5, 10, 20, 30 for the SDXL checkpoint).
DELTA_NORM_MULTIPLES = (1.0, 2.0, 4.0, 6.0)
#: ``--help`` of ``python -m annealing plot --delta-norms``: what the explorer draws by default, from the constant it uses.
DELTA_NORMS_HELP = ("comma-separated delta norms for the line plots (default: "
                    + ", ".join(f"{m:g}" for m in DELTA_NORM_MULTIPLES[:-1]) + f" and {DELTA_NORM_MULTIPLES[-1]:g} x the checkpoint's "
                    "delta normalisation)")


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
    style.save_png(fig, path)


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
    return f"{source}: {meta.model_family}, δ in {meta.prediction_space} space, trained on a {meta.training_grid.describe()}"


def _timestep_ticks(ax, timesteps: np.ndarray) -> None:
    """Both ends labelled (the noisiest timestep too), three ticks between; noisiest on the left, as sampling runs."""
    ax.set_xlim(timesteps[0], timesteps[-1])
    start, end = float(timesteps[0]), float(timesteps[-1])
    ticks = np.linspace(start, end, 5)
    if start > 10:  # index-like: round the inner ticks (999, 750, 500, 250, 0)
        ticks[1:-1] = np.round(ticks[1:-1] / 50) * 50
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])


def sampling_axis_label(t_label: str) -> str:
    """The timestep axis' label, with the direction sampling runs in."""
    return f"{t_label}, sampling runs →"


def embedding_periods(model) -> list[float]:
    """Periods in ||delta|| of the MLP's cosine features of the delta norm: it reads cos(k ||delta|| / norm), k = 1 .. d-1."""
    config = model.config
    return [2 * np.pi * float(config.delta_embed_normalization) / k for k in range(1, config.delta_embed_dim)]


@torch.no_grad()
def learned_scale(model, prompt: torch.Tensor, sigmas: np.ndarray) -> np.ndarray:
    """A learn_to_guide checkpoint's CFG scale 1 + omega(t, s, prompt) at each sigma, s the training grid's next point (the
    steps of a sampler on that grid: a checkpoint trained on continuous (s, t) gives other scales at other step counts)."""
    lookup = GridLookup(model.metadata.training_grid, model.metadata.timestep_convention)
    timestep, _, next_timestep = lookup(torch.from_numpy(np.asarray(sigmas, dtype=np.float32)))
    return (1.0 + model(timestep, next_timestep, prompt.reshape(1, -1))).cpu().numpy()


def plot_learned_explorer(model, prompts: dict | None = None, title: str | None = None, dpi: int = style.DPI):
    """A learn_to_guide checkpoint: its CFG scale 1 + omega for the step from each timestep to the training grid's next point,
    one line per prompt embedding in ``prompts`` (label -> (P,) tensor); without prompts, the zero embedding, said so."""
    timesteps, sigmas, t_label = timestep_axis(model)
    config = model.config
    if not prompts:
        prompts = {"zero embedding (no prompt given; the scale depends on the prompt)": torch.zeros(config.prompt_dim)}
    fig = style.new_figure(9.0, 5.4, dpi)
    ax = fig.add_subplot(1, 1, 1)
    style.suptitle(fig, title or _title(model))
    colours = style.series_colours(len(prompts))
    handles = []
    for colour, (label, prompt) in zip(colours, prompts.items()):
        handles += ax.plot(timesteps, learned_scale(model, prompt, sigmas), color=colour, linewidth=2, label=label)
    _timestep_ticks(ax, timesteps)
    ax.set_xlabel(sampling_axis_label(t_label))
    ax.set_ylabel("CFG scale 1 + ω(t, s, prompt)")
    ax.set_title(f"Learn to Guide: the CFG scale of the step from t to the training grid's next point s\n"
                 f"(the prompt read as its {config.prompt_embedding} embedding, {config.prompt_dim} wide)")
    style.style_axes(ax)
    style.legend_below(fig, handles, [h.get_label() for h in handles], ncol=1)
    style.finish(fig)
    return fig


def _heat_columns(count: int) -> int:
    """Heatmap columns: 3 or 4, whichever leaves fewer empty panels (fewer rows on a tie)."""
    if count <= 4:
        return count
    return min((4, 3), key=lambda c: (-(-count // c) * c - count, -(-count // c)))


def plot_model_explorer(model, lambdas=DEFAULT_LAMBDAS, delta_norms=None, title: str | None = None, dpi: int = style.DPI,
                        prompts=None):
    """Row 1: omega = w * k_train (ordinary CFG units) against timestep, one panel per delta norm, one line per lambda.
    Row 2: w (CFG++ units), same panels; each row shares its y-range. Below: heatmaps of w over (timestep, delta norm),
    one per lambda, on one colour scale. Returns a matplotlib Figure.
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

    columns = len(delta_norms)
    heat_columns = _heat_columns(len(lambdas))
    heat_rows = -(-len(lambdas) // heat_columns)
    fig = style.new_figure(style.MAX_WIDTH_IN, 6.4 + 2.75 * heat_rows, dpi)
    style.suptitle(fig, title or _title(model))
    top, bottom = fig.subfigures(2, 1, height_ratios=[6.0, 0.4 + 2.75 * heat_rows])
    style.suptitle(top, f"The scale per λ at {len(delta_norms)} delta norms (one y-range per row); the noisiest timestep on the "
                   "left: sampling runs left to right", style.LABEL_PT)
    colours = style.sequential_colours(len(lambdas))
    line_axes = top.subplots(2, columns, sharex=True, sharey="row", squeeze=False)
    for row, (name, unit) in enumerate((("ω = w · k_train", "CFG scale"), ("w", "CFG++ units"))):
        for i, d in enumerate(delta_norms):
            ax = line_axes[row, i]
            for colour, lam in zip(colours, lambdas):
                values = lines[(lam, d)] * factor if row == 0 else lines[(lam, d)]
                ax.plot(timesteps, values, color=colour, linewidth=1.8, label=f"λ = {lam:g}")
            _timestep_ticks(ax, timesteps)
            ax.set_title(f"{name.split(' ')[0]} at ‖δ‖ = {d:g}")
            if row == 1:
                ax.set_xlabel(t_label)
            if i == 0:
                ax.set_ylabel(f"{name} ({unit})")
            style.style_axes(ax)
    handles, labels = line_axes[0, 0].get_legend_handles_labels()
    style.legend_below(top, handles, labels, ncol=min(len(lambdas), 6))

    heading = "w over (timestep, ‖δ‖), one colour scale."
    periods = [f"{p:.3g}" for p in embedding_periods(model)]
    if periods:  # what the bands are, so nobody reads them as noise or as a plotting artefact
        every = " and ".join([", ".join(periods[:-1]), periods[-1]]) if len(periods) > 1 else periods[0]
        heading += (f" The horizontal bands are the MLP's own: it reads ‖δ‖ through cos(k·‖δ‖/{base:g}) for k = 1 to "
                    f"{len(periods)}, which repeat every {every} in ‖δ‖")
    style.suptitle(bottom, heading, style.LABEL_PT)
    heat_axes = bottom.subplots(heat_rows, heat_columns, squeeze=False).reshape(-1)
    image = None
    for ax, lam in zip(heat_axes, lambdas):
        image = ax.imshow(grids[lam], origin="lower", aspect="auto", cmap="magma", vmin=vmin, vmax=vmax,
                          extent=(timesteps[0], timesteps[-1], scan[0], scan[-1]))
        ax.set_title(f"w at λ = {lam:g}")
        _timestep_ticks(ax, timesteps)
        ax.set_xlabel(t_label)
        ax.set_ylabel("‖δ‖")
        style.style_axes(ax, grid=False)
    for ax in heat_axes[len(lambdas):]:
        ax.set_axis_off()
    bar = bottom.colorbar(image, ax=list(heat_axes), shrink=0.95, label="w (CFG++ units)")
    style.style_axes(bar.ax, grid=False)
    style.finish(fig)
    return fig


# --------------------------------------------------------------------------------------------------------------- runs


def _distinct_items(values: np.ndarray) -> list[list[int]]:
    """Batch items grouped where their curves are the same (so no legend entry names a line hidden under another)."""
    groups: list[list[int]] = []
    for b in range(values.shape[1]):
        for group in groups:
            if np.allclose(values[:, group[0]], values[:, b], rtol=1e-6, atol=1e-9, equal_nan=True):
                group.append(b)
                break
        else:
            groups.append([b])
    return groups


#: Curves closer than this fraction of their panel's range at every step are drawn over each other: the legend says so.
COINCIDE_FRACTION = 0.01
TRACE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _coinciding(panels: list[np.ndarray], groups: list[list[int]]) -> dict[int, int]:
    """For each group (by index) whose curves lie within COINCIDE_FRACTION of an earlier group's in every panel, that group."""
    under = {}
    for j in range(1, len(groups)):
        for i in range(j):
            close = True
            for values in panels:
                finite = values[np.isfinite(values)]
                spread = float(finite.max() - finite.min()) if finite.size else 0.0
                diff = np.abs(values[:, groups[j][0]] - values[:, groups[i][0]])
                if spread > 0 and np.nanmax(diff) > COINCIDE_FRACTION * spread:
                    close = False
                    break
            if close:
                under[j] = i
                break
    return under


def _item_name(group: list[int]) -> str:
    return "items " + ", ".join(str(g) for g in group) + " (identical)" if len(group) > 1 else f"item {group[0]}"


def plot_trace(trace: GuidanceTrace, title: str | None = None, note: str | None = None, dpi: int = style.DPI, learned: bool = False):
    """What a sampling run applied, per step and batch item. Top: omega, the CFG-equivalent scale (ordinary CFG units,
    also under *_cfg_pp samplers). Bottom: the MLP's w (CFG++ units, solid) and the delta norm it saw (dotted, right axis).
    Steps outside the active range are shaded; ``note`` is written in red above the plot (e.g. "these samples match no run").
    ``learned``: a learn_to_guide run, whose network gives the CFG scale itself (the bottom panel shows it again).
    Every batch item stays visible: each has its own colour, marker and line width (the first drawn widest), and the legend
    says which items are identical or lie within 1 % of the axis of another."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig = style.new_figure(9.0, 7.0, dpi)
    top, bottom = fig.subplots(2, 1, sharex=True)
    style.suptitle(fig, title or "Annealing guidance: applied schedule")
    top.set_ylabel("ω: CFG-equivalent scale\n(ordinary CFG units)")
    bottom.set_ylabel("CFG scale 1 + ω (network)" if learned else "w chosen by the MLP\n(CFG++ units)")
    bottom.set_xlabel("sampling step")
    if not trace.steps:
        for ax in (top, bottom):
            ax.text(0.5, 0.5, "no guidance steps recorded yet: run a sampler first", ha="center", va="center", transform=ax.transAxes,
                    fontsize=style.LABEL_PT)
            style.style_axes(ax)
        style.finish(fig)
        return fig

    steps = np.asarray(trace.steps)
    w, omega, norm = trace["w"], trace["omega"], trace["mlp_delta_norm"]
    active = trace["active"].astype(bool)
    norm_axis = bottom.twinx()
    groups = _distinct_items(np.concatenate([omega, w], axis=0))
    under = _coinciding([omega, w], groups)
    many = len(groups) > len(TRACE_MARKERS)
    colours = style.sequential_colours(len(groups)) if many else style.series_colours(len(groups))
    handles = []
    # about 25 markers a line at most, each item's on its own steps (so coinciding items show all their markers)
    every = max(-(-len(steps) // 25), 1 if len(steps) <= 30 or many else len(groups))
    for index, group in enumerate(groups):
        b = group[0]
        look = {"color": colours[index], "linewidth": 1.5 if many else max(1.2, 2.8 - 0.8 * index),
                "marker": None if many else TRACE_MARKERS[index], "markersize": max(3.5, 6.0 - 1.0 * index),
                "markevery": (index % every, every)}  # staggered, so coinciding items show their markers side by side
        name = _item_name(group)
        if index in under:
            name += f" (within 1 % of {_item_name(groups[under[index]]).split(' (')[0]}: drawn over it)"
        handles += top.plot(steps, omega[:, b], label=name, zorder=2 + index, **look)
        bottom.plot(steps, w[:, b], label=name, zorder=2 + index, **look)
        norm_axis.plot(steps, norm[:, b], color=colours[index], linestyle=":", linewidth=1.6, alpha=0.9, label=name)
    inactive = steps[~active[:, 0]]
    for ax in (top, bottom):
        for s in inactive:
            ax.axvspan(s - 0.5, s + 0.5, color="0.88", zorder=0)
        style.style_axes(ax)
        _integer_steps(ax)
    norm_axis.set_ylabel("‖δ‖ (dotted; not read by the network)" if learned else "‖δ‖ seen by the MLP (dotted)")
    style.style_axes(norm_axis, grid=False)
    sig = trace["sigma"][:, 0]
    top.set_title(f"{len(steps)} steps, sigma {sig[0]:.3g} → {sig[-1]:.3g}, {trace.evaluations} guidance evaluations")
    if note:  # above the axes title, in the layout
        top.annotate(note, xy=(0.5, 1.0), xycoords="axes fraction", xytext=(0, 8 + 1.5 * style.TITLE_PT), textcoords="offset points",
                     ha="center", va="bottom", color=style.PALETTE["vermillion"], fontsize=style.LABEL_PT)
    labels = [h.get_label() for h in handles]
    solid = "CFG scale from the network" if learned else "w"
    handles += [Line2D([], [], color="0.2", linewidth=2), Line2D([], [], color="0.2", linewidth=1.6, linestyle=":")]
    labels += [f"solid: {solid} (left axis)", "dotted: ‖δ‖ (right axis)"]
    if len(inactive):
        handles.append(Patch(color="0.88"))
        labels.append("grey: outside the active range (plain CFG at the fallback scale)")
    style.legend_below(fig, handles, labels, ncol=6 if many else 2 if len(labels) > 3 else len(labels))
    style.finish(fig)
    _note_panel_coincidence(fig, [(top, omega), (bottom, w)], groups, under, steps)
    return fig


def _note_panel_coincidence(fig, panels, groups: list[list[int]], under: dict[int, int], steps: np.ndarray) -> None:
    """Items whose curves lie within COINCIDE_FRACTION of each other in one panel only (the legend speaks for those that
    do in every panel) are named in that panel, next to their curves, or else in its title."""
    if len(groups) > len(TRACE_MARKERS):
        return
    notes = []
    for ax, values in panels:
        sets: dict[int, set[int]] = {}
        for j, i in _coinciding([values], groups).items():
            root = next((r for r, members in sets.items() if i in members), i)
            sets.setdefault(root, {root}).update({i, j})
        said = [{j, i} for j, i in under.items()]  # pairs the legend already names
        for members in sets.values():
            if members in said:
                continue
            names = sorted(g for m in members for g in groups[m])
            notes.append((ax, values[:, groups[min(members)][0]], f"items {', '.join(str(n) for n in names)} lie within 1 % "
                                                                   "of each other here"))
    if not notes:
        return
    fig.canvas.draw()
    fig.set_layout_engine("none")  # placed in pixels: nothing may move afterwards
    for ax, curve, text in notes:
        tries = [len(steps) // 3, len(steps) // 2, 2 * len(steps) // 3, len(steps) // 6, 5 * len(steps) // 6]
        if all(style.place_labels(ax, [style.Label(steps[i], curve[i], text, "0.25", style.LEGEND_PT)]) for i in tries):
            title = ax.get_title()
            ax.set_title(f"{title}; {text}" if title else text, fontsize=style.TITLE_PT)
