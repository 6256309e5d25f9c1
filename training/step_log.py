"""What each optimizer step did: its micro-batches' loss terms and scales summed up (:class:`StepWindow`), the values a
step reports (:func:`step_terms`, :func:`bar_postfix`), and ``train_log.jsonl`` (:class:`StepLog`).

The log has one ``{"event": "start", ...}`` record per start or resume (naming the run: the run folder reads it to know
whose log it is), then a row every ``log_every`` steps: step, images, the loss terms, w (or Learn to Guide's CFG scale)
mean / min / max, the counters and the seconds since the start.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from annealing.atomic_write import atomic_write

from .algorithm import LossTerms
from .learn_to_guide import GuideTerms

ANNEALING_TERMS = ("loss", "quality", "alignment", "w_mean", "w_min", "w_max")
L2G_TERMS = ("loss", "consistency", "scale_mean", "scale_min", "scale_max")
#: Learn to Guide's reward variant adds the mean CLIP score of the step's images.
REWARD_TERM = "clip_score"


class StepWindow:
    """Loss terms and w statistics of the micro-batches of one optimizer step (per process, reduced on demand).
    Learn to Guide (``l2g``): its self-consistency term (and its reward's mean CLIP score, where on) in the slots of
    annealing's quality (and alignment) terms, and the CFG scale 1 + omega in place of w, reported as scale_*."""

    def __init__(self, device: torch.device, l2g: bool = False):
        self.device, self.l2g = device, l2g
        self.count = self.images = self.nan = self.failed = 0
        self.loss = self.quality = self.alignment = self.w_sum = 0.0
        self.w_n = self.rewards = 0
        self.w_min, self.w_max = math.inf, -math.inf

    def add(self, terms: LossTerms | GuideTerms, images: int) -> None:
        self.count += 1
        self.images += images
        self.loss += float(terms.total.detach())
        if isinstance(terms, GuideTerms):
            w = terms.scale.float()
            self.quality += float(terms.consistency)
            if terms.reward is not None:
                self.alignment += float(terms.reward)
                self.rewards += 1
        else:
            self.quality += float(terms.quality)
            self.alignment += float(terms.alignment)
            w = terms.w.float()
        self.w_sum += float(w.sum())
        self.w_n += w.numel()
        self.w_min = min(self.w_min, float(w.min()))
        self.w_max = max(self.w_max, float(w.max()))

    def reduce(self, acc, stop: bool = False) -> dict:
        """The step's sums over every process, and ``stop``: whether any process was asked to stop (one reduction
        carries both, so every process stops after the same step)."""
        sums = torch.tensor([self.count, self.images, self.nan, self.failed, self.loss, self.quality, self.alignment, self.w_sum, self.w_n,
                             self.rewards, float(stop)], dtype=torch.float64, device=self.device)
        extremes = torch.tensor([self.w_min, -self.w_max], dtype=torch.float64, device=self.device)
        if acc.num_processes > 1:
            sums = acc.reduce(sums, "sum")
            extremes = acc.gather(extremes.unsqueeze(0)).min(dim=0).values  # [min w, -max w] over processes
        count, images, nan, failed, loss, quality, alignment, w_sum, w_n, rewards, stops = sums.tolist()
        out = {"count": int(count), "images": int(images), "nan": int(nan), "failed": int(failed), "stop": stops > 0}
        if count and self.l2g:
            out.update(loss=loss / count, consistency=quality / count, scale_mean=w_sum / max(w_n, 1), scale_min=float(extremes[0]),
                       scale_max=-float(extremes[1]))
            if rewards:
                out[REWARD_TERM] = alignment / rewards
        elif count:
            out.update(loss=loss / count, quality=quality / count, alignment=alignment / count, w_mean=w_sum / max(w_n, 1),
                       w_min=float(extremes[0]), w_max=-float(extremes[1]))
        return out


def step_terms(summary: dict, l2g: bool) -> dict:
    """The values a step reports (log row, progress bar, final report) from its reduced summary; empty if no micro-batch
    of the step had a usable loss."""
    if not summary["count"]:
        return {}
    return {k: summary[k] for k in (L2G_TERMS + (REWARD_TERM,) if l2g else ANNEALING_TERMS) if k in summary}


def bar_postfix(terms: dict, balanced: bool) -> dict:
    """The progress bar's postfix for a step's values."""
    if "scale_mean" in terms:
        postfix = {"loss": f"{terms['loss']:.4g}", "scale": f"{terms['scale_mean']:.2f}[{terms['scale_min']:.2f},{terms['scale_max']:.2f}]"}
        if REWARD_TERM in terms:
            postfix["clip"] = f"{terms[REWARD_TERM]:.3f}"
        return postfix
    postfix = {"loss": f"{terms['loss']:.4g}", "q": f"{terms['quality']:.3g}", "a": f"{terms['alignment']:.3g}",
               "w": f"{terms['w_mean']:.2f}[{terms['w_min']:.2f},{terms['w_max']:.2f}]"}
    if balanced:
        postfix["dw"] = f"{terms['delta_weight']:.3g}"
    return postfix


class StepLog:
    """``train_log.jsonl`` of a run; writes only where ``enabled`` (the main process)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def truncate(self, step: int) -> None:
        """Keep the rows up to ``step`` (a resumed run logs the later ones again) and drop a line a crash cut short."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():  # a damaged line is dropped below
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(json.dumps(row))
        text = "".join(f"{line}\n" for line in kept)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def start(self, **record) -> None:
        """The record of a (re)start, before the step rows it explains."""
        self._append({"event": "start", **record})

    def step(self, **row) -> None:
        self._append(row)

    def _append(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:  # one write: a kill leaves a whole line or a cut one
                handle.write(json.dumps(record) + "\n")
