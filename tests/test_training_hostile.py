"""Hostile and broken training input: configs, datasets, images and output folders from strangers or from a killed run.

Nothing here may hang, allocate without bound, overwrite a finished run or end in a traceback: every refusal is one
line naming the file or setting, given before any model weight is loaded and before the output folder exists."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import threading
import zlib
from pathlib import Path

import hostile_files as hf
import pytest
import torch
from PIL import Image
from training_fixtures import make_config, one_thread, same_weights, state_of, tiny_dataset

import training.run_parts
import training.trainer
from training.cli import main as cli_main
from training.config import FLOAT_BOUNDS, INT_BOUNDS, TrainConfig, TrainingError, config_fields, read_config_file
from training.data import ImageCaptionDataset, Sample, load_image, scan_dataset
from training.run_folder import RESUME_FILE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _single_thread():
    yield from one_thread()


def train(config):
    return training.trainer.train(config, progress=False)


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text and len(text) < 400, text
    return text


def without_blocking(fifo: Path, call):
    """Run ``call()`` in a thread; if it is stuck opening or reading ``fifo``, open the writing end to release it, so a
    broken check fails this test instead of hanging the suite. Returns what ``call`` raised or returned."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():
        with open(fifo, "wb"):  # the reader's open() returns, its read() sees end of file
            pass
        thread.join(60)
        pytest.fail(f"reading {fifo.name} blocked on the FIFO")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def png_bytes(width: int, height: int, rows: list[bytes], bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A PNG written by hand (PIL cannot write some of the layouts tested here)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    raw = zlib.compress(b"".join(b"\0" + row for row in rows), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------------------ config files


def test_a_yaml_alias_bomb_is_refused_without_expanding(tmp_path):
    # "billion laughs": 9 levels of 9 aliases each, 9^9 = 387 M strings once anything walks it (repr, json.dumps)
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    lines.append("seed: *a8")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 500
    with pytest.raises(TrainingError, match=r"bomb.yaml: line 2: YAML aliases \(\*name\) are not allowed") as info:
        read_config_file(bomb)
    one_line(info)
    # one alias is one too many: a flat mapping of settings never needs them
    (tmp_path / "one.yaml").write_text("lr: &x 0.001\nweight_decay: *x\n")
    with pytest.raises(TrainingError, match="line 2: YAML aliases"):
        read_config_file(tmp_path / "one.yaml")


def test_config_files_are_bounded_before_parsing(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 7000 + "lr: 0.001\n")
    with pytest.raises(TrainingError, match=r"big.yaml: the config file is larger than 64 KiB"):
        read_config_file(big)
    deep_yaml = tmp_path / "deep.yaml"
    deep_yaml.write_text("seed: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(TrainingError, match="deep.yaml: line 1: nested deeper than 8 levels"):
        read_config_file(deep_yaml)
    deep_toml = tmp_path / "deep.toml"
    deep_toml.write_text("seed = " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(TrainingError, match="deep.toml: cannot parse the config file") as info:
        read_config_file(deep_toml)
    one_line(info)


def test_huge_values_are_never_echoed(tmp_path):
    (tmp_path / "long.yaml").write_text("lr: '" + "9" * 50000 + "'\n")
    with pytest.raises(TrainingError, match=r"lr must be a number, got '9{60}'\.\.\.$") as info:
        read_config_file(tmp_path / "long.yaml")
    one_line(info)
    (tmp_path / "list.toml").write_text("seed = [" + "1," * 20000 + "]\n")
    with pytest.raises(TrainingError, match="seed must be an integer, got a list$"):
        read_config_file(tmp_path / "list.toml")
    (tmp_path / "key.yaml").write_text("k" * 1000 + ": 1\n")
    with pytest.raises(TrainingError, match=r"unknown setting 'k{60}'\.\.\.$"):
        read_config_file(tmp_path / "key.yaml")
    (tmp_path / "digits.yaml").write_text("lr: 1" + "0" * 500 + "\n")  # too large for a float: no OverflowError
    config = TrainConfig(model="m", dataset="d", output="o", **read_config_file(tmp_path / "digits.yaml"))
    with pytest.raises(TrainingError, match=r"lr must be a finite number in \(0, 1\], got inf"):
        config.validate()


def test_a_config_that_is_a_fifo_or_not_utf8_is_one_line(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(TrainingError, match=r"fifo.yaml: the config file is not a regular file \(a FIFO\)"):
        without_blocking(fifo, lambda: read_config_file(fifo))
    (tmp_path / "latin1.yaml").write_bytes("# r\xe9glages\nlr: 0.001\n".encode("latin-1"))
    with pytest.raises(TrainingError, match=r"latin1.yaml: the config file is not UTF-8 text \(invalid byte 0xe9 at offset 3\)"):
        read_config_file(tmp_path / "latin1.yaml")
    (tmp_path / "folder.toml").mkdir()
    with pytest.raises(TrainingError, match=r"folder.toml: the config file is not a regular file \(a folder\)"):
        read_config_file(tmp_path / "folder.toml")


# ------------------------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seed": 2**70}, r"seed must be an integer in \[0, 2\^63 - 1\], got 1180591620717411303424"),
        ({"seed": -1}, "seed must be an integer in"),
        ({"seed": True}, "seed must be an integer, got True"),
        ({"cads_tau1": math.nan}, r"cads_tau1 must be a finite number in \[0, 1\], got nan"),
        ({"cads_noise_scale": math.inf}, "cads_noise_scale must be a finite number"),
        ({"lr": -1e-3}, r"lr must be a finite number in \(0, 1\]"),
        ({"lambda_max": math.nan}, "lambda_max must be a finite number"),
        ({"balance_momentum": 1.0}, r"balance_momentum must be a finite number in \[0, 1\)"),
        ({"delta_normalization": 0.0}, "delta_normalization must be a finite number"),
        ({"weight_decay": "0.01"}, "weight_decay must be a number, got '0.01'"),
        ({"mlp_hidden": 10**6}, r"mlp_hidden must be an integer in \[1, 2048\], got 1000000"),
        ({"mlp_layers": 17}, r"mlp_layers must be an integer in \[0, 16\]"),
        ({"resolution": 10**6}, r"resolution must be an integer in \[8, 4096\]"),
        ({"resolution": 100}, "resolution must be a multiple of 8"),
        ({"batch_size": 10**5}, "batch_size must be an integer in"),
        ({"num_workers": 10**4}, r"num_workers must be an integer in \[0, 64\]"),
        ({"grid_steps": 1}, r"grid_steps must be an integer in \[2, 1000\]"),
        ({"max_steps": 0}, "max_steps must be an integer in"),
        ({"output_name": "../x"}, "output_name must be a file name without extension.*got '../x'"),
        ({"output_name": "/tmp/x"}, "output_name must be a file name"),
        ({"output_name": "sub\\x"}, "output_name must be a file name"),
        ({"output_name": ".hidden"}, "output_name must be a file name"),
        ({"output_name": "x" * 129}, "output_name must be a file name"),
        ({"model_family": "SDXL"}, "model_family must be one of sdxl, sd2, sd15, sd3, wan21, wan22, qwen_image, chroma; got 'SDXL'$"),
        ({"model_family": "sdxxl"}, "model_family must be one of sdxl, sd2, sd15, sd3, wan21, wan22, qwen_image, chroma; got 'sdxxl'$"),
        ({"model_family": "sd/xl"}, "model_family must be one of"),
        ({"caption_extension": ".png"}, "caption_extension must not be an image extension"),
        ({"caption_extension": "./../x"}, "caption_extension must be a dot and"),
        ({"precision": "fp8"}, "precision must be one of auto, fp32, bf16, fp16; got 'fp8'"),
        ({"embeddings": "a\0b"}, "embeddings must be a path of 1 to 4096 characters without NUL bytes"),
        ({"cads": "yes"}, "cads must be true or false, got 'yes'"),
        ({"resume": True, "overwrite": True}, "resume and overwrite exclude each other"),
        ({"lambda_min": 0.8, "lambda_max": 0.2}, "need 0 <= lambda_min <= lambda_max <= 1"),
        ({"cads_tau1": 0.5, "cads_tau2": 0.5}, "cads_tau2 must exceed cads_tau1"),
    ],
)
def test_every_setting_is_checked_with_one_line_naming_it(change, message):
    with pytest.raises(TrainingError, match=message) as info:
        TrainConfig(model="m", dataset="d", output="o", **change).validate()
    one_line(info)


def test_every_numeric_setting_has_bounds():
    """A new int or float setting must get bounds here, or a stranger's config could ask for anything."""
    for f in config_fields():
        kind = str(f.type).split("|")[0].strip()
        if kind == "int":
            assert f.name in INT_BOUNDS, f.name
        if kind == "float":
            assert f.name in FLOAT_BOUNDS, f.name
    TrainConfig(model="m", dataset="d", output="o").validate()  # the defaults are inside them
    extreme = {name: high for name, (low, high) in INT_BOUNDS.items() if name not in ("resolution", "mlp_layers")}
    TrainConfig(model="m", dataset="d", output="o", output_name="my model (v2) [final]", **extreme).validate()
    # each MLP bound alone is allowed, but the widest MLP at the deepest setting exceeds the core's parameter bound
    with pytest.raises(TrainingError, match="parameters"):
        TrainConfig(model="m", dataset="d", output="o", **extreme, mlp_layers=INT_BOUNDS["mlp_layers"][1]).validate()


def test_bad_settings_fail_before_any_model_loads_and_leave_no_output_folder(tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(training.run_parts, "load_backend", no_loading)
    out = tmp_path / "new" / "out"
    for flags in (["--seed", str(2**70)], ["--output-name", "../x"], ["--model-family", "SDXL"], ["--model-family", "sdxxl"], ["--mlp-hidden", str(10**6)],
                  ["--cads-tau1", "nan"], ["--model", str(tmp_path / "missing")]):
        common = ["--model", str(tmp_path), "--dataset", str(tiny_dataset()), "--output", str(out), "--quiet"]
        assert cli_main(common + flags) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "new").exists()  # the last case failed after the settings, on the model folder: no folder either


def test_a_full_disk_outside_atomic_write_is_one_line(monkeypatch, capsys):
    def full(config, progress=True):
        raise OSError(28, "No space left on device", "/runs/x/train_log.jsonl")

    monkeypatch.setattr(training.trainer, "train", full)
    assert cli_main(["--model", "m", "--dataset", "d", "--output", "o"]) == 2
    assert capsys.readouterr().err == "error: no space left on device (/runs/x/train_log.jsonl)\n"


# ------------------------------------------------------------------------------------------------------------ datasets


def test_fifos_in_a_dataset_never_block(tmp_path):
    manifest = tmp_path / "fifo.jsonl"
    os.mkfifo(manifest)
    with pytest.raises(TrainingError, match=r"fifo.jsonl: the manifest is not a regular file \(a FIFO\)"):
        without_blocking(manifest, lambda: scan_dataset(manifest))

    # an image entry that is a FIFO is skipped and counted like any unreadable image
    image = tmp_path / "pipe.png"
    os.mkfifo(image)
    item = without_blocking(image, lambda: ImageCaptionDataset([Sample(image, "x")], 16)[0])
    assert item["failed"] == str(image) and "not a regular file (a FIFO)" in item["reason"]

    # a caption that is a FIFO stops the scan with one line (it is not a missing caption)
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    os.mkfifo(folder / "a.txt")
    with pytest.raises(TrainingError, match=r"a.txt: the caption file is not a regular file \(a FIFO\)"):
        without_blocking(folder / "a.txt", lambda: scan_dataset(folder))


def test_manifest_and_caption_text_is_bounded_and_utf8(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"image": "a.png", "caption": "ok"}\n{"image": "b.png", "caption": "caf\xe9"}\n')
    with pytest.raises(TrainingError, match=r"latin1.jsonl:2: the manifest is not UTF-8 text \(invalid byte 0xe9 at offset 34 of the line\)"):
        scan_dataset(bad)
    long_line = tmp_path / "long.jsonl"
    long_line.write_text(json.dumps({"image": "a.png", "caption": "x" * 300_000}) + "\n")
    with pytest.raises(TrainingError, match="long.jsonl:1: line longer than 256 KiB"):
        scan_dataset(long_line)
    long_caption = tmp_path / "caption.jsonl"
    long_caption.write_text(json.dumps({"image": "a.png", "caption": "x" * 70_000}) + "\n")
    with pytest.raises(TrainingError, match="caption.jsonl:1: caption longer than 64 KiB"):
        scan_dataset(long_caption)
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(TrainingError, match=r"deep.jsonl:1: not valid JSON \(nested too deeply\)"):
        scan_dataset(deep)
    digits = tmp_path / "digits.jsonl"
    digits.write_text('{"image": "a.png", "caption": "x", "n": 1' + "0" * 5000 + "}\n")
    with pytest.raises(TrainingError, match="digits.jsonl:1: not valid JSON") as info:
        scan_dataset(digits)
    one_line(info)

    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    (folder / "a.txt").write_bytes(b"\xff\xfe caption in UTF-16?")
    with pytest.raises(TrainingError, match=r"a.txt: the caption file is not UTF-8 text \(invalid byte 0xff at offset 0\)"):
        scan_dataset(folder)
    (folder / "a.txt").write_text("y" * (64 * 1024 + 1))
    with pytest.raises(TrainingError, match="a.txt: the caption file is larger than 64 KiB"):
        scan_dataset(folder)


def test_a_one_pixel_wide_strip_is_skipped_not_resized_to_gigabytes(tmp_path):
    strip = tmp_path / "strip.png"
    strip.write_bytes(png_bytes(1, 10000, [b"\x80"] * 10000))  # 121 bytes in the issue; at 512 px it was 512 x 5.12 M
    assert strip.stat().st_size < 200
    with pytest.raises(ValueError, match="1 x 10000 is longer than 8:1"):
        load_image(strip, 512)
    item = ImageCaptionDataset([Sample(strip, "x")], 512)[0]
    assert item["failed"] == str(strip) and "longer than 8:1" in item["reason"]
    wide = tmp_path / "wide.png"  # 8:1 is still fine, and costs only the R x R target
    Image.new("RGB", (64, 8), (255, 0, 0)).save(wide)
    assert torch.allclose(load_image(wide, 32)[0], torch.ones(32, 32))


def test_pixel_count_is_bounded_before_decoding(tmp_path):
    # 9000 x 8000 gray: below PIL's own bomb limit (89 M), 72 M bytes to decode from a 70 KB file
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_bytes(9000, 8000, [bytes(9000)] * 8000))
    assert huge.stat().st_size < 200_000
    decoded = []
    real_load = Image.Image.load

    def spy(self):
        decoded.append(self.size)
        return real_load(self)

    import PIL.ImageFile

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PIL.ImageFile.ImageFile, "load", spy)
        with pytest.raises(ValueError, match="9000 x 8000 pixels is more than 67,108,864"):
            load_image(huge, 64)
    assert decoded == []  # refused from the header


def test_16_bit_and_float_images_keep_their_tones(tmp_path):
    """PIL's convert('RGB') clips 16-bit values to white and float [0, 1] values to black; both are scaled instead."""
    for value in (0, 16384, 32768, 65535):
        path = tmp_path / f"gray16-{value}.png"
        path.write_bytes(png_bytes(16, 16, [struct.pack(">H", value) * 16] * 16, bit_depth=16))
        assert Image.open(path).mode == "I;16"
        pixels = load_image(path, 8)
        assert pixels.shape == (3, 8, 8)
        assert torch.allclose(pixels, torch.full((3, 8, 8), value / 65535 * 2 - 1), atol=1e-5), (value, pixels[0, 0, 0])
    # 16-bit colour: PIL keeps the high byte, which is already the right scale
    rgb16 = tmp_path / "rgb16.png"
    rgb16.write_bytes(png_bytes(8, 8, [struct.pack(">HHH", 65535, 32768, 0) * 8] * 8, bit_depth=16, colour_type=2))
    assert torch.allclose(load_image(rgb16, 8)[:, 0, 0], torch.tensor([1.0, 128 / 127.5 - 1, -1.0]), atol=1e-6)

    for value in (0.0, 0.25, 0.5, 1.0):
        path = tmp_path / f"float-{value}.tif"
        Image.new("F", (16, 16), value).save(path)
        assert Image.open(path).mode == "F"
        assert torch.allclose(load_image(path, 8), torch.full((3, 8, 8), value * 2 - 1), atol=1e-6), value
    # float data beyond [0, 1] (e.g. 0..1000) is scaled by its own range: the left half black, the right half white
    halves = Image.new("F", (32, 16), 0.0)
    halves.paste(1000.0, (16, 0, 32, 16))
    halves.save(tmp_path / "halves.tif")
    pixels = load_image(tmp_path / "halves.tif", 16)[0]
    assert torch.allclose(pixels[:, :3], torch.full((16, 3), -1.0), atol=1e-4) and torch.allclose(pixels[:, -3:], torch.ones(16, 3), atol=1e-4)
    # NaN or infinite pixels make an image unusable: skipped like a corrupt file
    for bad in (math.nan, math.inf):
        Image.new("F", (16, 16), bad).save(tmp_path / "bad.tif")
        with pytest.raises(ValueError, match="(NaN|infinite) pixel values"):
            load_image(tmp_path / "bad.tif", 8)


def test_only_image_decoders_are_used(tmp_path):
    """A file is identified by its content: a .png holding another format (here a PPM) must not reach that decoder."""
    disguised = tmp_path / "x.png"
    disguised.write_bytes(b"P6\n4 4\n255\n" + bytes(48))
    assert Image.open(disguised).format == "PPM"
    with pytest.raises(Exception, match="cannot identify image file"):
        load_image(disguised, 8)


# ------------------------------------------------------------------------------------------------------------ output folder


def test_a_finished_run_is_never_replaced_without_asking(tmp_path, capsys):
    out = tmp_path / "out"
    first = train(make_config("sd15", out, max_steps=2, checkpoint_every=1, keep_checkpoints=5))
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "notes.txt").write_text("mine")  # foreign files: never the run's to remove
    (out / "other.safetensors").write_bytes(b"someone else's")
    (out / "checkpoints" / "other-step000001.safetensors").write_bytes(b"someone else's")

    with pytest.raises(TrainingError) as info:
        train(make_config("sd15", out, max_steps=3))
    assert one_line(info) == (f"{out} holds a training run (a resume state at step 2, annealing_sd15.safetensors); "
                              "pass --resume to continue it or --overwrite to start again")
    assert {p: p.read_bytes() for p in files} == files  # nothing replaced, nothing appended to the log
    # the final checkpoint alone (say the resume state was deleted) is a run too
    (out / RESUME_FILE).rename(tmp_path / "saved-resume.pt")
    with pytest.raises(TrainingError, match=r"holds a training run \(annealing_sd15.safetensors\)"):
        train(make_config("sd15", out, max_steps=3))
    (tmp_path / "saved-resume.pt").rename(out / RESUME_FILE)

    resumed = train(make_config("sd15", out, max_steps=3, resume=True))
    assert resumed.resumed_from == 2 and resumed.steps == 3

    capsys.readouterr()
    again = train(make_config("sd15", out, max_steps=2, overwrite=True, checkpoint_every=1, keep_checkpoints=5))
    assert "--overwrite: removing the 5 file(s) of the earlier run" in capsys.readouterr().out
    assert same_weights(state_of(again.checkpoint), state_of(first.checkpoint))
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row.get("event") for row in rows if "step" not in row] == ["start"]  # one start record: the earlier run's log is gone
    assert [row["step"] for row in rows if "step" in row] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "annealing_sd15-step000001.safetensors", "other-step000001.safetensors"]  # step 2 is the final one now
    assert (out / "notes.txt").read_text() == "mine" and (out / "other.safetensors").read_bytes() == b"someone else's"


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_never_removes_or_overwrites_another_runs_files(tmp_path, capsys):
    """A finished run whose resume state was removed (its checkpoint, report and log are there): a run of another name,
    with or without --overwrite or --output-name, is refused naming them, and leaves every byte as it was."""
    out = tmp_path / "out"
    train(make_config("sd15", out, max_steps=2, checkpoint_every=1, keep_checkpoints=5, output_name="first"))
    (out / RESUME_FILE).unlink()
    (out / "training_curves.png").write_bytes(b"the first run's curves")
    before = snapshot(out)
    listed = "checkpoints/first-step000001.safetensors, first.safetensors, train_log.jsonl, training_curves.png, training_report.json"
    for flags in ({}, {"overwrite": True}, {"output_name": "second"}, {"output_name": "second", "overwrite": True}):
        with pytest.raises(TrainingError) as info:
            train(make_config("sd15", out, max_steps=1, **flags))
        assert one_line(info) == (f"{out} holds the files of another run ('first'): {listed}; nothing was changed. Write this run to "
                                  "another --output folder, or pass --output-name first to continue (--resume) or replace (--overwrite) that run")
        assert snapshot(out) == before
    # a report and a log written before they named their run: the report's checkpoint path names it
    for name in ("training_report.json", "train_log.jsonl"):
        rows = [json.loads(line) for line in (out / name).read_text().splitlines()] if name.endswith("l") else [json.loads((out / name).read_text())]
        for row in rows:
            row.pop("output_name", None)
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    before = snapshot(out)
    with pytest.raises(TrainingError, match=r"holds the files of another run \('first'\): .*train_log.jsonl, training_curves.png, "
                                            r"training_report.json; nothing was changed"):
        train(make_config("sd15", out, max_steps=1))
    assert snapshot(out) == before
    # the run itself, named, may be replaced
    capsys.readouterr()
    again = train(make_config("sd15", out, max_steps=1, output_name="first", overwrite=True))
    assert again.checkpoint == out / "first.safetensors"
    assert "--overwrite: removing the 5 file(s) of the earlier run" in capsys.readouterr().out


