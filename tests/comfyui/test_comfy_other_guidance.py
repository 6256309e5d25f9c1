"""Stage-wise Guidance (TV-CFG) and Angle Domain Guidance inside a real ComfyUI, sampling tiny EPS and flow models on CPU.

Every evaluation of a run is recorded by a spy post-CFG function appended after the node under test: it sees D_c, D_u,
the noise level and the node's output. The expected outputs are written here from the papers and the official code's
description (arXiv 2509.22007 with sqt24/tvcfg; arXiv 2506.11039 with jinc7461/ADG), not taken from the pack's code.
"""

from __future__ import annotations

import math

import pytest
import torch

STEPS = 8


# ----------------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def node(comfy_host):
    """Overrides conftest's ``node``: the nodes here return one patched model, and the tests want it, not the NodeOutput."""

    def call(name, **inputs):
        return comfy_host.nodes.NODE_CLASS_MAPPINGS[name].execute(**inputs).args[0]

    return call


def tv_cfg(node, model, scale=0.0, schedule="symmetric", normalize=True, **overrides):
    inputs = dict(model=model, scale=scale, schedule=schedule, normalize=normalize, interval_low=0.15, interval_high=0.78,
                  switch=0.25, step_divisor=3.0)
    inputs.update(overrides)
    return node("StageWiseGuidance", **inputs)


def adg(node, model, scale=7.0, max_angle_degrees=60.0):
    return node("AngleDomainGuidance", model=model, scale=scale, max_angle_degrees=max_angle_degrees)


def with_spy(model):
    """A clone whose last post-CFG function records every evaluation and changes nothing."""
    records = []
    spied = model.clone()

    def spy(args):
        records.append({
            "out": args["denoised"].detach().double().clone(), "d_c": args["cond_denoised"].detach().double().clone(),
            "d_u": args["uncond_denoised"].detach().double().clone(), "sigma": args["sigma"].detach().double().clone(),
            "x": args["input"].detach().double().clone(), "cond_scale": float(args["cond_scale"]), "uncond": args.get("uncond"),
            "sample_sigmas": args["model_options"]["transformer_options"]["sample_sigmas"].detach().clone(),
        })
        return args["denoised"]

    spied.set_model_sampler_post_cfg_function(spy)
    return spied, records


def sample(model, sampler_name, sigmas, cfg, pos, neg, batch=2, seed=3):
    import comfy.sample
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    latent = torch.zeros(batch, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object(sampler_name), sigmas, disable_pbar=True, seed=seed)


def setup(tiny, kind):
    """A tiny model of ``kind`` ('eps': SDXL-like discrete, 'const': SD3-like flow, shift 3) and its usual schedule."""
    import comfy.samplers

    model = tiny.make_tiny_model(kind, seed=0)
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "karras" if kind == "eps" else "simple", STEPS).float()
    return model, sampling, sigmas, tiny.make_cond(1), tiny.make_cond(2)


def applied_scale(record) -> torch.Tensor:
    """The CFG scale an output corresponds to, per sample: <D - D_u, D_c - D_u> / ||D_c - D_u||^2."""
    delta = (record["d_c"] - record["d_u"]).flatten(1)
    return ((record["out"] - record["d_u"]).flatten(1) * delta).sum(1) / (delta * delta).sum(1)


