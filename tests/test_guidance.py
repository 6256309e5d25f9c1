"""Guidance math: delta spaces, k, schedule lookup, options, the guide under each mode, the recorder, hostile inputs,
and the sampling-loop facts the anchored reading rests on (on the training grid it is the paper's CFG++ step; at other step
counts it converges, where the per-step reading does not). Models are random-weight ones with metadata: the math does not
depend on trained weights, so none of this needs the reference checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

import annealing
from annealing import AnnealingGuidance, AnnealingOptions, GuidanceRecorder, SamplerInfo, locate_on_schedule, renoise_factor
from annealing.training_grid import FlowGrid, VPGrid, k_train

SHAPE = (2, 4, 8, 8)


def sd_abar() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def karras(t) -> torch.Tensor:
    abar = sd_abar()[t]
    return ((1 - abar) / abar).sqrt()


def ddim_sigmas(steps: int) -> torch.Tensor:
    """Karras sigmas of diffusers' DDIM "leading" grid (1000 // steps spacing), then 0."""
    ts = torch.arange(steps - 1, -1, -1) * (1000 // steps)
    return torch.cat([karras(ts), torch.zeros(1, dtype=torch.float64)])


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


# ----------------------------------------------------------------------------------------------------------- pieces


def delta_from_predictions(x, sigma, d_c, d_u, sampling, space):
    """eps_u - eps_c (or v_u - v_c) from x0-predictions, written from the definitions: x = alpha x0 + sigma eps with
    alpha = 1 (EPS, V-prediction) or 1 - sigma (CONST), so eps = (x - alpha D) / sigma."""
    s = sigma.view(-1, 1, 1, 1)
    flow = sampling == "const"
    alpha = 1 - s if flow else torch.ones_like(s)
    eps_c, eps_u = (x - alpha * d_c) / s, (x - alpha * d_u) / s
    if space == "epsilon" or not flow:  # velocity v = dx/dsigma: eps where alpha = 1, eps - x0 for flow
        return eps_u - eps_c
    return (eps_u - d_u) - (eps_c - d_c)


def test_delta_spaces_match_their_definitions():
    d_c, d_u, x = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    eps = delta_from_predictions(x, sigma, d_c, d_u, "eps", "epsilon")
    torch.testing.assert_close(eps, (d_c - d_u) / sigma.view(-1, 1, 1, 1))  # docs/design.md: delta_eps = (D_c - D_u) / sigma
    flow_sigma = torch.tensor([0.25, 0.75], dtype=torch.float64)
    v = delta_from_predictions(x, flow_sigma, d_c, d_u, "const", "velocity")
    e = delta_from_predictions(x, flow_sigma, d_c, d_u, "const", "epsilon")
    torch.testing.assert_close(v, (d_c - d_u) / flow_sigma.view(-1, 1, 1, 1))  # delta_v = (D_c - D_u) / sigma
    torch.testing.assert_close(e, (1 - flow_sigma).view(-1, 1, 1, 1) * v)  # delta_eps = (1 - sigma) (D_c - D_u) / sigma


@pytest.mark.parametrize("sampling, space", [("eps", "epsilon"), ("v_prediction", "velocity"), ("const", "epsilon"), ("const", "velocity")])
def test_norm_shortcut_equals_the_norm_of_the_full_delta(sampling, space):
    sigma = torch.tensor([0.3, 0.9])
    d_c, d_u, x = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    full = delta_from_predictions(x.double(), sigma.double(), d_c.double(), d_u.double(), sampling, space).flatten(1).norm(dim=1)
    short = annealing.delta_norm_from_difference(sigma, annealing.per_sample_norm(d_c - d_u), sampling, space)
    torch.testing.assert_close(short.double(), full, rtol=1e-5, atol=1e-5)


def test_renoise_factor():
    s, s_next = torch.tensor([10.0, 1.0, 0.5]), torch.tensor([5.0, 0.0, 0.25])
    torch.testing.assert_close(renoise_factor(s, s_next, "eps"), torch.tensor([2.0, 1.0, 2.0]))
    fs, fn = torch.tensor([0.8]), torch.tensor([0.6])
    torch.testing.assert_close(renoise_factor(fs, fn, "const"), torch.tensor([0.8 * 0.4 / (0.8 * 0.4 - 0.6 * 0.2)]))


def test_locate_on_schedule_exact_intermediate_and_last():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    step, nxt, on = locate_on_schedule(torch.tensor([10.0, 5.0, 3.0, 1.0, 12.0]), sigmas)
    assert step.tolist() == [0, 1, 1, 3, 0]
    assert nxt.tolist() == [5.0, 2.0, 2.0, 0.0, 5.0]
    assert on.tolist() == [True, True, False, True, False]


def test_options_are_validated():
    for bad in (-0.1, 1.5, float("nan"), True, "0.4"):
        with pytest.raises(ValueError, match="lambda"):
            AnnealingOptions(lam=bad)
    with pytest.raises(ValueError, match="active_start"):
        AnnealingOptions(active_start=0.6, active_end=0.5)
    with pytest.raises(ValueError, match="w_min"):
        AnnealingOptions(w_min=2.0, w_max=1.0)
    with pytest.raises(ValueError, match="mode"):
        AnnealingOptions(mode="auto")
    with pytest.raises(ValueError, match="fallback_cfg"):
        AnnealingOptions(fallback_cfg=-1.0)


def test_calling_the_model_directly_validates_lambda(make_guidance_model):
    model = make_guidance_model()
    for bad in (1.5, -0.1, torch.tensor([0.2, 1.5])):
        with pytest.raises(ValueError, match="lam"):
            model(500.0, 10.0, bad)
    assert model(torch.tensor([500.0, 20.0]), 10.0, torch.tensor([0.0, 1.0])).shape == (2,)


# ---------------------------------------------------------------------------------------------------------- the guide


def test_anchored_guide_is_w_times_k_train_with_the_grids_own_timestep(make_guidance_model):
    model = make_guidance_model()
    guide = AnnealingGuidance(model, AnnealingOptions(lam=0.6))
    sigma = karras(torch.tensor([700, 333])).float()  # any noise level; no schedule needed
    d_u = torch.zeros(2, 4, 16, 16)
    d_c = torch.stack([torch.full((4, 16, 16), v) for v in (0.05, 1.0)])
    rec = GuidanceRecorder()
    out = guide.guide(sigma, d_c, d_u, sampling="eps", recorder=rec)
    raw = (d_c - d_u).reshape(2, -1).norm(dim=1) / sigma
    scaled = raw * math.sqrt(65536 / 1024)  # normalised to SDXL's 65,536 latent elements
    w = model(torch.tensor([700.0, 333.0]), scaled, 0.6)
    k = k_train(VPGrid(), sigma.double()).float()
    torch.testing.assert_close(out, (w * k).view(-1, 1, 1, 1) * (d_c - d_u), rtol=1e-4, atol=1e-6)
    trace = rec.trace()
    torch.testing.assert_close(torch.from_numpy(trace["omega"][0]), w * k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(trace["timestep"][0]), torch.tensor([700.0, 333.0]), atol=2e-3, rtol=0)
    off = AnnealingGuidance(model, AnnealingOptions(lam=0.6, normalize_delta_norm=False))
    rec_off = GuidanceRecorder()
    off.guide(sigma, d_c, d_u, sampling="eps", recorder=rec_off)
    torch.testing.assert_close(torch.from_numpy(rec_off.trace()["mlp_delta_norm"][0]), raw)


def test_modes_under_a_cfg_pp_sampler(make_guidance_model):
    model = make_guidance_model()
    sigmas = ddim_sigmas(20).float()
    d_c, d_u = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    cfg_pp = SamplerInfo("euler_cfg_pp")
    k_step = sigmas[3] / (sigmas[3] - sigmas[4])
    outs = {}
    for mode in ("anchored", "per_step", "as_is"):
        rec = GuidanceRecorder()
        outs[mode] = AnnealingGuidance(model, AnnealingOptions(mode=mode)).guide(
            sigmas[3], d_c, d_u, sampling="eps", sampler=cfg_pp, sample_sigmas=sigmas, recorder=rec)
        outs[mode + "_w"] = float(rec.trace()["w"][0, 0])
    w = outs["as_is_w"]
    torch.testing.assert_close(outs["as_is"], d_u + w * (d_c - d_u))
    torch.testing.assert_close(outs["per_step"], d_u + w * (d_c - d_u))
    k = float(k_train(VPGrid(), sigmas[3:4].double()))
    torch.testing.assert_close(outs["anchored"], d_u + w * k / float(k_step) * (d_c - d_u), rtol=1e-4, atol=1e-5)


def test_half_precision_predictions_stay_finite(make_guidance_model):
    guide = AnnealingGuidance(make_guidance_model())
    sigma = karras(torch.tensor(500)).float()
    d_c, d_u = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    ref = guide.guide(sigma, d_c, d_u, sampling="eps")
    for dtype in (torch.float16, torch.bfloat16):
        out = guide.guide(sigma.to(dtype), d_c.to(dtype), d_u.to(dtype), sampling="eps")
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    big = torch.full((1, 4, 8, 8), 60000.0, dtype=torch.float16)  # near fp16's limit: w * k * (D_c - D_u) overflows
    out = guide.guide(torch.tensor(1.0), big, -big, sampling="eps")
    assert out.dtype == torch.float16 and torch.isfinite(out).all() and float(out.max()) == torch.finfo(torch.float16).max


def test_clamp_and_active_range_fall_back_to_plain_cfg(make_guidance_model):
    sigmas = ddim_sigmas(10).float()
    d_c, d_u = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    guide = AnnealingGuidance(make_guidance_model(), AnnealingOptions(lam=1.0, w_max=0.9, active_start=0.2, active_end=0.6, fallback_cfg=3.0))
    rec = GuidanceRecorder()
    for i in range(10):
        out = guide.guide(sigmas[i], d_c, d_u, sampling="eps", sample_sigmas=sigmas, recorder=rec, host_cfg=7.0)
        if i == 0:
            torch.testing.assert_close(out, d_u + 3.0 * (d_c - d_u))  # outside: plain CFG at fallback_cfg, not the host's 7
    trace = rec.trace()
    assert trace.steps == list(range(10))
    assert trace["active"][:, 0].tolist() == [False, False, True, True, True, True, False, False, False, False]
    assert (trace["w"][2:6, 0] <= 0.9 + 1e-7).all()
    assert (abs(trace["omega"][[0, 1, 6, 9], 0] - 3.0) < 1e-6).all()
    host = AnnealingGuidance(make_guidance_model(), AnnealingOptions(active_start=0.5))  # fallback None: the host's CFG scale
    torch.testing.assert_close(host.guide(sigmas[0], d_c, d_u, sampling="eps", sample_sigmas=sigmas, host_cfg=6.5), d_u + 6.5 * (d_c - d_u))
    with pytest.raises(ValueError, match="sample_sigmas"):
        host.guide(sigmas[0], d_c, d_u, sampling="eps")


def test_recorder_keeps_one_row_per_step_with_intermediate_evaluations(make_guidance_model):
    guide = AnnealingGuidance(make_guidance_model(), AnnealingOptions(mode="per_step"))
    sigmas = ddim_sigmas(5).float()
    d_c, d_u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    rec = GuidanceRecorder()
    for i in range(4):  # a heun-like sequence: each step evaluates at sigma_i, then at sigma_{i+1}; plus one off-grid evaluation
        guide.guide(sigmas[i], d_c, d_u, sampling="eps", sample_sigmas=sigmas, recorder=rec)
        guide.guide(sigmas[i + 1], d_c * 1.1, d_u, sampling="eps", sample_sigmas=sigmas, recorder=rec)
    guide.guide((sigmas[1] * sigmas[2]).sqrt(), d_c, d_u, sampling="eps", sample_sigmas=sigmas, recorder=rec)
    trace = rec.trace()
    assert trace.steps == [0, 1, 2, 3, 4] and trace.evaluations == 9 and trace["w"].shape == (5, 2)
    assert trace["on_schedule"].all()
    rec.reset()
    assert len(rec) == 0 and rec.trace().steps == []


# ------------------------------------------------------------------------------------------------------ hostile input


def test_sigma_zero_huge_latents_and_bad_calls(make_guidance_model):
    guide = AnnealingGuidance(make_guidance_model())
    d_c, d_u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = guide.guide(torch.tensor([0.0, 1.0]), d_c, d_u, sampling="eps")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], d_c[0])  # sigma 0: no guidance (scale 1)
    huge = guide.guide(torch.tensor(1.0), d_c * 1e30, d_u * 1e30, sampling="eps")  # ||delta|| overflows a float32 sum of squares
    assert torch.isfinite(huge).all()
    assert math.isfinite(float(annealing.per_sample_norm(torch.full((1, 65536), 1e30))))
    with pytest.raises(ValueError, match="one per batch item"):
        guide.guide(torch.tensor([1.0, 2.0, 3.0]), d_c, d_u, sampling="eps")
    with pytest.raises(ValueError, match="empty batch"):
        guide.guide(torch.tensor(1.0), torch.zeros(0, 4, 8, 8), torch.zeros(0, 4, 8, 8), sampling="eps")
    with pytest.raises(ValueError, match="same shape"):
        guide.guide(torch.tensor(1.0), d_c, d_u[:1], sampling="eps")
    with pytest.raises(ValueError, match="sampling"):
        guide.guide(torch.tensor(1.0), d_c, d_u, sampling="edm")