def test_a_resume_state_belongs_to_its_run(tmp_path):
    out = tmp_path / "out"
    train(make_config("sd15", out, max_steps=1, output_name="first", checkpoint_every=1))
    before = snapshot(out)
    with pytest.raises(TrainingError, match=r"holds the files of another run \('first'\): first.safetensors, resume.pt, train_log.jsonl, "):
        train(make_config("sd15", out, max_steps=2))
    with pytest.raises(TrainingError, match=r"resume.pt: cannot resume, output_name was 'first' and is now 'second'$"):
        train(make_config("sd15", out, max_steps=2, resume=True, output_name="second"))
    assert snapshot(out) == before
    # --resume without --output-name continues the run the state belongs to
    resumed = train(make_config("sd15", out, max_steps=2, resume=True))
    assert resumed.checkpoint == out / "first.safetensors" and resumed.resumed_from == 1 and resumed.steps == 2
    assert not (out / "annealing_sd15.safetensors").exists()
    # a killed run's log alone (no resume state, no checkpoint yet) names its run too
    (out / RESUME_FILE).unlink()
    (out / "first.safetensors").unlink()
    (out / "training_report.json").unlink()
    before = snapshot(out)
    with pytest.raises(TrainingError, match=r"holds the files of another run \('first'\): train_log.jsonl; nothing was changed"):
        train(make_config("sd15", out, max_steps=2))
    assert snapshot(out) == before


