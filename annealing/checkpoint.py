"""Reading, validating and writing guidance-scale checkpoints.

Two formats are read, told apart by their first bytes (never by the file name):

* the project's ``.safetensors``: weights plus string metadata that says how to use them (see :class:`CheckpointMetadata`);
* the upstream release (a torch zip pickle with ``config`` and ``guidance_scale_model``), read with
  ``torch.load(..., weights_only=True, map_location="cpu")``, which refuses any pickle that asks for arbitrary classes.

Every problem raises :class:`annealing.errors.CheckpointError` naming the file and the problem in one line.
Writing goes to a temporary file in the target folder that is renamed into place, so a crash never leaves half a file.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError
from .model import GuidanceModelConfig, GuidanceScaleModel
from .training_grid import FlowGrid, TrainingGrid, VPGrid, grid_from_dict

FORMAT_NAME = "annealing-guidance"
#: 2: the training grid is described completely (``training_grid``) and the guidance method is named (``method``).
#: Version 1 files (only ``sampling_steps``) are read with the grid their trainer used.
FORMAT_VERSION = 2
METHODS = ("annealing",)

PREDICTION_SPACES = ("epsilon", "velocity")
#: ddpm_index: DDPM timestep 0..999 of a discrete VP model; sigma_x1000: flow sigma * 1000 (SD3); sigma: flow sigma (Flux).
TIMESTEP_CONVENTIONS = ("ddpm_index", "sigma_x1000", "sigma")
#: Families we know; other lower-case names are accepted for models we have not met yet.
KNOWN_FAMILIES = ("sdxl", "sd15", "sd2", "sd3", "flux", "toy2d")
_FAMILY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")

SDXL_LATENT_NUMEL = 4 * 128 * 128  # SDXL at 1024x1024


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: flipping the process-wide umask per write would race with other threads


@dataclass(frozen=True)
class CheckpointMetadata:
    """How a checkpoint must be used, stored next to its weights.

    model_family:         the diffusion family it was trained on (sdxl, sd15, sd3, ...).
    prediction_space:     the space delta is measured in: "epsilon" (noise) or "velocity" (flow matching).
    timestep_convention:  the MLP's timestep input: "ddpm_index", "sigma_x1000" or "sigma".
    trained_latent_numel: latent elements per sample at the training resolution (for delta-norm normalisation), or None.
    training_grid:        the sampling grid it was trained on (:mod:`annealing.training_grid`); it fixes what w means.
                          Default: the grid of the timestep convention's usual model (upstream SDXL's 50-step DDIM grid for
                          ddpm_index, SD3's 28-step flow grid otherwise).
    training:             provenance: steps, images, lambda_min, lambda_max, base_model, source, ... (JSON-serialisable).
    method:               the guidance method the weights implement ("annealing").
    """

    model_family: str = "sdxl"
    prediction_space: str = "epsilon"
    timestep_convention: str = "ddpm_index"
    trained_latent_numel: int | None = SDXL_LATENT_NUMEL
    training_grid: TrainingGrid | None = None
    training: dict = field(default_factory=dict)
    method: str = "annealing"
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if not isinstance(self.model_family, str) or not _FAMILY_PATTERN.match(self.model_family):
            raise ValueError(f"model_family must be a short lower-case name such as {', '.join(KNOWN_FAMILIES)}; got {self.model_family!r}")
        if self.prediction_space not in PREDICTION_SPACES:
            raise ValueError(f"prediction_space must be one of {PREDICTION_SPACES}, got {self.prediction_space!r}")
        if self.timestep_convention not in TIMESTEP_CONVENTIONS:
            raise ValueError(f"timestep_convention must be one of {TIMESTEP_CONVENTIONS}, got {self.timestep_convention!r}")
        value = self.trained_latent_numel
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"trained_latent_numel must be a positive integer or None, got {value!r}")
        if not isinstance(self.training, dict):
            raise ValueError(f"training must be a dict, got {type(self.training).__name__}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        grid = self.training_grid
        if grid is None:
            grid = VPGrid() if self.timestep_convention == "ddpm_index" else FlowGrid()
            object.__setattr__(self, "training_grid", grid)
        if not isinstance(grid, (VPGrid, FlowGrid)):
            raise ValueError(f"training_grid must be a VPGrid or FlowGrid, got {type(grid).__name__}")
        if (grid.kind == "vp") != (self.timestep_convention == "ddpm_index"):
            raise ValueError(f"a {grid.kind} training grid does not go with timestep convention {self.timestep_convention!r} "
                             "(ddpm_index needs a vp grid; sigma and sigma_x1000 a flow grid)")

    @property
    def sampling_steps(self) -> int:
        """Steps of the training grid (the paper's N; upstream: 50)."""
        return self.training_grid.num_steps

    def to_strings(self, config: GuidanceModelConfig) -> dict[str, str]:
        """The safetensors metadata (a flat str -> str mapping)."""
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),  # written in the current format, whatever version it was read from
            "architecture": json.dumps(config.to_dict(), sort_keys=True),
            "model_family": self.model_family,
            "prediction_space": self.prediction_space,
            "timestep_convention": self.timestep_convention,
            "trained_latent_numel": "" if self.trained_latent_numel is None else str(self.trained_latent_numel),
            "training_grid": json.dumps(self.training_grid.to_dict(), sort_keys=True),
            "training": json.dumps(self.training, sort_keys=True),
            "method": self.method,
        }

    def to_dict(self) -> dict:
        """JSON-ready form (the grid as its dict)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["training_grid"] = self.training_grid.to_dict()
        return data

    def replace(self, **changes) -> CheckpointMetadata:
        """A copy with ``changes``; ``sampling_steps`` changes the grid's step count, and a timestep convention of the other
        kind (DDPM index vs flow sigma) brings that kind's default grid unless ``training_grid`` is given too."""
        steps = changes.pop("sampling_steps", None)
        convention = changes.get("timestep_convention")
        if convention is not None and "training_grid" not in changes and (convention == "ddpm_index") != (self.training_grid.kind == "vp"):
            changes["training_grid"] = None
        new = dataclasses.replace(self, **changes)
        if steps is not None:
            new = dataclasses.replace(new, training_grid=dataclasses.replace(new.training_grid, num_steps=steps))
        return new


