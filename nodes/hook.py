"""The annealing hook of one node instance: a thin translation of ComfyUI's sampler-hook arguments into one call of
:meth:`annealing.AnnealingGuidance.guide`, plus the bookkeeping of its sampling runs. Never imports ComfyUI (tested
without a host).

ComfyUI drives it through three list hooks (see :mod:`.patching`):

* a post-CFG function (``sampler_post_cfg_function``): D_c, D_u, sigma, the model, the sampler's schedule and its CFG scale
  in; the guided x0-prediction out (every decision about the scale is the core's);
* a SAMPLER_SAMPLE wrapper: which sampler function runs (its name and ancestral eta), told to the core as-is;
* an OUTER_SAMPLE wrapper: a fresh recording per sampling run, filed under a fingerprint of the run's output latent, so
  the plot node finds the run that produced the latent it is given.
"""

from __future__ import annotations

import copy
import os
from collections import deque
from dataclasses import dataclass

import torch

from ..annealing import AnnealingGuidance, AnnealingOptions, GuidanceRecorder, GuidanceTrace, SamplerInfo, prompt_embedding
from ..annealing.samplers import sampler_name_from_function
from ..annealing.scale_rule import describe_rule
from .host import compatibility_problems, is_discrete_ddpm, model_family, sampling_kind, warn_once

#: Where the pack keeps its hooks on a ModelPatcher's transformer_options (a list: the last applied hook is the active one).
HOOKS_KEY = "annealing_guidance_hooks"


def samples_fingerprint(samples: torch.Tensor) -> tuple:
    """A cheap identity of a latent batch: its shape and per-item sums (one host sync, once per run).

    Summed in float64 on the CPU: some devices (Apple MPS) have no float64."""
    flat = samples.detach().reshape(samples.shape[0], -1).to(device="cpu", dtype=torch.float64)
    sums = torch.stack([flat.sum(dim=1), flat.abs().sum(dim=1)], dim=1)
    return tuple(samples.shape), sums


def same_fingerprint(a: tuple, b: tuple, rtol: float = 1e-5) -> bool:
    return a[0] == b[0] and torch.allclose(a[1], b[1], rtol=rtol, atol=1e-6)


@dataclass
class SamplingRun:
    """One finished sampling run of a hook: what ran, and what was applied."""

    trace: GuidanceTrace
    sampler_name: str | None
    mode: str
    rule: str  # one line: what the mode did under this sampler
    fingerprint: tuple | None


