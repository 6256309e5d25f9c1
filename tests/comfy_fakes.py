"""Stand-ins for ComfyUI's objects with the same shape (a post-CFG ``args`` dict, a sampler object with
``sampler_function``, a model_sampling whose class hierarchy is named like ComfyUI's), and the pack imported the way
ComfyUI sees it: the repository root as a package, ``nodes`` only relative to it. Used by test_host.py and test_hook.py.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PACK = "annealing_guidance_pack_under_test"


def _import(name: str):
    if PACK not in sys.modules:
        package = types.ModuleType(PACK)
        package.__path__ = [str(REPO)]  # a namespace for the repo root, without running its ComfyUI entry point
        sys.modules[PACK] = package
    return importlib.import_module(f"{PACK}.{name}")


core = _import("annealing")
samplers = _import("annealing.samplers")


# ----------------------------------------------------------------------------------------------------------- fakes


class ModelSamplingDiscrete(torch.nn.Module):
    """Named like ComfyUI's discrete schedule; sigmas of SD's scaled_linear betas."""

    def __init__(self):
        super().__init__()
        sigmas = core.VPGrid().schedule_sigmas().float()
        self.register_buffer("sigmas", sigmas)
        self.register_buffer("log_sigmas", sigmas.log())


class EPS:
    pass


class V_PREDICTION(EPS):  # noqa: N801 (ComfyUI's class names)
    pass


class CONST:
    pass


class X0(EPS):
    pass


class IMG_TO_IMG(X0):  # noqa: N801 (ComfyUI 0.3.64 and 0.21: the EPS x-space, a model that reads raw x)
    pass


class IMG_TO_IMG_FLOW(CONST):  # noqa: N801 (ComfyUI 0.21: sampling starts from an image)
    pass


class V_PREDICTION_DDPM:  # noqa: N801 (ComfyUI 0.21, CogVideoX: not an EPS subclass, but its x-space is EPS's)
    pass


class COSMOS_RFLOW:  # noqa: N801
    pass


class ModelSamplingDiscreteFlow(torch.nn.Module):
    pass


def model_sampling(kind: str, noise_scale: float | None = None):
    """A model_sampling named like ComfyUI's: kind "eps", "v", "const", or a mixin's name ("IMG_TO_IMG_FLOW", ...);
    ``noise_scale`` set as newer releases do on some flow models."""
    mixins = {"eps": EPS, "v": V_PREDICTION, "const": CONST, "IMG_TO_IMG": IMG_TO_IMG, "IMG_TO_IMG_FLOW": IMG_TO_IMG_FLOW,
              "V_PREDICTION_DDPM": V_PREDICTION_DDPM}
    mixin = mixins[kind]
    base = ModelSamplingDiscreteFlow if issubclass(mixin, CONST) else ModelSamplingDiscrete
    sampling = type("ModelSampling", (base, mixin), {})()
    if noise_scale is not None:
        sampling.noise_scale = noise_scale
    return sampling


class FakeBaseModel:
    def __init__(self, kind="eps", config_name="SDXL"):
        self.model_sampling = model_sampling(kind)
        self.model_config = type(config_name, (), {})()


def sample_euler_cfg_pp():  # named like k-diffusion's functions
    pass


def sample_euler():
    pass


def sample_euler_ancestral_RF():  # noqa: N802
    pass


def sample_unipc():
    pass


def sample_euler_pp():  # ComfyUI's SamplerEulerCFG++ "alternative" (comfy_extras.nodes_advanced_samplers)
    pass


def sample_cfgpp_ud10_ab():  # ComfyUI 0.35's CFG++ sampler named the other way round
    pass


def sample_mystery():  # a sampler the pack does not know by name
    pass


def sampler_post_cfg_function():
    """What a CFG++ sampler adds to model_options while it runs: a post-CFG function defined inside a function of the
    sampler's own module (here this one, like the samplers above), reading uncond_denoised."""

    def post_cfg_function(args):
        return args["denoised"]

    return post_cfg_function


class FakeSampler:
    def __init__(self, function, **extra_options):
        self.sampler_function = function
        self.extra_options = extra_options


class FakeExecutor:
    def __init__(self, class_obj, result):
        self.class_obj, self.result, self.calls = class_obj, result, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.result


def sdxl_model(seed=0):
    torch.manual_seed(seed)
    model = core.GuidanceScaleModel(core.GuidanceModelConfig(), core.upstream_metadata())
    model.source_path = "/models/annealing_guidance/annealing_sdxl.pt"
    return model.eval()


def flow_metadata():
    return core.CheckpointMetadata(model_family="sd3", prediction_space="velocity", timestep_convention="sigma_x1000")


def post_cfg_args(base, sigma, d_cond, d_uncond, sample_sigmas, cond_scale=1.0):
    """The args dict ComfyUI's cfg_function hands a post-CFG function (processed conds as one empty part each)."""
    return {"denoised": d_uncond + cond_scale * (d_cond - d_uncond), "cond_denoised": d_cond, "uncond_denoised": d_uncond,
            "cond": [{}], "uncond": [{}], "sigma": sigma, "model": base, "cond_scale": cond_scale, "input": None,
            "model_options": {"transformer_options": {"sample_sigmas": sample_sigmas}}}


