"""The pure logic behind the ComfyUI nodes. Never imports ComfyUI: everything here is tested without a host.

The ComfyUI glue (nodes/*.py) only declares schemas and wires :class:`AnnealingHook` into ComfyUI's list hooks:

* a post-CFG function (``sampler_post_cfg_function``): receives D_c, D_u, sigma, the model and the sampler's schedule,
  returns the guided x0-prediction D_g = D_u + w k (D_c - D_u) (see ``annealing.guidance``);
* a SAMPLER_SAMPLE wrapper: tells the hook which sampler function runs (``*_cfg_pp`` renoise with the uncond themselves);
* an OUTER_SAMPLE wrapper: starts a fresh recording per sampling run and files the finished run under a fingerprint
  of its output latent, so the plot node finds the run that produced the latent it is given.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections import deque
from dataclasses import dataclass

import torch

from ..annealing import AnnealingGuidance, AnnealingOptions, GuidanceRecorder, GuidanceTrace, locate_on_schedule
from ..annealing.samplers import (
    VE_SIGMA_DOWN_SAMPLERS,
    ancestral_sigma_down,
    is_ancestral,
    k_factor_exactness,
    sampler_name_from_function,
    takes_w_as_is,
)
from ..annealing.schedules import continuous_timestep

LOG = logging.getLogger("annealing_guidance")

MODEL_FOLDER = "annealing_guidance"
MODEL_EXTENSIONS = frozenset({".safetensors", ".pt"})

RENOISE_AUTO = "auto"
RENOISE_K_FACTOR = "k_factor"
RENOISE_AS_IS = "as_is"
RENOISE_MODES = (RENOISE_AUTO, RENOISE_K_FACTOR, RENOISE_AS_IS)
RENOISE_TOOLTIP = (
    "How w (trained in CFG++ units) is applied. auto: as_is under ComfyUI's *_cfg_pp samplers (they renoise with the "
    "unconditional prediction, like training), k_factor under every other sampler. k_factor: scale w by "
    "k = sigma*alpha_next / (sigma*alpha_next - sigma_next*alpha) so an ordinary step lands where the trained CFG++ step lands. "
    "as_is: use w unchanged (only right for samplers that renoise with the unconditional prediction)."
)

#: Where the pack keeps its state on a ModelPatcher's transformer_options (a list: the last applied hook is the active one).
HOOKS_KEY = "annealing_guidance_hooks"


# ------------------------------------------------------------------------------------------------------------ model folder


def register_model_folder(folder_names_and_paths: dict, models_dir: str, name: str = MODEL_FOLDER) -> str:
    """Register ``models/<name>`` with ComfyUI's folder table (created if missing) and accept .safetensors and .pt there.

    Paths a user already configured (extra_model_paths.yaml runs before custom nodes load) are kept, and stay first.
    Returns the default folder's path.
    """
    default = os.path.join(models_dir, name)
    os.makedirs(default, exist_ok=True)
    if name in folder_names_and_paths:
        paths, extensions = folder_names_and_paths[name]
        paths = list(paths)
        if default not in paths:
            paths.append(default)
        folder_names_and_paths[name] = (paths, set(extensions) | set(MODEL_EXTENSIONS))
    else:
        folder_names_and_paths[name] = ([default], set(MODEL_EXTENSIONS))
    return default


# ------------------------------------------------------------------------------------------------------ model inspection

#: ComfyUI's model-config class names -> the checkpoint metadata's model_family names.
FAMILY_BY_CONFIG = {
    "SDXL": "sdxl", "SDXLRefiner": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl", "KOALA_700M": "sdxl", "KOALA_1B": "sdxl",
    "SDXL_instructpix2pix": "sdxl", "SD15": "sd15", "SD15_instructpix2pix": "sd15", "SD20": "sd2", "SD21UnclipL": "sd2",
    "SD21UnclipH": "sd2", "SD3": "sd3", "Flux": "flux", "FluxSchnell": "flux", "FluxInpaint": "flux",
}

#: ComfyUI sampling type -> what the model predicts (the names our training records as base_prediction_type).
HOST_PREDICTION = {"eps": "epsilon", "v_prediction": "v_prediction", "const": "flow"}
#: ComfyUI sampling type -> the delta space its predictions give without conversion (V-prediction x-space is EPS's).
NATIVE_DELTA_SPACE = {"eps": "epsilon", "v_prediction": "epsilon", "const": "velocity"}


def sampling_kind(model_sampling) -> str:
    """'eps', 'v_prediction' or 'const' from a ComfyUI model_sampling object (by its class hierarchy's names).

    EPS, V_PREDICTION and CONST are ComfyUI's mixins; X0 and EDM models share the x = x0 + sigma * eps x-space of EPS.
    """
    names = {cls.__name__ for cls in type(model_sampling).__mro__}
    if "CONST" in names:
        return "const"
    if "V_PREDICTION" in names:
        return "v_prediction"
    if "EPS" in names:
        return "eps"
    raise ValueError(f"model sampling type {type(model_sampling).__name__} is not supported (need an EPS, V_PREDICTION or CONST model)")


def model_family(config_class_name: str | None) -> str | None:
    """Our family name for a ComfyUI model-config class name (None when unknown)."""
    if not config_class_name:
        return None
    return FAMILY_BY_CONFIG.get(config_class_name, config_class_name.lower())


def is_discrete_ddpm(model_sampling) -> bool:
    """True for ComfyUI's discrete DDPM schedules (SD1.x, SDXL): their sigmas have DDPM timestep indices."""
    return any(cls.__name__ == "ModelSamplingDiscrete" for cls in type(model_sampling).__mro__) and hasattr(model_sampling, "log_sigmas")


def compatibility_problems(metadata, kind: str, family: str | None, discrete_ddpm: bool, source: str = "the checkpoint"):
    """(error, warnings) for using a checkpoint with ``metadata`` on a host model.

    error (a one-line string, or None): the checkpoint's timestep convention cannot be computed for this model.
    warnings: trained for another model family or prediction space; it runs, but w was not trained for this model.
    """
    warnings = []
    convention = metadata.timestep_convention
    if convention == "ddpm_index" and (kind == "const" or not discrete_ddpm):
        return (f"{source} uses DDPM timesteps (trained on {metadata.model_family}, a discrete-time model) but the loaded model is a "
                f"{'flow (CONST)' if kind == 'const' else 'continuous-time'} model; use a checkpoint trained for it"), warnings
    if convention in ("sigma", "sigma_x1000") and kind != "const":
        return (f"{source} uses flow timesteps ({convention}, trained on {metadata.model_family}) but the loaded model is a "
                f"{kind.upper()} model; use a checkpoint trained for it"), warnings
    if family is not None and family != metadata.model_family:
        warnings.append(f"{source} was trained for {metadata.model_family} but the loaded model is {family}: w may be off-scale")
    # What the base model predicted, when the checkpoint says (our training records it); else the delta space it measures.
    host = HOST_PREDICTION[kind]
    trained = metadata.training.get("base_prediction_type") if isinstance(metadata.training, dict) else None
    if trained in HOST_PREDICTION.values():
        if trained != host:
            warnings.append(f"{source} was trained on a model predicting {trained} but the loaded model predicts {host}: w may be off-scale")
    elif metadata.prediction_space != NATIVE_DELTA_SPACE[kind]:
        warnings.append(f"{source} measures delta in {metadata.prediction_space} space but the loaded model is a {host} model: "
                        f"delta is converted, w may be off-scale")
    return None, warnings


_WARNED: set[str] = set()


def warn_once(message: str) -> bool:
    """Log ``message`` once per process; True when it was logged now."""
    if message in _WARNED:
        return False
    _WARNED.add(message)
    LOG.warning("Annealing guidance: %s", message)
    return True


# ------------------------------------------------------------------------------------------------------------ the hook


def samples_fingerprint(samples: torch.Tensor) -> tuple:
    """A cheap identity of a latent batch: its shape and per-item sums (one host sync, once per run).

    Summed in float64 on the CPU: some devices (Apple MPS) have no float64."""
    flat = samples.detach().reshape(samples.shape[0], -1).to(device="cpu", dtype=torch.float64)
    sums = torch.stack([flat.sum(dim=1), flat.abs().sum(dim=1)], dim=1).cpu()
    return tuple(samples.shape), sums


def same_fingerprint(a: tuple, b: tuple, rtol: float = 1e-5) -> bool:
    return a[0] == b[0] and torch.allclose(a[1], b[1], rtol=rtol, atol=1e-6)


@dataclass
class SamplingRun:
    """One finished sampling run of a hook: what ran, and what was applied."""

    trace: GuidanceTrace
    sampler_name: str | None
    renoise: str  # "as_is" or "k_factor", as resolved
    exactness: str
    fingerprint: tuple | None


class AnnealingHook:
    """The annealing guidance of one node instance: options, the MLP per device, and its own recordings.

    ``post_cfg(args)`` is a ComfyUI post-CFG function; ``begin_run``/``set_sampler``/``end_run`` are driven by ComfyUI's
    wrappers. Two hooks share nothing; every run starts a fresh recording. Outside the active range the fallback CFG scale
    is the sampler's cfg (``args["cond_scale"]``): KSampler's cfg for the model patch, the guider's fallback_cfg for the guider.
    """

    max_runs = 8

    def __init__(
        self,
        guidance_model,
        *,
        lam: float = 0.4,
        normalize_delta_norm: bool = True,
        w_min: float | None = None,
        w_max: float | None = None,
        active_start: float = 0.0,
        active_end: float = 1.0,
        renoise: str = RENOISE_AUTO,
    ):
        if renoise not in RENOISE_MODES:
            raise ValueError(f"renoise must be one of {', '.join(RENOISE_MODES)}, got {renoise!r}")
        if getattr(guidance_model, "metadata", None) is None:
            raise ValueError("annealing_model: not an annealing guidance model (connect Load Annealing Guidance Model)")
        self.options = AnnealingOptions(
            lam=float(lam), normalize_delta_norm=bool(normalize_delta_norm), w_min=w_min, w_max=w_max,
            active_start=float(active_start), active_end=float(active_end), fallback_cfg=1.0,
        )  # validates; fallback_cfg is filled in per call from the sampler's cfg
        self.guidance_model = guidance_model
        self.renoise = renoise
        self.recorder = GuidanceRecorder()
        self.runs: deque[SamplingRun] = deque(maxlen=self.max_runs)
        self.sampler_name: str | None = None
        self.sampler_eta: float = 1.0
        self._models: dict[str, torch.nn.Module] = {}
        self._guides: dict[tuple[str, float], AnnealingGuidance] = {}
        self._checked_model_sampling = None

    @property
    def metadata(self):
        return self.guidance_model.metadata

    @property
    def source(self) -> str:
        return os.path.basename(getattr(self.guidance_model, "source_path", "") or "") or "the annealing checkpoint"

    # ---------------------------------------------------------------------------------------------- run bookkeeping

    def begin_run(self) -> None:
        """A sampling run starts: forget the previous recording and sampler."""
        self.recorder.reset()
        self.sampler_name = None
        self.sampler_eta = 1.0
        self._checked_model_sampling = None

    def set_sampler(self, sampler) -> None:
        """Learn which sampler runs from ComfyUI's sampler object (KSAMPLER keeps its function and extra options)."""
        self.sampler_name = sampler_name_from_function(getattr(sampler, "sampler_function", None))
        extra = getattr(sampler, "extra_options", None) or {}
        eta = extra.get("eta", 1.0)
        self.sampler_eta = float(eta) if isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0 else 1.0

    def end_run(self, samples: torch.Tensor | None) -> SamplingRun:
        """File the finished run (its trace, and the fingerprint of its output latent)."""
        renoise = self.resolved_renoise()
        run = SamplingRun(
            trace=self.recorder.trace(),
            sampler_name=self.sampler_name,
            renoise=renoise,
            exactness=k_factor_exactness(self.sampler_name, renoise == RENOISE_AS_IS),
            fingerprint=samples_fingerprint(samples) if isinstance(samples, torch.Tensor) and samples.dim() >= 1 else None,
        )
        self.runs.append(run)
        return run

    def find_run(self, samples: torch.Tensor | None) -> SamplingRun | None:
        """The run whose output is ``samples`` (or, failing a match, the latest run); None before any run."""
        if not self.runs:
            return None
        if isinstance(samples, torch.Tensor):
            wanted = samples_fingerprint(samples)
            for run in reversed(self.runs):
                if run.fingerprint is not None and same_fingerprint(run.fingerprint, wanted):
                    return run
        return self.runs[-1]

    def resolved_renoise(self) -> str:
        if self.renoise != RENOISE_AUTO:
            return self.renoise
        if self.sampler_name is None:
            warn_once("could not tell which sampler is running; applying w with the k factor (set renoise to as_is for CFG++ samplers)")
            return RENOISE_K_FACTOR
        return RENOISE_AS_IS if takes_w_as_is(self.sampler_name) else RENOISE_K_FACTOR

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

    def _guide_for(self, device: torch.device, cond_scale: float) -> AnnealingGuidance:
        key = (str(device), float(cond_scale))
        guide = self._guides.get(key)
        if guide is None:
            model = self._models.get(str(device))
            if model is None:  # the MLP computes in float32 on the diffusion model's device
                model = copy.deepcopy(self.guidance_model).to(device=device, dtype=torch.float32)
                self._models[str(device)] = model
            fallback = max(float(cond_scale), 0.0)
            guide = AnnealingGuidance(model, dataclasses.replace(self.options, fallback_cfg=fallback))
            self._guides[key] = guide
        return guide

    def post_cfg(self, args: dict) -> torch.Tensor:
        """ComfyUI post-CFG function: the guided x0-prediction for this evaluation (replaces the plain CFG result)."""
        d_cond, d_uncond = args.get("cond_denoised"), args.get("uncond_denoised")
        if d_cond is None or d_uncond is None:  # no uncond pass (the cfg1 optimisation is disabled; another patch dropped it)
            warn_once("no unconditional prediction reached the hook (another patch removed it?): annealing guidance is off for this run")
            return args["denoised"]
        if args.get("model_options", {}).get("sampler_cfg_function") is not None:
            warn_once("another node set a sampler_cfg_function (e.g. RescaleCFG, PerpNeg): inside the active range annealing "
                      "guidance replaces its result")
        base_model = args["model"]
        model_sampling = base_model.model_sampling
        if self._checked_model_sampling is not model_sampling:  # once per run (a later patch may change the sampling)
            config = getattr(base_model, "model_config", None)
            self.check_model(model_sampling, type(config).__name__ if config is not None else None)
            self._checked_model_sampling = model_sampling
        kind = sampling_kind(model_sampling)
        sigma = args["sigma"]
        transformer_options = args.get("model_options", {}).get("transformer_options", {})
        sample_sigmas = transformer_options.get("sample_sigmas")
        as_is = self.resolved_renoise() == RENOISE_AS_IS
        sigma_next = None
        if not as_is and sample_sigmas is not None and is_ancestral(self.sampler_name):
            # sigma_down belongs to the step (sigma_i -> sigma_i+1), also for evaluations inside it (dpmpp_2s_ancestral)
            step, schedule_next, _ = locate_on_schedule(sigma.reshape(-1).to(torch.float32), sample_sigmas)
            step_start = sample_sigmas.to(device=step.device, dtype=torch.float32)[step]
            formula = "eps" if self.sampler_name in VE_SIGMA_DOWN_SAMPLERS else kind  # as ComfyUI computes it for that sampler
            sigma_next = ancestral_sigma_down(step_start, schedule_next, formula, self.sampler_eta)
        sigma_to_timestep = None
        if self.metadata.timestep_convention == "ddpm_index":
            log_sigmas = model_sampling.log_sigmas
            if log_sigmas.shape[0] == getattr(model_sampling, "num_timesteps", log_sigmas.shape[0]):

                def sigma_to_timestep(s):  # a float DDPM index (ComfyUI's own timestep() rounds to the nearest index)
                    return continuous_timestep(s, log_sigmas)
            else:  # a distilled schedule (LCM) keeps a subset of the sigmas: only the host knows their DDPM indices
                sigma_to_timestep = model_sampling.timestep

        guide = self._guide_for(d_cond.device, float(args.get("cond_scale", 1.0)))
        return guide.guide(
            sigma, d_cond, d_uncond, sampling=kind, sigma_to_timestep=sigma_to_timestep, sample_sigmas=sample_sigmas,
            sigma_next=sigma_next, sampler_renoises_with_uncond=as_is, recorder=self.recorder,
        )

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


# ------------------------------------------------------------------------------------------------------------- plots


def parse_lambdas(text: str) -> tuple[float, ...]:
    """'0.1, 0.4 0.8' -> (0.1, 0.4, 0.8); every value in [0, 1], 1 to 12 values."""
    parts = [p for p in str(text).replace(",", " ").split() if p]
    if not parts:
        raise ValueError("lambdas: give at least one value in [0, 1], e.g. 0.2, 0.4, 0.8")
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"lambdas: {part!r} is not a number") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"lambdas: every value must be in [0, 1], got {value}")
        values.append(value)
    if len(values) > 12:
        raise ValueError(f"lambdas: at most 12 values, got {len(values)}")
    return tuple(values)


def figure_to_tensor(fig) -> torch.Tensor:
    """A matplotlib figure as a ComfyUI IMAGE: float32 (1, H, W, 3) in [0, 1]."""
    from ..annealing.plots import figure_to_image

    image = figure_to_image(fig)
    return torch.from_numpy(image.copy()).unsqueeze(0)


def trace_title(run: SamplingRun, lam: float, source: str) -> str:
    sampler = run.sampler_name or "unknown sampler"
    return f"{source}: lambda {lam:g}, {sampler}, w {run.renoise.replace('_', ' ')} ({run.exactness})"


def schedule_plot(run: SamplingRun | None, lam: float, source: str) -> torch.Tensor:
    from ..annealing.plots import plot_trace

    if run is None:
        fig = plot_trace(GuidanceTrace(steps=[]), title=f"{source}: no sampling run recorded yet")
    else:
        fig = plot_trace(run.trace, title=trace_title(run, lam, source))
    return figure_to_tensor(fig)


def explorer_plot(guidance_model, lambdas) -> torch.Tensor:
    from ..annealing.plots import plot_model_explorer

    return figure_to_tensor(plot_model_explorer(guidance_model, lambdas=lambdas))
