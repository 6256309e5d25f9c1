"""The training loop: Algorithm 1 (``training.algorithm.annealing_loss``) over a frozen diffusion model, with HF Accelerate;
with ``method: learn-to-guide`` the same loop trains a Learn to Guide network (``training.learn_to_guide``) instead.

A run is made of named parts, in the order it uses them:

* :mod:`training.run_plan`: every check that bad input can fail, and every decision, before a weight is loaded or a
  byte written (one frozen :class:`~training.run_plan.RunPlan`);
* :mod:`training.run_folder`: the output folder, which files are this run's and which another's;
* :mod:`training.run_parts`: what the plan loads (processes, the frozen model, the network and its optimizer);
* this module: the loop, and the checkpoints (:mod:`training.checkpoint_record`) and resume states
  (:mod:`training.resume_state`) it writes when they are due;
* :mod:`training.step_log`: what each step did, in ``train_log.jsonl`` and on the progress bar;
* :mod:`training.run_report`: the final report.

Per micro-batch:

    latents = VAE(image);  cond = text encoders(caption) or precomputed embeddings
    terms   = annealing_loss(backend, mlp, latents, cond, uncond, grid, ...)    (the CFG++ step is annealing.cfgpp_step)
              or learn_to_guide_loss(..., prompt embedding of cond, ...)          (continuous (s, t), m particles, one guided
                                                                                  step, an MMD; optionally the CLIP reward)
    backward of terms.total (skipped and counted when it is NaN/inf; a zero loss keeps multi-GPU processes in step)

and every ``gradient_accumulation`` micro-batches one AdamW step on the network (float32 always; ``precision`` only sets
the frozen model's dtype). Randomness is a pure function of (seed, global micro-batch index = local index x processes
+ rank): the data order (:class:`training.data.MicroBatchSampler`) and a generator re-seeded for every micro-batch (VAE
sampling, lambda, timestep, noise, CADS). A resumed run therefore continues exactly as the uninterrupted run would have,
and P processes with accumulation A train what one process with accumulation P x A trains (to float rounding).

Ctrl-C stops the run after the step in progress and saves its resume state (a second Ctrl-C stops at once, keeping the
last one written); either way the run ends with :class:`training.interrupt.Interrupted`, whose line says what was kept
and how to continue. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import annealing
from annealing.atomic_write import atomic_write

from .algorithm import LossTerms, annealing_loss
from .backends import TextCondition
from .checkpoint_record import checkpoint_metadata
from .config import TrainConfig
from .data import ImageCaptionDataset, MicroBatchSampler, collate
from .errors import TrainingError
from .interrupt import Interrupted, StopRequest, ignore_ctrl_c
from .learn_to_guide import GuideTerms, learn_to_guide_loss
from .resume_state import RESUME_WARNED, RunCounters, recorded_settings, resume_state_of, write_resume_state
from .reward import latent_reward
from .run_parts import RunParts, load_parts, peak_memory_bytes
from .run_plan import RunPlan, plan_run
from .run_report import TrainResult, format_report
from .step_log import StepLog, StepWindow, bar_postfix, step_terms

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def micro_seed(seed: int, global_micro: int) -> int:
    """Seed of the generator for global micro-batch ``global_micro`` (= local index x processes + rank). Keyed to the
    global index, not to the process, so P processes x A accumulation draw what 1 process x P * A draws."""
    return (seed * 1_000_003 + global_micro * 104_729 + 12_345) % (2**63 - 1)


class Trainer:
    """``Trainer(config).run()``; ``preflight()`` alone performs every input check without loading weights, ``setup()``
    then loads what the run needs (``backend``, ``mlp``, ``grid``, ... below read what it loaded)."""

    def __init__(self, config: TrainConfig, progress: bool = True):
        self.config = config
        self.progress = progress
        self.plan: RunPlan | None = None
        self.parts: RunParts | None = None
        self.counters = RunCounters()
        self.prepared = False  # the output folder is made and cleared: from here on the run writes
        self.resume_step: int | None = None  # the step of the newest resume state in the folder

    # ------------------------------------------------------------------------------------------------ the parts
    def preflight(self) -> RunPlan:
        """Every check that bad input can fail, before any weight is loaded and before anything is written."""
        self.plan = plan_run(self.config)
        return self.plan

    def setup(self) -> None:
        """Load what the plan names, and continue from its resume state if it has one."""
        plan = self.plan or self.preflight()
        self.parts = load_parts(plan)
        self.counters = RunCounters()
        state = plan.resume_state
        if state is not None:
            self.accelerator.unwrap_model(self.mlp).load_state_dict(state["mlp"])
            self.parts.optimizer.load_state_dict(state["optimizer"])
            self.counters = RunCounters.from_state(state)
            self.resume_step = self.counters.step
            if self.parts.balance is not None and state.get("balance_quality") is not None:
                self.parts.balance.quality = float(state["balance_quality"])
                self.parts.balance.alignment = float(state["balance_alignment"])
            saved, now = json.loads(state["locked"]), recorded_settings(plan, self.parts)
            names = {"effective_batch": "batch size, accumulation or process count"}
            changed = [names.get(key, key) for key in RESUME_WARNED if key in now and saved.get(key) != now[key]]
            if changed:
                self.accelerator.print(f"warning: {'; '.join(changed)} differ from the resumed run; training continues but will not reproduce "
                                       "an uninterrupted run")

    # What tests and scripts read of a set-up trainer.
    info = property(lambda self: self.plan.info)
    latent_shape = property(lambda self: self.plan.latent_shape)
    accelerator = property(lambda self: self.parts.accelerator)
    backend = property(lambda self: self.parts.backend)
    grid = property(lambda self: self.parts.grid)
    uncond = property(lambda self: self.parts.uncond)
    mlp = property(lambda self: self.parts.mlp)
    loss_scale = property(lambda self: self.parts.loss_scale)
    gradient_checkpointing = property(lambda self: self.parts.gradient_checkpointing)

    # ------------------------------------------------------------------------------------------------ the loss
    def compute_loss(self, latents: torch.Tensor, cond: TextCondition, generator: torch.Generator | None, captions: list[str] | None = None,
                     **overrides) -> LossTerms | GuideTerms:
        """The method's loss for one micro-batch (``overrides`` pass lam/grid_index/times/noise/target_noise through, for
        tests): Algorithm 1's, or Learn to Guide's with the prompt embedding the network reads at inference (and, with the
        reward variant, the CLIP score of ``captions``)."""
        cfg, parts = self.plan.config, self.parts
        if self.plan.l2g:
            net = self.plan.network_config
            prompt = annealing.prompt_embedding(cond.embeds, cond.pooled, net.prompt_embedding, net.prompt_dim)
            reward = None
            if parts.reward is not None:
                if captions is None:
                    raise ValueError("the reward variant scores the captions: pass captions")
                reward = latent_reward(parts.backend.vae, parts.reward, captions)
            return learn_to_guide_loss(parts.backend, parts.mlp, latents, cond, parts.uncond, parts.grid, prompt, particles=cfg.l2g_particles,
                                       objective=cfg.l2g_objective, beta=cfg.l2g_beta, lam=cfg.l2g_lambda, region=cfg.l2g_time_region(),
                                       generator=generator, reward=reward, reward_weight=cfg.l2g_reward_weight, **overrides)
        weight = cfg.delta_weight * (parts.balance.weight if parts.balance is not None else 1.0)
        return annealing_loss(parts.backend, parts.mlp, latents, cond, parts.uncond, parts.grid, lambda_range=(cfg.lambda_min, cfg.lambda_max),
                              delta_weight=weight, generator=generator, **overrides)

    # ------------------------------------------------------------------------------------------------ the run
    def run(self) -> TrainResult:
        """Plan (if not yet), load, train, save; Ctrl-C ends it with :class:`Interrupted` (see the module docstring)."""
        plan = self.plan or self.preflight()
        try:
            self.setup()
            if self.accelerator.is_main_process:
                plan.folder.prepare(plan.folder_plan, say=self.accelerator.print)
            self.accelerator.wait_for_everyone()
            self.prepared = True
            return self._train()
        except Interrupted:
            raise
        except KeyboardInterrupt:
            raise Interrupted(self._kept_line(), show=self.parts is None or self.accelerator.is_main_process) from None

    def _train(self) -> TrainResult:
        plan, parts, acc, counters = self.plan, self.parts, self.accelerator, self.counters
        total, accumulation = parts.total_steps, plan.config.gradient_accumulation
        resumed_from = counters.step if plan.resume_state is not None else None
        if counters.step >= total:
            acc.print(f"nothing to do: the resume state is at step {counters.step} of {total}")
        loader = self._loader()
        log = self._start_log()
        acc.print(self._training_line(len(loader.dataset)))
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=counters.step, desc=f"training {plan.family}", unit="step",
                   disable=not (self.progress and acc.is_local_main_process), dynamic_ncols=True)
        generator = torch.Generator(device=parts.device)
        micro, last_terms = counters.step * accumulation, {}
        started, images_at_start = time.perf_counter(), counters.images_seen
        if parts.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(parts.device)
        parts.mlp.train()
        with contextlib.closing(bar), StopRequest(on_request=lambda: bar.set_description("stopping after this step (Ctrl-C: at once)")) as stop:
            batches = iter(loader)  # after the handler: forked workers inherit it until their own ignores Ctrl-C
            while counters.step < total:
                window = StepWindow(parts.device, plan.l2g)
                for _ in range(accumulation):
                    self._micro_batch(next(batches), window, generator, micro)
                    micro += 1
                summary = window.reduce(acc, stop.requested)
                last_terms = self._end_step(summary) or last_terms
                self._show_step(last_terms, bar, log, time.perf_counter() - started)
                if counters.images_seen == 0 and micro * parts.world >= loader.batch_sampler.per_epoch:
                    raise TrainingError(f"{plan.config.dataset}: none of the {len(loader.dataset)} images could be read "
                                        f"(e.g. {sorted(counters.failed_paths)[0]})")
                if counters.step % plan.config.checkpoint_every == 0 and counters.step < total:
                    self._checkpoint(final=False)
                if summary["stop"] and counters.step < total:
                    self._stop_after_this_step()
            return self._finish(time.perf_counter() - started, counters.images_seen - images_at_start, resumed_from, last_terms)

    def _loader(self) -> torch.utils.data.DataLoader:
        """The micro-batches from the current step on, in the order every process count shares."""
        plan, cfg, acc = self.plan, self.plan.config, self.accelerator
        latents = bool(plan.embeddings and plan.embeddings.latents)
        dataset = ImageCaptionDataset(plan.scan.samples, plan.resolution, plan.embeddings, frames=plan.frames if plan.info.spec.video else None,
                                      frame_stride=plan.config.frame_stride, latents=latents, root=plan.scan.root)
        sampler = MicroBatchSampler(len(dataset), cfg.batch_size, cfg.seed, acc.process_index, self.parts.world,
                                    start=self.counters.step * cfg.gradient_accumulation)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                                           persistent_workers=False, prefetch_factor=2 if cfg.num_workers else None,
                                           worker_init_fn=ignore_ctrl_c if cfg.num_workers else None)

    def _start_log(self) -> StepLog:
        """The log, cut back to the resumed step, with this start's record (one per start, naming the run)."""
        plan, parts = self.plan, self.parts
        log = StepLog(plan.folder.log_file, self.accelerator.is_main_process)
        if plan.resume_state is not None:
            log.truncate(self.counters.step)
        log.start(world_size=parts.world, device=str(parts.device), from_step=self.counters.step, precision=str(parts.dtype).replace("torch.", ""),
                  gradient_checkpointing=parts.gradient_checkpointing, memory=parts.memory_line, output_name=plan.output_name)
        return log

    def _show_step(self, terms: dict, bar, log: StepLog, seconds: float) -> None:
        """The step's values on the progress bar and, every ``log_every`` steps and at the last, in the log."""
        counters = self.counters
        if terms:  # before update(), which draws the bar: the postfix belongs to the step it counts
            bar.set_postfix(bar_postfix(terms, self.parts.balance is not None), refresh=False)
        bar.update(1)
        if counters.step % self.plan.config.log_every == 0 or counters.step == self.parts.total_steps:
            log.step(step=counters.step, images=counters.images_seen, **terms, nan_losses=counters.nan_losses,
                     skipped_image_events=counters.skipped_events, seconds=round(seconds, 3))  # over all processes

    def _finish(self, seconds: float, images: int, resumed_from: int | None, last_terms: dict) -> TrainResult:
        """The final checkpoint, the report file and the report's lines."""
        plan, parts, acc, counters = self.plan, self.parts, self.accelerator, self.counters
        self._gather_failed()
        path = self._checkpoint(final=True)
        result = TrainResult(
            checkpoint=path, steps=counters.step, images_seen=counters.images_seen, skipped_images=sorted(counters.failed_paths),
            skipped_image_events=counters.skipped_events, missing_captions=len(plan.scan.missing_captions), nan_losses=counters.nan_losses,
            skipped_steps=counters.skipped_steps, seconds=seconds, images_per_second=images / seconds if seconds > 0 else 0.0,
            peak_memory_bytes=peak_memory_bytes(parts.device), resumed_from=resumed_from, last_terms=last_terms, world_size=parts.world,
        )
        if acc.is_main_process:
            payload = json.dumps(result.to_dict(), indent=1)
            atomic_write(plan.folder.report_file, lambda tmp: Path(tmp).write_text(payload, encoding="utf-8"))
            acc.print(format_report(result))
        acc.wait_for_everyone()
        return result

    def _training_line(self, images: int) -> str:
        plan, parts, cfg = self.plan, self.parts, self.plan.config
        objective = f"energy (beta {cfg.l2g_beta:g}, lambda {cfg.l2g_lambda:g})" if cfg.l2g_objective == "energy" else "l2"
        reward = f", CLIP reward x {cfg.l2g_reward_weight:g}" if cfg.l2g_reward == "clip" else ""
        what = (f"a Learn to Guide network ({objective} objective{reward}, {cfg.l2g_particles} particles per image, (s, t) continuous "
                f"with t - s >= {cfg.l2g_delta:g})" if plan.l2g else "a guidance MLP")
        return (f"training {what} for {plan.info.family} ({plan.info.prediction_type}) on {images} images at {plan.resolution}px: "
                f"{parts.total_steps} steps x {parts.effective_batch} images, {parts.world} process(es) on {parts.device}, frozen model in "
                f"{str(parts.dtype).replace('torch.', '')}, gradient checkpointing {'on' if parts.gradient_checkpointing else 'off'}")

    def _micro_batch(self, batch: dict, window: StepWindow, generator: torch.Generator, micro: int) -> None:
        """Loss and backward of one micro-batch; the optimizer step after the last one of a step."""
        parts, acc = self.parts, self.accelerator
        if batch["failed"]:
            self.counters.failed_paths.update(batch["failed"])
            window.failed += len(batch["failed"])
        generator.manual_seed(micro_seed(self.plan.config.seed, micro * parts.world + acc.process_index))
        with acc.accumulate(parts.mlp):
            terms = None
            if batch["size"]:
                latents = parts.backend.batch_latents(batch, generator)
                if "embeds" in batch:
                    cond = TextCondition(batch["embeds"], batch.get("pooled"), batch.get("mask")).to(parts.device)
                else:
                    cond = parts.backend.encode_text(batch["captions"])
                terms = self.compute_loss(latents, cond, generator, batch["captions"])
            if terms is not None and bool(torch.isfinite(terms.total)):
                acc.backward(terms.total * parts.loss_scale)
                window.add(terms, latents.shape[0])
            else:
                if terms is not None:
                    window.nan += 1
                # No usable loss: a zero loss through the (DDP-wrapped) network's forward keeps the processes' gradient
                # all-reduce calls in step; a backward without a wrapped forward would not take part in it.
                zero = torch.zeros(1, device=parts.device)
                idle = parts.mlp(zero, zero, zero.expand(1, self.plan.network_config.prompt_dim)) if self.plan.l2g else parts.mlp(zero, zero, zero)
                acc.backward(idle.sum() * 0.0)
            if acc.sync_gradients:
                self._optimizer_step(window)

    def _optimizer_step(self, window: StepWindow) -> None:
        parts, acc, cfg = self.parts, self.accelerator, self.plan.config
        params = list(parts.mlp.parameters())
        contributed = acc.reduce(torch.tensor(float(window.count), device=parts.device), "sum")
        if parts.loss_scale != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(parts.loss_scale)
        if cfg.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        if float(contributed) == 0 or not math.isfinite(float(norm)):
            self.counters.skipped_steps += 1  # nothing usable in this window, or a non-finite gradient: leave the network alone
        else:
            parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)

    def _end_step(self, summary: dict) -> dict:
        """Count the step's images and skips, move the balance on; returns the step's values (empty if none was usable)."""
        counters, balance = self.counters, self.parts.balance
        counters.images_seen += summary["images"]
        counters.nan_losses += summary["nan"]
        counters.skipped_events += summary["failed"]
        terms = step_terms(summary, self.plan.l2g)
        if terms and not self.plan.l2g:
            # the weight this step's loss used, read before the EMA moves on to the next step's
            terms["delta_weight"] = self.plan.config.delta_weight * (balance.weight if balance else 1.0)
            if balance is not None:
                balance.update(SimpleNamespace(quality=summary["quality"], alignment=summary["alignment"]))
        counters.step += 1
        return terms

    # ------------------------------------------------------------------------------------------------ Ctrl-C
    def _stop_after_this_step(self) -> None:
        """Ctrl-C was pressed during this step: save its resume state (unless just written) and end the run."""
        if self.resume_step != self.counters.step:
            self._on_main(self.save_resume)
        raise Interrupted(f"stopped at step {self.counters.step} of {self.parts.total_steps}; its resume state is saved in "
                          f"{self.plan.output}: {self._how_to_continue()}", show=self.accelerator.is_main_process)

    def _kept_line(self) -> str:
        """What an abrupt stop (a second Ctrl-C, or one before training started) kept."""
        out = self.plan.output
        if not self.prepared:
            return f"stopped before training started; nothing in {out} was changed: run the same command again"
        where = f"stopped at step {self.counters.step} of {self.parts.total_steps}"
        if self.resume_step is None:
            return f"{where}, before its first resume state: run the same command again to start over"
        return f"{where}; the resume state of step {self.resume_step} is kept in {out}: {self._how_to_continue()}"

    def _how_to_continue(self) -> str:
        return "continue with the same command" if self.plan.config.resume else "continue with the same command plus --resume"

    # ------------------------------------------------------------------------------------------------ metadata and saving
    def metadata(self) -> annealing.CheckpointMetadata:
        """The checkpoint's metadata as of the current step (:func:`training.checkpoint_record.checkpoint_metadata`)."""
        return checkpoint_metadata(self.plan, self.parts, self.counters)

    def save(self, final: bool = False) -> Path:
        """Write the checkpoint (periodic or final) and then the resume state; main process only."""
        folder = self.plan.folder
        if final:
            path = folder.final_checkpoint
        else:
            path = folder.periodic_checkpoint(self.counters.step)
            path.parent.mkdir(exist_ok=True)
        annealing.save_guidance_model(self.accelerator.unwrap_model(self.mlp), path, self.metadata())
        if not final:
            folder.prune_checkpoints(self.plan.config.keep_checkpoints)
        self.save_resume()
        return path

    def save_resume(self) -> None:
        """Write the resume state of the current step; main process only."""
        write_resume_state(self.plan.folder.resume_file, resume_state_of(self.plan, self.parts, self.counters))
        self.resume_step = self.counters.step

    def _on_main(self, write) -> None:
        """``write()`` on the main process while the others wait."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            write()
        acc.wait_for_everyone()
        self.resume_step = self.counters.step

    def _checkpoint(self, final: bool) -> Path:
        self._on_main(lambda: self.save(final=final))
        return self.plan.folder.final_checkpoint if final else self.plan.folder.periodic_checkpoint(self.counters.step)

    def _gather_failed(self) -> None:
        if self.parts.world > 1:
            from accelerate.utils import gather_object

            merged: set[str] = set()
            for paths in gather_object([sorted(self.counters.failed_paths)]):
                merged.update(paths)
            self.counters.failed_paths = merged


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Check everything, then train; raises :class:`TrainingError` for bad input, :class:`Interrupted` for Ctrl-C."""
    trainer = Trainer(config, progress=progress)
    trainer.preflight()
    return trainer.run()
