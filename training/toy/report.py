"""Writing the benchmark's results: results.json, results.md (the table) and three plots, all atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from annealing.atomic_write import atomic_write  # noqa: E402

from .metrics import HIGHER_IS_BETTER, METRICS  # noqa: E402
from .problem import RingProblem  # noqa: E402

COLUMN_TITLES = {"sw": "SW2 ↓", "mmd": "MMD²×10³ ↓", "off": "off-manifold ↓", "align": "alignment ↑", "coverage": "mode coverage ↑"}
FAMILY_STYLE = {
    "CFG": ("tab:blue", "o"), "CFG++": ("tab:orange", "s"), "annealing": ("tab:red", "D"), "TV-CFG": ("tab:green", "^"),
    "ADG": ("tab:purple", "v"), "APG": ("tab:brown", "P"), "interval": ("tab:pink", "X"), "learn-to-guide": ("tab:olive", "*"),
    "exact": ("black", "*"),
}
#: The settings shown in the sample scatter (family, param); missing ones (quick mode) are skipped.
SCATTER_PICKS = [
    ("exact", None), ("CFG", 1.0), ("CFG", 3.0), ("CFG", 8.0), ("CFG++", 0.2), ("CFG++", 1.0), ("annealing", 0.0),
    ("annealing", 0.4), ("annealing", 1.0), ("TV-CFG", 3.0), ("ADG", 3.0), ("APG", 3.0), ("interval", 3.0), ("learn-to-guide", None),
]
CLASS_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]


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
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=fig.dpi))
    plt.close(fig)


LABEL_MERGE_PX = 10
LABEL_BOX = {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.75}  # legible over lines
#: Where a point's label may go (offset in points, alignment), tried in order until it overlaps no label already drawn.
LABEL_SPOTS = [((5, -3), "left", "top"), ((-5, -3), "right", "top"), ((5, 3), "left", "bottom"), ((-5, 3), "right", "bottom"),
               ((0, -9), "center", "top"), ((0, 9), "center", "bottom")]


def _sweep_labels(ax, xs, ys, params, colour, placed: list) -> None:
    """Label a sweep's points with their parameter, inside the axes and clear of every label in ``placed`` (pixel boxes,
    extended here). Points closer than LABEL_MERGE_PX on screen share one label ("0–0.8" for a run of neighbours)."""
    renderer = ax.figure.canvas.get_renderer()
    pixels = ax.transData.transform(list(zip(xs, ys)))
    clusters: list[list[int]] = []
    for i, point in enumerate(pixels):
        near = [c for c in clusters if abs(pixels[c[-1]] - point).max() < LABEL_MERGE_PX]
        (near[0].append(i) if near else clusters.append([i]))
    frame = ax.get_window_extent(renderer)
    for cluster in clusters:
        names = [f"{params[i]:g}" for i in cluster]
        consecutive = cluster == list(range(cluster[0], cluster[-1] + 1))
        text = f"{names[0]}–{names[-1]}" if len(names) > 2 and consecutive else ", ".join(names)
        point = (xs[cluster[0]], ys[cluster[0]])
        for offset, ha, va in LABEL_SPOTS:
            label = ax.annotate(text, point, textcoords="offset points", xytext=offset, ha=ha, va=va, fontsize=7, color=colour,
                                bbox=LABEL_BOX)
            box = label.get_window_extent(renderer).padded(2)  # a gap, so "0–0.8" and "1" never read as "0–0.81"
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in placed):
                break
            label.remove()
        else:  # nowhere free: the first spot, drawn anyway
            offset, ha, va = LABEL_SPOTS[0]
            box = ax.annotate(text, point, textcoords="offset points", xytext=offset, ha=ha, va=va, fontsize=7, color=colour,
                              bbox=LABEL_BOX).get_window_extent(renderer)
        placed.append(box)


def plot_front(results: dict, path: Path) -> None:
    """Alignment against the two fidelity measures, one line per method family (means over seeds)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), dpi=90)
    by_family: dict[str, list[dict]] = {}
    for row in results["methods"]:
        by_family.setdefault(row["family"], []).append(row)
    labelled = {}
    for ax, metric, title in ((axes[0], "sw", "sliced Wasserstein-2 to p(x | c)  (lower = more faithful)"),
                              (axes[1], "off", "fraction off the data manifold, log scale  (lower = better)")):
        if metric == "off":
            ax.set_xscale("log")
        labelled[metric] = []
        for family, rows in by_family.items():
            colour, marker = FAMILY_STYLE.get(family, ("gray", "o"))
            xs = [r["metrics"][metric]["mean"] for r in rows]
            ys = [r["metrics"]["align"]["mean"] for r in rows]
            if metric == "off":
                xs = [max(x, 1e-3) for x in xs]
            ax.plot(xs, ys, marker=marker, color=colour, label=family, linestyle="-" if len(rows) > 1 else "none",
                    markersize=9 if marker == "*" else 5, linewidth=1.2)
            if family in ("annealing", "CFG"):
                labelled[metric].append((xs, ys, [r["param"] for r in rows], colour))
        ax.margins(x=0.08, y=0.06)
        ax.set_xlabel(title)
        ax.set_ylabel("alignment: mean p(c | x)  (higher = better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Alignment vs fidelity on the 2D ring (means over seeds; point labels: CFG's w in blue, annealing's lambda in red)",
                 fontsize=10)
    fig.tight_layout()
    for ax, metric in zip(axes, ("sw", "off")):  # after the layout, so the label boxes are where they will be drawn
        placed = [ax.get_legend().get_window_extent()] if ax.get_legend() else []
        for args in labelled[metric]:
            _sweep_labels(ax, *args, placed)
    _save(fig, path)


