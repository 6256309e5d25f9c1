"""Real-host integration tests: ComfyUI itself (COMFYUI_PATH) with the pack loaded the way ComfyUI loads custom nodes.

Run with ComfyUI's own interpreter:  COMFYUI_PATH=/path/to/ComfyUI $COMFY_PY -m pytest -q tests/comfyui
Every test here skips, saying why, when COMFYUI_PATH is unset or ComfyUI cannot be imported by this interpreter.
Nothing is written into the ComfyUI checkout: models, output and temp folders point at a temporary directory.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REFERENCE = Path(os.environ.get("ANNEALING_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
UPSTREAM_PT = REFERENCE / "annealing_sdxl_upstream.pt"


def _comfy_problem() -> str | None:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return "COMFYUI_PATH is unset: these tests need a real ComfyUI checkout (run: COMFYUI_PATH=... $COMFY_PY -m pytest tests/comfyui)"
    if not Path(path, "comfy", "samplers.py").is_file():
        return f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/samplers.py)"
    return None


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory):
    """Imports ComfyUI on CPU with its folders in a temp dir, loads core extra nodes and the pack. Returns a namespace."""
    problem = _comfy_problem()
    if problem:
        pytest.skip(problem)
    comfy_path = os.environ["COMFYUI_PATH"]
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before comfy.model_management is imported (it reads args at import)
        import folder_paths

        import nodes as comfy_nodes  # ComfyUI's top-level nodes.py
    except Exception as exc:  # e.g. this interpreter lacks ComfyUI's dependencies
        pytest.skip(f"ComfyUI at {comfy_path} cannot be imported by {sys.executable} ({type(exc).__name__}: {exc}); use ComfyUI's venv")
    if not hasattr(comfy_nodes, "load_custom_node"):
        pytest.skip(f"the module 'nodes' imported from {getattr(comfy_nodes, '__file__', '?')} is not ComfyUI's nodes.py")

    base = tmp_path_factory.mktemp("comfy_home")
    folder_paths.models_dir = str(base / "models")
    for name in ("models/checkpoints", "models/annealing_guidance", "input", "output", "temp"):
        (base / name).mkdir(parents=True, exist_ok=True)
    folder_paths.folder_names_and_paths["checkpoints"] = ([str(base / "models" / "checkpoints")], folder_paths.supported_pt_extensions)
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_input_directory(str(base / "input"))

    async def load():
        await comfy_nodes.init_builtin_extra_nodes()
        before = set(comfy_nodes.NODE_CLASS_MAPPINGS)
        ok = await comfy_nodes.load_custom_node(str(REPO), module_parent="custom_nodes")
        return ok, sorted(set(comfy_nodes.NODE_CLASS_MAPPINGS) - before)

    loaded, new_nodes = asyncio.run(load())
    package = sys.modules[str(REPO).replace(".", "_x_")]
    hook = importlib.import_module(package.__name__ + ".nodes.hook")
    annealing = importlib.import_module(package.__name__ + ".annealing")

    class Host:
        pass

    host = Host()
    host.path, host.home, host.nodes, host.folder_paths = comfy_path, base, comfy_nodes, folder_paths
    host.loaded, host.new_nodes, host.package, host.hook, host.annealing = loaded, new_nodes, package, hook, annealing
    host.models_dir = base / "models"
    return host


@pytest.fixture(scope="session")
def upstream_pt():
    if not UPSTREAM_PT.is_file():
        pytest.skip(f"reference checkpoint not found at {UPSTREAM_PT} (set ANNEALING_REFERENCE_DIR)")
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
