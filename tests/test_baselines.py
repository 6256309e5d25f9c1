"""The baseline guidance methods of annealing.baselines against their formulas, worked by hand on small cases."""

from __future__ import annotations

import math

import pytest
import torch

from annealing.baselines import (
    ADG_MAX_ANGLE,
    STAGE_SCHEDULES,
    StageWiseGuidance,
    angle_domain_guidance,
    apg,
    cfg,
    interval_scale,
)


def _pair(seed=0, shape=(3, 4, 5, 5)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen, dtype=torch.float64)


def test_cfg_endpoints_and_per_sample_scale():
    d_c, d_u = _pair()
    torch.testing.assert_close(cfg(d_c, d_u, 1.0), d_c)
    torch.testing.assert_close(cfg(d_c, d_u, 0.0), d_u)
    scales = torch.tensor([1.0, 2.0, 7.5], dtype=torch.float64)
    out = cfg(d_c, d_u, scales)
    for b in range(3):
        torch.testing.assert_close(out[b], d_u[b] + scales[b] * (d_c[b] - d_u[b]))


def test_the_k_factor_makes_an_euler_step_with_cfg_land_on_the_cfgpp_step():
    """CFG++ renoises with the unconditional prediction; a plain Euler step fed cfg(D_c, D_u, w k), k = sigma / (sigma -
    sigma_next) (EPS), lands on the same point (the fact the scale rule rests on; k written here, not taken from the code)."""
    from annealing import renoise_factor

    d_c, d_u = _pair(1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(d_c.shape, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([3.0, 1.2, 0.4], dtype=torch.float64)
    sigma_next = torch.tensor([2.0, 0.7, 0.0], dtype=torch.float64)
    w = 0.6
    view = (-1, 1, 1, 1)
    # CFG++: guided x0, renoised with the unconditional noise eps_u = (x - D_u) / sigma
    cfgpp = d_u + w * (d_c - d_u) + sigma_next.view(view) * (x - d_u) / sigma.view(view)
    # plain Euler with D = cfg(D_c, D_u, w k)
    scale = w * sigma / (sigma - sigma_next)
    denoised = cfg(d_c, d_u, scale)
    euler = x + (sigma_next - sigma).view(view) * (x - denoised) / sigma.view(view)
    torch.testing.assert_close(euler, cfgpp)
    torch.testing.assert_close(renoise_factor(sigma, sigma_next, "eps"), scale / w)
    assert float(scale[2]) == pytest.approx(w)  # last step (sigma_next = 0): k = 1


def test_apg_reduces_to_cfg_without_projection_threshold_or_momentum():
    d_c, d_u = _pair(3)
    out, running = apg(d_c, d_u, 4.0, eta=1.0, norm_threshold=0.0, momentum=0.0)
    torch.testing.assert_close(out, cfg(d_c, d_u, 4.0))
    torch.testing.assert_close(running, d_c - d_u)


def test_apg_eta_zero_keeps_only_the_part_orthogonal_to_the_conditional_prediction():
    d_c, d_u = _pair(4)
    out, _ = apg(d_c, d_u, 5.0, eta=0.0)
    update = (out - d_c).reshape(3, -1)
    assert torch.allclose((update * d_c.reshape(3, -1)).sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-9)
    # and it is (w - 1) times the orthogonal component of D_c - D_u
    g = (d_c - d_u).reshape(3, -1)
    c = d_c.reshape(3, -1)
    orth = g - (g * c).sum(1, keepdim=True) / (c * c).sum(1, keepdim=True) * c
    torch.testing.assert_close(update, 4.0 * orth)


def test_apg_norm_threshold_caps_the_update():
    d_c, d_u = _pair(5)
    r = 0.5
    out, _ = apg(d_c, d_u, 3.0, eta=1.0, norm_threshold=r)
    norms = (out - d_c).reshape(3, -1).norm(dim=1)
    assert torch.all(norms <= 2.0 * r + 1e-9)  # (w - 1) * r
    assert torch.allclose(norms, torch.full_like(norms, 2.0 * r))  # these random updates are all longer than r
    with pytest.raises(ValueError, match="norm_threshold"):
        apg(d_c, d_u, 3.0, norm_threshold=-1.0)


def test_apg_matches_comfyuis_node_formula_with_momentum():
    """ComfyUI's APG node (comfy_extras/nodes_apg.py): running = m * running + g; clip; project on cond; then its cfg w'
    gives D_c + w' * (orth + eta * par). Ours at w = w' + 1 must agree over a short trajectory."""
    eta, threshold, momentum, w_comfy = 0.3, 2.0, -0.5, 4.0
    running_ours = None
    running_comfy = 0
    for step in range(4):
        d_c, d_u = _pair(10 + step)
        ours, running_ours = apg(d_c, d_u, w_comfy + 1, eta=eta, norm_threshold=threshold, momentum=momentum, running=running_ours)
        guidance = d_c - d_u
        running_comfy = guidance if step == 0 else momentum * running_comfy + guidance
        guidance = running_comfy
        norm = guidance.norm(p=2, dim=[-1, -2, -3], keepdim=True)
        guidance = guidance * torch.minimum(torch.ones_like(norm), threshold / norm)
        unit = torch.nn.functional.normalize(d_c, dim=[-1, -2, -3])
        parallel = (guidance * unit).sum(dim=[-1, -2, -3], keepdim=True) * unit
        modified = (guidance - parallel) + eta * parallel
        modified_cond = (d_u + modified) + (d_c - d_u) / w_comfy
        comfy = d_u + w_comfy * (modified_cond - d_u)
        torch.testing.assert_close(ours, comfy)


# -------------------------------------------------------------------------------------------------------------- TV-CFG


def _tau_dt(timesteps):
    """Normalised time and its steps, written out: tau_i = t_i / t_0, then 0 appended."""
    tau = [t / max(timesteps) for t in timesteps] + [0.0]
    return tau[:-1], [tau[i] - tau[i + 1] for i in range(len(timesteps))]


def _sd3_timesteps(n, shift=3.0):
    s = torch.linspace(1.0, 1e-3, n, dtype=torch.float64)
    return 1000 * shift * s / (1 + (shift - 1) * s)


TIMESTEP_SETS = {
    "ddim 50": torch.arange(49, -1, -1, dtype=torch.float64) * 20,  # 980, ..., 0: the last step has dt = 0
    "sd3 28": _sd3_timesteps(28),
    "sd3 7": _sd3_timesteps(7),
    "geometric 13": torch.logspace(3, 0.5, 13, dtype=torch.float64),
    "one step": torch.tensor([999.0], dtype=torch.float64),
}


@pytest.mark.parametrize("name", list(TIMESTEP_SETS))
@pytest.mark.parametrize("kind", STAGE_SCHEDULES)
def test_stage_wise_time_integral_equals_the_nominal_scale(kind, name):
    timesteps = TIMESTEP_SETS[name]
    _, dt = _tau_dt(timesteps.tolist())
    for w in (1.0, 2.5, 7.0):
        scales = StageWiseGuidance(kind).step_scales(timesteps, w)
        assert scales.shape == timesteps.shape
        assert sum(float(s) * d for s, d in zip(scales, dt)) == pytest.approx(w, rel=1e-12)


def test_stage_wise_symmetric_by_hand():
    # even N: rise 1 -> 2w - 1 reaches its peak at step N // 2 and falls in one step less (the official linspace layout)
    w = 3.0
    raw = [1.0, 3.0, 5.0, 1.0]  # uniform dt 0.25: integral 2.5
    got = StageWiseGuidance().step_scales(torch.tensor([1000.0, 750.0, 500.0, 250.0]), w)
    torch.testing.assert_close(got, torch.tensor([g * w / 2.5 for g in raw]))
    # odd N: a symmetric tent 1, 2, 3, 2, 1 (w = 2); uniform dt 0.2: integral 1.8
    got = StageWiseGuidance().step_scales(torch.tensor([1000.0, 800.0, 600.0, 400.0, 200.0]), 2.0)
    torch.testing.assert_close(got, torch.tensor([g * 2.0 / 1.8 for g in (1.0, 2.0, 3.0, 2.0, 1.0)]))
    # uneven time steps weigh the profile: tau 1, .6, .3, .1 -> dt .4, .3, .2, .1; g 1, 2, 3, 1 -> integral 1.7
    got = StageWiseGuidance().step_scales(torch.tensor([1000.0, 600.0, 300.0, 100.0], dtype=torch.float64), 2.0)
    torch.testing.assert_close(got, torch.tensor([1.0, 2.0, 3.0, 1.0], dtype=torch.float64) * 2.0 / 1.7)
    # without normalisation: the profile itself; w = 1: no guidance anywhere; N = 1: w
    got = StageWiseGuidance(normalize=False).step_scales(torch.tensor([1000.0, 750.0, 500.0, 250.0]), w)
    assert got.tolist() == raw
    assert StageWiseGuidance().step_scales(TIMESTEP_SETS["sd3 28"], 1.0).tolist() == pytest.approx([1.0] * 28)
    assert StageWiseGuidance().step_scales(torch.tensor([500.0]), 4.0).tolist() == [4.0]


def test_stage_wise_interval_by_hand():
    timesteps = torch.tensor([1000.0, 800.0, 600.0, 400.0, 200.0, 100.0], dtype=torch.float64)
    # tau 1, .8, .6, .4, .2, .1: inside (0.15, 0.78) are .6, .4, .2; dt .2 .2 .2 .2 .1 .1 -> 0.5 inside, 0.5 outside
    got = StageWiseGuidance("interval").step_scales(timesteps, 3.0)
    assert got.tolist() == pytest.approx([1.0, 1.0, 5.0, 5.0, 5.0, 1.0])  # (3 - 0.5) / 0.5 = 5
    assert StageWiseGuidance("interval", normalize=False).step_scales(timesteps, 3.0).tolist() == [1.0, 1.0, 3.0, 3.0, 3.0, 1.0]
    # the bounds are strict and configurable
    got = StageWiseGuidance("interval", interval_low=0.2, interval_high=0.8, normalize=False).step_scales(timesteps, 3.0)
    assert got.tolist() == [1.0, 1.0, 3.0, 3.0, 1.0, 1.0]


def test_stage_wise_steps_by_hand():
    timesteps = torch.tensor([1000.0, 800.0, 600.0, 400.0, 200.0])
    w = 6.0
    # i / (N - 1) = 0, .25, .5, .75, 1: only step 0 is before the switch at 0.25 (strictly)
    assert StageWiseGuidance("step_up", normalize=False).step_scales(timesteps, w).tolist() == [2.0, 6.0, 6.0, 6.0, 6.0]
    assert StageWiseGuidance("step_down", normalize=False).step_scales(timesteps, w).tolist() == [6.0, 2.0, 2.0, 2.0, 2.0]
    # normalised over uniform dt 0.2: step_up integral (2 + 24) / 5 = 5.2, step_down (6 + 8) / 5 = 2.8
    got = StageWiseGuidance("step_up").step_scales(timesteps, w)
    torch.testing.assert_close(got, torch.tensor([2.0, 6.0, 6.0, 6.0, 6.0]) * w / 5.2)
    got = StageWiseGuidance("step_down", switch=0.5, step_divisor=2.0).step_scales(timesteps, w)
    torch.testing.assert_close(got, torch.tensor([6.0, 6.0, 3.0, 3.0, 3.0]) * w / ((12.0 + 9.0) / 5))


@pytest.mark.parametrize("kind", STAGE_SCHEDULES)
def test_stage_wise_scale_at_schedule_points_and_between_them(kind):
    """A flow-like schedule (timestep = 1000 sigma): at its points the step values; between them the profile at the
    evaluation's own time (fractional step p, normalised time tau), never the step's value."""
    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0], dtype=torch.float64)
    to_time = lambda s: 1000 * s  # noqa: E731
    w = 3.0
    config = StageWiseGuidance(kind)
    steps = config.step_scales(to_time(sigmas[:-1]), w)
    torch.testing.assert_close(config.scale_at(sigmas[:-1], sigmas, w, timestep=to_time), steps)
    # a recomputed noise level (sigma -> log -> sigma) within rounding of a point is that point
    torch.testing.assert_close(config.scale_at(sigmas[1:-1] * (1 + 1e-9), sigmas, w, timestep=to_time), steps[1:])
    # between the points: sigma 0.9 (p = 0.5, tau 0.9), 0.7 (p = 1.5), 0.5 (p = 2.5), 0.1 (last step: p = 4.5, tau 0.1)
    between = torch.tensor([0.9, 0.7, 0.5, 0.1], dtype=torch.float64)
    got = config.scale_at(between, sigmas, w, timestep=to_time)
    if kind == "symmetric":  # N = 5, peak at step 2: tent 0.25, 0.75, 0.75 and the last step holds its value 0
        expected = [(1 + 4 * r) * w / 2.6 for r in (0.25, 0.75, 0.75, 0.0)]
    elif kind == "interval":  # inside (0.15, 0.78): tau .6, .4, .2 -> 0.6 of the time; v = (3 - 0.4) / 0.6
        v = (3 - 0.4) / 0.6
        expected = [1.0, v, v, 1.0]
    elif kind == "step_up":  # p / 4 = .125 (< .25: weak), .375, .625, 1.125; raw 1, 3, 3, 3, 3: integral 2.6
        expected = [1.0 * w / 2.6, 3.0 * w / 2.6, 3.0 * w / 2.6, 3.0 * w / 2.6]
    else:  # step_down: raw 3, 1, 1, 1, 1: integral 1.4
        expected = [3.0 * w / 1.4, 1.0 * w / 1.4, 1.0 * w / 1.4, 1.0 * w / 1.4]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_stage_wise_scale_at_reads_the_models_time_not_the_step_index():
    """Quantised timesteps (a discrete model's argmin) that repeat between two points: finite, and between the points
    the value at the evaluation's own (quantised) time."""
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    to_time = lambda s: torch.floor(100 * s.log1p())  # noqa: E731  (t = 239, 179, 109, 69)
    w = 2.0
    config = StageWiseGuidance()
    steps = config.step_scales(to_time(sigmas[:-1]), w)
    # sigma 3.5 lies between points 1 and 2: t = floor(100 ln 4.5) = 150, tau = 150 / 239, f = (179 - 150) / (179 - 109)
    f = (179 - 150) / 70
    expected = float(steps[1]) + f * (float(steps[2]) - float(steps[1]))  # symmetric: linear between the steps' values
    assert float(config.scale_at(torch.tensor([3.5], dtype=torch.float64), sigmas, w, timestep=to_time)[0]) == pytest.approx(expected)
    # identical timesteps for two points (a very dense schedule): no division by zero
    flat = lambda s: torch.full_like(s, 500.0)  # noqa: E731
    assert torch.isfinite(config.scale_at(torch.tensor([7.0, 5.0]), sigmas.float(), w, timestep=flat)).all()
    # batch: one value per sample; a schedule with no step gives w
    assert config.scale_at(torch.tensor([10.0, 5.0]), sigmas, w, timestep=to_time).shape == (2,)
    assert config.scale_at(torch.tensor([1.0]), torch.tensor([1.0]), w).tolist() == [w]


