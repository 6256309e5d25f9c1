"""What the pack reads off the host (nodes/model_folder.py, model_inspection.py, compatibility.py, warn_once.py) and the
sampler facts of the core (annealing/samplers.py): no ComfyUI."""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import pytest
import torch
from comfy_fakes import (
    COSMOS_RFLOW,
    _import,
    core,
    flow_metadata,
    model_sampling,
    sample_euler,
    sample_euler_ancestral_RF,
    sample_euler_cfg_pp,
    sample_unipc,
    samplers,
)

model_folder = _import("nodes.model_folder")
inspection = _import("nodes.model_inspection")
compatibility = _import("nodes.compatibility")
warn_once = _import("nodes.warn_once").warn_once


def test_register_model_folder_creates_it_and_accepts_safetensors_and_pt(tmp_path):
    table = {}
    path = model_folder.register_model_folder(table, str(tmp_path / "models"))
    assert Path(path).is_dir() and path == str(tmp_path / "models" / "annealing_guidance")
    assert table["annealing_guidance"] == ([path], {".safetensors", ".pt"})


def test_register_model_folder_keeps_user_paths_first(tmp_path):
    table = {"annealing_guidance": (["/user/configured"], set())}  # as extra_model_paths.yaml leaves it
    path = model_folder.register_model_folder(table, str(tmp_path))
    paths, extensions = table["annealing_guidance"]
    assert paths == ["/user/configured", path] and extensions == {".safetensors", ".pt"}
    model_folder.register_model_folder(table, str(tmp_path))  # idempotent
    assert table["annealing_guidance"][0] == ["/user/configured", path]


def test_sampler_names_from_functions():
    assert samplers.sampler_name_from_function(sample_euler_cfg_pp) == "euler_cfg_pp"
    assert samplers.sampler_name_from_function(functools.partial(sample_euler, 1)) == "euler"
    assert samplers.sampler_name_from_function(sample_euler_ancestral_RF) == "euler_ancestral"
    assert samplers.sampler_name_from_function(sample_unipc) == "uni_pc"
    assert samplers.sampler_name_from_function(None) is None
    assert samplers.renoises_with_uncond("dpmpp_2m_cfg_pp") and not samplers.renoises_with_uncond("dpmpp_2m")
    assert not samplers.renoises_with_uncond(None)
    assert samplers.is_ancestral("euler_ancestral") and samplers.is_ancestral("euler_ancestral_cfg_pp") and not samplers.is_ancestral("euler")
    # lcm rebuilds x from the x0-prediction alone
    assert samplers.SamplerInfo("lcm").x0_only and not samplers.SamplerInfo("euler").x0_only
    assert samplers.SamplerInfo("euler_ancestral", eta=float("nan")).eta == 1.0  # a host's odd option: full ancestral noise


def test_ancestral_sigma_down_eps_matches_k_diffusion_formula():
    sigma, sigma_next = torch.tensor([14.6, 3.0, 0.5]), torch.tensor([3.0, 0.5, 0.0])
    down = samplers.ancestral_sigma_down(sigma, sigma_next, "eps", eta=1.0)
    for s, n, d in zip(sigma.tolist(), sigma_next.tolist(), down.tolist()):
        up = min(n, math.sqrt(n**2 * (s**2 - n**2) / s**2))
        assert d == pytest.approx(math.sqrt(n**2 - up**2), rel=1e-5, abs=1e-6)  # float32
    assert down[-1] == 0
    assert torch.equal(samplers.ancestral_sigma_down(sigma, sigma_next, "eps", eta=0.0), sigma_next)
    assert (samplers.ancestral_sigma_down(sigma, sigma_next, "v_prediction", eta=0.5) >= down).all()  # less noise, longer move


def test_ancestral_sigma_down_flow_formula():
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.6, 0.2, 0.0])
    down = samplers.ancestral_sigma_down(sigma, sigma_next, "const", eta=1.0)
    expected = [n * (1 + (n / s - 1)) for s, n in zip(sigma.tolist(), sigma_next.tolist())]
    assert down.tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="eta"):
        samplers.ancestral_sigma_down(sigma, sigma_next, "const", eta=-1)


def test_sampling_kind_reads_comfyui_class_hierarchy():
    assert inspection.sampling_kind(model_sampling("eps")) == "eps"
    assert inspection.sampling_kind(model_sampling("v")) == "v_prediction"
    assert inspection.sampling_kind(model_sampling("const")) == "const"
    with pytest.raises(ValueError, match="not supported"):
        inspection.sampling_kind(COSMOS_RFLOW())
    assert inspection.is_discrete_ddpm(model_sampling("eps")) and not inspection.is_discrete_ddpm(model_sampling("const"))
    assert inspection.model_family("SDXL") == "sdxl" and inspection.model_family("SD3") == "sd3" and inspection.model_family(None) is None


