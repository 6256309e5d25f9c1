"""The families this package trains: one line each (key -> the module that implements it), and model detection.

Adding a family is one new module defining ``FAMILY = <its FamilyBackend subclass>`` and one line below; nothing else in
the package names families (the trainer, the data, the embed command and the benchmarks call the interface). Detection
asks each family in this order whether a folder is its own (the SDXL UNet is claimed before SD2's and SD1's).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..errors import TrainingError
from .interface import FamilyBackend, LoadOptions, ModelInfo, PipelineIndex

REGISTRY: dict[str, str] = {
    "sdxl": "training.backends.sdxl",
    "sd2": "training.backends.sd2",
    "sd15": "training.backends.sd15",
    "sd3": "training.backends.sd3",
    "wan21": "training.backends.wan21",
    "wan22": "training.backends.wan22",
    "qwen_image": "training.backends.qwen_image",
    "chroma": "training.backends.chroma",
}


def family_class(key: str) -> type[FamilyBackend]:
    """The class of a registered family; KeyError-free: an unknown key is a one-line error naming the known ones."""
    if key not in REGISTRY:
        raise TrainingError(f"unknown model family {key!r}; known: {', '.join(REGISTRY)}")
    cls = importlib.import_module(REGISTRY[key]).FAMILY
    if cls.key != key:
        raise TrainingError(f"{REGISTRY[key]} implements family {cls.key!r}, registered as {key!r}")
    return cls


def families() -> list[type[FamilyBackend]]:
    return [family_class(key) for key in REGISTRY]


def supported() -> str:
    return "; ".join(f"{cls.title} ({cls.key})" for cls in families())


def default_resolution(family: str, prediction_type: str = "epsilon") -> int:
    """The resolution a model family was trained at (SD2-base, the epsilon SD2, is a 512 px model, SD2 768-v a 768 px one)."""
    cls = family_class(family)
    if family == "sd2" and prediction_type == "epsilon":
        return 512
    return cls.default_resolution


def detect_model(model: str | os.PathLike, config_folder: str | os.PathLike | None = None) -> ModelInfo:
    """Classify a diffusers folder, or a single-file checkpoint with a config folder, from its configs; one-line errors."""
    source = Path(model)
    if not source.exists():
        raise TrainingError(f"{source}: model not found")
    single_file = source.is_file()
    if single_file:
        if source.suffix.lower() != ".safetensors":
            raise TrainingError(f"{source}: single-file checkpoints must be .safetensors (pickled .ckpt files are not loaded)")
        if config_folder is None:
            raise TrainingError(
                f"{source}: a single-file checkpoint needs --config-folder, a local diffusers folder of the same architecture "
                "(offline training cannot fetch configs from the hub)"
            )
        folder = Path(config_folder)
        if not folder.is_dir():
            raise TrainingError(f"{folder}: --config-folder must be a diffusers folder")
    else:
        folder = source
    if not (folder / "model_index.json").is_file():
        hint = " (this looks like a single component; pass the pipeline folder)" if (folder / "config.json").is_file() else ""
        raise TrainingError(f"{folder}: not a diffusers pipeline folder, no model_index.json{hint}")
    index = PipelineIndex(folder, source, single_file)
    for cls in families():
        if cls.matches(index):
            return cls.describe(index)
    network = index.component("transformer") or index.component("unet")
    named = f"{index.pipeline_class} ({network})" if network else index.pipeline_class
    raise TrainingError(f"{folder}: unsupported model {named}; supported: {supported()}")


def load_backend(info: ModelInfo, *, device, dtype, resolution: int, load_text_encoders: bool = True, use_t5: bool = True,
                 uncond: str = "auto", cads=None, gradient_checkpointing: bool = False, vae_dtype=None, text_only: bool = False,
                 load_vae: bool = True, load_network: bool = True, frames: int | None = None, expert: str = "auto") -> FamilyBackend:
    """Load the frozen components (local files only) and wrap them in the family's backend.

    ``text_only`` loads just the tokenizers and text encoders (``python -m training embed``); ``load_vae`` False skips the
    VAE (precomputed latents), ``load_network`` False the network (``embed --latents``)."""
    import torch

    from ..algorithm import CADSConfig

    options = LoadOptions(device=torch.device(device), dtype=dtype, resolution=resolution,
                          vae_dtype=vae_dtype if vae_dtype is not None else torch.float32, load_network=load_network and not text_only,
                          load_vae=load_vae and not text_only, load_text_encoders=load_text_encoders, use_t5=use_t5, uncond=uncond,
                          cads=cads if cads is not None else CADSConfig(), gradient_checkpointing=gradient_checkpointing,
                          frames=frames or info.default_frames, expert=expert)
    return info.spec.load(info, options)
