"""workflows/sdxl_guidance_comparison.json against the real ComfyUI: the builder's definitions of the two new nodes, ComfyUI's
own prompt validation of the API twin, and a run end to end through ComfyUI's executor with a tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import comfy_internals
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
API_PATH = WORKFLOWS / "sdxl_guidance_comparison.api.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def builder():
    spec = importlib.util.spec_from_file_location("build_workflows_for_comparison", WORKFLOWS / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_files(comfy_host):
    """The files the workflow names: a placeholder SDXL checkpoint (validation checks the name; the run substitutes a tiny
    model) and a small random annealing checkpoint for SDXL-like models under the released checkpoint's name."""
    wf = builder()
    (comfy_host.models_dir / "checkpoints" / wf.SDXL_CHECKPOINT).write_bytes(b"placeholder: validation only checks the name")
    annealing_path = comfy_host.models_dir / "annealing_guidance" / wf.SDXL_ANNEALING
    if not annealing_path.is_file():
        annealing = comfy_host.annealing
        torch.manual_seed(5)
        model = annealing.GuidanceScaleModel(annealing.GuidanceModelConfig(), annealing.CheckpointMetadata())
        annealing.save_guidance_model(model, annealing_path)
    return wf


def test_builder_definitions_of_the_new_nodes_match_comfyui(comfy_host):
    wf = builder()
    for node_type in ("StageWiseGuidance", "AngleDomainGuidance"):
        sockets, widgets, outputs = wf.NODE_DEFS[node_type]
        cls = comfy_host.nodes.NODE_CLASS_MAPPINGS[node_type]
        info = cls.INPUT_TYPES()
        declared = {**info.get("required", {}), **info.get("optional", {})}
        is_widget = {name: isinstance(spec[0], list) or spec[0] in WIDGET_TYPES for name, spec in declared.items()}
        assert [(n, declared[n][0], n in info.get("optional", {})) for n in declared if not is_widget[n]] == [tuple(s) for s in sockets]
        assert [n for n in declared if is_widget[n]] == widgets
        assert list(cls.RETURN_TYPES) == [kind for _, kind in outputs]
        # the workflow's values are the nodes' own defaults
        defaults = {n: declared[n][1].get("default") for n in widgets}
        expected = wf.TV_CFG_DEFAULTS if node_type == "StageWiseGuidance" else wf.ADG_DEFAULTS
        assert defaults == expected


def test_comfyui_prompt_validation_accepts_the_comparison(comfy_host, model_files):
    prompt = json.loads(API_PATH.read_text())
    valid, error, outputs, node_errors = comfy_internals.validate(prompt, "comparison-validation")
    assert valid, (error, node_errors)
    assert not node_errors
    saves = {nid for nid, node in prompt.items() if node["class_type"] == "SaveImage"}
    assert len(saves) == 4 and set(outputs) == saves | {nid for nid, node in prompt.items() if node["class_type"] == "AnnealingSchedulePlot"}


def test_one_seed_four_methods_labelled(comfy_host):
    prompt = json.loads(API_PATH.read_text())
    samplers = {nid: node for nid, node in prompt.items() if node["class_type"] == "KSampler"}
    assert len(samplers) == 4
    settings = {json.dumps({k: v for k, v in node["inputs"].items() if k != "model"}, sort_keys=True) for node in samplers.values()}
    assert len(settings) == 1  # same seed, steps, cfg, sampler, scheduler, conditioning and latent: only the model differs

    def model_chain(nid):
        node, chain = prompt[nid], []
        while "model" in node["inputs"]:
            node = prompt[node["inputs"]["model"][0]]
            chain.append(node["class_type"])
        return chain

    chains = sorted(tuple(model_chain(nid)) for nid in samplers)
    assert chains == sorted([("CheckpointLoaderSimple",), ("ApplyAnnealingGuidance", "CheckpointLoaderSimple"),
                             ("StageWiseGuidance", "CheckpointLoaderSimple"), ("AngleDomainGuidance", "CheckpointLoaderSimple")])
    prefixes = sorted(node["inputs"]["filename_prefix"] for node in prompt.values() if node["class_type"] == "SaveImage")
    assert [p.split("/")[-1].split("_")[1] for p in prefixes] == ["cfg", "annealing", "tvcfg", "adg"]


# ------------------------------------------------------------------------------------------------------------- end to end


def test_the_comparison_runs_end_to_end_and_gives_four_different_images(comfy_host, model_files, tiny_loader):
    prompt = json.loads(API_PATH.read_text())
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"] = tiny_loader
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 6
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64, batch_size=1)
    executor = comfy_internals.validate_and_execute(prompt, "comparison-e2e")
    assert executor.success, executor.status_messages[-3:]
    history = executor.history_result["outputs"]
    images = {}
    for nid, node in prompt.items():
        if node["class_type"] == "SaveImage":
            saved = history[nid]["images"]
            assert len(saved) == 1
            path = Path(comfy_host.folder_paths.get_output_directory()) / saved[0]["subfolder"] / saved[0]["filename"]
            assert path.is_file()
            images[node["inputs"]["filename_prefix"]] = path.read_bytes()
    assert len(images) == 4 and len(set(images.values())) == 4  # four methods, four different images
