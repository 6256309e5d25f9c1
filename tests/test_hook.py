"""The annealing hook (nodes/hook.py) driven the way ComfyUI drives it, with stand-ins for ComfyUI's objects: the post-CFG
function is a thin translation into one core call, the wrappers keep the run bookkeeping. No ComfyUI needed."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from comfy_fakes import (
    FakeBaseModel,
    FakeExecutor,
    FakeSampler,
    _import,
    core,
    post_cfg_args,
    sample_cfgpp_ud10_ab,
    sample_euler,
    sample_euler_ancestral_RF,
    sample_euler_cfg_pp,
    sample_euler_pp,
    sample_mystery,
    sampler_post_cfg_function,
    samplers,
    sdxl_model,
)

hook_module = _import("nodes.hook")
post_cfg_module = _import("nodes.post_cfg")
AnnealingHook = hook_module.AnnealingHook


def options(**changes):
    return core.AnnealingOptions(**changes)


def run_one(hook, sampler_function, base, sigma, d_cond, d_uncond, sample_sigmas, **extra):
    hook.begin_run()
    hook.set_sampler(FakeSampler(sampler_function, **extra))
    out = hook.post_cfg(post_cfg_args(base, sigma, d_cond, d_uncond, sample_sigmas))
    return out, hook.end_run(out)


def test_post_cfg_is_the_core_rule_for_each_mode_and_sampler():
    model = sdxl_model()
    base = FakeBaseModel("eps")
    sigmas = base.model_sampling.sigmas
    sample_sigmas = torch.cat([sigmas[torch.tensor([900, 600, 300, 0])], torch.zeros(1)])
    torch.manual_seed(1)
    d_cond, d_uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigma = sample_sigmas[1].expand(2)
    # by hand: delta_eps = (D_c - D_u) / sigma, t = 600; k_train from the upstream grid; k_step = sigma / (sigma - sigma_next)
    norm = ((d_cond - d_uncond) / sigma[0]).reshape(2, -1).norm(dim=1)
    w = model(torch.full((2,), 600.0), norm, 0.4)
    k_train = core.k_train(core.VPGrid(), sigma.double()).float()
    k_step = sample_sigmas[1] / (sample_sigmas[1] - sample_sigmas[2])

    def expected(scale):
        return d_uncond + scale.reshape(-1, 1, 1, 1) * (d_cond - d_uncond)

    cases = [("anchored", sample_euler, w * k_train), ("anchored", sample_euler_cfg_pp, w * k_train / k_step),
             ("per_step", sample_euler, w * k_step), ("per_step", sample_euler_cfg_pp, w), ("as_is", sample_euler, w)]
    for mode, function, scale in cases:
        hook = AnnealingHook(model, options(mode=mode, normalize_delta_norm=False))
        out, run = run_one(hook, function, base, sigma, d_cond, d_uncond, sample_sigmas)
        torch.testing.assert_close(out, expected(scale), rtol=1e-4, atol=1e-5)
        assert run.mode == mode and run.sampler_name == function.__name__[len("sample_"):]
        assert run.trace.steps == [1] and run.trace["w"].shape == (1, 2)
        # the plot's omega is the CFG-equivalent scale in ordinary CFG units, under a CFG++ sampler too
        cfg_equivalent = w * k_train if mode == "anchored" else (w * k_step if mode == "per_step" or function is sample_euler_cfg_pp else w)
        torch.testing.assert_close(torch.from_numpy(run.trace["omega"][0]), cfg_equivalent, rtol=1e-4, atol=1e-5)


def test_timesteps_come_from_the_checkpoints_own_schedule_also_for_a_distilled_host():
    """LCM's ModelSamplingDiscreteDistilled keeps 50 of the 1000 sigmas; the MLP's timestep is the noise level's DDPM index
    on the checkpoint's training schedule, whatever subset the host keeps."""
    base = FakeBaseModel("eps")
    full = base.model_sampling.sigmas
    base.model_sampling.log_sigmas = full[19::20].log()
    sample_sigmas = torch.cat([full[torch.tensor([999, 499, 19])], torch.zeros(1)])
    hook = AnnealingHook(sdxl_model(), options())
    hook.begin_run()
    hook.set_sampler(FakeSampler(sample_euler))
    for sigma in sample_sigmas[:3]:
        hook.post_cfg(post_cfg_args(base, sigma.expand(1), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), sample_sigmas))
    assert hook.end_run(None).trace["timestep"][:, 0].tolist() == pytest.approx([999.0, 499.0, 19.0], abs=2e-3)


