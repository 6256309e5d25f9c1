"""What a sampling run applied, kept on the device during the run and converted once at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .model import W_LIMIT
from .schedules import locate_on_schedule

#: Per-sample values of one guidance evaluation, as recorded. w: the MLP's output (CFG++ units); scale: the scale applied to
#: D_c - D_u; omega: the CFG-equivalent scale in ordinary CFG units, whatever the sampler; active: inside the active range;
#: in_domain: w was finite and within W_LIMIT.
RECORD_FIELDS = ("sigma", "timestep", "delta_norm", "mlp_delta_norm", "w", "scale", "omega", "active", "in_domain")
#: Added by :meth:`GuidanceRecorder.trace`: k = scale / w (the factor the scale rule applied, where active), each row's
#: place on the sampler's schedule (step, and whether the evaluation was made exactly on that step's sigma), and fallback:
#: w was not finite or beyond W_LIMIT where it would have applied (active, sigma > 0), so plain CFG at the fallback scale
#: was applied instead.
TRACE_FIELDS = ("k", "step", "on_schedule", "fallback")


@dataclass
class GuidanceTrace:
    """One row per sampling step (``steps``) and one column per batch item, for every field of :data:`RECORD_FIELDS`.

    ``evaluations`` counts every guidance call, intermediate ones included (heun makes two per step);
    ``fallback_sigmas`` holds the sigma of every one of them in which some sample fell back to plain CFG (``fallback``).
    """

    steps: list
    values: dict = field(default_factory=dict)
    evaluations: int = 0
    fallback_sigmas: list = field(default_factory=list)

    def __getitem__(self, name):
        return self.values[name]

    @property
    def batch_size(self) -> int:
        return 0 if not self.steps else self.values["w"].shape[1]

    def to_dict(self) -> dict:
        return {"steps": list(self.steps), "evaluations": self.evaluations, "fallback_sigmas": list(self.fallback_sigmas),
                **{k: v.tolist() for k, v in self.values.items()}}

    def fallback_summary(self) -> str | None:
        """One line saying how many evaluations fell back to plain CFG and at which sigmas, or None when none did."""
        count = len(self.fallback_sigmas)
        if not count:
            return None
        shown = sorted(set(self.fallback_sigmas), reverse=True)
        sigmas = ", ".join(f"{s:.4g}" for s in shown[:6]) + (f", ... ({len(shown)} noise levels)" if len(shown) > 6 else "")
        return (f"the guidance scale was not finite or beyond {W_LIMIT:g} in {count} of {self.evaluations} evaluations (sigma {sigmas}); "
                "plain CFG at the fallback scale was applied there instead")


class GuidanceRecorder:
    """Keeps every evaluation's values as one stacked device tensor; never synchronises inside a sampling step
    (no ``.item()``/``.cpu()`` until :meth:`trace`). Where each evaluation stands on the sampler's schedule is worked out
    in :meth:`trace`, on the CPU, from the schedule the run reported: the sampling step itself does no schedule lookup."""

    def __init__(self):
        self._rows: list[torch.Tensor] = []
        self._schedule: torch.Tensor | None = None

    def reset(self) -> None:
        self._rows, self._schedule = [], None

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, sigma, timestep, delta_norm, mlp_delta_norm, w, scale, omega, active=None, schedule=None, in_domain=None) -> None:
        """One evaluation: (B,) float tensors, and (B,) bool tensors ``active`` and ``in_domain`` (None: all True);
        ``schedule`` is the sampler's sigmas, if known. Stacked on the device: no host synchronisation."""
        flags = [torch.ones_like(w) if flag is None else flag.to(w.dtype) for flag in (active, in_domain)]
        values = [sigma, timestep, delta_norm, mlp_delta_norm, w, scale, omega, *flags]
        self._rows.append(torch.stack(values).detach())
        if schedule is not None:
            self._schedule = schedule

    def trace(self) -> GuidanceTrace:
        """One row per schedule step: the last evaluation made exactly on that step's sigma (an intermediate evaluation only
        where a step has none on its sigma). Without a schedule every evaluation is its own step."""
        if not self._rows:
            return GuidanceTrace(steps=[], values={}, evaluations=0)
        stacked = torch.stack(self._rows).to(device="cpu", dtype=torch.float32)  # (evaluations, fields, B)
        index = {name: i for i, name in enumerate(RECORD_FIELDS)}
        # (evaluations, B): where w would have applied and could not; counted over every evaluation, not only the rows kept
        fell = (stacked[:, index["active"]] > 0.5) & (stacked[:, index["sigma"]] > 0) & (stacked[:, index["in_domain"]] < 0.5)
        fell_rows = fell.any(dim=1)
        first = fell.to(torch.uint8).argmax(dim=1)  # the first sample that fell back, in each evaluation
        fallback_sigmas = stacked[:, index["sigma"]].gather(1, first[:, None])[fell_rows, 0].tolist()
        sigma = stacked[:, index["sigma"], 0]
        if self._schedule is not None:
            step, _, exact = locate_on_schedule(sigma, self._schedule.detach().to("cpu", torch.float32))
        else:
            step, exact = torch.arange(sigma.shape[0]), torch.ones(sigma.shape[0], dtype=torch.bool)
        chosen: dict[int, tuple[int, bool]] = {}  # step -> (row, made exactly on the step's sigma)
        for row, (s, on) in enumerate(zip(step.tolist(), exact.tolist())):
            if on or s not in chosen:  # the last exact evaluation wins; else the first intermediate one
                chosen[s] = (row, on)
        steps = sorted(chosen)
        rows = torch.tensor([chosen[s][0] for s in steps], dtype=torch.long)
        picked = stacked[rows]
        values = {name: picked[:, i].numpy() for name, i in index.items()}
        values["active"] = values["active"] > 0.5
        values["in_domain"] = values["in_domain"] > 0.5
        values["fallback"] = fell[rows].numpy()
        with torch.no_grad():
            w = picked[:, index["w"]]
            values["k"] = (picked[:, index["scale"]] / torch.where(w == 0, torch.ones_like(w), w)).numpy()
        values["on_schedule"] = torch.tensor([chosen[s][1] for s in steps])[:, None].expand(-1, stacked.shape[2]).numpy()
        return GuidanceTrace(steps=steps, values=values, evaluations=len(self._rows), fallback_sigmas=fallback_sigmas)
