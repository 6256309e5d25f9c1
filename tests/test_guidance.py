"""Guidance math: delta spaces, k, schedule lookup, options, recorder, and the sampling-loop equivalence
(a DDIM/flow CFG++ loop renoising with the unconditional prediction == a plain Euler loop fed the k-scaled D)."""

from __future__ import annotations

import math

import pytest
import torch

import annealing
from annealing import AnnealingGuidance, AnnealingOptions, GuidanceRecorder, locate_on_schedule, renoise_factor
from annealing.guidance import prediction_delta
from annealing.schedules import continuous_timestep, ddim_sigmas, ddim_timesteps, flow_sigmas, scaled_linear_alphas_cumprod, vp_sigmas

ABAR = scaled_linear_alphas_cumprod()
LOG_SIGMAS = vp_sigmas(ABAR).log().float()


def sigma_to_t(sigma):
    return continuous_timestep(sigma, LOG_SIGMAS)


class GaussianDenoiser:
    """Exact posterior mean E[x0 | x] for x0 ~ N(mu_c, tau^2 I), x = alpha x0 + sigma eps."""

    def __init__(self, shape, tau=0.8, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.mu_cond = torch.randn(shape, generator=gen, dtype=torch.float64)
        self.mu_uncond = 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
        self.tau2 = tau**2

    def __call__(self, x, sigma, alpha, cond):
        mu = self.mu_cond if cond else self.mu_uncond
        a, s = alpha.reshape(-1, *[1] * (x.dim() - 1)), sigma.reshape(-1, *[1] * (x.dim() - 1))
        gain = a * self.tau2 / (a * a * self.tau2 + s * s)
        return mu + gain * (x - a * mu)


SHAPE = (2, 4, 8, 8)


def test_delta_spaces_match_the_spec():
    sigma = torch.tensor([0.5, 2.0])
    d_c, d_u = torch.randn(SHAPE), torch.randn(SHAPE)
    eps = prediction_delta(sigma, d_c, d_u, "eps", "epsilon")
    torch.testing.assert_close(eps, (d_c - d_u) / sigma.view(-1, 1, 1, 1))
    flow_sigma = torch.tensor([0.25, 0.75])
    v = prediction_delta(flow_sigma, d_c, d_u, "const", "velocity")
    e = prediction_delta(flow_sigma, d_c, d_u, "const", "epsilon")
    torch.testing.assert_close(v, (d_c - d_u) / flow_sigma.view(-1, 1, 1, 1))
    torch.testing.assert_close(e, (1 - flow_sigma).view(-1, 1, 1, 1) * v)
    # the eps-space delta of a flow model equals eps_u - eps_c with eps = (x - (1 - s) D) / s
    x = torch.randn(SHAPE)
    s = flow_sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(e, (x - (1 - s) * d_u) / s - (x - (1 - s) * d_c) / s, atol=1e-5, rtol=1e-5)


def test_renoise_factor():
    s, s_next = torch.tensor([10.0, 1.0, 0.5]), torch.tensor([5.0, 0.0, 0.25])
    torch.testing.assert_close(renoise_factor(s, s_next, "eps"), torch.tensor([2.0, 1.0, 2.0]))
    fs, fn = torch.tensor([0.8]), torch.tensor([0.6])
    expected = 0.8 * 0.4 / (0.8 * 0.4 - 0.6 * 0.2)
    torch.testing.assert_close(renoise_factor(fs, fn, "const"), torch.tensor([expected]))


def test_locate_on_schedule_exact_intermediate_and_last():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    step, nxt, on = locate_on_schedule(torch.tensor([10.0, 5.0, 3.0, 1.0, 12.0]), sigmas)
    assert step.tolist() == [0, 1, 1, 3, 0]
    assert nxt.tolist() == [5.0, 2.0, 2.0, 0.0, 5.0]
    assert on.tolist() == [True, True, False, True, False]


def test_continuous_timestep_is_exact_on_the_grid_and_interpolates_between():
    steps = ddim_timesteps(50)
    assert steps[:3].tolist() == [980, 960, 940] and steps[-1].item() == 0
    sigmas = vp_sigmas(ABAR)[steps].float()
    torch.testing.assert_close(sigma_to_t(sigmas), steps.float(), atol=2e-3, rtol=0)
    mid = (vp_sigmas(ABAR)[500].log() * 0.5 + vp_sigmas(ABAR)[501].log() * 0.5).exp().float()
    assert abs(sigma_to_t(mid.reshape(1)).item() - 500.5) < 1e-2


def test_options_are_validated():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="lambda"):
            AnnealingOptions(lam=bad)
    with pytest.raises(ValueError, match="active_start"):
        AnnealingOptions(active_start=0.6, active_end=0.5)
    with pytest.raises(ValueError, match="w_min"):
        AnnealingOptions(w_min=2.0, w_max=1.0)