def test_guide_never_reads_a_value_back_to_the_host(make_guidance_model):
    """.item(), bool(tensor) and float(tensor) go through aten._local_scalar_dense: on a GPU each one is a device
    synchronisation. The hot path (guide + record) must make none, in every mode. Run on the meta device, which takes the
    accelerator's path (on the CPU a read-back costs nothing, and the norm uses one to skip float64 when it can)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ForbidHostReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
                ForbidHostReads.reads += 1
            return func(*args, **(kwargs or {}))

    sigmas = ddim_sigmas(6).float().to("meta")
    d_c, d_u = torch.randn(2, 4, 8, 8, device="meta"), torch.randn(2, 4, 8, 8, device="meta")
    rec = GuidanceRecorder()
    for mode in ("anchored", "per_step"):
        guide = AnnealingGuidance(make_guidance_model().to("meta"), AnnealingOptions(lam=0.3, mode=mode, w_max=1.2, active_start=0.1, fallback_cfg=2.0))
        with ForbidHostReads():
            for i in range(6):
                guide.guide(sigmas[i].expand(2), d_c, d_u, sampling="eps", sampler=SamplerInfo("euler_ancestral"), sample_sigmas=sigmas,
                            recorder=rec)
    assert ForbidHostReads.reads == 0
    with ForbidHostReads():
        bool(torch.ones(1) > 0)
    assert ForbidHostReads.reads == 1  # the detector does see a host read


def test_guide_copies_nothing_from_the_host_after_its_first_call(make_guidance_model):
    """A host -> device copy synchronises too. On the meta device every tensor of the step must be made there; the grid
    table is copied once, on the first call, and kept."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FindHostCopies(TorchDispatchMode):
        copies = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and any(t.device.type == "cpu" for t in tensors):
                FindHostCopies.copies.append(str(func))
            return func(*args, **(kwargs or {}))

    model = make_guidance_model().to("meta")
    guide = AnnealingGuidance(model, AnnealingOptions(lam=0.3, w_max=1.2, active_start=0.1, fallback_cfg=2.0))
    sigmas = ddim_sigmas(6).float().to("meta")
    d_c, d_u = torch.randn(2, 4, 8, 8, device="meta"), torch.randn(2, 4, 8, 8, device="meta")
    rec = GuidanceRecorder()
    guide.guide(sigmas[1].expand(2), d_c, d_u, sampling="eps", sample_sigmas=sigmas, recorder=rec)  # first call: table to the device
    with FindHostCopies():
        out = guide.guide(sigmas[2].expand(2), d_c, d_u, sampling="eps", sample_sigmas=sigmas, recorder=rec)
        torch.ones(1).to("meta")  # the detector sees a host copy
    assert out.device.type == "meta"
    assert FindHostCopies.copies == ["aten._to_copy.default"], FindHostCopies.copies