def test_hook_warns_when_another_pack_set_the_cfg_function(caplog):
    base = FakeBaseModel("eps")
    sample_sigmas = torch.cat([base.model_sampling.sigmas[torch.tensor([800, 400])], torch.zeros(1)])
    args = post_cfg_args(base, sample_sigmas[:1], torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), sample_sigmas)
    args["model_options"]["sampler_cfg_function"] = lambda a: a["cond"]
    hook = AnnealingHook(sdxl_model(), options())
    hook.begin_run()
    with caplog.at_level("WARNING", logger="annealing_guidance"):
        hook.post_cfg(args)
    assert any("sampler_cfg_function" in r.getMessage() for r in caplog.records)


def test_missing_uncond_leaves_the_result_alone():
    base = FakeBaseModel("eps")
    args = post_cfg_args(base, torch.ones(1), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), None)
    args["uncond_denoised"] = None
    assert AnnealingHook(sdxl_model(), options()).post_cfg(args) is args["denoised"]
    # a skipped uncond pass (a guider with no negative) arrives as zeros with uncond None: not guided against zeros
    args = post_cfg_args(base, torch.ones(1), torch.randn(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), None)
    args["uncond"] = None
    assert AnnealingHook(sdxl_model(), options()).post_cfg(args) is args["denoised"]


def test_fingerprint_sums_on_the_cpu_in_float64():
    samples = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    shape, sums = hook_module.samples_fingerprint(samples)
    assert shape == (2, 4, 8, 8) and sums.dtype == torch.float64 and sums.device.type == "cpu"
    assert hook_module.same_fingerprint((shape, sums), hook_module.samples_fingerprint(samples.clone()))


def test_hook_needs_a_guidance_model():
    with pytest.raises(ValueError, match="annealing_model"):
        AnnealingHook(torch.nn.Linear(1, 1), options())


def test_ancestral_sampler_uses_sigma_down_with_the_hosts_eta():
    base = FakeBaseModel("eps")
    sample_sigmas = torch.cat([base.model_sampling.sigmas[torch.tensor([800, 400])], torch.zeros(1)])
    hook = AnnealingHook(sdxl_model(), options(mode="per_step"))
    _, run = run_one(hook, sample_euler_ancestral_RF, base, sample_sigmas[:1], torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8),
                     sample_sigmas, eta=0.7)
    down = float(samplers.ancestral_sigma_down(sample_sigmas[:1], sample_sigmas[1:2], "eps", eta=0.7)[0])
    assert float(run.trace["k"][0, 0]) == pytest.approx(float(sample_sigmas[0]) / (float(sample_sigmas[0]) - down), rel=1e-5)


def test_hook_refuses_a_model_it_cannot_serve():
    from comfy_fakes import model_sampling

    with pytest.raises(ValueError, match="DDPM timesteps"):
        AnnealingHook(sdxl_model(), options()).check_model(model_sampling("const"), "SD3")


class _Calling:
    """An executor stand-in that runs a function (the wrapped sampling)."""

    def __init__(self, function):
        self.function = function

    def __call__(self, *args, **kwargs):
        return self.function()


def test_wrappers_start_fresh_runs_and_find_the_run_of_a_latent():
    base = FakeBaseModel("eps")
    hook = AnnealingHook(sdxl_model(), options())
    post_cfg, outer, sampler_wrapper, reference = hook_module.hook_functions(hook)
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
    assert hook.find_run(latents[0]) == (hook.runs[0], True) and hook.find_run(latents[1]) == (hook.runs[1], True)
    assert hook.find_run(torch.zeros(1, 4, 8, 8)) == (hook.runs[1], False)  # unknown latent: the latest run, said so
    assert reference() is hook


def test_hook_survives_modelpatcher_clone_deepcopy():
    """ModelPatcher.clone() deep-copies model_options: the closures must still reach the same hook."""
    hook = AnnealingHook(sdxl_model(), options())
    post_cfg, _, _, reference = hook_module.hook_functions(hook)
    model_options = {"sampler_post_cfg_function": [post_cfg], "transformer_options": {hook_module.HOOKS_KEY: [reference]}}
    copied = copy.deepcopy(model_options)
    assert hook_module.find_hook(copied) is hook
    assert copied["sampler_post_cfg_function"][0] is post_cfg
    assert hook_module.find_hook({}) is None


# ------------------------------------------------------------------------------------------- the one post-CFG adapter


