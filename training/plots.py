"""``python -m training plot OUTPUT``: training curves from ``train_log.jsonl`` (Agg backend, PNG).

Annealing: three panels, the quality and alignment terms (log scale; the alignment term is shown before and after the
delta weight, which is what the balance option changes), the guidance scale w (mean with the min-max band of each logged
step), and the delta weight. Learn to Guide: two panels, the loss (the distance between the guided and the true particle
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
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax = axes[0]
    ax.plot(steps, [r["quality"] for r in rows], label="quality: (1-λ)·|pred − target|²")
    ax.plot(steps, [r["alignment"] for r in rows], label="alignment: λ·|δ'|² (unweighted)")
    ax.plot(steps, [r["alignment"] * w for r, w in zip(rows, weight)], "--", label="alignment × delta weight")
    ax.set_yscale("log")
    ax.set_ylabel("loss term")
    ax.legend(fontsize=8)
    ax.set_title("Annealing-guidance training")
    ax = axes[1]
    ax.fill_between(steps, [r["w_min"] for r in rows], [r["w_max"] for r in rows], alpha=0.3, label="w min–max")
    ax.plot(steps, [r["w_mean"] for r in rows], label="w mean")
    ax.set_ylabel("guidance scale w (CFG++ units)")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(steps, weight)
    ax.set_ylabel("delta weight")
    ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(image, dpi=110)
    plt.close(fig)
    return image


def _plot_learn_to_guide(rows: list[dict], image: Path, plt) -> Path:
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    ax = axes[0]
    ax.plot(steps, [r["loss"] for r in rows])
    ax.set_ylabel("loss (per latent element)")
    ax.set_title("Learn to Guide training")
    ax = axes[1]
    ax.fill_between(steps, [r["scale_min"] for r in rows], [r["scale_max"] for r in rows], alpha=0.3, label="min–max")
    ax.plot(steps, [r["scale_mean"] for r in rows], label="mean")
    ax.set_ylabel("CFG scale 1 + ω")
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(image, dpi=110)
    plt.close(fig)
    return image