def test_stage_wise_config_round_trip_and_validation():
    config = StageWiseGuidance("step_down", switch=0.4, step_divisor=2.0, normalize=False)
    assert StageWiseGuidance.from_dict(config.to_dict()) == config
    assert StageWiseGuidance().to_dict() == {"kind": "symmetric", "interval_low": 0.15, "interval_high": 0.78, "switch": 0.25,
                                             "step_divisor": 3.0, "normalize": True}
    for bad in ({"kind": "cosine"}, {"interval_low": 0.8, "interval_high": 0.2}, {"switch": 1.5}, {"step_divisor": 0.0}):
        with pytest.raises(ValueError):
            StageWiseGuidance(**bad)


# -------------------------------------------------------------------------------------------------------------- ADG


def test_angle_domain_guidance_by_hand_in_2d():
    theta = 0.3
    d_u = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    d_c = torch.tensor([[math.cos(theta), math.sin(theta)]], dtype=torch.float64)
    w = 2.0
    w_prime = (w - 1) + 1e-3
    t_new = w_prime * theta
    # e = (D_c - D_u) minus its projection on D_u = (0, sin theta)
    expected = torch.tensor([[math.cos(t_new) * math.cos(theta), math.cos(t_new) * math.sin(theta) + math.sin(t_new)]], dtype=torch.float64)
    torch.testing.assert_close(angle_domain_guidance(d_c, d_u, w), expected)
    # w = 1 leaves D_c (almost) unchanged; a huge w is capped at theta' = pi / 3
    torch.testing.assert_close(angle_domain_guidance(d_c, d_u, 1.0), d_c, atol=2e-3, rtol=0)
    capped = angle_domain_guidance(d_c, d_u, 100.0)
    cap = math.pi / 3
    expected_capped = torch.tensor([[math.cos(cap) * math.cos(theta), math.cos(cap) * math.sin(theta) + math.sin(cap)]], dtype=torch.float64)
    torch.testing.assert_close(capped, expected_capped)
    # parallel predictions (sin theta <= 1e-3): the fallback gives D_c back
    torch.testing.assert_close(angle_domain_guidance(2 * d_u, d_u, 5.0), 2 * d_u)


