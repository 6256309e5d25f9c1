"""A Learn to Guide checkpoint through the pack's nodes in a real ComfyUI: the loader reads it, the guider and the KSampler
patch read the prompt's pooled embedding from the positive conditioning, and every step applies the CFG scale
1 + omega(t, s, prompt) of the network (s: the training grid's next point), written out here from the method."""

from __future__ import annotations

import pytest
import torch
from test_comfy_sampling import make_guider, rel_err, sample_guider  # noqa: F401 (fixtures below)

PROMPT_DIM = 12


@pytest.fixture(scope="module")
def l2g_checkpoint(comfy_host):
    annealing = comfy_host.annealing
    torch.manual_seed(11)
    meta = annealing.CheckpointMetadata(model_family="sdxl", method="learn_to_guide", training_grid=annealing.VPGrid(num_steps=20))
    net = annealing.LearnToGuideNet(annealing.LearnToGuideConfig(prompt_dim=PROMPT_DIM, hidden_size=16), meta)
    with torch.no_grad():
        net.head[-1].bias.fill_(1.5)  # a CFG scale of a few, as a trained network gives
    path = comfy_host.models_dir / "annealing_guidance" / "tiny_l2g.safetensors"
    annealing.save_guidance_model(net, path)
    return path


def cond_with_pooled(tiny, seed):
    cond = tiny.make_cond(seed)
    pooled = torch.randn(1, PROMPT_DIM, generator=torch.Generator().manual_seed(100 + seed))
    return [[cond[0][0], {"pooled_output": pooled}]], pooled


def test_learn_to_guide_checkpoint_samples_through_the_guider_and_the_patch(comfy_host, tiny, node, l2g_checkpoint):
    import comfy.sample
    import comfy.samplers

    loaded = node("LoadAnnealingGuidanceModel", model_name=l2g_checkpoint.name).args[0]
    assert loaded.metadata.method == "learn_to_guide"
    model = tiny.make_tiny_model("eps", seed=0)
    pos, pooled = cond_with_pooled(tiny, 1)
    neg, _ = cond_with_pooled(tiny, 2)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 8).float().cpu()
    latent = torch.zeros(2, 4, 8, 8)
    with torch.inference_mode():
        guider = make_guider(node, model, pos, neg, loaded)
        out = sample_guider(guider, "euler", sigmas, latent)
        patched = node("ApplyAnnealingGuidance", model=model, annealing_model=loaded, **{
            "lambda": 0.4, "mode": "anchored", "normalize_delta_norm": True, "clamp_w": False, "w_min": 0.0, "w_max": 3.0,
            "active_start": 0.0, "active_end": 1.0}).args[0]
        out_ks = comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 42), 8, 1.0, "euler", "normal", pos, neg, latent,
                                     sigmas=sigmas, disable_pbar=True, seed=42)
    assert torch.isfinite(out).all() and rel_err(out_ks, out) < 1e-5
    trace = guider.annealing_hook.runs[-1].trace
    # by hand: the network's CFG scale for the step from t(sigma) to the 20-step grid's next point, for the pooled prompt
    grid = comfy_host.annealing.VPGrid(num_steps=20)
    lookup = comfy_host.annealing.GridLookup(grid, "ddpm_index")
    t, _, s = lookup(torch.as_tensor(trace["sigma"][:, 0]))
    expected = 1 + loaded(t, s, pooled)
    assert torch.allclose(torch.as_tensor(trace["omega"][:, 0]), expected, rtol=1e-4)
    assert torch.allclose(torch.as_tensor(trace["scale"][:, 0]), expected, rtol=1e-4)  # euler: the CFG scale as it is
    plot = node("AnnealingSchedulePlot", samples={"samples": out}, guider=guider).args[0]
    explorer = node("AnnealingModelExplorer", annealing_model=loaded, lambdas="0.4", positive=pos).args[0]
    assert plot.shape[-1] == explorer.shape[-1] == 3 and float(explorer.std()) > 0.01


def test_learn_to_guide_refuses_what_it_cannot_do(comfy_host, tiny, node, l2g_checkpoint):
    loaded = comfy_host.annealing.load_guidance_model(l2g_checkpoint)
    model = tiny.make_tiny_model("eps", seed=0)
    with pytest.raises(ValueError, match="as_is"):
        make_guider(node, model, tiny.make_cond(1), tiny.make_cond(2), loaded, mode="as_is")
    guider = make_guider(node, model, tiny.make_cond(1), tiny.make_cond(2), loaded)  # no pooled_output in this conditioning
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3).float().cpu()
    with pytest.raises(ValueError, match="pooled text embedding"):
        with torch.inference_mode():
            sample_guider(guider, "euler", sigmas, torch.zeros(1, 4, 8, 8))
