"""Writing the benchmark's results: results.json, results.md (the table) and four plots, all atomically, in the pack's
figure style (:mod:`annealing.figure_style`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from annealing import figure_style as style
from annealing.atomic_write import atomic_write

from .metrics import HIGHER_IS_BETTER, METRICS
from .problem import RingProblem

COLUMN_TITLES = {"sw": "SW2 ↓", "mmd": "MMD²×10³ ↓", "off": "off-manifold ↓", "align": "alignment ↑", "coverage": "mode coverage ↑"}
#: The settings shown in the sample scatter (family, param); missing ones (quick mode) are skipped.
SCATTER_PICKS = [
    ("exact", None), ("CFG", 1.0), ("CFG", 3.0), ("CFG", 8.0), ("CFG++", 0.2), ("CFG++", 1.0), ("annealing", 0.0),
    ("annealing", 0.4), ("annealing", 1.0), ("TV-CFG", 3.0), ("ADG", 3.0), ("APG", 3.0), ("interval", 3.0), ("learn-to-guide", None),
]
#: One colour per class, from the colour-blind-safe palette.
CLASS_COLOURS = [style.PALETTE[name] for name in ("blue", "orange", "bluish green", "reddish purple", "vermillion", "sky blue")]
#: What each family's point labels are (the parameter its sweep varies).
PARAM_SYMBOL = {"CFG": "w", "CFG++": "w", "annealing": "λ", "TV-CFG": "w̄", "ADG": "w", "APG": "w", "interval": "w"}


def _fmt(summary: dict, metric: str) -> str:
    digits = {"sw": 3, "mmd": 1, "off": 3, "align": 4, "coverage": 2}[metric]
    mean, std = summary["mean"], summary["std"]
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _setting(row: dict) -> str:
    return "" if row["param"] is None or row["family"] == "learn-to-guide" else f"{row['param_name']}={row['param']:g}"


def main_table(results: dict) -> list[str]:
    """The results table: one row per method setting, mean ± std over seeds of every metric."""
    lines = [
        "| method | setting | " + " | ".join(COLUMN_TITLES[m] for m in METRICS) + " |",
        "|---|---|" + "---:|" * len(METRICS),
    ]
    for row in results["methods"]:
        cells = [_fmt(row["metrics"][m], m) for m in METRICS]
        lines.append(f"| {row['family']} | {_setting(row)} | " + " | ".join(cells) + " |")
    return lines


def study_cell(summary: dict) -> tuple[float, float]:
    return summary["sw"]["mean"], summary["align"]["mean"]


def step_table(results: dict) -> list[str]:
    """The step-count study: one row per (setting, reading), one column per step count, cells "SW2 / alignment" (means
    over seeds). Empty when the run had no study."""
    study = results.get("step_study") or {}
    counts = study.get("step_counts") or []
    if not counts or not study.get("rows"):
        return []
    cells: dict[tuple, dict[int, dict]] = {}
    for row in study["rows"]:
        cells.setdefault((row["family"], row["param_name"], row["param"], row["mode"]), {})[row["steps"]] = row["metrics"]
    settings = list(dict.fromkeys(key[:3] for key in cells))  # setting by setting, each reading beside the other
    keys = sorted(cells, key=lambda key: (settings.index(key[:3]), study["modes"].index(key[3])))
    marked = [f"{n} steps" + (" (training grid)" if n == study["training_steps"] else "") for n in counts]
    lines = ["| method | setting | reading | " + " | ".join(marked) + " |", "|---|---|---|" + "---:|" * len(counts)]
    for family, name, param, mode in keys:
        by_steps, values = cells[(family, name, param, mode)], []
        for n in counts:
            sw, align = study_cell(by_steps[n])
            values.append(f"{sw:.3f} / {align:.3f}")
        lines.append(f"| {family} | {name}={param:g} | {mode} | " + " | ".join(values) + " |")
    return lines


def markdown_table(results: dict) -> str:
    """results.md: the results table and, when the run had one, the step-count study."""
    config = results["config"]
    lines = [
        f"Ring problem {config['problem']}; {config['sampling_steps']} DDIM steps; {config['samples_per_class']} samples per class; "
        f"seeds {config['seeds']} (mean ± std over seeds).",
        "",
        *main_table(results),
    ]
    study = step_table(results)
    if study:
        steps = results["step_study"]["training_steps"]
        lines += [
            "",
            f"Step counts: w in CFG++ units on the {steps}-step training grid, sampled by plain DDIM at other step counts. "
            f"anchored = CFG scale w * k_train(sigma) of the {steps}-step grid; per_step = the CFG++ step at that step count. "
            "Cells: SW2 ↓ / alignment ↑ (means over seeds).",
            "",
            *study,
        ]
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    style.save_png(fig, path)


def _family_rows(results: dict) -> dict[str, list[dict]]:
    by_family: dict[str, list[dict]] = {}
    for row in results["methods"]:
        by_family.setdefault(row["family"], []).append(row)
    return by_family


#: Points of one family closer than this on screen share a label ("0–0.8"), since separate labels could not be told apart.
LABEL_MERGE_PX = 9


def _sweep_labels(ax, family: str, rows: list[dict], xs, ys, colour) -> list:
    """The labels of one family's points (its parameter values), neighbours on screen merged into one label."""
    pixels = ax.transData.transform(np.column_stack([xs, ys]))
    clusters: list[list[int]] = []
    for i, point in enumerate(pixels):
        near = [c for c in clusters if np.abs(pixels[c[-1]] - point).max() < LABEL_MERGE_PX]
        (near[0].append(i) if near else clusters.append([i]))
    labels = []
    for cluster in clusters:
        names = [f"{rows[i]['param']:g}" for i in cluster]
        text = names[0] if len(names) == 1 else f"{names[0]}–{names[-1]}" if cluster == list(range(cluster[0], cluster[-1] + 1)) \
            else ", ".join(names)
        first = cluster[0]
        labels.append(style.Label(xs[first], ys[first], text, colour))
    return labels