def test_angle_domain_guidance_is_per_sample_on_flattened_predictions():
    d_c, d_u = _pair(6)
    batched = angle_domain_guidance(d_c, d_u, torch.tensor([1.5, 3.0, 8.0], dtype=torch.float64))
    for b, w in enumerate((1.5, 3.0, 8.0)):
        torch.testing.assert_close(batched[b : b + 1], angle_domain_guidance(d_c[b : b + 1], d_u[b : b + 1], w))


def _adg_reference(d_c, d_u, w, cap):
    """ADG written out per sample in float64 with arccos, as the paper states it."""
    out = []
    for c, u in zip(d_c.double().reshape(d_c.shape[0], -1), d_u.double().reshape(d_u.shape[0], -1)):
        theta = torch.arccos(torch.clamp(c @ u / (c.norm() * u.norm()), -1, 1))
        w_prime = max(w - 1, 0) + 1e-3
        theta_new = torch.clamp(w_prime * theta, -cap, cap)
        e = (c - u) - ((c - u) @ u) / (u @ u) * u
        if torch.sin(theta) <= 1e-3:
            out.append(torch.cos(theta_new) * c + w_prime * e)
        else:
            out.append(torch.cos(theta_new) * c + torch.sin(theta_new) / torch.sin(theta) * e)
    return torch.stack(out).reshape(d_c.shape)


