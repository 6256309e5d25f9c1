"""Learn to Guide in the core: the network omega(t, s, c) (ReLU output over the log-SNR of t and s), its checkpoints (the
earlier softplus / cosine ones too), and how the guide applies it: the step's CFG scale 1 + omega, with s where the
sampler's own step ends (sigma_down for ancestral samplers) for a network trained on continuous (s, t), in anchored and
per_step alike; the training grid's next point for an earlier one in anchored mode."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hostile_files import our_metadata, write_safetensors

import annealing
from annealing import AnnealingGuidance, AnnealingOptions, CheckpointMetadata, LearnToGuideConfig, LearnToGuideNet, SamplerInfo, VPGrid
from annealing.errors import CheckpointError
from annealing.scale_rule import describe_rule, learned_s_from


def sd_abar() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def sd_sigmas() -> torch.Tensor:
    abar = sd_abar()
    return ((1 - abar) / abar).sqrt()


def l2g_model(seed=0, prompt_dim=16, kind="pooled", grid=None, convention="ddpm_index", **config):
    torch.manual_seed(seed)
    meta = CheckpointMetadata(model_family="sdxl" if convention == "ddpm_index" else "sd3", timestep_convention=convention,
                              prediction_space="epsilon" if convention == "ddpm_index" else "velocity", training_grid=grid,
                              method="learn_to_guide")
    net = LearnToGuideNet(LearnToGuideConfig(prompt_dim=prompt_dim, prompt_embedding=kind, hidden_size=32, **config), meta).eval()
    with torch.no_grad():  # omega of a few, as trained networks give: above the ReLU's kink, so it depends on every input
        net.head[-1].bias.add_(2.0)
    return net


def guided(d_c, d_u, scale):
    return d_u + scale.view(-1, 1, 1, 1) * (d_c - d_u)


def test_the_network_gives_a_non_negative_omega_per_sample_and_zero_is_reachable():
    model = l2g_model()
    prompt = torch.randn(3, 16)
    omega = model(torch.tensor([900.0, 500.0, 20.0]), torch.tensor([880.0, 480.0, -1.0]), prompt)
    assert omega.shape == (3,) and (omega >= 0).all()
    # one prompt for the batch broadcasts; a prompt of the wrong width is a clear error
    assert model(torch.tensor([900.0, 500.0]), 480.0, prompt[:1]).shape == (2,)
    with pytest.raises(ValueError, match="prompt embedding must be of shape"):
        model(500.0, 480.0, torch.randn(1, 8))
    assert set(model.state_dict()) == set(model.config.expected_shapes())
    for key, shape in model.config.expected_shapes().items():
        assert tuple(model.state_dict()[key].shape) == shape
    # the ReLU output reaches omega = 0, and the guide then applies CFG scale 1: the conditional prediction, unguided
    with torch.no_grad():
        model.head[-1].bias.fill_(-1e3)
    assert torch.equal(model(torch.tensor([900.0, 20.0]), torch.tensor([880.0, -1.0]), prompt[:2]), torch.zeros(2))
    schedule = torch.cat([sd_sigmas()[torch.tensor([900, 500, 100])].float(), torch.zeros(1)])
    d_c, d_u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = AnnealingGuidance(model).guide(schedule[:2], d_c, d_u, sampling="eps", sample_sigmas=schedule, prompt=prompt[:2])
    torch.testing.assert_close(out, d_c)


def test_the_time_input_is_the_log_snr_of_the_schedule_clamped_to_the_trained_region():
    """lambda = log(abar / (1 - abar)) at DDPM timesteps (interpolated in log sigma between them, as ComfyUI does), and
    2 log((1 - sigma) / sigma) for flow sigma x 1000; u = t / 1000 is clamped to [time_min, time_max] first."""
    model = l2g_model(time_min=0.01, time_max=0.95)
    abar = sd_abar()
    steps = torch.tensor([10.0, 500.0, 950.0])
    torch.testing.assert_close(model.log_snr(steps), (abar[steps.long()] / (1 - abar[steps.long()])).log().float(), rtol=1e-5, atol=1e-5)
    half = model.log_snr(torch.tensor([500.5]))
    log_sigma = 0.5 * (sd_sigmas()[500].log() + sd_sigmas()[501].log())
    assert float(half) == pytest.approx(float(-2 * log_sigma), rel=1e-5)
    clamped = model.log_snr(torch.tensor([-1.0, 3.0, 999.0]))  # clean data and t = 3 read as u = 0.01; t = 999 as 0.95
    torch.testing.assert_close(clamped, model.log_snr(torch.tensor([10.0, 10.0, 950.0])))
    flow = l2g_model(grid=annealing.FlowGrid(num_steps=10), convention="sigma_x1000")
    sigma = torch.tensor([0.2, 0.7])
    torch.testing.assert_close(flow.log_snr(sigma * 1000), 2 * ((1 - sigma) / sigma).log(), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(flow.log_snr(torch.tensor([0.0, 1000.0]))).all()  # clean data and pure noise: clamped, finite

    # the forward pass, written out: relu(head([phi(lambda_t), phi(lambda_s), W c + b])) with one MLP phi for both times
    prompt = torch.randn(2, 16)
    t, s = torch.tensor([700.0, 100.0]), torch.tensor([400.0, -1.0])
    with torch.no_grad():
        state = {k: v.double() for k, v in model.state_dict().items()}

        def phi(lam):
            hidden = torch.relu(lam.double()[:, None] @ state["time_embedding.0.weight"].T + state["time_embedding.0.bias"])
            return hidden @ state["time_embedding.2.weight"].T + state["time_embedding.2.bias"]

        x = torch.cat([phi(model.log_snr(t)), phi(model.log_snr(s)), prompt.double() @ state["prompt_projection.weight"].T
                       + state["prompt_projection.bias"]], dim=1)
        for i in range(model.config.n_layers + 1):
            x = torch.relu(x @ state[f"head.{2 * i}.weight"].T + state[f"head.{2 * i}.bias"])
        last = 2 * (model.config.n_layers + 1)
        expected = torch.relu(x @ state[f"head.{last}.weight"].T + state[f"head.{last}.bias"])[:, 0]
        torch.testing.assert_close(model(t, s, prompt).double(), expected, rtol=1e-5, atol=1e-6)


def test_config_bounds_and_unknown_fields():
    for bad in ({"prompt_dim": 0}, {"prompt_dim": 10**6}, {"hidden_size": 10**5}, {"prompt_embedding": "cls"}, {"t_embed_normalization": 0.0},
                {"output": "tanh"}, {"time_input": "fourier"}, {"trained_s": "grid"}, {"time_min": 0.0}, {"time_max": 1.0},
                {"time_min": 0.5, "time_max": 0.4}, {"time_hidden": 0}):
        with pytest.raises(ValueError):
            LearnToGuideConfig(**bad)
    with pytest.raises(ValueError, match="unknown architecture field"):
        LearnToGuideConfig.from_dict({"prompt_dim": 8, "layers": 3})


def test_checkpoint_round_trip_tells_the_method(tmp_path):
    model = l2g_model(seed=3)
    path = tmp_path / "l2g.safetensors"
    annealing.save_guidance_model(model, path)
    loaded = annealing.load_guidance_model(path)
    assert isinstance(loaded, LearnToGuideNet) and loaded.metadata.method == "learn_to_guide"
    assert loaded.config == model.config and loaded.metadata.training_grid == VPGrid()
    assert (loaded.config.output, loaded.config.time_input, loaded.config.trained_s) == ("relu", "log_snr", "continuous")
    args = (torch.tensor([700.0]), torch.tensor([680.0]), torch.randn(1, 16))
    torch.testing.assert_close(loaded(*args), model(*args))
    with pytest.raises(CheckpointError, match="method"):  # weights of one method under the other's metadata
        annealing.save_guidance_model(model, tmp_path / "x.safetensors", model.metadata.replace(method="annealing"))


# ------------------------------------------------------------------------------------------------ an earlier checkpoint


#: The architecture an earlier pack (0.2.0) wrote for a Learn to Guide network: no output, time_input, trained_s fields.
LEGACY_ARCHITECTURE = {"prompt_dim": 16, "prompt_embedding": "pooled", "projection_size": 32, "hidden_size": 32, "n_layers": 2,
                       "time_embed_dim": 4, "t_embed_normalization": 1000.0}


def legacy_checkpoint(path, seed=5):
    """A file as pack 0.2.0 wrote it: cosine features of t / 1000 and s / 1000 (4 each), the projected prompt, a ReLU head,
    softplus at the end; its weights random."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"prompt_projection.weight": (32, 16), "prompt_projection.bias": (32,), "head.0.weight": (32, 40), "head.0.bias": (32,),
              "head.2.weight": (32, 32), "head.2.bias": (32,), "head.4.weight": (32, 32), "head.4.bias": (32,), "head.6.weight": (1, 32),
              "head.6.bias": (1,)}
    state = {k: 0.3 * torch.randn(shape, generator=gen) for k, shape in shapes.items()}
    training = {"method": "learn-to-guide (Galashov et al., arXiv 2510.00815)", "step_to": "the training grid's next point (clean data after the last)"}
    write_safetensors(path, state, our_metadata(architecture=json.dumps(LEGACY_ARCHITECTURE), method="learn_to_guide",
                                                training=json.dumps(training)))
    return state