def upstream_metadata(checkpoint: dict | None = None) -> CheckpointMetadata:
    """Metadata for the released SDXL checkpoint (SDXL base 1.0, epsilon, DDPM index, 1024x1024), trained on diffusers'
    DDIM grid: 50 steps, leading spacing, steps_offset 0, scaled_linear betas 0.00085..0.012 (timesteps 980, 960, ..., 0)."""
    checkpoint = checkpoint if isinstance(checkpoint, dict) else {}
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    diffusion = config.get("diffusion") if isinstance(config.get("diffusion"), dict) else {}
    steps = diffusion.get("num_timesteps", 50)
    steps = steps if isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= 1000 else 50
    training = {"source": "annealing-guidance upstream release (arXiv 2506.24108)", "base_prediction_type": "epsilon"}
    if isinstance(diffusion.get("model_id"), str):
        training["base_model"] = diffusion["model_id"]
    if isinstance(checkpoint.get("step"), int):
        training["steps"] = checkpoint["step"]
    return CheckpointMetadata(training_grid=VPGrid(num_steps=steps), training=training)


# ----------------------------------------------------------------------------------------------------------------- reading


def _sniff_format(path: Path) -> str:
    """'safetensors', 'torch' or raise: decided by content."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(path, "the file is empty")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if head[:1] == b"\x80":  # a raw pickle stream: torch's legacy format
        return "torch"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{":
            if 8 + header_len > size:
                raise CheckpointError(path, f"truncated safetensors file (header says {header_len} bytes, file has {size})")
            return "safetensors"
    raise CheckpointError(path, "not a guidance checkpoint: neither safetensors nor a PyTorch file")


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(path, "is a directory, expected a checkpoint file")
    if not path.exists():
        raise CheckpointError(path, "file not found")
    return path


def _validate_state_dict(path: Path, state: dict, config: GuidanceModelConfig) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise CheckpointError(path, f"the weights are a {type(state).__name__}, expected a mapping of tensors")
    expected = config.expected_shapes()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(path, f"missing weights {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        raise CheckpointError(path, f"unexpected weights {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
    clean = {}
    for key, shape in expected.items():
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(path, f"weight {key} is a {type(tensor).__name__}, expected a tensor")
        if not tensor.is_floating_point():
            raise CheckpointError(path, f"weight {key} has dtype {tensor.dtype}, expected floating point")
        if tuple(tensor.shape) != shape:
            raise CheckpointError(path, f"weight {key} has shape {tuple(tensor.shape)}, expected {shape} for the configured architecture")
        tensor = tensor.detach().to(device="cpu", dtype=torch.float32)
        if not torch.isfinite(tensor).all():
            raise CheckpointError(path, f"weight {key} contains NaN or inf values")
        clean[key] = tensor
    return clean


def _config_from(path: Path, raw: dict) -> GuidanceModelConfig:
    try:
        return GuidanceModelConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid architecture config: {exc}") from None


def _read_torch(path: Path) -> tuple[dict, GuidanceModelConfig, CheckpointMetadata]:
    try:
        with open(path, "rb") as handle:  # a file object: torch must not second-guess the format from the name
            data = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise CheckpointError(path, f"refused to unpickle: the file asks for objects other than tensors ({first})") from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/zip errors for damaged files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(path, f"corrupt or truncated PyTorch file ({reason[:200]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, f"expected a dict checkpoint, found a {type(data).__name__}")
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
    return state, _config_from(path, raw_config), upstream_metadata(data)


def _infer_config(path: Path, state: dict) -> dict:
    """Architecture of a bare state dict, assuming equal embedding sizes (true of every released file)."""
    first = state.get("combined_head.0.weight")
    if not isinstance(first, torch.Tensor) or first.dim() != 2 or first.shape[1] % 3:
        raise CheckpointError(path, "cannot infer the architecture: missing or odd combined_head.0.weight and no config")
    linear = [k for k in state if k.startswith("combined_head.") and k.endswith(".weight")]
    embed = first.shape[1] // 3
    return {"hidden_size": first.shape[0], "n_layers": len(linear) - 2, "t_embed_dim": embed, "delta_embed_dim": embed, "lambda_embed_dim": embed}


def _read_safetensors(path: Path) -> tuple[dict, GuidanceModelConfig, CheckpointMetadata]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(path, f"corrupt or truncated safetensors file ({reason[:200]})") from None
    return state, *parse_metadata(path, meta)


def parse_metadata(path: str | os.PathLike, meta: dict[str, str]) -> tuple[GuidanceModelConfig, CheckpointMetadata]:
    """Validate the string metadata of one of our safetensors files."""
    path = Path(path)
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(path, f"no annealing-guidance metadata (metadata 'format' is {meta.get('format')!r}, expected {FORMAT_NAME!r})")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise CheckpointError(path, f"invalid format_version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(path, f"written by a newer format version {version} (this pack reads up to {FORMAT_VERSION}); update the pack")
    if version < 1:
        raise CheckpointError(path, f"invalid format_version {version}")

    def json_field(key):
        if key not in meta:
            raise CheckpointError(path, f"missing metadata {key!r}")
        try:
            value = json.loads(meta[key])
        except json.JSONDecodeError:
            raise CheckpointError(path, f"metadata {key!r} is not valid JSON") from None
        if not isinstance(value, dict):
            raise CheckpointError(path, f"metadata {key!r} must be a JSON object")
        return value

    def int_field(key):
        value = meta.get(key, "")
        if value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise CheckpointError(path, f"metadata {key!r} must be an integer, got {value!r}") from None

    config = _config_from(path, json_field("architecture"))
    for key in ("model_family", "prediction_space", "timestep_convention"):
        if key not in meta:
            raise CheckpointError(path, f"missing metadata {key!r}")
    training = json_field("training")
    try:
        if version >= 2:
            grid = grid_from_dict(json_field("training_grid"))
            method = meta.get("method", "")
        else:
            grid, method = _version1_grid(meta["timestep_convention"], int_field("sampling_steps"), training), "annealing"
        metadata = CheckpointMetadata(
            model_family=meta["model_family"],
            prediction_space=meta["prediction_space"],
            timestep_convention=meta["timestep_convention"],
            trained_latent_numel=int_field("trained_latent_numel"),
            training_grid=grid,
            training=training,
            method=method,
            format_version=version,
        )
    except ValueError as exc:
        raise CheckpointError(path, f"invalid metadata: {exc}") from None
    return config, metadata


def _version1_grid(convention: str, steps: int | None, training: dict) -> TrainingGrid:
    """The grid a version-1 file was trained on: our trainer's DDIM grid (leading, offset 0, SD's betas) for DDPM timesteps,
    its flow grid (u linear from 1 to 1/N, the model's shift) otherwise."""
    if convention == "ddpm_index":
        return VPGrid(num_steps=steps or 50)
    shift = training.get("flow_shift", 3.0)
    return FlowGrid(num_steps=steps or 28, shift=float(shift) if isinstance(shift, (int, float)) else 3.0, spacing="simple")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], GuidanceModelConfig, CheckpointMetadata, str]:
    """Read and validate a checkpoint: (float32 CPU state dict, config, metadata, 'safetensors' | 'torch')."""
    path = _check_path(path)
    kind = _sniff_format(path)
    reader = _read_safetensors if kind == "safetensors" else _read_torch
    state, config, metadata = reader(path)
    return _validate_state_dict(path, state, config), config, metadata, kind


