"""Whether a guidance network gives a finite, bounded scale over its whole domain, decided once, when it is loaded.

A checkpoint whose weights or scalars are huge but finite loads cleanly and then overflows at sampling time; one whose
inputs are degenerate gives NaN at every step. Both are caught here, before any sampling, by evaluating the network where
a sampler can take it (docs/design.md, section 6) and refusing it with one :class:`CheckpointError` line that names the
file, the value and the point where |w| exceeds :data:`annealing.model.W_LIMIT` or is not finite.

The points, in float32 exactly as the guide computes them:

* annealing, w(t, ||delta||, lambda): t is what the training grid's lookup gives at every grid sigma, at the geometric
  midpoint of each two neighbours and at the two ends a sampler can reach (VP: DDPM timesteps 0 and T - 1; flow: sigma 1
  and 1e-4); ||delta|| is 0 and 10^-3, 10^-2, ..., 10^3 times the checkpoint's delta normalisation (the guide clamps
  above 10^3: MAX_DELTA_NORM_MULTIPLE); lambda is 0, 0.5 and 1. The released checkpoint: 101 x 8 x 3 = 2,424 points.
* learn_to_guide, omega(t, s, prompt) over the 2-D region of steps t -> s a sampler can take (s anywhere below t) and its
  edges: t at the same sigmas; s = t (the diagonal edge, a step of length 0: the limit of samplers with ever more steps,
  shorter than any step a continuous-(s, t) network trains on), s at the training grid's next point (half a grid step
  from a midpoint), at clean data (the lower edge, where a log_snr network clamps its input), and at up to 4 later grid
  points spread evenly; the prompt embedding is zero (what the explorer draws without a prompt), a seeded standard-normal
  vector (a text encoder's embeddings have per-element magnitudes about 1) and 4 times that vector.

The evaluation is capped at :data:`MAX_CHECK_MACS` multiply-adds: where the full set would cost more (a network far larger
than the released one, or a grid of hundreds of steps), timesteps (or (t, s) pairs) are thinned evenly, the ends always
kept. The released checkpoint's check evaluates 2,424 points in a few ms (``benchmarks/load_check.py``).
"""

from __future__ import annotations

import math
import os

import torch

from .errors import CheckpointError
from .model import W_LIMIT
from .training_grid import VP_CLEAN_TIMESTEP, GridLookup, VPGrid

#: The guide never hands the MLP a normalised delta norm above this many times its normalisation: training sees 1 to 8,
#: the pack's tests with random tiny models at most 190; beyond it a ReLU MLP only extrapolates linearly.
MAX_DELTA_NORM_MULTIPLE = 1e3
#: ||delta|| of the check, in units of the delta normalisation: 0, then one point per decade up to the guide's clamp.
DELTA_MULTIPLES = (0.0, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, MAX_DELTA_NORM_MULTIPLE)
CHECK_LAMBDAS = (0.0, 0.5, 1.0)
#: Later grid points each Learn to Guide timestep is paired with (besides the next one and clean data).
LATER_POINTS = 4
PROMPT_SCALES = (0.0, 1.0, 4.0)
#: Work cap of one check (multiply-adds), a few tens of ms on a slow CPU core; the released checkpoint needs 1.2e8.
MAX_CHECK_MACS = 5e8
#: Rows evaluated at once (bounds the activations' memory for the widest allowed network: 4096 x 4096 floats, 64 MiB).
CHUNK_ELEMENTS = 1 << 24


def probe_sigmas(grid) -> torch.Tensor:
    """The sigmas the check evaluates at, noisiest first (float64): every grid point, the geometric midpoint of each two,
    and the ends a sampler can reach."""
    sigmas = grid.sigmas()[:-1]
    between = (sigmas[:-1] * sigmas[1:]).sqrt()
    points = torch.stack([sigmas[:-1], between], dim=1).reshape(-1) if sigmas.shape[0] > 1 else sigmas[:0]
    if isinstance(grid, VPGrid):
        schedule = grid.schedule_sigmas()
        ends = (schedule[-1:], schedule[:1])  # DDPM timesteps T - 1 and 0: the lookup clamps everything to them
    else:
        ends = (torch.ones(1, dtype=torch.float64), torch.full((1,), 1e-4, dtype=torch.float64))  # flow sigmas lie in (0, 1]
    return torch.cat([ends[0], points, sigmas[-1:], ends[1]])


def _thin(count: int, keep: int) -> torch.Tensor:
    """Indices of ``keep`` of ``count`` items, evenly spread, both ends included."""
    if count <= keep:
        return torch.arange(count)
    return torch.linspace(0, count - 1, max(keep, 2), dtype=torch.float64).round().long().unique()


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _first_bad(values: torch.Tensor) -> int | None:
    """Index of the worst value (a NaN or inf first, then the largest magnitude beyond W_LIMIT), or None when all are fine."""
    bad = ~(values.abs() <= W_LIMIT)  # NaN fails the comparison
    if not bool(bad.any()):
        return None
    nonfinite = ~torch.isfinite(values)
    if bool(nonfinite.any()):
        return int(nonfinite.nonzero()[0])
    return int(values.abs().argmax())