def plot_front(results: dict, path: Path) -> None:
    """Alignment against the two fidelity measures, one line per method family (means over seeds), every point labelled
    with its setting where there is room for the label; the legend lists those that found none."""
    by_family = _family_rows(results)
    seeds = len(results["config"]["seeds"])
    fig = style.new_figure(11.0, 11.0)
    axes = fig.subplots(2, 1)
    style.suptitle(fig, f"Alignment against fidelity on the 2D ring (means over {seeds} seeds). Point labels: each method's setting "
                        "(its w, w̄ or λ), in the method's colour")
    panels = ((axes[0], "sw", "sliced Wasserstein-2 to p(x | c)  (lower = more faithful)"),
              (axes[1], "off", "fraction of samples off the data manifold, log scale  (lower = better)"))
    lines: dict[tuple, object] = {}
    for ax, metric, title in panels:
        if metric == "off":
            ax.set_xscale("log")
        for family, rows in by_family.items():
            colour, marker = style.family_style(family)
            xs = [max(r["metrics"][metric]["mean"], 1e-3) if metric == "off" else r["metrics"][metric]["mean"] for r in rows]
            ys = [r["metrics"]["align"]["mean"] for r in rows]
            symbol = PARAM_SYMBOL.get(family)
            name = f"{family} (labels: {symbol})" if symbol and len(rows) > 1 else family
            (lines[(metric, family)],) = ax.plot(xs, ys, marker=marker, color=colour, label=name, linestyle="-" if len(rows) > 1 else "none",
                                                 markersize=13 if marker == "*" else 6.5, linewidth=1.4,
                                                 markeredgecolor="black" if colour in style.LIGHT else "white", markeredgewidth=0.6)
        ax.margins(x=0.06, y=0.08)
        ax.set_xlabel(title)
        ax.set_ylabel("alignment: mean p(c | x)\n(higher = better)")
        style.style_axes(ax)
    handles = [lines[("sw", family)] for family in by_family]
    legend = style.legend_below(fig, handles, [h.get_label() for h in handles], ncol=4)
    fig.canvas.draw()
    fig.set_layout_engine("none")  # the label spots are worked out in pixels: the axes must not move afterwards
    missing: dict[str, list[str]] = {}
    order = ["annealing", "CFG", "CFG++", "TV-CFG", "interval", "ADG", "APG"]  # the most crowded first
    for ax, metric, _ in panels:
        zoomed = _zoom_crowded_family(ax, lines, metric, by_family)
        avoid = [zoomed[1].get_tightbbox().padded(4)] if zoomed else []
        for family in [f for f in order if f in by_family and len(by_family[f]) > 1]:
            line = lines[(metric, family)]
            xs, ys = line.get_data()
            labels = _sweep_labels(ax, family, by_family[family], list(xs), list(ys), line.get_color())
            if zoomed and zoomed[0] == family:  # one label here; the zoom names every point
                labels = [style.Label(xs[0], ys[0], f"{PARAM_SYMBOL[family]} {by_family[family][0]['param']:g}–"
                                      f"{by_family[family][-1]['param']:g}, see the zoom", line.get_color())]
            for label in style.place_labels(ax, labels, avoid_boxes=avoid):
                missing.setdefault(family, []).append(label.text)
    if missing:  # said in the legend, so no point goes unnamed
        for handle, text in zip(handles, legend.get_texts()):
            family = next(f for f in by_family if lines[("sw", f)] is handle)
            if family in missing:
                text.set_text(f"{handle.get_label()}; unlabelled where crowded: {', '.join(dict.fromkeys(missing[family]))}")
                handle.set_label(text.get_text())
                for metric in ("sw", "off"):
                    lines[(metric, family)].set_label(text.get_text())
    _save(fig, path)


