"""End-to-end training runs on tiny models: every backend trains, writes a loadable checkpoint with full metadata and
resumes; runs are deterministic; bad images and NaN losses are skipped and counted; checkpoints are written atomically;
precomputed embeddings give the same training as the text encoders."""

from __future__ import annotations

import json
import math

import pytest
import torch
from training_fixtures import LATENT_NUMEL, make_config, one_thread, pack_module, same_weights, state_of, tiny_dataset, tiny_model

import annealing
from annealing.training_grid import FlowGrid, VPGrid
from training.cli import main as cli_main
from training.config import TrainingError
from training.data import write_embeddings
from training.run_folder import RESUME_FILE
from training.trainer import Trainer, train


@pytest.fixture(autouse=True)
def _single_thread():
    yield from one_thread()


def initial_weights(config) -> dict:
    torch.manual_seed(config.seed)
    return annealing.GuidanceScaleModel(annealing.GuidanceModelConfig(hidden_size=config.mlp_hidden, n_layers=config.mlp_layers)).state_dict()


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3"])
def test_backend_trains_writes_a_loadable_checkpoint_and_resumes(tmp_path, kind):
    config = make_config(kind, tmp_path / "out", max_steps=3, checkpoint_every=2, lambda_min=0.1, lambda_max=0.9)
    result = train(config, progress=False)
    assert result.steps == 3 and result.images_seen == 6 and result.nan_losses == 0 and result.skipped_steps == 0
    start, *log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert start["event"] == "start" and start["world_size"] == 1 and start["from_step"] == 0
    assert [row["step"] for row in log] == [1, 2, 3]
    for row in log:
        assert all(math.isfinite(row[k]) for k in ("loss", "quality", "alignment", "w_mean", "w_min", "w_max"))
        assert row["w_min"] <= row["w_mean"] <= row["w_max"]
    # flow: the velocity term dwarfs the delta term, and the running balance weights the delta term up (both are logged)
    assert log[-1]["delta_weight"] > 10 if kind == "sd3" else log[-1]["delta_weight"] == 1.0

    # the loader node's code path (the pack's annealing.load_guidance_model) reads it as is, and the nodes' compatibility
    # check accepts it for the host model it was trained for
    node_model = pack_module("annealing").load_guidance_model(result.checkpoint)
    sampling, config_name, discrete = {"sd15": ("eps", "SD15", True), "sdxl": ("eps", "SDXL", True), "sd3": ("const", "SD3", False)}[kind]
    compatibility, inspection = pack_module("nodes.compatibility"), pack_module("nodes.model_inspection")
    assert compatibility.compatibility_problems(node_model.metadata, sampling, inspection.model_family(config_name), discrete) == (None, [])
    model = annealing.load_guidance_model(result.checkpoint)
    assert result.checkpoint.name == f"annealing_{kind}.safetensors"
    assert not same_weights(model.state_dict(), initial_weights(config))
    meta = model.metadata
    flow = kind == "sd3"
    assert meta.model_family == kind
    assert meta.prediction_space == ("velocity" if flow else "epsilon")
    assert meta.timestep_convention == ("sigma_x1000" if flow else "ddpm_index")
    assert meta.trained_latent_numel == LATENT_NUMEL[kind]
    assert meta.training_grid == (FlowGrid(num_steps=50, shift=3.0, spacing="diffusers") if flow else VPGrid(num_steps=50))
    assert meta.training["steps"] == 3 and meta.training["images"] == 6
    assert (meta.training["lambda_min"], meta.training["lambda_max"]) == (0.1, 0.9)
    assert meta.training["base_model"] == tiny_model(kind).name and meta.training["balance"] == flow
    w = model(torch.tensor([500.0, 100.0]), torch.tensor([3.0, 1.0]), torch.tensor([0.4, 0.8]))
    assert w.shape == (2,) and torch.isfinite(w).all()
    assert (tmp_path / "out" / "checkpoints" / f"annealing_{kind}-step000002.safetensors").is_file()

    # resume continues from the saved step
    config.resume, config.max_steps = True, 5
    resumed = train(config, progress=False)
    assert resumed.resumed_from == 3 and resumed.steps == 5 and resumed.images_seen == 10
    assert annealing.load_guidance_model(resumed.checkpoint).metadata.training["steps"] == 5