# ------------------------------------------------------------------------------------------ sampling-loop equivalence


def ddim_cfgpp_loop(model, den, steps, start, lam):
    """The paper's upstream sampler (docs/design.md, section 2) in DDPM z-space on diffusers' DDIM grid: eps_hat = eps_u + w (eps_c - eps_u),
    z0 = (z - sqrt(1 - abar) eps_hat) / sqrt(abar), z' = sqrt(abar') z0 + sqrt(1 - abar') eps_u (abar' = 1 after the last step)."""
    abar = sd_abar()
    ts = torch.arange(steps - 1, -1, -1) * (1000 // steps)
    z = start * (1 - abar[ts[0]]).sqrt()  # x = z / sqrt(abar) = sigma_0 * start, where the Euler loop starts
    batch = start.shape[0]
    for i, t in enumerate(ts.tolist()):
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0, dtype=torch.float64)
        sigma_k = ((1 - a_t) / a_t).sqrt().expand(batch)
        x = z / a_t.sqrt()
        one = torch.ones(batch, dtype=torch.float64)
        eps_u = (x - den(x, sigma_k, one, False)) / sigma_k.view(-1, 1, 1, 1)
        eps_c = (x - den(x, sigma_k, one, True)) / sigma_k.view(-1, 1, 1, 1)
        norm = (eps_u - eps_c).reshape(batch, -1).norm(dim=1) * math.sqrt(65536 / eps_u[0].numel())
        w = model(torch.full((batch,), float(t)), norm, lam).double().view(-1, 1, 1, 1)
        eps_hat = eps_u + w * (eps_c - eps_u)
        z0 = (z - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
        z = a_prev.sqrt() * z0 + (1 - a_prev).sqrt() * eps_u
    return z


def euler_loop(guide, den, sigmas, start, sampling="eps"):
    """A plain Euler sampler in ComfyUI's x-space fed the guide's D (ordinary sampler: renoises with D)."""
    x = start * sigmas[0] if sampling == "eps" else start
    batch = start.shape[0]
    for i in range(sigmas.shape[0] - 1):
        s = sigmas[i].expand(batch)
        alpha = torch.ones_like(s) if sampling == "eps" else 1 - s
        d = guide.guide(s, den(x, s, alpha, True), den(x, s, alpha, False), sampling=sampling, sample_sigmas=sigmas)
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - d) / sigmas[i]
    return x


