"""The final report of a training run: :class:`TrainResult` (what ``train`` returns), ``training_report.json`` and the
lines printed at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    images_seen: int
    skipped_images: list[str] = field(default_factory=list)
    skipped_image_events: int = 0
    missing_captions: int = 0
    nan_losses: int = 0
    skipped_steps: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    peak_memory_bytes: int = 0
    resumed_from: int | None = None
    last_terms: dict = field(default_factory=dict)
    world_size: int = 1

    def to_dict(self) -> dict:
        """``training_report.json`` (``output_name`` names the run whose report it is: see training.run_folder)."""
        return {
            "world_size": self.world_size,
            "output_name": self.checkpoint.name.removesuffix(".safetensors"),
            "checkpoint": str(self.checkpoint),
            "steps": self.steps,
            "images_seen": self.images_seen,
            "skipped_images": len(self.skipped_images),
            "skipped_image_paths": self.skipped_images[:50],
            "skipped_image_events": self.skipped_image_events,
            "skipped_missing_captions": self.missing_captions,
            "nan_losses": self.nan_losses,
            "skipped_steps": self.skipped_steps,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 4),
            "peak_memory_bytes": self.peak_memory_bytes,
            "resumed_from": self.resumed_from,
            "last_terms": self.last_terms,
        }


def format_report(result: TrainResult) -> str:
    lines = [
        f"done: {result.steps} steps, {result.images_seen} images seen in {result.seconds:.1f} s ({result.images_per_second:.3g} images/s) "
        f"on {result.world_size} process{'es' if result.world_size > 1 else ''}",
        f"checkpoint: {result.checkpoint}",
        f"skipped unreadable images: {len(result.skipped_images)}" + (f" (e.g. {result.skipped_images[0]})" if result.skipped_images else ""),
        f"skipped images without a caption: {result.missing_captions}",
        f"skipped NaN/inf losses: {result.nan_losses}; skipped optimizer steps: {result.skipped_steps}",
        f"peak memory: {result.peak_memory_bytes / 2**20:.0f} MiB",
    ]
    t = result.last_terms
    if t and "scale_mean" in t:
        lines.append(f"last step: loss {t['loss']:.4g}, CFG scale mean {t['scale_mean']:.3f} [{t['scale_min']:.3f}, {t['scale_max']:.3f}]")
    elif t:
        lines.append(f"last step: quality {t['quality']:.4g}, alignment {t['alignment']:.4g}, w mean {t['w_mean']:.3f} [{t['w_min']:.3f}, {t['w_max']:.3f}]")
    return "\n".join(lines)