def legacy_omega(state, t, s, prompt):
    """softplus(head([e(t / 1000), e(s / 1000), W c + b])), e(v) = [v, cos v, cos 2v, cos 3v]: the earlier network, by hand."""
    def e(v):
        v = v.double() / 1000
        return torch.stack([v, torch.cos(v), torch.cos(2 * v), torch.cos(3 * v)], dim=1)

    d = {k: v.double() for k, v in state.items()}
    x = torch.cat([e(t), e(s), prompt.double() @ d["prompt_projection.weight"].T + d["prompt_projection.bias"]], dim=1)
    for i in range(3):
        x = torch.relu(x @ d[f"head.{2 * i}.weight"].T + d[f"head.{2 * i}.bias"])
    return torch.nn.functional.softplus(x @ d["head.6.weight"].T + d["head.6.bias"])[:, 0]


def test_an_earlier_softplus_cosine_checkpoint_loads_and_gives_the_same_omega(tmp_path):
    path = tmp_path / "legacy.safetensors"
    state = legacy_checkpoint(path)
    model = annealing.load_guidance_model(path)
    assert (model.config.output, model.config.time_input, model.config.trained_s) == ("softplus", "cosine", "grid_next")
    t, s, prompt = torch.tensor([980.0, 501.5, 0.0]), torch.tensor([960.0, 480.0, -1.0]), torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(t, s, prompt).double(), legacy_omega(state, t, s, prompt), rtol=1e-5, atol=1e-6)
    # and the guide applies it as before: anchored takes s from its training grid (700 -> 680), per_step from the sampler
    sigma = sd_sigmas()[torch.tensor([700])].float()
    d_c, d_u = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    out = AnnealingGuidance(model).guide(sigma, d_c, d_u, sampling="eps", prompt=prompt[:1])
    scale = 1 + legacy_omega(state, torch.tensor([700.0]), torch.tensor([680.0]), prompt[:1]).float()
    torch.testing.assert_close(out, guided(d_c, d_u, scale), rtol=1e-4, atol=1e-5)
    # re-saved, it keeps its architecture (and stays loadable by itself)
    annealing.save_guidance_model(model, tmp_path / "again.safetensors")
    assert annealing.load_guidance_model(tmp_path / "again.safetensors").config == model.config


