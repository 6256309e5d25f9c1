"""Hostile and broken training input: configs, datasets, images and output folders from strangers or from a killed run.

Nothing here may hang, allocate without bound, overwrite a finished run or end in a traceback: every refusal is one
line naming the file or setting, given before any model weight is loaded and before the output folder exists."""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from training_fixtures import one_thread

import training.trainer
from training.cli import main as cli_main
from training.config import FLOAT_BOUNDS, INT_BOUNDS, TrainConfig, TrainingError, config_fields, read_config_file
from training.data import ImageCaptionDataset, Sample, load_image, scan_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _single_thread():
    yield from one_thread()


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
        ({"mlp_hidden": 10**6}, r"mlp_hidden must be an integer in \[1, 4096\], got 1000000"),
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
        ({"model_family": "SDXL"}, "model_family must be a short lower-case name.*got 'SDXL'"),
        ({"model_family": "sd/xl"}, "model_family must be a short lower-case name"),
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
    extreme = {name: high for name, (low, high) in INT_BOUNDS.items() if name != "resolution"}
    TrainConfig(model="m", dataset="d", output="o", output_name="my model (v2) [final]", **extreme).validate()


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
