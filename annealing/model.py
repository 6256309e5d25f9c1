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


@dataclass(frozen=True)
class GuidanceModelConfig:
    """Architecture of a :class:`GuidanceScaleModel` (serialised into checkpoint metadata).

    Defaults are the released SDXL checkpoint's: 128 hidden units, 3 hidden layers, 4-dim embeddings,
    timestep divided by 1000, delta norm divided by 5, w = out + 1.
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
        for name in ("t_embed_normalization", "delta_embed_normalization", "w_scale", "w_bias"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {show(value)}")
        for name in ("t_embed_normalization", "delta_embed_normalization"):
            if getattr(self, name) == 0:
                raise ValueError(f"{name} must not be zero")
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
        """(B, 3) float32 on the model's device: timestep, delta norm, lambda; scalars broadcast to the batch."""
        if (torch.is_tensor(timestep) and torch.is_tensor(delta_norm) and isinstance(lam, float) and timestep.dim() == delta_norm.dim() == 1
                and timestep.shape == delta_norm.shape and timestep.dtype == delta_norm.dtype == torch.float32
                and timestep.device == delta_norm.device == self.device):  # the guidance step's case, every step: the short way
            check_lambda(lam)
            return torch.stack([timestep, delta_norm, torch.full_like(timestep, lam)], dim=-1)
        named = {"timestep": timestep, "delta_norm": delta_norm, "lam": lam}
        for name, value in named.items():
            if not torch.is_tensor(value) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number or a tensor, got {type(value).__name__}")
        check_lambda(lam)
        # Python numbers become a fill on the device: torch.as_tensor(0.4).to("cuda") would be a host copy that synchronises.
        values = [v.to(device=self.device, dtype=torch.float32) if torch.is_tensor(v) else torch.full((), float(v), device=self.device)
                  for v in named.values()]
        batch = max((v.shape[0] for v in values if v.dim() == 1), default=1)
        for name, value in zip(named, values):
            if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
                raise ValueError(f"{name} must be a scalar or of shape ({batch},), got shape {tuple(value.shape)}")
        return torch.stack([v.expand(batch) for v in values], dim=-1)

    def features(self, timestep: TensorLike, delta_norm: TensorLike, lam: TensorLike) -> torch.Tensor:
        """The (B, input_size) float32 input of the MLP; scalar inputs broadcast to the batch."""
        scaled = self._inputs(timestep, delta_norm, lam) * self._input_scale
        if self._shared_width is not None:
            waves = torch.cos(scaled.unsqueeze(-1) * self._freqs)  # (B, 3, D); column 0 is cos(0), replaced by v itself
            return torch.cat([scaled.unsqueeze(-1), waves[..., 1:]], dim=-1).reshape(scaled.shape[0], -1)
        cfg = self.config
        dims = (cfg.t_embed_dim, cfg.delta_embed_dim, cfg.lambda_embed_dim)
        return torch.cat([embed_scalar(scaled[:, i], dim) for i, dim in enumerate(dims)], dim=-1)

    def forward(self, timestep: TensorLike, delta_norm: TensorLike, lam: TensorLike) -> torch.Tensor:
        """w per sample (B,). ``lam`` must lie in [0, 1] (checked for numbers and CPU tensors; a tensor on an accelerator
        is not read back, which would synchronise the device)."""
        x = self.features(timestep, delta_norm, lam)
        # The layers of combined_head called directly from a plain list: a module call, or indexing the Sequential, costs more
        # than the tiny matmul it wraps, every sampling step.
        *hidden, last = self._linears
        for layer in hidden:
            x = torch.relu(nn.functional.linear(x, layer.weight, layer.bias))
        out = nn.functional.linear(x, last.weight, last.bias).squeeze(-1)
        scale, bias = self.config.w_scale, self.config.w_bias
        return (out if scale == 1.0 else scale * out) + bias

    def extra_repr(self) -> str:
        meta = self.metadata
        family = f", family={meta.model_family}" if meta is not None else ""
        return f"hidden={self.config.hidden_size}, n_layers={self.config.n_layers}{family}"
