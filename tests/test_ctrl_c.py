"""Ctrl-C, as a real SIGINT to a child process, in every long command: training (a stop after the step in progress that
saves its resume state, and an abrupt second Ctrl-C), ``python -m training embed``, ``python -m training.toy`` and a
benchmark script (some in this process, with the signal sent to itself from a thread, where a child's start-up would
only add time). Each ends with one line saying what was kept and how to go on, exit status 130, no traceback, and
no half-written file or folder that the next run would refuse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from training_fixtures import RESOLUTION, make_config, one_thread, same_weights, state_of, tiny_dataset, tiny_model

from training.run_folder import RESUME_FILE
from training.trainer import train

REPO = Path(__file__).resolve().parents[1]
#: A guard against a child that never gets ready (the suite must not hang), not a timing assertion.
READY_TIMEOUT_S = 300
#: A guard for a sluggish stop; an orderly one takes a fraction of a second here.
STOP_TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def _single_thread():
    yield from one_thread()


def interrupt(tmp_path: Path, command: list[str], ready, signals: int = 1, env: dict | None = None) -> tuple[int, str]:
    """Start ``command``, wait until ``ready()``, send it SIGINT (``signals`` times, 0.2 s apart) and return (exit status,
    stderr). Output goes to files, so a chatty child never blocks on a full pipe."""
    out, err = tmp_path / "child.out", tmp_path / "child.err"
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    with open(out, "w") as stdout, open(err, "w") as stderr:
        child = subprocess.Popen(command, cwd=REPO, env=environment, stdout=stdout, stderr=stderr)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not ready():
                if child.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the child ended or stalled before it was ready (status {child.poll()}): {err.read_text()[-3000:]}")
                time.sleep(0.05)
            for n in range(signals):
                if n:
                    time.sleep(0.2)
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)
            child.wait(STOP_TIMEOUT_S)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    return child.returncode, err.read_text()


def the_line(stderr: str) -> str:
    """The one line Ctrl-C printed: the last on stderr, the only one that starts with 'interrupted:', no traceback."""
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("interrupted:")] == lines[-1:], stderr[-3000:]
    return lines[-1]


def leftovers(folder: Path) -> list[str]:
    """Temporary and staging files: what a half-done write leaves."""
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".partial-"))


def training_command(out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "training", "--model", str(tiny_model("sd15")), "--dataset", str(tiny_dataset()), "--output", str(out),
            "--resolution", str(RESOLUTION), "--max-steps", "100000", "--gradient-accumulation", "2", "--num-workers", "0", "--device", "cpu",
            "--log-every", "1", "--checkpoint-every", "1000", "--quiet", *flags]


def logged_steps(out: Path) -> int:
    log = out / "train_log.jsonl"
    return sum('"step"' in line for line in log.read_text().splitlines()) if log.is_file() else 0


def test_ctrl_c_stops_training_after_the_step_saves_it_and_resume_continues_exactly(tmp_path):
    out = tmp_path / "run"
    status, stderr = interrupt(tmp_path, training_command(out), ready=lambda: logged_steps(out) >= 2)
    assert status == 130
    line = the_line(stderr)
    prefix = "interrupted: stopped at step "
    assert line.startswith(prefix), line
    step = int(line[len(prefix):].split()[0])
    assert line == (f"{prefix}{step} of 100000; its resume state is saved in {out}: continue with the same command plus --resume")
    assert torch.load(out / RESUME_FILE, map_location="cpu", weights_only=True)["step"] == step >= 2
    assert not leftovers(out)
    # the same run, resumed to one step more, is the run that was never interrupted
    resumed = train(make_config("sd15", out, max_steps=step + 1, resume=True), progress=False)
    straight = train(make_config("sd15", tmp_path / "straight", max_steps=step + 1), progress=False)
    assert resumed.resumed_from == step and same_weights(state_of(resumed.checkpoint), state_of(straight.checkpoint))
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "step" in row] == list(range(1, step + 2))


def sigint_this_process_when(ready, signals: int = 1, gap: float = 0.1) -> threading.Thread:
    """From a thread, once ``ready()``: SIGINT to this process (Python runs the handler in the main thread, where the
    command runs), ``signals`` times ``gap`` seconds apart. A real signal without a child's start-up cost."""

    def send():
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        for n in range(signals):
            time.sleep(gap if n else 0)
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_a_second_ctrl_c_stops_at_once_and_the_next_run_starts_again_by_itself(tmp_path, monkeypatch, capsys):
    from training.backends import UNetBackend
    from training.cli import main

    real = UNetBackend.predict

    def slow(self, *args, **kwargs):  # 0.2 s a network call: the second Ctrl-C lands inside a step
        time.sleep(0.2)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(UNetBackend, "predict", slow)
    out = tmp_path / "run"
    thread = sigint_this_process_when(lambda: logged_steps(out) >= 1, signals=2)
    with pytest.raises(SystemExit) as info:
        main(training_command(out)[3:])
    thread.join(STOP_TIMEOUT_S)
    assert info.value.code == 130
    line = the_line(capsys.readouterr().err)
    assert line.startswith("interrupted: stopped at step ") and line.endswith(", before its first resume state: run the same command "
                                                                             "again to start over"), line
    assert not (out / RESUME_FILE).exists() and not leftovers(out)
    # no --overwrite needed: nothing resumable or finished is there
    monkeypatch.undo()
    result = train(make_config("sd15", out, max_steps=2), progress=False)
    assert result.steps == 2 and "an earlier run left no resume state and no final checkpoint" in capsys.readouterr().out


