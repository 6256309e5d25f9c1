"""The metadata a trained checkpoint carries: what it was trained for (family, prediction space, timestep convention,
latent size, the training grid) and the run's record (steps, images, the method's settings, precision, skips), read by
the nodes' compatibility check and ``python -m annealing inspect``."""

from __future__ import annotations

import math
from pathlib import Path

import annealing

from .resume_state import RunCounters
from .run_parts import RunParts
from .run_plan import RunPlan


def checkpoint_metadata(plan: RunPlan, parts: RunParts, counters: RunCounters) -> annealing.CheckpointMetadata:
    """The checkpoint's metadata after ``counters.step`` steps: the run's record (what both methods share, then the method's
    own settings)."""
    cfg, info = plan.config, plan.info
    training = {"steps": counters.step, "images": counters.images_seen}
    if plan.l2g:
        training.update({
            "method": "learn-to-guide (Galashov et al., arXiv 2510.00815)",
            "particles": cfg.l2g_particles,
            "objective": cfg.l2g_objective,
            **({"beta": cfg.l2g_beta, "lambda": cfg.l2g_lambda} if cfg.l2g_objective == "energy" else {}),
            "times": {"draw": "continuous: s ~ U[s_min, 1 - zeta - delta], t = s + U[delta, 1 - zeta - s]", "s_min": cfg.l2g_s_min,
                      "zeta": cfg.l2g_zeta, "delta": cfg.l2g_delta},
            "initial_scale": cfg.l2g_initial_scale,
            "prompt_embedding": plan.prompt_kind,
            "reward": None if cfg.l2g_reward == "none" else {"kind": "clip", "weight": cfg.l2g_reward_weight,
                                                              "model": Path(cfg.l2g_reward_model).name},
        })
    else:
        training.update({"lambda_min": cfg.lambda_min, "lambda_max": cfg.lambda_max})
    training.update({
        "base_model": info.base_model,
        "base_prediction_type": info.prediction_type,
        "resolution": plan.resolution,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "effective_batch": parts.effective_batch,
        "grid_steps": cfg.grid_steps,
    })
    if not plan.l2g:
        training.update({
            "cads": {"enabled": cfg.cads, "noise_scale": cfg.cads_noise_scale, "tau1": cfg.cads_tau1, "tau2": cfg.cads_tau2,
                     "psi": cfg.cads_psi},
            "balance": parts.balance is not None,
            "delta_weight": cfg.delta_weight,
        })
    training.update({
        "uncond": parts.backend.uncond_mode,
        "seed": cfg.seed,
        "precision": str(parts.dtype).replace("torch.", ""),
        "skipped_images": len(counters.failed_paths),
        "nan_losses": counters.nan_losses,
        "source": f"annealing-guidance-nodes training {annealing.__version__}",
    })
    if info.prediction_type == "flow":
        training["flow_spacing"] = cfg.flow_spacing
    if info.spec.video:
        training["frame_stride"] = cfg.frame_stride
    training.update(parts.backend.provenance())  # the family's: trained_latent_shape, flow_shift, shift rule, expert, ...
    if parts.balance is not None:
        training["final_delta_weight"] = cfg.delta_weight * parts.balance.weight
    return annealing.CheckpointMetadata(
        model_family=plan.family,
        prediction_space=info.prediction_space,
        timestep_convention=parts.grid.timestep_convention,
        trained_latent_numel=int(math.prod(plan.latent_shape)),
        training_grid=parts.grid.training_grid,
        training=training,
        method="learn_to_guide" if plan.l2g else "annealing",
    )
