"""What a planned run loads before its first step: the processes (HF Accelerate), the frozen diffusion model with its
training grid and unconditional embedding, the network that trains and its optimizer, and the decisions that need the
device (precision, loss scale, gradient checkpointing).

Loading is the slow part of a start (seconds to minutes for a full-size model), so it happens only once
:func:`training.run_plan.plan_run` has passed every check; :func:`load_parts` writes nothing.
"""

from __future__ import annotations

import math
import os
import resource
import sys
from dataclasses import dataclass

import torch

import annealing

from . import memory
from .algorithm import CADSConfig, RunningBalance, SamplingGrid
from .backends import FrozenDiffusionBackend, TextCondition, load_backend
from .errors import TrainingError
from .run_plan import RunPlan

FP16_LOSS_SCALE = 1024.0


@dataclass(frozen=True)
class RunParts:
    """The live objects of a run, loaded from its plan (the objects change as they train; which ones they are does not)."""

    accelerator: object  # accelerate.Accelerator
    device: torch.device
    dtype: torch.dtype  # the frozen network's
    loss_scale: float  # static fp16 loss scale (1 where none is needed)
    backend: FrozenDiffusionBackend
    grid: SamplingGrid  # the timesteps training draws from
    uncond: TextCondition
    gradient_checkpointing: bool
    memory_line: str  # the one line that explains the checkpointing decision
    mlp: torch.nn.Module  # the network that trains (prepared by Accelerate: DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    balance: RunningBalance | None  # annealing's running balance of its two loss terms, where it is on
    effective_batch: int  # images per optimizer step over all processes
    total_steps: int
    reward: object | None = None  # Learn to Guide's reward variant: a training.reward.ClipReward, or None

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def world_line(acc) -> str:
    """The first line a run prints: how many processes really run (a launcher can silently start fewer than asked)."""
    world = acc.num_processes
    kind = str(getattr(acc.distributed_type, "value", acc.distributed_type))
    return f"world size {world}: {world} process{'es' if world > 1 else ''} ({kind}), this one on {acc.device}"


def single_process_hint(world: int, env=os.environ) -> str | None:
    """A launcher that was asked for N processes but started one leaves MASTER_ADDR without WORLD_SIZE behind
    (``accelerate launch --cpu --num_processes N`` does: its simple launcher runs one plain process)."""
    if world == 1 and env.get("MASTER_ADDR") and not env.get("WORLD_SIZE"):
        return ("warning: MASTER_ADDR is set but only one process runs (`accelerate launch --cpu --num_processes N` starts one); "
                "for N CPU processes use `accelerate launch --multi_gpu --num_processes N -m training --device cpu ...` "
                "or `torchrun --standalone --nproc_per_node N -m training --device cpu ...`")
    return None


def resolve_precision(name: str, device: torch.device, half: str = "fp16") -> torch.dtype:
    """The frozen network's dtype. auto: float32 on the CPU; float16 on a GPU, the fastest setting that kept the ||delta||
    error under 1 % on a full-size SDXL UNet at ||delta|| / ||eps|| down to 0.018 (bf16: 27 % there; float16 with fp32
    weights under autocast: the same error as float16 weights, so no reason to pay for it). benchmarks/delta_precision.py
    measures it; the numbers are in docs/training.md. ``half``: the family's half precision (bf16 for networks that
    overflow float16)."""
    if name == "auto":
        return (torch.float16 if half == "fp16" else torch.bfloat16) if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def initial_l2g_network(config: annealing.LearnToGuideConfig, initial_scale: float, metadata=None) -> annealing.LearnToGuideNet:
    """A Learn to Guide network that gives the CFG scale ``initial_scale`` > 1 at every step and prompt: its output layer's
    weights are zero and its bias is omega_0 = initial_scale - 1 (relu output; softplus^-1(omega_0) for a softplus one).
    The other layers keep torch's initialisation; they receive gradients from the first optimizer step on, once the
    output weights have moved. Not unguided (omega_0 = 0): at 0 the ReLU's gradient is 0 and the network would never
    move. ``metadata`` (its training grid and timestep convention) gives a log_snr network its noise schedule."""
    if not initial_scale > 1.0:
        raise ValueError(f"the initial CFG scale must exceed 1 (omega > 0, where the ReLU output has a gradient), got {initial_scale!r}")
    net = annealing.LearnToGuideNet(config, metadata).to(torch.float32)
    omega = initial_scale - 1.0
    with torch.no_grad():
        net.head[-1].weight.zero_()
        # softplus: log(exp(omega) - 1), stable for small and large omega
        net.head[-1].bias.fill_(omega if config.output == "relu" else omega + math.log(-math.expm1(-omega)))
    return net


