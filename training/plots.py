"""``python -m training plot OUTPUT``: training curves from ``train_log.jsonl`` (a PNG, drawn in the pack's figure style).

Annealing: the quality and alignment terms (log scale; with a changing delta weight, i.e. the balance option, the alignment
term before and after it and a third panel with the weight itself) and the guidance scale w (mean with the min-max band of
each logged step). Learn to Guide: two panels, the loss (the distance between the guided and the true particle
sets) and the CFG scale 1 + omega (mean with its min-max band).
"""

from __future__ import annotations

import json
from pathlib import Path

from annealing import figure_style as style

from .errors import TrainingError
from .run_folder import CURVES_FILE, LOG_FILE


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        raise TrainingError(f"{path}: no training log (train first, or point at the output folder)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise TrainingError(f"{path}:{number}: not valid JSON") from None
        if "quality" in row or "scale_mean" in row:
            rows.append(row)
    if not rows:
        raise TrainingError(f"{path}: the log has no loss rows yet")
    return rows


def plot_training_log(output: str | Path, image: str | Path | None = None) -> Path:
    """Write the curves of ``output/train_log.jsonl`` to ``image`` (default ``output/training_curves.png``)."""
    output = Path(output)
    rows = read_log(output / LOG_FILE if output.is_dir() else output)
    folder = output if output.is_dir() else output.parent
    image = Path(image) if image else folder / CURVES_FILE
    if "scale_mean" in rows[-1]:  # the last run in the folder decides (a folder holds one method's log)
        fig = learn_to_guide_figure([r for r in rows if "scale_mean" in r])
    else:
        fig = annealing_figure([r for r in rows if "quality" in r])
    style.save_png(fig, image)
    return image


def annealing_figure(rows: list[dict]):
    """The loss terms (log scale), w with its min-max band and, where the balance option changed it, the delta weight."""
    steps = [r["step"] for r in rows]
    weight = [r.get("delta_weight", 1.0) for r in rows]
    # A constant delta weight (balance off, the default for UNets) would draw a flat panel and a line on top of another.
    balanced = len(set(weight)) > 1
    fig = style.new_figure(9.0, 9.5 if balanced else 7.0)
    axes = fig.subplots(3 if balanced else 2, 1, sharex=True)
    style.suptitle(fig, "Annealing-guidance training")
    blue, vermillion, green = style.PALETTE["blue"], style.PALETTE["vermillion"], style.PALETTE["bluish green"]
    purple, black = style.PALETTE["reddish purple"], style.PALETTE["black"]  # a colour per legend entry, across the panels
    ax = axes[0]
    ax.plot(steps, [r["quality"] for r in rows], color=blue, linewidth=1.8, label="quality: (1 − λ)·‖pred − target‖²")
    if balanced:
        ax.plot(steps, [r["alignment"] for r in rows], color=vermillion, linewidth=1.8, label="alignment: λ·‖δ'‖² (unweighted)")
        ax.plot(steps, [r["alignment"] * w for r, w in zip(rows, weight)], "--", color=green, linewidth=1.8,
                label="alignment × delta weight")
    else:
        ax.plot(steps, [r["alignment"] * weight[0] for r in rows], color=vermillion, linewidth=1.8,
                label=f"alignment: λ·‖δ'‖² (delta weight {weight[0]:g} throughout)")
    ax.set_yscale("log")
    ax.set_ylabel("loss term (log scale)")
    ax = axes[1]
    ax.fill_between(steps, [r["w_min"] for r in rows], [r["w_max"] for r in rows], color=purple, alpha=0.25, linewidth=0,
                    label="w, min to max of the logged batch")
    ax.plot(steps, [r["w_mean"] for r in rows], color=purple, linewidth=1.8, label="w, mean")
    ax.set_ylabel("guidance scale w\n(CFG++ units)")
    if balanced:
        axes[2].plot(steps, weight, color=black, linewidth=1.8, label="delta weight")
        axes[2].set_ylabel("delta weight\n(set by the balance)")
    _finish(fig, axes)
    return fig


def learn_to_guide_figure(rows: list[dict]):
    """The loss and the CFG scale 1 + omega with its min-max band."""
    steps = [r["step"] for r in rows]
    fig = style.new_figure(9.0, 7.0)
    axes = fig.subplots(2, 1, sharex=True)
    style.suptitle(fig, "Learn to Guide training")
    blue, grey = style.PALETTE["blue"], style.PALETTE["grey"]
    ax = axes[0]
    ax.plot(steps, [r["loss"] for r in rows], color=blue, linewidth=1.8, label="distance between the particle sets, per latent element")
    # the estimate is unbiased: a batch can fall below 0, which is noise, not a better fit
    ax.axhline(0.0, color=grey, linewidth=1.0, linestyle=":", label="0 (a batch below it is estimation noise)")
    ax.set_ylabel("loss")
    ax = axes[1]
    ax.fill_between(steps, [r["scale_min"] for r in rows], [r["scale_max"] for r in rows], color=blue, alpha=0.25, linewidth=0,
                    label="min to max of the logged batch")
    ax.plot(steps, [r["scale_mean"] for r in rows], color=blue, linewidth=1.8, label="mean")
    ax.set_ylabel("CFG scale 1 + ω")
    _finish(fig, axes)
    return fig


def _finish(fig, axes) -> None:
    """Integer step ticks on the shared x axis, the style on every panel, one legend under them all (a band fills its
    panel, so a legend inside would cover data)."""
    from matplotlib.ticker import MaxNLocator

    handles, labels = [], []
    for ax in axes:
        h, label = ax.get_legend_handles_labels()
        handles += h
        labels += label
    style.legend_below(fig, handles, labels, ncol=2)
    axes[-1].set_xlabel("optimizer step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        style.style_axes(ax)
    style.finish(fig)