def _zoom_crowded_family(ax, lines: dict, metric: str, by_family: dict):
    """A zoomed inset of the first family whose points crowd into one spot (so that their labels would merge), placed where
    it hides nothing, its points labelled there; (family, inset axes), or None when no family crowds or nothing is free."""
    for family, rows in by_family.items():
        if len(rows) < 3:
            continue
        line = lines[(metric, family)]
        xs, ys = (np.asarray(v, dtype=float) for v in line.get_data())
        pixels = ax.transData.transform(np.column_stack([xs, ys]))
        gaps = np.abs(np.diff(pixels, axis=0)).max(axis=1)
        if (gaps >= LABEL_MERGE_PX).all():
            continue
        spread = pixels.max(axis=0) - pixels.min(axis=0)
        if spread.max() > 0.25 * ax.get_window_extent().width:  # a long sweep with two close points, not a crowd
            continue
        rect = style.free_rect(ax, 0.32, 0.26)
        if rect is None:
            return None
        inset = ax.inset_axes(rect)
        inset.plot(xs, ys, marker=line.get_marker(), color=line.get_color(), linewidth=1.2, markersize=7,
                   label=line.get_label())
        x_pad = max(float(np.ptp(xs)) * 0.25, 1e-3)
        inset.set_xlim(xs.min() - x_pad, xs.max() + x_pad)
        symbol = PARAM_SYMBOL.get(family, "setting")
        flat = float(np.ptp(ys)) < 1e-3
        if flat:  # the points share their alignment: say it, and spend the inset's height on the labels
            inset.set_ylim(ys.mean() - 1, ys.mean() + 1)
            inset.set_yticks([])
            inset.set_title(f"zoom: {family}\nalignment {ys.mean():.3f} at every {symbol}")
        else:
            y_pad = float(np.ptp(ys)) * 0.5
            inset.set_ylim(ys.min() - y_pad, ys.max() + y_pad)
            inset.set_ylabel("alignment")
            inset.locator_params(axis="y", nbins=3)
            inset.set_title(f"zoom: {family}, labels {symbol}")
        inset.set_xlabel(ax.get_xlabel().split("  (")[0].replace(", log scale", ""))
        inset.locator_params(axis="x", nbins=4)
        style.style_axes(inset)
        inset.set_facecolor("white")
        _outline_points(ax, pixels)
        ax.figure.canvas.draw()
        labels = [style.Label(x, y, f"{r['param']:g}", line.get_color()) for x, y, r in zip(xs, ys, rows)]
        if style.place_labels(inset, labels):  # too crowded even zoomed: say the values in the title instead
            inset.set_title(f"zoom: {family}, {symbol} from {rows[0]['param']:g} to {rows[-1]['param']:g}")
        return family, inset
    return None


def _outline_points(ax, pixels: np.ndarray, pad: float = 9.0) -> None:
    """A grey frame around points (display pixels): what the zoom shows (no connector lines: they would cross the data)."""
    from matplotlib.patches import Rectangle

    (x0, y0), (x1, y1) = pixels.min(axis=0) - pad, pixels.max(axis=0) + pad
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, transform=None, fill=False, edgecolor="0.4", linewidth=1.0, zorder=1))


