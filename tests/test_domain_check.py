"""Nothing a checkpoint or a setting can do makes the guided prediction inf, NaN or silently unguided (issue 22):

* at load time a network must give a finite w (or Learn to Guide omega) of magnitude at most W_LIMIT over its whole domain
  (annealing/domain_check.py), checked here over random architectures and grids (the property), and for what it refuses;
* at sampling time a w that is not finite or beyond W_LIMIT is replaced by plain CFG at the fallback scale, and recorded;
* the guide is built once and moved between devices with ``.to``; its per-evaluation path does not check lambda again.

Expected values are written here from the formulas (D = D_u + s (D_c - D_u); plain CFG outside the MLP's domain)."""

from __future__ import annotations

import math
import random

import pytest
import torch

import annealing
from annealing import AnnealingGuidance, AnnealingOptions, CheckpointError, CheckpointMetadata, FlowGrid, GuidanceRecorder, VPGrid
from annealing.domain_check import DELTA_MULTIPLES, MAX_DELTA_NORM_MULTIPLE, check_domain, learned_domain_points, probe_sigmas
from annealing.model import W_LIMIT
from annealing.training_grid import GridLookup

SHAPE = (2, 4, 8, 8)


def _random_grid(rng: random.Random):
    steps = rng.choice([1, 2, 5, 10, 20, 28, 50, 100])
    if rng.random() < 0.5:
        start = 10 ** rng.uniform(-5, -3)  # real schedules: 0.0001 to 0.00085, ending at 0.012 to 0.02
        grid = VPGrid(num_steps=steps, spacing=rng.choice(["leading", "trailing", "linspace"]),
                      beta_schedule=rng.choice(["scaled_linear", "linear"]), beta_start=start, beta_end=min(start * 10 ** rng.uniform(0, 2), 0.03),
                      steps_offset=rng.choice([0, 1]))
        return grid, "ddpm_index", "epsilon"
    grid = FlowGrid(num_steps=steps, shift=10 ** rng.uniform(-1, 1.5), spacing=rng.choice(["diffusers", "simple"]))
    return grid, rng.choice(["sigma_x1000", "sigma"]), "velocity"


