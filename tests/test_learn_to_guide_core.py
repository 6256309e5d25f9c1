"""Learn to Guide in the core: the network omega(t, s, c), its checkpoints, and how the guide applies it (the step's
CFG scale 1 + omega, with s the training grid's next point in anchored mode and the sampler's in per_step mode)."""

from __future__ import annotations

import pytest
import torch

import annealing
from annealing import AnnealingGuidance, AnnealingOptions, CheckpointMetadata, LearnToGuideConfig, LearnToGuideNet, SamplerInfo, VPGrid
from annealing.errors import CheckpointError


def sd_sigmas() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    return ((1 - abar) / abar).sqrt()


def l2g_model(seed=0, prompt_dim=16, kind="pooled", grid=None, convention="ddpm_index"):
    torch.manual_seed(seed)
    meta = CheckpointMetadata(model_family="sdxl" if convention == "ddpm_index" else "sd3", timestep_convention=convention,
                              prediction_space="epsilon" if convention == "ddpm_index" else "velocity", training_grid=grid,
                              method="learn_to_guide")
    return LearnToGuideNet(LearnToGuideConfig(prompt_dim=prompt_dim, prompt_embedding=kind, hidden_size=32), meta).eval()


def test_the_network_gives_a_non_negative_omega_per_sample():
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


def test_config_bounds_and_unknown_fields():
    for bad in ({"prompt_dim": 0}, {"prompt_dim": 10**6}, {"hidden_size": 10**5}, {"prompt_embedding": "cls"}, {"t_embed_normalization": 0.0}):
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
    args = (torch.tensor([700.0]), torch.tensor([680.0]), torch.randn(1, 16))
    torch.testing.assert_close(loaded(*args), model(*args))
    with pytest.raises(CheckpointError, match="method"):  # weights of one method under the other's metadata
        annealing.save_guidance_model(model, tmp_path / "x.safetensors", model.metadata.replace(method="annealing"))


def test_anchored_guide_uses_the_grids_next_point_and_per_step_the_samplers():
    model = l2g_model(seed=1)
    prompt = torch.randn(1, 16)
    sig = sd_sigmas()
    sigma = sig[torch.tensor([700, 333])].float()  # DDPM indices 700 and 333; the 50-step grid has points 700 and 320
    d_c, d_u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    anchored = AnnealingGuidance(model, AnnealingOptions()).guide(sigma, d_c, d_u, sampling="eps", prompt=prompt)
    # 700 is a grid point: its trained step ends at 680; 333 lies between 340 (ends at 320) and 320 (ends at 300)
    frac = float((sig[333].log() - sig[340].log()) / (sig[320].log() - sig[340].log()))
    s = torch.tensor([680.0, 320.0 * (1 - frac) + 300.0 * frac])
    scale = 1 + model(torch.tensor([700.0, 333.0]), s, prompt)
    torch.testing.assert_close(anchored, d_u + scale.view(-1, 1, 1, 1) * (d_c - d_u), rtol=1e-4, atol=1e-5)

    schedule = torch.cat([sig[torch.tensor([900, 700, 400, 100])].float(), torch.zeros(1)])
    per_step = AnnealingGuidance(model, AnnealingOptions(mode="per_step"))
    out = per_step.guide(schedule[1].expand(2), d_c, d_u, sampling="eps", sample_sigmas=schedule, prompt=prompt)
    scale = 1 + model(torch.tensor([700.0, 700.0]), torch.tensor([400.0, 400.0]), prompt)  # the sampler's own next point
    torch.testing.assert_close(out, d_u + scale.view(-1, 1, 1, 1) * (d_c - d_u), rtol=1e-4, atol=1e-5)
    last = per_step.guide(schedule[3], d_c[:1], d_u[:1], sampling="eps", sample_sigmas=schedule, prompt=prompt)
    scale = 1 + model(torch.tensor([100.0]), torch.tensor([-1.0]), prompt)  # the last step ends at clean data: t = -1
    torch.testing.assert_close(last, d_u[:1] + scale.view(-1, 1, 1, 1) * (d_c[:1] - d_u[:1]), rtol=1e-4, atol=1e-5)

    # under a CFG++ sampler the CFG scale is converted to the sampler's units (1 / k of its step)
    recorder = annealing.GuidanceRecorder()
    pp = AnnealingGuidance(model, AnnealingOptions()).guide(schedule[1], d_c[:1], d_u[:1], sampling="eps", prompt=prompt,
                                                            sampler=SamplerInfo("euler_cfg_pp"), sample_sigmas=schedule, recorder=recorder)
    k_step = schedule[1] / (schedule[1] - schedule[2])
    omega = float(recorder.trace()["omega"][0, 0])
    torch.testing.assert_close(pp, d_u[:1] + omega / k_step * (d_c[:1] - d_u[:1]), rtol=1e-4, atol=1e-5)


def test_clamp_bounds_the_cfg_scale_itself():
    """For a learn_to_guide checkpoint, w_min/w_max bound the CFG scale 1 + omega (what docs/nodes.md says)."""
    model = l2g_model(seed=2)
    with torch.no_grad():
        model.head[-1].bias.fill_(4.0)  # softplus(~4) + 1 is about 5, above the clamp below
    prompt = torch.randn(1, 16)
    sigma = sd_sigmas()[torch.tensor([700, 333])].float()
    d_c, d_u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    free = AnnealingGuidance(model, AnnealingOptions()).guide(sigma, d_c, d_u, sampling="eps", prompt=prompt)
    assert not torch.allclose(free, d_u + 2.5 * (d_c - d_u))
    clamped = AnnealingGuidance(model, AnnealingOptions(w_max=2.5)).guide(sigma, d_c, d_u, sampling="eps", prompt=prompt)
    torch.testing.assert_close(clamped, d_u + 2.5 * (d_c - d_u), rtol=1e-5, atol=1e-5)


def test_flow_checkpoint_reads_sigma_times_1000():
    grid = annealing.FlowGrid(num_steps=10, shift=3.0)
    model = l2g_model(seed=2, grid=grid, convention="sigma_x1000")
    prompt = torch.randn(1, 16)
    sigmas = grid.sigmas().float()
    d_c, d_u = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    out = AnnealingGuidance(model).guide(sigmas[3], d_c, d_u, sampling="const", prompt=prompt)
    scale = 1 + model(sigmas[3:4] * 1000, sigmas[4:5] * 1000, prompt)
    torch.testing.assert_close(out, d_u + scale.view(-1, 1, 1, 1) * (d_c - d_u), rtol=1e-4, atol=1e-5)


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
