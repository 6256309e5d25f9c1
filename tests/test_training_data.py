"""Training data and configuration: dataset layouts, bad input, deterministic resumable data order, config files, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from training.config import TrainConfig, TrainingError, build_config, read_config_file
from training.data import ImageCaptionDataset, MicroBatchSampler, collate, load_image, scan_dataset
from training.tiny_models import make_image_dataset

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------ datasets


def test_folder_dataset_pairs_images_with_captions(tmp_path):
    make_image_dataset(tmp_path / "d", count=3)
    (tmp_path / "d" / "sub").mkdir()  # img2dataset shards live in sub-folders
    Image.new("RGB", (20, 30)).save(tmp_path / "d" / "sub" / "000001.jpg")
    (tmp_path / "d" / "sub" / "000001.txt").write_text("  a shard image \n")
    scan = scan_dataset(tmp_path / "d")
    assert [s.image.name for s in scan.samples] == ["img000.png", "img001.png", "img002.png", "000001.jpg"]
    assert scan.samples[0].caption == "a picture number 0 of red things"
    assert scan.samples[-1].caption == "a shard image"


def test_missing_caption_is_an_error_unless_skipping(tmp_path):
    folder = make_image_dataset(tmp_path / "d", count=2, without_caption=1)
    with pytest.raises(TrainingError, match=r"nocap000.png: no caption file nocap000.txt .*--skip-missing-captions"):
        scan_dataset(folder)
    scan = scan_dataset(folder, skip_missing_captions=True)
    assert len(scan.samples) == 2 and [p.name for p in scan.missing_captions] == ["nocap000.png"]


def test_jsonl_manifest(tmp_path):
    manifest = make_image_dataset(tmp_path / "d", count=2, without_caption=1, manifest=True)
    with pytest.raises(TrainingError, match=r"manifest.jsonl:3: missing caption for nocap000.png"):
        scan_dataset(manifest)
    scan = scan_dataset(manifest, skip_missing_captions=True)
    assert [(s.image, s.caption) for s in scan.samples] == [
        (tmp_path / "d" / "img000.png", "a picture number 0 of red things"),
        (tmp_path / "d" / "img001.png", "a picture number 1 of green things"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "x"}\n{not json\n')
    with pytest.raises(TrainingError, match=r"bad.jsonl:2: not valid JSON"):
        scan_dataset(bad)


def test_empty_and_missing_datasets_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    for target, pattern in [(tmp_path / "empty", "empty dataset"), (tmp_path / "nope", "dataset not found")]:
        with pytest.raises(TrainingError, match=pattern) as info:
            scan_dataset(target)
        assert "\n" not in str(info.value)
    only_captionless = make_image_dataset(tmp_path / "nc", count=0, without_caption=2)
    with pytest.raises(TrainingError, match="empty dataset"):
        scan_dataset(only_captionless, skip_missing_captions=True)


def test_load_image_resizes_short_side_and_center_crops(tmp_path):
    # left third black, middle third white, right third black: a centre crop of a 90x30 image keeps only the white part
    image = Image.new("RGB", (90, 30), (0, 0, 0))
    image.paste((255, 255, 255), (30, 0, 60, 30))
    image.save(tmp_path / "wide.png")
    pixels = load_image(tmp_path / "wide.png", 16)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert torch.allclose(pixels[:, :, 2:14], torch.ones(3, 16, 12), atol=1e-6)  # white maps to +1
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_corrupt_images_become_failed_items_and_collate_drops_them(tmp_path):
    folder = make_image_dataset(tmp_path / "d", count=2, corrupt=1)
    dataset = ImageCaptionDataset(scan_dataset(folder).samples, 32)
    items = [dataset[i] for i in range(len(dataset))]
    assert "failed" in items[0] and items[0]["failed"].endswith("broken000.png")
    batch = collate(items)
    assert batch["pixels"].shape == (2, 3, 32, 32) and len(batch["captions"]) == 2 and len(batch["failed"]) == 1
    assert collate(items[:1])["pixels"] is None


def test_micro_batch_stream_is_deterministic_resumable_and_disjoint_across_processes():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    full = take(MicroBatchSampler(10, 2, seed=3), 12)  # 5 per epoch: crosses two epoch boundaries
    assert take(MicroBatchSampler(10, 2, seed=3, start=7), 5) == full[7:]
    assert all(sorted(sum(full[e * 5 : e * 5 + 5], [])) == list(range(10)) for e in range(2))  # each epoch sees every sample once
    assert full[:5] != full[5:10]  # a new permutation per epoch
    assert take(MicroBatchSampler(10, 2, seed=4), 5) != full[:5]
    rank0, rank1 = take(MicroBatchSampler(10, 2, 3, 0, 2), 2), take(MicroBatchSampler(10, 2, 3, 1, 2), 2)
    assert not set(sum(rank0, [])) & set(sum(rank1, []))
    with pytest.raises(TrainingError, match="fewer than batch_size x processes"):
        MicroBatchSampler(3, 2, 0, 0, 2)


# ------------------------------------------------------------------------------------------------------------ config


def test_yaml_and_toml_config_files_with_cli_precedence(tmp_path):
    (tmp_path / "c.toml").write_text('lr = 5e-4\ngrid_steps = 28\ncads = false\nbalance = "on"\n')
    toml_values = read_config_file(tmp_path / "c.toml")
    assert toml_values == {"lr": 5e-4, "grid_steps": 28, "cads": False, "balance": "on"}
    (tmp_path / "ok.yaml").write_text("lr: 0.0005\ngrid-steps: 28\ncads: false\nbalance: 'on'\n")
    assert read_config_file(tmp_path / "ok.yaml") == toml_values
    config = build_config(toml_values, {"lr": 0.002, "grid_steps": None, "seed": 7})
    assert (config.lr, config.grid_steps, config.cads, config.seed, config.weight_decay) == (0.002, 28, False, 7, 0.01)


def test_config_file_errors_name_the_setting(tmp_path):
    cases = {
        "unknown.yaml": ("learning_rate: 1\n", "unknown setting 'learning_rate'"),
        "type.toml": ('grid_steps = "fifty"\n', "grid_steps must be an integer"),
        "list.yaml": ("- 1\n- 2\n", "must be a mapping"),
        "broken.toml": ("lr = = 1\n", "cannot parse"),
        "bool.yaml": ("balance: on\n", "balance must be a string"),  # YAML 1.1 reads a bare `on` as True: refused, not misread
    }
    for name, (text, pattern) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(TrainingError, match=pattern):
            read_config_file(tmp_path / name)
    with pytest.raises(TrainingError, match="must end in .yaml"):
        (tmp_path / "c.json").write_text("{}")
        read_config_file(tmp_path / "c.json")


def test_validation_errors():
    base = dict(model="m", dataset="d", output="o")
    with pytest.raises(TrainingError, match="--model is required"):
        TrainConfig(dataset="d", output="o").validate()
    for change, pattern in [
        ({"lambda_min": 0.8, "lambda_max": 0.2}, "lambda_min <= lambda_max"),
        ({"resolution": 100}, "multiple of 8"),
        ({"grid_steps": 1}, "grid_steps"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"lr": 0.0}, r"lr must be a finite number in \(0, 1\]"),
    ]:
        with pytest.raises(TrainingError, match=pattern):
            TrainConfig(**base, **change).validate()


def test_example_configs_parse():
    configs = sorted((REPO / "training" / "configs").glob("*.*"))
    assert {p.name for p in configs} >= {"sdxl.yaml", "sd15.yaml", "sd3.yaml", "sdxl.toml"}
    for path in configs:
        build_config(read_config_file(path), {"model": "m", "dataset": "d", "output": "o"}).validate()


def test_cli_help_and_one_line_errors(tmp_path):
    run = [sys.executable, "-m", "training"]
    help_text = subprocess.run(run + ["--help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "--grid-steps" in help_text and "--skip-missing-captions" in help_text and "embed" in help_text
    embed_help = subprocess.run(run + ["embed", "--help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "--shard-size" in embed_help
    (tmp_path / "empty").mkdir()
    failed = subprocess.run(run + ["--model", str(tmp_path), "--dataset", str(tmp_path / "empty"), "--output", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True)
    assert failed.returncode == 2
    assert failed.stderr.strip().count("\n") == 0 and failed.stderr.startswith("error: ") and "empty dataset" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_plot_command_draws_the_training_log(tmp_path):
    from training.cli import main

    rows = [{"step": s, "quality": 1.0 / s, "alignment": 0.01 / s, "w_mean": 1.0, "w_min": 0.8, "w_max": 1.3, "delta_weight": 100.0} for s in (1, 2, 3)]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(tmp_path)]) == 0
    image = Image.open(tmp_path / "training_curves.png")
    assert image.size[0] > 400 and image.size[1] > 400
    assert main(["plot", str(tmp_path / "missing")]) == 2  # one-line error, no traceback


def test_plot_checks_its_paths_before_any_work(tmp_path, capsys):
    from training.cli import main

    assert main(["plot", str(tmp_path / "nonexistent")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nonexistent'}: no such folder or file\n"
    assert main(["plot", str(tmp_path)]) == 2  # a folder without a log: that is what it says
    assert "no training log" in capsys.readouterr().err
    (tmp_path / "train_log.jsonl").write_text(json.dumps({"step": 1, "quality": 1.0, "alignment": 0.1, "w_mean": 1.0, "w_min": 1.0, "w_max": 1.0}) + "\n")
    assert main(["plot", str(tmp_path), "--image", str(tmp_path / "w.jpg")]) == 2
    assert capsys.readouterr().err == f"error: --image {tmp_path / 'w.jpg'}: the curves are written as PNG, give a file name ending in .png\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_log.jsonl"]


def test_plot_shows_the_delta_weight_only_when_balancing_changed_it(tmp_path):
    """A constant delta weight (balance off) gets no panel of its own; a changing one (balance on) does. The image is
    written through a temporary file: nothing else is left in the folder."""
    from training.plots import plot_training_log

    heights = {}
    for name, weights in (("constant", (1.0, 1.0, 1.0)), ("balanced", (1.0, 40.0, 90.0))):
        folder = tmp_path / name
        folder.mkdir()
        rows = [{"step": s, "quality": 1.0 / s, "alignment": 0.01 / s, "w_mean": 1.0, "w_min": 0.8, "w_max": 1.3, "delta_weight": w}
                for s, w in zip((1, 2, 3), weights)]
        (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        image = plot_training_log(folder)
        heights[name] = Image.open(image).size[1]
        assert sorted(p.name for p in folder.iterdir()) == ["train_log.jsonl", "training_curves.png"]
    assert heights["balanced"] > 1.3 * heights["constant"]  # three panels against two
