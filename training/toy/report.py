"""Writing the benchmark's results: results.json, results.md (the table) and three plots, all atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from annealing.checkpoint import atomic_write  # noqa: E402

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


def markdown_table(results: dict) -> str:
    config = results["config"]
    lines = [
        f"Ring problem {config['problem']}; {config['sampling_steps']} DDIM steps; {config['samples_per_class']} samples per class; "
        f"seeds {config['seeds']} (mean ± std over seeds).",
        "",
        "| method | setting | " + " | ".join(COLUMN_TITLES[m] for m in METRICS) + " |",
        "|---|---|" + "---:|" * len(METRICS),
    ]
    for row in results["methods"]:
        cells = [_fmt(row["metrics"][m], m) for m in METRICS]
        lines.append(f"| {row['family']} | {_setting(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=fig.dpi))
    plt.close(fig)


def plot_front(results: dict, path: Path) -> None:
    """Alignment against the two fidelity measures, one line per method family (means over seeds)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=90)
    by_family: dict[str, list[dict]] = {}
    for row in results["methods"]:
        by_family.setdefault(row["family"], []).append(row)
    for ax, metric, title in ((axes[0], "sw", "sliced Wasserstein-2 to p(x | c)  (lower = more faithful)"),
                              (axes[1], "off", "fraction off the data manifold  (lower = better)")):
        for family, rows in by_family.items():
            colour, marker = FAMILY_STYLE.get(family, ("gray", "o"))
            xs = [r["metrics"][metric]["mean"] for r in rows]
            ys = [r["metrics"]["align"]["mean"] for r in rows]
            if metric == "off":
                xs = [max(x, 1e-3) for x in xs]
            ax.plot(xs, ys, marker=marker, color=colour, label=family, linestyle="-" if len(rows) > 1 else "none",
                    markersize=9 if marker == "*" else 5, linewidth=1.2)
            if family in ("annealing", "CFG"):
                for r, x, y in zip(rows, xs, ys):
                    ax.annotate(f"{r['param']:g}", (x, y), textcoords="offset points", xytext=(4, -9), fontsize=6, color=colour)
        ax.set_xlabel(title)
        ax.set_ylabel("alignment: mean p(c | x)  (higher = better)")
        if metric == "off":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Alignment vs fidelity on the 2D ring (means over seeds; labels: CFG w, annealing lambda)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


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
    fig, axes = plt.subplots(rows_n, cols, figsize=(2.6 * cols, 2.6 * rows_n), dpi=72)
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
        ax.set_title(f"{row['label']}\nalign {m['align']['mean']:.3f}  off {m['off']['mean']:.3f}", fontsize=7)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    for ax in axes[len(picks):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def plot_w_trajectories(results: dict, problem: RingProblem, path: Path, per_class: int = 3) -> None:
    """Annealing's w(t) for a few samples per lambda (first seed), coloured by class; dashed: the mean over all samples."""
    traces, labels, timesteps = results["_traces"], results["_labels"], results["timesteps"]
    if not traces:
        return
    fig, axes = plt.subplots(1, len(traces), figsize=(4 * len(traces), 3.3), dpi=80, sharey=True)
    axes = [axes] if len(traces) == 1 else list(axes)
    for ax, (lam, trace) in zip(axes, sorted(traces.items())):
        for c in range(problem.num_classes):
            idx = torch.nonzero(labels == c).reshape(-1)[:per_class]
            for i in idx.tolist():
                ax.plot(timesteps, trace[:, i].numpy(), color=CLASS_COLOURS[c], linewidth=1, alpha=0.8)
        ax.plot(timesteps, trace.mean(dim=1).numpy(), color="black", linestyle="--", linewidth=1.2, label="mean over samples")
        ax.set_title(f"annealing, lambda = {lam:g}", fontsize=9)
        ax.set_xlabel("DDPM timestep t (sampling runs right to left)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("w (CFG++ units)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def serialisable(results: dict) -> dict:
    return {k: v for k, v in results.items() if not k.startswith("_")}


def write_report(results: dict, problem: RingProblem, out_dir: Path) -> str:
    """Writes results.json, results.md, toy-front.png, toy-samples.png, toy-w-trajectories.png; returns the markdown."""
    table = markdown_table(results)
    data = serialisable(results)
    data["metrics_higher_is_better"] = HIGHER_IS_BETTER
    atomic_write(out_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))
    atomic_write(out_dir / "results.md", lambda tmp: Path(tmp).write_text(table))
    plot_front(results, out_dir / "toy-front.png")
    plot_samples(results, problem, out_dir / "toy-samples.png")
    plot_w_trajectories(results, problem, out_dir / "toy-w-trajectories.png")
    return table