def load_guidance_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> GuidanceScaleModel:
    """Load a guidance-scale model from an upstream ``.pt`` or one of our ``.safetensors`` files, in eval mode.

    The model carries its :class:`CheckpointMetadata` as ``model.metadata`` and its source as ``model.source_path``.
    Raises :class:`CheckpointError` for anything wrong with the file.
    """
    state, config, metadata, kind = read_checkpoint(path)
    model = GuidanceScaleModel(config, metadata)
    model.load_state_dict(state)
    model.source_path = os.fspath(path)
    model.source_format = kind
    model.requires_grad_(False)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------- writing


#: errno values of a full disk or quota; the text forms are how torch's C++ writer and safetensors' Rust writer report them.
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_FULL_TEXT = ("no space left on device", "storagefull", "disk quota exceeded", "os error 28", "os error 122")
#: torch's zip writer on a short write ("unexpected pos 78272 vs 78160", "file write failed"): no errno is attached.
_WRITE_FAILED_TEXT = ("unexpected pos", "file write failed", "ioerror", "iostream error")
#: Free space below which a write failure without an errno is taken to be a full disk (measured while the failed
#: temporary file still holds what was written).
_NEARLY_FULL_BYTES = 2**20


def _causes(exc: BaseException):
    seen = 0
    while exc is not None and seen < 8:  # the exception and what it was raised from or during
        yield exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1