def _guide(model, sampling, **opts):
    return AnnealingGuidance(model, AnnealingOptions(**opts)), dict(sampling=sampling, sigma_to_timestep=sigma_to_t)


def test_per_sample_w_and_delta_norm_normalisation(upstream_model):
    guide, kw = _guide(upstream_model, "eps", lam=0.6)
    sigmas = ddim_sigmas(50)
    d_u = torch.zeros(3, 4, 16, 16)
    d_c = torch.stack([torch.full((4, 16, 16), v) for v in (0.01, 0.1, 1.0)])
    rec = GuidanceRecorder()
    out = guide.guide(sigmas[10].expand(3), d_c, d_u, sample_sigmas=sigmas, recorder=rec, **kw)
    trace = rec.trace()
    w, k = trace["w"][0], trace["k"][0]
    assert len(set(w.tolist())) == 3  # one w per sample
    # the norm fed to the MLP is scaled to SDXL's 65,536 latent elements
    raw = (d_c - d_u).reshape(3, -1).norm(dim=1) / sigmas[10]
    torch.testing.assert_close(torch.from_numpy(trace["mlp_delta_norm"][0]), raw * math.sqrt(65536 / 1024))
    expected_w = upstream_model(sigma_to_t(sigmas[10].expand(3)), raw * 8.0, 0.6)
    torch.testing.assert_close(torch.from_numpy(w), expected_w)
    torch.testing.assert_close(out, d_u + (expected_w * torch.from_numpy(k)).view(-1, 1, 1, 1) * (d_c - d_u))
    # normalisation off reproduces upstream (raw norm)
    guide_off, _ = _guide(upstream_model, "eps", lam=0.6, normalize_delta_norm=False)
    rec_off = GuidanceRecorder()
    guide_off.guide(sigmas[10].expand(3), d_c, d_u, sample_sigmas=sigmas, recorder=rec_off, **kw)
    torch.testing.assert_close(torch.from_numpy(rec_off.trace()["mlp_delta_norm"][0]), raw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_predictions(upstream_model, dtype):
    guide, kw = _guide(upstream_model, "eps")
    sigmas = ddim_sigmas(30)
    d_c, d_u = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    ref = guide.guide(sigmas[5], d_c, d_u, sample_sigmas=sigmas, **kw)
    out = guide.guide(sigmas[5].to(dtype), d_c.to(dtype), d_u.to(dtype), sample_sigmas=sigmas, **kw)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


def test_clamp_and_active_range(upstream_model):
    sigmas = ddim_sigmas(10)
    d_c, d_u = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    guide, kw = _guide(upstream_model, "eps", lam=1.0, w_max=0.9, active_start=0.2, active_end=0.6, fallback_cfg=3.0)
    rec = GuidanceRecorder()
    for i in range(10):
        guide.guide(sigmas[i], d_c, d_u, sample_sigmas=sigmas, recorder=rec, **kw)
    trace = rec.trace()
    assert trace.steps == list(range(10))
    active = trace["active"][:, 0].tolist()
    assert active == [False, False, True, True, True, True, False, False, False, False]
    w, k = trace["w"][:, 0], trace["k"][:, 0]
    assert (w[2:6] <= 0.9 + 1e-7).all()
    # outside the range the CFG-equivalent scale is exactly fallback_cfg
    for i in (0, 1, 6, 9):
        assert abs(w[i] * k[i] - 3.0) < 1e-5


def test_plain_mode_for_cfg_pp_samplers_applies_w_unchanged(upstream_model):
    guide, kw = _guide(upstream_model, "eps")
    sigmas = ddim_sigmas(20)
    d_c, d_u = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    rec = GuidanceRecorder()
    out = guide.guide(sigmas[3], d_c, d_u, sample_sigmas=sigmas, sampler_renoises_with_uncond=True, recorder=rec, **kw)
    w = rec.trace()["w"][0, 0]
    assert rec.trace()["k"][0, 0] == 1.0
    torch.testing.assert_close(out, d_u + float(w) * (d_c - d_u))


def test_missing_schedule_is_a_clear_error(upstream_model):
    guide, kw = _guide(upstream_model, "eps")
    with pytest.raises(ValueError, match="sample_sigmas"):
        guide.guide(torch.tensor(1.0), torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), **kw)


