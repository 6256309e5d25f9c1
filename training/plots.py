"""``python -m training plot OUTPUT``: training curves from ``train_log.jsonl`` (Agg backend, PNG).

Annealing: the quality and alignment terms (log scale; with a changing delta weight, i.e. the balance option, the alignment
term before and after it and a third panel with the weight itself) and the guidance scale w (mean with the min-max band of
each logged step). Learn to Guide: two panels, the loss (the distance between the guided and the true particle
sets) and the CFG scale 1 + omega (mean with its min-max band).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import TrainingError


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    rows = read_log(output / "train_log.jsonl" if output.is_dir() else output)
    folder = output if output.is_dir() else output.parent
    image = Path(image) if image else folder / "training_curves.png"
    if "scale_mean" in rows[-1]:  # the last run in the folder decides (a folder holds one method's log)
        return _plot_learn_to_guide([r for r in rows if "scale_mean" in r], image, plt)
    rows = [r for r in rows if "quality" in r]
    steps = [r["step"] for r in rows]
    weight = [r.get("delta_weight", 1.0) for r in rows]
    # A constant delta weight (balance off, the default for UNets) would draw a flat panel and a line on top of another.
    balanced = len(set(weight)) > 1
    fig, axes = plt.subplots(3 if balanced else 2, 1, figsize=(8, 9 if balanced else 6.5), sharex=True)
    ax = axes[0]
    ax.plot(steps, [r["quality"] for r in rows], label="quality: (1-λ)·|pred − target|²")
    if balanced:
        ax.plot(steps, [r["alignment"] for r in rows], label="alignment: λ·|δ'|² (unweighted)")
        ax.plot(steps, [r["alignment"] * w for r, w in zip(rows, weight)], "--", label="alignment × delta weight")
    else:
        ax.plot(steps, [r["alignment"] * weight[0] for r in rows], label=f"alignment: λ·|δ'|² (delta weight {weight[0]:g} throughout)")
    ax.set_yscale("log")
    ax.set_ylabel("loss term")
    ax.legend(fontsize=8)
    ax.set_title("Annealing-guidance training")
    ax = axes[1]
    ax.fill_between(steps, [r["w_min"] for r in rows], [r["w_max"] for r in rows], alpha=0.3, label="w min–max")
    ax.plot(steps, [r["w_mean"] for r in rows], label="w mean")
    ax.set_ylabel("guidance scale w (CFG++ units)")
    ax.legend(fontsize=8)
    if balanced:
        axes[2].plot(steps, weight)
        axes[2].set_ylabel("delta weight (balance)")
    return _save(fig, axes[-1], image, plt)


def _plot_learn_to_guide(rows: list[dict], image: Path, plt) -> Path:
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    ax = axes[0]
    ax.plot(steps, [r["loss"] for r in rows], label="distance between the particle sets, per latent element")
    # the estimate is unbiased: a batch can fall below 0, which is noise, not a better fit
    ax.axhline(0.0, color="0.6", linewidth=0.8, linestyle=":", label="0 (a batch below it is estimation noise)")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.set_title("Learn to Guide training")
    ax = axes[1]
    ax.fill_between(steps, [r["scale_min"] for r in rows], [r["scale_max"] for r in rows], alpha=0.3, label="min–max")
    ax.plot(steps, [r["scale_mean"] for r in rows], label="mean")
    ax.set_ylabel("CFG scale 1 + ω")
    ax.legend(fontsize=8)
    return _save(fig, ax, image, plt)


def _save(fig, bottom, image: Path, plt) -> Path:
    """Integer step ticks on the shared x axis, then write the PNG to a temporary file and rename it into place."""
    from matplotlib.ticker import MaxNLocator

    from annealing.atomic_write import atomic_write

    bottom.set_xlabel("optimizer step")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    try:
        atomic_write(image, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return image
