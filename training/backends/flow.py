"""Flow-matching noise schedules as the flow families' pipelines sample them, and the training grid that describes them.

A flow pipeline's sigmas come from three choices, all read from ``scheduler/scheduler_config.json`` and the pipeline:

* the spacing of u before the shift: ``diffusers`` (FlowMatchEulerDiscreteScheduler.set_timesteps(N): u linear from 1 to
  shift(1/T), N points: SD3), ``simple`` (the pipeline passes sigmas = linspace(1, 1/N, N): Qwen-Image, Chroma, Flux) or
  ``unipc`` (UniPCMultistepScheduler with use_flow_sigmas: u = linspace(1, 1/T, N + 1)[:-1], the Wan folders);
* the shift: fixed (``shift`` / ``flow_shift``) or resolution-dependent (``use_dynamic_shifting``): mu is linear in the
  image's token count between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), and the shift is exp(mu)
  (``time_shift_type`` exponential) or mu (linear); either way sigma = shift u / (1 + (shift - 1) u);
* an optional stretch to a terminal sigma (``shift_terminal``, Qwen-Image's 0.02): sigma' = 1 - (1 - sigma)(1 - s_T) / (1 - sigma_last).

:class:`annealing.training_grid.FlowGrid` describes a fixed shift with the ``diffusers`` or ``simple`` spacing. What it does
not describe (``unipc`` spacing, ``shift_terminal``) is trained on the nearest grid it does describe, which is then both the
grid trained on and the grid recorded (they never differ), and the run says so (:attr:`FlowChoice.note`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from annealing.training_grid import FlowGrid

from ..errors import TrainingError

PIPELINE_SPACINGS = ("diffusers", "simple", "unipc")


@dataclass(frozen=True)
class FlowChoice:
    """The grid a flow run trains on and records, and whether it is the pipeline's own grid."""

    grid: FlowGrid
    exact: bool  # True: the recorded grid is the pipeline's grid (up to float32 rounding)
    note: str | None  # why not, and what annealing.training_grid would need to describe it