def test_same_seed_same_weights_and_resume_equals_an_uninterrupted_run(tmp_path):
    straight = train(make_config("sd15", tmp_path / "a", max_steps=4), progress=False)
    again = train(make_config("sd15", tmp_path / "b", max_steps=4), progress=False)
    assert same_weights(state_of(straight.checkpoint), state_of(again.checkpoint))
    other_seed = train(make_config("sd15", tmp_path / "c", max_steps=4, seed=1), progress=False)
    assert not same_weights(state_of(straight.checkpoint), state_of(other_seed.checkpoint))

    train(make_config("sd15", tmp_path / "d", max_steps=2), progress=False)
    resumed = train(make_config("sd15", tmp_path / "d", max_steps=4, resume=True), progress=False)
    assert resumed.resumed_from == 2
    assert same_weights(state_of(straight.checkpoint), state_of(resumed.checkpoint))
    state = torch.load(tmp_path / "d" / RESUME_FILE, map_location="cpu", weights_only=True)
    assert state["step"] == 4 and state["images_seen"] == 8 and state["optimizer"]["state"]


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_bf16_frozen_model_with_gradient_checkpointing(tmp_path, kind):
    """The GPU settings (bf16 frozen model, checkpointing) on CPU: the MLP still trains in float32."""
    config = make_config(kind, tmp_path / "out", precision="bf16", gradient_checkpointing=True, max_steps=1)
    trainer = Trainer(config, progress=False)
    trainer.preflight()
    result = trainer.run()
    assert next(trainer.backend.network.parameters()).dtype == torch.bfloat16
    assert trainer.backend.network.is_gradient_checkpointing
    assert all(p.dtype == torch.float32 for p in trainer.mlp.parameters())
    assert result.nan_losses == 0 and math.isfinite(result.last_terms["loss"])
    assert not same_weights(state_of(result.checkpoint), initial_weights(config))
    assert annealing.load_guidance_model(result.checkpoint).metadata.training["precision"] == "bfloat16"


def test_command_line_with_a_config_file(tmp_path):
    (tmp_path / "run.yaml").write_text("grid_steps: 10\nlambda_max: 0.5\nresolution: 64\ngradient_accumulation: 2\nnum_workers: 0\ndevice: cpu\n")
    status = cli_main(["--config", str(tmp_path / "run.yaml"), "--model", str(tiny_model("sd15")), "--dataset", str(tiny_dataset()),
                       "--output", str(tmp_path / "out"), "--max-steps", "1", "--lambda-max", "0.7", "--output-name", "mine", "--quiet"])
    assert status == 0
    meta = annealing.load_guidance_model(tmp_path / "out" / "mine.safetensors").metadata
    assert meta.sampling_steps == 10 and meta.training["lambda_max"] == 0.7 and meta.training["effective_batch"] == 2


def test_resume_refuses_a_different_architecture(tmp_path):
    train(make_config("sd15", tmp_path / "out", max_steps=1), progress=False)
    with pytest.raises(TrainingError, match="cannot resume, mlp_hidden was 128 and is now 64"):
        train(make_config("sd15", tmp_path / "out", max_steps=2, resume=True, mlp_hidden=64), progress=False)


def test_resume_refuses_another_flow_grid_spacing(tmp_path):
    train(make_config("sd3", tmp_path / "out", max_steps=1), progress=False)
    with pytest.raises(TrainingError, match="cannot resume, flow_spacing was 'diffusers' and is now 'simple'"):
        train(make_config("sd3", tmp_path / "out", max_steps=2, resume=True, flow_spacing="simple"), progress=False)


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    result = train(make_config("sdxl", tmp_path / "out", dataset=str(tiny_dataset(6, corrupt=2)), max_steps=4), progress=False)
    assert [p.rsplit("/", 1)[1] for p in result.skipped_images] == ["broken000.png", "broken001.png"]
    assert result.skipped_image_events >= 2 and result.images_seen == 8 - result.skipped_image_events
    report = json.loads((tmp_path / "out" / "training_report.json").read_text())
    assert report["skipped_images"] == 2 and report["steps"] == 4
    assert annealing.load_guidance_model(result.checkpoint).metadata.training["skipped_images"] == 2


def test_a_dataset_of_only_unreadable_images_stops_with_an_error(tmp_path):
    with pytest.raises(TrainingError, match=r"none of the 2 images could be read \(e.g. .*broken000.png\)"):
        train(make_config("sd15", tmp_path / "out", dataset=str(tiny_dataset(0, corrupt=2)), max_steps=3), progress=False)
    assert not (tmp_path / "out" / "annealing_sd15.safetensors").exists()