def test_stale_temporary_files_of_the_run_are_removed_at_start(tmp_path):
    out = tmp_path / "out"
    train(make_config("sd15", out, max_steps=1))
    (out / "checkpoints").mkdir()
    stale = [out / ".resume.pt.k3j4h5.tmp", out / ".annealing_sd15.safetensors.abcdef.tmp", out / ".train_log.jsonl.x1.tmp",
             out / ".write-test-q9", out / "checkpoints" / ".annealing_sd15-step000250.safetensors.zz.tmp"]
    for path in stale:
        path.write_bytes(b"")
    foreign = [out / ".notes.txt.1.tmp", out / "checkpoints" / ".other-step000001.safetensors.a.tmp"]
    for path in foreign:
        path.write_bytes(b"not ours")
    train(make_config("sd15", out, max_steps=2, resume=True))
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in foreign)


def _resume_state(out: Path) -> dict:
    return torch.load(out / RESUME_FILE, map_location="cpu", weights_only=True)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: s.pop("step"), r"step is missing"),
        (lambda s: s.update(images_seen=-3), r"images_seen is -3, not a count"),
        (lambda s: s.update(locked="{not json"), r"locked is not valid JSON"),
        (lambda s: s.update(failed_paths="[1, 2]"), r"failed_paths is not a list of paths"),
        (lambda s: s.update(balance_quality=float("nan")), r"balance_quality is nan, not a finite number or None"),
        (lambda s: s["mlp"].update({"combined_head.0.weight": torch.zeros(3, 3)}), r"MLP weights do not fit the configured MLP"),
        (lambda s: s["mlp"].update({"combined_head.0.bias": torch.full((128,), float("nan"))}), r"MLP weight .* is not a finite float tensor"),
        (lambda s: s["optimizer"]["param_groups"][0].update(lr=float("inf")), r"optimizer setting 'lr' is not finite"),
        (lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(2)), r"optimizer exp_avg of parameter 0 has shape \(2,\)"),
        (lambda s: s.pop("optimizer"), r"optimizer is missing"),
    ],
)
def test_a_malformed_resume_state_is_one_line(tmp_path, damage, message):
    out = tmp_path / "out"
    train(make_config("sd15", out, max_steps=1))
    state = _resume_state(out)
    damage(state)
    torch.save(state, out / RESUME_FILE)
    with pytest.raises(TrainingError, match=rf"resume.pt: malformed resume state \({message}.*\); start again without --resume$") as info:
        train(make_config("sd15", out, max_steps=2, resume=True))
    one_line(info)