@pytest.mark.parametrize("lam", [0.0, 0.4, 1.0])
def test_on_the_training_grid_anchored_euler_is_the_papers_ddim_cfgpp_sampler(make_guidance_model, lam):
    model = make_guidance_model(seed=3)
    den = GaussianDenoiser(SHAPE)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = ddim_cfgpp_loop(model, den, 50, start, lam)
    for mode in ("anchored", "per_step"):
        x = euler_loop(AnnealingGuidance(model, AnnealingOptions(lam=lam, mode=mode)), den, ddim_sigmas(50), start)
        torch.testing.assert_close(x, reference, rtol=1e-5, atol=1e-5)


def test_per_step_at_another_step_count_is_the_ddim_cfgpp_sampler_at_that_count(make_guidance_model):
    model = make_guidance_model(seed=4)
    den = GaussianDenoiser(SHAPE)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reference = ddim_cfgpp_loop(model, den, 20, start, 0.4)
    per_step = euler_loop(AnnealingGuidance(model, AnnealingOptions(mode="per_step")), den, ddim_sigmas(20), start)
    anchored = euler_loop(AnnealingGuidance(model, AnnealingOptions()), den, ddim_sigmas(20), start)
    torch.testing.assert_close(per_step, reference, rtol=1e-5, atol=1e-5)
    assert (anchored - reference).norm() / reference.norm() > 0.05  # anchored is another (step-count independent) reading


