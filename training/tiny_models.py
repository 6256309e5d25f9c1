"""Tiny random-weight diffusers pipelines, image datasets and video clips, built offline in seconds (tests and the benchmarks).

The architectures are the real ones scaled down (real sizes in the comments): byte-level tokenizers (CLIP, T5 and Qwen2
style) need no hub files, the VAEs keep the real downsampling (64 px -> 8 x 8 latents; Wan 2.2's x16 VAE: 4 x 4), the
video VAEs the real x4 temporal one. ``SDXL_UNET_CONFIG``, ``SD15_UNET_CONFIG``, ``SD_VAE_CONFIG``, ``CLIP_VIT_L14_CONFIG``
and the other ``*_CONFIG`` dicts are full-size configs, written out here because the hub is unreachable (random weights;
for throughput, memory and precision only).
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


def make_sd3(out: Path, sd35: bool = False) -> Path:
    """SD3 medium scaled down; ``sd35``: with SD3.5 medium's extras (dual attention in the first layer, RMS qk norm)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    extra = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if sd35 else {}
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64,  # the T5 width (4096 real); the CLIP concat is zero-padded to it
        caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16, **extra)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                                    vae=tiny_vae(16, 1.5305, 0.0609, flow=True), text_encoder=CLIPTextModelWithProjection(clip_config(16, 16)),
                                    tokenizer=make_tokenizer(), text_encoder_2=CLIPTextModelWithProjection(clip_config(16, 16)),
                                    tokenizer_2=make_tokenizer(pad_token="!"), text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out)
    return out


TINY_KINDS = ("sdxl", "sd15", "sd3", "sd35", "wan21", "wan22", "wan22_a14b", "qwen_image", "chroma")


def make_tiny_model(kind: str, out: str | Path, prediction_type: str = "epsilon") -> Path:
    """Write a tiny pipeline folder of a family (``sdxl``, ``sd15``, ``sd3``, ``wan21``, ``wan22`` (TI2V-5B),
    ``qwen_image``, ``chroma``) or variant (``sd35``: SD3.5-medium's dual attention and qk norm; ``wan22_a14b``: two
    experts) to ``out`` and return its path."""
    import logging
    import warnings

    out = Path(out)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    builders = {"sdxl": lambda: make_sdxl(out, prediction_type), "sd15": lambda: make_sd15(out, prediction_type), "sd3": lambda: make_sd3(out),
                "sd35": lambda: make_sd3(out, sd35=True), "wan21": lambda: make_wan(out, "wan21"), "wan22": lambda: make_wan(out, "wan22"),
                "wan22_a14b": lambda: make_wan(out, "wan22_a14b"), "qwen_image": lambda: make_qwen_image(out), "chroma": lambda: make_chroma(out)}
    if kind not in builders:
        raise ValueError(f"unknown tiny model kind {kind!r}; known: {', '.join(TINY_KINDS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return builders[kind]()


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


# ------------------------------------------------------------------------------------------------ full-size configs
#: SD3.5 medium and large transformers (transformer/config.json of stabilityai/stable-diffusion-3.5-medium / -large).
SD35_MEDIUM_CONFIG = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24, "attention_head_dim": 64,
                      "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
                      "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"}
SD35_LARGE_CONFIG = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 38, "attention_head_dim": 64,
                     "num_attention_heads": 38, "joint_attention_dim": 4096, "caption_projection_dim": 2432, "pooled_projection_dim": 2048,
                     "pos_embed_max_size": 192, "dual_attention_layers": (), "qk_norm": "rms_norm"}
#: WanTransformer3DModel configs (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, -14B-Diffusers, Wan2.2-TI2V-5B-Diffusers; A14B's two
#: experts are each the 14B config). 1.42 B, 14.3 B and 5.0 B parameters.
WAN21_1_3B_CONFIG = {"patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16, "out_channels": 16,
                     "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
                     "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}
WAN21_14B_CONFIG = dict(WAN21_1_3B_CONFIG, num_attention_heads=40, ffn_dim=13824, num_layers=40)
WAN22_5B_CONFIG = dict(WAN21_1_3B_CONFIG, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48)
#: QwenImageTransformer2DModel (Qwen/Qwen-Image), 20.4 B parameters.
QWEN_IMAGE_CONFIG = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128, "num_attention_heads": 24,
                     "joint_attention_dim": 3584, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)}
#: ChromaTransformer2DModel (lodestones/Chroma1-HD), 8.9 B parameters.
CHROMA_CONFIG = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
                 "joint_attention_dim": 4096, "axes_dims_rope": (16, 56, 56), "approximator_num_channels": 64, "approximator_hidden_dim": 5120,
                 "approximator_layers": 5}
#: Each family's largest full-size network: (diffusers class name, config) for the benchmarks (random weights).
FULL_SIZE = {"sd3": ("SD3Transformer2DModel", SD35_LARGE_CONFIG), "sd35_medium": ("SD3Transformer2DModel", SD35_MEDIUM_CONFIG),
             "wan21_1.3b": ("WanTransformer3DModel", WAN21_1_3B_CONFIG), "wan21": ("WanTransformer3DModel", WAN21_14B_CONFIG),
             "wan22": ("WanTransformer3DModel", WAN22_5B_CONFIG), "wan22_a14b": ("WanTransformer3DModel", WAN21_14B_CONFIG),
             "qwen_image": ("QwenImageTransformer2DModel", QWEN_IMAGE_CONFIG), "chroma": ("ChromaTransformer2DModel", CHROMA_CONFIG)}