def _class_legend(target, problem: RingProblem, **kwargs) -> None:
    """A legend of the class colours on ``target`` (a figure or an axes)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=CLASS_COLOURS[c % len(CLASS_COLOURS)], marker="o", linestyle="none", markersize=8)
               for c in range(problem.num_classes)]
    title = f"colour = intended class\n(each owns an arc of {problem.modes_per_class}\nof the {problem.num_modes} modes)"
    target.legend(handles, [f"class {c}" for c in range(problem.num_classes)], title=title, fontsize=style.LEGEND_PT,
                  title_fontsize=style.LEGEND_PT, frameon=False, **kwargs)


def _scatter_limit(samples: dict, rows: list[dict], base: float = 1.9) -> float:
    """Half-width of the scatter panels: the ring's, or wider so that no shown cluster is cut by the border."""
    reach = max(float(samples[r["label"]].double().abs().amax(dim=1).quantile(0.999)) for r in rows)
    return max(base, 1.08 * reach)


def plot_samples(results: dict, problem: RingProblem, path: Path, per_class: int = 250) -> None:
    """Samples of the first seed for a few settings over the true density (grey: p(x), the ring)."""
    samples, labels = results["_samples"], results["_labels"]
    picks = []
    for family, param in SCATTER_PICKS:
        for row in results["methods"]:
            if row["family"] == family and (param is None or row["param"] == param):
                picks.append(row)
                break
    cols = 4
    rows_n = math.ceil(len(picks) / cols)
    fig = style.new_figure(10.4, 2.95 * rows_n + 0.9)
    axes = fig.subplots(rows_n, cols, squeeze=False).reshape(-1)
    lim = _scatter_limit(samples, picks)
    axis = torch.linspace(-lim, lim, 180, dtype=torch.float64)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    density = problem.log_density(torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)).exp().reshape(gx.shape)
    for ax, row in zip(axes, picks):
        ax.contourf(gx.numpy(), gy.numpy(), density.numpy(), levels=8, cmap="Greys", alpha=0.45)
        points = samples[row["label"]].double()
        for c in range(problem.num_classes):
            chosen = points[labels == c][:per_class]
            ax.scatter(chosen[:, 0].numpy(), chosen[:, 1].numpy(), s=3, color=CLASS_COLOURS[c % len(CLASS_COLOURS)], alpha=0.8, linewidths=0)
        m = row["metrics"]
        ax.set_title(f"{row['label']}\nalign {m['align']['mean']:.3f} · off {m['off']['mean']:.3f}", fontsize=style.TITLE_PT)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    for ax in axes[len(picks):]:
        ax.axis("off")
    per_class_shown = min(per_class, int((labels == 0).sum()))
    style.suptitle(fig, f"Samples of seed {results['config']['seeds'][0]}, {per_class_shown} per class, over the data density p(x) "
                        "(grey). align = mean p(c | x), off = fraction off the ring (both: means over seeds)")
    if len(picks) < len(axes):  # the legend in the first free panel, else under the figure
        _class_legend(axes[len(picks)], problem, loc="center")
    else:
        _class_legend(fig, problem, loc="outside lower center", ncol=problem.num_classes)
    style.finish(fig)
    _save(fig, path)