def test_anchored_converges_with_steps_where_per_step_does_not(make_guidance_model):
    """Euler at 25/50/100/200 steps against 400 (Karras sigmas from the DDIM grid's ends): anchored converges, per_step grows."""
    model = make_guidance_model(seed=5)
    den = GaussianDenoiser(SHAPE, seed=6)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def sigmas(n):
        s_max, s_min = float(karras(999)), float(karras(0))
        return torch.cat([torch.exp(torch.linspace(math.log(s_max), math.log(s_min), n, dtype=torch.float64)), torch.zeros(1, dtype=torch.float64)])

    def distances(mode):
        guide = AnnealingGuidance(model, AnnealingOptions(mode=mode))
        ref = euler_loop(guide, den, sigmas(400), start)
        return [float((euler_loop(guide, den, sigmas(n), start) - ref).norm() / ref.norm()) for n in (25, 50, 100, 200)]

    anchored, per_step = distances("anchored"), distances("per_step")
    assert all(a > b for a, b in zip(anchored, anchored[1:])) and anchored[-1] < 0.01, anchored
    assert min(per_step) > 10 * anchored[-1], (per_step, anchored)


def test_flow_grid_anchored_euler_is_the_flow_cfgpp_sampler(make_guidance_model):
    grid = FlowGrid(num_steps=12, shift=3.0)
    model = make_guidance_model(grid=grid, convention="sigma_x1000", seed=7)
    den = GaussianDenoiser(SHAPE, seed=3)
    sigmas = grid.sigmas()
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z = start  # flow CFG++: x0 = z - s v_hat; eps_u = z + (1 - s) v_u; z' = (1 - s') x0 + s' eps_u
    for i in range(12):
        s, s_n = sigmas[i], sigmas[i + 1]
        sv = s.expand(2)
        d_u, d_c = den(z, sv, 1 - sv, False), den(z, sv, 1 - sv, True)
        v_u, v_c = (z - d_u) / s, (z - d_c) / s
        norm = (v_u - v_c).reshape(2, -1).norm(dim=1) * math.sqrt(65536 / d_u[0].numel())
        w = model(sv * 1000, norm, 0.4).double().view(-1, 1, 1, 1)
        v_hat = v_u + w * (v_c - v_u)
        z = (1 - s_n) * (z - s * v_hat) + s_n * (z + (1 - s) * v_u)
    x = euler_loop(AnnealingGuidance(model), den, sigmas, start, sampling="const")
    torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-5)


