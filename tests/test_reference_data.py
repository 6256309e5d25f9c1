"""The tests find the released checkpoint where the README tells a user to save it, or where they point, not only in the
project's reference folder; a different file under that name is reported, not tested as the release."""

from __future__ import annotations

import shutil

import pytest
import reference_data as rd


@pytest.fixture
def released_copy(upstream_path, tmp_path):
    path = tmp_path / "downloads" / "checkpoint.pt"
    path.parent.mkdir()
    shutil.copyfile(upstream_path, path)
    return path


def comfy_checkout_with(tmp_path, source):
    comfy = tmp_path / "ComfyUI"
    (comfy / "models" / "annealing_guidance").mkdir(parents=True)
    shutil.copyfile(source, comfy / "models" / "annealing_guidance" / "annealing_sdxl.pt")
    return comfy


def test_the_file_saved_where_the_readme_says_is_found_without_the_reference_folder(released_copy, tmp_path):
    comfy = comfy_checkout_with(tmp_path, released_copy)
    environ = {"ANNEALING_REFERENCE_DIR": str(tmp_path / "no-reference"), "COMFYUI_PATH": str(comfy)}
    path, why = rd.find_released_checkpoint(environ)
    assert path == comfy / "models" / "annealing_guidance" / "annealing_sdxl.pt" and why == ""


def test_the_environment_variable_names_the_file_under_any_name(released_copy, tmp_path):
    environ = {"ANNEALING_REFERENCE_DIR": str(tmp_path / "no-reference"), rd.CHECKPOINT_ENV: str(released_copy)}
    assert rd.find_released_checkpoint(environ) == (released_copy, "")


def test_the_environment_variable_comes_first(released_copy, tmp_path):
    comfy = comfy_checkout_with(tmp_path, released_copy)
    environ = {"COMFYUI_PATH": str(comfy), rd.CHECKPOINT_ENV: str(released_copy)}
    assert rd.find_released_checkpoint(environ)[0] == released_copy


def test_another_file_under_the_readme_name_is_reported_not_used(tmp_path):
    other = tmp_path / "fine_tune.pt"
    other.write_bytes(b"PK\x03\x04" + bytes(rd.RELEASED_SIZE - 4))  # the right size, other bytes
    comfy = comfy_checkout_with(tmp_path, other)
    environ = {"ANNEALING_REFERENCE_DIR": str(tmp_path / "no-reference"), "COMFYUI_PATH": str(comfy), rd.CHECKPOINT_ENV: str(tmp_path / "typo.pt")}
    path, why = rd.find_released_checkpoint(environ)
    assert path is None
    assert f"{tmp_path / 'typo.pt'} (${rd.CHECKPOINT_ENV}): not found" in why
    assert "annealing_sdxl.pt ($COMFYUI_PATH's models folder): not the released checkpoint (SHA-256" in why
    assert str(tmp_path / "no-reference" / "annealing_sdxl_upstream.pt") in why
    assert "\n" not in why


def test_a_file_of_another_size_is_refused_without_reading_it(tmp_path):
    small = tmp_path / "annealing_sdxl.pt"
    small.write_bytes(b"tiny")
    assert rd.why_not_released(small) == f"4 bytes, not the released checkpoint's {rd.RELEASED_SIZE}"


def test_the_golden_outputs_come_only_from_the_reference_folder(tmp_path):
    environ = {"ANNEALING_REFERENCE_DIR": str(tmp_path), "COMFYUI_PATH": str(tmp_path / "ComfyUI")}
    assert rd.golden_json(environ) == tmp_path / "upstream_w_golden.json"