def _refuse(path, what: str, value: float, where: str) -> CheckpointError:
    shown = f"{value:g}" if math.isfinite(value) else str(value)
    return CheckpointError(path, f"{what} is {shown} at {where}: a checkpoint must give a finite {what} of magnitude at most "
                                 f"{W_LIMIT:g} over its whole domain (docs/design.md, section 6)")


def annealing_domain_points(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (timestep, ||delta||, lambda) the check evaluates an annealing network at, each (N,) float32 (module docstring)."""
    meta, config = model.metadata, model.config
    lookup = GridLookup(meta.training_grid, meta.timestep_convention)
    timesteps = lookup(probe_sigmas(meta.training_grid).to(torch.float32))[0]
    deltas = torch.tensor(DELTA_MULTIPLES, dtype=torch.float32) * config.delta_embed_normalization
    lambdas = torch.tensor(CHECK_LAMBDAS, dtype=torch.float32)
    per_timestep = deltas.shape[0] * lambdas.shape[0]
    timesteps = timesteps[_thin(timesteps.shape[0], int(MAX_CHECK_MACS // max(_parameters(model) * per_timestep, 1)))]
    return tuple(v.reshape(-1) for v in torch.meshgrid(timesteps, deltas, lambdas, indexing="ij"))


@torch.no_grad()
def check_annealing_domain(model, path: str | os.PathLike | None = None) -> None:
    """Refuse (CheckpointError) an annealing network whose w is not finite or beyond W_LIMIT anywhere in its domain."""
    config = model.config
    t, d, lam = annealing_domain_points(model)
    rows = max(1, CHUNK_ELEMENTS // max(config.hidden_size, config.input_size))
    for start in range(0, t.shape[0], rows):
        part = slice(start, start + rows)
        w = model(*(v[part].to(model.device) for v in (t, d, lam))).cpu()
        i = _first_bad(w)
        if i is not None:
            j = start + i
            raise _refuse(path, "w", float(w[i]), f"timestep {float(t[j]):g}, ||delta|| {float(d[j]):g}, lambda {float(lam[j]):g}")


def learned_domain_points(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The (t, s) timesteps the check evaluates a Learn to Guide network at, each (N,) float32 (module docstring), before
    thinning."""
    meta = model.metadata
    grid = meta.training_grid
    lookup = GridLookup(grid, meta.timestep_convention)
    probes = probe_sigmas(grid).to(torch.float32)
    timesteps, _, anchored_next = lookup(probes)
    grid_sigmas = grid.sigmas()[:-1].to(torch.float32)  # decreasing; clean data is added on its own
    grid_steps = lookup.timestep(grid_sigmas)
    clean = VP_CLEAN_TIMESTEP if meta.timestep_convention == "ddpm_index" else 0.0
    # for each probe, up to LATER_POINTS grid points below it, evenly spread from the first one below to the last
    count = grid_sigmas.shape[0]
    first = torch.searchsorted(-grid_sigmas, -probes, right=True)  # index of the first grid point strictly below the probe
    spread = torch.linspace(0.0, 1.0, LATER_POINTS)
    later = (first[:, None] + (spread[None, :] * (count - 1 - first)[:, None]).round().long()).clamp(max=count - 1)
    has_later = (first < count)[:, None].expand(-1, LATER_POINTS)
    # s = t: the region's diagonal edge, a step of length 0 (the limit of a sampler with ever more steps)
    t = torch.cat([timesteps, timesteps, timesteps, timesteps[:, None].expand(-1, LATER_POINTS)[has_later]])
    s = torch.cat([timesteps, anchored_next, torch.full_like(timesteps, clean), grid_steps[later][has_later]])
    return t, s


@torch.no_grad()
def check_learned_domain(model, path: str | os.PathLike | None = None) -> None:
    """Refuse (CheckpointError) a Learn to Guide network whose omega is not finite or beyond W_LIMIT for any of the
    (t, s, prompt) of the module docstring."""
    config = model.config
    t, s = learned_domain_points(model)
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(config.prompt_dim, generator=generator)
    prompts = torch.stack([scale * direction for scale in PROMPT_SCALES])
    keep = int(MAX_CHECK_MACS // max(_parameters(model) * prompts.shape[0], 1))
    index = _thin(t.shape[0], keep)
    t, s = t[index], s[index]
    rows = max(1, CHUNK_ELEMENTS // max(config.hidden_size, config.prompt_dim, config.time_hidden))
    for p, prompt in enumerate(prompts):
        for start in range(0, t.shape[0], rows):
            part = slice(start, start + rows)
            omega = model(t[part].to(model.device), s[part].to(model.device), prompt.to(model.device)).cpu()
            i = _first_bad(omega)
            if i is not None:
                j = start + i
                which = "the zero prompt embedding" if PROMPT_SCALES[p] == 0 else f"a random prompt embedding of norm {float(prompt.norm()):.3g}"
                raise _refuse(path, "omega", float(omega[i]), f"t {float(t[j]):g}, s {float(s[j]):g} with {which}")


def check_domain(model, path: str | os.PathLike | None = None) -> None:
    """The check of the network's method (``model.metadata.method``)."""
    if model.metadata.method == "learn_to_guide":
        check_learned_domain(model, path)
    else:
        check_annealing_domain(model, path)
