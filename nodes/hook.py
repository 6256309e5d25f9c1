"""The annealing hook of one node instance: one guide (:class:`annealing.AnnealingGuidance`, built once from the node's
options) plus the bookkeeping of its sampling runs. Never imports ComfyUI (tested without a host).

ComfyUI drives it through three list hooks (attached by :mod:`.patching`):

* a post-CFG function (:mod:`.post_cfg`, the contract every guidance node shares): D_c, D_u, sigma, the model, the
  sampler's schedule and its CFG scale in; the guided x0-prediction out (every decision about the scale is the core's);
* a SAMPLER_SAMPLE wrapper: which sampler function runs (its name and ancestral eta), told to the core as-is;
* an OUTER_SAMPLE wrapper: a fresh recording per sampling run, filed under a fingerprint of the run's output latent, so
  the plot node finds the run that produced the latent it is given.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass

import torch

from ..annealing import AnnealingGuidance, AnnealingOptions, GuidanceRecorder, GuidanceTrace, SamplerInfo, prompt_embedding
from ..annealing.samplers import sampler_name_from_function
from ..annealing.scale_rule import describe_rule
from .compatibility import check_model
from .model_inspection import config_class_name
from .post_cfg import FP16_MAX, guided_prediction
from .warn_once import warn_once

NAME = "Annealing guidance"

#: Where the pack keeps its hook on a ModelPatcher's transformer_options (a list of references; the last is the active one).
HOOKS_KEY = "annealing_guidance_hooks"


def samples_fingerprint(samples: torch.Tensor) -> tuple:
    """A cheap identity of a latent batch: its shape and per-item sums (one host sync, once per run).

    Taken of the latent rounded to float16: with ComfyUI's ``--fp16-intermediates`` (0.21) the next node gets the fp16
    cast of the float32 latent the hook saw, and both must give the same fingerprint (beyond fp16's range both read as
    its largest value). Summed in float64 on the CPU: some devices (Apple MPS) have no float64."""
    flat = samples.detach().reshape(samples.shape[0], -1).to(torch.float16).to(device="cpu", dtype=torch.float64)
    flat = flat.nan_to_num(nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)
    sums = torch.stack([flat.sum(dim=1), flat.abs().sum(dim=1)], dim=1)
    return tuple(samples.shape), sums


def same_fingerprint(a: tuple, b: tuple, rtol: float = 1e-5) -> bool:
    return a[0] == b[0] and torch.allclose(a[1], b[1], rtol=rtol, atol=1e-6)


def sampler_reads_uncond(model_options: dict, sampler_module: str | None) -> bool:
    """True when the running sampler added a post-CFG function of its own (one defined inside a function of the sampler
    function's module), as every ComfyUI CFG++ sampler does to read ``uncond_denoised``, whatever its name."""
    if not sampler_module:
        return False
    for function in model_options.get("sampler_post_cfg_function", ()):
        while hasattr(function, "func"):  # functools.partial
            function = function.func
        if getattr(function, "__module__", None) == sampler_module and "<locals>" in getattr(function, "__qualname__", ""):
            return True
    return False


@dataclass
class SamplingRun:
    """One finished sampling run of a hook: what ran, and what was applied."""

    trace: GuidanceTrace
    sampler_name: str | None
    mode: str
    rule: str  # one line: what the mode did under this sampler
    fingerprint: tuple | None


class AnnealingHook:
    """The annealing guidance of one node instance: the guide (the user's options and the MLP, moved to the diffusion
    model's device when needed) and its own recordings.

    Two hooks share nothing; every run starts a fresh recording. Outside the active range the fallback CFG scale is
    ``options.fallback_cfg``, or when that is None the sampler's own cfg (KSampler's cfg for the model patch).
    """

    max_runs = 8

    def __init__(self, guidance_model, options: AnnealingOptions):
        if getattr(guidance_model, "metadata", None) is None:
            raise ValueError("annealing_model: not an annealing guidance model (connect Load Annealing Guidance Model)")
        self.guidance_model = guidance_model
        self.guidance = AnnealingGuidance(guidance_model, options)  # refuses a setting the checkpoint cannot take, on the node
        self.recorder = GuidanceRecorder()
        self.runs: deque[SamplingRun] = deque(maxlen=self.max_runs)
        self.sampler = SamplerInfo()
        self._sampler_module: str | None = None
        self._device: torch.device | None = None
        self._checked_model_sampling = None
        self._kind: str | None = None
        self._prompt: torch.Tensor | None = None

    @property
    def options(self) -> AnnealingOptions:
        return self.guidance.options

    @property
    def metadata(self):
        return self.guidance_model.metadata

    @property
    def learned(self) -> bool:
        """True for a learn_to_guide checkpoint (it reads the prompt's embedding instead of lambda and ||delta||)."""
        return self.metadata.method == "learn_to_guide"

    @property
    def source(self) -> str:
        return os.path.basename(getattr(self.guidance_model, "source_path", "") or "") or "the annealing checkpoint"

    # ---------------------------------------------------------------------------------------------- run bookkeeping

    def begin_run(self) -> None:
        """A sampling run starts: forget the previous recording and sampler."""
        self.recorder.reset()
        self.sampler = SamplerInfo()
        self._sampler_module = None
        self._checked_model_sampling = None
        self._prompt = None

    def set_sampler(self, sampler) -> None:
        """Learn which sampler runs from ComfyUI's sampler object (KSAMPLER keeps its function and extra options)."""
        function = getattr(sampler, "sampler_function", None)
        extra = getattr(sampler, "extra_options", None) or {}
        self.sampler = SamplerInfo(sampler_name_from_function(function), extra.get("eta", 1.0))
        while hasattr(function, "func"):  # functools.partial
            function = function.func
        self._sampler_module = getattr(function, "__module__", None)

    def end_run(self, samples: torch.Tensor | None) -> SamplingRun:
        """File the finished run (its trace, and the fingerprint of its output latent)."""
        run = SamplingRun(
            trace=self.recorder.trace(),
            sampler_name=self.sampler.name,
            mode=self.options.mode,
            rule=describe_rule(self.options.mode, self.sampler.name, self.metadata.training_grid.describe(),
                               self.guidance_model.config.trained_s if self.learned else None),
            fingerprint=samples_fingerprint(samples) if isinstance(samples, torch.Tensor) and samples.dim() >= 1 else None,
        )
        self.runs.append(run)
        fallback = run.trace.fallback_summary()  # never silent: where w was unusable, plain CFG ran instead
        if fallback:
            warn_once(f"{self.source}: {fallback}")
        return run

    def find_run(self, samples: torch.Tensor | None) -> tuple[SamplingRun | None, bool]:
        """(run, matched): the run whose output is ``samples``; failing a match the latest run with matched False;
        (None, False) before any run."""
        if not self.runs:
            return None, False
        if isinstance(samples, torch.Tensor):
            wanted = samples_fingerprint(samples)
            for run in reversed(self.runs):
                if run.fingerprint is not None and same_fingerprint(run.fingerprint, wanted):
                    return run, True
        return self.runs[-1], False

    # ------------------------------------------------------------------------------------------------- guidance

    def check_model(self, model_sampling, config_name: str | None) -> list[str]:
        """Raise ValueError when the checkpoint cannot work with this model; warn once (and return) family/space mismatches."""
        self._kind, warnings = check_model(self.metadata, model_sampling, config_name, source=self.source)
        return warnings

    def post_cfg(self, args: dict) -> torch.Tensor:
        """ComfyUI post-CFG function: the guided x0-prediction for this evaluation (replaces the plain CFG result)."""
        return guided_prediction(NAME, self._guide, args)

    def _guide(self, d_cond: torch.Tensor, d_uncond: torch.Tensor, args: dict) -> torch.Tensor:
        """One evaluation, float32 predictions in: ComfyUI's arguments handed to the core's guide."""
        base_model, model_options = args["model"], args.get("model_options", {})
        if self._checked_model_sampling is not base_model.model_sampling:  # once per run (a later patch may change the sampling)
            self._check_run(base_model, model_options)
        if d_cond.device != self._device:  # the MLP computes in float32 on the diffusion model's device
            self.guidance, self._device = self.guidance.to(d_cond.device), d_cond.device
        return self.guidance.guide(
            args["sigma"], d_cond, d_uncond, sampling=self._kind, sampler=self.sampler, host_cfg=float(args.get("cond_scale", 1.0)),
            sample_sigmas=model_options.get("transformer_options", {}).get("sample_sigmas"), recorder=self.recorder,
            prompt=self._prompt_for(args.get("cond"), d_cond.device, d_cond.shape[0]) if self.learned else None,
        )

    def _check_run(self, base_model, model_options: dict) -> None:
        """Once per run, at its first evaluation: the model is one the checkpoint serves, and the sampler's way of reading the
        unconditional prediction is known (a CFG++ sampler adds its post-CFG function only while it runs)."""
        self.check_model(base_model.model_sampling, config_class_name(base_model))
        self._checked_model_sampling = base_model.model_sampling
        if not self.sampler.reads_uncond and sampler_reads_uncond(model_options, self._sampler_module):
            self.sampler = SamplerInfo(self.sampler.name, self.sampler.eta, reads_uncond=True)
            if not self.sampler.known:
                warn_once(f"sampler {self.sampler.name or 'unknown'} reads the unconditional prediction itself (it adds its own "
                          "post-CFG function), as CFG++ samplers do: it gets CFG++ units (no k factor); its step is unknown to the "
                          "pack, so the guidance is approximate")

    def _prompt_for(self, conds, device, batch: int) -> torch.Tensor:
        """learn_to_guide: the prompt embedding of each sample, (1 or batch, P), from the positive conditioning ComfyUI hands
        the hook (its processed conds keep the text encoder's ``pooled_output`` and token embeddings ``cross_attn``, one
        row per prompt). ComfyUI gives sample b the conditioning's row b mod rows (``comfy.utils.repeat_to_batch_size``:
        a conditioning with fewer rows than the latent batch is tiled, one with more is cut), and so does this: a batch of
        different prompts gets one omega per sample. The embedding is read once per run."""
        if self._prompt is None:
            if not conds:
                raise ValueError(f"{self.source} is a learn_to_guide checkpoint and no positive conditioning reached it")
            if len(conds) > 1:
                warn_once(f"{self.source}: the positive conditioning has {len(conds)} parts (areas, timestep ranges, ...); "
                          "learn_to_guide reads the first one's prompt embedding")
            config = self.guidance_model.config
            found = prompt_embedding(conds[0].get("cross_attn"), conds[0].get("pooled_output"), config.prompt_embedding, config.prompt_dim)
            self._prompt = found.to(device)
        rows = self._prompt.shape[0]
        if rows == 1 or rows == batch:
            return self._prompt
        return self._prompt[torch.arange(batch, device=self._prompt.device) % rows]

    # ------------------------------------------------------------------------------------------------ wrappers

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        """ComfyUI OUTER_SAMPLE wrapper: a fresh recording per run; the run is filed under its output's fingerprint."""
        self.begin_run()
        output = executor(*args, **kwargs)
        self.end_run(output)
        return output

    def sampler_sample_wrapper(self, executor, *args, **kwargs):
        """ComfyUI SAMPLER_SAMPLE wrapper: ``executor.class_obj`` is the sampler object about to run."""
        self.set_sampler(getattr(executor, "class_obj", None))
        return executor(*args, **kwargs)


def hook_functions(hook: AnnealingHook):
    """(post_cfg, outer_sample_wrapper, sampler_sample_wrapper, reference) as plain functions over ``hook``.

    Plain functions, never bound methods, because the ModelPatcher clones that carry them copy them differently by
    release: 0.3.x deep-copies model_options (copy.deepcopy keeps a function as is, but copies a bound method's object:
    a clone would talk to a copy of the hook with none of its runs); 0.21 copies only model_options' dicts and lists and
    shares everything else. Either way every clone downstream of the patch talks to this one hook. The post-CFG
    function carries ``annealing_hook`` so a later patch can tell it apart from other packs' and replace it.
    """

    def post_cfg(args):
        return hook.post_cfg(args)

    def outer_sample(executor, *args, **kwargs):
        return hook.outer_sample_wrapper(executor, *args, **kwargs)

    def sampler_sample(executor, *args, **kwargs):
        return hook.sampler_sample_wrapper(executor, *args, **kwargs)

    def reference():
        return hook

    post_cfg.annealing_hook = reference
    return post_cfg, outer_sample, sampler_sample, reference


def find_hook(model_options: dict) -> AnnealingHook | None:
    """The last annealing hook applied to a model (from its model_options), or None."""
    references = (model_options or {}).get("transformer_options", {}).get(HOOKS_KEY) or []
    return references[-1]() if references else None