def test_recorder_keeps_one_row_per_step_with_intermediate_evaluations(upstream_model):
    guide, kw = _guide(upstream_model, "eps")
    sigmas = ddim_sigmas(5)
    d_c, d_u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    rec = GuidanceRecorder()
    # a heun-like sequence: each step evaluates at sigma_i, then at sigma_{i+1}; plus one off-grid evaluation
    for i in range(4):
        guide.guide(sigmas[i], d_c, d_u, sample_sigmas=sigmas, recorder=rec, **kw)
        guide.guide(sigmas[i + 1], d_c * 1.1, d_u, sample_sigmas=sigmas, recorder=rec, **kw)
    guide.guide((sigmas[1] * sigmas[2]).sqrt(), d_c, d_u, sample_sigmas=sigmas, recorder=rec, **kw)
    trace = rec.trace()
    assert trace.steps == [0, 1, 2, 3, 4] and trace.evaluations == 9 and trace["w"].shape == (5, 2)
    assert trace["on_schedule"].all()
    rec.reset()
    assert len(rec) == 0 and rec.trace().steps == []


# ------------------------------------------------------------------------------------------ sampling-loop equivalence


def _flow_model_like(upstream_model):
    meta = upstream_model.metadata.replace(model_family="sd3", prediction_space="velocity", timestep_convention="sigma_x1000")
    model = annealing.GuidanceScaleModel(upstream_model.config, meta)
    model.load_state_dict(upstream_model.state_dict())
    return model.eval()


