"""The training loop: Algorithm 1 (``training.algorithm.annealing_loss``) over a frozen diffusion model, with HF Accelerate;
with ``method: learn-to-guide`` the same loop trains a Learn to Guide network (``training.learn_to_guide``) instead.

Order of work: every check that can fail on bad input (config, output folder, dataset, model kind and prediction type,
embeddings, resume state) runs before any model weight is loaded. Then, per micro-batch:

    latents = VAE(image);  cond = text encoders(caption) or precomputed embeddings
    terms   = annealing_loss(backend, mlp, latents, cond, uncond, grid, ...)    (the CFG++ step is annealing.cfgpp_step)
              or learn_to_guide_loss(..., prompt embedding of cond, ...)          (m particles, one guided step, energy distance)
    backward of terms.total (skipped and counted when it is NaN/inf; a zero loss keeps multi-GPU processes in step)

and every ``gradient_accumulation`` micro-batches one AdamW step on the MLP (float32 always; ``precision`` only sets
the frozen model's dtype). Randomness is a pure function of (seed, global micro-batch index = local index x processes
+ rank): the data order (:class:`training.data.MicroBatchSampler`) and a generator re-seeded for every micro-batch (VAE
sampling, lambda, timestep, noise, CADS). A resumed run therefore continues exactly as the uninterrupted run would have,
and P processes with accumulation A train what one process with accumulation P x A trains (to float rounding).

Files in the output folder:
* ``<name>.safetensors``: the trained checkpoint (final), loadable by ``annealing.load_guidance_model`` and the nodes;
* ``checkpoints/<name>-step000250.safetensors``: periodic checkpoints (the last ``keep_checkpoints`` are kept);
* ``resume.pt``: MLP, optimizer, step, counters, balance EMA and the seed (plain tensors and dicts, read back with
  ``torch.load(weights_only=True)``); every file is written to a temporary name and renamed;
* ``train_log.jsonl``: one line every ``log_every`` steps; ``training_report.json``: the final report.

A folder that holds a resumable or finished run is refused unless ``--resume`` continues it or ``--overwrite`` starts
again (removing only the files above, for the run's output names). Temporary files a killed run left are removed when
a run starts; a folder whose run was killed before its first resume state was complete starts again by itself.
"""

from __future__ import annotations

import glob
import json
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

import annealing
from annealing.checkpoint import atomic_write

from . import memory
from .algorithm import CADSConfig, LossTerms, RunningBalance, annealing_loss
from .backends import FrozenDiffusionBackend, ModelInfo, TextCondition, default_resolution, detect_model, load_backend
from .config import CHOICES, TrainConfig
from .data import EmbeddingStore, ImageCaptionDataset, MicroBatchSampler, collate, scan_dataset
from .errors import TrainingError
from .files import shown
from .learn_to_guide import GuideTerms, learn_to_guide_loss

RESUME_FORMAT = "annealing-training-resume"
RESUME_FILE = "resume.pt"
LOG_FILE = "train_log.jsonl"
REPORT_FILE = "training_report.json"
CURVES_FILE = "training_curves.png"
WRITE_TEST_PREFIX = ".write-test-"
#: Counters of the resume state (non-negative integers).
RESUME_COUNTERS = ("step", "micro_step", "images_seen", "nan_losses", "skipped_steps", "skipped_image_events")
#: Settings a resumed run must share with the run it continues (others, e.g. max_steps, may change).
RESUME_LOCKED = ("mlp_hidden", "mlp_layers", "delta_normalization", "grid_steps", "flow_spacing", "model_family_resolved",
                 "resolution_resolved")
#: Locked settings that resume states written before they existed lack, and the value those runs had.
LOCKED_DEFAULTS = {"method": "annealing", "frames_resolved": 1, "expert": "auto"}
#: Settings whose change a resume warns about (the run continues, but no longer reproduces an uninterrupted one).
RESUME_WARNED = ("effective_batch", "seed", "l2g_particles", "l2g_objective")
FP16_LOSS_SCALE = 1024.0


def ensure_writable(folder: Path) -> None:
    """Check that ``folder`` is a writable folder, or can be created as one, without creating it (one-line error).

    The folder is only made once every check has passed, so a refused run leaves nothing behind."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TrainingError(f"{folder}: the output path exists and is not a folder")
    if folder.is_dir():
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=WRITE_TEST_PREFIX, delete=True):
                pass
        except OSError as exc:
            raise TrainingError(f"{folder}: output folder is not writable ({exc.strerror or exc})") from None
        return
    parent = folder.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise TrainingError(f"{folder}: cannot create the output folder, {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrainingError(f"{folder}: cannot create the output folder, {parent} is not writable")


def run_files(output: Path, names) -> list[Path]:
    """The files of a training run in ``output`` that exist: for each output name its final and periodic checkpoints,
    and the run's resume state, log, report and curves. Nothing else in the folder is the run's."""
    found = [output / f for f in (RESUME_FILE, LOG_FILE, REPORT_FILE, CURVES_FILE)]
    for name in sorted(set(names)):
        found.append(output / f"{name}.safetensors")
        found += sorted((output / "checkpoints").glob(f"{glob.escape(name)}-step*.safetensors"))
    return [path for path in found if path.is_file() or path.is_symlink()]


def stale_temp_files(output: Path, names) -> list[Path]:
    """Temporary files that a killed run left behind (``atomic_write`` names them ``.<file>.<random>.tmp``)."""
    found = list(output.glob(f"{WRITE_TEST_PREFIX}*"))
    for fixed in (RESUME_FILE, LOG_FILE, REPORT_FILE, CURVES_FILE):
        found += output.glob(f".{glob.escape(fixed)}.*.tmp")
    for name in sorted(set(names)):
        found += output.glob(f".{glob.escape(name)}.safetensors.*.tmp")
        found += (output / "checkpoints").glob(f".{glob.escape(name)}-step*.safetensors.*.tmp")
    return sorted(path for path in found if path.is_file() or path.is_symlink())


def default_output_name(method: str, family) -> str:
    """The checkpoint's file name without extension: annealing_<family> or learn_to_guide_<family>."""
    return f"{'learn_to_guide' if method == 'learn-to-guide' else 'annealing'}_{family}"


