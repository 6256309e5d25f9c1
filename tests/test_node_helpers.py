"""The pure helpers behind the ComfyUI nodes (nodes/helpers.py, annealing/samplers.py): no ComfyUI needed.

The pack is imported the way ComfyUI sees it: the repository root as a package, ``nodes`` only relative to it.
ComfyUI's objects are stood in for by small fakes with the same shape (a post-CFG ``args`` dict, a sampler object with
``sampler_function``, a model_sampling whose class hierarchy is named like ComfyUI's).
"""

from __future__ import annotations

import copy
import functools
import importlib
import logging
import math
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PACK = "annealing_guidance_pack_under_test"


def _import(name: str):
    if PACK not in sys.modules:
        package = types.ModuleType(PACK)
        package.__path__ = [str(REPO)]  # a namespace for the repo root, without running its ComfyUI entry point
        sys.modules[PACK] = package
    return importlib.import_module(f"{PACK}.{name}")


helpers = _import("nodes.helpers")
core = _import("annealing")
samplers = _import("annealing.samplers")
schedules = _import("annealing.schedules")


# ----------------------------------------------------------------------------------------------------------- fakes


class ModelSamplingDiscrete(torch.nn.Module):
    """Named like ComfyUI's discrete schedule; sigmas of SD's scaled_linear betas."""

    def __init__(self):
        super().__init__()
        sigmas = schedules.vp_sigmas(schedules.scaled_linear_alphas_cumprod()).float()
        self.register_buffer("sigmas", sigmas)
        self.register_buffer("log_sigmas", sigmas.log())


class EPS:
    pass


class V_PREDICTION(EPS):  # noqa: N801 (ComfyUI's class names)
    pass


class CONST:
    pass


class COSMOS_RFLOW:  # noqa: N801
    pass


class ModelSamplingDiscreteFlow(torch.nn.Module):
    pass


def model_sampling(kind: str):
    if kind == "const":
        return type("ModelSampling", (ModelSamplingDiscreteFlow, CONST), {})()
    mixin = {"eps": EPS, "v": V_PREDICTION}[kind]
    return type("ModelSampling", (ModelSamplingDiscrete, mixin), {})()


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
    return {"denoised": d_uncond + cond_scale * (d_cond - d_uncond), "cond_denoised": d_cond, "uncond_denoised": d_uncond,
            "sigma": sigma, "model": base, "cond_scale": cond_scale, "input": None,
            "model_options": {"transformer_options": {"sample_sigmas": sample_sigmas}}}


# ------------------------------------------------------------------------------------------------------ model folder


def test_register_model_folder_creates_it_and_accepts_safetensors_and_pt(tmp_path):
    table = {}
    path = helpers.register_model_folder(table, str(tmp_path / "models"))
    assert Path(path).is_dir() and path == str(tmp_path / "models" / "annealing_guidance")
    assert table["annealing_guidance"] == ([path], {".safetensors", ".pt"})


def test_register_model_folder_keeps_user_paths_first(tmp_path):
    table = {"annealing_guidance": (["/user/configured"], set())}  # as extra_model_paths.yaml leaves it
    path = helpers.register_model_folder(table, str(tmp_path))
    paths, extensions = table["annealing_guidance"]
    assert paths == ["/user/configured", path] and extensions == {".safetensors", ".pt"}
    helpers.register_model_folder(table, str(tmp_path))  # idempotent
    assert table["annealing_guidance"][0] == ["/user/configured", path]


# ------------------------------------------------------------------------------------------------------ samplers


