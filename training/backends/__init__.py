"""Frozen diffusion models as :class:`training.algorithm.DenoiserBackend`: one module per model family behind one
interface (:mod:`training.backends.interface`), registered in :mod:`training.backends.registry`.

Families (keys for ``--model`` detection, ``training.tiny_models.make_tiny_model`` and the checkpoint's ``model_family``):
sd15, sd2, sdxl (UNets, epsilon or v-prediction, reported as epsilon), sd3 (SD3 and SD3.5), wan21 (Wan 2.1 T2V 1.3B/14B),
wan22 (Wan 2.2 TI2V-5B and A14B's experts), qwen_image and chroma (flow matching, velocity). Detection reads only JSON
configs, so a wrong folder fails in a second, before anything heavy is loaded.
"""

from __future__ import annotations

from .conditioning import TextCondition
from .interface import FamilyBackend, LoadOptions, ModelInfo, PipelineIndex
from .registry import REGISTRY, default_resolution, detect_model, families, family_class, load_backend, supported

#: The families this package trains (``--model-family`` and ``ModelInfo.family`` take these names).
FAMILIES = tuple(REGISTRY)
#: The kept name of the interface (the trainer, memory probe and benchmarks type their backend with it).
FrozenDiffusionBackend = FamilyBackend


def __getattr__(name: str):
    """The families' classes by their former names (``UNetBackend``, ``SD3Backend``) and ``DEFAULT_RESOLUTION``, on demand."""
    if name == "UNetBackend":
        from .unet import UNetFamily

        return UNetFamily
    if name == "SD3Backend":
        return family_class("sd3")
    if name == "DEFAULT_RESOLUTION":
        return {key: family_class(key).default_resolution for key in REGISTRY}
    raise AttributeError(name)


__all__ = ["FAMILIES", "REGISTRY", "FamilyBackend", "FrozenDiffusionBackend", "LoadOptions", "ModelInfo", "PipelineIndex", "TextCondition",
           "default_resolution", "detect_model", "families", "family_class", "load_backend", "supported"]
