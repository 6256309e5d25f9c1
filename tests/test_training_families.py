"""The model families behind one interface: detection from configs, conditioning, latents, the network call and the grid
of each new family (Wan 2.1, Wan 2.2 TI2V-5B and A14B, Qwen-Image, Chroma) against its diffusers pipeline, written out
here from the pipelines' code; SD3.5's configs through the SD3 backend; and that a new family is its own file plus one
registry line."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from training_fixtures import one_thread, tiny_model

from annealing.training_grid import FlowGrid
from training.algorithm import annealing_loss
from training.backends import REGISTRY, TextCondition, detect_model, load_backend
from training.errors import TrainingError

REPO = Path(__file__).resolve().parents[1]
NEW = ("wan21", "wan22", "wan22_a14b", "qwen_image", "chroma")


@pytest.fixture(autouse=True)
def _single_thread():
    yield from one_thread()


_BACKENDS: dict = {}


def backend(kind: str, frames: int = 5, expert: str = "auto", resolution: int = 64):
    """A loaded tiny backend (float32, CPU), once per test session."""
    key = (kind, frames, expert, resolution)
    if key not in _BACKENDS:
        info = detect_model(tiny_model(kind))
        _BACKENDS[key] = load_backend(info, device="cpu", dtype=torch.float32, resolution=resolution, frames=frames if info.spec.video else 1,
                                      expert=expert)
    return _BACKENDS[key]


# ------------------------------------------------------------------------------------------------------------ detection


def test_each_family_is_detected_from_its_configs_alone(tmp_path):
    expected = {  # family, latent shape at 64 px (and 5 frames for Wan), what the configs say
        "wan21": ("wan21", (16, 2, 8, 8), {}),
        "wan22": ("wan22", (48, 2, 4, 4), {"variant": "ti2v_5b", "boundary_ratio": None, "expand_timesteps": True}),
        "wan22_a14b": ("wan22", (16, 2, 8, 8), {"variant": "a14b", "boundary_ratio": 0.875, "expand_timesteps": False}),
        "qwen_image": ("qwen_image", (16, 1, 8, 8), {}),
        "chroma": ("chroma", (16, 8, 8), {}),
        "sd35": ("sd3", (16, 8, 8), {}),
    }
    for kind, (family, shape, details) in expected.items():
        configs = tmp_path / kind  # only the JSON files: detection loads nothing
        shutil.copytree(tiny_model(kind), configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        info = detect_model(configs)
        assert (info.family, info.prediction_type, info.prediction_space, info.timestep_convention) == (family, "flow", "velocity", "sigma_x1000")
        assert info.latent_shape(64, 5 if info.spec.video else 1) == shape and info.details == details
    info = detect_model(tiny_model("wan21"))
    with pytest.raises(TrainingError, match=r"frames must be 1 \+ 4 k"):
        info.latent_shape(64, 4)
    with pytest.raises(TrainingError, match="not a multiple of 16"):
        info.latent_shape(72, 5)
    with pytest.raises(TrainingError, match="image model; frames must be 1"):
        detect_model(tiny_model("qwen_image")).latent_shape(64, 5)


def test_what_a_family_cannot_train_is_a_one_line_error(tmp_path):
    def variant(kind, name, edit):
        folder = tmp_path / name
        shutil.copytree(tiny_model(kind), folder, ignore=shutil.ignore_patterns("*.safetensors"))
        edit(folder)
        return folder

    def set_json(path, **changes):
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    cases = [
        (variant("wan21", "i2v", lambda f: set_json(f / "model_index.json", _class_name="WanImageToVideoPipeline")), "only text-to-video"),
        (variant("wan21", "std", lambda f: set_json(f / "vae" / "config.json", latents_std=[1.0] * 15)), "latents_std must be 16 numbers"),
        (variant("qwen_image", "edit", lambda f: set_json(f / "model_index.json", _class_name="QwenImageEditPipeline")), "only text-to-image"),
        (variant("qwen_image", "distilled", lambda f: set_json(f / "transformer" / "config.json", guidance_embeds=True)), "guidance-distilled"),
        (variant("chroma", "karras", lambda f: set_json(f / "scheduler" / "scheduler_config.json", time_shift_type="cubic")), "time_shift_type"),
        (variant("wan22_a14b", "boundary", lambda f: set_json(f / "model_index.json", boundary_ratio=1.5)), "boundary_ratio in"),
    ]
    for folder, pattern in cases:
        with pytest.raises(TrainingError, match=pattern) as info:
            detect_model(folder)
        assert "\n" not in str(info.value)
    a14b = detect_model(tiny_model("wan22_a14b"))
    with pytest.raises(TrainingError, match="train one checkpoint per expert with --expert high"):
        a14b.spec.check_options(a14b, "auto")
    with pytest.raises(TrainingError, match="--expert low applies to two-expert models"):
        detect_model(tiny_model("wan21")).spec.check_options(detect_model(tiny_model("wan21")), "low")


def test_sd35_medium_and_large_configs_go_through_the_sd3_backend(tmp_path):
    """SD3.5 medium (dual attention in layers 0-12, RMS qk norm) and large (qk norm): the same transformer class, call and
    text encoders as SD3; the full-size configs detect as sd3 with SD3's widths, and build (on the meta device) as such."""
    from diffusers import SD3Transformer2DModel

    from training.tiny_models import SD35_LARGE_CONFIG, SD35_MEDIUM_CONFIG

    for name, config, billions in (("medium", SD35_MEDIUM_CONFIG, 2.2), ("large", SD35_LARGE_CONFIG, 8.0)):
        folder = tmp_path / name
        shutil.copytree(tiny_model("sd3"), folder, ignore=shutil.ignore_patterns("*.safetensors"))
        (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", **config}))
        info = detect_model(folder)
        assert info.family == "sd3" and info.condition_width() == (4096, 2048) and info.latent_shape(1024) == (16, 128, 128)
        with torch.device("meta"):
            net = SD3Transformer2DModel(**config)
        assert sum(p.numel() for p in net.parameters()) > billions * 1e9
        assert (net.transformer_blocks[0].attn2 is not None) == bool(config["dual_attention_layers"])
        assert net.transformer_blocks[0].attn.norm_q is not None  # qk norm
    # the tiny SD3.5 (dual attention + qk norm) conditions as the pipeline does and predicts through the backend
    from diffusers import StableDiffusion3Pipeline

    sd35 = backend("sd35")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model("sd35"), text_encoder_3=None, tokenizer_3=None)
    embeds, negative, pooled, _ = pipe.encode_prompt(["a red cube"], None, None, device="cpu", do_classifier_free_guidance=True)
    ours = sd35.encode_text(["a red cube"])
    assert torch.allclose(ours.embeds, embeds, atol=1e-6) and torch.allclose(ours.pooled, pooled, atol=1e-6)
    assert sd35.network.transformer_blocks[0].attn2 is not None