def _class_legend(target, problem: RingProblem, **kwargs) -> None:
    """A legend of the class colours on ``target`` (a figure or an axes)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=CLASS_COLOURS[c % len(CLASS_COLOURS)], marker="o", linestyle="none", markersize=6)
               for c in range(problem.num_classes)]
    title = f"colour = intended class\n(each owns an arc of {problem.modes_per_class}\nof the {problem.num_modes} modes)"
    target.legend(handles, [f"class {c}" for c in range(problem.num_classes)], title=title, fontsize=9, title_fontsize=8, **kwargs)


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
    fig, axes = plt.subplots(rows_n, cols, figsize=(2.6 * cols, 2.7 * rows_n + 0.5), dpi=80)
    axes = axes.reshape(-1)
    lim = 1.9
    axis = torch.linspace(-lim, lim, 160, dtype=torch.float64)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    density = problem.log_density(torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)).exp().reshape(gx.shape)
    for ax, row in zip(axes, picks):
        ax.contourf(gx.numpy(), gy.numpy(), density.numpy(), levels=8, cmap="Greys", alpha=0.45)
        points = samples[row["label"]].double()
        for c in range(problem.num_classes):
            chosen = points[labels == c][:per_class]
            ax.scatter(chosen[:, 0].numpy(), chosen[:, 1].numpy(), s=2, color=CLASS_COLOURS[c % len(CLASS_COLOURS)], alpha=0.7, linewidths=0)
        m = row["metrics"]
        ax.set_title(f"{row['label']}\nalign {m['align']['mean']:.3f}, off {m['off']['mean']:.3f}", fontsize=8)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    for ax in axes[len(picks):]:
        ax.axis("off")
    per_class_shown = min(per_class, int((labels == 0).sum()))
    fig.suptitle(f"Samples of seed {results['config']['seeds'][0]}, {per_class_shown} per class, over the data density p(x) (grey)\n"
                 "align = mean p(c | x), off = fraction off the ring (both: means over seeds)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    if len(picks) < len(axes):  # the legend in the first free panel, else under the figure
        _class_legend(axes[len(picks)], problem, loc="center")
    else:
        _class_legend(fig, problem, loc="lower center", ncol=problem.num_classes)
    _save(fig, path)


def plot_w_trajectories(results: dict, problem: RingProblem, path: Path, per_class: int = 3) -> None:
    """Annealing's w(t) for a few samples per lambda (first seed), coloured by class; dashed: the mean over all samples."""
    traces, labels, timesteps = results["_traces"], results["_labels"], results["timesteps"]
    if not traces:
        return
    fig, axes = plt.subplots(1, len(traces), figsize=(4 * len(traces), 3.6), dpi=80, sharey=True, squeeze=False)
    axes = list(axes[0])
    for ax, (lam, trace) in zip(axes, sorted(traces.items())):
        for c in range(problem.num_classes):
            idx = torch.nonzero(labels == c).reshape(-1)[:per_class]
            for i in idx.tolist():
                ax.plot(timesteps, trace[:, i].numpy(), color=CLASS_COLOURS[c], linewidth=1)  # opaque: colours match the legend
        ax.plot(timesteps, trace.mean(dim=1).numpy(), color="black", linestyle="--", linewidth=1.2)
        ax.set_title(f"annealing, lambda = {lam:g}", fontsize=9)
        ax.set_xlabel(f"DDPM timestep t (sampling runs left to right, {timesteps[0]:g} to {timesteps[-1]:g})", fontsize=8)
        ax.invert_xaxis()  # noisiest first, as sampling runs
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("w (CFG++ units)")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=CLASS_COLOURS[c], linewidth=1.5) for c in range(problem.num_classes)]
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1.2))
    names = [f"class {c} ({per_class} samples)" for c in range(problem.num_classes)] + [f"mean over all {labels.shape[0]} samples"]
    fig.suptitle(f"Annealing's w along sampling trajectories (seed {results['config']['seeds'][0]}, "
                 f"{results['config']['sampling_steps']} DDIM steps)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(handles, names, loc="lower center", ncol=len(handles), fontsize=8)
    _save(fig, path)


STUDY_COLOURS = {("CFG++", 0.2): "tab:orange", ("annealing", 0.0): "#f4a582", ("annealing", 0.4): "#d6604d", ("annealing", 1.0): "#67001f"}


def plot_step_counts(results: dict, path: Path) -> None:
    """The step-count study: SW2 and alignment against the number of sampling steps, solid = anchored, dashed = per_step."""
    study = results.get("step_study") or {}
    if not study.get("rows"):
        return
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator

    counts, train = study["step_counts"], study["training_steps"]
    series: dict[tuple, list[dict]] = {}
    for row in study["rows"]:
        series.setdefault((row["family"], row["param_name"], row["param"], row["mode"]), []).append(row)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=90)
    for ax, metric, label in ((axes[0], "sw", "sliced Wasserstein-2 to p(x | c)  (lower = better)"),
                              (axes[1], "align", "alignment: mean p(c | x)  (higher = better)")):
        for (family, _, param, mode), rows in series.items():
            rows = sorted(rows, key=lambda r: r["steps"])
            colour = STUDY_COLOURS.get((family, param), FAMILY_STYLE.get(family, ("gray", "o"))[0])
            ax.errorbar([r["steps"] for r in rows], [r["metrics"][metric]["mean"] for r in rows],
                        yerr=[r["metrics"][metric]["std"] for r in rows], color=colour, marker="o", markersize=4, capsize=2,
                        linestyle="-" if mode == "anchored" else "--", linewidth=1.3)
        ax.axvline(train, color="0.5", linestyle=":", linewidth=1)
        ax.text(train, 1.01, f"training grid ({train})", transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7, color="0.35")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(counts))  # integer ticks at the sampled step counts only
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(n) for n in counts])
        ax.set_xlabel("sampling steps (plain DDIM; log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    settings = []
    for family, name, param, _ in series:
        if (family, name, param) not in settings:
            settings.append((family, name, param))
    handles = [Line2D([], [], color=STUDY_COLOURS.get((f, p), "gray"), linewidth=2) for f, _, p in settings]
    names = [f"{f} {n}={p:g}" for f, n, p in settings]
    handles += [Line2D([], [], color="black", linestyle="-"), Line2D([], [], color="black", linestyle="--")]
    names += [f"anchored to the {train}-step grid", "per_step (CFG++ step at that count)"]
    fig.suptitle(f"The same w (CFG++ units, {train}-step training grid) sampled at other step counts "
                 "(means ± std over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(handles, names, loc="lower center", ncol=len(handles), fontsize=8)
    _save(fig, path)


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
