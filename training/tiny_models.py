"""Tiny random-weight diffusers pipelines and image datasets, built offline in seconds (tests and the benchmark).

The architectures are the real ones scaled down (real sizes in the comments): byte-level CLIP tokenizers need no hub
files, the VAE keeps the real x8 downsampling (64 px -> 8 x 8 latent). ``SDXL_UNET_CONFIG``, ``SD15_UNET_CONFIG``,
``SD_VAE_CONFIG`` and ``CLIP_VIT_L14_CONFIG`` are full-size configs, written out here because the hub is unreachable
(random weights; for throughput and memory only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

MAX_TOKENS = 77  # CLIP context length, as in the real models

#: SDXL base 1.0 UNet (unet/config.json of stabilityai/stable-diffusion-xl-base-1.0), 2.57 B parameters.
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
    "center_input_sample": False,
    "upcast_attention": None,
}


#: SD1.5's UNet (unet/config.json of runwayml/stable-diffusion-v1-5), 860 M parameters.
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
#: The SD1.x / SD2.x VAE (vae/config.json of the same repository), 84 M parameters.
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
#: CLIP ViT-L/14 (config.json of openai/clip-vit-large-patch14), 428 M parameters: the usual CLIP-score model.
CLIP_VIT_L14_CONFIG = {
    "text_config": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "max_position_embeddings": 77, "projection_dim": 768, "hidden_act": "quick_gelu"},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224,
                      "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"},
    "projection_dim": 768,
}


def byte_vocab() -> dict[str, int]:
    """A byte-level BPE vocabulary with no merges (any text tokenizes, one token per byte) plus CLIP's two specials."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):  # the GPT-2 / CLIP bytes_to_unicode table
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}  # 514 tokens


def make_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_vocab(), merges=[], pad_token=pad_token, model_max_length=MAX_TOKENS)


def clip_config(hidden: int, projection: int, layers: int = 2, heads: int = 2, vocab_size: int = 514):
    from transformers import CLIPTextConfig

    # eos must be the tokenizer's eos id: CLIP pools at the first eos token when eos_token_id != 2.
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, projection_dim=projection, max_position_embeddings=MAX_TOKENS,
                          hidden_act="quick_gelu", bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def tiny_vae(latent_channels: int = 4, scaling_factor: float = 0.18215, shift_factor: float | None = None, flow: bool = False):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8,
                         sample_size=64, scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=not flow,
                         use_post_quant_conv=not flow, force_upcast=False)


def make_sdxl(out: Path, prediction_type: str = "epsilon") -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    h1, h2, proj2, time_dim = 16, 16, 32, 8  # real: 768, 1280, 1280, 256
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=h1 + h2,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + proj2,
        norm_num_groups=32)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type=prediction_type, timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(4, 0.13025), text_encoder=CLIPTextModel(clip_config(h1, 16)),
                                     text_encoder_2=CLIPTextModelWithProjection(clip_config(h2, proj2)), tokenizer=make_tokenizer(),
                                     tokenizer_2=make_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(out)
    return out


def make_sd15(out: Path, prediction_type: str = "epsilon") -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    hidden = 32  # real: 768
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, cross_attention_dim=hidden, norm_num_groups=32)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=tiny_vae(4, 0.18215), text_encoder=CLIPTextModel(clip_config(hidden, hidden)), tokenizer=make_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def make_sd3(out: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64,  # the T5 width (4096 real); the CLIP concat is zero-padded to it
        caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                                    vae=tiny_vae(16, 1.5305, 0.0609, flow=True), text_encoder=CLIPTextModelWithProjection(clip_config(16, 16)),
                                    tokenizer=make_tokenizer(), text_encoder_2=CLIPTextModelWithProjection(clip_config(16, 16)),
                                    tokenizer_2=make_tokenizer(pad_token="!"), text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out)
    return out


def make_tiny_model(kind: str, out: str | Path, prediction_type: str = "epsilon") -> Path:
    """Write a tiny ``sdxl``, ``sd15`` or ``sd3`` pipeline folder to ``out`` and return its path."""
    import logging
    import warnings

    out = Path(out)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "sdxl":
            return make_sdxl(out, prediction_type)
        if kind == "sd15":
            return make_sd15(out, prediction_type)
        if kind == "sd3":
            return make_sd3(out)
    raise ValueError(f"unknown tiny model kind {kind!r}")


def make_tiny_clip(out: str | Path, image_size: int = 32) -> Path:
    """A tiny random CLIP (text and vision towers, 16 wide, projection 8; real ViT-L/14: 768 / 1024 / 768 at 224 px) with its
    tokenizer and image processor config, as a local folder for the reward variant."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    torch.manual_seed(0)
    text = clip_config(16, 8).to_dict()
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                              patch_size=8, projection_dim=8).to_dict()
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    make_tokenizer().save_pretrained(out)
    processor = {"image_processor_type": "CLIPImageProcessor", "crop_size": {"height": image_size, "width": image_size},
                 "size": {"shortest_edge": image_size}, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                 "image_std": [0.26862954, 0.26130258, 0.27577711]}
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=1))
    return out


def make_image_dataset(folder: str | Path, count: int = 6, size: int = 64, seed: int = 0, corrupt: int = 0, without_caption: int = 0,
                       manifest: bool = False) -> Path:
    """``count`` random-colour PNG images with captions; ``corrupt`` undecodable .png files (with captions);
    ``without_caption`` images lacking a caption. With ``manifest`` also writes ``manifest.jsonl`` (returned)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        base = torch.rand(3, 1, 1, generator=gen)
        pixels = (base + 0.3 * torch.rand(3, size, size + 8 * (i % 3), generator=gen)).clamp(0, 1)
        Image.fromarray((pixels.permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(folder / f"img{i:03d}.png")
        caption = f"a picture number {i} of {('red', 'green', 'blue')[i % 3]} things"
        (folder / f"img{i:03d}.txt").write_text(caption, encoding="utf-8")
        rows.append({"image": f"img{i:03d}.png", "caption": caption})
    for i in range(corrupt):
        (folder / f"broken{i:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
        (folder / f"broken{i:03d}.txt").write_text("a broken image", encoding="utf-8")
        rows.append({"image": f"broken{i:03d}.png", "caption": "a broken image"})
    for i in range(without_caption):
        Image.new("RGB", (size, size), (10 * i, 20, 30)).save(folder / f"nocap{i:03d}.png")
        rows.append({"image": f"nocap{i:03d}.png"})
    if manifest:
        path = folder / "manifest.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    return folder