def test_sampler_names_from_functions():
    assert samplers.sampler_name_from_function(sample_euler_cfg_pp) == "euler_cfg_pp"
    assert samplers.sampler_name_from_function(functools.partial(sample_euler, 1)) == "euler"
    assert samplers.sampler_name_from_function(sample_euler_ancestral_RF) == "euler_ancestral"
    assert samplers.sampler_name_from_function(sample_unipc) == "uni_pc"
    assert samplers.sampler_name_from_function(None) is None
    assert samplers.renoises_with_uncond("dpmpp_2m_cfg_pp") and not samplers.renoises_with_uncond("dpmpp_2m")
    assert not samplers.renoises_with_uncond(None)
    assert samplers.is_ancestral("euler_ancestral") and not samplers.is_ancestral("euler_ancestral_cfg_pp")
    assert samplers.k_factor_exactness("euler", False) == "exact" and samplers.k_factor_exactness("dpmpp_2m", False) == "approximate"
    assert samplers.k_factor_exactness("euler_cfg_pp", True) == "exact"
    # a forced mode that contradicts the sampler is called out, not passed off as an approximation
    assert samplers.k_factor_exactness("euler", True) == "mismatched" and samplers.k_factor_exactness("euler_cfg_pp", False) == "mismatched"
    # lcm rebuilds x from the x0-prediction alone: w as is reproduces the CFG++ x0 (k would over-guide by k)
    assert samplers.takes_w_as_is("lcm") and samplers.k_factor_exactness("lcm", True) == "approximate"


def test_ancestral_sigma_down_eps_matches_k_diffusion_formula():
    sigma, sigma_next = torch.tensor([14.6, 3.0, 0.5]), torch.tensor([3.0, 0.5, 0.0])
    down = samplers.ancestral_sigma_down(sigma, sigma_next, "eps", eta=1.0)
    for s, n, d in zip(sigma.tolist(), sigma_next.tolist(), down.tolist()):
        up = min(n, math.sqrt(n**2 * (s**2 - n**2) / s**2))
        assert d == pytest.approx(math.sqrt(n**2 - up**2), rel=1e-5, abs=1e-6)  # float32
    assert down[-1] == 0
    assert torch.equal(samplers.ancestral_sigma_down(sigma, sigma_next, "eps", eta=0.0), sigma_next)
    assert (samplers.ancestral_sigma_down(sigma, sigma_next, "v_prediction", eta=0.5) >= down).all()  # less noise, longer move


def test_ancestral_sigma_down_flow_formula():
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.6, 0.2, 0.0])
    down = samplers.ancestral_sigma_down(sigma, sigma_next, "const", eta=1.0)
    expected = [n * (1 + (n / s - 1)) for s, n in zip(sigma.tolist(), sigma_next.tolist())]
    assert down.tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="eta"):
        samplers.ancestral_sigma_down(sigma, sigma_next, "const", eta=-1)


# ------------------------------------------------------------------------------------------------ model inspection


def test_sampling_kind_reads_comfyui_class_hierarchy():
    assert helpers.sampling_kind(model_sampling("eps")) == "eps"
    assert helpers.sampling_kind(model_sampling("v")) == "v_prediction"
    assert helpers.sampling_kind(model_sampling("const")) == "const"
    with pytest.raises(ValueError, match="not supported"):
        helpers.sampling_kind(COSMOS_RFLOW())
    assert helpers.is_discrete_ddpm(model_sampling("eps")) and not helpers.is_discrete_ddpm(model_sampling("const"))
    assert helpers.model_family("SDXL") == "sdxl" and helpers.model_family("SD3") == "sd3" and helpers.model_family(None) is None