def test_images_without_captions_are_skipped_when_asked_and_reported(tmp_path):
    from training.tiny_models import make_image_dataset

    data = make_image_dataset(tmp_path / "data", count=4, without_caption=2)
    with pytest.raises(TrainingError, match="nocap000.png: no caption file"):
        train(make_config("sd15", tmp_path / "out", dataset=str(data)), progress=False)
    result = train(make_config("sd15", tmp_path / "out", dataset=str(data), skip_missing_captions=True, max_steps=1), progress=False)
    assert result.missing_captions == 2 and result.images_seen == 2
    assert json.loads((tmp_path / "out" / "training_report.json").read_text())["skipped_missing_captions"] == 2


def poison_images(monkeypatch, positions: tuple[int, ...], config) -> list[str]:
    """Make the images the data order puts at micro-batches ``positions`` decode to NaN pixels (the loss of exactly those
    micro-batches is then NaN, however many network calls a loss makes); returns their names."""
    import training.data
    from training.data import MicroBatchSampler, scan_dataset

    samples = scan_dataset(config.dataset).samples
    order = MicroBatchSampler(len(samples), config.batch_size, config.seed)
    stream = iter(order)
    drawn = [next(stream) for _ in range(max(positions) + 1)]
    bad = {samples[i].image.name for n in positions for i in drawn[n]}
    real_load = training.data.load_image

    def load(path, resolution):
        pixels = real_load(path, resolution)
        return pixels * float("nan") if path.name in bad else pixels

    monkeypatch.setattr(training.data, "load_image", load)
    return sorted(bad)


def test_nan_losses_are_skipped_and_counted(tmp_path, monkeypatch):
    config = make_config("sd15", tmp_path / "out", max_steps=3)
    assert len(poison_images(monkeypatch, (0, 2), config)) == 2  # micro-batches 0 and 2: one in each of the first two steps
    result = train(config, progress=False)
    assert result.nan_losses == 2 and result.steps == 3 and result.images_seen == 4 and result.skipped_steps == 0
    assert all(torch.isfinite(v).all() for v in state_of(result.checkpoint).values())
    assert annealing.load_guidance_model(result.checkpoint).metadata.training["nan_losses"] == 2
    # a step none of whose micro-batches has a usable loss leaves the network alone and is counted as skipped
    monkeypatch.undo()
    config = make_config("sd15", tmp_path / "both", max_steps=3)
    poison_images(monkeypatch, (2, 3), config)
    result = train(config, progress=False)
    assert result.nan_losses == 2 and result.skipped_steps == 1 and result.images_seen == 4


def test_a_failed_write_leaves_the_last_good_checkpoint_intact(tmp_path, monkeypatch):
    trainer = Trainer(make_config("sd15", tmp_path / "out", max_steps=1), progress=False)
    trainer.preflight()
    result = trainer.run()
    files = [result.checkpoint, tmp_path / "out" / RESUME_FILE]
    before = [f.read_bytes() for f in files]

    def disk_full(obj, target, *args, **kwargs):  # a path (safetensors) or an open file (torch.save)
        if isinstance(target, str):
            with open(target, "wb") as handle:
                handle.write(b"half a file")
        else:
            target.write(b"half a file")
        raise OSError(28, "No space left on device")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(annealing.CheckpointError, match=f"no space left on {tmp_path / 'out'}$"):
        trainer.save(final=True)
    monkeypatch.undo()
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(annealing.CheckpointError, match=f"no space left on {tmp_path / 'out'}$"):
        trainer.save_resume()
    assert [f.read_bytes() for f in files] == before
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    annealing.load_guidance_model(result.checkpoint)