def _write_failure(exc: BaseException, folder: Path) -> str | None:
    """The one-line reason if ``exc`` is a failure to write the file (full disk, I/O error), else None."""
    texts = []
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL_ERRNOS:
            return f"no space left on {folder}"
        texts.append(str(cause).lower())
    if any(marker in text for text in texts for marker in _DISK_FULL_TEXT):
        return f"no space left on {folder}"
    if isinstance(exc, OSError):
        return f"could not write the file: {exc.strerror or str(exc)[:200]}"
    if any(marker in texts[0] for marker in _WRITE_FAILED_TEXT):
        try:
            stats = os.statvfs(folder)
            if stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES:
                return f"no space left on {folder}"
        except (OSError, AttributeError):  # no statvfs on Windows
            pass
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"could not write the file: {first[:200]}"
    return None


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    A failed write removes the temporary file and leaves ``path`` as it was; a full disk or an I/O error is a
    one-line :class:`CheckpointError` ("no space left on <folder>"), whatever form the writer reported it in."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(path, f"the folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        reason = _write_failure(exc, folder) or f"cannot write to {folder}: {exc.strerror or exc}"
        raise CheckpointError(path, reason) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the result ordinary permissions
        os.replace(tmp, path)
    except BaseException as exc:
        reason = _write_failure(exc, folder) if isinstance(exc, Exception) else None  # before the unlink frees the space
        if os.path.exists(tmp):
            os.unlink(tmp)
        if reason is not None:
            raise CheckpointError(path, reason) from None
        raise


def save_guidance_model(model: GuidanceScaleModel, path: str | os.PathLike, metadata: CheckpointMetadata | None = None) -> None:
    """Write ``model`` as our ``.safetensors`` with full metadata (``metadata`` defaults to ``model.metadata``)."""
    from safetensors.torch import save_file

    metadata = metadata or model.metadata
    if metadata is None:
        raise CheckpointError(path, "no metadata given: say which model family, prediction space and timestep convention it is for")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(path, f"refusing to save: weight {key} contains NaN or inf values")
    strings = metadata.to_strings(model.config)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=strings))


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, **metadata_changes) -> CheckpointMetadata:
    """Convert any readable checkpoint (upstream ``.pt`` included) to our ``.safetensors``; returns the metadata written."""
    if Path(src).resolve() == Path(dst).resolve():
        raise CheckpointError(dst, "the output must differ from the input")
    model = load_guidance_model(src)
    try:
        metadata = model.metadata.replace(**metadata_changes)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(dst, f"invalid metadata option: {exc}") from None
    save_guidance_model(model, dst, metadata)
    return metadata