def initial_l2g_network(config: annealing.LearnToGuideConfig, initial_scale: float) -> annealing.LearnToGuideNet:
    """A Learn to Guide network that gives the CFG scale ``initial_scale`` at every step and prompt: its output layer's
    weights are zero and its bias is softplus^-1(initial_scale - 1). The other layers keep torch's initialisation; they
    receive gradients from the first optimizer step on, once the output weights have moved."""
    net = annealing.LearnToGuideNet(config).to(torch.float32)
    omega = initial_scale - 1.0
    with torch.no_grad():
        net.head[-1].weight.zero_()
        net.head[-1].bias.fill_(omega + math.log(-math.expm1(-omega)))  # log(exp(omega) - 1), stable for small and large omega
    return net


def micro_seed(seed: int, global_micro: int) -> int:
    """Seed of the generator for global micro-batch ``global_micro`` (= local index x processes + rank). Keyed to the
    global index, not to the process, so P processes x A accumulation draw what 1 process x P * A draws."""
    return (seed * 1_000_003 + global_micro * 104_729 + 12_345) % (2**63 - 1)


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


@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    images_seen: int
    skipped_images: list[str] = field(default_factory=list)
    skipped_image_events: int = 0
    missing_captions: int = 0
    nan_losses: int = 0
    skipped_steps: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    peak_memory_bytes: int = 0
    resumed_from: int | None = None
    last_terms: dict = field(default_factory=dict)
    world_size: int = 1

    def to_dict(self) -> dict:
        return {
            "world_size": self.world_size,
            "checkpoint": str(self.checkpoint),
            "steps": self.steps,
            "images_seen": self.images_seen,
            "skipped_images": len(self.skipped_images),
            "skipped_image_paths": self.skipped_images[:50],
            "skipped_image_events": self.skipped_image_events,
            "skipped_missing_captions": self.missing_captions,
            "nan_losses": self.nan_losses,
            "skipped_steps": self.skipped_steps,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 4),
            "peak_memory_bytes": self.peak_memory_bytes,
            "resumed_from": self.resumed_from,
            "last_terms": self.last_terms,
        }


