"""The guidance-scale model: a small MLP that maps (timestep, ||delta||, lambda) to a guidance scale w.

    features = [e(t / t_norm), e(||delta|| / delta_norm), e(lambda)]      e(v) = [v, cos(v), cos(2v), ..., cos((d-1) v)]
    w        = w_scale * MLP(features) + w_bias

The MLP is Linear(in, hidden), ReLU, then ``n_layers`` x [Linear(hidden, hidden), ReLU], then Linear(hidden, 1),
stored under ``combined_head.{0,2,...}`` exactly like the released SDXL checkpoint, so its weights load unchanged.
The model always computes in float32 on its own device, whatever dtype or device its inputs come in.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import show
from .lambda_rule import check_lambda

TensorLike = torch.Tensor | float | int

# Bounds on what an architecture (from a stranger's checkpoint) may ask for, far above any guidance MLP: the released one is
# 12 -> 128 -> 3 x 128 -> 1 (51,329 parameters). They keep a tiny file from making us build gigabytes of layers.
MAX_HIDDEN_SIZE = 4096
MAX_LAYERS = 64
MAX_EMBED_DIM = 1024
MAX_PARAMETERS = 1 << 25  # 33.5 million: 128 MiB in float32, 650x the released MLP

#: The largest |w| (CFG++ units) a checkpoint may give anywhere in its domain, and the most the guide ever applies
#: (docs/design.md, section 6). Where trained, the released SDXL checkpoint gives 0.7 to 1.5 and the 2D benchmark's about 3;
#: at the far edge of the domain (||delta|| 1000 times the normalisation, 100 times beyond training) the released one gives
#: 3 and the 2D benchmark's 288. Ten thousand is a thousand times any useful scale, and far from float32's overflow.
W_LIMIT = 1e4
#: Bounds on the architecture's scalars: w_scale and w_bias within W_LIMIT (else one output unit alone could exceed it),
#: w_scale and the normalisations no smaller than this in magnitude (1e-300 turns every input into 0 or inf) ...
MIN_SCALE = 1e-6
#: ... and the normalisations no larger than this (the timestep or delta norm would vanish from the input).
MAX_NORMALIZATION = 1e6


def check_scalar(name: str, value, low: float, high: float) -> None:
    """A finite number whose magnitude lies in [low, high]; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {show(value)}")
    if not low <= abs(value) <= high:
        span = f"from {low:g} to {high:g}" if low else f"at most {high:g}"
        raise ValueError(f"{name} must be a finite number of magnitude {span}, got {value:g}")


