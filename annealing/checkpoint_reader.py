"""Reading and validating guidance-scale checkpoints.

Two formats are read, told apart by their structure (never by the file name):

* the project's ``.safetensors``: weights plus string metadata that says how to use them (:mod:`annealing.checkpoint_format`),
  parsed by :mod:`annealing.untrusted` with every length, offset and JSON value bounded before it is used;
* the upstream release (a torch zip pickle with ``config`` and ``guidance_scale_model``): its zip and the globals its pickle
  names are checked first, then it is read with ``torch.load(..., weights_only=True, map_location="cpu")``.

Checkpoints come from strangers: every problem, however odd the file, raises :class:`annealing.errors.CheckpointError`
naming the file and the problem in one line, and no file can make the reader allocate much more than the file holds
(docs/security.md). A file that reads cleanly must also give a finite, bounded scale over its whole domain
(:mod:`annealing.domain_check`), or it is refused the same way.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from . import untrusted
from .checkpoint_format import ARCHITECTURES, CheckpointMetadata, GuidanceNetwork, parse_architecture, parse_metadata, upstream_metadata
from .domain_check import check_domain
from .errors import CheckpointError, printable, show
from .model import GuidanceModelConfig

# Everything read here comes from a stranger: untrusted.py bounds the file, its structure and its JSON before anything is
# allocated, the architecture is bounded by GuidanceModelConfig, and every tensor is checked before its values are touched.


def _as_path(path) -> Path:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    try:
        return Path(path)
    except TypeError:
        raise CheckpointError(None, f"expected the path of a checkpoint file, got a {printable(type(path).__name__, 40)}") from None



_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_names(path: Path, names, expected: dict) -> None:
    names = list(names)
    odd = next((name for name in names if not isinstance(name, str)), None)
    if odd is not None:
        raise CheckpointError(path, f"the weights are named by {show(odd)}; weight names must be strings")
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    if missing:
        raise CheckpointError(path, f"missing weights {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        shown = ", ".join(show(name, 40).strip("'") for name in unexpected[:4])
        raise CheckpointError(path, f"unexpected weights {shown}{' ...' if len(unexpected) > 4 else ''}")


def _check_dtype_and_shape(path: Path, key: str, dtype_name: str, is_float: bool, shape: tuple, expected: tuple) -> None:
    if not is_float:
        raise CheckpointError(path, f"weight {key} has dtype {dtype_name}, expected floating point (float16, bfloat16, float32 or float64)")
    if shape != expected:
        raise CheckpointError(path, f"weight {key} has shape {shape}, expected {expected} for the configured architecture")


def _validate_state_dict(path: Path, state, config: GuidanceModelConfig) -> dict[str, torch.Tensor]:
    """Float32 CPU copies of the weights ``config`` expects. Every tensor's kind, dtype, shape and stored size is checked
    before any value is read or copied."""
    if not isinstance(state, dict):
        raise CheckpointError(path, f"the weights are {show(state)}, expected a mapping of tensors")
    expected = config.expected_shapes()
    _check_names(path, state, expected)
    tensors = {}
    for key, shape in expected.items():
        value = state[key]
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise CheckpointError(path, f"weight {key} is {show(value)}, expected a tensor")
        tensor = torch.Tensor.detach(value)  # a plain tensor: a pickled Parameter may carry attributes that shadow methods
        if tensor.layout != torch.strided or tensor.device.type != "cpu":
            kind = "a meta tensor (no data)" if tensor.device.type == "meta" else f"a {tensor.layout} tensor on {tensor.device.type}"
            raise CheckpointError(path, f"weight {key} is {kind}, expected an ordinary tensor")
        _check_dtype_and_shape(path, key, str(tensor.dtype).replace("torch.", ""), tensor.dtype in _FLOAT_DTYPES, tuple(tensor.shape), shape)
        stored = tensor.untyped_storage().nbytes() - tensor.storage_offset() * tensor.element_size()
        if stored < tensor.numel() * tensor.element_size():  # a view repeating a few stored values (zero strides)
            raise CheckpointError(path, f"weight {key} claims {tensor.numel():,} values but the file stores {max(stored, 0) // tensor.element_size():,} "
                                        "(a view that repeats its data); every weight must be stored in full")
        tensors[key] = tensor
    clean = {}
    for key, tensor in tensors.items():
        tensor = tensor.to(device="cpu", dtype=torch.float32)
        if not torch.isfinite(tensor).all():
            raise CheckpointError(path, f"weight {key} contains NaN or inf values")
        clean[key] = tensor
    return clean




def _refusal(kind: str | None, detail: str | None) -> str:
    # Never relay torch's advice: it suggests loading with weights_only=False, which would run whatever the file holds.
    if kind == "call":
        return f"refused to load: its pickle calls {printable(detail, 100)}, where only tensors may be rebuilt, and may be malicious"
    if kind == "size":
        return f"refused to load: its pickle has more than {detail} instructions (a guidance checkpoint needs a few thousand)"
    if kind == "build":
        return "refused to load: its pickle sets an object's state from something other than a dict, and may be malicious"
    if kind == "opcode":
        return f"refused to load: its pickle uses the instruction {printable(detail, 40)}, which torch.save never writes, and may be malicious"
    if kind == "torch" and detail:
        return f"refused to load: its pickle uses an instruction the safe loader does not accept ({printable(detail, 120)}) and may be malicious"
    asks = f" (it asks for {printable(detail, 100)})" if kind == "global" and detail else ""
    return f"refused to load: the file contains objects other than tensors{asks} and may be malicious"


def _read_torch(path: Path, handle, size: int) -> tuple[dict, GuidanceModelConfig, CheckpointMetadata]:
    pickled = untrusted.inspect_torch_zip(path, handle, size)
    try:
        problem = untrusted.scan_pickle(pickled)
    except ValueError as exc:
        raise CheckpointError(path, f"corrupt PyTorch file: its data.pkl cannot be read ({exc})") from None
    if problem is not None:
        raise CheckpointError(path, _refusal(*problem))
    handle.seek(0)
    try:  # the file object, not the name: torch must not second-guess the format, and the file must be the one checked
        data = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        name, detail = untrusted.torch_refusal(str(exc))
        raise CheckpointError(path, _refusal("global", name) if name else _refusal("torch", detail)) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError and more for damaged files
        raise CheckpointError(path, f"corrupt or truncated PyTorch file: torch could not read it ({untrusted.short_reason(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, f"expected a dict checkpoint, found {show(data)}")
    if "guidance_scale_model" in data:
        state = data["guidance_scale_model"]
        config = data.get("config")
        raw_config = config.get("guidance_scale_model") if isinstance(config, dict) else None
        if not isinstance(raw_config, dict):
            raise CheckpointError(path, "missing config['guidance_scale_model'] (the architecture)")
    elif any(isinstance(k, str) and k.startswith("combined_head.") for k in data):
        state, raw_config = data, None
    else:
        raise CheckpointError(path, "missing key 'guidance_scale_model' (not an annealing guidance checkpoint)")
    if raw_config is None:
        raw_config = _infer_config(path, state)
    return state, parse_architecture(path, raw_config), upstream_metadata(data)


def _infer_config(path: Path, state: dict) -> dict:
    """Architecture of a bare state dict, assuming equal embedding sizes (true of every released file)."""
    first = state.get("combined_head.0.weight")
    if type(first) not in (torch.Tensor, torch.nn.Parameter) or len(first.shape) != 2 or first.shape[1] % 3:
        raise CheckpointError(path, "cannot infer the architecture: missing or odd combined_head.0.weight and no config")
    linear = [k for k in state if isinstance(k, str) and k.startswith("combined_head.") and k.endswith(".weight")]
    embed = first.shape[1] // 3
    return {"hidden_size": first.shape[0], "n_layers": len(linear) - 2, "t_embed_dim": embed, "delta_embed_dim": embed, "lambda_embed_dim": embed}


def _read_safetensors(path: Path, handle, size: int) -> tuple[dict, GuidanceModelConfig, CheckpointMetadata]:
    entries, meta, data_start = untrusted.safetensors_header(path, handle, size)
    config, metadata = parse_metadata(path, meta)
    expected = config.expected_shapes()
    _check_names(path, entries, expected)
    for key, shape in expected.items():  # every tensor is checked before any is read
        entry = entries[key]
        _check_dtype_and_shape(path, key, entry.dtype_name, entry.dtype is not None, entry.shape, shape)
    state = {key: untrusted.read_safetensor(path, handle, data_start, entries[key]) for key in expected}
    return state, config, metadata


def _read(path: Path) -> tuple[dict[str, torch.Tensor], GuidanceModelConfig, CheckpointMetadata, str]:
    """Read and validate a checkpoint's file: (float32 CPU state dict, config, metadata, 'safetensors' | 'torch')."""
    handle, size = untrusted.open_checkpoint(path)
    try:
        with handle:
            kind = untrusted.sniff_format(path, handle, size)
            if kind == "pickle":
                raise CheckpointError(path, _legacy_problem(path, handle, size))
            reader = _read_safetensors if kind == "safetensors" else _read_torch
            state, config, metadata = reader(path, handle, size)
            return _validate_state_dict(path, state, config), config, metadata, kind
    except CheckpointError:
        raise
    except OSError as exc:  # the disk failed while reading
        raise CheckpointError(path, f"could not read the file: {exc.strerror or type(exc).__name__}") from None
    except Exception as exc:  # a case the checks above did not foresee: still one line, never a traceback in the UI
        raise CheckpointError(path, f"could not be read as a guidance checkpoint ({untrusted.short_reason(exc)})") from None