# ------------------------------------------------------------------------------------------------ where s comes from


def test_where_s_comes_from_follows_what_the_network_was_trained_on():
    assert learned_s_from("anchored", "continuous") == learned_s_from("per_step", "continuous") == "sampler"
    assert (learned_s_from("anchored", "grid_next"), learned_s_from("per_step", "grid_next")) == ("training_grid", "sampler")
    assert "end of the sampler's own step" in describe_rule("anchored", "euler", "50-step grid", "continuous")
    assert "sigma_down" in describe_rule("anchored", "euler_ancestral", "50-step grid", "continuous")
    assert "next point of the 50-step grid" in describe_rule("anchored", "euler", "50-step grid", "grid_next")


def test_a_continuous_network_takes_s_from_the_samplers_step_in_anchored_and_per_step_alike():
    model = l2g_model(seed=1)
    prompt = torch.randn(1, 16)
    sig = sd_sigmas()
    schedule = torch.cat([sig[torch.tensor([900, 700, 400, 100])].float(), torch.zeros(1)])
    d_c, d_u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for mode in ("anchored", "per_step"):
        guide = AnnealingGuidance(model, AnnealingOptions(mode=mode))
        out = guide.guide(schedule[1].expand(2), d_c, d_u, sampling="eps", sample_sigmas=schedule, prompt=prompt)
        scale = 1 + model(torch.tensor([700.0, 700.0]), torch.tensor([400.0, 400.0]), prompt)  # the sampler's own next point
        torch.testing.assert_close(out, guided(d_c, d_u, scale), rtol=1e-4, atol=1e-5)
        last = guide.guide(schedule[3], d_c[:1], d_u[:1], sampling="eps", sample_sigmas=schedule, prompt=prompt)
        scale = 1 + model(torch.tensor([100.0]), torch.tensor([-1.0]), prompt)  # the last step ends at clean data: s = -1
        torch.testing.assert_close(last, guided(d_c[:1], d_u[:1], scale), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="takes s from the sampler's schedule"):
        AnnealingGuidance(model).guide(schedule[1], d_c[:1], d_u[:1], sampling="eps", prompt=prompt)

    # under a CFG++ sampler the CFG scale is converted to the sampler's units (1 / k of its step)
    recorder = annealing.GuidanceRecorder()
    pp = AnnealingGuidance(model, AnnealingOptions()).guide(schedule[1], d_c[:1], d_u[:1], sampling="eps", prompt=prompt,
                                                            sampler=SamplerInfo("euler_cfg_pp"), sample_sigmas=schedule, recorder=recorder)
    k_step = schedule[1] / (schedule[1] - schedule[2])
    omega = float(recorder.trace()["omega"][0, 0])
    torch.testing.assert_close(pp, d_u[:1] + omega / k_step * (d_c[:1] - d_u[:1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_ancestral_samplers_s_is_sigma_down_where_their_guided_move_ends(eta):
    """euler_ancestral moves deterministically to sigma_down with the guided prediction, then adds noise sigma_up:
    sigma_down^2 + sigma_up^2 = sigma_next^2, so from the marginal at sigma_down it reaches the marginal at sigma_next.
    The step the network scales is t -> sigma_down (eta 0: sigma_next)."""
    model = l2g_model(seed=4)
    with torch.no_grad():  # torch's initialisation barely reads the time inputs; a steeper one tells s = 380 from s = 400
        model.time_embedding[0].weight.mul_(20)
    prompt = torch.randn(1, 16)
    sig = sd_sigmas()
    schedule = torch.cat([sig[torch.tensor([900, 700, 400, 100])].float(), torch.zeros(1)])
    sigma, sigma_next = schedule[1], schedule[2]
    up = min(float(sigma_next), eta * math.sqrt(float(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)))
    down = torch.tensor([math.sqrt(float(sigma_next) ** 2 - up**2)])
    lookup = annealing.GridLookup(VPGrid(), "ddpm_index")
    d_c, d_u = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    out = AnnealingGuidance(model).guide(sigma, d_c, d_u, sampling="eps", sample_sigmas=schedule, prompt=prompt,
                                         sampler=SamplerInfo("euler_ancestral", eta=eta))
    scale = 1 + model(torch.tensor([700.0]), lookup.timestep(down.float()), prompt)
    torch.testing.assert_close(out, guided(d_c, d_u, scale), rtol=1e-4, atol=1e-5)
    if eta > 0:  # a real difference from sigma_next: the test can tell the two apart
        assert float(down) < 0.99 * float(sigma_next)
        other = 1 + model(torch.tensor([700.0]), torch.tensor([400.0]), prompt)
        assert not torch.allclose(scale, other, rtol=1e-4)


def test_clamp_bounds_the_cfg_scale_itself():
    """For a learn_to_guide checkpoint, w_min/w_max bound the CFG scale 1 + omega (what docs/nodes.md says)."""
    model = l2g_model(seed=2)
    with torch.no_grad():
        model.head[-1].bias.fill_(4.0)  # omega about 4, a CFG scale about 5, above the clamp below
    prompt = torch.randn(1, 16)
    schedule = torch.cat([sd_sigmas()[torch.tensor([700, 333])].float(), torch.zeros(1)])
    d_c, d_u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    free = AnnealingGuidance(model, AnnealingOptions()).guide(schedule[:2], d_c, d_u, sampling="eps", prompt=prompt, sample_sigmas=schedule)
    assert not torch.allclose(free, d_u + 2.5 * (d_c - d_u))
    clamped = AnnealingGuidance(model, AnnealingOptions(w_max=2.5)).guide(schedule[:2], d_c, d_u, sampling="eps", prompt=prompt,
                                                                         sample_sigmas=schedule)
    torch.testing.assert_close(clamped, d_u + 2.5 * (d_c - d_u), rtol=1e-5, atol=1e-5)


def test_flow_checkpoint_reads_sigma_times_1000():
    grid = annealing.FlowGrid(num_steps=10, shift=3.0)
    model = l2g_model(seed=2, grid=grid, convention="sigma_x1000")
    prompt = torch.randn(1, 16)
    sigmas = grid.sigmas().float()
    d_c, d_u = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    out = AnnealingGuidance(model).guide(sigmas[3], d_c, d_u, sampling="const", prompt=prompt, sample_sigmas=sigmas)
    scale = 1 + model(sigmas[3:4] * 1000, sigmas[4:5] * 1000, prompt)
    torch.testing.assert_close(out, guided(d_c, d_u, scale), rtol=1e-4, atol=1e-5)


def test_missing_prompt_and_as_is_are_clear_errors():
    model = l2g_model()
    with pytest.raises(ValueError, match="prompt embedding"):
        AnnealingGuidance(model).guide(torch.tensor(1.0), torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), sampling="eps")
    with pytest.raises(ValueError, match="as_is"):
        AnnealingGuidance(model, AnnealingOptions(mode="as_is"))


def test_prompt_embedding_from_conditioning():
    tokens, pooled = torch.randn(1, 77, 8), torch.randn(1, 12)
    torch.testing.assert_close(annealing.prompt_embedding(tokens, pooled, "pooled", 12), pooled)
    torch.testing.assert_close(annealing.prompt_embedding(tokens, None, "mean_tokens", 8), tokens.mean(1))
    with pytest.raises(ValueError, match="has none"):
        annealing.prompt_embedding(tokens, None, "pooled", 12)
    with pytest.raises(ValueError, match="another model family"):
        annealing.prompt_embedding(tokens, pooled, "pooled", 1280)
