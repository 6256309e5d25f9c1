"""Learn to Guide's reward variant (``--l2g-reward clip``): the CLIP score of the guided x0-prediction, through the VAE decode
and CLIP, on a tiny CLIP built here. The score against CLIP's own forward pass, the local folder's checks, the gradient
that reaches the network (and nothing else) and agrees with finite differences, and a run that trains and records it."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
from training_fixtures import ROOT, make_config, one_thread, tiny_dataset, tiny_model

import annealing
from training.cli import main as cli_main
from training.config import TrainingError
from training.reward import CLIP_MEAN, CLIP_STD, ClipReward, check_clip_folder, decode_latents
from training.trainer import Trainer, train


@pytest.fixture(autouse=True)
def _single_thread():
    yield from one_thread()


@functools.cache
def tiny_clip():
    from training.tiny_models import make_tiny_clip

    return make_tiny_clip(ROOT / "clip")


def test_the_score_is_clips_cosine_of_the_preprocessed_image_and_the_caption():
    reward = ClipReward.from_folder(tiny_clip())
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=gen) * 2.4 - 1.2  # a little beyond [-1, 1]: clamped as a saved image would be
    captions = ["a red square", "a blue circle"]
    score = reward(images, captions)
    # by hand: [0, 1], bicubic to CLIP's 32 px, CLIP's mean and std; CLIP's own forward gives logit_scale x the cosine
    pixels = torch.nn.functional.interpolate(((images + 1) / 2).clamp(0, 1), size=(32, 32), mode="bicubic", antialias=True)
    pixels = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    tokens = reward.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = reward.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
    cosine = out.logits_per_image.diagonal() / reward.model.logit_scale.exp()
    torch.testing.assert_close(score.detach(), cosine, rtol=1e-4, atol=1e-5)
    assert score.shape == (2,) and bool((score.abs() <= 1).all())


def test_the_folder_is_checked_before_anything_loads(tmp_path):
    with pytest.raises(TrainingError, match="must be a local folder"):
        check_clip_folder(tmp_path / "missing")
    bad = tmp_path / "bad"
    shutil.copytree(tiny_clip(), bad)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(TrainingError, match="no model.safetensors") as info:
        check_clip_folder(bad)
    assert "\n" not in str(info.value)
    (bad / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(TrainingError, match="model_type is 'siglip'"):
        check_clip_folder(bad)
    assert check_clip_folder(tiny_clip()) == tiny_clip()


def test_decoding_inverts_the_backends_latent_scaling():
    from training.tiny_models import tiny_vae

    vae = tiny_vae(16, 1.5305, 0.0609, flow=True).eval()
    latents = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        expected = vae.decode(latents / 1.5305 + 0.0609).sample
        torch.testing.assert_close(decode_latents(vae, latents), expected)


def reward_trainer(tmp_path, weight=0.5, **overrides):
    config = make_config("sd15", tmp_path / "out", method="learn-to-guide", l2g_reward="clip", l2g_reward_model=str(tiny_clip()),
                         l2g_reward_weight=weight, **overrides)
    trainer = Trainer(config, progress=False)
    trainer.preflight()
    trainer.setup()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a network whose omega depends on its inputs, above the ReLU's kink
        net = trainer.accelerator.unwrap_model(trainer.mlp)
        net.head[-1].weight.copy_(0.3 * torch.randn(net.head[-1].weight.shape, generator=gen))
        net.head[-1].bias.fill_(4.0)
    return trainer


def test_the_rewards_gradient_reaches_only_the_network_and_is_the_scores_derivative(tmp_path):
    trainer = reward_trainer(tmp_path)
    backend, net = trainer.backend, trainer.accelerator.unwrap_model(trainer.mlp)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, *trainer.latent_shape, generator=gen)
    captions = ["a cat", "a dog"]
    cond = backend.encode_text(captions)
    draws = {"times": (torch.tensor([0.2, 0.5]), torch.tensor([0.8, 0.9])), "noise": torch.randn(2, 4, *trainer.latent_shape, generator=gen),
             "target_noise": torch.randn(2, 4, *trainer.latent_shape, generator=gen)}
    terms = trainer.compute_loss(x0, cond, None, captions, **draws)
    assert terms.reward is not None and float(terms.total.detach()) == pytest.approx(float(terms.consistency) - 0.5 * float(terms.reward), rel=1e-5)
    terms.total.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.parameters())
    frozen = [backend.network, backend.vae, backend.text["text_encoder"], trainer.parts.reward.model]
    assert all(not p.requires_grad and p.grad is None for module in frozen for p in module.parameters())

    # the reward's part of d(loss)/d(output bias) is -gamma_R d(mean R)/d omega (omega = the bias here: ReLU above its kink):
    # autograd through the VAE decode and CLIP against central finite differences of the score itself
    with_reward = float(net.head[-1].bias.grad)
    net.zero_grad()
    trainer.parts = trainer.parts.__class__(**{**trainer.parts.__dict__, "reward": None})
    plain = trainer.compute_loss(x0, cond, None, captions, **draws)
    plain.total.backward()
    reward_part = with_reward - float(net.head[-1].bias.grad)
    trainer.parts = trainer.parts.__class__(**{**trainer.parts.__dict__, "reward": ClipReward.from_folder(tiny_clip())})
    scores = []
    for h in (0.3, -0.3):
        with torch.no_grad():
            net.head[-1].bias.add_(h)
            scores.append(float(trainer.compute_loss(x0, cond, None, captions, **draws).reward))
            net.head[-1].bias.sub_(h)
    numeric = -0.5 * (scores[0] - scores[1]) / 0.6  # (a wide step: float32 scores quantise a narrow one)
    assert reward_part == pytest.approx(numeric, rel=2e-2, abs=1e-7) and abs(numeric) > 1e-6


def test_a_reward_run_trains_logs_the_clip_score_and_records_it(tmp_path):
    result = train(make_config("sd15", tmp_path / "run", method="learn-to-guide", l2g_reward="clip", l2g_reward_model=str(tiny_clip()),
                               l2g_reward_weight=2.0), progress=False)
    assert result.steps == 2 and result.nan_losses == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()[1:]]
    assert all(-1 <= r["clip_score"] <= 1 and "consistency" in r for r in rows)
    record = annealing.load_guidance_model(result.checkpoint).metadata.training["reward"]
    assert record == {"kind": "clip", "weight": 2.0, "model": "clip"}


def test_a_bad_reward_folder_fails_before_any_model_loads(tmp_path, capsys):
    common = ["--method", "learn-to-guide", "--model", str(tiny_model("sd15")), "--dataset", str(tiny_dataset()), "--output",
              str(tmp_path / "out"), "--quiet", "--l2g-reward", "clip"]
    capsys.readouterr()
    assert cli_main(common) == 2
    assert "l2g_reward clip needs l2g_reward_model" in capsys.readouterr().err
    assert cli_main(common + ["--l2g-reward-model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "must be a local folder" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
