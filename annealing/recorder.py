"""What a sampling run applied, kept on the device during the run and converted once at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Per-sample values of one guidance evaluation. w: the MLP's output (CFG++ units); k: the factor the scale rule applied
#: to it; scale: the scale applied to D_c - D_u (w * k, or the fallback outside the active range); omega: the CFG-equivalent
#: scale in ordinary CFG units, whatever the sampler.
RECORD_FIELDS = ("sigma", "timestep", "delta_norm", "mlp_delta_norm", "w", "k", "scale", "omega", "step", "on_schedule", "active")
_INTEGER_FIELDS = ("step",)
_FLAG_FIELDS = ("on_schedule", "active")


@dataclass
class GuidanceTrace:
    """One row per sampling step (``steps``) and one column per batch item, for every field of :data:`RECORD_FIELDS`.

    ``evaluations`` counts every guidance call, intermediate ones included (heun makes two per step).
    """

    steps: list
    values: dict = field(default_factory=dict)
    evaluations: int = 0

    def __getitem__(self, name):
        return self.values[name]

    @property
    def batch_size(self) -> int:
        return 0 if not self.steps else self.values["w"].shape[1]

    def to_dict(self) -> dict:
        return {"steps": list(self.steps), "evaluations": self.evaluations, **{k: v.tolist() for k, v in self.values.items()}}


class GuidanceRecorder:
    """Keeps every evaluation's values as one stacked device tensor; never synchronises inside a sampling step
    (no ``.item()``/``.cpu()`` until :meth:`trace`)."""

    def __init__(self):
        self._rows: list[torch.Tensor] = []

    def reset(self) -> None:
        self._rows = []

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, **values: torch.Tensor) -> None:
        """One evaluation: every field of :data:`RECORD_FIELDS` as a (B,) tensor (flags and steps are stored as floats)."""
        self._rows.append(torch.stack([values[name].detach().to(torch.float32) for name in RECORD_FIELDS]))

    def trace(self) -> GuidanceTrace:
        """One row per schedule step: the last evaluation made exactly on that step's sigma (an intermediate evaluation only
        where a step has none on its sigma)."""
        if not self._rows:
            return GuidanceTrace(steps=[], values={}, evaluations=0)
        stacked = torch.stack(self._rows).cpu()  # (evaluations, fields, B)
        index = {name: i for i, name in enumerate(RECORD_FIELDS)}
        chosen: dict[int, tuple[int, bool]] = {}  # step -> (row, made exactly on the step's sigma)
        steps_col = stacked[:, index["step"], 0].round().long().tolist()
        exact_col = (stacked[:, index["on_schedule"], 0] > 0.5).tolist()
        for row, (step, exact) in enumerate(zip(steps_col, exact_col)):
            if exact or step not in chosen:  # the last exact evaluation wins; else the first intermediate one
                chosen[step] = (row, exact)
        steps = sorted(chosen)
        rows = torch.tensor([chosen[s][0] for s in steps], dtype=torch.long)
        picked = stacked[rows]
        values = {}
        for name, i in index.items():
            if name == "step":
                continue
            column = picked[:, i]
            values[name] = (column > 0.5).numpy() if name in _FLAG_FIELDS else column.numpy()
        return GuidanceTrace(steps=steps, values=values, evaluations=len(self._rows))
