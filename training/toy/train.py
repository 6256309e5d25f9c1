"""Training the annealing MLP on the ring with the paper's Algorithm 1 (:func:`training.algorithm.annealing_loss`).

Everything that is the algorithm lives in ``training.algorithm`` and is shared with image training: lambda ~ U[0, 1]
per sample, t uniform over the DDIM grid but its last point, the CFG++ step renoising with eps_u, both loss terms,
CADS on the conditional branch only. What is toy-specific is the backend (:class:`ExactRingDenoiser`: exact eps,
CADS applied to the class vector) and the data: x0 ~ p(x0 | c) with c uniform, drawn fresh every step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from annealing import CheckpointMetadata, GuidanceModelConfig, GuidanceScaleModel, save_guidance_model
from training.algorithm import CADSConfig, SamplingGrid, annealing_loss

from .problem import ExactRingDenoiser, RingProblem

#: The toy's MLP: the released architecture (4-dim embeddings of t/1000, ||delta||/5, lambda; w = out + 1) with 64 hidden
#: units instead of 128: the toy's inputs are three scalars like SDXL's, and the smaller net trains as well in a few seconds.
TOY_MODEL_CONFIG = GuidanceModelConfig(hidden_size=64, delta_embed_normalization=0.5)


@dataclass(frozen=True)
class AnnealingTrainConfig:
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    sampling_steps: int = 50
    delta_weight: float = 1.0


def train_annealing(
    problem: RingProblem,
    alphas_cumprod: torch.Tensor,
    config: AnnealingTrainConfig,
    seed: int,
    progress: bool = True,
) -> tuple[GuidanceScaleModel, dict]:
    """Train a :class:`GuidanceScaleModel` with Algorithm 1; returns (model in eval mode with toy metadata, history)."""
    torch.manual_seed(seed)  # the MLP's initialisation
    generator = torch.Generator().manual_seed(seed)
    model = GuidanceScaleModel(TOY_MODEL_CONFIG)
    backend = ExactRingDenoiser(problem, alphas_cumprod, CADSConfig())
    grid = SamplingGrid.vp_ddim(config.sampling_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history = {"loss": [], "quality": [], "alignment": [], "w_mean": []}
    bar = tqdm(range(config.steps), desc=f"train annealing (seed {seed})", leave=False, disable=not progress)
    for _ in bar:
        labels = torch.randint(0, problem.num_classes, (config.batch_size,), generator=generator)
        x0 = problem.sample(labels, generator)
        terms = annealing_loss(backend, model, x0, problem.one_hot(labels), problem.uncond(config.batch_size), grid,
                               delta_weight=config.delta_weight, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        for key, value in (("loss", terms.total), ("quality", terms.quality), ("alignment", terms.alignment), ("w_mean", terms.w.mean())):
            history[key].append(float(value.detach()))
    model.eval().requires_grad_(False)
    model.metadata = CheckpointMetadata(
        model_family="toy2d",
        prediction_space="epsilon",
        timestep_convention="ddpm_index",
        trained_latent_numel=2,
        training_grid=grid.training_grid,
        training={
            "source": "training.toy (2D ring benchmark), Algorithm 1 via training.algorithm.annealing_loss",
            "problem": asdict(problem),
            "seed": seed,
            "steps": config.steps,
            "batch_size": config.batch_size,
            "optimizer": f"AdamW lr={config.lr} weight_decay={config.weight_decay}",
            "lambda_min": 0.0,
            "lambda_max": 1.0,
            "cads": asdict(CADSConfig()),
            "delta_weight": config.delta_weight,
            "base_model": "exact Gaussian-mixture denoiser, SD scaled_linear VP schedule (1000 steps)",
        },
    )
    return model, history


def save_toy_checkpoint(model: GuidanceScaleModel, path) -> None:
    """Write the trained MLP with its toy metadata (annealing's own format, loadable by annealing.load_guidance_model)."""
    save_guidance_model(model, path)
