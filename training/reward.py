"""The reward of Learn to Guide's reward variant (Galashov et al., arXiv 2510.00815): the CLIP score of the guided
x0-prediction under the prompt, differentiable through the VAE decode and the CLIP image tower.

    R(x0_hat, c) = cos(CLIP_image(preprocess(VAE_decode(x0_hat))), CLIP_text(c))          (the raw cosine, in [-1, 1])
    preprocess:  x in [-1, 1] -> (x + 1) / 2 clamped to [0, 1] (what saving the image would do) -> bicubic resize (with
                 antialiasing) to CLIP's input size -> (x - mean) / std, CLIP's processor constants

The CLIP model comes from a local folder (a ``transformers`` ``CLIPModel``: ``config.json``, ``model.safetensors``, the
tokenizer's files and optionally ``preprocessor_config.json``); nothing is downloaded, and only safetensors weights are
read. Every weight is frozen: the gradient of R reaches the latents it scores, and from there the guidance network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import TrainingError
from .files import read_bounded

#: OpenAI CLIP's image normalisation (CLIPImageProcessor's defaults), used when the folder has no preprocessor config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: A CLIP config or preprocessor config is a few kB; anything far larger is not one.
MAX_CONFIG_BYTES = 1 << 20
REWARDS = ("none", "clip")


def check_clip_folder(folder: str | os.PathLike) -> Path:
    """The folder of a local CLIP model, checked before anything is loaded: a folder with a CLIP ``config.json``, a
    ``model.safetensors`` and a tokenizer (``tokenizer.json``, or ``vocab.json`` with ``merges.txt``). One-line
    TrainingError naming what is missing."""
    path = Path(folder)
    if not path.is_dir():
        raise TrainingError(f"{path}: the CLIP reward model must be a local folder (a transformers CLIPModel saved with save_pretrained)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TrainingError(f"{path}: no config.json: not a transformers model folder")
    try:
        config = json.loads(read_bounded(config_file, MAX_CONFIG_BYTES, "CLIP config").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainingError(f"{config_file}: not a JSON config ({type(exc).__name__})") from None
    if not isinstance(config, dict) or config.get("model_type") != "clip":
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise TrainingError(f"{config_file}: model_type is {str(found)[:40]!r}, the reward needs a CLIP model (model_type 'clip')")
    if not (path / "model.safetensors").is_file():
        raise TrainingError(f"{path}: no model.safetensors (only safetensors weights are read; convert a .bin with save_pretrained)")
    if not ((path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())):
        raise TrainingError(f"{path}: no CLIP tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    return path


class ClipReward:
    """R(x, c) of the module docstring for a ``transformers`` CLIPModel and its tokenizer (frozen here; CLIP's input size
    and normalisation as its processor has them). :meth:`from_folder` loads a local folder. ``text_features(captions)``
    once per batch (no graph), then ``score(images, text_features)`` (differentiable in the images); ``__call__(images,
    captions)`` does both."""

    def __init__(self, model, tokenizer, image_size: int | None = None, mean=CLIP_MEAN, std=CLIP_STD):
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.size = image_size or model.config.vision_config.image_size
        if not (isinstance(self.size, int) and 1 <= self.size <= 4096) or min(std) <= 0:
            raise TrainingError(f"implausible CLIP preprocessing (image size {self.size!r}, std {std!r})")
        self.mean = torch.tensor(mean, device=self.device, dtype=self.dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device, dtype=self.dtype).view(1, 3, 1, 1)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ClipReward:
        """The CLIP of a local folder (:func:`check_clip_folder`), its ``preprocessor_config.json`` read where present."""
        from transformers import AutoTokenizer, CLIPModel

        path = check_clip_folder(folder)
        model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True).to(device=device, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        size, mean, std = None, CLIP_MEAN, CLIP_STD
        processor = path / "preprocessor_config.json"
        if processor.is_file():
            try:
                settings = json.loads(read_bounded(processor, MAX_CONFIG_BYTES, "CLIP preprocessor config").decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise TrainingError(f"{processor}: not a JSON config ({type(exc).__name__})") from None
            settings = settings if isinstance(settings, dict) else {}
            mean, std = _triple(settings.get("image_mean"), mean), _triple(settings.get("image_std"), std)
            crop = settings.get("crop_size")
            size = crop.get("height") if isinstance(crop, dict) else crop if isinstance(crop, int) else None
        try:
            return cls(model, tokenizer, size, mean, std)
        except TrainingError as exc:
            raise TrainingError(f"{path}: {exc}") from None

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        """(B, D) unit-norm CLIP text embeddings of the captions (truncated to CLIP's 77 tokens)."""
        tokens = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.model.config.text_config.max_position_embeddings,
                                return_tensors="pt").to(self.device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return torch.nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) unit-norm CLIP image embeddings of images (B, 3, H, W) in [-1, 1], differentiable."""
        pixels = ((images.to(self.device, self.dtype) + 1) / 2).clamp(0, 1)
        if pixels.shape[-2:] != (self.size, self.size):
            pixels = torch.nn.functional.interpolate(pixels, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        pooled = self.model.vision_model(pixel_values=(pixels - self.mean) / self.std).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def score(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(B,) cosine between each image and its caption's text embedding."""
        return (self.image_features(images) * text_features.to(self.device)).sum(dim=-1)

    def __call__(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        return self.score(images, self.text_features(captions))


def _triple(value, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return tuple(float(v) for v in value)
    return default


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in about [-1, 1] from training latents (scaled, shifted: the inverse of the backend's encode), through the
    frozen VAE with a graph (its weights take no gradient; the latents do)."""
    dtype = next(vae.parameters()).dtype
    shift = vae.config.shift_factor or 0.0
    return vae.decode((latents / vae.config.scaling_factor + shift).to(dtype)).sample.float()


def latent_reward(vae, reward: ClipReward, captions: list[str]):
    """The reward function ``training.learn_to_guide.learn_to_guide_loss`` takes: latents (B, ...) -> R (B,) for these
    captions, through the VAE decode and CLIP."""
    text = reward.text_features(captions)

    def score(latents: torch.Tensor) -> torch.Tensor:
        return reward.score(decode_latents(vae, latents), text)

    return score