def test_compatibility_problems():
    upstream = core.upstream_metadata()
    assert helpers.compatibility_problems(upstream, "eps", "sdxl", True) == (None, [])
    error, _ = helpers.compatibility_problems(upstream, "const", "sd3", False, source="a.pt")
    assert error.startswith("a.pt uses DDPM timesteps") and "flow" in error
    error, _ = helpers.compatibility_problems(flow_metadata(), "eps", "sdxl", True)
    assert "sigma_x1000" in error and "EPS" in error
    error, warnings = helpers.compatibility_problems(upstream, "eps", "sd15", True)
    assert error is None and len(warnings) == 1 and "sdxl" in warnings[0] and "sd15" in warnings[0]
    error, warnings = helpers.compatibility_problems(upstream, "v_prediction", "sdxl", True)
    assert error is None and "epsilon" in warnings[0] and "v_prediction" in warnings[0]
    assert helpers.compatibility_problems(flow_metadata(), "const", "sd3", False) == (None, [])
    # our training on a v-prediction model writes an epsilon-space checkpoint: no warning on that same kind of model
    trained_on_v = core.CheckpointMetadata(model_family="sd2", training={"base_prediction_type": "v_prediction"})
    assert helpers.compatibility_problems(trained_on_v, "v_prediction", "sd2", True) == (None, [])
    _, warnings = helpers.compatibility_problems(trained_on_v, "eps", "sd2", True)  # SD2-base is another model
    assert len(warnings) == 1 and "v_prediction" in warnings[0] and "epsilon" in warnings[0]
    # a checkpoint that does not say what it was trained on: compared by delta space
    unknown = core.CheckpointMetadata(model_family="sd3", prediction_space="epsilon", timestep_convention="sigma_x1000")
    _, warnings = helpers.compatibility_problems(unknown, "const", "sd3", False)
    assert len(warnings) == 1 and "epsilon space" in warnings[0]


def test_warn_once(caplog):
    with caplog.at_level(logging.WARNING, logger="annealing_guidance"):
        assert helpers.warn_once("unique message for this test")
        assert not helpers.warn_once("unique message for this test")
    assert sum("unique message for this test" in r.getMessage() for r in caplog.records) == 1


# -------------------------------------------------------------------------------------------------------- the hook


def test_hook_post_cfg_applies_w_times_k_and_records(tmp_path):
    model = sdxl_model()
    hook = helpers.AnnealingHook(model, lam=0.4, normalize_delta_norm=False)
    base = FakeBaseModel("eps")
    sample_sigmas = torch.cat([base.model_sampling.sigmas[torch.tensor([900, 600, 300, 0])], torch.zeros(1)])
    torch.manual_seed(1)
    d_cond, d_uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    hook.begin_run()
    hook.set_sampler(FakeSampler(sample_euler))
    sigma = sample_sigmas[1].expand(2)
    out = hook.post_cfg(post_cfg_args(base, sigma, d_cond, d_uncond, sample_sigmas))
    # expected from the spec, by hand: delta_eps = (D_c - D_u) / sigma, t = 600, k = sigma / (sigma - sigma_next)
    norm = ((d_cond - d_uncond) / sigma[0]).reshape(2, -1).norm(dim=1)
    w = model(torch.full((2,), 600.0), norm, 0.4)
    k = sample_sigmas[1] / (sample_sigmas[1] - sample_sigmas[2])
    expected = d_uncond + (w * k).reshape(-1, 1, 1, 1) * (d_cond - d_uncond)
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5)
    run = hook.end_run(out)
    assert run.sampler_name == "euler" and run.renoise == "k_factor" and run.exactness == "exact"
    assert run.trace.steps == [1] and run.trace["w"].shape == (1, 2)
    # under a CFG++ sampler w is used as is
    hook.begin_run()
    hook.set_sampler(FakeSampler(sample_euler_cfg_pp))
    out_pp = hook.post_cfg(post_cfg_args(base, sigma, d_cond, d_uncond, sample_sigmas))
    assert torch.allclose(out_pp, d_uncond + w.reshape(-1, 1, 1, 1) * (d_cond - d_uncond), rtol=1e-4, atol=1e-5)
    run_pp = hook.end_run(out_pp)
    assert run_pp.renoise == "as_is"
    # the plot's CFG-equivalent scale is w * k in ordinary CFG units under a CFG++ sampler too (not w again)
    assert torch.allclose(torch.from_numpy(run_pp.trace["cfg_scale"][0]), w * k, rtol=1e-4)