@pytest.mark.parametrize("lam", [0.0, 0.4, 1.0])
def test_ddim_cfgpp_loop_equals_euler_with_k_for_eps(upstream_model, lam):
    steps = 50
    den = GaussianDenoiser(SHAPE)
    ts = ddim_timesteps(steps)
    abar = ABAR
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(SHAPE, generator=gen, dtype=torch.float64)

    # (a) the spec's DDIM loop in DDPM z-space, renoising with eps_uncond
    x_start = z / abar[ts[0]].sqrt()
    for i, t in enumerate(ts.tolist()):
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0, dtype=torch.float64)
        sigma_k = ((1 - a_t) / a_t).sqrt().expand(2)
        x = z / a_t.sqrt()
        eps_u = (x - den(x, sigma_k, torch.ones(2, dtype=torch.float64), False)) / sigma_k.view(-1, 1, 1, 1)
        eps_c = (x - den(x, sigma_k, torch.ones(2, dtype=torch.float64), True)) / sigma_k.view(-1, 1, 1, 1)
        delta_norm = (eps_u - eps_c).reshape(2, -1).norm(dim=1)
        w = upstream_model(torch.full((2,), float(t)), delta_norm * math.sqrt(65536 / eps_u[0].numel()), lam).double().view(-1, 1, 1, 1)
        eps_hat = eps_u + w * (eps_c - eps_u)
        z0 = (z - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
        z = a_prev.sqrt() * z0 + (1 - a_prev).sqrt() * eps_u
    reference = z

    # (b) a plain Euler loop in ComfyUI's x-space fed the k-scaled guided prediction
    guide = AnnealingGuidance(upstream_model, AnnealingOptions(lam=lam))
    sigmas = ddim_sigmas(steps).double()
    x = x_start
    for i in range(steps):
        s = sigmas[i].expand(2)
        one = torch.ones(2, dtype=torch.float64)
        d = guide.guide(s, den(x, s, one, True), den(x, s, one, False), sampling="eps", sigma_to_timestep=sigma_to_t, sample_sigmas=sigmas)
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - d) / sigmas[i]
    torch.testing.assert_close(x, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lam", [0.2, 0.9])
def test_flow_cfgpp_loop_equals_euler_with_k_for_const(upstream_model, lam):
    steps = 28
    model = _flow_model_like(upstream_model)
    den = GaussianDenoiser(SHAPE, seed=3)
    sigmas = flow_sigmas(steps, shift=3.0).double()
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(SHAPE, generator=gen, dtype=torch.float64)

    # (a) flow CFG++: x0 = z - s v_hat; eps_u = z + (1 - s) v_u; z' = (1 - s') x0 + s' eps_u
    z = start
    for i in range(steps):
        s, s_n = sigmas[i], sigmas[i + 1]
        sv = s.expand(2)
        d_u, d_c = den(z, sv, 1 - sv, False), den(z, sv, 1 - sv, True)
        v_u, v_c = (z - d_u) / s, (z - d_c) / s
        w = model(sv * 1000, (v_u - v_c).reshape(2, -1).norm(dim=1) * math.sqrt(65536 / d_u[0].numel()), lam).double().view(-1, 1, 1, 1)
        v_hat = v_u + w * (v_c - v_u)
        z = (1 - s_n) * (z - s * v_hat) + s_n * (z + (1 - s) * v_u)
    reference = z

    # (b) plain Euler in x-space with the k-scaled D
    guide = AnnealingGuidance(model, AnnealingOptions(lam=lam))
    x = start
    for i in range(steps):
        sv = sigmas[i].expand(2)
        d = guide.guide(sv, den(x, sv, 1 - sv, True), den(x, sv, 1 - sv, False), sampling="const", sample_sigmas=sigmas)
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - d) / sigmas[i]
    torch.testing.assert_close(x, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling, space", [("eps", "epsilon"), ("v_prediction", "velocity"), ("const", "epsilon"), ("const", "velocity")])
def test_norm_shortcut_equals_the_norm_of_the_full_delta(sampling, space):
    sigma = torch.tensor([0.3, 0.9])
    d_c, d_u = torch.randn(SHAPE), torch.randn(SHAPE)
    full = annealing.per_sample_norm(prediction_delta(sigma, d_c, d_u, sampling, space))
    short = annealing.delta_norm_from_difference(sigma, annealing.per_sample_norm(d_c - d_u), sampling, space)
    torch.testing.assert_close(short, full)


def test_guidance_step_never_reads_a_value_back_to_the_host(upstream_model):
    """.item(), bool(tensor) and float(tensor) go through aten._local_scalar_dense: on a GPU each one is a device
    synchronisation. The hot path (guide + record) must make none."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ForbidHostReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
                ForbidHostReads.reads += 1
            return func(*args, **(kwargs or {}))

    guide = AnnealingGuidance(upstream_model, AnnealingOptions(lam=0.3, w_max=1.2, active_start=0.1, fallback_cfg=2.0))
    sigmas = ddim_sigmas(6)
    d_c, d_u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    rec = GuidanceRecorder()
    with ForbidHostReads():
        for i in range(6):
            guide.guide(sigmas[i].expand(2), d_c, d_u, sampling="eps", sigma_to_timestep=sigma_to_t, sample_sigmas=sigmas, recorder=rec)
    assert ForbidHostReads.reads == 0
    with ForbidHostReads():
        bool(torch.ones(1) > 0)
    assert ForbidHostReads.reads == 1  # the detector does see a host read


def test_guidance_step_copies_nothing_from_the_host(upstream_model):
    """A host -> device copy (torch.as_tensor(0.4).to("cuda")) synchronises too. On the meta device every tensor of the
    step must be made there: any copy from a CPU tensor is a host -> device transfer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FindHostCopies(TorchDispatchMode):
        copies = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and any(t.device.type == "cpu" for t in tensors):
                FindHostCopies.copies.append(str(func))
            return func(*args, **(kwargs or {}))

    model = annealing.GuidanceScaleModel(upstream_model.config, upstream_model.metadata).to("meta").eval()
    guide = AnnealingGuidance(model, AnnealingOptions(lam=0.3, w_max=1.2, active_start=0.1, fallback_cfg=2.0))
    sigmas = ddim_sigmas(6).to("meta")
    log_sigmas = LOG_SIGMAS.to("meta")
    d_c, d_u = torch.randn(2, 4, 8, 8, device="meta"), torch.randn(2, 4, 8, 8, device="meta")
    rec = GuidanceRecorder()
    with FindHostCopies():
        out = guide.guide(sigmas[2].expand(2), d_c, d_u, sampling="eps", sample_sigmas=sigmas, recorder=rec,
                          sigma_to_timestep=lambda s: continuous_timestep(s, log_sigmas))
        torch.ones(1).to("meta")  # the detector sees a host copy
    assert out.device.type == "meta"
    assert FindHostCopies.copies == ["aten._to_copy.default"], FindHostCopies.copies
