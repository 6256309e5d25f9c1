"""Checkpoint reading, writing and conversion, and one clear error for every kind of bad file."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

import annealing
from annealing import CheckpointError, CheckpointMetadata, GuidanceModelConfig, GuidanceScaleModel
from annealing.checkpoint_format import FORMAT_VERSION


def small_model(seed=0, **config) -> GuidanceScaleModel:
    torch.manual_seed(seed)
    meta = CheckpointMetadata(model_family="sd15", trained_latent_numel=4 * 64 * 64, training={"steps": 3, "images": 48})
    return GuidanceScaleModel(GuidanceModelConfig(hidden_size=8, n_layers=1, **config), meta)


def assert_one_line_error(excinfo, path, *words):
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message.lower(), message


def test_round_trip_keeps_weights_architecture_and_metadata(tmp_path):
    model = small_model(t_embed_dim=3)
    path = tmp_path / "m.safetensors"
    annealing.save_guidance_model(model, path)
    loaded = annealing.load_guidance_model(path)
    assert not loaded.training and loaded.config == model.config and loaded.metadata == model.metadata
    inputs = (torch.tensor([10.0, 900.0]), torch.tensor([1.0, 30.0]), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(loaded(*inputs), model(*inputs))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_upstream_checkpoint_loads_on_cpu_with_upstream_metadata(upstream_model):
    meta = upstream_model.metadata
    assert (meta.model_family, meta.prediction_space, meta.timestep_convention) == ("sdxl", "epsilon", "ddpm_index")
    assert meta.trained_latent_numel == 65536 and meta.sampling_steps == 50
    assert upstream_model.device.type == "cpu" and upstream_model.source_format == "torch"


def test_convert_upstream_then_reload_gives_identical_outputs(upstream_path, upstream_model, golden_rows, tmp_path):
    out = tmp_path / "sdxl.safetensors"
    annealing.convert_checkpoint(upstream_path, out)
    converted = annealing.load_guidance_model(out)
    assert converted.source_format == "safetensors" and converted.metadata.training["steps"] == 5353
    rows = torch.tensor(golden_rows)
    torch.testing.assert_close(converted(rows[:, 0], rows[:, 1], rows[:, 2]), rows[:, 3], rtol=0, atol=1e-5)


def test_format_is_told_by_content_not_extension(upstream_path, tmp_path):
    renamed = tmp_path / "really_a_torch_file.safetensors"
    renamed.write_bytes(upstream_path.read_bytes())
    assert annealing.load_guidance_model(renamed).source_format == "torch"
    model = small_model()
    st_as_pt = tmp_path / "really_safetensors.pt"
    annealing.save_guidance_model(model, st_as_pt)
    assert annealing.load_guidance_model(st_as_pt).source_format == "safetensors"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(path)
    assert_one_line_error(excinfo, path, "not found")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(tmp_path)
    assert_one_line_error(excinfo, tmp_path, "directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(path)
    assert_one_line_error(excinfo, path, "empty")


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_truncated_safetensors(tmp_path, fraction):
    good = tmp_path / "good.safetensors"
    annealing.save_guidance_model(small_model(), good)
    data = good.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(path)
    assert_one_line_error(excinfo, path, "truncated")


def test_truncated_torch_file(upstream_path, tmp_path):
    path = tmp_path / "cut.pt"
    path.write_bytes(upstream_path.read_bytes()[:5000])
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(path)
    assert_one_line_error(excinfo, path, "corrupt or truncated")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(path)
    assert_one_line_error(excinfo, path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if unpickled


def test_pickle_asking_for_arbitrary_callables_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"guidance_scale_model": {"x": _Exploit(str(marker))}, "config": {}}, path)
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(path)
    assert_one_line_error(excinfo, path, "refused")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_raw_pickle_stream_is_refused_too(tmp_path):
    marker = tmp_path / "pwned2"
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(CheckpointError):
        annealing.load_guidance_model(path)
    assert not marker.exists()


def _write_torch(path, state, config=None):
    torch.save({"config": {"guidance_scale_model": config or {"hidden_size": 8, "n_layers": 1}}, "guidance_scale_model": state}, path)


def test_missing_and_unexpected_keys(tmp_path):
    state = small_model().state_dict()
    missing = dict(state)
    del missing["combined_head.2.bias"]
    path = tmp_path / "missing.pt"
    _write_torch(path, missing)
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(path)
    assert_one_line_error(excinfo, path, "missing", "combined_head.2.bias")

    extra = dict(state, **{"combined_head.9.weight": torch.zeros(1)})
    path = tmp_path / "extra.pt"
    _write_torch(path, extra)
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(path)
    assert_one_line_error(excinfo, path, "unexpected", "combined_head.9.weight")


def test_malformed_upstream_config(tmp_path):
    path = tmp_path / "list.pt"
    torch.save({"config": ["not", "a", "dict"], "guidance_scale_model": small_model().state_dict()}, path)
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(path)
    assert_one_line_error(excinfo, path, "config")
    # an odd 'diffusion' entry only loses the provenance it would have given
    path = tmp_path / "odd.pt"
    torch.save({"config": {"diffusion": "sdxl", "guidance_scale_model": {"hidden_size": 8, "n_layers": 1}},
                "guidance_scale_model": small_model().state_dict()}, path)
    assert annealing.load_guidance_model(path).metadata.sampling_steps == 50


def test_not_a_guidance_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(path)
    assert_one_line_error(excinfo, path, "guidance_scale_model")


def test_wrong_tensor_shape(tmp_path):
    state = small_model().state_dict()
    state["combined_head.0.weight"] = torch.zeros(8, 11)
    path = tmp_path / "shape.pt"
    _write_torch(path, state)
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(path)
    assert_one_line_error(excinfo, path, "shape", "combined_head.0.weight")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, bad):
    model = small_model()
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    tensors["combined_head.2.weight"][0, 0] = bad
    path = tmp_path / "nan.safetensors"
    save_file(tensors, path, metadata=model.metadata.to_strings(model.config))
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(path)
    assert_one_line_error(excinfo, path, "nan or inf", "combined_head.2.weight")


def _rewrite_metadata(src, dst, **changes):
    tensors = load_file(src)
    from safetensors import safe_open

    with safe_open(str(src), "pt") as handle:
        meta = dict(handle.metadata())
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file(tensors, dst, metadata=meta)


def test_newer_format_version_is_refused(tmp_path):
    good = tmp_path / "good.safetensors"
    annealing.save_guidance_model(small_model(), good)
    path = tmp_path / "future.safetensors"
    _rewrite_metadata(good, path, format_version=str(FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(path)
    assert_one_line_error(excinfo, path, "newer format version")


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"format": None}, ["no annealing-guidance metadata"]),
        ({"prediction_space": "x0"}, ["prediction_space"]),
        ({"timestep_convention": None}, ["missing metadata", "timestep_convention"]),
        ({"architecture": "{not json"}, ["architecture", "json"]),
        ({"architecture": json.dumps({"hidden_size": -3})}, ["hidden_size"]),
        ({"trained_latent_numel": "lots"}, ["trained_latent_numel"]),
    ],
)
def test_bad_metadata(tmp_path, changes, words):
    good = tmp_path / "good.safetensors"
    annealing.save_guidance_model(small_model(), good)
    path = tmp_path / "bad.safetensors"
    _rewrite_metadata(good, path, **changes)
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(path)
    assert_one_line_error(excinfo, path, *words)


def test_saving_is_atomic_and_never_leaves_half_a_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.safetensors"
    annealing.save_guidance_model(small_model(seed=1), path)
    before = path.read_bytes()

    import safetensors.torch as st

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(CheckpointError, match=f"no space left on {tmp_path}"):
        annealing.save_guidance_model(small_model(seed=2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]


def test_saving_into_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        annealing.save_guidance_model(small_model(), tmp_path / "no" / "m.safetensors")


def test_torch_zip_is_recognised_even_when_damaged(tmp_path):
    path = tmp_path / "zip.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"garbage")
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(path)
    assert_one_line_error(excinfo, path)


def test_written_files_get_ordinary_permissions(tmp_path):
    path = tmp_path / "perm.safetensors"
    annealing.save_guidance_model(small_model(), path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