# ------------------------------------------------------------------------------------------------------------ conditioning


PROMPTS = ["a red cube", "two green spheres rolling on a wooden table"]


def test_wan_conditioning_is_umt5_cut_to_the_prompt_and_zero_padded_to_512():
    wan = backend("wan21")
    tok, te = wan.text["tokenizer"], wan.text["text_encoder"]
    inputs = tok(PROMPTS, padding="max_length", max_length=512, truncation=True, add_special_tokens=True, return_attention_mask=True,
                 return_tensors="pt")
    with torch.no_grad():
        hidden = te(inputs.input_ids, inputs.attention_mask).last_hidden_state
    expected = torch.zeros_like(hidden)
    for i, n in enumerate(inputs.attention_mask.sum(dim=1).tolist()):
        expected[i, :n] = hidden[i, :n]  # WanPipeline._get_t5_prompt_embeds: real tokens, then zeros
    ours = wan.encode_text(PROMPTS)
    assert ours.embeds.shape == (2, 512, 32) and ours.mask is None and torch.allclose(ours.embeds, expected, atol=1e-6)
    assert ours.embeds[0, 11:].abs().sum() == 0  # "a red cube" is 10 bytes + </s>
    from diffusers import WanPipeline

    _, negative = WanPipeline.from_pretrained(tiny_model("wan21")).encode_prompt(PROMPTS[:1], device="cpu", max_sequence_length=512)  # __call__ passes 512
    assert torch.allclose(wan.unconditional().embeds, negative, atol=1e-6)  # the pipeline's default negative prompt ""


