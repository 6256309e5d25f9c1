"""A Learn to Guide checkpoint through the pack's nodes in a real ComfyUI: the loader reads it, the guider and the KSampler
patch read the prompt's pooled embedding from the positive conditioning (one row per sample), and every step applies the
CFG scale 1 + omega(t, s, prompt) of the network, s where the sampler's step ends (the paper's rule, the default for a
network trained on continuous (s, t)), written out here from the method.

The last test samples, at 20 and 100 steps, a checkpoint that ``python -m training --method learn-to-guide`` trained on
continuous (s, t) on a tiny SDXL model. ComfyUI's interpreter usually lacks the training dependencies: the run uses
ANNEALING_TRAIN_PYTHON (a Python with ``pip install -e '.[train]'``), or this interpreter when it has them, and the test
skips, saying so, when neither can."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_comfy_sampling import ddim_setup, make_guider, rel_err, sample_guider, sd_abar  # noqa: F401 (fixtures below)

PROMPT_DIM = 12
REPO = Path(__file__).resolve().parents[2]
TRAINED_GRID_STEPS = 20
TRAINED_PROMPT_DIM = 32  # the tiny SDXL's text encoder 2 projects its pooled output to 32 (1280 in SDXL)


@pytest.fixture(scope="module")
def l2g_checkpoint(comfy_host):
    annealing = comfy_host.annealing
    torch.manual_seed(11)
    meta = annealing.CheckpointMetadata(model_family="sdxl", method="learn_to_guide", training_grid=annealing.VPGrid(num_steps=20))
    net = annealing.LearnToGuideNet(annealing.LearnToGuideConfig(prompt_dim=PROMPT_DIM, hidden_size=16), meta)
    with torch.no_grad():
        net.head[-1].bias.fill_(1.5)  # a CFG scale of a few, as a trained network gives
        net.prompt_projection.weight.mul_(3.0)  # and one that differs between prompts
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
    # by hand: the network's CFG scale for the step from t(sigma) to the sampler's next sigma (the mode's default, anchored,
    # gives a continuous-(s, t) network the sampler's s), for the pooled prompt
    grid = comfy_host.annealing.VPGrid(num_steps=20)
    lookup = comfy_host.annealing.GridLookup(grid, "ddpm_index")
    assert torch.allclose(torch.as_tensor(trace["sigma"][:, 0]), sigmas[:-1])
    t, s = lookup.timestep(sigmas[:-1]), lookup.timestep(sigmas[1:])
    expected = 1 + loaded(t, s, pooled)
    assert torch.allclose(torch.as_tensor(trace["omega"][:, 0]), expected, rtol=1e-4)
    assert torch.allclose(torch.as_tensor(trace["scale"][:, 0]), expected, rtol=1e-4)  # euler: the CFG scale as it is
    plot = node("AnnealingSchedulePlot", samples={"samples": out}, guider=guider).args[0]
    explorer = node("AnnealingModelExplorer", annealing_model=loaded, lambdas="0.4", positive=pos).args[0]
    assert plot.shape[-1] == explorer.shape[-1] == 3 and float(explorer.std()) > 0.01


def test_each_sample_of_a_batch_gets_the_scale_of_its_own_prompt(comfy_host, tiny, node, l2g_checkpoint):
    """A positive conditioning with two prompts (two rows) over four latents: ComfyUI gives latent b the row b mod 2, and
    so does the hook; the guide and the KSampler patch alike."""
    import comfy.sample
    import comfy.samplers

    loaded = node("LoadAnnealingGuidanceModel", model_name=l2g_checkpoint.name).args[0]
    model = tiny.make_tiny_model("eps", seed=0)
    generator = torch.Generator().manual_seed(21)
    tokens, pooled = torch.randn(2, 3, tiny.CONTEXT_DIM, generator=generator), torch.randn(2, PROMPT_DIM, generator=generator)
    pos = [[tokens, {"pooled_output": pooled}]]
    neg, _ = cond_with_pooled(tiny, 2)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 6).float().cpu()
    latent = torch.zeros(4, 4, 8, 8)
    with torch.inference_mode():
        guider = make_guider(node, model, pos, neg, loaded)
        out = sample_guider(guider, "euler", sigmas, latent)
        patched = node("ApplyAnnealingGuidance", model=model, annealing_model=loaded, **{
            "lambda": 0.4, "mode": "anchored", "normalize_delta_norm": True, "clamp_w": False, "w_min": 0.0, "w_max": 3.0,
            "active_start": 0.0, "active_end": 1.0}).args[0]
        out_ks = comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 42), 6, 1.0, "euler", "normal", pos, neg, latent,
                                     sigmas=sigmas, disable_pbar=True, seed=42)
    assert torch.isfinite(out).all() and rel_err(out_ks, out) < 1e-5
    trace = guider.annealing_hook.runs[-1].trace
    lookup = comfy_host.annealing.GridLookup(loaded.metadata.training_grid, "ddpm_index")
    t, s = lookup.timestep(sigmas[:-1]), lookup.timestep(sigmas[1:])
    omega = torch.as_tensor(trace["omega"])  # (steps, batch)
    with torch.no_grad():
        for b in range(4):
            torch.testing.assert_close(omega[:, b], 1 + loaded(t, s, pooled[b % 2 : b % 2 + 1]), rtol=1e-4, atol=1e-5)
    assert torch.equal(omega[:, 0], omega[:, 2]) and float((omega[:, 0] - omega[:, 1]).abs().max()) > 1e-3


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


# ------------------------------------------------------------------------------------------------ a checkpoint our trainer wrote


def training_python() -> str | None:
    """A Python that can run ``python -m training``: ANNEALING_TRAIN_PYTHON, else this one if it has the training extras."""
    if os.environ.get("ANNEALING_TRAIN_PYTHON"):
        return os.environ["ANNEALING_TRAIN_PYTHON"]
    try:
        import accelerate  # noqa: F401
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return None
    return sys.executable


@pytest.fixture(scope="module")
def trained_l2g_checkpoint(comfy_host, tmp_path_factory):
    """Train a tiny SDXL Learn to Guide run (continuous (s, t), the trainer's defaults; 3 steps at lr 0.02, so omega moves
    away from its uniform start and depends on t and s) with the project's CLI and put its checkpoint in ComfyUI's
    annealing_guidance folder."""
    python = training_python()
    if python is None:
        pytest.skip(f"{sys.executable} lacks diffusers/transformers/accelerate, which training the checkpoint needs: set "
                    "ANNEALING_TRAIN_PYTHON to a Python with the training extras (pip install -e '.[train]')")
    work = tmp_path_factory.mktemp("l2g_training")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    make = ("import sys; from training.tiny_models import make_image_dataset, make_tiny_model; "
            "make_tiny_model('sdxl', sys.argv[1]); make_image_dataset(sys.argv[2], count=4)")

    def run(*args):
        done = subprocess.run([python, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{args[:2]} failed:\n{done.stderr[-3000:]}"
        return done.stdout

    run("-c", make, str(work / "model"), str(work / "data"))
    out = run("-m", "training", "--method", "learn-to-guide", "--model", str(work / "model"), "--dataset", str(work / "data"),
              "--output", str(work / "run"), "--resolution", "64", "--grid-steps", str(TRAINED_GRID_STEPS), "--max-steps", "3",
              "--gradient-accumulation", "2", "--lr", "0.02", "--num-workers", "0", "--device", "cpu", "--quiet")
    assert "done: 3 steps" in out
    path = comfy_host.models_dir / "annealing_guidance" / "trained_learn_to_guide_sdxl.safetensors"
    shutil.copy(work / "run" / "learn_to_guide_sdxl.safetensors", path)
    return path


@torch.no_grad()
def reference_cfg_ddim(model, abar, timesteps, net, pooled, pos, neg, noise):
    """Ordinary CFG DDIM, the step Learn to Guide trains: eps_hat = eps_u + w (eps_c - eps_u) with w = 1 + omega(t, s, prompt)
    for the step from t to the next timestep s of this DDIM loop (-1, clean data, after the last), z0 = (z - sqrt(1 - abar)
    eps_hat) / sqrt(abar), z_next = sqrt(abar_next) z0 + sqrt(1 - abar_next) eps_hat (renoised with the guided noise).
    Returns the result and the scales w it used."""
    unet = model.model.diffusion_model.double()
    z = (1 - abar[timesteps[0]]).sqrt() * noise.double()
    batch = noise.shape[0]
    ctx_c, ctx_u = pos[0][0].double().expand(batch, -1, -1), neg[0][0].double().expand(batch, -1, -1)
    steps, scales = timesteps.tolist(), []
    for i, t in enumerate(steps):
        s = steps[i + 1] if i + 1 < len(steps) else -1
        tt = torch.full((batch,), float(t), dtype=torch.float64)
        eps_c, eps_u = unet(z, tt, context=ctx_c), unet(z, tt, context=ctx_u)
        w = 1 + net(torch.tensor([float(t)]), torch.tensor([float(s)]), pooled).double()
        scales.append(float(w))
        eps_hat = eps_u + w * (eps_c - eps_u)
        z0 = (z - (1 - abar[t]).sqrt() * eps_hat) / abar[t].sqrt()
        abar_next = abar[s] if s >= 0 else torch.tensor(1.0, dtype=torch.float64)
        z = abar_next.sqrt() * z0 + (1 - abar_next).sqrt() * eps_hat
    unet.float()
    return z.float(), scales


@pytest.mark.parametrize("steps", [20, 100])
def test_a_trained_checkpoint_samples_as_its_own_cfg_ddim_loop(comfy_host, tiny, node, trained_l2g_checkpoint, steps):
    """Sampled with euler on an N-step DDIM grid's sigmas (a DDIM step in ComfyUI's x-space) and the mode left at its
    default, the continuous-(s, t) checkpoint our trainer wrote gives exactly its own CFG DDIM loop at N steps: scale
    1 + omega(t, next timestep of that loop, pooled prompt) at every step, at 20 steps (its recorded grid's count) and at
    100 (steps shorter than any it was trained on)."""
    import importlib

    loaded = node("LoadAnnealingGuidanceModel", model_name=trained_l2g_checkpoint.name).args[0]
    annealing = comfy_host.annealing
    assert isinstance(loaded, annealing.LearnToGuideNet) and loaded.metadata.method == "learn_to_guide"
    assert (loaded.config.prompt_embedding, loaded.config.prompt_dim) == ("pooled", TRAINED_PROMPT_DIM)
    assert (loaded.config.output, loaded.config.time_input, loaded.config.trained_s) == ("relu", "log_snr", "continuous")
    assert loaded.metadata.training_grid == annealing.VPGrid(num_steps=TRAINED_GRID_STEPS)
    training = loaded.metadata.training
    assert training["steps"] == 3 and training["objective"] == "energy" and training["times"]["delta"] == 0.1
    compatibility = importlib.import_module(comfy_host.package.__name__ + ".nodes.compatibility")
    model, ms, timesteps, sigmas = ddim_setup(tiny, steps=steps)
    config_name = type(model.model.model_config).__name__
    assert compatibility.check_model(loaded.metadata, ms, config_name) == ("eps", [])

    pos = tiny.make_cond(1)
    pooled = torch.randn(1, TRAINED_PROMPT_DIM, generator=torch.Generator().manual_seed(7))
    pos = [[pos[0][0], {"pooled_output": pooled}]]
    neg = tiny.make_cond(2)
    latent = torch.zeros(2, 4, 8, 8)
    with torch.inference_mode():
        out = sample_guider(make_guider(node, model, pos, neg, loaded), "euler", sigmas, latent)
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 42)
    expected, scales = reference_cfg_ddim(model, sd_abar(), timesteps, loaded, pooled, pos, neg, noise)
    assert torch.isfinite(out).all() and rel_err(out, expected) < 1e-4
    assert max(scales) - min(scales) > 1e-3  # the trained omega depends on the step: the loop's s matters

    # the checkpoint reads the SDXL pooled embedding: a conditioning whose pooled output has another width is refused
    wrong = [[pos[0][0], {"pooled_output": torch.randn(1, PROMPT_DIM)}]]
    with pytest.raises(ValueError, match="another model family"), torch.inference_mode():
        sample_guider(make_guider(node, model, wrong, neg, loaded), "euler", sigmas, latent)
