"""Learn to Guide (Galashov et al., arXiv 2510.00815): a small network that gives the CFG scale of one guided step.

    omega = softplus(head([e(t / T), e(s / T), W c + b]))  >= 0        e(v) = [v, cos(v), ..., cos((d - 1) v)]
    D     = D_c + omega (D_c - D_u) = D_u + (1 + omega) (D_c - D_u)  (an ordinary CFG step with scale 1 + omega)

for a step from timestep t to timestep s (the next point of the grid it was trained on) under the prompt embedding c:
the pooled text embedding where the model has one (SDXL, SD3), else the mean of the token embeddings (SD1.x, SD2.x).
Timesteps are in the checkpoint's convention (DDPM index, or sigma x 1000 for flow models); clean data (sigma 0) is
timestep -1 on a DDPM schedule, 0 on a flow one. The network computes in float32 on its own device.

The training objective (energy distance between guided and true particle sets) is in ``training.learn_to_guide``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import show
from .model import (
    MAX_EMBED_DIM,
    MAX_HIDDEN_SIZE,
    MAX_LAYERS,
    MAX_NORMALIZATION,
    MAX_PARAMETERS,
    MIN_SCALE,
    check_input,
    check_scalar,
    embed_scalar,
)

PROMPT_EMBEDDINGS = ("pooled", "mean_tokens")
#: A prompt embedding wider than this is not a text encoder's (T5-XXL is 4096 wide).
MAX_PROMPT_DIM = 16384


@dataclass(frozen=True)
class LearnToGuideConfig:
    """Architecture of a :class:`LearnToGuideNet` (serialised into checkpoint metadata).

    prompt_dim:        width of the prompt embedding it reads (SDXL pooled 1280, SD3 pooled 2048, SD1.5 tokens 768).
    prompt_embedding:  "pooled" (the text encoder's pooled output) or "mean_tokens" (the mean of the token embeddings).
    projection_size:   the prompt embedding is projected to this width before the head (ours: 32).
    hidden_size, n_layers: the head, Linear(in, hidden), ReLU, n_layers x [Linear(hidden, hidden), ReLU], Linear(hidden, 1).
    time_embed_dim:    cosine features of t / T and of s / T each.
    t_embed_normalization: T.
    """

    prompt_dim: int = 1280
    prompt_embedding: str = "pooled"
    projection_size: int = 32
    hidden_size: int = 128
    n_layers: int = 2
    time_embed_dim: int = 4
    t_embed_normalization: float = 1000.0

    def __post_init__(self):
        for name, low, high in (("prompt_dim", 1, MAX_PROMPT_DIM), ("projection_size", 1, MAX_EMBED_DIM), ("hidden_size", 1, MAX_HIDDEN_SIZE),
                                ("n_layers", 0, MAX_LAYERS), ("time_embed_dim", 1, MAX_EMBED_DIM)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}, got {show(value)}")
        if self.prompt_embedding not in PROMPT_EMBEDDINGS:
            raise ValueError(f"prompt_embedding must be one of {', '.join(PROMPT_EMBEDDINGS)}; got {show(self.prompt_embedding)}")
        check_scalar("t_embed_normalization", self.t_embed_normalization, MIN_SCALE, MAX_NORMALIZATION)
        if self.num_parameters > MAX_PARAMETERS:
            raise ValueError(f"the architecture has {self.num_parameters:,} parameters, more than the {MAX_PARAMETERS:,} a guidance "
                             "network may have")

    @property
    def input_size(self) -> int:
        return 2 * self.time_embed_dim + self.projection_size

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.expected_shapes().values())

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """State-dict key -> shape for this architecture."""
        shapes = {"prompt_projection.weight": (self.projection_size, self.prompt_dim), "prompt_projection.bias": (self.projection_size,)}
        dims = [self.input_size] + [self.hidden_size] * (self.n_layers + 1) + [1]
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            shapes[f"head.{2 * i}.weight"] = (d_out, d_in)
            shapes[f"head.{2 * i}.bias"] = (d_out,)
        return shapes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LearnToGuideConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(f"unknown architecture field {show(unknown[0])}")
        values = dict(data)
        if isinstance(values.get("t_embed_normalization"), int) and not isinstance(values["t_embed_normalization"], bool):
            values["t_embed_normalization"] = float(values["t_embed_normalization"])
        return cls(**values)


class LearnToGuideNet(nn.Module):
    """``net(t, s, prompt) -> omega`` (B,), omega >= 0: the CFG scale of the step t -> s is 1 + omega.

    t, s: the step's timesteps, (B,) or scalars, in the checkpoint's convention. prompt: (B, prompt_dim) or (prompt_dim,).
    ``metadata`` (an :class:`annealing.CheckpointMetadata`, method "learn_to_guide") says how to use it.
    """

    def __init__(self, config: LearnToGuideConfig | None = None, metadata=None):
        super().__init__()
        self.config = config or LearnToGuideConfig()
        self.metadata = metadata
        cfg = self.config
        self.prompt_projection = nn.Linear(cfg.prompt_dim, cfg.projection_size)
        dims = [cfg.input_size] + [cfg.hidden_size] * (cfg.n_layers + 1)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], 1))
        self.head = nn.Sequential(*layers)

    @property
    def device(self) -> torch.device:
        return self.head[0].weight.device

    def _time(self, name: str, value, batch: int) -> torch.Tensor:
        check_input(name, value, self.device)
        tensor = value.to(device=self.device, dtype=torch.float32) if torch.is_tensor(value) else torch.full((), float(value), device=self.device)
        if tensor.dim() > 1 or (tensor.dim() == 1 and tensor.shape[0] not in (1, batch)):
            raise ValueError(f"{name} must be a scalar or of shape ({batch},), got shape {tuple(tensor.shape)}")
        return tensor.reshape(-1).expand(batch)

    def forward(self, t, s, prompt: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not torch.is_tensor(prompt) or prompt.shape[-1] != cfg.prompt_dim or prompt.dim() > 2:
            shape = tuple(prompt.shape) if torch.is_tensor(prompt) else type(prompt).__name__
            raise ValueError(f"the prompt embedding must be of shape (B, {cfg.prompt_dim}) ({cfg.prompt_embedding}), got {shape}")
        check_input("prompt", prompt, self.device)
        prompt = prompt.to(device=self.device, dtype=torch.float32).reshape(-1, cfg.prompt_dim)
        batch = max([prompt.shape[0], *(v.shape[0] for v in (t, s) if torch.is_tensor(v) and v.dim() == 1)])
        prompt = prompt.expand(batch, -1)
        times = [embed_scalar(self._time(name, value, batch) / cfg.t_embed_normalization, cfg.time_embed_dim) for name, value in (("t", t), ("s", s))]
        features = torch.cat([*times, self.prompt_projection(prompt)], dim=-1)
        return nn.functional.softplus(self.head(features).squeeze(-1))

    def extra_repr(self) -> str:
        return f"prompt={self.config.prompt_embedding}[{self.config.prompt_dim}], hidden={self.config.hidden_size}, n_layers={self.config.n_layers}"


def prompt_embedding(tokens: torch.Tensor | None, pooled: torch.Tensor | None, kind: str, width: int) -> torch.Tensor:
    """The (B, width) prompt embedding a checkpoint reads: the pooled output, or the mean of the token embeddings (B, L, D).
    ValueError (one line) when the model's conditioning has no such embedding or it has another width."""
    if kind == "pooled":
        if pooled is None:
            raise ValueError("the checkpoint reads the pooled text embedding, and this conditioning has none (a model without one "
                             "needs a checkpoint trained on mean token embeddings)")
        found = pooled.reshape(pooled.shape[0], -1)
    elif kind == "mean_tokens":
        if tokens is None or tokens.dim() != 3:
            raise ValueError("the checkpoint reads the mean of the token embeddings, and this conditioning has no token embeddings")
        found = tokens.float().mean(dim=1)
    else:
        raise ValueError(f"unknown prompt embedding {kind!r}")
    if found.shape[-1] != width:
        raise ValueError(f"the checkpoint reads a {kind} prompt embedding {width} wide, this conditioning's is {found.shape[-1]} wide "
                         "(a checkpoint trained for another model family)")
    return found.float()
