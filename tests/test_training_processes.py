"""Process counts: every random draw and the data order are keyed to the global micro-batch index, so P processes with
accumulation A train what one process with accumulation P x A trains; the world size is stated where a user looks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_fixtures import make_config, one_thread, state_of, tiny_dataset, tiny_model

import annealing
from training.data import MicroBatchSampler
from training.trainer import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _single_thread():
    yield from one_thread()


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("world", [2, 3])
def test_processes_interleave_into_the_one_process_stream(world):
    single = take(MicroBatchSampler(10, 2, seed=5), 12)  # 5 micro-batches per epoch: crosses epoch boundaries
    per_rank = [take(MicroBatchSampler(10, 2, 5, rank, world), 12 // world) for rank in range(world)]
    # global micro-batch g = local m x world + rank
    assert [per_rank[g % world][g // world] for g in range(12)] == single
    resumed = take(MicroBatchSampler(10, 2, 5, 1, world, start=2), 2)
    assert resumed == per_rank[1][2:4]


def log_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows if "step" in row]


def test_two_cpu_processes_train_what_one_process_trains(tmp_path):
    """2 processes x accumulation 2 (started with the documented `accelerate launch --multi_gpu` command, gloo on the CPU)
    against 1 process x accumulation 4: same final weights, same log. Two of the six images are unreadable, so some
    micro-batches of one process have nothing to train on: that process must still join the gradient all-reduce."""
    dataset = tiny_dataset(6, corrupt=2)
    one = train(make_config("sd15", tmp_path / "one", dataset=str(dataset), max_steps=3, gradient_accumulation=4), progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
               "-m", "training", "--device", "cpu", "--model", str(tiny_model("sd15")), "--dataset", str(dataset),
               "--output", str(tmp_path / "two"), "--resolution", "64", "--max-steps", "3", "--gradient-accumulation", "2",
               "--num-workers", "0", "--log-every", "1", "--checkpoint-every", "1000", "--quiet"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = state_of(tmp_path / "two" / "annealing_sd15.safetensors")
    ref = state_of(one.checkpoint)
    assert ref.keys() == two.keys()
    assert all(torch.allclose(two[k], ref[k], rtol=0, atol=1e-5) for k in ref)
    rows_one, rows_two = log_rows(tmp_path / "one" / "train_log.jsonl"), log_rows(tmp_path / "two" / "train_log.jsonl")
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] == [1, 2, 3]
    for a, b in zip(rows_one, rows_two, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
            else:
                assert a[key] == b[key], key
    report = json.loads((tmp_path / "two" / "training_report.json").read_text())
    assert report["images_seen"] == one.images_seen and report["world_size"] == 2
    assert report["images_seen"] + report["skipped_image_events"] == 12 and report["skipped_images"] == 2
    model = annealing.load_guidance_model(tmp_path / "two" / "annealing_sd15.safetensors")
    assert model.metadata.training["steps"] == 3 and model.metadata.training["effective_batch"] == 4
    assert done.stdout.splitlines()[0].startswith("world size 2: 2 processes (MULTI_CPU)")
    assert json.loads((tmp_path / "two" / "train_log.jsonl").read_text().splitlines()[0])["world_size"] == 2


def test_world_size_is_the_first_line_printed_logged_and_reported(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    result = train(make_config("sd15", tmp_path / "out", max_steps=1), progress=False)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("world size 1: 1 process (") and not any("MASTER_ADDR" in line for line in printed)
    assert "on 1 process" in next(line for line in printed if line.startswith("done:"))
    first = json.loads((tmp_path / "out" / "train_log.jsonl").read_text().splitlines()[0])
    assert first["event"] == "start" and first["world_size"] == 1
    assert json.loads((tmp_path / "out" / "training_report.json").read_text())["world_size"] == result.world_size == 1


def test_accelerate_cpu_num_processes_starts_one_process_and_the_run_says_so(tmp_path):
    """`accelerate launch --cpu --num_processes 2` runs one plain process (accelerate's simple launcher); the run prints
    world size 1 first and points at the commands that start two."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
               "-m", "training", "--model", str(tiny_model("sd15")), "--dataset", str(tiny_dataset()), "--output", str(tmp_path / "out"),
               "--resolution", "64", "--max-steps", "1", "--gradient-accumulation", "1", "--num-workers", "0", "--quiet"]
    done = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("world size 1: 1 process")
    assert "only one process runs" in lines[1] and "accelerate launch --multi_gpu --num_processes N" in lines[1]
    assert json.loads((tmp_path / "out" / "training_report.json").read_text())["world_size"] == 1