class Trainer:
    """``Trainer(config).run()``; ``preflight()`` alone performs every input check without loading weights."""

    def __init__(self, config: TrainConfig, progress: bool = True):
        self.config = config
        self.progress = progress
        self.info: ModelInfo | None = None
        self.backend: FrozenDiffusionBackend | None = None

    # ------------------------------------------------------------------------------------------------ checks
    def preflight(self) -> None:
        """Every check that bad input can fail, before any weight is loaded and before anything is written: the output
        folder is created only when training starts (``_prepare_output``)."""
        cfg = self.config.validate()
        self.output = Path(cfg.output)
        ensure_writable(self.output)
        scan_dataset(cfg.dataset, cfg.caption_extension, skip_missing_captions=True, videos=True)  # dataset errors first, as always
        self.info = detect_model(cfg.model, cfg.config_folder)
        # then the samples the family reads (clips only for the video families), with the caption rule asked for
        self.scan = scan_dataset(cfg.dataset, cfg.caption_extension, cfg.skip_missing_captions, videos=self.info.spec.video)
        self.family = cfg.model_family or self.info.family
        self.resolution = cfg.resolution or default_resolution(self.info.family, self.info.prediction_type)
        self.frames = cfg.frames or self.info.default_frames  # 1 for image families
        self.latent_shape = self.info.latent_shape(self.resolution, self.frames)
        self.info.spec.check_options(self.info, cfg.expert, cfg.fsdp, cfg.precision)
        self.embeddings = None
        if cfg.embeddings:
            self.embeddings = EmbeddingStore(cfg.embeddings)
            if self.embeddings.latents is not None:
                self.embeddings.check_latents(self.resolution, self.frames, cfg.frame_stride, self.latent_shape)
            if self.embeddings.model_family != self.info.family:
                raise TrainingError(
                    f"{cfg.embeddings}: embeddings were made for a {self.embeddings.model_family} model, the model is {self.info.family}"
                )
            missing = self.embeddings.missing([s.caption for s in self.scan.samples])
            if missing:
                raise TrainingError(f"{cfg.embeddings}: {len(missing)} captions have no embedding (e.g. {missing[0][:60]!r}); re-run `python -m training embed`")
        self.l2g = cfg.method == "learn-to-guide"
        self.output_name = cfg.output_name or default_output_name(cfg.method, self.family)
        if self.l2g:  # the prompt input's width comes from the model's configs: the architecture is known before any load
            self.prompt_kind, prompt_dim = self.info.prompt_embedding()
            try:
                self.network_config = cfg.l2g_network_config(prompt_dim, self.prompt_kind)
            except ValueError as exc:
                raise TrainingError(f"learn-to-guide network settings (l2g_hidden, l2g_layers, l2g_projection): {exc}") from None
        else:
            self.network_config = annealing.GuidanceModelConfig(hidden_size=cfg.mlp_hidden, n_layers=cfg.mlp_layers,
                                                                delta_embed_normalization=cfg.delta_normalization)
        self.locked = {
            "method": cfg.method,
            "mlp_hidden": None if self.l2g else cfg.mlp_hidden,  # annealing's architecture; None where it does not apply
            "mlp_layers": None if self.l2g else cfg.mlp_layers,
            "delta_normalization": None if self.l2g else cfg.delta_normalization,
            "grid_steps": cfg.grid_steps,
            "flow_spacing": cfg.flow_spacing if self.info.prediction_type == "flow" else None,  # the grid of flow models
            "model_family_resolved": self.family,
            "resolution_resolved": self.resolution,
            "frames_resolved": self.frames,  # the latent shape, with the resolution
            "expert": cfg.expert,  # Wan 2.2 A14B: which network, and which part of the grid
        }
        if self.l2g:
            self.locked.update(l2g_hidden=cfg.l2g_hidden, l2g_layers=cfg.l2g_layers, l2g_projection=cfg.l2g_projection)
        self.resume_state = self._read_resume() if cfg.resume else None
        self._plan_output()

    def _read_resume(self) -> dict:
        path = self.output / RESUME_FILE
        if not path.exists():
            raise TrainingError(f"{path}: --resume given but there is no resume state in the output folder")
        state = load_resume_state(path)
        saved = json.loads(state["locked"])
        for key, value in self.locked.items():
            before = saved.get(key, LOCKED_DEFAULTS.get(key))
            if before != value:
                raise TrainingError(f"{path}: cannot resume, {key} was {shown(before)} and is now {shown(value)}")
        problem = resume_shape_problem(state, self.network_config)
        if problem:
            raise TrainingError(f"{path}: malformed resume state ({problem}); start again without --resume")
        return state

    def _plan_output(self) -> None:
        """Decide what becomes of what the output folder holds; nothing is changed before training starts.

        A folder with a finished or resumable run (a valid resume state, or this run's final checkpoint) is refused
        unless ``--resume`` continues it or ``--overwrite`` starts again; the files of a run that left neither (it was
        killed before its first resume state was complete) are removed, and the run starts again, saying so."""
        cfg = self.config
        self.run_names = {self.output_name}
        self.remove_at_start: list[Path] = []
        self.output_note: str | None = None
        if not self.output.is_dir():
            return
        if self.resume_state is not None:
            self.run_names.add(_run_name(self.resume_state))
            return
        state, problem = None, ""
        if (self.output / RESUME_FILE).exists():
            try:
                state = load_resume_state(self.output / RESUME_FILE)
                self.run_names.add(_run_name(state))
            except TrainingError as exc:
                reason = str(exc).removeprefix(f"{self.output / RESUME_FILE}: ").split("; start again")[0]
                problem = f" ({RESUME_FILE} is unusable: {reason})"
        final = self.output / f"{self.output_name}.safetensors"
        held = ([f"a resume state at step {state['step']}"] if state is not None else []) + ([final.name] if final.exists() else [])
        if held and not cfg.overwrite:
            raise TrainingError(f"{self.output} holds a training run ({', '.join(held)}); pass --resume to continue it or --overwrite to start again")
        self.remove_at_start = run_files(self.output, self.run_names)
        if held and self.remove_at_start:
            self.output_note = f"--overwrite: removing the {len(self.remove_at_start)} file(s) of the earlier run in {self.output}"
        elif self.remove_at_start:
            self.output_note = (f"{self.output}: an earlier run left no resume state and no final checkpoint{problem}; starting again "
                                f"(removing its {len(self.remove_at_start)} file(s))")

    def _prepare_output(self) -> None:
        """Create the output folder (only now, so a run refused by any check leaves none), remove what ``_plan_output``
        chose and the temporary files a killed run left; main process only, the others wait."""
        acc = self.accelerator
        if acc.is_main_process:
            try:
                self.output.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TrainingError(f"{self.output}: cannot create the output folder ({exc.strerror or exc})") from None
            if self.output_note:
                acc.print(self.output_note)
            for path in self.remove_at_start + stale_temp_files(self.output, self.run_names):
                path.unlink(missing_ok=True)
        acc.wait_for_everyone()

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate import Accelerator

        cfg = self.config
        self.accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation, cpu=cfg.device == "cpu", mixed_precision="no")
        acc = self.accelerator
        self.world = acc.num_processes
        acc.print(world_line(acc))
        hint = single_process_hint(self.world)
        if hint:
            acc.print(hint)
        if cfg.device == "cuda" and acc.device.type != "cuda":
            raise TrainingError("--device cuda was asked for but no CUDA device is available")
        self.device = acc.device
        self.dtype = resolve_precision(cfg.precision, self.device, self.info.spec.half_precision(self.info))
        # the static loss scale protects fp16 gradients through the frozen model; learn-to-guide has none
        self.loss_scale = FP16_LOSS_SCALE if self.dtype == torch.float16 and not self.l2g else 1.0
        ignored = cfg.inapplicable()
        if ignored:
            acc.print(f"note: method {cfg.method} does not use {', '.join(ignored)} (set away from the default{'s' if len(ignored) > 1 else ''})")
        self.cads = CADSConfig(cfg.cads_noise_scale, cfg.cads_tau1, cfg.cads_tau2, cfg.cads_psi, cfg.cads)
        vae_dtype = torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float32  # the SDXL VAE overflows in fp16
        self.backend = load_backend(
            self.info, device=self.device, dtype=self.dtype, resolution=self.resolution, load_text_encoders=self.embeddings is None,
            use_t5=cfg.sd3_t5, uncond=cfg.uncond, cads=self.cads, gradient_checkpointing=bool(cfg.gradient_checkpointing) and not self.l2g,
            vae_dtype=vae_dtype, load_vae=not (self.embeddings and self.embeddings.latents), frames=self.frames, expert=cfg.expert,
        )
        if cfg.fsdp:
            from .backends.sharding import shard_network

            self.backend.network = shard_network(self.backend, acc)
        self.grid = self.backend.grid(cfg.grid_steps, flow_spacing=cfg.flow_spacing)
        if self.backend.grid_note:
            acc.print(f"note: {self.backend.grid_note}")
        self.uncond = self.backend.unconditional(self.embeddings.uncond() if self.embeddings else None)
        width, pooled = self.backend.condition_width()
        if self.uncond.embeds.shape[-1] != width or (pooled is not None and (self.uncond.pooled is None or self.uncond.pooled.shape[-1] != pooled)):
            raise TrainingError(f"{cfg.embeddings}: embedding widths do not match the model (expected {width} tokens / {pooled} pooled)")
        self.gradient_checkpointing = self._decide_checkpointing()

        torch.manual_seed(cfg.seed)  # the same initial network on every process
        if self.l2g:
            mlp = initial_l2g_network(self.network_config, cfg.l2g_initial_scale)
        else:
            mlp = annealing.GuidanceScaleModel(self.network_config).to(torch.float32)
        optimizer = torch.optim.AdamW(mlp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.mlp, self.optimizer = acc.prepare(mlp, optimizer)
        self.balance = RunningBalance(momentum=cfg.balance_momentum) if self._balance_on() else None

        self.effective_batch = cfg.batch_size * cfg.gradient_accumulation * self.world
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.images / self.effective_batch))
        self.step = 0
        self.images_seen = 0
        self.nan_losses = 0
        self.skipped_steps = 0
        self.skipped_events = 0
        self.failed_paths: set[str] = set()
        if self.resume_state is not None:
            self._apply_resume(self.resume_state)

    def _decide_checkpointing(self) -> bool:
        """Off unless set, or unless pass 2's activations would not fit the device (training.memory); one log line."""
        cfg, acc = self.config, self.accelerator
        if self.l2g:
            self.memory_line = "gradient checkpointing off: learn-to-guide runs the frozen model without a graph (no backward through it)"
            acc.print(self.memory_line)
            return False
        estimate = None
        if cfg.gradient_checkpointing is None:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            try:
                estimate = memory.estimate_step_memory(self.backend, self.grid, self.latent_shape, cfg.batch_size, self.uncond, local)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
        on, line = memory.decide(cfg.gradient_checkpointing, estimate, self.device)
        if self.world > 1 and cfg.gradient_checkpointing is None:  # one decision for all: the process that is short wins
            anyone = float(acc.reduce(torch.tensor(float(on), device=self.device), "sum")) > 0
            if anyone and not on:
                on, line = True, line.replace("off (auto)", "on (auto, another process is short of memory)")
        if on and not cfg.gradient_checkpointing:
            self.backend.network.enable_gradient_checkpointing()
        self.memory_line = line
        acc.print(line)
        return on

    def _balance_on(self) -> bool:
        mode = self.config.balance
        if self.l2g:
            return False  # one loss term: nothing to balance
        return mode == "on" or (mode == "auto" and self.info.prediction_space == "velocity")

    def _apply_resume(self, state: dict) -> None:
        self.accelerator.unwrap_model(self.mlp).load_state_dict(state["mlp"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.images_seen = int(state["images_seen"])
        self.nan_losses = int(state["nan_losses"])
        self.skipped_steps = int(state["skipped_steps"])
        self.skipped_events = int(state["skipped_image_events"])
        self.failed_paths = set(json.loads(state["failed_paths"]))
        if self.balance is not None and state.get("balance_quality") is not None:
            self.balance.quality = float(state["balance_quality"])
            self.balance.alignment = float(state["balance_alignment"])
        saved, now = json.loads(state["locked"]), self._resume_locked()
        names = {"effective_batch": "batch size, accumulation or process count"}
        changed = [names.get(key, key) for key in RESUME_WARNED if key in now and saved.get(key) != now[key]]
        if changed:
            self.accelerator.print(f"warning: {'; '.join(changed)} differ from the resumed run; training continues but will not reproduce "
                                   "an uninterrupted run")

    def _resume_locked(self) -> dict:
        """What the resume state records of the run's settings: the locked ones and those a resume warns about."""
        cfg, extra = self.config, {}
        if self.l2g:
            extra = {"l2g_particles": cfg.l2g_particles, "l2g_objective": cfg.l2g_objective}
        return dict(self.locked, effective_batch=self.effective_batch, seed=cfg.seed, **extra)

    # ------------------------------------------------------------------------------------------------ metadata and saving
    def metadata(self) -> annealing.CheckpointMetadata:
        """The checkpoint's metadata: the run's record (what both methods share, then the method's own settings)."""
        cfg = self.config
        training = {"steps": self.step, "images": self.images_seen}
        if self.l2g:
            training.update({
                "method": "learn-to-guide (Galashov et al., arXiv 2510.00815)",
                "particles": cfg.l2g_particles,
                "objective": cfg.l2g_objective,
                "step_to": "the training grid's next point (clean data after the last)",
                "initial_scale": cfg.l2g_initial_scale,
                "prompt_embedding": self.prompt_kind,
            })
        else:
            training.update({"lambda_min": cfg.lambda_min, "lambda_max": cfg.lambda_max})
        training.update({
            "base_model": self.info.base_model,
            "base_prediction_type": self.info.prediction_type,
            "resolution": self.resolution,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "effective_batch": self.effective_batch,
            "grid_steps": cfg.grid_steps,
        })
        if not self.l2g:
            training.update({
                "cads": {"enabled": cfg.cads, "noise_scale": cfg.cads_noise_scale, "tau1": cfg.cads_tau1, "tau2": cfg.cads_tau2,
                         "psi": cfg.cads_psi},
                "balance": self.balance is not None,
                "delta_weight": cfg.delta_weight,
            })
        training.update({
            "uncond": self.backend.uncond_mode,
            "seed": cfg.seed,
            "precision": str(self.dtype).replace("torch.", ""),
            "skipped_images": len(self.failed_paths),
            "nan_losses": self.nan_losses,
            "source": f"annealing-guidance-nodes training {annealing.__version__}",
        })
        if self.info.prediction_type == "flow":
            training["flow_spacing"] = cfg.flow_spacing
        if self.info.spec.video:
            training["frame_stride"] = cfg.frame_stride
        training.update(self.backend.provenance())  # the family's: trained_latent_shape, flow_shift, shift rule, expert, ...
        if self.balance is not None:
            training["final_delta_weight"] = cfg.delta_weight * self.balance.weight
        return self._metadata_with(training, "learn_to_guide" if self.l2g else "annealing")

    def _metadata_with(self, training: dict, method: str) -> annealing.CheckpointMetadata:
        return annealing.CheckpointMetadata(
            model_family=self.family,
            prediction_space=self.info.prediction_space,
            timestep_convention=self.grid.timestep_convention,
            trained_latent_numel=int(math.prod(self.latent_shape)),
            training_grid=self.grid.training_grid,
            training=training,
            method=method,
        )

    def save(self, final: bool = False) -> Path:
        """Write the checkpoint (periodic or final) and then the resume state; main process only."""
        acc = self.accelerator
        model = acc.unwrap_model(self.mlp)
        metadata = self.metadata()
        if final:
            path = self.output / f"{self.output_name}.safetensors"
        else:
            (self.output / "checkpoints").mkdir(exist_ok=True)
            path = self.output / "checkpoints" / f"{self.output_name}-step{self.step:06d}.safetensors"
        annealing.save_guidance_model(model, path, metadata)
        if not final:
            self._prune_checkpoints()
        self.save_resume()
        return path

    def save_resume(self) -> None:
        locked = self._resume_locked()
        state = {
            "format": RESUME_FORMAT,
            "version": 1,
            "step": self.step,
            "micro_step": self.step * self.config.gradient_accumulation,
            "images_seen": self.images_seen,
            "nan_losses": self.nan_losses,
            "skipped_steps": self.skipped_steps,
            "skipped_image_events": self.skipped_events,
            "failed_paths": json.dumps(sorted(self.failed_paths)),
            "seed": self.config.seed,
            "mlp": {k: v.detach().cpu() for k, v in self.accelerator.unwrap_model(self.mlp).state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "balance_quality": None if self.balance is None else self.balance.quality,
            "balance_alignment": None if self.balance is None else self.balance.alignment,
            "locked": json.dumps(locked, sort_keys=True),
            "config": self.config.to_json(),
        }
        atomic_write(self.output / RESUME_FILE, lambda tmp: _torch_save(state, tmp))

    def _prune_checkpoints(self) -> None:
        keep = self.config.keep_checkpoints
        found = sorted((self.output / "checkpoints").glob(f"{self.output_name}-step*.safetensors"))
        for old in found[: max(0, len(found) - keep)] if keep > 0 else found:
            old.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------ the loss
    def compute_loss(self, latents: torch.Tensor, cond: TextCondition, generator: torch.Generator | None, **overrides) -> LossTerms | GuideTerms:
        """The method's loss for one micro-batch (``overrides`` pass lam/grid_index/noise/target_noise through, for tests):
        Algorithm 1's, or Learn to Guide's with the prompt embedding the network reads at inference."""
        cfg = self.config
        if self.l2g:
            prompt = annealing.prompt_embedding(cond.embeds, cond.pooled, self.network_config.prompt_embedding, self.network_config.prompt_dim)
            return learn_to_guide_loss(self.backend, self.mlp, latents, cond, self.uncond, self.grid, prompt, particles=cfg.l2g_particles,
                                       objective=cfg.l2g_objective, generator=generator, **overrides)
        weight = cfg.delta_weight * (self.balance.weight if self.balance is not None else 1.0)
        return annealing_loss(self.backend, self.mlp, latents, cond, self.uncond, self.grid, lambda_range=(cfg.lambda_min, cfg.lambda_max),
                              delta_weight=weight, generator=generator, **overrides)

    # ------------------------------------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        if self.info is None:
            self.preflight()
        self.setup()
        self._prepare_output()
        cfg, acc = self.config, self.accelerator
        start_step = self.step
        resumed_from = start_step if self.resume_state is not None else None
        if self.step >= self.total_steps:
            acc.print(f"nothing to do: the resume state is at step {self.step} of {self.total_steps}")
        dataset = ImageCaptionDataset(self.scan.samples, self.resolution, self.embeddings, frames=self.frames if self.info.spec.video else None,
                                      frame_stride=cfg.frame_stride, latents=bool(self.embeddings and self.embeddings.latents), root=self.scan.root)
        sampler = MicroBatchSampler(len(dataset), cfg.batch_size, cfg.seed, acc.process_index, self.world, start=self.step * cfg.gradient_accumulation)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                                             persistent_workers=False, prefetch_factor=2 if cfg.num_workers else None)
        generator = torch.Generator(device=self.device)
        zero = torch.zeros(1, device=self.device)
        params = list(self.mlp.parameters())
        log_path = self.output / "train_log.jsonl"
        if self.resume_state is not None and acc.is_main_process:
            _truncate_log(log_path, self.step)
        if acc.is_main_process:  # one record per (re)start, before the step rows it explains
            start = {"event": "start", "world_size": self.world, "device": str(self.device), "from_step": self.step,
                     "precision": str(self.dtype).replace("torch.", ""), "gradient_checkpointing": self.gradient_checkpointing,
                     "memory": self.memory_line}
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(start) + "\n")
        from tqdm.auto import tqdm

        what = (f"a Learn to Guide network ({cfg.l2g_objective} objective, {cfg.l2g_particles} particles per image)" if self.l2g
                else "a guidance MLP")
        acc.print(
            f"training {what} for {self.info.family} ({self.info.prediction_type}) on {len(dataset)} images at {self.resolution}px: "
            f"{self.total_steps} steps x {self.effective_batch} images, {self.world} process(es) on {self.device}, frozen model in "
            f"{str(self.dtype).replace('torch.', '')}, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}"
        )
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"training {self.family}", unit="step",
                   disable=not (self.progress and acc.is_local_main_process), dynamic_ncols=True)
        data_iter = iter(loader)
        micro = self.step * cfg.gradient_accumulation
        window = _Window(self.device, self.l2g)
        last_terms: dict = {}
        started = time.perf_counter()
        images_at_start = self.images_seen
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.mlp.train()
        while self.step < self.total_steps:
            batch = next(data_iter)
            if batch["failed"]:
                self.failed_paths.update(batch["failed"])
                window.failed += len(batch["failed"])
            generator.manual_seed(micro_seed(cfg.seed, micro * self.world + acc.process_index))
            micro += 1
            with acc.accumulate(self.mlp):
                terms = None
                if batch["size"]:
                    latents = self.backend.batch_latents(batch, generator)
                    if "embeds" in batch:
                        cond = TextCondition(batch["embeds"], batch.get("pooled"), batch.get("mask")).to(self.device)
                    else:
                        cond = self.backend.encode_text(batch["captions"])
                    terms = self.compute_loss(latents, cond, generator)
                if terms is not None and bool(torch.isfinite(terms.total)):
                    acc.backward(terms.total * self.loss_scale)
                    window.add(terms, latents.shape[0])
                else:
                    if terms is not None:
                        window.nan += 1
                    # No usable loss: a zero loss through the (DDP-wrapped) MLP's forward keeps the processes' gradient
                    # all-reduce calls in step; a backward without a wrapped forward would not take part in it.
                    idle = self.mlp(zero, zero, zero.expand(1, self.network_config.prompt_dim)) if self.l2g else self.mlp(zero, zero, zero)
                    acc.backward(idle.sum() * 0.0)
                if acc.sync_gradients:
                    self._optimizer_step(window, params)
            if acc.sync_gradients:
                summary = window.reduce(acc)
                self.images_seen += summary["images"]
                self.nan_losses += summary["nan"]
                self.skipped_events += summary["failed"]
                if summary["count"] and self.l2g:
                    last_terms = {k: summary[k] for k in ("loss", "scale_mean", "scale_min", "scale_max")}
                elif summary["count"]:
                    last_terms = {k: summary[k] for k in ("loss", "quality", "alignment", "w_mean", "w_min", "w_max")}
                    # the weight this step's loss used, read before the EMA moves on to the next step's
                    last_terms["delta_weight"] = cfg.delta_weight * (self.balance.weight if self.balance else 1.0)
                    if self.balance is not None:
                        self.balance.update(SimpleNamespace(quality=summary["quality"], alignment=summary["alignment"]))
                window = _Window(self.device, self.l2g)
                self.step += 1
                if last_terms and self.l2g:  # before update(), which draws the bar: the postfix belongs to the step it counts
                    bar.set_postfix(loss=f"{last_terms['loss']:.4g}",
                                    scale=f"{last_terms['scale_mean']:.2f}[{last_terms['scale_min']:.2f},{last_terms['scale_max']:.2f}]", refresh=False)
                elif last_terms:
                    bar.set_postfix(loss=f"{last_terms['loss']:.4g}", q=f"{last_terms['quality']:.3g}", a=f"{last_terms['alignment']:.3g}",
                                    w=f"{last_terms['w_mean']:.2f}[{last_terms['w_min']:.2f},{last_terms['w_max']:.2f}]",
                                    **({"dw": f"{last_terms['delta_weight']:.3g}"} if self.balance is not None else {}), refresh=False)
                bar.update(1)
                if acc.is_main_process and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                    row = {"step": self.step, "images": self.images_seen, **last_terms, "nan_losses": self.nan_losses,
                           "skipped_images": len(self.failed_paths), "seconds": round(time.perf_counter() - started, 3)}
                    with open(log_path, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(row) + "\n")
                if self.images_seen == 0 and micro * self.world >= sampler.per_epoch:
                    raise TrainingError(f"{cfg.dataset}: none of the {len(dataset)} images could be read (e.g. {sorted(self.failed_paths)[0]})")
                if self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self._checkpoint(final=False)
        bar.close()
        seconds = time.perf_counter() - started
        self._gather_failed()
        path = self._checkpoint(final=True)
        result = TrainResult(
            checkpoint=path,
            steps=self.step,
            images_seen=self.images_seen,
            skipped_images=sorted(self.failed_paths),
            skipped_image_events=self.skipped_events,
            missing_captions=len(self.scan.missing_captions),
            nan_losses=self.nan_losses,
            skipped_steps=self.skipped_steps,
            seconds=seconds,
            images_per_second=(self.images_seen - images_at_start) / seconds if seconds > 0 else 0.0,
            peak_memory_bytes=peak_memory_bytes(self.device),
            resumed_from=resumed_from,
            last_terms=last_terms,
            world_size=self.world,
        )
        if acc.is_main_process:
            payload = json.dumps(result.to_dict(), indent=1)
            atomic_write(self.output / "training_report.json", lambda tmp: Path(tmp).write_text(payload, encoding="utf-8"))
            acc.print(format_report(result))
        acc.wait_for_everyone()
        return result

    def _optimizer_step(self, window: _Window, params: list[torch.nn.Parameter]) -> None:
        acc, cfg = self.accelerator, self.config
        contributed = acc.reduce(torch.tensor(float(window.count), device=self.device), "sum")
        if self.loss_scale != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self.loss_scale)
        if cfg.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        if float(contributed) == 0 or not math.isfinite(float(norm)):
            self.skipped_steps += 1  # nothing usable in this window, or a non-finite gradient: leave the MLP alone
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _checkpoint(self, final: bool) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            path = self.save(final=final)
        acc.wait_for_everyone()
        return path or (self.output / f"{self.output_name}.safetensors")

    def _gather_failed(self) -> None:
        if self.world > 1:
            from accelerate.utils import gather_object

            merged: set[str] = set()
            for paths in gather_object([sorted(self.failed_paths)]):
                merged.update(paths)
            self.failed_paths = merged