class AnnealingHook:
    """The annealing guidance of one node instance: the user's options, the MLP per device, and its own recordings.

    Two hooks share nothing; every run starts a fresh recording. Outside the active range the fallback CFG scale is
    ``options.fallback_cfg``, or when that is None the sampler's own cfg (KSampler's cfg for the model patch).
    """

    max_runs = 8

    def __init__(self, guidance_model, options: AnnealingOptions):
        if getattr(guidance_model, "metadata", None) is None:
            raise ValueError("annealing_model: not an annealing guidance model (connect Load Annealing Guidance Model)")
        self.guidance_model = guidance_model
        self.options = options
        self.recorder = GuidanceRecorder()
        self.runs: deque[SamplingRun] = deque(maxlen=self.max_runs)
        self.sampler = SamplerInfo()
        self._guides: dict[str, AnnealingGuidance] = {}
        self._checked_model_sampling = None
        self._kind: str | None = None
        self._prompt: torch.Tensor | None = None
        AnnealingGuidance(guidance_model, options)  # refuse a setting the checkpoint cannot take now, on the node

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
        self._checked_model_sampling = None
        self._prompt = None

    def set_sampler(self, sampler) -> None:
        """Learn which sampler runs from ComfyUI's sampler object (KSAMPLER keeps its function and extra options)."""
        name = sampler_name_from_function(getattr(sampler, "sampler_function", None))
        extra = getattr(sampler, "extra_options", None) or {}
        self.sampler = SamplerInfo(name, extra.get("eta", 1.0))

    def end_run(self, samples: torch.Tensor | None) -> SamplingRun:
        """File the finished run (its trace, and the fingerprint of its output latent)."""
        run = SamplingRun(
            trace=self.recorder.trace(),
            sampler_name=self.sampler.name,
            mode=self.options.mode,
            rule=describe_rule(self.options.mode, self.sampler.name, self.metadata.training_grid.describe()),
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

    def check_model(self, model_sampling, config_class_name: str | None) -> list[str]:
        """Raise ValueError when the checkpoint cannot work with this model; warn once (and return) family/space mismatches."""
        kind = sampling_kind(model_sampling)
        error, warnings = compatibility_problems(
            self.metadata, kind, model_family(config_class_name), is_discrete_ddpm(model_sampling), source=self.source
        )
        if error:
            raise ValueError(error)
        for message in warnings:
            warn_once(message)
        return warnings

    def _guide_for(self, device: torch.device) -> AnnealingGuidance:
        guide = self._guides.get(str(device))
        if guide is None:  # the MLP computes in float32 on the diffusion model's device
            model = copy.deepcopy(self.guidance_model).to(device=device, dtype=torch.float32)
            guide = self._guides[str(device)] = AnnealingGuidance(model, self.options)
        return guide

    def post_cfg(self, args: dict) -> torch.Tensor:
        """ComfyUI post-CFG function: the guided x0-prediction for this evaluation (replaces the plain CFG result)."""
        d_cond, d_uncond = args.get("cond_denoised"), args.get("uncond_denoised")
        # No uncond pass (a guider with no negative, or a patch that dropped it): ComfyUI then hands zeros as uncond_denoised
        if d_cond is None or d_uncond is None or args.get("uncond", ()) is None:
            warn_once("no unconditional prediction reached the hook (another patch removed it?): annealing guidance is off for this run")
            return args["denoised"]
        model_options = args.get("model_options", {})
        if model_options.get("sampler_cfg_function") is not None:
            warn_once("another node set a sampler_cfg_function (e.g. RescaleCFG, PerpNeg): inside the active range annealing "
                      "guidance replaces its result")
        base_model = args["model"]
        if self._checked_model_sampling is not base_model.model_sampling:  # once per run (a later patch may change the sampling)
            config = getattr(base_model, "model_config", None)
            self.check_model(base_model.model_sampling, type(config).__name__ if config is not None else None)
            self._checked_model_sampling, self._kind = base_model.model_sampling, sampling_kind(base_model.model_sampling)
        return self._guide_for(d_cond.device).guide(
            args["sigma"], d_cond, d_uncond, sampling=self._kind, sampler=self.sampler, host_cfg=float(args.get("cond_scale", 1.0)),
            sample_sigmas=model_options.get("transformer_options", {}).get("sample_sigmas"), recorder=self.recorder,
            prompt=self._prompt_for(args.get("cond"), d_cond.device) if self.learned else None,
        )

    def _prompt_for(self, conds, device) -> torch.Tensor:
        """learn_to_guide: the prompt embedding of the positive conditioning ComfyUI hands the hook (its processed conds keep
        the text encoder's ``pooled_output`` and token embeddings ``cross_attn``); read once per run."""
        if self._prompt is None:
            if not conds:
                raise ValueError(f"{self.source} is a learn_to_guide checkpoint and no positive conditioning reached it")
            if len(conds) > 1:
                warn_once(f"{self.source}: the positive conditioning has {len(conds)} parts (areas, timestep ranges, ...); "
                          "learn_to_guide reads the first one's prompt embedding")
            config = self.guidance_model.config
            found = prompt_embedding(conds[0].get("cross_attn"), conds[0].get("pooled_output"), config.prompt_embedding, config.prompt_dim)
            self._prompt = found.to(device)
        return self._prompt

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
    """(post_cfg, outer_sample_wrapper, sampler_sample_wrapper, reference) as plain closures over ``hook``.

    Closures, not bound methods: ModelPatcher.clone() deep-copies model_options, and deepcopy copies a bound method's
    object but keeps a function as is. Every clone downstream must keep talking to this one hook.
    """

    def post_cfg(args):
        return hook.post_cfg(args)

    def outer_sample(executor, *args, **kwargs):
        return hook.outer_sample_wrapper(executor, *args, **kwargs)

    def sampler_sample(executor, *args, **kwargs):
        return hook.sampler_sample_wrapper(executor, *args, **kwargs)

    def reference():
        return hook

    return post_cfg, outer_sample, sampler_sample, reference


def find_hook(model_options: dict) -> AnnealingHook | None:
    """The last annealing hook applied to a model (from its model_options), or None."""
    references = (model_options or {}).get("transformer_options", {}).get(HOOKS_KEY) or []
    return references[-1]() if references else None