def _random_model(rng: random.Random, seed: int):
    """A random valid architecture and grid, with weights at a random scale (default init x 10^0..10^2.5): some give w far
    beyond W_LIMIT and must be refused."""
    grid, convention, space = _random_grid(rng)
    config = annealing.GuidanceModelConfig(
        hidden_size=rng.choice([1, 4, 16, 32]), n_layers=rng.randint(0, 3), t_embed_dim=rng.randint(1, 6), delta_embed_dim=rng.randint(1, 6),
        lambda_embed_dim=rng.randint(1, 6), t_embed_normalization=10 ** rng.uniform(-2, 4) * rng.choice([1, -1]),
        delta_embed_normalization=10 ** rng.uniform(-3, 3), w_scale=10 ** rng.uniform(-2, 1), w_bias=rng.uniform(-5, 5))
    meta = CheckpointMetadata(model_family="sd3" if space == "velocity" else "sdxl", prediction_space=space, timestep_convention=convention,
                              training_grid=grid)
    torch.manual_seed(seed)
    model = annealing.GuidanceScaleModel(config, meta)
    scale = 10 ** rng.uniform(0, 2.5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    return model.eval().requires_grad_(False)


def _random_domain_points(model, rng: random.Random, count: int = 256):
    """Points of the domain other than the check's own: random sigmas over the grid's range and beyond, log-uniform delta
    norms up to the guide's clamp, uniform lambda."""
    meta = model.metadata
    sigmas = meta.training_grid.sigmas()[:-1]
    low, high = math.log(float(sigmas.min())) - 1.0, math.log(float(sigmas.max())) + 1.0
    sigma = torch.tensor([math.exp(rng.uniform(low, high)) for _ in range(count)], dtype=torch.float32)
    if meta.training_grid.kind == "flow":
        sigma = sigma.clamp(max=1.0)
    timestep = GridLookup(meta.training_grid, meta.timestep_convention)(sigma)[0]
    norm = model.config.delta_embed_normalization
    delta = torch.tensor([norm * 10 ** rng.uniform(-4, 4) for _ in range(count)], dtype=torch.float32)
    lam = torch.tensor([rng.random() for _ in range(count)], dtype=torch.float32)
    return timestep, delta, lam


def test_every_checkpoint_that_loads_gives_finite_w_over_its_domain(tmp_path):
    """The property: over random valid architectures (hidden size, layers, embedding widths, normalisations, output scale)
    and random valid grids (VP and flow, 1 to 100 steps, every spacing, shifts, betas), a saved checkpoint either is refused
    with one CheckpointError line, or gives a finite w at random points of its domain that the check never evaluated, and
    the guide's output is finite for every sigma and delta norm."""
    rng = random.Random(20260522)
    loaded = refused = 0
    for case in range(40):
        model = _random_model(rng, seed=case)
        path = tmp_path / f"case{case}.safetensors"
        annealing.save_guidance_model(model, path)
        try:
            back = annealing.load_guidance_model(path)
        except CheckpointError as exc:
            message = str(exc)
            assert "\n" not in message and str(path) in message and ("w is" in message or "invalid" in message), message
            refused += 1
            continue
        loaded += 1
        w = back(*_random_domain_points(back, rng))
        assert torch.isfinite(w).all(), (case, back.config, back.metadata.training_grid)
        grid = back.metadata.training_grid
        sample_sigmas = grid.sigmas().float()
        guide = AnnealingGuidance(back, AnnealingOptions(lam=rng.random()))
        d_c, d_u = torch.randn(SHAPE) * 10 ** rng.uniform(-3, 3), torch.randn(SHAPE)
        for sigma in sample_sigmas[:: max(1, len(sample_sigmas) // 6)]:
            out = guide.guide(sigma, d_c, d_u, sampling=grid.sampling, sample_sigmas=sample_sigmas, host_cfg=5.0)
            assert torch.isfinite(out).all(), (case, float(sigma))
    assert loaded >= 12 and refused >= 4, (loaded, refused)  # both outcomes happen: the property is not vacuous


def test_the_check_covers_the_grid_the_points_between_and_the_ends():
    grid = VPGrid()  # timesteps 980, 960, ..., 0 on SD's betas
    lookup = GridLookup(grid, "ddpm_index")
    timesteps = lookup(probe_sigmas(grid).float())[0]
    assert len(timesteps) == 2 + 50 + 49  # the two ends a sampler can reach, every grid point and each midpoint
    assert float(timesteps.max()) == pytest.approx(999.0, abs=1e-2) and float(timesteps.min()) == pytest.approx(0.0, abs=1e-2)
    on_grid = set(range(0, 981, 20))
    assert on_grid <= {round(float(t)) for t in timesteps}
    assert any(abs(float(t) - 970.0) < 2.0 for t in timesteps)  # between 980 and 960
    assert DELTA_MULTIPLES[0] == 0.0 and DELTA_MULTIPLES[1] == 1e-3 and DELTA_MULTIPLES[-1] == MAX_DELTA_NORM_MULTIPLE == 1e3
    flow = probe_sigmas(FlowGrid(num_steps=10))
    assert float(flow.max()) == 1.0 and float(flow.min()) == pytest.approx(1e-4)


def _annealing_model(**config):
    torch.manual_seed(0)
    return annealing.GuidanceScaleModel(annealing.GuidanceModelConfig(hidden_size=8, n_layers=1, **config), CheckpointMetadata()).eval()


def test_a_w_beyond_the_limit_anywhere_in_the_domain_is_refused_naming_the_point(tmp_path):
    model = _annealing_model()
    check_domain(model)  # a small random model is fine
    with torch.no_grad():
        model.combined_head[-1].weight.zero_()
        model.combined_head[-1].bias.fill_(W_LIMIT + 10)  # w = 10011 everywhere
    with pytest.raises(CheckpointError, match=r"w is 10011 at timestep 999, \|\|delta\|\| 0, lambda 0: .* at most 10000"):
        check_domain(model, tmp_path / "x.safetensors")
    # only at large delta norms: w = 1 + 20 ||delta|| / 5 passes W_LIMIT at ||delta|| 2500
    model = _annealing_model()
    with torch.no_grad():
        for layer in model.combined_head:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        model.combined_head[0].weight[0, 4] = 1.0  # the raw ||delta|| / delta_norm feature
        model.combined_head[2].weight[0, 0] = 1.0
        model.combined_head[4].weight[0, 0] = 20.0
    w = model(torch.tensor([500.0, 500.0]), torch.tensor([5.0, 500.0]), 0.4)
    torch.testing.assert_close(w, torch.tensor([21.0, 2001.0]))
    # the worst point is named: ||delta|| at the guide's clamp, 1000 times the normalisation
    with pytest.raises(CheckpointError, match=r"w is 20001 at timestep 999, \|\|delta\|\| 5000, lambda 0"):
        check_domain(model)


def test_learn_to_guide_omega_is_checked_over_the_grids_pairs_and_prompts(tmp_path):
    meta = CheckpointMetadata(method="learn_to_guide")
    torch.manual_seed(0)
    config = annealing.LearnToGuideConfig(prompt_dim=16, hidden_size=16, n_layers=0)
    net = annealing.LearnToGuideNet(config, meta).eval().requires_grad_(False)
    check_domain(net)
    path = tmp_path / "l2g.safetensors"
    annealing.save_guidance_model(net, path)
    annealing.load_guidance_model(path)
    first_prompt_feature = 2 * config.time_embed_dim  # the head's input: t's and s's time features, then the projected prompt
    with torch.no_grad():  # omega = relu(|10^6 * sum(prompt)|): huge for any prompt but the zero one
        for parameter in net.parameters():
            parameter.zero_()
        net.prompt_projection.weight[0] = 1e6
        net.head[0].weight[0, first_prompt_feature], net.head[0].weight[1, first_prompt_feature] = 1.0, -1.0
        net.head[-1].weight[0, :2] = 1.0
    assert float(net(500.0, 480.0, torch.zeros(16))) == 0.0  # relu: unguided, exactly
    assert float(net(500.0, 480.0, -torch.ones(16))) == pytest.approx(16e6)
    annealing.save_guidance_model(net, path)
    with pytest.raises(CheckpointError, match=r"omega is .* with a random prompt embedding of norm") as excinfo:
        annealing.load_guidance_model(path)
    assert str(path) in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_learn_to_guide_check_covers_the_2d_region_of_steps_down_to_length_zero(tmp_path):
    """A network trained on continuous (s, t) is used for any step a sampler takes, also steps far shorter than its grid's
    (and than its training's minimum gap): the check pairs every t with itself (the region's diagonal edge), the grid's
    next point, clean data and later grid points, and refuses a network that blows up only on very short steps."""
    meta = CheckpointMetadata(method="learn_to_guide")
    config = annealing.LearnToGuideConfig(prompt_dim=4, hidden_size=1, n_layers=0, time_hidden=1, time_embed_dim=1)
    net = annealing.LearnToGuideNet(config, meta).eval().requires_grad_(False)
    t, s = learned_domain_points(net)
    grid = meta.training_grid
    lookup = annealing.GridLookup(grid, "ddpm_index")
    steps = lookup.timestep(probe_sigmas(grid).float())
    pairs = set(zip(t.tolist(), s.tolist()))
    assert all((a, a) in pairs and (a, -1.0) in pairs for a in steps.tolist())  # steps of length 0, and to clean data
    grid_t = lookup.timestep(grid.sigmas()[:-1].float())
    assert all((a, b) in pairs for a, b in zip(grid_t[:-1].tolist(), grid_t[1:].tolist()))  # the grid's own steps

    # omega = 1e9 relu(eps - (lambda_s - lambda_t)): beyond the limit only for steps whose log-SNR gap is below eps, here a
    # tenth of the shortest gap between any two probes (a 500-step sampler's steps)
    lam = net.log_snr
    gaps = (lam(steps[1:]) - lam(steps[:-1])).abs()
    eps = 0.1 * float(gaps[gaps > 1e-3].min())  # (the ends' probes clamp to the same time: their gap is 0)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.zero_()
        net.time_embedding[0].weight.fill_(1.0)
        net.time_embedding[0].bias.fill_(10.0)  # lambda + 10 > 0 over the whole schedule: the ReLU passes it
        net.time_embedding[2].weight.fill_(1.0)  # feature = lambda + 10
        net.head[0].weight[0, 0], net.head[0].weight[0, 1], net.head[0].bias[0] = 1.0, -1.0, eps  # eps - (lambda_s - lambda_t)
        net.head[-1].weight.fill_(1e9)
    assert float(net(steps[10], steps[11], torch.zeros(4))) == 0.0  # half a grid step: fine
    path = tmp_path / "short.safetensors"
    annealing.save_guidance_model(net, path)
    with pytest.raises(CheckpointError, match="omega is .* at t (.*), s \\1 with"):
        annealing.load_guidance_model(path)


# ------------------------------------------------------------------------------------------------------ sampling time


def _delta_switch_model(threshold_scale: float):
    """w = 1 + threshold_scale * relu(||delta|| / 5): in range at small delta norms, beyond W_LIMIT (or inf) at large ones.
    Built in memory, so no load-time check stands between it and the guide."""
    model = annealing.GuidanceScaleModel(annealing.GuidanceModelConfig(hidden_size=1, n_layers=0), CheckpointMetadata())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.combined_head[0].weight[0, 4] = 1.0  # the raw ||delta|| / 5 feature (after the 4 timestep features)
        model.combined_head[2].weight[0, 0] = threshold_scale
    return model.eval().requires_grad_(False)


def test_a_w_outside_the_domain_falls_back_to_plain_cfg_per_sample_and_is_recorded():
    sigmas = VPGrid(num_steps=10).sigmas().float()
    torch.manual_seed(3)
    d_u = torch.randn(SHAPE)
    d_c = d_u.clone()
    d_c[1] += torch.randn(SHAPE[1:])  # sample 0: D_c = D_u (delta 0, w = 1); sample 1: a real delta
    for threshold, word in ((1e37, "inf"), (1e6, "beyond the limit")):
        model = _delta_switch_model(threshold)
        recorder = GuidanceRecorder()
        guide = AnnealingGuidance(model, AnnealingOptions(mode="as_is"))
        out = guide.guide(sigmas[3].expand(2), d_c, d_u, sampling="eps", host_cfg=6.0, recorder=recorder, sample_sigmas=sigmas)
        assert torch.isfinite(out).all(), word
        torch.testing.assert_close(out[0], d_u[0])  # w = 1, as_is: D_u + 1 * 0
        torch.testing.assert_close(out[1], d_u[1] + 6.0 * (d_c[1] - d_u[1]))  # plain CFG at the host's cfg
        trace = recorder.trace()
        assert trace["fallback"][0].tolist() == [False, True], word
        assert trace["omega"][0, 1] == pytest.approx(6.0) and trace.fallback_sigmas == [pytest.approx(float(sigmas[3]))]
        summary = trace.fallback_summary()
        assert summary.startswith("the guidance scale was not finite or beyond 10000 in 1 of 1 evaluations (sigma ") and "plain CFG" in summary
    # the options' fallback_cfg, when set, is the plain CFG scale used
    out = AnnealingGuidance(_delta_switch_model(1e37), AnnealingOptions(mode="as_is", fallback_cfg=2.5)).guide(
        sigmas[3].expand(2), d_c, d_u, sampling="eps", host_cfg=6.0)
    torch.testing.assert_close(out[1], d_u[1] + 2.5 * (d_c[1] - d_u[1]))
    # a NaN w (a NaN prediction) falls back too, instead of silently becoming scale 1
    nan_c = d_c.clone()
    nan_c[1, 0, 0, 0] = float("nan")
    recorder = GuidanceRecorder()
    AnnealingGuidance(_delta_switch_model(1.0), AnnealingOptions()).guide(sigmas[3].expand(2), nan_c, d_u, sampling="eps", host_cfg=6.0,
                                                                         recorder=recorder)
    assert recorder.trace()["fallback"][0].tolist() == [False, True]
    clean = GuidanceRecorder()
    AnnealingGuidance(_delta_switch_model(1.0), AnnealingOptions()).guide(sigmas[3], d_c, d_u, sampling="eps", recorder=clean)
    assert not clean.trace()["fallback"].any() and clean.trace().fallback_summary() is None


def test_fallbacks_are_counted_over_every_evaluation_not_only_the_rows_the_trace_keeps():
    sigmas = VPGrid(num_steps=6).sigmas().float()
    guide = AnnealingGuidance(_delta_switch_model(1e37), AnnealingOptions())
    recorder = GuidanceRecorder()
    d_u = torch.randn(1, 4, 8, 8)
    for i in range(5):  # heun-like: two evaluations per step, the second at the next step's sigma
        guide.guide(sigmas[i], d_u + 1, d_u, sampling="eps", sample_sigmas=sigmas, host_cfg=4.0, recorder=recorder)
        guide.guide(sigmas[i + 1], d_u + 1, d_u, sampling="eps", sample_sigmas=sigmas, host_cfg=4.0, recorder=recorder)
    trace = recorder.trace()
    assert trace.evaluations == 10 and len(trace.fallback_sigmas) == 10  # sigma 0 gets no guidance at all, so it never falls back
    assert len(trace.steps) < 10
    assert "in 10 of 10 evaluations" in trace.fallback_summary()


def test_a_host_cfg_that_is_not_finite_is_refused_naming_cfg(make_guidance_model):
    sigmas = VPGrid(num_steps=10).sigmas().float()
    d_c, d_u = torch.randn(SHAPE), torch.randn(SHAPE)
    ranged = AnnealingGuidance(make_guidance_model(), AnnealingOptions(active_start=0.3))
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match=r"^cfg \(the sampler's CFG scale.* must be a finite number, got"):
            ranged.guide(sigmas[0].expand(2), d_c, d_u, sampling="eps", sample_sigmas=sigmas, host_cfg=bad)
    out = AnnealingGuidance(make_guidance_model(), AnnealingOptions(active_start=0.3, fallback_cfg=3.0)).guide(
        sigmas[0].expand(2), d_c, d_u, sampling="eps", sample_sigmas=sigmas, host_cfg=math.inf)  # the host's cfg is unused
    torch.testing.assert_close(out, d_u + 3.0 * (d_c - d_u))


# ---------------------------------------------------------------------------------------------------- one guide, .to


def test_the_guide_is_built_once_and_moved_with_to(make_guidance_model):
    model = make_guidance_model()
    guide = AnnealingGuidance(model, AnnealingOptions(lam=0.3))
    assert guide.device == torch.device("cpu") and guide.to("cpu") is guide and guide.to(torch.device("cpu")) is guide
    on_meta = guide.to("meta")
    assert on_meta is not guide and on_meta.to("meta") is on_meta and guide.to("meta") is on_meta  # made once, kept
    assert on_meta.device.type == "meta" and on_meta.options is guide.options and on_meta.lookup is guide.lookup
    assert all(p.dtype == torch.float32 and p.device.type == "meta" for p in on_meta.model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model it was built with never moves
    assert on_meta.to("cpu") is guide
    # a half-precision network gets a float32 copy where it computes; the results equal the float32 model's
    half = AnnealingGuidance(make_guidance_model().half(), AnnealingOptions(lam=0.3))
    moved = half.to("cpu")
    assert moved is not half and all(p.dtype == torch.float32 for p in moved.model.parameters())
    sigma, d_c, d_u = torch.tensor([3.0, 0.5]), torch.randn(SHAPE), torch.randn(SHAPE)
    torch.testing.assert_close(half.guide(sigma, d_c, d_u, sampling="eps"), moved.guide(sigma, d_c, d_u, sampling="eps"))
    # guide() follows its predictions: meta predictions are a dry run on the meta copy
    out = guide.guide(sigma.to("meta"), d_c.to("meta"), d_u.to("meta"), sampling="eps")
    assert out.device.type == "meta" and out.shape == SHAPE


def test_lambda_is_checked_once_when_the_options_are_built(make_guidance_model, monkeypatch):
    import annealing.guidance
    import annealing.model

    options = AnnealingOptions(lam=0.3)
    guide = AnnealingGuidance(make_guidance_model(), options)
    calls = []
    monkeypatch.setattr(annealing.model, "check_lambda", lambda lam: calls.append(lam))
    monkeypatch.setattr(annealing.guidance, "check_lambda", lambda lam: calls.append(lam))
    for sigma in (5.0, 1.0, 0.2):
        guide.guide(torch.tensor([sigma]), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), sampling="eps")
    assert calls == []  # the per-evaluation path does not check lambda again
    guide.model(500.0, 5.0, 0.3)  # the model's public forward still checks, for direct callers
    assert calls == [0.3]
    AnnealingOptions(lam=0.5)
    assert calls == [0.3, 0.5]


# ----------------------------------------------------------------------------------------------- documented error types


def test_the_models_inputs_fail_with_one_valueerror(make_guidance_model):
    model = make_guidance_model()
    for args, words in [((torch.zeros(0), torch.zeros(0), 0.4), "timestep has no elements"),
                        ((500.0, torch.zeros(0), 0.4), "delta_norm has no elements"),
                        ((torch.zeros(2, device="meta"), torch.ones(2), 0.4), "timestep is a tensor on the meta device"),
                        ((500.0, 5.0, torch.zeros(1, device="meta")), "lam is a tensor on the meta device"),
                        ((10**400, 5.0, 0.4), "timestep must be a finite number, got an integer of about 401 digits"),
                        ((500.0, math.inf, 0.4), "delta_norm must be a finite number, got inf"),
                        ((500.0, 5.0, 10**400), "lambda must be a number in")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(")):
            model(*args)
    assert make_guidance_model().to("meta")(torch.zeros(2, device="meta"), torch.ones(2, device="meta"), 0.4).device.type == "meta"


def test_learn_to_guide_inputs_fail_with_one_valueerror():
    torch.manual_seed(0)
    net = annealing.LearnToGuideNet(annealing.LearnToGuideConfig(prompt_dim=8, hidden_size=8), CheckpointMetadata(method="learn_to_guide"))
    assert net(500.0, 480.0, torch.zeros(8)).shape == (1,)  # scalar t and s (this raised TypeError from max())
    for args, words in [((10**400, 1.0, torch.zeros(8)), "t must be a finite number"),
                        ((torch.zeros(2, device="meta"), 1.0, torch.zeros(8)), "t is a tensor on the meta device"),
                        ((1.0, 1.0, torch.zeros(8, device="meta")), "prompt is a tensor on the meta device"),
                        ((1.0, 1.0, torch.zeros(0, 8)), "prompt has no elements"),
                        ((torch.zeros(0), 1.0, torch.zeros(8)), "t has no elements")]:
        with pytest.raises(ValueError, match=words):
            net(*args)


def test_the_guides_inputs_fail_with_one_valueerror(make_guidance_model):
    guide = AnnealingGuidance(make_guidance_model(), AnnealingOptions(mode="per_step"))
    d_c, d_u = torch.randn(SHAPE), torch.randn(SHAPE)
    cases = [
        (dict(sigma=10**400), "sigma must be a finite number"),
        (dict(sigma=torch.ones(2, device="meta")), "sigma is a tensor on the meta device"),
        (dict(d_uncond=d_u.to("meta")), "d_uncond is a tensor on the meta device"),
        (dict(sample_sigmas=torch.zeros(0)), r"sample_sigmas \(the sampler's schedule\) must be a tensor of at least one sigma"),
        (dict(sample_sigmas=torch.ones(3, device="meta")), "sample_sigmas is a tensor on the meta device"),
        (dict(d_cond=torch.zeros(0, 4), d_uncond=torch.zeros(0, 4)), "empty batch"),
    ]
    for changes, words in cases:
        call = dict(sigma=torch.ones(2), d_cond=d_c, d_uncond=d_u, sample_sigmas=torch.tensor([2.0, 1.0, 0.0]))
        call.update(changes)
        with pytest.raises(ValueError, match=words):
            guide.guide(call["sigma"], call["d_cond"], call["d_uncond"], sampling="eps", sample_sigmas=call["sample_sigmas"])
    with pytest.raises(ValueError, match="at least one sigma"):
        annealing.locate_on_schedule(torch.ones(1), torch.zeros(0))
    ranged = AnnealingGuidance(make_guidance_model(), AnnealingOptions(active_start=0.5))
    with pytest.raises(ValueError, match="at least one sigma"):
        ranged.guide(torch.ones(2), d_c, d_u, sampling="eps", sample_sigmas=torch.zeros(0))
