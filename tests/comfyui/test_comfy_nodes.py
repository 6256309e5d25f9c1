"""The pack loads the way ComfyUI loads a custom-node directory, and every node registers with its inputs and outputs."""

from __future__ import annotations

import pytest

EXPECTED = {
    "LoadAnnealingGuidanceModel": ({"model_name"}, ("ANNEALING_GUIDANCE_MODEL",)),
    "AnnealingGuider": ({"model", "positive", "negative", "annealing_model", "lambda", "mode", "normalize_delta_norm", "clamp_w", "w_min",
                         "w_max", "active_start", "active_end", "fallback_cfg"}, ("GUIDER",)),
    "ApplyAnnealingGuidance": ({"model", "annealing_model", "lambda", "mode", "normalize_delta_norm", "clamp_w", "w_min", "w_max",
                                "active_start", "active_end"}, ("MODEL",)),
    "AnnealingSchedulePlot": ({"samples", "guider", "model"}, ("IMAGE",)),
    "AnnealingModelExplorer": ({"annealing_model", "lambdas", "positive"}, ("IMAGE",)),
}


def test_pack_loads_like_a_custom_node_and_registers_every_node(comfy_host):
    assert comfy_host.loaded is True
    assert sorted(EXPECTED) == sorted(name for name in comfy_host.new_nodes if name in EXPECTED)
    mappings, display = comfy_host.nodes.NODE_CLASS_MAPPINGS, comfy_host.nodes.NODE_DISPLAY_NAME_MAPPINGS
    # ComfyUI's own top-level `nodes` module is untouched by the pack's `nodes/` package
    assert comfy_host.nodes.__file__.endswith("nodes.py") and "KSampler" in mappings
    for name, (inputs, outputs) in EXPECTED.items():
        cls = mappings[name]
        info = cls.INPUT_TYPES()
        declared = {**info.get("required", {}), **info.get("optional", {})}
        assert set(declared) == inputs, name
        assert tuple(cls.RETURN_TYPES) == outputs, name
        assert display[name] and cls.RELATIVE_PYTHON_MODULE.startswith("custom_nodes.")
        for input_name, (_type, options) in declared.items():
            assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
        for input_name, (_type, options) in declared.items():  # numeric widgets carry their range
            if _type in ("FLOAT", "INT"):
                assert options["min"] <= options["default"] <= options["max"], f"{name}.{input_name}"
    assert mappings["AnnealingSchedulePlot"].OUTPUT_NODE and mappings["AnnealingModelExplorer"].OUTPUT_NODE
    guider = mappings["AnnealingGuider"].INPUT_TYPES()["required"]
    assert guider["lambda"][1]["default"] == 0.4 and guider["lambda"][1]["min"] == 0.0 and guider["lambda"][1]["max"] == 1.0
    mode = guider["mode"]
    options = mode[1].get("options", mode[0])
    assert options == ["anchored", "per_step", "as_is"] and mode[1]["default"] == "anchored"
    for name in options:  # the tooltip says what each mode does
        assert f"{name}:" in mode[1]["tooltip"]


def test_model_folder_is_registered_for_safetensors_and_pt(comfy_host):
    paths, extensions = comfy_host.folder_paths.folder_names_and_paths["annealing_guidance"]
    assert str(comfy_host.models_dir / "annealing_guidance") in paths
    assert {".safetensors", ".pt"} <= set(extensions)
    folder = comfy_host.models_dir / "annealing_guidance"
    (folder / "listed.pt").write_bytes(b"x")
    (folder / "ignored.txt").write_text("x")
    listing = comfy_host.folder_paths.get_filename_list("annealing_guidance")
    assert "listed.pt" in listing and "ignored.txt" not in listing
    (folder / "listed.pt").unlink()


def test_comfy_registry_reads_our_pyproject(comfy_host):
    """ComfyUI's own registry parser accepts pyproject.toml: node id, version, OS and accelerator classifiers, minimum ComfyUI."""
    from pathlib import Path

    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(Path(__file__).resolve().parents[2]))
    assert config is not None, "ComfyUI could not parse pyproject.toml"
    project, comfy = config.project, config.tool_comfy
    assert project.name and "comfyui" not in project.name.lower()
    assert project.version.count(".") == 2
    assert project.supported_os == ["OS Independent"]
    assert "GPU :: NVIDIA CUDA" in project.supported_accelerators  # an unknown accelerator classifier would empty the list
    assert project.supported_comfyui_version == ">=0.3.48"
    assert comfy.publisher_id and comfy.display_name and comfy.icon.startswith("https://")


def test_annealing_nodes_name_every_input_but_lambda_and_refuse_strays(comfy_host):
    """execute names each input (lambda, a Python keyword, is the one that arrives as a keyword argument), so a misspelt
    input is an error instead of a setting silently left at its default."""
    import inspect

    mappings = comfy_host.nodes.NODE_CLASS_MAPPINGS
    for name in ("AnnealingGuider", "ApplyAnnealingGuidance"):
        cls = mappings[name]
        info = cls.INPUT_TYPES()
        declared = {**info.get("required", {}), **info.get("optional", {})}
        parameters = inspect.signature(cls.execute).parameters.values()
        assert {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD} == set(declared) - {"lambda"}, name
    inputs = {"model": None, "annealing_model": None, "mode": "anchored", "normalize_delta_norm": True, "clamp_w": False, "w_min": 0.0,
              "w_max": 3.0, "active_start": 0.0, "active_end": 1.0}
    with pytest.raises(TypeError, match="unexpected node inputs: lam"):
        mappings["ApplyAnnealingGuidance"].execute(**inputs, lam=0.1, **{"lambda": 0.4})
    with pytest.raises(TypeError, match="missing node input: lambda"):
        mappings["ApplyAnnealingGuidance"].execute(**inputs)
