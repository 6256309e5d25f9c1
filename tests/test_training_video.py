"""Video clips for the video families: decoded with PyAV, frames / stride / resolution as asked, images as one-frame
clips, bounded before decoding like the images (size, duration, packets, the container its extension names), a broken
clip skipped and counted; collating prompts of different lengths."""

from __future__ import annotations

import os

import pytest
import torch
from training_fixtures import tiny_clips

from training import video
from training.data import ImageCaptionDataset, collate, scan_dataset
from training.tiny_models import make_image_dataset, write_clip
from training.video import ClipError, load_clip


def gray_clip(path, frames: int, size: int = 32, width: int | None = None):
    """A lossless (FFV1) clip whose frame i is uniformly gray 10 + 20 i: every decoded pixel is known."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("ffv1", rate=8)
        stream.width, stream.height, stream.pix_fmt = width or size, size, "yuv444p"
        for i in range(frames):
            rgb = torch.full((size, width or size, 3), 10 + 20 * i, dtype=torch.uint8).numpy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_frames_stride_and_resolution(tmp_path):
    clip = gray_clip(tmp_path / "gray.mkv", frames=7, size=48, width=96)  # 2:1, centre-cropped to a square
    out = load_clip(clip, 16, frames=3, stride=3)  # frames 0, 3, 6
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    expected = torch.tensor([10.0, 70.0, 130.0]) / 127.5 - 1
    assert torch.allclose(out.mean(dim=(0, 2, 3)), expected, atol=2 / 127.5) and float(out.std(dim=(0, 2, 3)).max()) < 0.02
    with pytest.raises(ClipError, match="has 7 frames; 3 frames every 4 need 9"):
        load_clip(clip, 16, frames=3, stride=4)


def test_clips_are_bounded_before_decoding(tmp_path, monkeypatch):
    clip = write_clip(tmp_path / "ok.mp4", frames=5, size=32)
    assert load_clip(clip, 16, frames=5).shape == (3, 5, 16, 16)
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(200))
    (tmp_path / "playlist.mp4").write_text("#EXTM3U\n#EXTINF:1,\nfile:///etc/hostname\n")  # never opened as a playlist
    (tmp_path / "matroska.mp4").write_bytes(write_clip(tmp_path / "real.mkv", frames=3).read_bytes())  # only the mp4 demuxer
    for name in ("junk.mp4", "playlist.mp4", "matroska.mp4"):
        with pytest.raises(ClipError, match="not a readable mp4 clip"):
            load_clip(tmp_path / name, 16, frames=1)
    os.mkfifo(tmp_path / "fifo.mp4")  # would block a plain open() for ever
    with pytest.raises(ValueError, match="not a regular file"):
        load_clip(tmp_path / "fifo.mp4", 16, frames=1)
    with pytest.raises(ClipError, match="pixels per clip"):
        load_clip(clip, 4096, frames=257)
    monkeypatch.setattr("training.data.MAX_IMAGE_PIXELS", 32 * 47)  # the header's frame size, before any frame is decoded
    with pytest.raises(ValueError, match="48 x 32 pixels is more than"):
        load_clip(clip, 16, frames=1)
    monkeypatch.undo()
    monkeypatch.setattr(video, "MAX_CLIP_SECONDS", 0.1)  # 5 frames at 8 fps: 0.6 s
    with pytest.raises(ClipError, match="longer than 0 s"):
        load_clip(clip, 16, frames=1)
    monkeypatch.undo()
    monkeypatch.setattr(video, "MAX_PACKETS_PER_FRAME", 0)
    monkeypatch.setattr(video, "_PACKET_SLACK", 2)
    with pytest.raises(ClipError, match="no 5 frames in 2 packets"):
        load_clip(clip, 16, frames=5)


def test_a_clip_folder_with_images_and_a_broken_clip(tmp_path):
    folder = tiny_clips(2, frames=9, corrupt=1, images=2)
    assert [s.image.suffix for s in scan_dataset(folder).samples] == [".png"] * 2  # image families read the images only
    samples = scan_dataset(folder, videos=True).samples
    assert sorted(s.image.name for s in samples) == ["broken000.mp4", "clip000.mp4", "clip001.mp4", "img000.png", "img001.png"]
    clips = ImageCaptionDataset(samples, 32, frames=5, frame_stride=2)
    items = {samples[i].image.name: clips[i] for i in range(len(samples))}
    assert items["clip000.mp4"]["pixels"].shape == (3, 5, 32, 32)
    assert "not a readable mp4 clip" in items["broken000.mp4"]["reason"]
    assert "a still image is one frame" in items["img000.png"]["reason"]
    stills = ImageCaptionDataset(samples, 32, frames=1)  # frames 1: images are one-frame clips, clips give their first frame
    assert stills[[s.image.name for s in samples].index("img000.png")]["pixels"].shape == (3, 1, 32, 32)
    batch = collate([items["clip000.mp4"], items["broken000.mp4"], items["clip001.mp4"]])
    assert batch["size"] == 2 and batch["pixels"].shape == (2, 3, 5, 32, 32) and batch["failed"] == [str(folder / "broken000.mp4")]


def test_manifest_rows_may_name_a_video(tmp_path):
    write_clip(tmp_path / "walk.mp4", frames=3)
    make_image_dataset(tmp_path, count=1)
    (tmp_path / "data.jsonl").write_text('{"video": "walk.mp4", "caption": "a walk"}\n{"image": "img000.png", "text": "a picture"}\n')
    samples = scan_dataset(tmp_path / "data.jsonl", videos=True).samples
    assert [(s.image.name, s.caption) for s in samples] == [("walk.mp4", "a walk"), ("img000.png", "a picture")]


def test_collate_pads_prompts_of_different_lengths_under_their_masks():
    items = [{"caption": "a", "index": 0, "pixels": torch.zeros(3, 4, 4), "embeds": torch.ones(3, 2), "mask": torch.ones(3)},
             {"caption": "b", "index": 1, "pixels": torch.zeros(3, 4, 4), "embeds": 2 * torch.ones(5, 2), "mask": torch.ones(5)}]
    batch = collate(items)
    assert batch["embeds"].shape == (2, 5, 2) and batch["mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["embeds"][0, 3:].abs().sum() == 0
    unmasked = [{k: v for k, v in item.items() if k != "mask"} for item in items]
    with pytest.raises(Exception, match="without a token mask"):
        collate(unmasked)


def test_precomputed_latents_are_checked_before_use(tmp_path):
    """A stranger's latents folder: the index section is validated when opened, each file is bounded in size and must hold
    finite float tensors of the recorded shape; anything else is a skipped sample (ValueError), never a crash."""
    import json

    from safetensors.torch import save_file

    from training.data import EmbeddingStore, write_embeddings
    from training.errors import TrainingError

    def encode(captions):
        return {"embeds": torch.zeros(len(captions), 4, 8)}

    shape = [4, 2, 2]
    files = {"good": "good.safetensors", "nan": "nan.safetensors", "shape": "shape.safetensors", "big": "big.safetensors"}
    section = {"resolution": 16, "frames": 1, "frame_stride": 1, "latent_shape": shape, "dtype": "float32", "files": files, "skipped": {}}
    write_embeddings(tmp_path, ["a"], encode, encode([""]), model_family="sd15", base_model="m", progress=False, latents=section)
    (tmp_path / "latents").mkdir()
    save_file({"mean": torch.ones(shape), "std": torch.ones(shape)}, tmp_path / "latents" / "good.safetensors")
    save_file({"mean": torch.full(shape, float("nan")), "std": torch.ones(shape)}, tmp_path / "latents" / "nan.safetensors")
    save_file({"mean": torch.ones(4, 2, 3), "std": torch.ones(4, 2, 3)}, tmp_path / "latents" / "shape.safetensors")
    save_file({"mean": torch.ones(shape), "std": torch.ones(shape), "pad": torch.zeros(40000)}, tmp_path / "latents" / "big.safetensors")
    store = EmbeddingStore(tmp_path)
    assert torch.equal(store.latent("good")["latent_mean"], torch.ones(shape))
    for key, message in (("nan", "not a finite float tensor"), ("shape", "of shape"), ("big", "larger than"), ("absent", "no precomputed latent")):
        with pytest.raises(ValueError, match=message):
            store.latent(key)
    with pytest.raises(TrainingError, match="have frames 1, the run needs 5"):
        store.check_latents(16, 5, 1, tuple(shape))
    index = json.loads((tmp_path / "index.json").read_text())
    index["latents"]["files"] = {"x": "../../etc/passwd"}
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(TrainingError, match="malformed embeddings index \\(latents\\)"):
        EmbeddingStore(tmp_path)