def test_precomputed_embeddings_train_like_the_text_encoders(tmp_path):
    embeddings = tmp_path / "embeds"
    status = cli_main(["embed", "--model", str(tiny_model("sdxl")), "--dataset", str(tiny_dataset()), "--output", str(embeddings),
                       "--dtype", "float32", "--shard-size", "4", "--quiet"])
    assert status == 0
    index = json.loads((embeddings / "index.json").read_text())
    assert index["count"] == 6 and len(index["shards"]) == 2 and index["model_family"] == "sdxl" and index["has_pooled"]

    # one loader worker: the embedding store must travel to worker processes
    trainer = Trainer(make_config("sdxl", tmp_path / "with", embeddings=str(embeddings), num_workers=1), progress=False)
    trainer.preflight()
    with_embeddings = trainer.run()
    assert trainer.backend.text is None  # the text encoders were never loaded
    without = train(make_config("sdxl", tmp_path / "without"), progress=False)
    a, b = state_of(with_embeddings.checkpoint), state_of(without.checkpoint)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_embeddings_for_another_family_or_other_captions_are_refused(tmp_path):
    def encode(captions):
        return {"embeds": torch.zeros(len(captions), 77, 64), "pooled": torch.zeros(len(captions), 32)}

    write_embeddings(tmp_path / "sd3", ["x"], encode, encode([""]), model_family="sd3", base_model="m", progress=False)
    with pytest.raises(TrainingError, match="made for a sd3 model, the model is sdxl"):
        train(make_config("sdxl", tmp_path / "out", embeddings=str(tmp_path / "sd3")), progress=False)
    write_embeddings(tmp_path / "sdxl", ["x"], encode, encode([""]), model_family="sdxl", base_model="m", progress=False)
    with pytest.raises(TrainingError, match="6 captions have no embedding"):
        train(make_config("sdxl", tmp_path / "out", embeddings=str(tmp_path / "sdxl")), progress=False)


def test_sd3_resolution_must_fit_the_transformer_patches_before_anything_loads(tmp_path):
    # 72 px -> a 9 x 9 latent: a multiple of the VAE's factor 8, but not of the SD3 transformer's 2 x 2 patches
    trainer = Trainer(make_config("sd3", tmp_path / "out", resolution=72), progress=False)
    with pytest.raises(TrainingError, match="not a multiple of 16 .*patch size 2"):
        trainer.preflight()


def test_resume_rewrites_the_log_without_rows_past_the_resumed_step(tmp_path):
    out = tmp_path / "out"
    train(make_config("sd15", out, max_steps=2), progress=False)
    log = out / "train_log.jsonl"
    # rows a crashed run logged after its last resume state, and a line the crash cut short
    log.write_text(log.read_text() + '{"step": 3, "quality": 1.0}\n{"step": 4, "qual', encoding="utf-8")
    train(make_config("sd15", out, max_steps=3, resume=True), progress=False)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row.get("step", ("start", row.get("from_step"))) for row in rows] == [("start", 0), 1, 2, ("start", 2), 3]


def test_progress_bar_shows_the_values_of_the_step_it_counts(tmp_path, monkeypatch):
    import io

    import tqdm.auto

    drawn = []

    class Recorder(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "mininterval": 0, "miniters": 1, "file": io.StringIO()})

        def display(self, *args, **kwargs):
            drawn.append((self.n, self.postfix))
            return super().display(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    train(make_config("sd15", tmp_path / "out", max_steps=3), progress=True)
    rows = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines() if '"step"' in line]
    shown = {n: postfix for n, postfix in drawn if n >= 1}
    assert sorted(shown) == [1, 2, 3]
    for row in rows:
        assert f"loss={row['loss']:.4g}" in shown[row["step"]] and f"q={row['quality']:.3g}" in shown[row["step"]]


def test_fp16_frozen_model_trains_with_the_loss_scale(tmp_path):
    """The GPU default (float16 frozen network, static loss scale, float32 VAE and MLP) run on the CPU."""
    from training.run_parts import resolve_precision

    assert resolve_precision("auto", torch.device("cuda")) == torch.float16 and resolve_precision("auto", torch.device("cpu")) == torch.float32
    trainer = Trainer(make_config("sdxl", tmp_path / "out", precision="fp16", max_steps=1), progress=False)
    trainer.preflight()
    result = trainer.run()
    assert next(trainer.backend.network.parameters()).dtype == torch.float16 and trainer.loss_scale == 1024.0
    assert next(trainer.backend.vae.parameters()).dtype == torch.float32  # the SDXL VAE overflows in float16
    assert all(p.dtype == torch.float32 for p in trainer.mlp.parameters())
    assert result.nan_losses == 0 and result.skipped_steps == 0 and math.isfinite(result.last_terms["loss"])
    assert not same_weights(state_of(result.checkpoint), initial_weights(trainer.config))
    assert annealing.load_guidance_model(result.checkpoint).metadata.training["precision"] == "float16"
