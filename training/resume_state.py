"""The resume state (``resume.pt``): what a run needs to continue exactly where it stopped, and its checks.

Plain tensors, numbers and JSON text only (MLP weights, optimizer state, the counters, the balance EMA, the settings),
written with ``torch.save`` through a temporary file. A resume state is input from whoever last wrote the folder, so it
is read like a stranger's checkpoint, with the core's bounded reader for torch files (``annealing.untrusted``): the file
must be a regular file of bounded size, its zip entries stored and inside the file, its pickle small and naming only
tensor rebuilders, all checked before ``torch.load(weights_only=True)`` sees it; then every field is checked for its
type and the architecture for its shapes. No message relays torch's advice to load a file unsafely.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

import annealing
from annealing import untrusted
from annealing.atomic_write import atomic_write
from annealing.errors import CheckpointError, printable

from .config import CHOICES
from .errors import TrainingError
from .files import NotARegularFile, format_size, open_regular, shown
from .run_folder import default_output_name, is_output_name

RESUME_FORMAT = "annealing-training-resume"
#: Counters of the resume state (non-negative integers).
RESUME_COUNTERS = ("step", "micro_step", "images_seen", "nan_losses", "skipped_steps", "skipped_image_events")
#: Settings a resumed run must share with the run it continues (others, e.g. max_steps, may change).
RESUME_LOCKED = ("mlp_hidden", "mlp_layers", "delta_normalization", "grid_steps", "flow_spacing", "model_family_resolved",
                 "resolution_resolved")
#: Locked settings that resume states written before they existed lack, and the value those runs had.
LOCKED_DEFAULTS = {"method": "annealing", "frames_resolved": 1, "expert": "auto", "l2g_step_draw": "grid"}
#: Settings whose change a resume warns about (the run continues, but no longer reproduces an uninterrupted one).
RESUME_WARNED = ("effective_batch", "seed", "l2g_particles", "l2g_objective", "l2g_beta", "l2g_lambda", "l2g_delta", "l2g_reward",
                 "l2g_reward_weight")
#: The core's bound for a torch checkpoint file; the largest network the settings allow, with its Adam moments, is well under.
MAX_RESUME_BYTES = untrusted.MAX_FILE_BYTES


class UnusableResumeState(TrainingError):
    """A resume state that cannot be read or used; ``reason`` is the problem without the file name."""

    def __init__(self, path: Path, reason: str, advice: str = ""):
        self.reason = printable(reason, 300)
        super().__init__(f"{path}: {self.reason}{advice}")


@dataclass
class RunCounters:
    """What a run has done so far: restored from a resume state, advanced by the loop, recorded in the checkpoint."""

    step: int = 0
    images_seen: int = 0
    nan_losses: int = 0
    skipped_steps: int = 0
    skipped_events: int = 0
    failed_paths: set[str] = field(default_factory=set)

    @classmethod
    def from_state(cls, state: dict) -> RunCounters:
        return cls(step=int(state["step"]), images_seen=int(state["images_seen"]), nan_losses=int(state["nan_losses"]),
                   skipped_steps=int(state["skipped_steps"]), skipped_events=int(state["skipped_image_events"]),
                   failed_paths=set(json.loads(state["failed_paths"])))

    def to_state(self, accumulation: int) -> dict:
        return {"step": self.step, "micro_step": self.step * accumulation, "images_seen": self.images_seen, "nan_losses": self.nan_losses,
                "skipped_steps": self.skipped_steps, "skipped_image_events": self.skipped_events,
                "failed_paths": json.dumps(sorted(self.failed_paths))}


# ------------------------------------------------------------------------------------------------------------ writing


def recorded_settings(plan, parts) -> dict:
    """What a resume state records of a run's settings: the locked ones (``plan.locked``) and those a resume warns about."""
    cfg, extra = plan.config, {}
    if plan.l2g:
        extra = {name: getattr(cfg, name) for name in RESUME_WARNED if name.startswith("l2g_")}
    return dict(plan.locked, effective_batch=parts.effective_batch, seed=cfg.seed, **extra)


def resume_state_of(plan, parts, counters: RunCounters) -> dict:
    """The resume state of a run (a :class:`~training.run_plan.RunPlan` and its loaded :class:`~training.run_parts.RunParts`)
    after ``counters.step`` steps."""
    cfg = plan.config
    return {
        "format": RESUME_FORMAT,
        "version": 1,
        **counters.to_state(cfg.gradient_accumulation),
        "seed": cfg.seed,
        "mlp": {k: v.detach().cpu() for k, v in parts.accelerator.unwrap_model(parts.mlp).state_dict().items()},
        "optimizer": to_cpu(parts.optimizer.state_dict()),
        "balance_quality": None if parts.balance is None else parts.balance.quality,
        "balance_alignment": None if parts.balance is None else parts.balance.alignment,
        "locked": json.dumps(recorded_settings(plan, parts), sort_keys=True),
        "config": cfg.to_json(),
    }