def load_parts(plan: RunPlan) -> RunParts:
    """Start the processes and load everything the plan names (see the module docstring); prints what it decided."""
    from accelerate import Accelerator

    cfg = plan.config
    acc = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation, cpu=cfg.device == "cpu", mixed_precision="no")
    acc.print(world_line(acc))
    hint = single_process_hint(acc.num_processes)
    if hint:
        acc.print(hint)
    if cfg.device == "cuda" and acc.device.type != "cuda":
        raise TrainingError("--device cuda was asked for but no CUDA device is available")
    dtype = resolve_precision(cfg.precision, acc.device, plan.info.spec.half_precision(plan.info))
    ignored = cfg.inapplicable()
    if ignored:
        acc.print(f"note: this {cfg.method} run does not use {', '.join(ignored)} (set away from the default{'s' if len(ignored) > 1 else ''})")
    cads = CADSConfig(cfg.cads_noise_scale, cfg.cads_tau1, cfg.cads_tau2, cfg.cads_psi, cfg.cads)
    vae_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32  # the SDXL VAE overflows in fp16
    backend = load_backend(
        plan.info, device=acc.device, dtype=dtype, resolution=plan.resolution, load_text_encoders=plan.embeddings is None,
        use_t5=cfg.sd3_t5, uncond=cfg.uncond, cads=cads, gradient_checkpointing=bool(cfg.gradient_checkpointing) and not plan.l2g,
        vae_dtype=vae_dtype, load_vae=not (plan.embeddings and plan.embeddings.latents), frames=plan.frames, expert=cfg.expert,
    )
    if cfg.fsdp:
        from .backends.sharding import shard_network

        backend.network = shard_network(backend, acc)
    grid = backend.grid(cfg.grid_steps, flow_spacing=cfg.flow_spacing)
    if backend.grid_note:
        acc.print(f"note: {backend.grid_note}")
    uncond = backend.unconditional(plan.embeddings.uncond() if plan.embeddings else None)
    width, pooled = backend.condition_width()
    if uncond.embeds.shape[-1] != width or (pooled is not None and (uncond.pooled is None or uncond.pooled.shape[-1] != pooled)):
        raise TrainingError(f"{cfg.embeddings}: embedding widths do not match the model (expected {width} tokens / {pooled} pooled)")
    checkpointing, memory_line = _decide_checkpointing(plan, acc, backend, grid, uncond)

    torch.manual_seed(cfg.seed)  # the same initial network on every process
    reward = None
    if plan.l2g:
        schedule = annealing.CheckpointMetadata(model_family=plan.family, prediction_space=plan.info.prediction_space,
                                                timestep_convention=grid.timestep_convention, training_grid=grid.training_grid,
                                                trained_latent_numel=None, method="learn_to_guide")
        network = initial_l2g_network(plan.network_config, cfg.l2g_initial_scale, schedule)
        if cfg.l2g_reward == "clip":
            from .reward import ClipReward

            reward = ClipReward.from_folder(cfg.l2g_reward_model, acc.device)
            acc.print(f"reward: CLIP score from {cfg.l2g_reward_model} (weight gamma_R {cfg.l2g_reward_weight:g}), through the VAE decode")
    else:
        network = annealing.GuidanceScaleModel(plan.network_config).to(torch.float32)
    optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    mlp, optimizer = acc.prepare(network, optimizer)
    balanced = not plan.l2g and (cfg.balance == "on" or (cfg.balance == "auto" and plan.info.prediction_space == "velocity"))
    effective_batch = cfg.batch_size * cfg.gradient_accumulation * acc.num_processes
    return RunParts(
        accelerator=acc, device=acc.device, dtype=dtype,
        # the static loss scale protects fp16 gradients through the frozen model; learn-to-guide has no backward through it
        loss_scale=FP16_LOSS_SCALE if dtype == torch.float16 and not plan.l2g else 1.0,
        backend=backend, grid=grid, uncond=uncond, gradient_checkpointing=checkpointing, memory_line=memory_line, mlp=mlp,
        optimizer=optimizer, balance=RunningBalance(momentum=cfg.balance_momentum) if balanced else None, effective_batch=effective_batch,
        total_steps=cfg.max_steps or max(1, math.ceil(cfg.images / effective_batch)), reward=reward,
    )


def _decide_checkpointing(plan: RunPlan, acc, backend, grid, uncond) -> tuple[bool, str]:
    """Off unless set, or unless pass 2's activations would not fit the device (training.memory); one log line."""
    cfg = plan.config
    if plan.l2g:
        line = "gradient checkpointing off: learn-to-guide runs the frozen model without a graph (no backward through it)"
        acc.print(line)
        return False, line
    estimate = None
    if cfg.gradient_checkpointing is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
        try:
            estimate = memory.estimate_step_memory(backend, grid, plan.latent_shape, cfg.batch_size, uncond, local)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    on, line = memory.decide(cfg.gradient_checkpointing, estimate, acc.device)
    if acc.num_processes > 1 and cfg.gradient_checkpointing is None:  # one decision for all: the process that is short wins
        anyone = float(acc.reduce(torch.tensor(float(on), device=acc.device), "sum")) > 0
        if anyone and not on:
            on, line = True, line.replace("off (auto)", "on (auto, another process is short of memory)")
    if on and not cfg.gradient_checkpointing:
        backend.network.enable_gradient_checkpointing()
    acc.print(line)
    return on, line