def _network(path: Path) -> tuple[GuidanceNetwork, dict[str, torch.Tensor], str]:
    """The network a file holds, in eval mode on the CPU, after the domain check; with its state dict and format."""
    state, config, metadata, kind = _read(path)
    model = ARCHITECTURES[metadata.method][1](config, metadata)
    model.load_state_dict(state)
    model.requires_grad_(False).eval()
    try:
        check_domain(model, path)  # finite, bounded w (or omega) wherever a sampler can take it
    except CheckpointError:
        raise
    except Exception as exc:  # the network failed to evaluate at all: still one line
        raise CheckpointError(path, f"could not be evaluated over its domain ({untrusted.short_reason(exc)})") from None
    model.source_path = os.fspath(path)
    model.source_format = kind
    return model, state, kind


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], GuidanceModelConfig, CheckpointMetadata, str]:
    """Read and validate a checkpoint: (float32 CPU state dict, config, metadata, 'safetensors' | 'torch').

    Any problem with the file, however odd, raises :class:`CheckpointError` (one line naming the file and the problem);
    so does a network that is not finite and bounded over its domain (:mod:`annealing.domain_check`)."""
    model, state, kind = _network(_as_path(path))
    return state, model.config, model.metadata, kind


def _legacy_problem(path: Path, handle, size: int) -> str:
    """Why a raw pickle stream (torch's format before 1.6) is not loaded: its storages are allocated at the sizes its pickle
    claims before any data is read, so it cannot be bounded the way a zip is. Name what it asks for when that is not a tensor."""
    head = untrusted.read_exactly(path, handle, 0, min(size, untrusted.MAX_PICKLE_BYTES), "the pickle")
    try:
        problem = untrusted.scan_pickle(head, max_pickles=4, strict=False)  # legacy files: magic, protocol, sys info, data
    except ValueError:
        problem = None
    if problem is not None and problem[0] == "global":
        return _refusal(*problem)
    return ("a raw pickle or legacy PyTorch file (torch before 1.6): not read, because its sizes cannot be checked before torch "
            "allocates them; only the zip format torch has written since 1.6 and safetensors are read")


def load_guidance_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> GuidanceNetwork:
    """Load a guidance network from an upstream ``.pt`` or one of our ``.safetensors`` files, in eval mode: a
    :class:`GuidanceScaleModel` (annealing) or a :class:`LearnToGuideNet` (learn_to_guide): ``model.metadata.method`` says which.

    The model carries its :class:`CheckpointMetadata` as ``model.metadata`` and its source as ``model.source_path``.
    Raises :class:`CheckpointError` for anything wrong with the file, and for a network whose scale is not finite and
    within :data:`annealing.model.W_LIMIT` wherever a sampler can take it (:mod:`annealing.domain_check`).
    """
    model, _, _ = _network(_as_path(path))
    return model.to(device)