def test_qwen_image_and_chroma_conditioning_match_their_pipelines():
    from diffusers import ChromaPipeline, QwenImagePipeline

    qwen = backend("qwen_image")
    pipe = QwenImagePipeline.from_pretrained(tiny_model("qwen_image"))
    embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu")
    ours = qwen.encode_text(PROMPTS)
    assert torch.allclose(ours.embeds, embeds, atol=1e-6) and torch.equal(ours.mask, mask)
    template_tokens = len(pipe.tokenizer(pipe.prompt_template_encode.format(PROMPTS[1])).input_ids)
    assert ours.tokens == template_tokens - 34  # the chat template's first 34 tokens are dropped
    single, none_mask = pipe.encode_prompt([""], device="cpu")
    assert none_mask is None and torch.allclose(qwen.unconditional().embeds, single, atol=1e-6)
    assert qwen.unconditional().mask.bool().all()  # kept as ones so that it can be padded to a prompt's length

    chroma = backend("chroma")
    pipe = ChromaPipeline.from_pretrained(tiny_model("chroma"))
    embeds, _, mask, negative, _, negative_mask = pipe.encode_prompt(PROMPTS, negative_prompt="", device="cpu")
    ours = chroma.encode_text(PROMPTS)
    assert torch.allclose(ours.embeds, embeds, atol=1e-6) and torch.equal(ours.mask, mask)
    assert ours.mask[0].sum() == 12  # 10 bytes + </s> + the one padding token Chroma keeps
    assert torch.allclose(chroma.unconditional().embeds, negative[:1], atol=1e-6) and torch.equal(chroma.unconditional().mask, negative_mask[:1])


# ------------------------------------------------------------------------------------------------------------ latents


def test_latents_are_normalised_per_channel_or_by_scale_and_shift():
    for kind, pixels in (("wan21", torch.rand(1, 3, 5, 64, 64)), ("qwen_image", torch.rand(1, 3, 64, 64)), ("chroma", torch.rand(1, 3, 64, 64))):
        b = backend(kind)
        x = pixels * 2 - 1
        vae_in = x.unsqueeze(2) if kind == "qwen_image" else x  # Qwen-Image's VAE takes one frame of a video
        with torch.no_grad():
            raw = b.vae.encode(vae_in).latent_dist.sample(generator=torch.Generator().manual_seed(7))
        config = b.vae.config
        if kind == "chroma":
            expected = (raw - config.shift_factor) * config.scaling_factor
        else:
            shape = (1, -1, 1, 1, 1)
            expected = (raw - torch.tensor(config.latents_mean).reshape(shape)) / torch.tensor(config.latents_std).reshape(shape)
        assert torch.allclose(b.encode_images(x, torch.Generator().manual_seed(7)), expected, atol=1e-5)
        assert tuple(expected.shape[1:]) == b.sample_shape
        mean, std = b.latent_distribution(x)  # the precomputed path draws what the VAE draws
        assert torch.equal(b.latents_from_distribution(mean, std, torch.Generator().manual_seed(7)), b.encode_images(x, torch.Generator().manual_seed(7)))


# ------------------------------------------------------------------------------------------------------------ the network call