def test_angle_domain_guidance_against_the_formula_on_latents():
    d_u, noise = _pair(7, shape=(3, 4, 8, 8))
    d_c = d_u + 0.3 * noise  # angles of a few tenths of a radian, as between real predictions
    for w, cap in ((1.0, ADG_MAX_ANGLE), (2.5, ADG_MAX_ANGLE), (7.0, ADG_MAX_ANGLE), (7.0, 0.2), (30.0, 3.14 / 3)):
        torch.testing.assert_close(angle_domain_guidance(d_c, d_u, w, max_angle=cap), _adg_reference(d_c, d_u, w, cap))
    assert ADG_MAX_ANGLE == pytest.approx(math.pi / 3) and abs(ADG_MAX_ANGLE - 3.14 / 3) < 6e-4  # the official code's 3.14 / 3
    # nearly parallel (sin theta = 5e-4 <= 1e-3): the w' e branch, still accurate in float32
    theta = 5e-4
    d_u2 = torch.tensor([[3.0, 0.0, 0.0]], dtype=torch.float64)
    d_c2 = 2.0 * torch.tensor([[math.cos(theta), math.sin(theta), 0.0]], dtype=torch.float64)
    w_prime = 4.0 + 1e-3
    expected = math.cos(w_prime * theta) * d_c2 + w_prime * torch.tensor([[0.0, 2.0 * math.sin(theta), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(angle_domain_guidance(d_c2.float(), d_u2.float(), 5.0).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_angle_domain_guidance_in_half_precision_computes_in_float32(dtype):
    d_u, noise = _pair(8, shape=(2, 4, 16, 16))
    d_c = d_u + 0.2 * noise
    half_c, half_u = d_c.to(dtype), d_u.to(dtype)
    out = angle_domain_guidance(half_c, half_u, 6.0)
    assert out.dtype == dtype
    reference = _adg_reference(half_c, half_u, 6.0, ADG_MAX_ANGLE)  # the same rounded inputs, float64 maths
    # only the final rounding to half precision remains (float16 eps 1e-3, bfloat16 8e-3)
    eps = torch.finfo(dtype).eps
    assert float((out.double() - reference).abs().max() / reference.abs().max()) < 2 * eps


def test_interval_scale():
    sigma = torch.tensor([14.6, 5.42, 5.0, 1.0, 0.28, 0.1])
    out = interval_scale(sigma, 4.0)
    assert out.tolist() == [1.0, 4.0, 4.0, 4.0, 1.0, 1.0]  # (0.28, 5.42]
    assert interval_scale(sigma, 4.0, sigma_low=0.0, sigma_high=100.0).tolist() == [4.0] * 6
    with pytest.raises(ValueError, match="sigma_low"):
        interval_scale(sigma, 4.0, sigma_low=2.0, sigma_high=1.0)


def test_stage_wise_and_adg_never_read_tensors_back_to_the_host():
    """Meta tensors carry no data: any .item(), .tolist() or Python branch on a value would raise. So the per-evaluation
    maths queues on a GPU without a host synchronisation."""
    meta = torch.device("meta")
    sigma, sigmas = torch.empty(2, device=meta), torch.empty(9, device=meta)
    for kind in STAGE_SCHEDULES:
        scales = StageWiseGuidance(kind).scale_at(sigma, sigmas, 5.0, timestep=lambda s: 1000 * s)
        assert scales.device == meta and scales.shape == (2,)
    d_c, d_u = torch.empty(2, 4, 8, 8, device=meta), torch.empty(2, 4, 8, 8, device=meta, dtype=torch.float16)
    assert angle_domain_guidance(d_c.half(), d_u, 7.0).device == meta
    assert cfg(d_c, d_u.float(), scales).shape == d_c.shape