class _Window:
    """Loss terms and w statistics of the micro-batches of one optimizer step (per process, reduced on demand).
    Learn to Guide (``l2g``): one loss term, and the CFG scale 1 + omega in place of w, reported as scale_*."""

    def __init__(self, device: torch.device, l2g: bool = False):
        self.device, self.l2g = device, l2g
        self.count = self.images = self.nan = self.failed = 0
        self.loss = self.quality = self.alignment = self.w_sum = 0.0
        self.w_n = 0
        self.w_min, self.w_max = math.inf, -math.inf

    def add(self, terms: LossTerms | GuideTerms, images: int) -> None:
        self.count += 1
        self.images += images
        self.loss += float(terms.total.detach())
        if isinstance(terms, GuideTerms):
            w = terms.scale.float()
        else:
            self.quality += float(terms.quality)
            self.alignment += float(terms.alignment)
            w = terms.w.float()
        self.w_sum += float(w.sum())
        self.w_n += w.numel()
        self.w_min = min(self.w_min, float(w.min()))
        self.w_max = max(self.w_max, float(w.max()))

    def reduce(self, acc) -> dict:
        sums = torch.tensor([self.count, self.images, self.nan, self.failed, self.loss, self.quality, self.alignment, self.w_sum, self.w_n],
                            dtype=torch.float64, device=self.device)
        extremes = torch.tensor([self.w_min, -self.w_max], dtype=torch.float64, device=self.device)
        if acc.num_processes > 1:
            sums = acc.reduce(sums, "sum")
            extremes = acc.gather(extremes.unsqueeze(0)).min(dim=0).values  # [min w, -max w] over processes
        count, images, nan, failed, loss, quality, alignment, w_sum, w_n = sums.tolist()
        out = {"count": int(count), "images": int(images), "nan": int(nan), "failed": int(failed)}
        if count and self.l2g:
            out.update(loss=loss / count, scale_mean=w_sum / max(w_n, 1), scale_min=float(extremes[0]), scale_max=-float(extremes[1]))
        elif count:
            out.update(loss=loss / count, quality=quality / count, alignment=alignment / count, w_mean=w_sum / max(w_n, 1),
                       w_min=float(extremes[0]), w_max=-float(extremes[1]))
        return out