def pipeline_call(kind: str, net, z, t, cond: TextCondition) -> torch.Tensor:
    """One prediction as the family's pipeline makes it (one condition, batch B), written out from the pipeline code."""
    if kind.startswith("wan"):
        timestep = t
        if kind == "wan22":  # expand_timesteps: one timestep per (1, 2, 2) patch of the latent
            frames, height, width = z.shape[2:]
            mask = torch.ones(frames, height, width)
            timestep = torch.stack([(mask[:, ::2, ::2] * ti).flatten() for ti in t])
        return net(hidden_states=z, timestep=timestep, encoder_hidden_states=cond.embeds).sample
    batch, channels = z.shape[:2]
    height, width = z.shape[-2:]
    packed = z.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, channels * 4)
    if kind == "qwen_image":
        out = net(hidden_states=packed, timestep=t / 1000, encoder_hidden_states=cond.embeds, encoder_hidden_states_mask=None,
                  img_shapes=[[(1, height // 2, width // 2)]] * batch).sample
    else:
        ids = torch.zeros(height // 2, width // 2, 3)
        ids[..., 1] += torch.arange(height // 2)[:, None]
        ids[..., 2] += torch.arange(width // 2)[None, :]
        mask = torch.cat([cond.mask, torch.ones(batch, packed.shape[1])], dim=1)
        out = net(hidden_states=packed, timestep=t / 1000, encoder_hidden_states=cond.embeds, txt_ids=torch.zeros(cond.tokens, 3),
                  img_ids=ids.reshape(-1, 3), attention_mask=mask).sample
    out = out.reshape(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)
    return out.unsqueeze(2) if kind == "qwen_image" else out


@pytest.mark.parametrize("kind", NEW)
def test_one_call_of_batch_2b_equals_the_pipelines_two_calls(kind):
    """uncond and cond in one network call (Qwen-Image's prompts of different lengths padded and masked) give what the
    pipeline's two separate calls give; pass 1 runs without a graph, pass 2 with one."""
    b = backend(kind, expert="high" if kind == "wan22_a14b" else "auto")
    gen = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, *b.sample_shape, generator=gen), torch.tensor([700.0, 250.0])
    cond, uncond = b.encode_text(PROMPTS), b.unconditional()
    if kind == "qwen_image":
        assert uncond.tokens != cond.tokens  # the case that needs padding
    calls, original = [], b.network.forward

    def spy(*args, **kwargs):
        calls.append((kwargs["hidden_states"].shape[0], kwargs["hidden_states"].requires_grad))
        return original(*args, **kwargs)

    b.network.forward = spy
    try:
        pred_u, pred_c = b.predict_pair(z, t, cond, uncond)
        b.predict_pair(z.clone().requires_grad_(), t, cond, uncond)
    finally:
        del b.network.forward
    assert calls == [(4, False), (4, True)]
    with torch.no_grad():
        for prompt, got in ((uncond.expand(2), pred_u), (cond, pred_c)):
            if kind == "qwen_image":  # each prompt alone, unpadded, as the pipeline passes it
                rows = [TextCondition(prompt.embeds[i : i + 1, : int(prompt.mask[i].sum())]) for i in range(2)]
                want = torch.cat([pipeline_call(kind, b.network, z[i : i + 1], t[i : i + 1], rows[i]) for i in range(2)])
            else:
                want = pipeline_call(kind, b.network, z, t, prompt)
            assert torch.allclose(got, want, atol=2e-5), float((got - want).abs().max())


# ------------------------------------------------------------------------------------------------------------ grids


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def test_wan_trains_on_the_nearest_grid_to_its_unipc_schedule_and_says_so():
    wan = backend("wan21")
    grid = wan.grid(20)
    u = 1 - torch.arange(20, dtype=torch.float64) / 20  # the simple spacing at the folder's flow_shift 3
    assert grid.training_grid == FlowGrid(num_steps=20, shift=3.0, spacing="simple")
    assert torch.allclose(grid.sigmas.double(), shifted(u, 3.0), atol=1e-6)
    scheduler = wan.scheduler.__class__.from_config(wan.scheduler.config)
    scheduler.set_timesteps(20)  # UniPC: u = linspace(1, 1/T, N + 1)[:-1]
    gap = (scheduler.sigmas[:-1].double() - grid.sigmas.double()).abs().max()
    assert 0 < gap < 3 * 1e-3  # within 1/T in u, times the shift's slope
    assert "UniPC flow spacing" in wan.grid_note and wan.provenance()["grid_note"] == wan.grid_note


def test_qwen_image_grid_is_the_dynamic_shift_at_the_trained_resolution_without_the_terminal_stretch():
    from diffusers import FlowMatchEulerDiscreteScheduler

    qwen = backend("qwen_image")
    grid = qwen.grid(30)
    tokens = (64 // 16) ** 2
    mu = 0.5 + (tokens - 256) * (0.9 - 0.5) / (8192 - 256)  # QwenImagePipeline's calculate_shift with the folder's config
    u = torch.linspace(1, 1 / 30, 30, dtype=torch.float64)
    assert grid.training_grid == FlowGrid(num_steps=30, shift=math.exp(mu), spacing="simple")
    assert torch.allclose(grid.sigmas.double(), shifted(u, math.exp(mu)), atol=1e-6)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_model("qwen_image"), subfolder="scheduler")
    scheduler.set_timesteps(30, sigmas=u.numpy(), mu=mu)  # the pipeline's own grid ends at shift_terminal 0.02
    assert abs(float(scheduler.sigmas[-2]) - 0.02) < 1e-6 and "shift_terminal 0.02" in qwen.grid_note
    record = qwen.provenance()
    assert record["shift_rule"]["kind"] == "dynamic" and record["image_tokens"] == tokens and record["flow_shift"] == pytest.approx(math.exp(mu))
    assert backend("qwen_image", resolution=128).grid(30).training_grid.shift == pytest.approx(math.exp(0.5 + (64 - 256) * 0.4 / 7936))


def test_chroma_grid_is_its_pipelines_grid_exactly():
    from diffusers import FlowMatchEulerDiscreteScheduler

    grid = backend("chroma").grid(26)
    mu = 0.5 + (16 - 256) * (1.15 - 0.5) / (4096 - 256)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_model("chroma"), subfolder="scheduler")
    scheduler.set_timesteps(26, sigmas=torch.linspace(1, 1 / 26, 26).numpy(), mu=mu)
    assert torch.allclose(grid.training_grid.sigmas(), scheduler.sigmas.double(), atol=1e-6) and backend("chroma").grid_note is None


def test_a14b_experts_train_on_their_own_part_of_the_grid():
    high, low = backend("wan22_a14b", expert="high"), backend("wan22_a14b", expert="low")
    assert high.network is not low.network
    grid_high, grid_low = high.grid(40), low.grid(40)
    boundary = int((grid_high.model_timesteps >= 875).sum())  # WanPipeline: t >= boundary_ratio x 1000 goes to `transformer`
    assert (grid_high.start, grid_high.stop) == (0, boundary) and (grid_low.start, grid_low.stop) == (boundary, 40)
    assert 0 < boundary < 40 and high.provenance()["expert_sigma_range"] == [0.875, 1.0] and low.provenance()["expert_network"] == "transformer_2"
    for b, grid, (lo, hi) in ((high, grid_high, (0, boundary)), (low, grid_low, (boundary, 39))):
        x0 = torch.randn(64, *b.sample_shape)
        cond = b.encode_text(["a"]).expand(64)
        terms = annealing_loss(b, _mlp(), x0, cond, b.unconditional(), grid, generator=torch.Generator().manual_seed(0))
        assert lo <= int(terms.grid_index.min()) and int(terms.grid_index.max()) < hi
        assert len(set(terms.grid_index.tolist())) > 3


def test_a14b_experts_train_learn_to_guide_where_their_network_runs():
    """Learn to Guide's continuous (s, t): an expert's t stays within its own grid points (the frozen model runs at t only),
    s anywhere below t by at least the gap; the whole region for a model without experts."""
    import annealing
    from training.learn_to_guide import TimeRegion, learn_to_guide_loss

    region = TimeRegion()
    high, low = backend("wan22_a14b", expert="high"), backend("wan22_a14b", expert="low")
    grid_high, grid_low = high.grid(40), low.grid(40)
    sigmas = grid_high.model_timesteps.double() / 1000  # flow: normalised time is sigma
    boundary = grid_high.stop
    assert region.expert_range(backend("wan21").grid(40), 1000.0) is None
    assert region.expert_range(grid_high, 1000.0) == pytest.approx((float(sigmas[boundary - 1]), region.t_max))
    assert region.expert_range(grid_low, 1000.0) == pytest.approx((region.s_min + region.delta, float(sigmas[boundary])))
    net = annealing.LearnToGuideNet(annealing.LearnToGuideConfig(prompt_dim=32, prompt_embedding="mean_tokens"))
    for b, grid in ((high, grid_high), (low, grid_low)):
        low_t, high_t = region.expert_range(grid, 1000.0)
        x0 = torch.randn(32, *b.sample_shape)
        cond = b.encode_text(["a"]).expand(32)
        terms = learn_to_guide_loss(b, net, x0, cond, b.unconditional(), grid, torch.randn(32, 32), particles=2,
                                    generator=torch.Generator().manual_seed(0))
        assert float(terms.t.min()) >= low_t - 1e-6 and float(terms.t.max()) <= high_t + 1e-6
        assert float(terms.s.min()) >= region.s_min - 1e-6 and bool((terms.t - terms.s >= region.delta - 1e-6).all())
        assert float(terms.t.max() - terms.t.min()) > 0.25 * (high_t - low_t)  # spread over the range, not one point


def _mlp():
    import annealing

    return annealing.GuidanceScaleModel()


# ------------------------------------------------------------------------------------------------------------ the registry


TOY_FAMILY = '''
"""A toy family for the registry test: SD3's transformer under another pipeline name, trained from precomputed
embeddings only (no text encoders)."""

import torch

from annealing.training_grid import FlowGrid
from training.backends.interface import FamilyBackend, ModelInfo
from training.backends.loading import load_components


class ToyFlow(FamilyBackend):
    key = "toyflow"
    title = "Toy flow model"
    default_resolution = 64
    prediction = "velocity"

    @classmethod
    def matches(cls, index):
        return index.pipeline_class == "ToyFlowPipeline"

    @classmethod
    def describe(cls, index):
        return ModelInfo(family=cls.key, prediction_type="flow", pipeline_class=index.pipeline_class, scheduler_class="none",
                         scheduler_config={}, source=index.source, config_folder=index.folder,
                         network_config=index.config("transformer"), vae_config=index.config("vae"))

    @classmethod
    def widths(cls, info):
        return info.network_config["joint_attention_dim"], info.network_config["pooled_projection_dim"]

    @classmethod
    def training_grid(cls, info, num_steps, flow_spacing="diffusers", resolution=None):
        return FlowGrid(num_steps=num_steps, shift=2.0, spacing="simple")

    @classmethod
    def load(cls, info, options):
        network, vae, _, _ = load_components(info, options, text_parts=())
        return cls(info, network, vae, None, options.dtype, options.device, options.cads, options.resolution, "empty_prompt")

    def predict(self, z, model_timestep, cond):
        cond = cond.expand(z.shape[0]) if cond.batch == 1 else cond
        with self._grad_context(z):
            return self.network(hidden_states=z, timestep=model_timestep, encoder_hidden_states=cond.embeds,
                                pooled_projections=cond.pooled).sample.float()


FAMILY = ToyFlow
'''


def test_a_new_family_needs_only_its_own_file_and_one_registry_line(tmp_path, monkeypatch):
    """A family written in a file of its own, registered with one line, is detected, trains through the trainer (from
    precomputed embeddings) and writes its key into the checkpoint; nothing else in the package knows it."""
    from training_fixtures import make_config

    import annealing
    from training.data import scan_dataset, write_embeddings
    from training.tiny_models import make_image_dataset
    from training.trainer import train

    (tmp_path / "toy_family_module.py").write_text(TOY_FAMILY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("training.backends.registry.REGISTRY", {"toyflow": "toy_family_module", **REGISTRY})  # the one line
    folder = tmp_path / "toy"
    shutil.copytree(tiny_model("sd3"), folder, ignore=shutil.ignore_patterns("text_encoder*", "tokenizer*"))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if not k.startswith(("text_", "tokenizer"))}
                                                         | {"_class_name": "ToyFlowPipeline"}))
    assert detect_model(folder).family == "toyflow"
    data = make_image_dataset(tmp_path / "data", count=4)
    gen = torch.Generator().manual_seed(0)

    def encode(captions):
        return {"embeds": torch.randn(len(captions), 5, 64, generator=gen), "pooled": torch.randn(len(captions), 32, generator=gen)}

    write_embeddings(tmp_path / "emb", [s.caption for s in scan_dataset(data).samples], encode, encode([""]), model_family="toyflow",
                     base_model="toy", progress=False)
    result = train(make_config("sd3", tmp_path / "out", model=str(folder), dataset=str(data), embeddings=str(tmp_path / "emb")), progress=False)
    meta = annealing.load_guidance_model(result.checkpoint).metadata
    assert meta.model_family == "toyflow" and meta.prediction_space == "velocity" and meta.training_grid == FlowGrid(num_steps=50, shift=2.0, spacing="simple")


def test_no_part_of_the_package_but_the_families_names_a_family():
    """The trainer, data, embed command, memory probe, algorithm and config call the interface; family keys appear only in
    the family modules, the registry and the tiny-model builders."""
    keys = [key for key in REGISTRY if key not in ("sd15",)] + ["sd15"]
    pattern = re.compile("|".join(rf"[\"']{re.escape(k)}[\"']" for k in keys))
    for name in ("trainer.py", "data.py", "cli.py", "memory.py", "algorithm.py", "config.py", "video.py", "learn_to_guide.py"):
        text = (REPO / "training" / name).read_text()
        assert not pattern.search(text), f"training/{name} names a family: {pattern.search(text).group(0)}"


def test_a_single_file_network_loads_through_its_config_folder(tmp_path, monkeypatch):
    """ComfyUI keeps a Wan/Qwen-Image/Chroma network as one .safetensors file (models/diffusion_models): it is read with
    diffusers' from_single_file, configs and the other components from --config-folder, offline. Converting a real
    file is diffusers' code; this checks our wiring (as the SD single-file test does)."""
    from diffusers import WanTransformer3DModel

    calls = []

    def from_single_file(cls, path, **kwargs):
        calls.append((path, kwargs))
        return cls.from_pretrained(kwargs["config"], subfolder=kwargs["subfolder"], local_files_only=True)

    monkeypatch.setattr(WanTransformer3DModel, "from_single_file", classmethod(from_single_file))
    weights = tmp_path / "wan2.1_t2v_1.3B_fp16.safetensors"
    weights.write_bytes(b"placeholder")
    info = detect_model(weights, tiny_model("wan21"))
    assert info.family == "wan21" and info.single_file and info.base_model == weights.name
    loaded = load_backend(info, device="cpu", dtype=torch.float32, resolution=64, frames=5)
    (path, kwargs), = calls
    assert path == str(weights) and kwargs["config"] == str(tiny_model("wan21")) and kwargs["subfolder"] == "transformer"
    assert kwargs["local_files_only"] is True and loaded.vae is not None and loaded.text is not None


def test_each_family_runs_in_the_half_precision_its_network_takes():
    """auto on a GPU is float16 (||delta|| within 1 %, docs/training.md) except for the networks that overflow it, which
    ComfyUI runs in bf16 or fp32 only (Qwen-Image, Wan 2.2 TI2V-5B); asking those for fp16 is a one-line error."""
    from training.run_parts import resolve_precision

    gpu = torch.device("cuda")  # a device object only: nothing runs on it
    expected = {"sd15": torch.float16, "sdxl": torch.float16, "sd3": torch.float16, "wan21": torch.float16, "wan22": torch.bfloat16,
                "wan22_a14b": torch.float16, "qwen_image": torch.bfloat16, "chroma": torch.float16}
    for kind, dtype in expected.items():
        info = detect_model(tiny_model(kind))
        assert resolve_precision("auto", gpu, info.spec.half_precision(info)) == dtype, kind
        assert resolve_precision("auto", torch.device("cpu"), info.spec.half_precision(info)) == torch.float32
    info = detect_model(tiny_model("qwen_image"))
    with pytest.raises(TrainingError, match="overflows float16"):
        info.spec.check_options(info, precision="fp16")
    info.spec.check_options(info, precision="bf16")


def test_networks_built_for_the_benchmarks_are_cast_as_the_trainer_loads_them():
    """A Wan transformer keeps its norms, time embedder and modulation tables in float32 when loaded in bf16; the
    benchmarks' networks, built from a config, are cast the same way, so they measure the precision training runs in."""
    from diffusers import WanTransformer3DModel

    from training.backends.loading import cast_like_from_pretrained

    loaded = WanTransformer3DModel.from_pretrained(tiny_model("wan21"), subfolder="transformer", torch_dtype=torch.bfloat16)
    built = cast_like_from_pretrained(WanTransformer3DModel.from_pretrained(tiny_model("wan21"), subfolder="transformer"), torch.bfloat16)
    dtypes = {k: v.dtype for k, v in loaded.state_dict().items()}
    assert dtypes == {k: v.dtype for k, v in built.state_dict().items()}
    assert torch.float32 in dtypes.values() and torch.bfloat16 in dtypes.values()