def test_ctrl_c_during_embed_leaves_no_embeddings_folder(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), (120, 30, 60)).save(data / "one.png")
    rows = [json.dumps({"image": "one.png", "caption": f"caption number {i}"}) for i in range(3_000)]
    (data / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "embeds"
    command = [sys.executable, "-m", "training", "embed", "--model", str(tiny_model("sd15")), "--dataset", str(data / "manifest.jsonl"),
               "--output", str(out), "--batch-size", "1", "--shard-size", "20", "--device", "cpu", "--quiet"]
    status, stderr = interrupt(tmp_path, command, ready=lambda: any(out.glob(".partial-*/shard-*.safetensors")))
    assert status == 130
    assert the_line(stderr) == "interrupted: stopped; nothing was written: run the same command again"
    assert not out.exists()


def test_ctrl_c_during_the_2d_benchmark_leaves_nothing_the_next_run_refuses(tmp_path, capsys):
    from training.toy.__main__ import main

    out = tmp_path / "toy"
    command = [sys.executable, "-m", "training.toy", "--out", str(out), "--quick", "--no-progress", "--samples", "120"]
    status, stderr = interrupt(tmp_path, command, ready=lambda: any(out.glob(".partial-*")))
    assert status == 130
    assert the_line(stderr) == f"interrupted: nothing was written to {out}: run the same command again"
    assert not out.exists()  # the run made it, the run removed it
    # a folder that was there stays, empty, and a killed run's staging folder does not make it "not empty"
    out.mkdir()
    (out / ".partial-killed").mkdir()
    thread = sigint_this_process_when(lambda: any(p.name != ".partial-killed" for p in out.glob(".partial-*")))
    with pytest.raises(SystemExit) as info:
        main(command[3:])
    thread.join(STOP_TIMEOUT_S)
    assert info.value.code == 130 and the_line(capsys.readouterr().err).startswith("interrupted: nothing was written")
    assert list(out.iterdir()) == []


def test_ctrl_c_in_a_benchmark_script(tmp_path):
    command = [sys.executable, "benchmarks/guidance_overhead.py", "--device", "cpu", "--batches", "1", "--repeats", "1000000",
               "--checkpoint", str(tmp_path / "none.pt")]
    status, stderr = interrupt(tmp_path, command, ready=lambda: "batch" in (tmp_path / "child.out").read_text())
    assert status == 130
    assert the_line(stderr) == "interrupted: nothing was written: run it again for the numbers"


def test_a_staged_folder_is_all_or_nothing(tmp_path, monkeypatch):
    from training import interrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), interrupt.staged_folder(out) as staging:
        (staging / "a.txt").write_text("half")
        raise KeyboardInterrupt
    assert not out.exists()  # made by the run, removed by it
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / ".partial-killed").mkdir()  # what a killed run staged: removed by the next
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(interrupt.os, "replace", lambda a, b: (moved.append(Path(b).name), real_replace(a, b)))
    with interrupt.staged_folder(out, last=("index.json",)) as staging:
        for name in ("index.json", "shard-0.safetensors", "uncond.safetensors"):
            (staging / name).write_text(name)
    assert moved == ["shard-0.safetensors", "uncond.safetensors", "index.json"]  # the index of the others comes last
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "notes.txt", "shard-0.safetensors", "uncond.safetensors"]
    with pytest.raises(ValueError), interrupt.staged_folder(out) as staging:
        (staging / "index.json").write_text("a failed run's")
        raise ValueError
    assert (out / "index.json").read_text() == "index.json" and (out / "notes.txt").read_text() == "mine"  # a folder that was there stays