def _torch_save(obj, path) -> None:
    # through a Python file: a full disk then reaches atomic_write as an OSError (torch's own path writer reports only
    # "unexpected pos ...")
    with open(path, "wb") as handle:
        torch.save(obj, handle)


def _run_name(state: dict) -> str:
    """The output name of the run a (checked) resume state belongs to."""
    from .config import _valid_file_stem

    config, locked = json.loads(state["config"]), json.loads(state["locked"])
    name = config.get("output_name") if isinstance(config, dict) else None
    method = locked.get("method", LOCKED_DEFAULTS["method"])
    name = name if isinstance(name, str) else default_output_name(method, locked.get("model_family_resolved"))
    return name if _valid_file_stem(name) else default_output_name(method if method in CHOICES["method"] else "annealing", "unknown")


def load_resume_state(path: Path) -> dict:
    """Read and check a resume state (structure and types; the architecture is checked by ``resume_shape_problem``)."""
    from .files import NotARegularFile, open_regular

    try:
        with open_regular(path) as handle:
            state = torch.load(handle, map_location="cpu", weights_only=True)
    except NotARegularFile as exc:
        raise TrainingError(f"{path}: the resume state is {exc}") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"{path}: unreadable resume state ({first[:200]})") from None
    problem = resume_state_problem(state)
    if problem:
        raise TrainingError(f"{path}: malformed resume state ({problem}); start again without --resume")
    return state