def test_compatibility_problems():
    upstream = core.upstream_metadata()
    assert compatibility.compatibility_problems(upstream, "eps", "sdxl", True) == (None, [])
    error, _ = compatibility.compatibility_problems(upstream, "const", "sd3", False, source="a.pt")
    assert error.startswith("a.pt uses DDPM timesteps") and "flow" in error
    error, _ = compatibility.compatibility_problems(flow_metadata(), "eps", "sdxl", True)
    assert "sigma_x1000" in error and "EPS" in error
    error, warnings = compatibility.compatibility_problems(upstream, "eps", "sd15", True)
    assert error is None and len(warnings) == 1 and "sdxl" in warnings[0] and "sd15" in warnings[0]
    error, warnings = compatibility.compatibility_problems(upstream, "v_prediction", "sdxl", True)
    assert error is None and "epsilon" in warnings[0] and "v_prediction" in warnings[0]
    assert compatibility.compatibility_problems(flow_metadata(), "const", "sd3", False) == (None, [])
    # our training on a v-prediction model writes an epsilon-space checkpoint: no warning on that same kind of model
    trained_on_v = core.CheckpointMetadata(model_family="sd2", training={"base_prediction_type": "v_prediction"})
    assert compatibility.compatibility_problems(trained_on_v, "v_prediction", "sd2", True) == (None, [])
    _, warnings = compatibility.compatibility_problems(trained_on_v, "eps", "sd2", True)  # SD2-base is another model
    assert len(warnings) == 1 and "v_prediction" in warnings[0] and "epsilon" in warnings[0]
    # a checkpoint that does not say what it was trained on: compared by delta space
    unknown = core.CheckpointMetadata(model_family="sd3", prediction_space="epsilon", timestep_convention="sigma_x1000")
    _, warnings = compatibility.compatibility_problems(unknown, "const", "sd3", False)
    assert len(warnings) == 1 and "epsilon space" in warnings[0]
    # a learn_to_guide network never reads delta: no delta-space warning, but the other checks stay
    learned = unknown.replace(method="learn_to_guide")
    assert compatibility.compatibility_problems(learned, "const", "sd3", False) == (None, [])
    _, warnings = compatibility.compatibility_problems(learned, "const", "flux", False)
    assert len(warnings) == 1 and "trained for sd3" in warnings[0]
    error, _ = compatibility.compatibility_problems(learned, "eps", "sdxl", True)
    assert "sigma_x1000" in error


def test_warn_once(caplog):
    with caplog.at_level(logging.WARNING, logger="annealing_guidance"):
        assert warn_once("unique message for this test")
        assert not warn_once("unique message for this test")
    assert sum("unique message for this test" in r.getMessage() for r in caplog.records) == 1


def test_cfg_pp_samplers_are_recognised_by_name_and_by_what_they_do():
    # ComfyUI 0.35's cfgpp_ud10_ab renoises with the unconditional prediction although its name does not end in _cfg_pp
    assert samplers.renoises_with_uncond("cfgpp_ud10_ab") and samplers.SamplerInfo("cfgpp_ud10_ab").renoises_with_uncond
    assert not samplers.is_ancestral("cfgpp_ud10_ab")
    # a sampler the host saw read the unconditional prediction itself is a CFG++ sampler whatever its name, but not a known one
    mystery = samplers.SamplerInfo("mystery", reads_uncond=True)
    assert mystery.renoises_with_uncond and not mystery.known
    assert samplers.SamplerInfo("mystery").known and not samplers.SamplerInfo("mystery").renoises_with_uncond
    # euler_pp reads it too, and steps as plain Euler at twice its scale: no CFG++ sampler, a multiple of 2
    euler_pp = samplers.SamplerInfo("euler_pp", reads_uncond=True)
    assert not euler_pp.renoises_with_uncond and euler_pp.known and euler_pp.guidance_multiple == 2.0
    assert samplers.SamplerInfo("euler").guidance_multiple == 1.0


def test_model_inspection_reads_the_newer_hosts_sampling_types():
    assert inspection.sampling_kind(model_sampling("IMG_TO_IMG")) == "eps"  # x = x0 + sigma eps, the model reads raw x
    assert inspection.sampling_kind(model_sampling("V_PREDICTION_DDPM")) == "v_prediction"  # CogVideoX (0.21): EPS's x-space
    with pytest.raises(ValueError, match="IMG_TO_IMG_FLOW starts sampling from an image"):
        inspection.sampling_kind(model_sampling("IMG_TO_IMG_FLOW"))
    assert inspection.noise_scale(model_sampling("const")) == 1.0
    assert inspection.noise_scale(model_sampling("const", noise_scale=0.5)) == 0.5
    assert math.isnan(inspection.noise_scale(model_sampling("const", noise_scale=torch.tensor([1.0, 2.0]))))


def test_a_model_with_another_noise_scale_is_refused_naming_it():
    """Newer ComfyUI flow models may scale their noise (x = sigma * s * eps + (1 - sigma) x0): every checkpoint was trained
    with s = 1, so its delta and noise levels mean other things there."""
    flow = flow_metadata()
    assert compatibility.check_model(flow, model_sampling("const"), "SD3", source="f.safetensors") == ("const", [])
    assert compatibility.check_model(flow, model_sampling("const", noise_scale=1.0), "SD3") == ("const", [])
    for scale in (0.5, 2.0, float("nan")):
        with pytest.raises(ValueError, match=r"noise_scale .*f\.safetensors was trained with noise scale 1") as error:
            compatibility.check_model(flow, model_sampling("const", noise_scale=scale), "SD3", source="f.safetensors")
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="noise_scale 0.7"):
        compatibility.check_model(core.upstream_metadata(), model_sampling("eps", noise_scale=0.7), "SDXL")


def test_check_model_warns_once_and_returns_the_kind(caplog):
    with caplog.at_level(logging.WARNING, logger="annealing_guidance"):
        kind, warnings = compatibility.check_model(core.upstream_metadata(), model_sampling("v"), "SDXL", source="once.pt")
        compatibility.check_model(core.upstream_metadata(), model_sampling("v"), "SDXL", source="once.pt")
    assert kind == "v_prediction" and len(warnings) == 1 and "once.pt" in warnings[0]
    assert sum(warnings[0] in r.getMessage() for r in caplog.records) == 1
