"""Backends and the loss: model detection and its errors, conditioning against the diffusers pipelines, the loss of
Algorithm 1 recomputed by hand from the paper's equations, gradients through the frozen model, and the shared CFG++ step."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from training_fixtures import make_config, one_thread, tiny_model

import annealing
import training.algorithm
from training.backends import detect_model
from training.config import TrainingError
from training.trainer import Trainer, train


@pytest.fixture(autouse=True)
def _single_thread():
    yield from one_thread()


def ready_trainer(kind, tmp_path, **overrides) -> Trainer:
    trainer = Trainer(make_config(kind, tmp_path / "out", **overrides), progress=False)
    trainer.preflight()
    trainer.setup()
    return trainer


def copy_configs(kind, dest):
    """The JSON files of a tiny model folder (all that detection reads)."""
    shutil.copytree(tiny_model(kind), dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


# ------------------------------------------------------------------------------------------------------------ detection


def test_detects_family_prediction_and_spaces():
    expected = {
        ("sd15", "epsilon"): ("sd15", "epsilon", "epsilon", "ddpm_index"),
        ("sdxl", "epsilon"): ("sdxl", "epsilon", "epsilon", "ddpm_index"),
        ("sd3", "epsilon"): ("sd3", "flow", "velocity", "sigma_x1000"),
        ("sd15", "v_prediction"): ("sd15", "v_prediction", "epsilon", "ddpm_index"),
    }
    for (kind, prediction), want in expected.items():
        info = detect_model(tiny_model(kind, prediction))
        assert (info.family, info.prediction_type, info.prediction_space, info.timestep_convention) == want
    assert detect_model(tiny_model("sdxl")).force_zeros_for_empty_prompt
    assert detect_model(tiny_model("sd3")).latent_shape(64) == (16, 8, 8)


def test_wrong_model_kinds_are_one_line_errors(tmp_path):
    with pytest.raises(TrainingError, match="not a diffusers pipeline folder.*single component"):
        detect_model(tiny_model("sd15") / "unet")
    flux = copy_configs("sd3", tmp_path / "flux")
    index = json.loads((flux / "model_index.json").read_text())
    index.update(_class_name="FluxPipeline", transformer=["diffusers", "FluxTransformer2DModel"])
    (flux / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TrainingError, match="unsupported model FluxPipeline"):
        detect_model(flux)
    sample = copy_configs("sd15", tmp_path / "sample")
    sched = json.loads((sample / "scheduler" / "scheduler_config.json").read_text())
    (sample / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, "prediction_type": "sample"}))
    with pytest.raises(TrainingError, match="unsupported prediction type 'sample'"):
        detect_model(sample)
    with pytest.raises(TrainingError, match="model not found"):
        detect_model(tmp_path / "missing")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(TrainingError, match="needs --config-folder"):
        detect_model(weights)
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(TrainingError, match="pickled .ckpt files are not loaded"):
        detect_model(tmp_path / "model.ckpt", tiny_model("sd15"))


def test_bad_input_fails_before_training_starts(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [
        ({"output": str(blocker / "out")}, "cannot create the output folder, .*a-file is not a folder"),
        ({"output": str(blocker)}, "exists and is not a folder"),
        ({"model": str(tiny_model("sd15") / "vae")}, "not a diffusers pipeline folder"),
        ({"resume": True}, "no resume state"),
    ]
    for change, pattern in cases:
        config = make_config("sd15", tmp_path / "out")
        for key, value in change.items():
            setattr(config, key, value)
        with pytest.raises(TrainingError, match=pattern) as info:
            train(config, progress=False)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # a refused run leaves no output folder behind


# ------------------------------------------------------------------------------------------------------------ conditioning


def test_conditioning_matches_the_pipelines(tmp_path):
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    prompts = ["a red cube", "two green spheres on a table"]
    trainer = ready_trainer("sdxl", tmp_path)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model("sdxl"))
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
    ours = trainer.backend.encode_text(prompts)
    assert torch.allclose(ours.embeds, embeds, atol=1e-6) and torch.allclose(ours.pooled, pooled, atol=1e-6)
    assert trainer.backend.uncond_mode == "zeros"  # force_zeros_for_empty_prompt, as the pipeline does
    assert torch.equal(trainer.uncond.embeds, negative[:1]) and torch.equal(trainer.uncond.pooled, negative_pooled[:1])

    trainer = ready_trainer("sd3", tmp_path)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model("sd3"), text_encoder_3=None, tokenizer_3=None)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=True)
    ours = trainer.backend.encode_text(prompts)
    assert torch.allclose(ours.embeds, embeds, atol=1e-6) and torch.allclose(ours.pooled, pooled, atol=1e-6)
    assert torch.allclose(trainer.uncond.embeds, negative[:1], atol=1e-6) and torch.allclose(trainer.uncond.pooled, negative_pooled[:1], atol=1e-6)


def test_cads_perturbs_tokens_and_pooled_of_the_conditional_branch_only(tmp_path):
    trainer = ready_trainer("sdxl", tmp_path)
    cond = trainer.backend.encode_text(["a cat", "a dog"])
    late = trainer.backend.perturb(cond, torch.tensor([1.0, 0.0]), torch.Generator().manual_seed(0))
    assert not torch.equal(late.embeds[0], cond.embeds[0]) and not torch.equal(late.pooled[0], cond.pooled[0])
    assert torch.allclose(late.embeds[1], cond.embeds[1]) and torch.allclose(late.pooled[1], cond.pooled[1])  # t/T = 0: gamma = 1


# ------------------------------------------------------------------------------------------------------------ the loss


def test_epsilon_loss_equals_the_papers_equations(tmp_path):
    trainer = ready_trainer("sd15", tmp_path, grid_steps=10, cads=False)
    backend, unet = trainer.backend, trainer.backend.network
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    lam, index = torch.tensor([0.3, 0.8]), torch.tensor([3, 7])
    cond = backend.encode_text(["a cat", "a dog"])
    terms = trainer.compute_loss(x0, cond, None, lam=lam, grid_index=index, noise=eps)

    with torch.no_grad():
        tok = backend.text["tokenizer"]
        ids = tok([""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        empty = backend.text["text_encoder"](ids)[0].expand(2, -1, -1)
        abar = backend.scheduler.alphas_cumprod.double()
        t = torch.tensor([600, 200])  # 10-step DDIM grid 900, 800, ..., 0 at indices 3 and 7
        t_next = t - 100

        def bcast(v):
            return v.float().reshape(-1, 1, 1, 1)

        a, s, a1, s1 = (bcast(v) for v in (abar[t].sqrt(), (1 - abar[t]).sqrt(), abar[t_next].sqrt(), (1 - abar[t_next]).sqrt()))
        z = a * x0 + s * eps
        e_u, e_c = unet(z, t, encoder_hidden_states=empty).sample, unet(z, t, encoder_hidden_states=cond.embeds).sample
        w = trainer.mlp(t.float(), (e_u - e_c).flatten(1).norm(dim=1), lam)
        e_hat = e_u + w.reshape(-1, 1, 1, 1) * (e_c - e_u)
        z0_hat = (z - s * e_hat) / a
        z_next = a1 * z0_hat + s1 * e_u  # renoised with the UNCONDITIONAL prediction
        delta_next = unet(z_next, t_next, encoder_hidden_states=empty).sample - unet(z_next, t_next, encoder_hidden_states=cond.embeds).sample
        quality = ((1 - lam) * (e_hat - eps).pow(2).flatten(1).mean(1)).mean()
        alignment = (lam * delta_next.pow(2).flatten(1).mean(1)).mean()
    assert torch.allclose(terms.quality, quality, rtol=1e-6) and torch.allclose(terms.alignment, alignment, rtol=1e-6)
    assert torch.allclose(terms.total, quality + alignment, rtol=1e-6)
    assert torch.allclose(terms.w, w)


def test_velocity_loss_equals_the_flow_equations(tmp_path):
    trainer = ready_trainer("sd3", tmp_path, grid_steps=10, cads=False, balance="off", delta_weight=2.0, flow_spacing="simple")
    backend, net = trainer.backend, trainer.backend.network
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, 8, 8, generator=gen)
    lam, index = torch.tensor([0.6, 0.1]), torch.tensor([2, 8])
    cond, empty = backend.encode_text(["a cat", "a dog"]), backend.encode_text(["", ""])
    terms = trainer.compute_loss(x0, cond, None, lam=lam, grid_index=index, noise=eps)

    with torch.no_grad():
        u = 1 - torch.arange(10, dtype=torch.float64) / 10  # t from 1 down, shifted by 3: sigma = 3u / (1 + 2u)
        sigmas = (3 * u / (1 + 2 * u)).float()
        s, s1 = sigmas[index].reshape(-1, 1, 1, 1), sigmas[index + 1].reshape(-1, 1, 1, 1)

        def v(x, sig, c):
            return net(hidden_states=x, timestep=sig.flatten() * 1000, encoder_hidden_states=c.embeds, pooled_projections=c.pooled).sample

        z = (1 - s) * x0 + s * eps
        v_u, v_c = v(z, s, empty), v(z, s, cond)
        w = trainer.mlp(s.flatten() * 1000, (v_u - v_c).flatten(1).norm(dim=1), lam)
        v_hat = v_u + w.reshape(-1, 1, 1, 1) * (v_c - v_u)
        x0_hat = z - s * v_hat
        eps_u = z + (1 - s) * v_u
        z_next = (1 - s1) * x0_hat + s1 * eps_u
        delta_next = v(z_next, s1, empty) - v(z_next, s1, cond)
        quality = ((1 - lam) * (v_hat - (eps - x0)).pow(2).flatten(1).mean(1)).mean()
        alignment = (lam * delta_next.pow(2).flatten(1).mean(1)).mean()
    assert torch.allclose(terms.quality, quality, rtol=1e-6) and torch.allclose(terms.alignment, alignment, rtol=1e-6)
    assert torch.allclose(terms.total, quality + 2.0 * alignment, rtol=1e-6)


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3"])
def test_each_pass_is_one_network_call_of_batch_2b(tmp_path, kind):
    trainer = ready_trainer(kind, tmp_path, cads=False)
    network, seen = trainer.backend.network, []
    original = network.forward

    def spy(*args, **kwargs):
        sample = kwargs.get("hidden_states", args[0] if args else None)
        seen.append((sample.shape[0], sample.requires_grad, kwargs))
        return original(*args, **kwargs)

    network.forward = spy
    cond = trainer.backend.encode_text(["a cat", "a dog"])
    terms = trainer.compute_loss(torch.randn(2, *trainer.latent_shape), cond, torch.Generator().manual_seed(0))
    assert torch.isfinite(terms.total)
    assert [(batch, grad) for batch, grad, _ in seen] == [(4, False), (4, True)]  # pass 1 without, pass 2 with a graph
    for _, _, kwargs in seen:  # rows 0-1 unconditional, rows 2-3 conditional (clean in pass 2: CADS is off here)
        assert torch.equal(kwargs["encoder_hidden_states"][:2], trainer.uncond.embeds.expand(2, -1, -1))
        assert torch.equal(kwargs["encoder_hidden_states"][2:], cond.embeds)
        if kind == "sdxl":
            added = kwargs["added_cond_kwargs"]
            assert torch.equal(added["text_embeds"], torch.cat([trainer.uncond.pooled.expand(2, -1), cond.pooled]))
            assert torch.equal(added["time_ids"], torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(4, -1))
        if kind == "sd3":
            assert torch.equal(kwargs["pooled_projections"], torch.cat([trainer.uncond.pooled.expand(2, -1), cond.pooled]))


def test_batched_sdxl_loss_and_gradient_equal_four_separate_calls(tmp_path):
    """The loss as the trainer computed it before batching (four network calls of batch B, SDXL's pooled embeddings and
    time ids passed per call), written out by hand, against the batched loss: same value and same MLP gradient."""
    trainer = ready_trainer("sdxl", tmp_path, grid_steps=10, cads=False)
    backend, unet, mlp = trainer.backend, trainer.backend.network, trainer.mlp
    gen = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    lam, index = torch.tensor([0.25, 0.9]), torch.tensor([1, 6])
    cond = backend.encode_text(["a red cube", "two green spheres"])
    terms = trainer.compute_loss(x0, cond, None, lam=lam, grid_index=index, noise=eps)
    terms.total.backward()
    batched_grad = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad(set_to_none=True)

    abar = backend.scheduler.alphas_cumprod.double()
    t = torch.tensor([800, 300])  # 10-step DDIM grid 900, 800, ..., 0 at indices 1 and 6
    t_next = t - 100
    zeros_embeds, zeros_pooled = torch.zeros(2, 77, 32), torch.zeros(2, 32)  # SDXL base: force_zeros_for_empty_prompt
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(2, -1)

    def eps_of(z, timesteps, embeds, pooled):
        return unet(z, timesteps, encoder_hidden_states=embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    def bcast(v):
        return v.float().reshape(-1, 1, 1, 1)

    a, s, a1, s1 = (bcast(v) for v in (abar[t].sqrt(), (1 - abar[t]).sqrt(), abar[t_next].sqrt(), (1 - abar[t_next]).sqrt()))
    z = a * x0 + s * eps
    with torch.no_grad():
        e_u, e_c = eps_of(z, t, zeros_embeds, zeros_pooled), eps_of(z, t, cond.embeds, cond.pooled)
    w = mlp(t.float(), (e_u - e_c).flatten(1).norm(dim=1), lam)
    e_hat = e_u + w.reshape(-1, 1, 1, 1) * (e_c - e_u)
    z_next = a1 * (z - s * e_hat) / a + s1 * e_u
    delta_next = eps_of(z_next, t_next, zeros_embeds, zeros_pooled) - eps_of(z_next, t_next, cond.embeds, cond.pooled)
    quality = ((1 - lam) * (e_hat - eps).pow(2).flatten(1).mean(1)).mean()
    alignment = (lam * delta_next.pow(2).flatten(1).mean(1)).mean()
    (quality + alignment).backward()
    assert torch.allclose(terms.quality, quality.detach(), rtol=1e-6) and torch.allclose(terms.alignment, alignment.detach(), rtol=1e-6)
    assert torch.allclose(terms.w, w.detach(), rtol=1e-6)
    # The gradient reaches w through delta_next, a difference of two Jacobian-vector products: float32 rounding leaves
    # about 1e-5 of it (either way of computing it, measured against the same computation in float64), hence 1e-4.
    for ours, theirs in zip(batched_grad, (p.grad for p in mlp.parameters()), strict=True):
        assert float((ours - theirs).norm()) <= 1e-4 * float(theirs.norm())
    assert sum(g.abs().sum() for g in batched_grad) > 0


def test_sd3_trains_on_the_diffusers_scheduler_grid_by_default_and_records_it(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_model("sd3"), subfolder="scheduler")
    scheduler.set_timesteps(28)
    trainer = ready_trainer("sd3", tmp_path / "default", grid_steps=28)
    assert torch.allclose(trainer.grid.sigmas, scheduler.sigmas[:-1].float(), atol=1e-6)  # the points training starts from
    assert torch.allclose(trainer.grid.model_timesteps, scheduler.timesteps.float(), atol=1e-3)  # what the pipeline feeds the network
    assert abs(float(trainer.grid.sigmas[-1]) - 0.0089) < 1e-4  # the last step starts at 0.0089 (shift 3, 28 steps)
    assert trainer.metadata().training_grid.sigmas().tolist() == pytest.approx(scheduler.sigmas.double().tolist(), abs=1e-6)
    assert trainer.metadata().training["flow_spacing"] == "diffusers"

    simple = ready_trainer("sd3", tmp_path / "simple", grid_steps=28, flow_spacing="simple")
    u = 1 - torch.arange(28, dtype=torch.float64) / 28  # ComfyUI "simple": u from 1 down by 1/N, then shifted
    assert torch.allclose(simple.grid.sigmas.double(), 3 * u / (1 + 2 * u), atol=1e-6)
    assert abs(float(simple.grid.sigmas[-1]) - 0.1) < 1e-6
    assert simple.metadata().training_grid.spacing == "simple"


def test_sd3_scheduler_options_the_grid_cannot_describe_are_refused(tmp_path):
    folder = copy_configs("sd3", tmp_path / "karras")
    shutil.copytree(tiny_model("sd3"), folder, dirs_exist_ok=True)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_karras_sigmas": True}))
    with pytest.raises(TrainingError, match="sigmas differ from a shift-3 flow grid"):
        ready_trainer("sd3", tmp_path, model=str(folder))
    ready_trainer("sd3", tmp_path, model=str(folder), flow_spacing="simple")  # the simple grid is ours, not the scheduler's


def test_training_uses_the_inference_cfgpp_step(tmp_path, monkeypatch):
    assert training.algorithm.cfgpp_step is annealing.cfgpp_step is annealing.guidance.cfgpp_step
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[-1] if len(args) == 9 else kwargs.get("prediction"))
        return annealing.guidance.cfgpp_step(*args, **kwargs)

    monkeypatch.setattr(training.algorithm, "cfgpp_step", spy)
    for kind in ("sd15", "sd3"):
        trainer = ready_trainer(kind, tmp_path / kind)
        x0 = torch.randn(1, *trainer.latent_shape)
        trainer.compute_loss(x0, trainer.backend.encode_text(["a cat"]), torch.Generator().manual_seed(0))
    assert calls == ["epsilon", "velocity"]


# ------------------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_gradient_reaches_the_mlp_through_the_frozen_model_with_checkpointing(tmp_path, kind):
    grads = []
    for checkpointing in (False, True):
        trainer = ready_trainer(kind, tmp_path / str(checkpointing), gradient_checkpointing=checkpointing, cads=False)
        net = trainer.backend.network
        assert not net.training and all(not p.requires_grad for p in net.parameters())
        assert net.is_gradient_checkpointing == checkpointing
        gen = torch.Generator().manual_seed(0)
        x0, eps = torch.randn(2, *trainer.latent_shape, generator=gen), torch.randn(2, *trainer.latent_shape, generator=gen)
        # lambda = 1: only the alignment term, which depends on w only through pass 2 of the frozen model
        terms = trainer.compute_loss(x0, trainer.backend.encode_text(["a", "b"]), None, lam=torch.ones(2), grid_index=torch.tensor([10, 30]), noise=eps)
        assert float(terms.quality) == 0.0
        terms.total.backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.mlp.parameters()]))
        assert all(p.grad is None for p in net.parameters())
    assert grads[0].abs().sum() > 0 and torch.isfinite(grads[0]).all()
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-10)


def test_v_prediction_output_is_converted_to_epsilon(tmp_path):
    trainer = Trainer(make_config("sd15", tmp_path / "out", model=str(tiny_model("sd15", "v_prediction"))), progress=False)
    trainer.preflight()
    trainer.setup()
    backend = trainer.backend
    assert backend.prediction == "epsilon" and backend.info.prediction_type == "v_prediction"
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 100.0])
    cond = backend.encode_text(["a", "b"])
    raw = backend.network(z, t, encoder_hidden_states=cond.embeds).sample
    abar = backend.scheduler.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
    assert torch.allclose(backend.predict(z, t, cond), abar.sqrt() * raw + (1 - abar).sqrt() * z, atol=1e-6)


def test_single_file_checkpoints_load_offline_through_the_config_folder(tmp_path, monkeypatch):
    """The single-file path hands diffusers the local config folder and forbids downloads. Converting a real LDM-format
    file is diffusers' own code and is not exercised here (no such tiny file can be made offline); this checks our wiring."""
    import diffusers

    calls = []

    def from_single_file(cls, path, **kwargs):
        calls.append((path, kwargs))
        return cls.from_pretrained(kwargs["config"], safety_checker=None, requires_safety_checker=False, local_files_only=True)

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_single_file", classmethod(from_single_file))
    weights = tmp_path / "my-finetune.safetensors"
    weights.write_bytes(b"placeholder")
    trainer = ready_trainer("sd15", tmp_path, model=str(weights), config_folder=str(tiny_model("sd15")))
    (path, kwargs), = calls
    assert path == str(weights) and kwargs["config"] == str(tiny_model("sd15")) and kwargs["local_files_only"] is True
    assert trainer.info.single_file and trainer.metadata().training["base_model"] == "my-finetune.safetensors"
    terms = trainer.compute_loss(torch.randn(1, 4, 8, 8), trainer.backend.encode_text(["a cat"]), torch.Generator().manual_seed(0))
    assert torch.isfinite(terms.total)