def resume_state_problem(state) -> str | None:
    """What is wrong with the fields of a resume state, or None: every field ``_apply_resume`` reads, with its type."""
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        return "not a training resume state"
    if state.get("version") != 1:
        return f"version {shown(state.get('version'))} is not 1"

    def missing_or(key: str, what: str) -> str:
        return f"{key} is missing" if key not in state else f"{key} is {shown(state[key])}, not {what}"

    for key in RESUME_COUNTERS:
        if type(state.get(key)) is not int or state[key] < 0:
            return missing_or(key, "a count")
    if type(state.get("seed")) is not int:
        return missing_or("seed", "an integer")
    decoded = {}
    for key, kind in (("failed_paths", list), ("locked", dict), ("config", dict)):
        if not isinstance(state.get(key), str):
            return missing_or(key, "JSON text")
        try:
            decoded[key] = json.loads(state[key])
        except (ValueError, RecursionError):
            return f"{key} is not valid JSON"
        if not isinstance(decoded[key], kind):
            return f"{key} is not a JSON {'list' if kind is list else 'object'}"
    if not all(isinstance(p, str) for p in decoded["failed_paths"]):
        return "failed_paths is not a list of paths"
    for key in RESUME_LOCKED + ("effective_batch", "seed"):
        if key not in decoded["locked"]:
            return f"locked settings lack {key}"
    for key in ("balance_quality", "balance_alignment"):
        value = state.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            return missing_or(key, "a finite number or None")
    mlp = state.get("mlp")
    if not isinstance(mlp, dict) or not mlp:
        return missing_or("mlp", "the MLP's weights")
    for key, value in mlp.items():
        if not isinstance(key, str) or not _plain_tensor(value) or not value.is_floating_point() or not torch.isfinite(value).all():
            return f"MLP weight {shown(key)} is not a finite float tensor"
    optimizer = state.get("optimizer")
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict) and isinstance(optimizer.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"])):
        return missing_or("optimizer", "an optimizer state (state and param_groups)")
    return None


def resume_shape_problem(state: dict, mlp_config: annealing.GuidanceModelConfig | annealing.LearnToGuideConfig) -> str | None:
    """What in a checked resume state does not fit the network ``mlp_config`` describes (an annealing MLP or a Learn to Guide
    network): weights, optimizer moments, hyperparameters."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        if isinstance(mlp_config, annealing.LearnToGuideConfig):
            model = annealing.LearnToGuideNet(mlp_config)
        else:
            model = annealing.GuidanceScaleModel(mlp_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = {k: tuple(v.shape) for k, v in state["mlp"].items()}
    if weights != expected:
        wrong = sorted(set(weights) ^ set(expected)) or sorted(k for k in expected if weights[k] != expected[k])
        return f"MLP weights do not fit the configured MLP (e.g. {shown(wrong[0])})"
    shapes = [tuple(p.shape) for p in model.parameters()]
    groups = state["optimizer"]["param_groups"]
    ids = [i for group in groups for i in group["params"]]
    if len(ids) != len(shapes) or len(set(ids)) != len(ids) or not all(type(i) is int for i in ids):
        return f"the optimizer state is for {len(ids)} parameters, the MLP has {len(shapes)}"
    for group in groups:
        for key, value in group.items():
            values = value if isinstance(value, (tuple, list)) and key != "params" else [value]
            if key != "params" and any(isinstance(v, float) and not math.isfinite(v) for v in values):
                return f"optimizer setting {shown(key)} is not finite"
    position = {i: n for n, i in enumerate(ids)}
    for index, moments in state["optimizer"]["state"].items():
        if index not in position or not isinstance(moments, dict):
            return f"optimizer state for an unknown parameter {shown(index)}"
        for key, value in moments.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)  # "step" is a plain number in some versions
            if not (math.isfinite(value) if number else _plain_tensor(value) and bool(torch.isfinite(value).all())):
                return f"optimizer {shown(key)} is not a finite tensor"
            if key in ("exp_avg", "exp_avg_sq") and tuple(value.shape) != shapes[position[index]]:
                return f"optimizer {key} of parameter {index} has shape {tuple(value.shape)}, expected {shapes[position[index]]}"
    return None


def _plain_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and value.layout == torch.strided and not value.is_meta


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def format_report(result: TrainResult) -> str:
    lines = [
        f"done: {result.steps} steps, {result.images_seen} images seen in {result.seconds:.1f} s ({result.images_per_second:.3g} images/s) "
        f"on {result.world_size} process{'es' if result.world_size > 1 else ''}",
        f"checkpoint: {result.checkpoint}",
        f"skipped unreadable images: {len(result.skipped_images)}" + (f" (e.g. {result.skipped_images[0]})" if result.skipped_images else ""),
        f"skipped images without a caption: {result.missing_captions}",
        f"skipped NaN/inf losses: {result.nan_losses}; skipped optimizer steps: {result.skipped_steps}",
        f"peak memory: {result.peak_memory_bytes / 2**20:.0f} MiB",
    ]
    t = result.last_terms
    if t and "scale_mean" in t:
        lines.append(f"last step: loss {t['loss']:.4g}, CFG scale mean {t['scale_mean']:.3f} [{t['scale_min']:.3f}, {t['scale_max']:.3f}]")
    elif t:
        lines.append(f"last step: quality {t['quality']:.4g}, alignment {t['alignment']:.4g}, w mean {t['w_mean']:.3f} [{t['w_min']:.3f}, {t['w_max']:.3f}]")
    return "\n".join(lines)


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Check everything, then train; raises :class:`TrainingError` for bad input."""
    trainer = Trainer(config, progress=progress)
    trainer.preflight()
    return trainer.run()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log rows up to ``step`` (a resumed run logs the later ones again) and drop a line a crash cut short."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():  # a damaged line is dropped below
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(json.dumps(row))
    text = "".join(f"{line}\n" for line in kept)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
