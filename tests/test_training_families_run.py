"""The new families trained end to end on CPU through ``python -m training`` (``training.cli.main``, the same code path):
Wan 2.1 on a tiny clip folder (a corrupt clip skipped and counted), Wan 2.2 TI2V-5B on images as one-frame clips, a Wan
2.2 A14B expert from precomputed latents and embeddings, Qwen-Image with prompts of different lengths in one batch,
Chroma; resumed bit-identically; the checkpoint metadata checked (family, velocity space, grid, latent shape); and the
frozen network sharded across two CPU processes with --fsdp trains what one process trains."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_fixtures import one_thread, same_weights, state_of, tiny_clips, tiny_dataset, tiny_model

import annealing
from annealing.training_grid import FlowGrid
from training.cli import main as cli_main
from training.config import TrainConfig
from training.errors import TrainingError
from training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _single_thread():
    yield from one_thread()


def train_args(kind: str, output: Path, dataset: Path, *extra: str, steps: int = 2, accumulation: int = 2) -> list[str]:
    return ["--model", str(tiny_model(kind)), "--dataset", str(dataset), "--output", str(output), "--resolution", "64", "--max-steps", str(steps),
            "--gradient-accumulation", str(accumulation), "--grid-steps", "10", "--num-workers", "0", "--device", "cpu", "--checkpoint-every", "1000",
            "--log-every", "1", "--quiet", *extra]


def metadata(output: Path, name: str):
    return annealing.load_guidance_model(output / f"{name}.safetensors").metadata


def check_flow_metadata(meta, family: str, shape: list[int], grid: FlowGrid) -> None:
    assert (meta.model_family, meta.prediction_space, meta.timestep_convention) == (family, "velocity", "sigma_x1000")
    assert meta.training_grid == grid
    assert meta.training["trained_latent_shape"] == shape and meta.trained_latent_numel == math.prod(shape)


def test_wan21_trains_on_clips_skips_a_corrupt_clip_and_resumes_bit_identically(tmp_path):
    clips = tiny_clips(3, frames=9, corrupt=1)
    options = ("--frames", "5", "--frame-stride", "2")  # frames 0, 2, 4, 6, 8 of each clip: 2 latent frames
    assert cli_main(train_args("wan21", tmp_path / "straight", clips, *options)) == 0
    report = json.loads((tmp_path / "straight" / "training_report.json").read_text())
    # 2 steps x 2 micro-batches = the 4 samples of epoch 0, the broken clip among them
    assert report["skipped_images"] == 1 and report["skipped_image_paths"][0].endswith("broken000.mp4") and report["images_seen"] == 3
    meta = metadata(tmp_path / "straight", "annealing_wan21")
    check_flow_metadata(meta, "wan21", [16, 2, 8, 8], FlowGrid(num_steps=10, shift=3.0, spacing="simple"))
    assert meta.training["frames"] == 5 and meta.training["frame_stride"] == 2 and meta.training["skipped_images"] == 1
    assert "UniPC" in meta.training["grid_note"] and meta.training["scheduler"] == "UniPCMultistepScheduler"

    assert cli_main(train_args("wan21", tmp_path / "resumed", clips, *options, steps=1)) == 0
    assert cli_main(train_args("wan21", tmp_path / "resumed", clips, *options, "--resume")) == 0
    assert same_weights(state_of(tmp_path / "straight" / "annealing_wan21.safetensors"), state_of(tmp_path / "resumed" / "annealing_wan21.safetensors"))
    with pytest.raises(TrainingError, match="cannot resume, frames_resolved was 5 and is now 9"):
        Trainer(TrainConfig(**{**json.loads(json.dumps(vars_of(tmp_path / "resumed", clips))), "frames": 9, "resume": True, "max_steps": 3}),
                progress=False).preflight()


def vars_of(output: Path, clips: Path) -> dict:
    return dict(model=str(tiny_model("wan21")), dataset=str(clips), output=str(output), resolution=64, frames=5, frame_stride=2, grid_steps=10,
                num_workers=0, device="cpu", gradient_accumulation=2)


def straight_and_resumed(kind: str, tmp_path: Path, dataset: Path, *options: str) -> None:
    """2 steps in one run, and 1 step then a resumed one: the same weights, bit for bit."""
    assert cli_main(train_args(kind, tmp_path / "out", dataset, *options)) == 0
    assert cli_main(train_args(kind, tmp_path / "resumed", dataset, *options, steps=1)) == 0
    assert cli_main(train_args(kind, tmp_path / "resumed", dataset, *options, "--resume")) == 0
    name = f"annealing_{detect_family(kind)}.safetensors"
    assert same_weights(state_of(tmp_path / "out" / name), state_of(tmp_path / "resumed" / name))


def detect_family(kind: str) -> str:
    from training.backends import detect_model

    return detect_model(tiny_model(kind)).family


def test_wan22_ti2v_5b_trains_on_images_as_one_frame_clips_and_resumes(tmp_path):
    straight_and_resumed("wan22", tmp_path, tiny_dataset(), "--frames", "1")
    meta = metadata(tmp_path / "out", "annealing_wan22")
    check_flow_metadata(meta, "wan22", [48, 1, 4, 4], FlowGrid(num_steps=10, shift=5.0, spacing="simple"))  # the x16 VAE: 4 x 4 at 64 px
    assert meta.training["variant"] == "ti2v_5b" and "expert" not in meta.training
    with pytest.raises(TrainingError, match="--expert high applies to two-expert models"):
        Trainer(TrainConfig(model=str(tiny_model("wan22")), dataset=str(tiny_dataset()), output=str(tmp_path / "x"), expert="high"),
                progress=False).preflight()


def test_a14b_expert_trains_from_precomputed_latents_as_with_its_vae_and_text_encoder(tmp_path, capsys):
    """`embed --latents` runs the VAE once per clip and the text encoder once per caption; the expert then trains with
    neither resident, to the weights the run with both resident reaches (float32 storage)."""
    clips = tiny_clips(3, frames=9, corrupt=1)
    embeddings = tmp_path / "embeds"
    assert cli_main(["embed", "--model", str(tiny_model("wan22_a14b")), "--dataset", str(clips), "--output", str(embeddings), "--latents",
                     "--resolution", "64", "--frames", "5", "--frame-stride", "2", "--dtype", "float32", "--latent-dtype", "float32", "--quiet"]) == 0
    assert "latents of 3 samples (1 unreadable, skipped)" in capsys.readouterr().out
    index = json.loads((embeddings / "index.json").read_text())
    assert index["latents"]["latent_shape"] == [16, 2, 8, 8] and len(index["latents"]["files"]) == 3 and index["latents"]["skipped_count"] == 1

    def config(output, **extra):
        return TrainConfig(**{**vars_of(output, clips), "model": str(tiny_model("wan22_a14b")), "expert": "high", "max_steps": 2, **extra})

    trainer = Trainer(config(tmp_path / "precomputed", embeddings=str(embeddings)), progress=False)
    trainer.preflight()
    precomputed = trainer.run()
    assert trainer.backend.vae is None and trainer.backend.text is None
    assert precomputed.skipped_images == [str(clips / "broken000.mp4")]  # the clip embed skipped is skipped again, and counted
    resident = Trainer(config(tmp_path / "resident"), progress=False)
    resident.preflight()
    resident_result = resident.run()
    a, b = state_of(precomputed.checkpoint), state_of(resident_result.checkpoint)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    meta = metadata(tmp_path / "precomputed", "annealing_wan22")
    check_flow_metadata(meta, "wan22", [16, 2, 8, 8], FlowGrid(num_steps=10, shift=12.0, spacing="simple"))
    assert (meta.training["expert"], meta.training["expert_sigma_range"], meta.training["variant"]) == ("high", [0.875, 1.0], "a14b")
    with pytest.raises(TrainingError, match="have frames 5, the run needs 9"):
        Trainer(config(tmp_path / "other", embeddings=str(embeddings), frames=9), progress=False).preflight()
    with pytest.raises(TrainingError, match="train one checkpoint per expert"):
        Trainer(config(tmp_path / "other", expert="auto"), progress=False).preflight()


def test_qwen_image_trains_prompts_of_different_lengths_in_one_batch_and_resumes(tmp_path):
    options = ("--batch-size", "2")  # captions of different lengths: padded, masked, one network call
    assert cli_main(train_args("qwen_image", tmp_path / "straight", tiny_dataset(), *options)) == 0
    meta = metadata(tmp_path / "straight", "annealing_qwen_image")
    shift = math.exp(0.5 + (16 - 256) * 0.4 / 7936)  # the dynamic shift at 64 px: 16 image tokens
    check_flow_metadata(meta, "qwen_image", [16, 1, 8, 8], FlowGrid(num_steps=10, shift=shift, spacing="simple"))
    assert meta.training["resolution"] == 64 and meta.training["image_tokens"] == 16 and meta.training["shift_rule"]["kind"] == "dynamic"
    assert meta.training["shift_terminal"] == 0.02 and "shift_terminal" in meta.training["grid_note"]
    assert cli_main(train_args("qwen_image", tmp_path / "resumed", tiny_dataset(), *options, steps=1)) == 0
    assert cli_main(train_args("qwen_image", tmp_path / "resumed", tiny_dataset(), *options, "--resume")) == 0
    assert same_weights(state_of(tmp_path / "straight" / "annealing_qwen_image.safetensors"),
                        state_of(tmp_path / "resumed" / "annealing_qwen_image.safetensors"))


def test_qwen_image_precomputed_embeddings_of_different_lengths_train_like_the_text_encoder(tmp_path):
    embeddings = tmp_path / "embeds"
    assert cli_main(["embed", "--model", str(tiny_model("qwen_image")), "--dataset", str(tiny_dataset()), "--output", str(embeddings),
                     "--dtype", "float32", "--batch-size", "2", "--shard-size", "4", "--quiet"]) == 0
    assert json.loads((embeddings / "index.json").read_text())["has_mask"]
    assert cli_main(train_args("qwen_image", tmp_path / "with", tiny_dataset(), "--batch-size", "2", "--embeddings", str(embeddings), steps=1)) == 0
    assert cli_main(train_args("qwen_image", tmp_path / "without", tiny_dataset(), "--batch-size", "2", steps=1)) == 0
    a, b = state_of(tmp_path / "with" / "annealing_qwen_image.safetensors"), state_of(tmp_path / "without" / "annealing_qwen_image.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_chroma_trains_records_its_pipeline_grid_and_resumes(tmp_path):
    straight_and_resumed("chroma", tmp_path, tiny_dataset())
    meta = metadata(tmp_path / "out", "annealing_chroma")
    check_flow_metadata(meta, "chroma", [16, 8, 8], FlowGrid(num_steps=10, shift=math.exp(0.5 + (16 - 256) * 0.65 / 3840), spacing="simple"))
    assert "grid_note" not in meta.training and meta.training["shift_rule"]["kind"] == "dynamic"


def test_fsdp_across_two_cpu_processes_trains_what_one_process_trains(tmp_path):
    """--fsdp shards the frozen Wan transformer over 2 processes (gloo); the MLP trains as without sharding: the weights
    of 2 processes x accumulation 1 equal those of 1 process x accumulation 2."""
    clips = tiny_clips(3, frames=9)
    options = ("--frames", "5", "--frame-stride", "2")
    assert cli_main(train_args("wan21", tmp_path / "one", clips, *options)) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "training", "--fsdp",
               *train_args("wan21", tmp_path / "two", clips, *options, accumulation=1)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = state_of(tmp_path / "one" / "annealing_wan21.safetensors"), state_of(tmp_path / "two" / "annealing_wan21.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(TrainingError, match="--fsdp shards the frozen network across processes, and this run has one"):
        Trainer(TrainConfig(**vars_of(tmp_path / "x", clips), fsdp=True, max_steps=1), progress=False).run()