@dataclass(frozen=True)
class FlowSchedule:
    """A flow family's schedule, from its scheduler config (see the module docstring)."""

    scheduler_class: str
    num_train_timesteps: int
    shift: float  # the fixed shift (unused when dynamic)
    dynamic: bool
    time_shift_type: str = "exponential"
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    shift_terminal: float | None = None
    pipeline_spacing: str = "diffusers"

    @classmethod
    def from_config(cls, folder: Path, config: dict, pipeline_spacing: str, allow_dynamic: bool) -> FlowSchedule:
        """Read and check a scheduler config (one-line errors). Options this does not read (karras sigmas, ...) are caught
        by :meth:`check_scheduler` when a run trains on the pipeline's own grid, and do not matter on the simple grid."""
        name = str(config.get("_class_name", ""))
        if name == "UniPCMultistepScheduler":
            if not config.get("use_flow_sigmas") or config.get("prediction_type") != "flow_prediction":
                raise TrainingError(f"{folder}: a UniPCMultistepScheduler without use_flow_sigmas and flow_prediction is not a flow schedule")
            if config.get("final_sigmas_type", "zero") != "zero":
                raise TrainingError(f"{folder}: final_sigmas_type {config.get('final_sigmas_type')!r} is not supported (the grid ends at sigma 0)")
            pipeline_spacing, shift = "unipc", config.get("flow_shift", 1.0)
        elif name.startswith("FlowMatch"):
            shift = config.get("shift", 1.0)
        else:
            raise TrainingError(f"{folder}: {name or 'the scheduler'} is not a flow-matching scheduler")
        dynamic = bool(config.get("use_dynamic_shifting"))
        if dynamic and not allow_dynamic:
            raise TrainingError(f"{folder}: schedulers with dynamic (resolution-dependent) shifting are not supported")
        kind = config.get("time_shift_type", "exponential")
        if kind not in ("exponential", "linear"):
            raise TrainingError(f"{folder}: time_shift_type {kind!r} is not supported (exponential or linear)")
        numbers = {"shift": shift, "base_shift": config.get("base_shift", 0.5), "max_shift": config.get("max_shift", 1.15),
                   "num_train_timesteps": config.get("num_train_timesteps", 1000),
                   "base_image_seq_len": config.get("base_image_seq_len", 256), "max_image_seq_len": config.get("max_image_seq_len", 4096)}
        for key, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TrainingError(f"{folder}: the scheduler's {key} is not a number ({str(value)[:40]})")
        if not 0 < numbers["shift"] <= 100 or not 2 <= numbers["num_train_timesteps"] <= 10000:
            raise TrainingError(f"{folder}: the scheduler's shift ({numbers['shift']}) or num_train_timesteps is out of range")
        if dynamic and numbers["max_image_seq_len"] == numbers["base_image_seq_len"]:
            raise TrainingError(f"{folder}: base_image_seq_len equals max_image_seq_len; the dynamic shift rule is undefined")
        terminal = config.get("shift_terminal")
        if terminal is not None and (isinstance(terminal, bool) or not isinstance(terminal, (int, float)) or not 0 < terminal < 1):
            raise TrainingError(f"{folder}: shift_terminal must be a number in (0, 1), got {str(terminal)[:40]}")
        return cls(scheduler_class=name, num_train_timesteps=int(numbers["num_train_timesteps"]), shift=float(numbers["shift"]), dynamic=dynamic,
                   time_shift_type=kind, base_shift=float(numbers["base_shift"]), max_shift=float(numbers["max_shift"]),
                   base_seq_len=int(numbers["base_image_seq_len"]), max_seq_len=int(numbers["max_image_seq_len"]),
                   shift_terminal=float(terminal) if terminal else None, pipeline_spacing=pipeline_spacing)

    # ------------------------------------------------------------------------------------------------ the shift
    def mu(self, seq_len: int) -> float:
        """The pipelines' ``calculate_shift``: mu linear in the image's token count."""
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return seq_len * slope + (self.base_shift - slope * self.base_seq_len)

    def shift_at(self, seq_len: int | None) -> float:
        """The shift the pipeline uses for an image of ``seq_len`` tokens (the fixed shift where it is not dynamic)."""
        if not self.dynamic:
            return self.shift
        if seq_len is None:
            raise ValueError("a dynamic shift needs the image's token count")
        mu = self.mu(seq_len)
        return math.exp(mu) if self.time_shift_type == "exponential" else mu

    def rule(self) -> dict:
        """The shift rule as JSON (recorded with the resolution trained: the nodes step needs it at other resolutions)."""
        if not self.dynamic:
            return {"kind": "fixed", "shift": self.shift}
        return {"kind": "dynamic", "time_shift_type": self.time_shift_type, "base_shift": self.base_shift, "max_shift": self.max_shift,
                "base_image_seq_len": self.base_seq_len, "max_image_seq_len": self.max_seq_len,
                "formula": "mu = base_shift + (seq_len - base_image_seq_len) * (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len); "
                           + ("shift = exp(mu)" if self.time_shift_type == "exponential" else "shift = mu")}

    # ------------------------------------------------------------------------------------------------ sigmas
    def pipeline_sigmas(self, num_steps: int, seq_len: int | None = None) -> torch.Tensor:
        """The pipeline's sigmas for ``num_steps`` (float64, noisiest first, then 0), written out from the formulas."""
        steps, count = num_steps, self.num_train_timesteps
        shift = self.shift_at(seq_len)

        def shifted(u):
            return shift * u / (1 + (shift - 1) * u)

        if self.pipeline_spacing == "diffusers":
            low = float(self.shift * (1 / count) / (1 + (self.shift - 1) * (1 / count)))  # the scheduler's sigma_min
            u = torch.linspace(1.0, low, steps, dtype=torch.float64)
        elif self.pipeline_spacing == "simple":
            u = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
        else:
            u = torch.linspace(1.0, 1.0 / count, steps + 1, dtype=torch.float64)[:-1]
        sigmas = shifted(u)
        if self.shift_terminal:
            scale = (1 - sigmas[-1]) / (1 - self.shift_terminal)
            sigmas = 1 - (1 - sigmas) / scale
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    def choose(self, num_steps: int, flow_spacing: str, seq_len: int | None = None) -> FlowChoice:
        """The grid to train on and record: ``simple`` = ComfyUI's simple scheduler at the pipeline's shift; ``diffusers`` =
        the pipeline's own grid, or the nearest FlowGrid where annealing.training_grid cannot describe it."""
        shift = self.shift_at(seq_len)
        if flow_spacing == "simple":
            return FlowChoice(FlowGrid(num_steps=num_steps, shift=shift, spacing="simple", num_train_timesteps=self.num_train_timesteps), True, None)
        spacing = "diffusers" if self.pipeline_spacing == "diffusers" else "simple"
        grid = FlowGrid(num_steps=num_steps, shift=shift, spacing=spacing, num_train_timesteps=self.num_train_timesteps)
        missing = []
        if self.pipeline_spacing == "unipc":
            missing.append("the UniPC flow spacing u = linspace(1, 1/T, N + 1)[:-1] (it trains on the simple spacing, at most 1/T away in u)")
        if self.shift_terminal:
            missing.append(f"the stretch to shift_terminal {self.shift_terminal:g} (it trains on the unstretched grid: last sigma "
                           f"{float(grid.sigmas()[-2]):.4f} instead of {self.shift_terminal:g})")
        if not missing:
            return FlowChoice(grid, True, None)
        return FlowChoice(grid, False, "annealing.training_grid.FlowGrid cannot describe " + " or ".join(missing))

    def check_scheduler(self, scheduler, num_steps: int, seq_len: int | None, source) -> None:
        """The folder's own scheduler, run as the pipeline runs it, must give ``pipeline_sigmas``: options this module does
        not read would otherwise make the recorded grid wrong."""
        if scheduler is None or not hasattr(scheduler, "set_timesteps"):
            return
        scheduler = copy.deepcopy(scheduler)
        if self.pipeline_spacing == "simple":
            import numpy as np

            sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
            kwargs = {"mu": self.mu(seq_len)} if self.dynamic else {}
            scheduler.set_timesteps(num_steps, sigmas=sigmas, **kwargs)
        else:
            kwargs = {"mu": self.mu(seq_len)} if self.dynamic else {}
            scheduler.set_timesteps(num_steps, **kwargs)
        theirs = torch.as_tensor(scheduler.sigmas, dtype=torch.float64).cpu()
        ours = self.pipeline_sigmas(num_steps, seq_len)
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-5, atol=2e-6):
            raise TrainingError(f"{source}: the scheduler's {num_steps}-step sigmas differ from a shift-{self.shift_at(seq_len):g} flow grid; "
                                "train with --flow-spacing simple or a plain FlowMatchEulerDiscreteScheduler config")
