"""Tiny models, datasets and configs for the training tests: built once per test session in a temporary folder, offline."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(tempfile.mkdtemp(prefix="annealing-training-tests-"))
atexit.register(shutil.rmtree, ROOT, True)

RESOLUTION = 64  # tiny VAE: 64 px -> 8 x 8 latents
LATENT_NUMEL = {"sd15": 4 * 8 * 8, "sdxl": 4 * 8 * 8, "sd3": 16 * 8 * 8}


@functools.cache
def tiny_model(kind: str, prediction_type: str = "epsilon") -> Path:
    from training.tiny_models import make_tiny_model

    return make_tiny_model(kind, ROOT / "models" / f"{kind}-{prediction_type}", prediction_type)


@functools.cache
def tiny_dataset(count: int = 6, corrupt: int = 0) -> Path:
    from training.tiny_models import make_image_dataset

    return make_image_dataset(ROOT / "data" / f"n{count}-c{corrupt}", count=count, corrupt=corrupt)


@functools.cache
def tiny_clips(count: int = 3, frames: int = 9, corrupt: int = 0, images: int = 0) -> Path:
    """A folder of tiny clips written with PyAV (and ``corrupt`` undecodable ones, ``images`` still images), with captions."""
    from training.tiny_models import make_clip_dataset

    return make_clip_dataset(ROOT / "clips" / f"n{count}-f{frames}-c{corrupt}-i{images}", count=count, frames=frames, corrupt=corrupt, images=images)


def make_config(kind: str, output: Path, **overrides):
    from training.config import TrainConfig

    values = dict(
        model=str(tiny_model(kind)), dataset=str(tiny_dataset()), output=str(output), resolution=RESOLUTION, max_steps=2,
        gradient_accumulation=2, num_workers=0, device="cpu", checkpoint_every=1000, log_every=1,
    )
    values.update(overrides)
    return TrainConfig(**values)


def state_of(path) -> dict:
    import annealing

    return annealing.load_guidance_model(path).state_dict()


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_thread():
    """Generator for an autouse fixture: tiny models run fastest on one thread, and a busy 2-core machine makes
    2-thread OpenMP ops up to 10x slower; the previous setting is restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pack_module(name: str):
    """A module of the node pack imported the way ComfyUI sees it (repository root as a package), as the node tests do."""
    import importlib
    import sys
    import types

    pack = "annealing_guidance_pack_under_test"
    if pack not in sys.modules:
        package = types.ModuleType(pack)
        package.__path__ = [str(Path(__file__).resolve().parents[1])]
        sys.modules[pack] = package
    return importlib.import_module(f"{pack}.{name}")