def test_hook_uses_the_hosts_timesteps_for_a_distilled_schedule():
    """LCM's ModelSamplingDiscreteDistilled keeps 50 of the 1000 sigmas: interpolating over them would give 0..49."""
    base = FakeBaseModel("eps")
    full = base.model_sampling.sigmas
    base.model_sampling.num_timesteps = 1000
    base.model_sampling.log_sigmas = full[19::20].log()  # 50 points, DDPM indices 19, 39, ..., 999
    base.model_sampling.timestep = lambda s: (s.log().reshape(1, -1) - base.model_sampling.log_sigmas.reshape(-1, 1)).abs().argmin(0) * 20.0 + 19
    sample_sigmas = torch.cat([full[torch.tensor([999, 499, 19])], torch.zeros(1)])
    hook = helpers.AnnealingHook(sdxl_model())
    hook.begin_run()
    hook.set_sampler(FakeSampler(sample_euler))
    for sigma in sample_sigmas[:3]:
        hook.post_cfg(post_cfg_args(base, sigma.expand(1), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), sample_sigmas))
    assert hook.end_run(None).trace["timestep"][:, 0].tolist() == [999.0, 499.0, 19.0]


def test_hook_warns_when_another_pack_set_the_cfg_function(caplog):
    base = FakeBaseModel("eps")
    sample_sigmas = torch.cat([base.model_sampling.sigmas[torch.tensor([800, 400])], torch.zeros(1)])
    args = post_cfg_args(base, sample_sigmas[:1], torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), sample_sigmas)
    args["model_options"]["sampler_cfg_function"] = lambda a: a["cond"]
    hook = helpers.AnnealingHook(sdxl_model())
    hook.begin_run()
    with caplog.at_level("WARNING", logger="annealing_guidance"):
        hook.post_cfg(args)
    assert any("sampler_cfg_function" in r.getMessage() for r in caplog.records)


def test_fingerprint_sums_on_the_cpu_in_float64():
    samples = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    shape, sums = helpers.samples_fingerprint(samples)
    assert shape == (2, 4, 8, 8) and sums.dtype == torch.float64 and sums.device.type == "cpu"
    assert helpers.same_fingerprint((shape, sums), helpers.samples_fingerprint(samples.clone()))


def test_hook_renoise_override_and_unknown_sampler():
    base = FakeBaseModel("eps")
    sample_sigmas = torch.cat([base.model_sampling.sigmas[torch.tensor([800, 400])], torch.zeros(1)])
    d_cond, d_uncond = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    forced = helpers.AnnealingHook(sdxl_model(), renoise="as_is")
    forced.begin_run()
    forced.set_sampler(FakeSampler(sample_euler))
    forced.post_cfg(post_cfg_args(base, sample_sigmas[:1], d_cond, d_uncond, sample_sigmas))
    assert forced.end_run(None).trace["k"][0, 0] == 1.0
    unknown = helpers.AnnealingHook(sdxl_model(), renoise="auto")
    unknown.begin_run()
    unknown.set_sampler(object())  # not a KSAMPLER: the k factor is the safe default
    assert unknown.resolved_renoise() == "k_factor"
    with pytest.raises(ValueError, match="renoise"):
        helpers.AnnealingHook(sdxl_model(), renoise="sometimes")
    with pytest.raises(ValueError, match="annealing_model"):
        helpers.AnnealingHook(torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="lambda"):
        helpers.AnnealingHook(sdxl_model(), lam=1.5)


def test_hook_ancestral_sampler_uses_sigma_down():
    base = FakeBaseModel("eps")
    sample_sigmas = torch.cat([base.model_sampling.sigmas[torch.tensor([800, 400])], torch.zeros(1)])
    hook = helpers.AnnealingHook(sdxl_model())
    hook.begin_run()
    hook.set_sampler(FakeSampler(sample_euler_ancestral_RF, eta=0.7))
    hook.post_cfg(post_cfg_args(base, sample_sigmas[:1], torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), sample_sigmas))
    k = float(hook.end_run(None).trace["k"][0, 0])
    down = float(samplers.ancestral_sigma_down(sample_sigmas[:1], sample_sigmas[1:2], "eps", eta=0.7)[0])
    assert k == pytest.approx(float(sample_sigmas[0]) / (float(sample_sigmas[0]) - down), rel=1e-5)


def test_hook_refuses_a_model_it_cannot_serve():
    hook = helpers.AnnealingHook(sdxl_model())
    with pytest.raises(ValueError, match="DDPM timesteps"):
        hook.check_model(model_sampling("const"), "SD3")


