"""Real-host integration tests: ComfyUI itself (COMFYUI_PATH) with the pack loaded the way ComfyUI loads custom nodes.

Run with ComfyUI's own interpreter:  COMFYUI_PATH=/path/to/ComfyUI $COMFY_PY -m pytest -q tests/comfyui
Every test here skips, saying why, when COMFYUI_PATH is unset or ComfyUI cannot be imported by this interpreter.
Nothing is written into the ComfyUI checkout: models, output and temp folders point at a temporary directory.
Everything beyond the node API that differs between ComfyUI releases (0.3.64 and 0.21.0 are tested) is in comfy_internals.py.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
from reference_data import UPSTREAM_MISSING, UPSTREAM_PT

REPO = Path(__file__).resolve().parents[2]


def _comfy_problem() -> str | None:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return "COMFYUI_PATH is unset: these tests need a real ComfyUI checkout (run: COMFYUI_PATH=... $COMFY_PY -m pytest tests/comfyui)"
    if not Path(path, "comfy", "samplers.py").is_file():
        return f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/samplers.py)"
    return None


def pytest_report_header(config):
    if _comfy_problem():
        return None
    import comfy_internals

    path = os.environ["COMFYUI_PATH"]
    return f"ComfyUI {comfy_internals.comfy_version(path)} at {path}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With ANNEALING_REQUIRE_HOST=1 (.ci/run sets it) a skip here is a failure: CI must run every real-host test. The one
    skip it lets through is a release difference, the host lacking the feature a test checks (comfy_internals.HOST_LACKS)."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("ANNEALING_REQUIRE_HOST") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        import comfy_internals

        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not reason.removeprefix("Skipped: ").startswith(comfy_internals.HOST_LACKS):
            report.outcome, report.longrepr = "failed", f"skipped, but ANNEALING_REQUIRE_HOST=1 needs every real-host test to run: {reason}"


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory):
    """Imports ComfyUI on CPU with its folders in a temp dir, loads core extra nodes and the pack. Returns a namespace."""
    problem = _comfy_problem()
    if problem:
        pytest.skip(problem)
    comfy_path = os.environ["COMFYUI_PATH"]
    try:
        import comfy_internals

        folder_paths, comfy_nodes = comfy_internals.import_comfy(comfy_path)
    except Exception as exc:  # e.g. this interpreter lacks ComfyUI's dependencies
        pytest.skip(f"ComfyUI at {comfy_path} cannot be imported by {sys.executable} ({type(exc).__name__}: {exc}); use ComfyUI's venv")
    if not hasattr(comfy_nodes, "load_custom_node"):
        pytest.skip(f"the module 'nodes' imported from {getattr(comfy_nodes, '__file__', '?')} is not ComfyUI's nodes.py")

    base = tmp_path_factory.mktemp("comfy_home")
    comfy_internals.use_folders(folder_paths, base)
    loaded, new_nodes, package = comfy_internals.load_pack(comfy_nodes, REPO)
    hook = importlib.import_module(package.__name__ + ".nodes.hook")
    annealing = importlib.import_module(package.__name__ + ".annealing")

    class Host:
        pass

    host = Host()
    host.path, host.home, host.nodes, host.folder_paths = comfy_path, base, comfy_nodes, folder_paths
    host.loaded, host.new_nodes, host.package, host.hook, host.annealing = loaded, new_nodes, package, hook, annealing
    host.models_dir = base / "models"
    host.version = comfy_internals.comfy_version(comfy_path)
    return host


@pytest.fixture(scope="session")
def upstream_pt():
    if UPSTREAM_PT is None:
        pytest.skip(UPSTREAM_MISSING)
    return UPSTREAM_PT


@pytest.fixture(scope="session")
def tiny(comfy_host):
    """tests/comfyui/comfy_tiny_models.py, imported once ComfyUI is importable."""
    import comfy_tiny_models

    return comfy_tiny_models


@pytest.fixture(scope="session")
def node(comfy_host):
    """Run a node as ComfyUI's executor does: ``node("AnnealingGuider", **inputs)`` -> its NodeOutput."""

    def call(name, **inputs):
        return comfy_host.nodes.NODE_CLASS_MAPPINGS[name].execute(**inputs)

    return call


@pytest.fixture
def tiny_loader(comfy_host, tiny):
    """The tiny checkpoint loader registered as a node for one test; yields its node type."""
    comfy_host.nodes.NODE_CLASS_MAPPINGS["TinyCheckpointLoaderForTests"] = tiny.TinyCheckpointLoaderForTests
    yield "TinyCheckpointLoaderForTests"
    comfy_host.nodes.NODE_CLASS_MAPPINGS.pop("TinyCheckpointLoaderForTests", None)