def write_resume_state(path: Path, state: dict) -> None:
    """Write ``state`` (see :func:`resume_state_problem` for its fields) through a temporary file."""
    atomic_write(path, lambda tmp: _torch_save(state, tmp))


def _torch_save(obj, path) -> None:
    # through a Python file: a full disk then reaches atomic_write as an OSError (torch's own path writer reports only
    # "unexpected pos ...")
    with open(path, "wb") as handle:
        torch.save(obj, handle)


def to_cpu(value):
    """Tensors anywhere in nested dicts, lists and tuples moved to the CPU (an optimizer state as torch.save should see it)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


# ------------------------------------------------------------------------------------------------------------ reading


def _refusal(kind: str, detail: str | None) -> str:
    """Why the bounded reader refused the file, worded for a resume state (never the advice to load it unsafely)."""
    detail = printable(detail or "", 100)
    if kind == "global":
        return f"refused to read the resume state: it contains objects other than tensors (it asks for {detail}) and may be malicious"
    if kind == "call":
        return f"refused to read the resume state: its pickle calls {detail}, where only tensors may be rebuilt, and may be malicious"
    if kind == "size":
        return f"refused to read the resume state: its pickle has more than {detail} instructions (a resume state needs a few thousand)"
    if kind == "build":
        return "refused to read the resume state: its pickle sets an object's state from something other than a dict, and may be malicious"
    if kind == "opcode":
        return f"refused to read the resume state: its pickle uses the instruction {detail}, which torch.save never writes, and may be malicious"
    return f"refused to read the resume state: its pickle uses an instruction the safe loader does not accept{f' ({detail})' if detail else ''}"


def _open_bounded(path: Path):
    """(file, size) of a regular resume file of 1 byte to MAX_RESUME_BYTES, opened once (later reads use this handle)."""
    try:
        handle = open_regular(path)
    except NotARegularFile as exc:
        raise UnusableResumeState(path, f"the resume state is {exc}") from None
    except OSError as exc:
        raise UnusableResumeState(path, f"unreadable resume state ({exc.strerror or type(exc).__name__})") from None
    size = os.fstat(handle.fileno()).st_size
    if size == 0 or size > MAX_RESUME_BYTES:
        handle.close()
        what = "the file is empty" if size == 0 else f"the file has {size:,} bytes, more than the {format_size(MAX_RESUME_BYTES)} allowed"
        raise UnusableResumeState(path, f"unreadable resume state ({what})")
    return handle, size


def _load_bounded(path: Path):
    """The object in a torch file, read through the core's bounds (see the module docstring)."""
    handle, size = _open_bounded(path)
    with handle:
        try:
            pickled = untrusted.inspect_torch_zip(path, handle, size)
        except CheckpointError as exc:
            raise UnusableResumeState(path, f"unreadable resume state ({exc.problem})") from None
        try:
            problem = untrusted.scan_pickle(pickled)
        except ValueError as exc:
            raise UnusableResumeState(path, f"unreadable resume state (its data.pkl cannot be read: {exc})") from None
        if problem is not None:
            raise UnusableResumeState(path, _refusal(*problem))
        handle.seek(0)
        try:  # the checked file object, not the name: what torch reads is what was checked
            return torch.load(handle, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            name, detail = untrusted.torch_refusal(str(exc))
            raise UnusableResumeState(path, _refusal("global", name) if name else _refusal("torch", detail)) from None
        except Exception as exc:  # torch raises RuntimeError, EOFError and more for damaged files
            raise UnusableResumeState(path, f"unreadable resume state ({untrusted.short_reason(exc)})") from None


def read_resume_state(path: Path) -> dict:
    """Read and check a resume state (structure and types; the architecture is checked by :func:`resume_shape_problem`).
    Raises :class:`UnusableResumeState` (one line)."""
    path = Path(path)
    state = _load_bounded(path)
    problem = resume_state_problem(state)
    if problem:
        raise UnusableResumeState(path, f"malformed resume state ({problem})", "; start again without --resume")
    return state


def run_name(state: dict) -> str:
    """The output name of the run a checked resume state belongs to."""
    config, locked = json.loads(state["config"]), json.loads(state["locked"])
    name = config.get("output_name")
    method = locked.get("method", LOCKED_DEFAULTS["method"])
    method = method if method in CHOICES["method"] else "annealing"
    if not is_output_name(name):
        family = locked.get("model_family_resolved")
        name = default_output_name(method, family if is_output_name(family) else "unknown")
    return name if is_output_name(name) else default_output_name(method, "unknown")


# ------------------------------------------------------------------------------------------------------------ checks


def resume_state_problem(state) -> str | None:
    """What is wrong with the fields of a resume state, or None: every field a resumed run reads, with its type."""
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        return "not a training resume state"
    if state.get("version") != 1:
        return f"version {shown(state.get('version'))} is not 1"

    def missing_or(key: str, what: str) -> str:
        return f"{key} is missing" if key not in state else f"{key} is {shown(state[key])}, not {what}"

    for key in RESUME_COUNTERS:
        if type(state.get(key)) is not int or state[key] < 0:
            return missing_or(key, "a count")
    if type(state.get("seed")) is not int:
        return missing_or("seed", "an integer")
    decoded = {}
    for key, kind in (("failed_paths", list), ("locked", dict), ("config", dict)):
        if not isinstance(state.get(key), str):
            return missing_or(key, "JSON text")
        try:
            decoded[key] = json.loads(state[key])
        except (ValueError, RecursionError):
            return f"{key} is not valid JSON"
        if not isinstance(decoded[key], kind):
            return f"{key} is not a JSON {'list' if kind is list else 'object'}"
    if not all(isinstance(p, str) for p in decoded["failed_paths"]):
        return "failed_paths is not a list of paths"
    for key in RESUME_LOCKED + ("effective_batch", "seed"):
        if key not in decoded["locked"]:
            return f"locked settings lack {key}"
    for key in ("balance_quality", "balance_alignment"):
        value = state.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            return missing_or(key, "a finite number or None")
    mlp = state.get("mlp")
    if not isinstance(mlp, dict) or not mlp:
        return missing_or("mlp", "the MLP's weights")
    for key, value in mlp.items():
        if not isinstance(key, str) or not _plain_tensor(value) or not value.is_floating_point() or not torch.isfinite(value).all():
            return f"MLP weight {shown(key)} is not a finite float tensor"
    optimizer = state.get("optimizer")
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict) and isinstance(optimizer.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"])):
        return missing_or("optimizer", "an optimizer state (state and param_groups)")
    return None


def resume_shape_problem(state: dict, network_config: annealing.GuidanceModelConfig | annealing.LearnToGuideConfig) -> str | None:
    """What in a checked resume state does not fit the network ``network_config`` describes (an annealing MLP or a Learn to
    Guide network): weights, optimizer moments, hyperparameters."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        if isinstance(network_config, annealing.LearnToGuideConfig):
            model = annealing.LearnToGuideNet(network_config)
        else:
            model = annealing.GuidanceScaleModel(network_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = {k: tuple(v.shape) for k, v in state["mlp"].items()}
    if weights != expected:
        wrong = sorted(set(weights) ^ set(expected)) or sorted(k for k in expected if weights[k] != expected[k])
        return f"MLP weights do not fit the configured MLP (e.g. {shown(wrong[0])})"
    shapes = [tuple(p.shape) for p in model.parameters()]
    groups = state["optimizer"]["param_groups"]
    ids = [i for group in groups for i in group["params"]]
    if len(ids) != len(shapes) or len(set(ids)) != len(ids) or not all(type(i) is int for i in ids):
        return f"the optimizer state is for {len(ids)} parameters, the MLP has {len(shapes)}"
    for group in groups:
        for key, value in group.items():
            values = value if isinstance(value, (tuple, list)) and key != "params" else [value]
            if key != "params" and any(isinstance(v, float) and not math.isfinite(v) for v in values):
                return f"optimizer setting {shown(key)} is not finite"
    position = {i: n for n, i in enumerate(ids)}
    for index, moments in state["optimizer"]["state"].items():
        if index not in position or not isinstance(moments, dict):
            return f"optimizer state for an unknown parameter {shown(index)}"
        for key, value in moments.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)  # "step" is a plain number in some versions
            if not (math.isfinite(value) if number else _plain_tensor(value) and bool(torch.isfinite(value).all())):
                return f"optimizer {shown(key)} is not a finite tensor"
            if key in ("exp_avg", "exp_avg_sq") and tuple(value.shape) != shapes[position[index]]:
                return f"optimizer {key} of parameter {index} has shape {tuple(value.shape)}, expected {shapes[position[index]]}"
    return None


def _plain_tensor(value) -> bool:
    """A dense tensor with no more values than its storage holds: a view that repeats its data (a zero stride) can claim
    10^12 values in a 4-byte file, and checking them for NaN would allocate that much."""
    if not (isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and value.layout == torch.strided
            and not value.is_meta):
        return False
    return value.numel() * value.element_size() <= value.untyped_storage().nbytes()