def assert_cfg_output(record, scales):
    """The recorded output is plain CFG at ``scales`` (one per sample) on the recorded predictions."""
    view = torch.as_tensor(scales, dtype=torch.float64).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(record["out"], record["d_u"] + view * (record["d_c"] - record["d_u"]), rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------------- TV-CFG references


def official_step_scales(kind, timesteps, w, normalize=True, interval=(0.15, 0.78), switch=0.25, divisor=3.0):
    """The per-step scales as the official GuidanceSchedulers describes them: time t / max(t) with 0 appended; symmetric
    from linspace pieces (1 -> 2w - 1 -> 1); interval v inside, 1 outside; step_up / step_down w / 3 and w split at
    step fraction 0.25; normalised so that sum w_i dt_i = w."""
    t = [float(v) for v in timesteps]
    n = len(t)
    tau = [v / max(t) for v in t] + [0.0]
    dt = [tau[i] - tau[i + 1] for i in range(n)]
    if kind == "symmetric":
        low, high, half = 1.0, 2 * w - 1, n // 2
        if n % 2 == 0:
            g = torch.linspace(low, high, half + 1, dtype=torch.float64)[:-1].tolist() + torch.linspace(high, low, half, dtype=torch.float64).tolist()
        else:
            g = torch.linspace(low, high, half + 1, dtype=torch.float64).tolist() + torch.linspace(high, low, half + 1, dtype=torch.float64)[1:].tolist()
    elif kind == "interval":
        inside = [interval[0] < x < interval[1] for x in tau[:n]]
        value = (w - sum(d for d, m in zip(dt, inside) if not m)) / sum(d for d, m in zip(dt, inside) if m) if normalize else w
        return [value if m else 1.0 for m in inside]
    else:
        fractions = torch.linspace(0, 1, n, dtype=torch.float64).tolist()
        early_weak = kind == "step_up"
        g = [(w / divisor if early_weak else w) if f < switch else (w if early_weak else w / divisor) for f in fractions]
    if normalize:
        total = sum(a * b for a, b in zip(g, dt))
        g = [v * w / total for v in g]
    return g


def expected_tv_scale(sigma, sample_sigmas, sampling, w, kind="symmetric"):
    """The schedule at an evaluation's own noise level: the step values at schedule points; between points i and i + 1,
    the symmetric profile (linear between the steps) at the fraction of normalised time already travelled."""
    steps = official_step_scales(kind, sampling.timestep(sample_sigmas[:-1]).double(), w)
    n = len(steps)
    t_max = float(sampling.timestep(sample_sigmas[:1]).double()[0])
    i = max(j for j in range(n) if float(sample_sigmas[j]) >= sigma)
    if float(sample_sigmas[i]) == sigma or i == n - 1:
        return steps[i], steps[i], False
    tau = float(sampling.timestep(torch.tensor([sigma], dtype=torch.float32)).double()[0]) / t_max
    tau_i, tau_next = (float(sampling.timestep(sample_sigmas[k : k + 1]).double()[0]) / t_max for k in (i, i + 1))
    f = (tau_i - tau) / (tau_i - tau_next)
    return steps[i] + f * (steps[i + 1] - steps[i]), steps[i], True


# -------------------------------------------------------------------------------------------------------------------- TV-CFG


@pytest.mark.parametrize("kind", ["eps", "const"])
@pytest.mark.parametrize("schedule", ["symmetric", "interval", "step_up", "step_down"])
def test_tv_cfg_output_is_cfg_at_the_official_schedule(comfy_host, tiny, node, kind, schedule):
    model, sampling, sigmas, pos, neg = setup(tiny, kind)
    patched, records = with_spy(tv_cfg(node, model, schedule=schedule))
    sample(patched, "euler", sigmas, 5.0, pos, neg)
    expected = official_step_scales(schedule, sampling.timestep(sigmas[:-1]).double(), 5.0)
    assert len(records) == STEPS
    for i, record in enumerate(records):
        assert float(record["sigma"][0]) == pytest.approx(float(sigmas[i]))
        assert_cfg_output(record, [expected[i]] * 2)
    if schedule == "symmetric":  # weak early and late, strong mid-way
        assert expected[0] < 5.0 < max(expected) and expected[-1] < 5.0


@pytest.mark.parametrize("kind", ["eps", "const"])
@pytest.mark.parametrize("sampler_name", ["heun", "dpm_2", "dpmpp_2s_ancestral", "uni_pc"])
def test_tv_cfg_intermediate_evaluations_get_their_own_schedule_value(comfy_host, tiny, node, kind, sampler_name):
    model, sampling, sigmas, pos, neg = setup(tiny, kind)
    patched, records = with_spy(tv_cfg(node, model))
    sample(patched, sampler_name, sigmas, 4.0, pos, neg)
    own_values_differ = 0
    for record in records:
        sigma = float(record["sigma"][0])
        own, step_value, between = expected_tv_scale(sigma, sigmas, sampling, 4.0)
        assert_cfg_output(record, [own] * 2)
        if between and abs(own - step_value) > 0.05:
            own_values_differ += 1
    if sampler_name in ("heun", "uni_pc"):  # evaluations at schedule points only (heun's second at the next one): their values
        points = [float(s) for s in sigmas[:-1]]
        assert all(any(float(r["sigma"][0]) == pytest.approx(p) for p in points) for r in records)
        assert len(records) == (2 * STEPS - 1 if sampler_name == "heun" else STEPS)
    else:  # dpm_2 and dpmpp_2s evaluate between the points: the step's value would be measurably wrong there
        assert own_values_differ >= 3


def test_tv_cfg_scale_source_ksampler_cfg_or_override_and_the_time_integral(comfy_host, tiny, node):
    model, sampling, sigmas, pos, neg = setup(tiny, "eps")
    tau = (sampling.timestep(sigmas[:-1]).double() / sampling.timestep(sigmas[:1]).double()).tolist() + [0.0]
    dt = [tau[i] - tau[i + 1] for i in range(STEPS)]
    for scale, cfg, nominal in ((0.0, 6.0, 6.0), (3.0, 6.0, 3.0), (3.0, 1.0, 3.0)):
        patched, records = with_spy(tv_cfg(node, model, scale=scale))
        sample(patched, "euler", sigmas, cfg, pos, neg)
        applied = [float(applied_scale(r)[0]) for r in records]
        assert sum(a * d for a, d in zip(applied, dt)) == pytest.approx(nominal, rel=1e-4)
        assert all(r["uncond"] is not None for r in records)  # cfg 1 still runs the uncond pass


def test_tv_cfg_through_comfyuis_ksampler_uses_its_cfg(comfy_host, tiny, node):
    import comfy.samplers

    model, sampling, _, pos, neg = setup(tiny, "const")
    patched, records = with_spy(tv_cfg(node, model))
    with torch.inference_mode():
        comfy_host.nodes.common_ksampler(patched, 5, STEPS, 4.5, "euler", "simple", pos, neg, {"samples": torch.zeros(1, 4, 8, 8)})
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", STEPS).float()
    expected = official_step_scales("symmetric", sampling.timestep(sigmas[:-1]).double(), 4.5)
    assert [float(applied_scale(r)[0]) for r in records] == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------- ADG


def adg_reference(d_c, d_u, w, cap):
    """ADG per sample on the flattened x0-predictions, float64, as the paper and the official code state it."""
    out = []
    for c, u in zip(d_c.flatten(1), d_u.flatten(1)):
        theta = torch.arccos(torch.clamp((c @ u) / (c.norm() * u.norm()), -1.0, 1.0))
        w_prime = max(w - 1.0, 0.0) + 1e-3
        theta_new = torch.clamp(w_prime * theta, -cap, cap)
        e = (c - u) - ((c - u) @ u) / (u @ u) * u
        ratio = torch.sin(theta_new) / torch.sin(theta) if torch.sin(theta) > 1e-3 else torch.tensor(w_prime, dtype=torch.float64)
        out.append(torch.cos(theta_new) * c + ratio * e)
    return torch.stack(out).reshape(d_c.shape)


@pytest.mark.parametrize("kind", ["eps", "const"])
@pytest.mark.parametrize("scale,cfg,max_angle_degrees", [(7.0, 1.0, 60.0), (0.0, 3.0, 60.0), (30.0, 5.0, 20.0)])
def test_adg_output_is_the_angle_formula_at_every_sigma(comfy_host, tiny, node, kind, scale, cfg, max_angle_degrees):
    model, _, sigmas, pos, neg = setup(tiny, kind)
    patched, records = with_spy(adg(node, model, scale=scale, max_angle_degrees=max_angle_degrees))
    sample(patched, "euler", sigmas, cfg, pos, neg)
    w = scale if scale > 0 else cfg
    assert len(records) == STEPS
    for record in records:
        expected = adg_reference(record["d_c"], record["d_u"], w, math.radians(max_angle_degrees))
        torch.testing.assert_close(record["out"], expected, rtol=1e-5, atol=1e-5)
    if w >= 10:  # the capped branch ran: w' theta beyond the cap at some evaluation
        thetas = [torch.arccos(torch.nn.functional.cosine_similarity(r["d_c"].flatten(1), r["d_u"].flatten(1))) for r in records]
        assert max(float(t.max()) for t in thetas) * (w - 1 + 1e-3) > math.radians(max_angle_degrees)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_both_nodes_compute_half_precision_predictions_in_float32(comfy_host, tiny, node, dtype):
    """The post-CFG functions called as ComfyUI calls them, with half-precision predictions: the result keeps the dtype
    and differs from the float64 formula only by that final rounding."""
    model, sampling, sigmas, pos, neg = setup(tiny, "eps")
    generator = torch.Generator().manual_seed(0)
    d_u = torch.randn(2, 4, 8, 8, generator=generator)
    d_c = (d_u + 0.3 * torch.randn(2, 4, 8, 8, generator=generator)).to(dtype)
    d_u = d_u.to(dtype)
    sigma = sigmas[3:4].expand(2)
    args = {"denoised": d_c, "cond_denoised": d_c, "uncond_denoised": d_u, "cond_scale": 5.0, "sigma": sigma, "uncond": [],
            "input": d_c, "model": model.model, "model_options": {"transformer_options": {"sample_sigmas": sigmas}}}
    tv_function = tv_cfg(node, model).model_options["sampler_post_cfg_function"][-1]
    w = official_step_scales("symmetric", sampling.timestep(sigmas[:-1]).double(), 5.0)[3]
    adg_function = adg(node, model).model_options["sampler_post_cfg_function"][-1]
    for function, reference in ((tv_function, d_u.double() + w * (d_c.double() - d_u.double())),
                                (adg_function, adg_reference(d_c.double(), d_u.double(), 7.0, math.pi / 3))):
        out = function(dict(args))
        assert out.dtype == dtype
        # float32 maths rounded once: the float64 result rounded to the half type, but for the rare double-rounding tie
        # (half-precision maths would be several units off in most elements)
        assert float((out != reference.to(dtype)).float().mean()) < 0.01


# --------------------------------------------------------------------------------------------------------------- composition


def test_patches_use_list_hooks_only_and_keep_the_uncond_pass(comfy_host, tiny, node):
    model, _, _, _, _ = setup(tiny, "eps")
    for patched in (tv_cfg(node, model), adg(node, model)):
        assert patched is not model and "sampler_cfg_function" not in patched.model_options
        assert len(patched.model_options["sampler_post_cfg_function"]) == 1
        assert patched.model_options["disable_cfg1_optimization"] is True
    assert "sampler_post_cfg_function" not in model.model_options  # the input model is untouched
    stacked = adg(node, tv_cfg(node, model))
    assert len(stacked.model_options["sampler_post_cfg_function"]) == 2


def test_core_post_cfg_nodes_applied_after_see_the_result(comfy_host, tiny, node):
    """TV-CFG then ComfyUI's CFGNorm; ADG then ComfyUI's CFGZeroStar: the core function works on our output."""
    model, sampling, sigmas, pos, neg = setup(tiny, "eps")
    normed, records = with_spy(node("CFGNorm", model=tv_cfg(node, model), strength=0.9))
    sample(normed, "euler", sigmas, 5.0, pos, neg)
    expected_scales = official_step_scales("symmetric", sampling.timestep(sigmas[:-1]).double(), 5.0)
    for record, w in zip(records, expected_scales, strict=True):
        ours = record["d_u"] + w * (record["d_c"] - record["d_u"])
        ratio = (record["d_c"].norm(dim=1, keepdim=True) / (ours.norm(dim=1, keepdim=True) + 1e-8)).clamp(0, 1)
        torch.testing.assert_close(record["out"], ours * ratio * 0.9, rtol=2e-5, atol=2e-5)

    zero_star, records = with_spy(node("CFGZeroStar", model=adg(node, model)))
    sample(zero_star, "euler", sigmas, 5.0, pos, neg)
    for record in records:
        ours = adg_reference(record["d_c"], record["d_u"], 7.0, math.pi / 3)
        # CFGZeroStar (comfy_extras/nodes_cfg.py): alpha = <x - D_c, x - D_u> / ||x - D_u||^2 per sample, then
        # out + D_u (alpha - 1) + cfg D_u (1 - alpha) with out = what it is handed
        pos_flat, neg_flat = (record["x"] - record["d_c"]).flatten(1), (record["x"] - record["d_u"]).flatten(1)
        alpha = ((pos_flat * neg_flat).sum(1) / ((neg_flat**2).sum(1) + 1e-8)).reshape(-1, 1, 1, 1)
        expected = ours + record["d_u"] * (alpha - 1.0) + 5.0 * record["d_u"] * (1.0 - alpha)
        torch.testing.assert_close(record["out"], expected, rtol=2e-5, atol=2e-5)
        assert not torch.allclose(expected, ours, rtol=1e-3, atol=1e-3)  # it did change our output


def test_core_post_cfg_nodes_applied_before_are_replaced(comfy_host, tiny, node):
    model, _, sigmas, pos, neg = setup(tiny, "const")
    patched, records = with_spy(adg(node, node("CFGZeroStar", model=model), scale=4.0))
    sample(patched, "euler", sigmas, 5.0, pos, neg)
    for record in records:
        torch.testing.assert_close(record["out"], adg_reference(record["d_c"], record["d_u"], 4.0, math.pi / 3), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def annealing_model(comfy_host):
    """A small random annealing checkpoint for SDXL-like EPS models, saved and loaded like a user's."""
    annealing = comfy_host.annealing
    torch.manual_seed(11)
    path = comfy_host.models_dir / "annealing_guidance" / "tiny_for_other_guidance.safetensors"
    annealing.save_guidance_model(annealing.GuidanceScaleModel(annealing.GuidanceModelConfig(), annealing.CheckpointMetadata()), path)
    return annealing.load_guidance_model(path)


def apply_annealing(node, model, annealing_model):
    return node("ApplyAnnealingGuidance", model=model, annealing_model=annealing_model, **{"lambda": 0.4}, mode="anchored",
                normalize_delta_norm=True, clamp_w=False, w_min=0.0, w_max=3.0, active_start=0.0, active_end=1.0)


def test_composition_with_apply_annealing_guidance(comfy_host, tiny, node, annealing_model):
    """Both orders run both hooks; the later replacing guidance decides the output, as the pack documents."""
    model, sampling, sigmas, pos, neg = setup(tiny, "eps")
    find_hook = comfy_host.hook.find_hook
    # annealing first, TV-CFG after: TV-CFG's schedule is what the sampler gets, and annealing's hook still ran every step
    annealed = apply_annealing(node, model, annealing_model)
    patched, records = with_spy(tv_cfg(node, annealed))
    sample(patched, "euler", sigmas, 5.0, pos, neg)
    expected = official_step_scales("symmetric", sampling.timestep(sigmas[:-1]).double(), 5.0)
    for record, w in zip(records, expected, strict=True):
        assert_cfg_output(record, [w] * 2)
    hook = find_hook(patched.model_options)
    assert hook.runs[-1].trace.steps == list(range(STEPS))
    # TV-CFG first, annealing after: exactly annealing alone (it ignores the CFG result it is handed)
    alone = sample(apply_annealing(node, model, annealing_model), "euler", sigmas, 5.0, pos, neg)
    stacked = sample(apply_annealing(node, tv_cfg(node, model), annealing_model), "euler", sigmas, 5.0, pos, neg)
    torch.testing.assert_close(stacked, alone)
    plain = sample(model, "euler", sigmas, 5.0, pos, neg)
    assert not torch.allclose(alone, plain, rtol=1e-3, atol=1e-3)


def test_guider_without_negative_passes_through(comfy_host, tiny, node):
    """BasicGuider has no uncond pass: the nodes leave the conditional prediction alone instead of guiding against zeros."""
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_Basic

    model, _, sigmas, pos, _ = setup(tiny, "eps")
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    outputs = []
    for m in (model, tv_cfg(node, model, scale=5.0), adg(node, model)):
        guider = Guider_Basic(m)
        guider.set_conds(pos)
        with torch.inference_mode():
            outputs.append(guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=0))
    torch.testing.assert_close(outputs[1], outputs[0])
    torch.testing.assert_close(outputs[2], outputs[0])


# ------------------------------------------------------------------------------------------------------------------ the nodes


def test_nodes_are_registered_with_tooltips_and_validation(comfy_host, tiny, node):
    mappings = comfy_host.nodes.NODE_CLASS_MAPPINGS
    for name in ("StageWiseGuidance", "AngleDomainGuidance"):
        assert name in mappings and name in comfy_host.new_nodes
        info = mappings[name].INPUT_TYPES()
        for input_name, spec in {**info.get("required", {}), **info.get("optional", {})}.items():
            assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    schema = mappings["StageWiseGuidance"]
    assert schema.validate_inputs(interval_low=0.15, interval_high=0.78) is True
    assert "interval_low" in schema.validate_inputs(interval_low=0.8, interval_high=0.2)
    # ComfyUI skips its own min/max check for inputs validate_inputs takes: the range is checked there too
    assert "interval_high" in schema.validate_inputs(interval_low=0.15, interval_high=1.5)
    assert "interval_low" in schema.validate_inputs(interval_low=-0.2, interval_high=0.5)
    model = tiny.make_tiny_model("eps")
    edm = comfy_host.nodes.NODE_CLASS_MAPPINGS["ModelSamplingContinuousEDM"]().patch(model, "edm", 120.0, 0.002)[0]
    with pytest.raises(ValueError, match="timestep"):
        tv_cfg(node, edm)
    adg(node, edm)  # ADG needs no time axis