def plot_w_trajectories(results: dict, problem: RingProblem, path: Path) -> None:
    """Annealing's w(t) over all samples of the first seed, per lambda: the mean, the band 5-95 % of the samples lie in and
    their full range; below, that range (max - min over the samples) against t, one line per lambda, labelled on the line."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    traces, timesteps = results["_traces"], np.asarray(results["timesteps"], dtype=float)
    if not traces:
        return
    ordered = sorted(traces.items())
    count = ordered[0][1].shape[1]
    fig = style.new_figure(11.0, 7.6)
    grid = fig.add_gridspec(2, len(ordered), height_ratios=[1.25, 1.0])
    top = [fig.add_subplot(grid[0, i]) for i in range(len(ordered))]
    for ax in top[1:]:
        ax.sharey(top[0])
    spread_ax = fig.add_subplot(grid[1, :])
    colours = style.sequential_colours(len(ordered))
    blue = style.PALETTE["blue"]
    spread_lines = []
    for ax, colour, (lam, trace) in zip(top, colours, ordered):
        w = trace.double().numpy()  # (steps, samples)
        low, p5, p95, high = np.quantile(w, [0.0, 0.05, 0.95, 1.0], axis=1)
        ax.fill_between(timesteps, low, high, color=blue, alpha=0.18, linewidth=0, label="all samples, min to max")
        ax.fill_between(timesteps, p5, p95, color=blue, alpha=0.4, linewidth=0, label="5–95 % of the samples")
        ax.plot(timesteps, w.mean(axis=1), color="black", linewidth=1.6, label="mean")
        ax.set_title(f"λ = {lam:g}")
        ax.set_xlabel("DDPM timestep t")
        ax.set_xlim(timesteps.max() + 20, timesteps.min() - 20)  # noisiest first, as sampling runs
        style.style_axes(ax)
        (line,) = spread_ax.plot(timesteps, high - low, color=colour, linewidth=2.0, label=f"λ = {lam:g}")
        spread_lines.append((line, int(np.argmax(high - low))))
    for ax in top[1:]:
        ax.tick_params(labelleft=False)
    top[0].set_ylabel("w (CFG++ units)")
    spread_ax.set_xlim(timesteps.max() + 20, timesteps.min() - 20)
    spread_ax.set_xlabel("DDPM timestep t (sampling runs left to right)")
    spread_ax.set_ylabel("spread of w over the samples\n(max − min at each step)")
    spread_ax.set_ylim(bottom=0)
    style.style_axes(spread_ax)
    style.suptitle(fig, f"Annealing's w along the sampling trajectories of all {count} samples (seed {results['config']['seeds'][0]}, "
                        f"{results['config']['sampling_steps']} DDIM steps)")
    handles = [Line2D([], [], color="black", linewidth=1.6), Patch(color=blue, alpha=0.4), Patch(color=blue, alpha=0.18)]
    style.legend_below(fig, handles, ["mean", "5–95 % of the samples", "all samples, min to max"], ncol=3)
    fig.canvas.draw()
    fig.set_layout_engine("none")
    labels = [style.Label(line.get_xdata()[peak], line.get_ydata()[peak], line.get_label(), line.get_color()) for line, peak in spread_lines]
    unplaced = style.place_labels(spread_ax, labels)
    if unplaced:
        spread_ax.legend(handles=[line for line, _ in spread_lines], loc="upper left", fontsize=style.LEGEND_PT)
    style.finish(fig)
    _save(fig, path)


def plot_step_counts(results: dict, path: Path) -> None:
    """The step-count study: SW2 and alignment against the number of sampling steps, solid = anchored, dashed = per_step,
    error bars = the std over seeds. Series that coincide are said to, on the plot."""
    study = results.get("step_study") or {}
    if not study.get("rows"):
        return
    from matplotlib.ticker import FixedLocator, NullLocator

    counts, train = study["step_counts"], study["training_steps"]
    series: dict[tuple, list[dict]] = {}
    for row in study["rows"]:
        series.setdefault((row["family"], row["param_name"], row["param"], row["mode"]), []).append(row)
    seeds = len(results["config"]["seeds"])
    fig = style.new_figure(11.0, 5.6)
    axes = fig.subplots(1, 2)
    settings = list(dict.fromkeys(key[:3] for key in series))
    shades = {}
    for family in dict.fromkeys(f for f, _, _ in settings):  # one family, several settings: lighter to darker of its colour
        own = [s for s in settings if s[0] == family]
        base = np.array(_rgb(style.family_style(family)[0]))
        for i, setting in enumerate(own):
            shades[setting] = tuple(base * (1 - 0.45 * i / max(len(own) - 1, 1)))
    grid_label = f"training grid ({train} steps)"
    worst_std = {}
    handles = []
    coinciding = {}
    for ax, metric, label in ((axes[0], "sw", "sliced Wasserstein-2 to p(x | c)\n(lower = better)"),
                              (axes[1], "align", "alignment: mean p(c | x)\n(higher = better)")):
        drawn = []
        for (family, name, param, mode), rows in series.items():
            rows = sorted(rows, key=lambda r: r["steps"])
            anchored = mode == "anchored"
            ys = np.array([r["metrics"][metric]["mean"] for r in rows])
            errors = np.array([r["metrics"][metric]["std"] for r in rows])
            worst_std[metric] = max(worst_std.get(metric, 0.0), float(errors.max()))
            colour = shades[(family, name, param)]
            symbol = {"lambda": "λ"}.get(name, name)
            container = ax.errorbar([r["steps"] for r in rows], ys, yerr=errors, color=colour, marker="o" if anchored else "s",
                                    markersize=7 if anchored else 5, markerfacecolor=colour if anchored else "white", capsize=4,
                                    elinewidth=1.3, linestyle="-" if anchored else "--", linewidth=2.6 if anchored else 1.5,
                                    zorder=3 if anchored else 4, label=f"{family} {symbol} = {param:g}, {mode}")
            container.lines[0].set_label(container.get_label())  # the data line carries the name (legend, checks)
            drawn.append((container.lines[0], ys))
        if metric == "sw":
            handles = [line for line, _ in drawn]
        ax.axvline(train, color="0.45", linestyle=":", linewidth=1.2, label=grid_label)
        ax.annotate(grid_label, (train, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 4), textcoords="offset points",
                    ha="center", va="bottom", fontsize=style.MIN_FONT_PT, color="0.3")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(counts))  # integer ticks at the sampled step counts only
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(n) for n in counts])
        ax.set_xlabel("sampling steps (plain DDIM; log scale)")
        ax.set_ylabel(label)
        ax.margins(y=0.12)  # room above a line at the top of the range, for the note that two lines coincide
        style.style_axes(ax)
        coinciding[ax] = _coinciding_series(ax, drawn)
    style.suptitle(fig, f"The same w (CFG++ units, {train}-step training grid) at other step counts: means over {seeds} seeds, "
                        f"error bars ± one std over the seeds (at most {worst_std['sw']:.3f} in SW2, {worst_std['align']:.3f} in "
                        "alignment)")
    legend = style.legend_below(fig, handles, [h.get_label() for h in handles], ncol=2)
    fig.canvas.draw()
    fig.set_layout_engine("none")
    for ax in axes:
        for upper, lower in coinciding[ax]:  # the hidden line is named where it hides, or else in the legend
            xs, ys = upper.get_data()
            note = f"{upper.get_label().split(', ')[-1]} on {lower.get_label().split(', ')[-1]}"  # in the family's colour
            tries = sorted(range(len(xs)), key=lambda i: abs(i - len(xs) // 2))  # from the middle outwards
            if all(style.place_labels(ax, [style.Label(xs[i], ys[i], note, lower.get_color())]) for i in tries):
                for handle, text in zip(handles, legend.get_texts()):
                    if handle.get_label() == upper.get_label():
                        text.set_text(f"{upper.get_label()} (in {ax.get_ylabel().split(':')[0].split(chr(10))[0]}: on the "
                                      f"{lower.get_label().split(', ')[-1]} line)")
                        for line in (handle, upper):
                            line.set_label(text.get_text())
    style.finish(fig)
    _save(fig, path)


def _rgb(colour) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(colour)


#: Two series whose points differ by less than this fraction of the axis' range everywhere are drawn one over the other.
COINCIDE_FRACTION = 0.01


def _coinciding_series(ax, drawn) -> list[tuple]:
    """Pairs (upper, lower) of series lines that lie on each other at every step count."""
    low, high = ax.get_ylim()
    pairs = []
    for j in range(len(drawn)):
        for i in range(j):
            if np.abs(drawn[j][1] - drawn[i][1]).max() < COINCIDE_FRACTION * (high - low):
                pairs.append((drawn[j][0], drawn[i][0]))
    return pairs


def serialisable(results: dict) -> dict:
    return {k: v for k, v in results.items() if not k.startswith("_")}


def write_report(results: dict, problem: RingProblem, out_dir: Path) -> str:
    """Writes results.json, results.md, toy-front.png, toy-samples.png, toy-w-trajectories.png and (with a step-count
    study) toy-step-counts.png; returns the markdown."""
    table = markdown_table(results)
    data = serialisable(results)
    data["metrics_higher_is_better"] = HIGHER_IS_BETTER
    atomic_write(out_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))
    atomic_write(out_dir / "results.md", lambda tmp: Path(tmp).write_text(table))
    plot_front(results, out_dir / "toy-front.png")
    plot_samples(results, problem, out_dir / "toy-samples.png")
    plot_w_trajectories(results, problem, out_dir / "toy-w-trajectories.png")
    plot_step_counts(results, out_dir / "toy-step-counts.png")
    return table
