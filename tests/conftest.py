"""Shared fixtures: the released checkpoint and the golden outputs (reference_data.py says where they are looked for; tests
needing them skip, saying why, when they are absent) and random-weight guidance models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference_data import GOLDEN_JSON, REPO, UPSTREAM_MISSING, UPSTREAM_PT  # noqa: F401 (REPO: for test modules)


@pytest.fixture(scope="session")
def upstream_path() -> Path:
    if UPSTREAM_PT is None:
        pytest.skip(UPSTREAM_MISSING)
    return UPSTREAM_PT


@pytest.fixture(scope="session")
def golden_rows():
    if not GOLDEN_JSON.is_file():
        pytest.skip(f"golden outputs not found at {GOLDEN_JSON} (they are reference data only; set ANNEALING_REFERENCE_DIR)")
    return json.loads(GOLDEN_JSON.read_text())["rows"]


@pytest.fixture(scope="session")
def upstream_model(upstream_path):
    import annealing

    return annealing.load_guidance_model(upstream_path)


@pytest.fixture(scope="session")
def make_guidance_model():
    """A factory of random-weight guidance models with metadata (the released architecture unless ``config`` says otherwise):
    the guidance math does not depend on trained weights, so these tests run without the reference checkpoint."""
    import annealing

    def make(grid=None, convention: str = "ddpm_index", seed: int = 0, config=None, **metadata):
        torch.manual_seed(seed)
        space = "velocity" if convention != "ddpm_index" else "epsilon"
        family = "sd3" if convention != "ddpm_index" else "sdxl"
        meta = annealing.CheckpointMetadata(model_family=metadata.pop("model_family", family), timestep_convention=convention,
                                            prediction_space=metadata.pop("prediction_space", space), training_grid=grid, **metadata)
        model = annealing.GuidanceScaleModel(config or annealing.GuidanceModelConfig(), meta)
        return model.eval().requires_grad_(False)

    return make