# ------------------------------------------------------------------------------------------------ tokenizers
def byte_bpe_tokenizer(specials: list[str], pad: str, eos: str | None, append_eos: bool, max_length: int):
    """A byte-level BPE tokenizer with no merges (any text, one token per byte) and the given special tokens first; with
    ``append_eos`` every sequence ends with ``eos`` (as T5's tokenizer does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    extra = {"eos_token": eos} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, model_max_length=max_length,
                                   additional_special_tokens=[t for t in specials if t not in (pad, eos)], **extra)


def make_t5_tokenizer(max_length: int = 512):
    """T5/UMT5-style: <pad> = 0, </s> = 1 appended to every sequence."""
    return byte_bpe_tokenizer(["<pad>", "</s>", "<unk>"], pad="<pad>", eos="</s>", append_eos=True, max_length=max_length)


def make_qwen_tokenizer():
    """Qwen2-style: the chat template's special tokens, <|endoftext|> as padding, nothing appended."""
    return byte_bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], pad="<|endoftext|>", eos="<|im_end|>", append_eos=False,
                              max_length=32768)


# ------------------------------------------------------------------------------------------------ the new families
def _umt5(width: int, t5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    if t5:
        config = T5Config(vocab_size=260, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return T5EncoderModel(config).eval()
    config = UMT5Config(vocab_size=260, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return UMT5EncoderModel(config).eval()


#: The latent normalisation of the real Wan 2.1 VAE (AutoencoderKLWan's defaults), kept by the tiny 16-channel VAEs.
def make_wan(out: Path, variant: str = "wan21") -> Path:
    """Wan 2.1 T2V (``wan21``), Wan 2.2 TI2V-5B (``wan22``: 48 latent channels, x16 VAE with 2 x 2 patches, per-token
    timesteps) or Wan 2.2 A14B (``wan22_a14b``: two experts, boundary 0.875), with the real folders' UniPC flow scheduler."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    text_width = 32  # real: 4096 (UMT5-XXL)
    channels = 48 if variant == "wan22" else 16

    def transformer():
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=channels, out_channels=channels,
                                     text_dim=text_width, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)  # real: 12-40 x 128

    if variant == "wan22":  # the 5B's VAE: residual, patch 2, x16 spatial (real base_dim 160, decoder 256)
        gen = torch.Generator().manual_seed(1)
        vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
                               is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16, scale_factor_temporal=4,
                               latents_mean=(torch.randn(48, generator=gen) * 0.3).tolist(), latents_std=(1 + torch.rand(48, generator=gen)).tolist())
    else:
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])  # real 96
    shift = {"wan21": 3.0, "wan22": 5.0, "wan22_a14b": 12.0}[variant]
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=1000,
                                        solver_order=2, final_sigmas_type="zero")
    extra = {}
    if variant == "wan22_a14b":
        extra = {"transformer_2": transformer(), "boundary_ratio": 0.875}
    elif variant == "wan22":
        extra = {"expand_timesteps": True}
    pipe = WanPipeline(tokenizer=make_t5_tokenizer(), text_encoder=_umt5(text_width), vae=vae, scheduler=scheduler, transformer=transformer(), **extra)
    pipe.save_pretrained(out)
    return out


def make_qwen_image(out: Path) -> Path:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    text_width = 32  # real: 3584 (Qwen2.5-VL 7B)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                                              num_attention_heads=2, joint_attention_dim=text_width, axes_dims_rope=(4, 6, 6))  # real: 60 x 24 x 128
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
    # the real scheduler config: dynamic shift between 0.5 (256 tokens) and 0.9 (8192 tokens), stretched to 0.02
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": 260, "hidden_size": text_width, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": text_width},
        image_token_id=257, video_token_id=258, vision_start_token_id=259, vision_end_token_id=256)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=make_qwen_tokenizer(), transformer=transformer)
    pipe.save_pretrained(out)
    return out


def make_chroma(out: Path) -> Path:
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    text_width = 32  # real: 4096 (T5-XXL)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                           num_attention_heads=2, joint_attention_dim=text_width, axes_dims_rope=(4, 6, 6),
                                           approximator_hidden_dim=32, approximator_layers=1, approximator_num_channels=16)  # real: CHROMA_CONFIG
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = ChromaPipeline(scheduler=scheduler, vae=tiny_vae(16, 0.3611, 0.1159, flow=True), text_encoder=_umt5(text_width, t5=True),
                          tokenizer=make_t5_tokenizer(), transformer=transformer, image_encoder=None, feature_extractor=None)
    pipe.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------------ clips
def write_clip(path: str | Path, frames: int = 9, size: int = 64, seed: int = 0, fps: int = 8, codec: str = "mpeg4") -> Path:
    """A short random-colour clip (``frames`` frames of ``size`` x ``size + 16``) written with PyAV."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(3, 1, 1, generator=gen)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size + 16, size, "yuv420p"
        for i in range(frames):
            pixels = (base + 0.25 * torch.rand(3, size, size + 16, generator=gen) + 0.05 * i).clamp(0, 1)
            frame = av.VideoFrame.from_ndarray((pixels.permute(1, 2, 0) * 255).to(torch.uint8).numpy(), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_clip_dataset(folder: str | Path, count: int = 4, frames: int = 9, size: int = 64, corrupt: int = 0, images: int = 0) -> Path:
    """``count`` clips (``clip000.mp4``) with captions; ``corrupt`` undecodable .mp4 files; ``images`` still images."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        write_clip(folder / f"clip{i:03d}.mp4", frames=frames, size=size, seed=i)
        (folder / f"clip{i:03d}.txt").write_text(f"a clip number {i} of {('red', 'green', 'blue')[i % 3]} things moving", encoding="utf-8")
    for i in range(corrupt):
        (folder / f"broken{i:03d}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not really a video" * 8)
        (folder / f"broken{i:03d}.txt").write_text("a broken clip", encoding="utf-8")
    if images:
        make_image_dataset(folder, count=images, size=size)
    return folder
