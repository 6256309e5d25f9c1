"""Shared fixtures: paths of the reference data (tests skip when it is absent)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

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