@dataclass(frozen=True)
class GuidanceModelConfig:
    """Architecture of a :class:`GuidanceScaleModel` (serialised into checkpoint metadata).

    Defaults are the released SDXL checkpoint's: 128 hidden units, 3 hidden layers, 4-dim embeddings,
    timestep divided by 1000, delta norm divided by 5, w = out + 1. Sizes are bounded by the MAX_* constants; the
    normalisations' magnitudes lie in [MIN_SCALE, MAX_NORMALIZATION], w_scale's in [MIN_SCALE, W_LIMIT], |w_bias| <= W_LIMIT.
    """

    hidden_size: int = 128
    n_layers: int = 3
    t_embed_dim: int = 4
    delta_embed_dim: int = 4
    lambda_embed_dim: int = 4
    t_embed_normalization: float = 1000.0
    delta_embed_normalization: float = 5.0
    w_scale: float = 1.0
    w_bias: float = 1.0

    def __post_init__(self):
        for name, high in (("hidden_size", MAX_HIDDEN_SIZE), ("t_embed_dim", MAX_EMBED_DIM), ("delta_embed_dim", MAX_EMBED_DIM),
                           ("lambda_embed_dim", MAX_EMBED_DIM), ("n_layers", MAX_LAYERS)):
            value, low = getattr(self, name), 0 if name == "n_layers" else 1
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}, got {show(value)}")
        for name, low, high in (("t_embed_normalization", MIN_SCALE, MAX_NORMALIZATION), ("delta_embed_normalization", MIN_SCALE, MAX_NORMALIZATION),
                                ("w_scale", MIN_SCALE, W_LIMIT), ("w_bias", 0.0, W_LIMIT)):
            check_scalar(name, getattr(self, name), low, high)
        if self.num_parameters > MAX_PARAMETERS:
            raise ValueError(f"the architecture has {self.num_parameters:,} parameters, more than the {MAX_PARAMETERS:,} a guidance MLP "
                             f"may have (hidden_size {self.hidden_size}, n_layers {self.n_layers})")

    @property
    def input_size(self) -> int:
        return self.t_embed_dim + self.delta_embed_dim + self.lambda_embed_dim

    @property
    def num_parameters(self) -> int:
        """Weights and biases of the MLP (the released checkpoint: 51,329)."""
        hidden = self.hidden_size
        return (self.input_size + 1) * hidden + self.n_layers * (hidden + 1) * hidden + hidden + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GuidanceModelConfig:
        """Build from a dict, ignoring unknown keys (upstream configs carry a few extra ones)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in ("t_embed_normalization", "delta_embed_normalization", "w_scale", "w_bias"):
            value = kwargs.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                if value.bit_length() > 1000:  # float() would raise OverflowError
                    raise ValueError(f"{key} must be a finite number, got {show(value)}")
                kwargs[key] = float(value)
        return cls(**kwargs)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """State-dict key -> shape for this architecture."""
        dims = [self.input_size] + [self.hidden_size] * (self.n_layers + 1) + [1]
        shapes = {}
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            shapes[f"combined_head.{2 * i}.weight"] = (d_out, d_in)
            shapes[f"combined_head.{2 * i}.bias"] = (d_out,)
        return shapes


def check_input(name: str, value, device: torch.device) -> None:
    """One input of a guidance network's public forward: a finite Python number, or a tensor that holds values (not on the
    meta device unless the network is there too) and at least one element. ValueError naming ``name`` otherwise."""
    if torch.is_tensor(value):
        if value.device.type == "meta" and device.type != "meta":
            raise ValueError(f"{name} is a tensor on the meta device (a shape without values); the network on {device} needs real values")
        if value.numel() == 0:
            raise ValueError(f"{name} has no elements (shape {tuple(value.shape)}): an empty batch cannot be evaluated")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if (isinstance(value, int) and value.bit_length() > 1000) or not math.isfinite(value):  # float() would raise OverflowError
        raise ValueError(f"{name} must be a finite number, got {show(value)}")


def embed_scalar(value: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) -> (B, dim): [v, cos(v), cos(2v), ..., cos((dim-1) v)]."""
    freqs = torch.arange(1, dim, device=value.device, dtype=value.dtype)
    return torch.cat([value.unsqueeze(-1), torch.cos(value.unsqueeze(-1) * freqs)], dim=-1)