def _os_system(path: Path, marker: Path) -> None:
    hf.write_torch_zip(path, hf.Call(hf.stub("os", "system"), (f"touch {marker}",)), {})


def _zip_bomb(path: Path, marker: Path) -> None:
    hf.deflate_bomb(path, 1 << 30)  # a stored entry claimed to inflate to 1 GiB


def _huge_pickle(path: Path, marker: Path) -> None:
    hf.write_torch_zip(path, {"format": "x" * (2 << 20)}, {})  # a 2 MiB data.pkl


def _long_pickle(path: Path, marker: Path) -> None:
    hf.write_torch_zip(path, {"step": list(range(60_000))}, {})  # 60,000 instructions of small integers


def _repeating_view(path: Path, marker: Path) -> None:
    state = _resume_state(path.parent)
    state["mlp"]["combined_head.0.weight"] = torch.zeros(1).expand(10**6, 10**6)  # 10^12 values stored as one float
    torch.save(state, path)


@pytest.mark.parametrize(
    "build, message",
    [
        (_os_system, r"refused to read the resume state: it contains objects other than tensors \(it asks for os.system\) and may be malicious"),
        (_zip_bomb, r"unreadable resume state \(refused: the zip entry 'archive/data/0' is compressed \(method 8\)"),
        (_huge_pickle, r"unreadable resume state \(corrupt or truncated PyTorch file: its data.pkl has 2,097,\d+ bytes, more than the 1,048,576"),
        (_long_pickle, r"refused to read the resume state: its pickle has more than 50,000 instructions"),
        (_repeating_view, r"malformed resume state \(MLP weight 'combined_head.0.weight' is not a finite float tensor\)"),
    ],
)
def test_a_hostile_resume_state_is_refused_before_it_can_act(tmp_path, capsys, build, message):
    """resume.pt is read through the core's zip and pickle bounds, with --resume and without (a new run reads it to learn
    whose it is): nothing runs, nothing large is allocated, and no message passes on torch's advice to load unsafely."""
    out, marker = tmp_path / "out", tmp_path / "PWNED"
    train(make_config("sd15", out, max_steps=1))
    build(out / RESUME_FILE, marker)
    with pytest.raises(TrainingError, match=rf"resume.pt: {message}") as info:
        train(make_config("sd15", out, max_steps=2, resume=True))
    text = one_line(info)
    assert not re.search(r"weights_only|safe_globals|trust", text, re.IGNORECASE), text
    (out / "annealing_sd15.safetensors").unlink()  # without --resume: an unusable state, the run starts again
    capsys.readouterr()
    train(make_config("sd15", out, max_steps=1))
    printed = capsys.readouterr().out
    assert f"({RESUME_FILE} is unusable: " in printed and not re.search(r"weights_only|safe_globals|trust", printed, re.IGNORECASE)
    assert not marker.exists()


