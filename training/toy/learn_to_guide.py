"""Learn to Guide (Galashov et al., arXiv 2510.00815) on the ring, trained as the image trainer trains it.

The network is the pack's :class:`annealing.LearnToGuideNet` (ReLU output, so omega >= 0 and omega = 0, unguided, is
reachable; the log-SNR of t and s through a small MLP), its prompt the class's one-hot vector; the loss is the image
trainer's :func:`training.learn_to_guide.learn_to_guide_loss` with the exact denoiser as the frozen model: for each clean
x0 ~ p(x0 | c), continuous times s ~ U[S_min, 1 - zeta - delta], t = s + U[delta, 1 - zeta - s], m = 4 particles

    z_t^j = a_t x0 + s_t eps^j,   z_s^j = one CFG DDIM step t -> s with scale 1 + omega(c, s, t),   y^k = a_s x0 + s_s eps'^k
    loss  = mean over x0 of ED({z_s^j}, {y^k})        (the unbiased energy distance; no other term)

Sampling takes s from the sampler's own next time (the paper's rule: the pack's default for such a checkpoint), so on the
benchmark's 50-step DDIM grid the learned scale is the table 1 + omega(c, t_{i+1}, t_i) (clean data after the last step).
The network starts at omega = initial_scale - 1 everywhere (the image trainer's default CFG 3): that omega ends near 0 for
an accurate model is then something it learned, not where it started. The checkpoint is written with the method's
metadata and loaded back for sampling, as a user would.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

import annealing
from annealing.training_grid import VP_CLEAN_TIMESTEP
from training.algorithm import SamplingGrid
from training.learn_to_guide import TimeRegion, learn_to_guide_loss
from training.run_parts import initial_l2g_network

from .problem import ExactRingDenoiser, RingProblem


@dataclass(frozen=True)
class LearnToGuideConfig:
    iterations: int = 600
    batch_per_class: int = 128  # clean samples per class and iteration
    particles: int = 4  # m: noisings of each clean sample
    lr: float = 3e-3  # Adam
    hidden: int = 64
    layers: int = 2
    projection: int = 8
    initial_scale: float = 3.0  # the image trainer's default
    time_input: str = "log_snr"
    s_min: float = 0.001
    zeta: float = 0.001
    delta: float = 0.1

    @property
    def region(self) -> TimeRegion:
        return TimeRegion(s_min=self.s_min, zeta=self.zeta, delta=self.delta)


def toy_metadata(grid: SamplingGrid, problem: RingProblem, config: LearnToGuideConfig, seed: int) -> annealing.CheckpointMetadata:
    return annealing.CheckpointMetadata(
        model_family="toy2d", prediction_space="epsilon", timestep_convention="ddpm_index", trained_latent_numel=2,
        training_grid=grid.training_grid, method="learn_to_guide",
        training={"source": "training.toy (2D ring benchmark), Learn to Guide via training.learn_to_guide.learn_to_guide_loss",
                  "problem": asdict(problem), "seed": seed, **asdict(config), "objective": "energy", "beta": 1.0, "lambda": 1.0,
                  "base_model": "exact Gaussian-mixture denoiser, SD scaled_linear VP schedule (1000 steps)"},
    )


def train_learn_to_guide(problem: RingProblem, grid: SamplingGrid, config: LearnToGuideConfig, seed: int, progress: bool = True,
                         history: list | None = None) -> annealing.LearnToGuideNet:
    """The trained network (eval mode, with its metadata); ``history`` collects the loss of every iteration."""
    generator = torch.Generator().manual_seed(seed)
    classes = problem.num_classes
    net_config = annealing.LearnToGuideConfig(prompt_dim=classes, projection_size=config.projection, hidden_size=config.hidden,
                                              n_layers=config.layers, time_input=config.time_input, time_min=config.s_min,
                                              time_max=1.0 - config.zeta)
    metadata = toy_metadata(grid, problem, config, seed)
    with torch.random.fork_rng():  # the network's initialisation, leaving the global generator as it was
        torch.manual_seed(seed)
        net = initial_l2g_network(net_config, config.initial_scale, metadata)
    backend = ExactRingDenoiser(problem, grid.training_grid.alphas_cumprod())
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    labels = torch.arange(classes).repeat_interleave(config.batch_per_class)
    cond, uncond, region = problem.one_hot(labels), problem.uncond(1), config.region
    for _ in tqdm(range(config.iterations), desc=f"train learn-to-guide (seed {seed})", leave=False, disable=not progress):
        x0 = problem.sample(labels, generator)
        terms = learn_to_guide_loss(backend, net, x0, cond, uncond, grid, cond, particles=config.particles, region=region, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        if history is not None:
            history.append(float(terms.total.detach()))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def scale_table(net: annealing.LearnToGuideNet, problem: RingProblem, grid: SamplingGrid) -> torch.Tensor:
    """(C, N) CFG scales 1 + omega(c, s, t) of each class for each step of ``grid`` (t its point, s the next one, clean
    data after the last): what sampling that grid applies."""
    t = grid.mlp_timesteps.float()
    s = torch.cat([t[1:], torch.tensor([VP_CLEAN_TIMESTEP])])
    classes = problem.num_classes
    onehot = problem.one_hot(torch.arange(classes).repeat_interleave(t.shape[0]))
    return (1 + net(t.repeat(classes), s.repeat(classes), onehot)).reshape(classes, -1)