def test_guided_ddim_step_renoises_as_asked_and_refuses_anything_else():
    """renoise="uncond" is the CFG++ step (x0 from the guided noise, renoised with the unconditional one); "guided" renoises
    with the guided noise: z_next = a_n x0_hat + s_n eps_hat, written out here from the DDIM formulas."""
    from annealing.guidance import cfgpp_step, guided_ddim_step

    gen = torch.Generator().manual_seed(3)
    z, e_u, e_c = (torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    a, s, a_n, s_n, w = (torch.tensor([0.6, 0.8], dtype=torch.float64), torch.tensor([0.8, 0.6], dtype=torch.float64),
                         torch.tensor([0.7, 0.9], dtype=torch.float64), torch.tensor([0.71, 0.43], dtype=torch.float64),
                         torch.tensor([2.0, 0.5], dtype=torch.float64))

    def view(v):
        return v.view(-1, 1, 1, 1)

    e_hat = e_u + view(w) * (e_c - e_u)
    x0_hat = (z - view(s) * e_hat) / view(a)
    guided = guided_ddim_step(z, e_u, e_c, w, a, s, a_n, s_n, renoise="guided")[0]
    torch.testing.assert_close(guided, view(a_n) * x0_hat + view(s_n) * e_hat)
    torch.testing.assert_close(cfgpp_step(z, e_u, e_c, w, a, s, a_n, s_n)[0], view(a_n) * x0_hat + view(s_n) * e_u)
    with pytest.raises(ValueError, match="renoise must be"):
        guided_ddim_step(z, e_u, e_c, w, a, s, a_n, s_n, renoise="cond")