def test_the_adapter_computes_in_float32_and_casts_back_clamping_fp16():
    seen = []

    def guide(d_cond, d_uncond, args):
        seen.append((d_cond, d_uncond))
        return d_uncond + 1e6 * (d_cond - d_uncond)  # beyond fp16's range

    post_cfg = post_cfg_module.post_cfg_function("Test guidance", guide)
    base = FakeBaseModel("eps")
    d_cond, d_uncond = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    out = post_cfg(post_cfg_args(base, torch.ones(1), d_cond, d_uncond, None))
    assert seen[-1][0] is d_cond and seen[-1][1] is d_uncond  # float32 predictions reach the guide as they are
    torch.testing.assert_close(out, d_uncond + 1e6 * (d_cond - d_uncond))
    half = post_cfg(post_cfg_args(base, torch.ones(1), d_cond.half(), d_uncond.half(), None))
    assert seen[-1][0].dtype == seen[-1][1].dtype == torch.float32
    assert half.dtype == torch.float16 and torch.isfinite(half).all() and float(half.abs().max()) == torch.finfo(torch.float16).max
    brain = post_cfg(post_cfg_args(base, torch.ones(1), d_cond.bfloat16(), d_uncond.bfloat16(), None))
    assert brain.dtype == torch.bfloat16 and float(brain.float().abs().max()) > 1e5  # bf16 has float32's range: not clamped


def test_every_guidance_node_says_the_same_through_the_one_adapter(caplog, monkeypatch):
    """The annealing hook and the comparison nodes share one post-CFG contract: the same guard and warnings, by name."""
    monkeypatch.setattr(_import("nodes.warn_once"), "_WARNED", set())  # said once per process: start afresh
    base = FakeBaseModel("eps")
    sample_sigmas = torch.cat([base.model_sampling.sigmas[torch.tensor([800, 400])], torch.zeros(1)])
    plain = post_cfg_module.post_cfg_function("Test guidance", lambda d_cond, d_uncond, args: d_cond)
    hook = AnnealingHook(sdxl_model(), options())
    hook.begin_run()
    messages = {}
    for name, function in (("Test guidance", plain), (hook_module.NAME, hook.post_cfg)):
        args = post_cfg_args(base, sample_sigmas[:1], torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), sample_sigmas)
        args["model_options"]["sampler_cfg_function"] = lambda a: a["cond"]
        skipped = dict(args, uncond=None)  # a skipped uncond pass: zeros, and no uncond conditioning
        with caplog.at_level(logging.WARNING, logger="annealing_guidance"):
            caplog.clear()
            assert function(skipped) is skipped["denoised"]
            function(args)
        messages[name] = [r.getMessage().replace(name, "NAME") for r in caplog.records]
    assert len(messages["Test guidance"]) == 2 and messages["Test guidance"] == messages[hook_module.NAME]
    assert "no unconditional prediction" in messages["Test guidance"][0] and "sampler_cfg_function" in messages["Test guidance"][1]


def test_the_hook_builds_its_guide_once_and_moves_a_float32_copy(monkeypatch):
    """Lambda's straight path: the options reach one guide, built once per hook (not once to validate and again per
    device); the loaded model (shared by every guider) is never moved or cast."""
    built = []

    class CountingGuidance(core.AnnealingGuidance):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(hook_module, "AnnealingGuidance", CountingGuidance)
    loaded = sdxl_model().double()  # not float32: the guide computes on a float32 copy
    hook = AnnealingHook(loaded, options(lam=0.7))
    base = FakeBaseModel("eps")
    sample_sigmas = torch.cat([base.model_sampling.sigmas[torch.tensor([800, 400])], torch.zeros(1)])
    hook.begin_run()
    guides = []
    for sigma in sample_sigmas[:2]:
        hook.post_cfg(post_cfg_args(base, sigma.reshape(1), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), sample_sigmas))
        guides.append(hook.guidance)
    assert len(built) == 1 and guides[0] is guides[1] and hook.options.lam == 0.7
    assert next(hook.guidance.model.parameters()).dtype == torch.float32 and next(loaded.parameters()).dtype == torch.float64
    assert hook.guidance.model is not loaded and hook.guidance.lookup is guides[0].lookup
    float32_model = sdxl_model()
    same = core.AnnealingGuidance(float32_model, options())
    assert same.to(torch.device("cpu")) is same and same.model is float32_model  # already there: nothing copied


# ------------------------------------------------------------------------------------------------- fingerprints


