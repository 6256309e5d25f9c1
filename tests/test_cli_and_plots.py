"""The three commands and the plots, run for real on small random-weight checkpoints (and the reference one where present)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import annealing
from annealing import AnnealingGuidance, AnnealingOptions, GuidanceRecorder, VPGrid
from annealing.cli import main
from annealing.plots import figure_to_image, omega_profile, parse_lambdas, plot_model_explorer, plot_trace
from annealing.training_grid import k_train


@pytest.fixture()
def checkpoint(tmp_path, make_guidance_model):
    path = tmp_path / "random.safetensors"
    annealing.save_guidance_model(make_guidance_model(seed=1), path)
    return path


def test_inspect_prints_metadata_the_omega_profile_and_a_table_of_w(checkpoint, capsys):
    assert main(["inspect", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    model = annealing.load_guidance_model(checkpoint)
    assert "sdxl" in out and "ddpm_index" in out and "51,329" in out and "50-step DDIM (leading, offset 0)" in out
    # the table's first row is timestep 999 at ||delta|| = 5; check one printed value against the model
    row = next(line for line in out.splitlines() if line.strip().startswith("999 |"))
    printed = [float(v) for v in row.split("|")[1].split()]
    expected = model(torch.full((6,), 999.0), 5.0, torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]))
    np.testing.assert_allclose(printed, expected.numpy(), atol=1e-4)
    # omega: first / middle / peak of w * k_train on the grid, lambda 0.4 at ||delta|| 5 (the profile is written out here)
    row = next(line for line in out.splitlines() if line.startswith("0.4 "))
    first, middle, peak = (float(v) for v in row.split("|")[1].split("/"))
    grid = VPGrid()
    w = model(grid.timesteps().float(), 5.0, 0.4).double() * k_train(grid, grid.sigmas()[:-1])
    np.testing.assert_allclose([first, middle, peak], [float(w[0]), float(w[25]), float(w.max())], atol=0.051)
    assert omega_profile(model, 0.4, 5.0) == pytest.approx((float(w[0]), float(w[25]), float(w.max())), rel=1e-5)


def test_inspect_json(checkpoint, capsys):
    assert main(["inspect", "--json", str(checkpoint)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["trained_latent_numel"] == 65536 and info["parameters"] == 51329
    assert info["metadata"]["training_grid"] == {"kind": "vp", **{k: v for k, v in VPGrid().to_dict().items() if k != "kind"}}


def test_inspect_into_a_closed_pipe_is_quiet(checkpoint):
    done = subprocess.run(f"{sys.executable} -m annealing inspect {checkpoint} | head -1", shell=True, capture_output=True, text=True)
    assert done.stdout.startswith("file:") and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_convert_with_overrides_and_overwrite_protection(checkpoint, tmp_path, capsys):
    out = tmp_path / "flow.safetensors"
    args = ["convert", str(checkpoint), str(out), "--model-family", "sd3", "--prediction-space", "velocity",
            "--timestep-convention", "sigma_x1000", "--trained-latent-numel", "16384", "--sampling-steps", "20"]
    assert main(args) == 0
    meta = annealing.load_guidance_model(out).metadata
    assert (meta.model_family, meta.prediction_space, meta.timestep_convention, meta.trained_latent_numel) == ("sd3", "velocity", "sigma_x1000", 16384)
    assert meta.training_grid.kind == "flow" and meta.sampling_steps == 20  # a flow convention brings a flow grid
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


def test_plot_writes_a_png_and_refuses_to_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "w.png"
    assert main(["plot", str(checkpoint), "--out", str(out), "--lambdas", "0,0.5,1", "--dpi", "50"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(checkpoint), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["plot", str(checkpoint), "--out", str(out), "--force", "--dpi", "40"]) == 0


def test_lambda_lists_are_parsed_once_for_the_cli_and_the_nodes(checkpoint, tmp_path):
    assert parse_lambdas("0.1, 0.4 0.8") == (0.1, 0.4, 0.8)
    for bad, word in (("", "at least one"), ("0.5, x", "lambda must be a number in \\[0, 1\\], got 'x'"),
                      ("0.5, 2", "lambda must be a number in \\[0, 1\\], got 2$"), ("0.5, nan", "got nan"), (",".join(["0.1"] * 13), "at most 12")):
        with pytest.raises(ValueError, match=word):
            parse_lambdas(bad)
    with pytest.raises(SystemExit):
        main(["plot", str(checkpoint), "--out", str(tmp_path / "x.png"), "--lambdas", "0.5,1.5"])


def test_one_lambda_rule_one_message(checkpoint, tmp_path, capsys, make_guidance_model):
    """The options, the model's forward and the plots' lists refuse a lambda with the same line; the CLI does not repeat
    the option's name in it (argparse already says 'argument --lambdas:')."""
    expected = "lambda must be a number in [0, 1], got 1.5"
    messages = []
    for refuse in (lambda: AnnealingOptions(lam=1.5), lambda: make_guidance_model()(500.0, 5.0, 1.5), lambda: parse_lambdas("0.2 1.5"),
                   lambda: make_guidance_model()(500.0, 5.0, torch.tensor([1.5]))):
        with pytest.raises(ValueError) as excinfo:
            refuse()
        messages.append(str(excinfo.value))
    assert messages == [expected] * 4
    with pytest.raises(SystemExit):
        main(["plot", str(checkpoint), "--out", str(tmp_path / "x.png"), "--lambdas", "0.5,1.5"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"argument --lambdas: {expected}") and err.count("lambda") == 2, err
    for bad in (float("nan"), 10**400, True, "0.4", None):
        with pytest.raises(ValueError, match=r"^lambda must be a number in \[0, 1\], got "):
            AnnealingOptions(lam=bad)


def test_explorer_image_is_rgb_in_unit_range(make_guidance_model):
    image = figure_to_image(plot_model_explorer(make_guidance_model(), lambdas=[0.0, 1.0], dpi=40))
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05  # something was drawn


def test_explorer_rows_share_their_y_range(make_guidance_model):
    fig = plot_model_explorer(make_guidance_model(), lambdas=[0.0, 1.0], dpi=40)
    omega_axes = [ax for ax in fig.axes if ax.get_title().startswith("ω at")]
    w_axes = [ax for ax in fig.axes if ax.get_title().startswith("w at ‖δ‖")]
    assert len(omega_axes) == len(w_axes) == 4
    for axes in (omega_axes, w_axes):
        assert len({ax.get_ylim() for ax in axes}) == 1


def test_trace_plot_for_a_recorded_run_an_empty_one_and_a_mismatched_one(make_guidance_model):
    guide = AnnealingGuidance(make_guidance_model(), AnnealingOptions(active_start=0.2))
    sigmas = VPGrid(num_steps=8).sigmas().float()
    rec = GuidanceRecorder()
    for i in range(8):
        guide.guide(sigmas[i], torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), sampling="eps", sample_sigmas=sigmas, recorder=rec)
    fig = plot_trace(rec.trace(), dpi=40)
    full = figure_to_image(fig)
    empty = figure_to_image(plot_trace(GuidanceRecorder().trace(), dpi=40))
    noted = figure_to_image(plot_trace(rec.trace(), dpi=40, note="these samples match none of this guider's runs"))
    assert full.shape == empty.shape == noted.shape
    assert not np.allclose(full, empty) and not np.allclose(full, noted)
    for ax in fig.axes[:2]:  # integer step ticks
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert all(float(t).is_integer() for t in ticks)