def test_every_torch_load_in_the_training_package_is_the_bounded_one():
    """The one reader of torch files in training/ is resume_state's, behind annealing.untrusted's checks."""
    sources = {path.name: path.read_text() for path in (REPO / "training").rglob("*.py")}
    assert [name for name, text in sources.items() if "torch.load(" in text] == ["resume_state.py"]
    reader = sources["resume_state.py"]
    assert reader.count("torch.load(handle") == 1
    assert reader.index("inspect_torch_zip(path, handle") < reader.index("scan_pickle(pickled") < reader.index("torch.load(handle")


def test_an_unusable_resume_state_without_a_final_checkpoint_starts_again(tmp_path, capsys):
    out = tmp_path / "out"
    train(make_config("sd15", out, max_steps=1))
    (out / "annealing_sd15.safetensors").unlink()
    (out / RESUME_FILE).write_bytes(b"")  # what a kill inside a non-atomic write would leave
    with pytest.raises(TrainingError, match="resume.pt: unreadable resume state"):
        train(make_config("sd15", out, max_steps=2, resume=True))
    result = train(make_config("sd15", out, max_steps=2))
    assert "an earlier run left no resume state and no final checkpoint (resume.pt is unusable: unreadable resume state" in capsys.readouterr().out
    assert result.steps == 2 and _resume_state(out)["step"] == 2
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row.get("event") for row in rows if "step" not in row] == ["start"]  # one start record: the earlier run's log is gone
    assert [row["step"] for row in rows if "step" in row] == [1, 2]