def test_a_run_is_found_from_its_latent_after_an_fp16_intermediate_cast():
    """ComfyUI 0.21 with --fp16-intermediates hands the plot node the fp16 cast of the float32 latent the hook filed."""
    hook = AnnealingHook(sdxl_model(), options())
    torch.manual_seed(3)
    latents = [torch.randn(2, 4, 32, 32) * 4, torch.randn(2, 4, 32, 32) * 4]
    latents[1][0, 0, 0, 0] = 1e5  # beyond fp16's range: inf after the cast
    for latent in latents:
        hook.begin_run()
        hook.end_run(latent)
    for i, latent in enumerate(latents):
        for seen in (latent, latent.half(), latent.half().float()):
            found, matched = hook.find_run(seen)
            assert found is hook.runs[i] and matched, (i, seen.dtype)
    assert hook.find_run(torch.randn(2, 4, 32, 32).half())[1] is False
    shifted = latents[0].clone()
    shifted[1, 2, 3, 4] += 0.05  # one element of one item, more than fp16 rounds away
    assert hook.find_run(shifted)[1] is False


# --------------------------------------------------------------------------------------- samplers by what they do


def scales_at_step(model, sigma, d_cond, d_uncond, sample_sigmas):
    """(w, k_train, k_step) by hand for an EPS evaluation at sample_sigmas[1], DDPM timestep 600 (normalisation off)."""
    norm = ((d_cond - d_uncond) / sigma[0]).reshape(d_cond.shape[0], -1).norm(dim=1)
    w = model(torch.full((d_cond.shape[0],), 600.0), norm, 0.4)
    k_train = core.k_train(core.VPGrid(), sigma.double()).float()
    k_step = sample_sigmas[1] / (sample_sigmas[1] - sample_sigmas[2])
    return w, k_train, k_step


@pytest.mark.parametrize("mode", ["anchored", "per_step"])
def test_samplers_get_the_scale_their_step_needs_whatever_their_name(mode, caplog):
    """No k factor for a sampler that renoises with the unconditional prediction itself: named *_cfg_pp or cfgpp_*, or seen
    adding its own post-CFG function (unknown ones warn: approximate). euler_pp also adds one, but steps as plain Euler at
    twice its scale: it gets half the ordinary scale."""
    model = sdxl_model()
    base = FakeBaseModel("eps")
    sigmas = base.model_sampling.sigmas
    sample_sigmas = torch.cat([sigmas[torch.tensor([900, 600, 300, 0])], torch.zeros(1)])
    torch.manual_seed(1)
    d_cond, d_uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigma = sample_sigmas[1].expand(2)
    w, k_train, k_step = scales_at_step(model, sigma, d_cond, d_uncond, sample_sigmas)
    omega = w * k_train if mode == "anchored" else w * k_step  # the CFG-equivalent scale every sampler must end up with
    cases = [  # (sampler function, adds its own post-CFG function, scale it must be given)
        (sample_euler, False, omega), (sample_mystery, False, omega), (sample_euler_cfg_pp, True, omega / k_step),
        (sample_cfgpp_ud10_ab, True, omega / k_step), (sample_cfgpp_ud10_ab, False, omega / k_step),
        (sample_mystery, True, omega / k_step), (sample_euler_pp, True, omega / 2)]
    for function, adds, scale in cases:
        hook = AnnealingHook(model, options(mode=mode, normalize_delta_norm=False))
        hook.begin_run()
        hook.set_sampler(FakeSampler(function))
        args = post_cfg_args(base, sigma, d_cond, d_uncond, sample_sigmas)
        other_pack = lambda a: a["denoised"]  # noqa: E731 (another pack's post-CFG function: not the sampler's)
        args["model_options"]["sampler_post_cfg_function"] = [other_pack] + ([sampler_post_cfg_function()] if adds else [])
        with caplog.at_level(logging.WARNING, logger="annealing_guidance"):
            caplog.clear()
            out = hook.post_cfg(args)
        run = hook.end_run(out)
        name = function.__name__[len("sample_"):]
        torch.testing.assert_close(out, d_uncond + scale.reshape(-1, 1, 1, 1) * (d_cond - d_uncond), rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(torch.from_numpy(run.trace["omega"][0]), omega, rtol=1e-4, atol=1e-5, msg=name)
        warned = any("reads the unconditional prediction itself" in r.getMessage() for r in caplog.records)
        assert warned == (function is sample_mystery and adds and mode == "anchored"), name  # once per process: the first mode