def test_outputs_are_checked_before_any_work(checkpoint, tmp_path, capsys):
    """A folder, a missing folder, a suffix the command cannot write: one line each, before the checkpoint is even read
    (the input given here does not exist, so any work would fail differently)."""
    missing = str(tmp_path / "missing.safetensors")
    cases = [
        (["convert", missing, str(tmp_path / "out.pt")], "convert writes a .safetensors file"),
        (["convert", missing, str(tmp_path)], "is a directory"),
        (["convert", missing, str(tmp_path), "--force"], "is a directory"),
        (["convert", missing, str(tmp_path / "no" / "out.safetensors")], "does not exist"),
        (["plot", missing, "--out", str(tmp_path)], "is a directory"),
        (["plot", missing, "--out", str(tmp_path), "--force"], "is a directory"),
        (["plot", missing, "--out", str(tmp_path / "w.xyz")], "cannot write a .xyz file"),
        (["plot", missing, "--out", str(tmp_path / "w")], "cannot write a file without a suffix"),
        (["plot", missing, "--out", str(tmp_path / "w.pgf")], "cannot write a .pgf file"),
        (["plot", missing, "--out", str(tmp_path / "no" / "w.png")], "does not exist"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and words in err, (argv, err)
        assert "missing.safetensors: not found" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random.safetensors"]  # nothing written
    with pytest.raises(annealing.CheckpointError, match="give the output that suffix"):
        annealing.convert_checkpoint(checkpoint, tmp_path / "out.pt")  # the library says the same
    assert main(["convert", str(checkpoint), str(tmp_path / "out.SafeTensors")]) == 0


@pytest.mark.parametrize("suffix, magic", [(".jpg", b"\xff\xd8\xff"), (".pdf", b"%PDF")])
def test_plot_writes_the_format_its_suffix_names(checkpoint, tmp_path, suffix, magic):
    out = tmp_path / f"w{suffix}"
    assert main(["plot", str(checkpoint), "--out", str(out), "--lambdas", "0.4", "--dpi", "30"]) == 0
    assert out.read_bytes().startswith(magic)
