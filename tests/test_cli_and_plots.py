"""The three commands and the two plots, run for real on the reference checkpoint and on small models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import annealing
from annealing import AnnealingGuidance, AnnealingOptions, GuidanceRecorder
from annealing.cli import main
from annealing.plots import figure_to_image, plot_model_explorer, plot_trace
from annealing.schedules import ddim_sigmas


def test_inspect_prints_metadata_and_a_table_of_w(upstream_path, upstream_model, capsys):
    assert main(["inspect", str(upstream_path)]) == 0
    out = capsys.readouterr().out
    assert "sdxl" in out and "ddpm_index" in out and "51,329" in out
    # the table's first row is timestep 999 at ||delta|| = 5; check one printed value against the model
    row = next(line for line in out.splitlines() if line.strip().startswith("999 |"))
    printed = [float(v) for v in row.split("|")[1].split()]
    expected = upstream_model(torch.full((6,), 999.0), 5.0, torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]))
    np.testing.assert_allclose(printed, expected.numpy(), atol=1e-4)


def test_inspect_json(upstream_path, capsys):
    assert main(["inspect", "--json", str(upstream_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["trained_latent_numel"] == 65536 and info["parameters"] == 51329


def test_convert_with_overrides_and_overwrite_protection(upstream_path, tmp_path, capsys):
    out = tmp_path / "flow.safetensors"
    args = ["convert", str(upstream_path), str(out), "--model-family", "sd3", "--prediction-space", "velocity",
            "--timestep-convention", "sigma_x1000", "--trained-latent-numel", "16384"]
    assert main(args) == 0
    meta = annealing.load_guidance_model(out).metadata
    assert (meta.model_family, meta.prediction_space, meta.timestep_convention, meta.trained_latent_numel) == ("sd3", "velocity", "sigma_x1000", 16384)
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--force", "--model-family", "Not A Family"]) == 2
    assert "model_family" in capsys.readouterr().err


def test_bad_file_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(bad) in err and "\n" not in err


def test_plot_writes_a_png(upstream_path, tmp_path):
    out = tmp_path / "w.png"
    assert main(["plot", str(upstream_path), "--out", str(out), "--lambdas", "0,0.5,1", "--dpi", "50"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_rejects_lambdas_out_of_range(upstream_path, tmp_path):
    with pytest.raises(SystemExit):
        main(["plot", str(upstream_path), "--out", str(tmp_path / "x.png"), "--lambdas", "0.5,1.5"])


def test_explorer_image_is_rgb_in_unit_range(upstream_model):
    image = figure_to_image(plot_model_explorer(upstream_model, lambdas=[0.0, 1.0], dpi=40))
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05  # something was drawn


def test_trace_plot_for_a_recorded_run_and_for_an_empty_one(upstream_model):
    guide = AnnealingGuidance(upstream_model, AnnealingOptions(active_start=0.2))
    sigmas = ddim_sigmas(8)
    rec = GuidanceRecorder()
    for i in range(8):
        guide.guide(sigmas[i], torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), sampling="eps",
                    sigma_to_timestep=lambda s: s * 0 + 500.0, sample_sigmas=sigmas, recorder=rec)
    full = figure_to_image(plot_trace(rec.trace(), dpi=40))
    empty = figure_to_image(plot_trace(GuidanceRecorder().trace(), dpi=40))
    assert full.shape == empty.shape == (240, 320, 3)
    assert not np.allclose(full, empty)
