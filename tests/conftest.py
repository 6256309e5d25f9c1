"""Shared fixtures: paths of the reference data (tests skip when it is absent)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("ANNEALING_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
UPSTREAM_PT = REFERENCE / "annealing_sdxl_upstream.pt"
GOLDEN_JSON = REFERENCE / "upstream_w_golden.json"


@pytest.fixture(scope="session")
def upstream_path() -> Path:
    if not UPSTREAM_PT.is_file():
        pytest.skip(f"reference checkpoint not found at {UPSTREAM_PT} (set ANNEALING_REFERENCE_DIR)")
    return UPSTREAM_PT


@pytest.fixture(scope="session")
def golden_rows():
    if not GOLDEN_JSON.is_file():
        pytest.skip(f"golden outputs not found at {GOLDEN_JSON} (set ANNEALING_REFERENCE_DIR)")
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