# ------------------------------------------------------------------------------------------------------------ killed runs

#: A real training run whose n-th torch.save (the resume state) writes half its bytes, says so and waits to be killed.
KILLED_IN_A_WRITE = """
import io, os, sys, time
import torch
real_save, calls = torch.save, [0]
def save(obj, target, *args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_SAVE"]):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        target.write(buffer.getvalue()[: buffer.tell() // 2])
        target.flush()
        print("IN-WRITE", flush=True)
        time.sleep(600)
    return real_save(obj, target, *args, **kwargs)
torch.save = save
from training.cli import main
sys.exit(main(sys.argv[1:]))
"""


def kill_during_resume_write(config, number: int) -> None:
    """Run ``config`` in a child process and SIGKILL it in the middle of writing its ``number``-th resume state."""
    import queue
    import signal
    import subprocess
    import sys

    flags = ["--model", config.model, "--dataset", config.dataset, "--output", config.output, "--resolution", str(config.resolution),
             "--max-steps", str(config.max_steps), "--gradient-accumulation", str(config.gradient_accumulation), "--num-workers", "0",
             "--device", "cpu", "--checkpoint-every", str(config.checkpoint_every), "--log-every", "1", "--quiet"]
    env = dict(os.environ, KILL_AT_SAVE=str(number), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    child = subprocess.Popen([sys.executable, "-c", KILLED_IN_A_WRITE, *flags], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in child.stdout] + [lines.put(None)], daemon=True)
    reader.start()
    try:
        seen = []
        while True:
            try:  # a guard against a child that never gets there (the suite must not hang), not a timing assertion
                line = lines.get(timeout=600)
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail(f"the child ended or stalled before the write: {''.join(seen)[-2000:]}")
            if line.strip() == "IN-WRITE":
                break
            seen.append(line)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        reader.join(60)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL


def test_killed_while_writing_the_first_resume_state_starts_again_without_overwrite(tmp_path, capsys):
    config = make_config("sd15", tmp_path / "killed", max_steps=3, checkpoint_every=1)
    kill_during_resume_write(config, 1)
    out = Path(config.output)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left[0].startswith(".resume.pt.") and left[0].endswith(".tmp")  # half written, never renamed
    assert left[1:] == ["checkpoints/annealing_sd15-step000001.safetensors", "train_log.jsonl"]

    with pytest.raises(TrainingError, match="no resume state in the output folder"):
        train(dataclasses.replace(config, resume=True))
    result = train(config)  # no --overwrite needed: nothing resumable or finished is there
    assert "an earlier run left no resume state and no final checkpoint; starting again (removing its 2 file(s))" in capsys.readouterr().out
    assert not [p for p in out.rglob("*.tmp")]
    assert [row["step"] for row in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "step" in row] == [1, 2, 3]
    straight = train(make_config("sd15", tmp_path / "straight", max_steps=3, checkpoint_every=1))
    assert same_weights(state_of(result.checkpoint), state_of(straight.checkpoint))


def test_killed_while_writing_a_later_resume_state_resumes_exactly(tmp_path):
    config = make_config("sd15", tmp_path / "killed", max_steps=3, checkpoint_every=1)
    kill_during_resume_write(config, 2)
    out = Path(config.output)
    assert [p.name[:11] for p in out.glob(".resume.pt.*.tmp")] == [".resume.pt."]
    assert _resume_state(out)["step"] == 1  # the previous state, intact

    with pytest.raises(TrainingError, match=r"holds a training run \(a resume state at step 1\); pass --resume"):
        train(config)
    resumed = train(dataclasses.replace(config, resume=True))
    assert resumed.resumed_from == 1 and resumed.steps == 3
    assert not [p for p in out.rglob("*.tmp")]
    assert [row["step"] for row in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "step" in row] == [1, 2, 3]
    straight = train(make_config("sd15", tmp_path / "straight", max_steps=3, checkpoint_every=1))
    assert same_weights(state_of(resumed.checkpoint), state_of(straight.checkpoint))