def test_bf16_transformer_gets_float32_timesteps(tmp_path):
    trainer = ready_trainer("sd3", tmp_path, precision="bf16")
    network, seen = trainer.backend.network, []
    original = network.forward

    def spy(*args, **kwargs):
        seen.append((kwargs["hidden_states"].dtype, kwargs["timestep"].dtype, kwargs["timestep"].tolist()))
        return original(*args, **kwargs)

    network.forward = spy
    out = trainer.backend.predict(torch.randn(1, 16, 8, 8), torch.tensor([981.0]), trainer.backend.encode_text(["a"]))
    assert seen == [(torch.bfloat16, torch.float32, [981.0])] and out.dtype == torch.float32


def test_edm_schedulers_are_refused_and_per_channel_latent_normalisation_is_applied(tmp_path):
    """SDXL-architecture models with an EDM scheduler (Playground v2.5) pass the UNet check but are another model; a VAE
    with a per-channel latents_mean/latents_std is normalised as the SDXL pipeline decodes it (x * std / scaling + mean)."""
    folder = tmp_path / "edm"
    shutil.copytree(tiny_model("sdxl"), folder)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    config.update({"_class_name": "EDMDPMSolverMultistepScheduler"})
    config.pop("beta_schedule", None)
    scheduler.write_text(json.dumps(config))
    with pytest.raises(TrainingError, match="no DDPM beta schedule"):
        detect_model(str(folder))
    shutil.copy(tiny_model("sdxl") / "scheduler" / "scheduler_config.json", scheduler)
    vae = folder / "vae" / "config.json"
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 1.0, 2.0, 4.0]
    vae.write_text(json.dumps({**json.loads(vae.read_text()), "latents_mean": mean, "latents_std": std}))
    trainer = ready_trainer("sdxl", tmp_path, model=str(folder))
    raw = torch.randn(2, 4, 8, 8)
    scaling = trainer.backend.vae.config.scaling_factor
    expected = (raw - torch.tensor(mean).reshape(1, 4, 1, 1)) * scaling / torch.tensor(std).reshape(1, 4, 1, 1)
    assert torch.allclose(trainer.backend.normalise_latents(raw), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------ memory


def test_activation_count_of_the_memory_probe_equals_keeping_the_activations(tmp_path):
    """The probe drops every saved tensor at once; its count must equal the distinct storages a real graph keeps."""
    from training import memory

    trainer = ready_trainer("sdxl", tmp_path, gradient_checkpointing=False)
    backend, net = trainer.backend, trainer.backend.network
    exclude = {p.untyped_storage().data_ptr() for p in [*net.parameters(), *net.buffers()]}
    z = torch.randn(2, *trainer.latent_shape, requires_grad=True)
    t = torch.tensor([500.0, 500.0])

    def run():
        return backend.predict_pair(z, t, trainer.uncond, trainer.uncond)

    kept = []

    def keep(x):
        kept.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x):
        out = run()
    exact = {}
    for x in kept:  # all alive: the storage address identifies the storage
        storage = x.untyped_storage()
        if storage.data_ptr() not in exclude:
            exact[storage.data_ptr()] = storage.nbytes()
    del out
    kept.clear()
    counted = memory.count_saved_bytes(run, exclude)
    assert counted == sum(exact.values()) > 0


def test_gradient_checkpointing_is_on_only_when_the_step_would_not_fit(tmp_path, monkeypatch, capsys):
    from training import memory

    trainer = ready_trainer("sdxl", tmp_path / "roomy")
    assert not trainer.gradient_checkpointing and not trainer.backend.network.is_gradient_checkpointing
    assert "gradient checkpointing off (auto): a step needs about" in capsys.readouterr().out

    monkeypatch.setattr(memory, "free_bytes", lambda device, local=1: 1024)  # a device with 1 KiB free
    trainer = ready_trainer("sdxl", tmp_path / "tight")
    assert trainer.gradient_checkpointing and trainer.backend.network.is_gradient_checkpointing
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("gradient checkpointing"))
    assert line.startswith("gradient checkpointing on (auto, +2 forwards per image): a step needs about")
    assert "0.0 MiB free" in line

    trainer = ready_trainer("sdxl", tmp_path / "set", gradient_checkpointing=False)  # an explicit setting is obeyed
    assert not trainer.backend.network.is_gradient_checkpointing
    assert "gradient checkpointing off (set in the config)" in capsys.readouterr().out
