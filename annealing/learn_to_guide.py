"""Learn to Guide (Galashov et al., arXiv 2510.00815): a small network that gives the CFG scale of one guided step.

    omega = relu(head([phi(lambda_t), phi(lambda_s), W c + b]))  >= 0        phi: a small MLP of the log-SNR lambda
    D     = D_c + omega (D_c - D_u) = D_u + (1 + omega) (D_c - D_u)  (an ordinary CFG step with scale 1 + omega)

for a step from timestep t to timestep s under the prompt embedding c: the pooled text embedding where the model has one
(SDXL, SD3), else the mean of the token embeddings (SD1.x, SD2.x). omega = 0 (unguided) is reachable. Timesteps are in the
checkpoint's convention (DDPM index, or sigma x 1000 for flow models); clean data (sigma 0) is timestep -1 on a DDPM
schedule, 0 on a flow one. The log-SNR of a timestep, lambda = log(alpha^2 / sigma^2), comes from the noise schedule of the
network's metadata (its training grid: the DDPM betas, or the flow sigma); the normalised time u = timestep / T is clamped
to the region the network was trained on, [time_min, time_max], first (clean data and pure noise have an infinite log-SNR).

Networks the pack trained before its continuous (s, t) training (pack 0.2.0 and earlier: ``output="softplus"``,
``time_input="cosine"``, ``trained_s="grid_next"``) read cosine features [u, cos u, cos 2u, cos 3u] of u = t / 1000 and
s / 1000 instead, end in a softplus, and were trained with s the next point of their training grid. Their stored
architectures lack the newer fields, which read as those values (:data:`LEGACY_FIELDS`): they load and give the same
omega as before.

The training objective (MMD between guided and true particle sets) is in ``training.learn_to_guide``.
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
#: The network's last activation: relu (the paper's: omega = 0 reachable) or softplus (the pack's earlier networks: omega > 0).
OUTPUTS = ("relu", "softplus")
#: How t and s enter: log_snr (the paper's: the log-SNR through a small MLP) or cosine (earlier networks: cosine features of t / T).
TIME_INPUTS = ("log_snr", "cosine")
#: What s the network was trained on: continuous (any s below t, the paper's draw: the sampler's own next time in every
#: mode) or grid_next (the next point of its training grid, earlier networks: anchored mode takes s from that grid).
TRAINED_S = ("continuous", "grid_next")
#: The values of the fields an architecture stored by pack 0.2.0 or earlier lacks: what those networks were.
LEGACY_FIELDS = {"output": "softplus", "time_input": "cosine", "trained_s": "grid_next"}
#: A prompt embedding wider than this is not a text encoder's (T5-XXL is 4096 wide).
MAX_PROMPT_DIM = 16384


@dataclass(frozen=True)
class LearnToGuideConfig:
    """Architecture of a :class:`LearnToGuideNet` (serialised into checkpoint metadata).

    prompt_dim:        width of the prompt embedding it reads (SDXL pooled 1280, SD3 pooled 2048, SD1.5 tokens 768).
    prompt_embedding:  "pooled" (the text encoder's pooled output) or "mean_tokens" (the mean of the token embeddings).
    projection_size:   the prompt embedding is projected to this width before the head (ours: 32).
    hidden_size, n_layers: the head, Linear(in, hidden), ReLU, n_layers x [Linear(hidden, hidden), ReLU], Linear(hidden, 1).
    time_input:        "log_snr" (default): each of t and s as its log-SNR through Linear(1, time_hidden), ReLU,
                       Linear(time_hidden, time_embed_dim) (one MLP for both); "cosine": time_embed_dim cosine features of
                       t / T and of s / T each.
    time_embed_dim:    features per time (ours: 16; earlier networks: 4 cosine features).
    time_hidden:       hidden width of the log-SNR MLP (ours: 32).
    time_min, time_max: log_snr only: u = timestep / T is clamped to [time_min, time_max], the trained region (the
                       trainer's S_min and 1 - zeta).
    output:            "relu" (omega >= 0, 0 reachable) or "softplus" (omega > 0).
    trained_s:         "continuous" (trained on any s below t) or "grid_next" (on its grid's next point), see TRAINED_S.
    t_embed_normalization: T (1000: DDPM index, sigma x 1000).
    """

    prompt_dim: int = 1280
    prompt_embedding: str = "pooled"
    projection_size: int = 32
    hidden_size: int = 128
    n_layers: int = 2
    time_input: str = "log_snr"
    time_embed_dim: int = 16
    time_hidden: int = 32
    time_min: float = 0.001
    time_max: float = 0.999
    output: str = "relu"
    trained_s: str = "continuous"
    t_embed_normalization: float = 1000.0

    def __post_init__(self):
        for name, low, high in (("prompt_dim", 1, MAX_PROMPT_DIM), ("projection_size", 1, MAX_EMBED_DIM), ("hidden_size", 1, MAX_HIDDEN_SIZE),
                                ("n_layers", 0, MAX_LAYERS), ("time_embed_dim", 1, MAX_EMBED_DIM), ("time_hidden", 1, MAX_HIDDEN_SIZE)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}, got {show(value)}")
        for name, choices in (("prompt_embedding", PROMPT_EMBEDDINGS), ("time_input", TIME_INPUTS), ("output", OUTPUTS),
                              ("trained_s", TRAINED_S)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {show(getattr(self, name))}")
        check_scalar("t_embed_normalization", self.t_embed_normalization, MIN_SCALE, MAX_NORMALIZATION)
        for name in ("time_min", "time_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be a number strictly between 0 and 1 (a normalised time), got {show(value)}")
        if self.time_min >= self.time_max:
            raise ValueError(f"time_min ({self.time_min:g}) must be below time_max ({self.time_max:g})")
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
        if self.time_input == "log_snr":
            shapes.update({"time_embedding.0.weight": (self.time_hidden, 1), "time_embedding.0.bias": (self.time_hidden,),
                           "time_embedding.2.weight": (self.time_embed_dim, self.time_hidden),
                           "time_embedding.2.bias": (self.time_embed_dim,)})
        dims = [self.input_size] + [self.hidden_size] * (self.n_layers + 1) + [1]
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            shapes[f"head.{2 * i}.weight"] = (d_out, d_in)
            shapes[f"head.{2 * i}.bias"] = (d_out,)
        return shapes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LearnToGuideConfig:
        """The config a stored architecture describes; an earlier one (no ``output`` field) reads with
        :data:`LEGACY_FIELDS`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(f"unknown architecture field {show(unknown[0])}")
        values = dict(data)
        if "output" not in values:  # written by pack 0.2.0 or earlier, when every network was a softplus over cosine features
            for name, value in LEGACY_FIELDS.items():
                values.setdefault(name, value)
        for name in ("t_embed_normalization", "time_min", "time_max"):
            if isinstance(values.get(name), int) and not isinstance(values[name], bool):
                values[name] = float(values[name])
        return cls(**values)


class TimestepLogSNR:
    """lambda = log(alpha^2 / sigma^2) of a timestep on a training grid's schedule, float32, per device.

    DDPM grids: sigma (Karras, x-space) of a fractional timestep interpolated in log sigma between the schedule's
    timesteps, as ComfyUI's discrete sampling does, so lambda = -2 log sigma; timesteps are clamped to [0, T - 1].
    Flow grids: sigma = timestep / 1000 (sigma_x1000) or timestep (sigma), alpha = 1 - sigma."""

    def __init__(self, grid, timestep_convention: str):
        self.kind = grid.kind
        self.unit = 1.0 if timestep_convention == "sigma" else 1000.0
        self._log_sigmas = grid.schedule_sigmas().log().to(torch.float32) if grid.kind == "vp" else None
        self._on_device: dict[str, torch.Tensor] = {}

    def __call__(self, timestep: torch.Tensor) -> torch.Tensor:
        if self.kind != "vp":
            sigma = timestep / self.unit
            return 2 * (torch.log1p(-sigma) - sigma.log())
        key = str(timestep.device)
        if key not in self._on_device:
            self._on_device[key] = self._log_sigmas.to(timestep.device)
        log_sigmas = self._on_device[key]
        step = timestep.clamp(0, log_sigmas.shape[0] - 1)
        low = step.floor().long().clamp(max=log_sigmas.shape[0] - 2)
        return -2 * torch.lerp(log_sigmas[low], log_sigmas[low + 1], step - low)


class LearnToGuideNet(nn.Module):
    """``net(t, s, prompt) -> omega`` (B,), omega >= 0: the CFG scale of the step t -> s is 1 + omega.

    t, s: the step's timesteps, (B,) or scalars, in the checkpoint's convention. prompt: (B, prompt_dim) or (prompt_dim,).
    ``metadata`` (an :class:`annealing.CheckpointMetadata`, method "learn_to_guide") says how to use it; a log_snr network
    reads its noise schedule from there (without metadata: SD's scaled_linear DDPM schedule, the metadata's default).
    """

    def __init__(self, config: LearnToGuideConfig | None = None, metadata=None):
        super().__init__()
        self.config = config or LearnToGuideConfig()
        self.metadata = metadata
        cfg = self.config
        self.prompt_projection = nn.Linear(cfg.prompt_dim, cfg.projection_size)
        if cfg.time_input == "log_snr":
            self.time_embedding = nn.Sequential(nn.Linear(1, cfg.time_hidden), nn.ReLU(), nn.Linear(cfg.time_hidden, cfg.time_embed_dim))
        dims = [cfg.input_size] + [cfg.hidden_size] * (cfg.n_layers + 1)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], 1))
        self.head = nn.Sequential(*layers)
        self._log_snr: tuple | None = None  # (grid, convention, TimestepLogSNR): rebuilt when the metadata changes

    @property
    def device(self) -> torch.device:
        return self.head[0].weight.device

    def _time(self, name: str, value, batch: int) -> torch.Tensor:
        check_input(name, value, self.device)
        tensor = value.to(device=self.device, dtype=torch.float32) if torch.is_tensor(value) else torch.full((), float(value), device=self.device)
        if tensor.dim() > 1 or (tensor.dim() == 1 and tensor.shape[0] not in (1, batch)):
            raise ValueError(f"{name} must be a scalar or of shape ({batch},), got shape {tuple(tensor.shape)}")
        return tensor.reshape(-1).expand(batch)

    def log_snr(self, timestep: torch.Tensor) -> torch.Tensor:
        """lambda of ``timestep`` on the schedule of this network's metadata, after clamping u = timestep / T to the trained
        region [time_min, time_max]."""
        cfg = self.config
        grid, convention = (self.metadata.training_grid, self.metadata.timestep_convention) if self.metadata is not None else (None, "ddpm_index")
        if self._log_snr is None or self._log_snr[0] != grid or self._log_snr[1] != convention:
            from .training_grid import VPGrid

            self._log_snr = (grid, convention, TimestepLogSNR(grid or VPGrid(), convention))
        T = cfg.t_embed_normalization
        return self._log_snr[2]((timestep / T).clamp(cfg.time_min, cfg.time_max) * T)

    def forward(self, t, s, prompt: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not torch.is_tensor(prompt) or prompt.shape[-1] != cfg.prompt_dim or prompt.dim() > 2:
            shape = tuple(prompt.shape) if torch.is_tensor(prompt) else type(prompt).__name__
            raise ValueError(f"the prompt embedding must be of shape (B, {cfg.prompt_dim}) ({cfg.prompt_embedding}), got {shape}")
        check_input("prompt", prompt, self.device)
        prompt = prompt.to(device=self.device, dtype=torch.float32).reshape(-1, cfg.prompt_dim)
        batch = max([prompt.shape[0], *(v.shape[0] for v in (t, s) if torch.is_tensor(v) and v.dim() == 1)])
        prompt = prompt.expand(batch, -1)
        times = [self._time(name, value, batch) for name, value in (("t", t), ("s", s))]
        if cfg.time_input == "log_snr":
            features = self.time_embedding(self.log_snr(torch.stack(times)).unsqueeze(-1))  # one MLP for t and s: (2, B, d)
            times = [features[0], features[1]]
        else:
            times = [embed_scalar(time / cfg.t_embed_normalization, cfg.time_embed_dim) for time in times]
        out = self.head(torch.cat([*times, self.prompt_projection(prompt)], dim=-1)).squeeze(-1)
        return torch.relu(out) if cfg.output == "relu" else nn.functional.softplus(out)

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"prompt={cfg.prompt_embedding}[{cfg.prompt_dim}], time={cfg.time_input}, hidden={cfg.hidden_size}, n_layers={cfg.n_layers}, "
                f"output={cfg.output}, trained_s={cfg.trained_s}")


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
