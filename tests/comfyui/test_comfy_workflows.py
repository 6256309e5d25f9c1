"""The example workflows against the real ComfyUI: node definitions, ComfyUI's own prompt validation, and end-to-end runs
through ComfyUI's executor with a tiny model substituted for the SDXL checkpoint loader."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import comfy_internals
import pytest

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
API_FILES = sorted(WORKFLOWS.glob("*.api.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def builder():
    spec = importlib.util.spec_from_file_location("build_workflows_for_comfy", WORKFLOWS / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_files(comfy_host, upstream_pt):
    """Every checkpoint and annealing model the workflows name, present in the temp models folders."""
    wf = builder()
    for name in (wf.SDXL_CHECKPOINT, wf.SD3_CHECKPOINT):
        (comfy_host.models_dir / "checkpoints" / name).write_bytes(b"placeholder: validation only checks the name")
    shutil.copyfile(upstream_pt, comfy_host.models_dir / "annealing_guidance" / wf.SDXL_ANNEALING)
    shutil.copyfile(upstream_pt, comfy_host.models_dir / "annealing_guidance" / wf.SD3_ANNEALING)
    return wf


def widget_kind(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def test_node_definitions_and_core_list_match_real_comfyui(comfy_host):
    wf = builder()
    mappings = comfy_host.nodes.NODE_CLASS_MAPPINGS
    listed = json.loads((WORKFLOWS / "node_types.json").read_text())
    for node_type in listed["core"] + listed["pack"]:
        assert node_type in mappings, f"{node_type} is not a node of this ComfyUI"
    for node_type, (sockets, widgets, outputs) in wf.NODE_DEFS.items():
        cls = mappings[node_type]
        info = cls.INPUT_TYPES()
        declared = {**info.get("required", {}), **info.get("optional", {})}
        real_sockets = [(name, spec[0], name in info.get("optional", {})) for name, spec in declared.items() if not widget_kind(spec)]
        real_widgets = [name for name, spec in declared.items() if widget_kind(spec)]
        assert real_sockets == [tuple(s) for s in sockets], node_type
        assert real_widgets == widgets, node_type
        assert list(cls.RETURN_TYPES) == [kind for _, kind in outputs], node_type
        seeds = {name for name, spec in declared.items() if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate")}
        assert seeds == {name for (t, name) in wf.SEED_WIDGETS if t == node_type}, node_type


@pytest.mark.parametrize("api_path", API_FILES, ids=lambda p: p.stem)
def test_comfyui_prompt_validation_accepts_every_api_twin(comfy_host, model_files, api_path):
    prompt = json.loads(api_path.read_text())
    valid, error, outputs, node_errors = comfy_internals.validate(prompt, "validation-test")
    assert valid, (error, node_errors)
    assert not node_errors
    expected_outputs = {nid for nid, node in prompt.items() if node["class_type"] in ("SaveImage", "AnnealingSchedulePlot", "AnnealingModelExplorer")}
    assert set(outputs) == expected_outputs


# ------------------------------------------------------------------------------------------------------ end to end


def small_prompt(api_path: Path, loader: str) -> dict:
    """The workflow with the tiny model loader, 4 steps and a 128 x 128 image (a 16 x 16 latent)."""
    prompt = json.loads(api_path.read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"] = loader
        if "steps" in inputs:
            inputs["steps"] = 4
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs.update(width=128, height=128, batch_size=2)
    return prompt


@pytest.mark.parametrize("name", ["sdxl_annealing_guider", "sdxl_annealing_ksampler"])
def test_workflow_runs_end_to_end_through_comfyui(comfy_host, model_files, tiny_loader, name):
    prompt = small_prompt(WORKFLOWS / f"{name}.api.json", tiny_loader)
    executor = comfy_internals.validate_and_execute(prompt, f"e2e-{name}")
    assert executor.success, executor.status_messages[-3:]
    history = executor.history_result["outputs"]
    save_id = next(nid for nid, node in prompt.items() if node["class_type"] == "SaveImage")
    plot_id = next(nid for nid, node in prompt.items() if node["class_type"] == "AnnealingSchedulePlot")
    saved = history[save_id]["images"]
    assert len(saved) == 2  # batch of 2
    assert (Path(comfy_host.folder_paths.get_output_directory()) / saved[0]["subfolder"] / saved[0]["filename"]).is_file()
    plot_images = history[plot_id]["images"]
    assert len(plot_images) == 1 and plot_images[0]["type"] == "temp"
    assert (Path(comfy_host.folder_paths.get_temp_directory()) / plot_images[0]["subfolder"] / plot_images[0]["filename"]).is_file()
    image = comfy_internals.cached_output(executor, plot_id)
    assert image.dim() == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    # the plotted run is this prompt's: 4 steps, one w per batch item, the sampler the workflow names
    plot_inputs = prompt[plot_id]["inputs"]
    source_id = (plot_inputs.get("guider") or plot_inputs.get("model"))[0]
    source = comfy_internals.cached_output(executor, source_id)
    hook = getattr(source, "annealing_hook", None) or comfy_host.hook.find_hook(source.model_options)
    run = hook.runs[-1]
    assert run.trace.steps == [0, 1, 2, 3] and run.trace["w"].shape == (4, 2)
    sampler_node = prompt[plot_inputs["samples"][0]]
    expected_sampler = sampler_node["inputs"].get("sampler_name") or prompt[sampler_node["inputs"]["sampler"][0]]["inputs"]["sampler_name"]
    assert run.sampler_name == expected_sampler