def test_wrappers_start_fresh_runs_and_find_the_run_of_a_latent():
    base = FakeBaseModel("eps")
    hook = helpers.AnnealingHook(sdxl_model())
    post_cfg, outer, sampler_wrapper, reference = helpers.hook_functions(hook)
    sample_sigmas = torch.cat([base.model_sampling.sigmas[torch.tensor([800, 400])], torch.zeros(1)])
    latents = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        latent = torch.randn(1, 4, 8, 8)
        latents.append(latent)

        def sampling(latent=latent):
            sampler_wrapper(FakeExecutor(FakeSampler(sample_euler), None))
            for sigma in sample_sigmas[:-1]:
                post_cfg(post_cfg_args(base, sigma.reshape(1), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), sample_sigmas))
            return latent

        assert outer(_Calling(sampling)) is latent
    assert len(hook.runs) == 2 and all(run.trace.evaluations == 2 for run in hook.runs)
    assert hook.find_run(latents[0]) is hook.runs[0] and hook.find_run(latents[1]) is hook.runs[1]
    assert hook.find_run(torch.zeros(1, 4, 8, 8)) is hook.runs[1]  # unknown latent: the latest run
    assert reference() is hook


class _Calling:
    """An executor stand-in that runs a function (the wrapped sampling)."""

    def __init__(self, function):
        self.function = function

    def __call__(self, *args, **kwargs):
        return self.function()


def test_hook_survives_modelpatcher_clone_deepcopy():
    """ModelPatcher.clone() deep-copies model_options: the closures must still reach the same hook."""
    hook = helpers.AnnealingHook(sdxl_model())
    post_cfg, _, _, reference = helpers.hook_functions(hook)
    options = {"sampler_post_cfg_function": [post_cfg], "transformer_options": {helpers.HOOKS_KEY: [reference]}}
    copied = copy.deepcopy(options)
    assert helpers.find_hook(copied) is hook
    assert copied["sampler_post_cfg_function"][0] is post_cfg
    assert helpers.find_hook({}) is None


# --------------------------------------------------------------------------------------------------------- plots


def test_parse_lambdas():
    assert helpers.parse_lambdas("0.1, 0.4 0.8") == (0.1, 0.4, 0.8)
    for bad, match in (("", "at least one"), ("0.2, x", "'x' is not a number"), ("1.5", r"\[0, 1\]"), (" ".join(["0.1"] * 13), "at most")):
        with pytest.raises(ValueError, match=match):
            helpers.parse_lambdas(bad)


def test_plot_helpers_return_comfy_images():
    pytest.importorskip(f"{PACK}.annealing.plots")
    model = sdxl_model()
    explorer = helpers.explorer_plot(model, (0.2, 0.8))
    assert explorer.dim() == 4 and explorer.shape[0] == 1 and explorer.shape[-1] == 3 and explorer.dtype == torch.float32
    empty = helpers.schedule_plot(None, 0.4, "x.pt")
    assert empty.shape[0] == 1 and empty.shape[-1] == 3
    recorder = core.GuidanceRecorder()
    for step in range(3):
        ones = torch.ones(2)
        recorder.record(sigma=ones * (3 - step), timestep=ones * 100 * step, delta_norm=ones * 5, mlp_delta_norm=ones * 5, w=ones + step,
                        k=ones * 2, cfg_scale=(ones + step) * 2, step=torch.full((2,), step), on_schedule=torch.ones(2, dtype=torch.bool),
                        active=torch.ones(2, dtype=torch.bool))
    run = helpers.SamplingRun(trace=recorder.trace(), sampler_name="euler", renoise="k_factor", exactness="exact", fingerprint=None)
    image = helpers.schedule_plot(run, 0.4, "x.pt")
    assert image.shape[0] == 1 and image.shape[-1] == 3 and 0 <= float(image.min()) and float(image.max()) <= 1
    assert float(image.std()) > 0.01  # a drawn picture, not a blank canvas