class GuidanceScaleModel(nn.Module):
    """Predicts the guidance scale w per sample: ``model(timestep, delta_norm, lam) -> w`` of shape (B,).

    Args of ``forward`` (each a tensor of shape (B,) or (), or a Python number; scalars broadcast to the batch):
        timestep:   the timestep in the checkpoint's convention (see ``metadata.timestep_convention``).
        delta_norm: per-sample L2 norm of eps_uncond - eps_cond over the whole latent.
        lam:        the user's trade-off in [0, 1]; higher follows the prompt more, lower keeps quality.

    ``metadata`` (a :class:`annealing.checkpoint_format.CheckpointMetadata` or None) says how the checkpoint must be used.
    """

    def __init__(self, config: GuidanceModelConfig | None = None, metadata=None):
        super().__init__()
        self.config = config or GuidanceModelConfig()
        self.metadata = metadata
        dims = [self.config.input_size] + [self.config.hidden_size] * (self.config.n_layers + 1)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], 1))
        self.combined_head = nn.Sequential(*layers)
        self._linears = [layer for layer in layers if isinstance(layer, nn.Linear)]  # a plain list: not registered twice
        cfg = self.config
        # One cos() for all three inputs when their embeddings are equally wide (every released file): fewer small ops per step.
        self._shared_width = cfg.t_embed_dim if cfg.t_embed_dim == cfg.delta_embed_dim == cfg.lambda_embed_dim else None
        self.register_buffer("_freqs", torch.arange(self._shared_width or 1, dtype=torch.float32), persistent=False)
        self.register_buffer("_input_scale", torch.tensor([1.0 / cfg.t_embed_normalization, 1.0 / cfg.delta_embed_normalization, 1.0]),
                             persistent=False)

    @property
    def device(self) -> torch.device:
        return self._freqs.device  # a buffer: cheaper to reach than a layer's weight, and it moves with the model

    def _inputs(self, timestep: TensorLike, delta_norm: TensorLike, lam: TensorLike) -> torch.Tensor:
        """(B, 3) float32 on the model's device: timestep, delta norm, lambda, each checked; scalars broadcast to the batch."""
        check_lambda(lam)
        named = {"timestep": timestep, "delta_norm": delta_norm, "lam": lam}
        for name, value in named.items():
            check_input(name, value, self.device)
        # Python numbers become a fill on the device: torch.as_tensor(0.4).to("cuda") would be a host copy that synchronises.
        values = [v.to(device=self.device, dtype=torch.float32) if torch.is_tensor(v) else torch.full((), float(v), device=self.device)
                  for v in named.values()]
        batch = max((v.shape[0] for v in values if v.dim() == 1), default=1)
        for name, value in zip(named, values):
            if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
                raise ValueError(f"{name} must be a scalar or of shape ({batch},), got shape {tuple(value.shape)}")
        return torch.stack([v.expand(batch) for v in values], dim=-1)

    def _embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, 3) raw inputs -> (B, input_size) features."""
        scaled = inputs * self._input_scale
        if self._shared_width is not None:
            waves = torch.cos(scaled.unsqueeze(-1) * self._freqs)  # (B, 3, D); column 0 is cos(0), replaced by v itself
            return torch.cat([scaled.unsqueeze(-1), waves[..., 1:]], dim=-1).reshape(scaled.shape[0], -1)
        cfg = self.config
        dims = (cfg.t_embed_dim, cfg.delta_embed_dim, cfg.lambda_embed_dim)
        return torch.cat([embed_scalar(scaled[:, i], dim) for i, dim in enumerate(dims)], dim=-1)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, input_size) features -> w (B,)."""
        # The layers of combined_head called directly from a plain list: a module call, or indexing the Sequential, costs more
        # than the tiny matmul it wraps, every sampling step.
        *hidden, last = self._linears
        for layer in hidden:
            x = torch.relu(nn.functional.linear(x, layer.weight, layer.bias))
        out = nn.functional.linear(x, last.weight, last.bias).squeeze(-1)
        scale, bias = self.config.w_scale, self.config.w_bias
        return (out if scale == 1.0 else scale * out) + bias

    def features(self, timestep: TensorLike, delta_norm: TensorLike, lam: TensorLike) -> torch.Tensor:
        """The (B, input_size) float32 input of the MLP; scalar inputs broadcast to the batch."""
        return self._embed(self._inputs(timestep, delta_norm, lam))

    def forward(self, timestep: TensorLike, delta_norm: TensorLike, lam: TensorLike) -> torch.Tensor:
        """w per sample (B,). Every input is checked: ``lam`` must lie in [0, 1] (numbers and CPU tensors; a tensor on an
        accelerator is not read back, which would synchronise the device), Python numbers must be finite, tensors must hold
        values (not the meta device, unless the model is there too) and at least one element. A ValueError says which."""
        return self._head(self.features(timestep, delta_norm, lam))

    def forward_trusted(self, timestep: torch.Tensor, delta_norm: torch.Tensor, lam: float) -> torch.Tensor:
        """w per sample (B,) without any check: the guide's per-evaluation path (:class:`annealing.AnnealingGuidance`).
        ``timestep`` and ``delta_norm`` are (B,) float32 tensors on the model's device, ``lam`` a float in [0, 1] checked
        once, when :class:`annealing.AnnealingOptions` was built. Anything else: call the model itself."""
        return self._head(self._embed(torch.stack([timestep, delta_norm, torch.full_like(timestep, lam)], dim=-1)))

    def extra_repr(self) -> str:
        meta = self.metadata
        family = f", family={meta.model_family}" if meta is not None else ""
        return f"hidden={self.config.hidden_size}, n_layers={self.config.n_layers}{family}"
