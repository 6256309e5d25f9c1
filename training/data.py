"""Training data: image and clip folders with captions, JSONL manifests, image and clip loading, and precomputed text
embeddings and latents.

Dataset layouts
* A folder of images, each with a same-named caption file (``cat.jpg`` + ``cat.txt``), searched recursively, so
  img2dataset output (``00000/000000001.jpg`` + ``.txt``) works as is. For the video families (Wan) the folder may also
  hold short clips (``walk.mp4`` + ``walk.txt``; .mp4 .m4v .mov .mkv .webm .avi), read by :mod:`training.video`:
  ``frames`` frames every ``frame_stride``-th from the first, each cropped and resized as an image is. An image is a
  one-frame clip, so it is used when frames is 1 and skipped (and counted) otherwise, as is a clip with too few frames.
* A ``.jsonl`` manifest, one JSON object per line: ``{"image": "path/relative/to/manifest.jpg", "caption": "..."}``
  (``file_name``/``path``/``video`` and ``text`` are accepted as aliases).

Images are center-cropped to a square and resized to the resolution (bicubic), then scaled to [-1, 1]; 16-bit images
by their 16-bit range, float images as [0, 1] (or by their own range when their values lie outside it). An image that
cannot be decoded, is not a regular file, has more than ``MAX_IMAGE_PIXELS`` pixels or is longer than
``MAX_ASPECT_RATIO`` times its width (or the reverse) is skipped and counted, never fatal; a missing caption is an
error unless skipping is asked for.

Everything read here may come from strangers, so it is bounded before use: only regular files are opened (a FIFO would
hang the run), caption files and manifest lines have a size limit, a dataset has at most ``MAX_SAMPLES`` samples and
``MAX_TEXT_BYTES`` of captions, and an image's pixel count is checked from its header before it is decoded.

Precomputed embeddings (``python -m training embed``) live in a folder:
* ``index.json``: {"format": "annealing-training-embeddings", "version": 1, "model_family", "base_model",
  "has_pooled", "dtype", "shards": [file names], "captions": {sha1(caption): [shard, row]}}
* ``shard-00000.safetensors`` ...: ``embeds`` (n, L, D), for SDXL/SD3 ``pooled`` (n, P) and, for the families whose
  pipelines pass a token mask (Qwen-Image, Chroma), ``mask`` (n, L), one row per distinct caption (rows of a shard are
  padded to its longest, masked out);
* ``uncond.safetensors``: the empty prompt's ``embeds`` (1, L, D), ``pooled`` (1, P), ``mask`` (1, L).
Rows are looked up by the caption's SHA-1, so the same embeddings serve any dataset with the same captions.
With ``python -m training embed --latents`` the folder also holds each sample's VAE posterior, so training loads no VAE:
* index ``latents``: {"resolution", "frames", "frame_stride", "latent_shape", "dtype", "files": {sha1(path in the
  dataset): file}, "skipped": {path: reason}};
* ``latents/<sha1>.safetensors``: ``mean`` and ``std`` of the posterior (before the latent normalisation), which training
  samples from as the VAE would.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import TrainingError
from .files import NotARegularFile, clipped, decode_utf8, format_size, open_regular, read_text, shown
from .video import VIDEO_EXTENSIONS, load_clip

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: The decoders PIL may use: those of the extensions above. A file is identified by its content, so without this list a
#: ``.png`` holding, say, EPS would reach a plugin that runs an external program.
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "GIF", "TIFF")  # JPEG includes multi-picture (MPO) files
#: Pixels an image may have (checked from the header, before decoding): 64 Mpx, an 8K x 8K image; 192 MiB as RGB.
MAX_IMAGE_PIXELS = 2**26
#: Longest side / shortest side. The center crop of a longer image keeps less than an eighth of it; a 1 x 10000 image
#: would otherwise be resized to 512 x 5.12 M pixels.
MAX_ASPECT_RATIO = 8
#: A caption (file or manifest field); the text encoders read at most a few hundred tokens of it.
MAX_CAPTION_BYTES = 64 * 1024
#: A manifest line: a caption and an image path, with room to spare.
MAX_MANIFEST_LINE_BYTES = 256 * 1024
#: Samples of a dataset (50 x the paper's 20k), and bytes of caption text a dataset may hold in memory in total.
MAX_SAMPLES = 1_000_000
MAX_TEXT_BYTES = 256 * 2**20
#: PIL modes with more than 8 bits per channel: PIL's ``convert("RGB")`` clips them to black and white, so they are
#: scaled by their real range instead (16-bit integers by 65535, floats by [0, 1] or their own range).
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
EMBEDDINGS_FORMAT = "annealing-training-embeddings"
LATENTS_FOLDER = "latents"
#: Bytes a precomputed latent file may have beyond its two float32 tensors (the safetensors header).
LATENT_FILE_SLACK = 64 * 1024


@dataclass(frozen=True)
class Sample:
    image: Path
    caption: str


@dataclass
class DatasetScan:
    samples: list[Sample]
    missing_captions: list[Path]
    root: Path | None = None  # the folder, or the manifest's folder: precomputed latents are keyed by paths relative to it


def sample_key(path: Path, root: Path | None) -> str:
    """The key of a sample's precomputed latent: SHA-1 of its path relative to the dataset (the dataset may move)."""
    try:
        name = path.relative_to(root).as_posix() if root is not None else str(path)
    except ValueError:
        name = str(path)
    return hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()


def caption_key(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------------------ scanning


def _too_many(where) -> TrainingError:
    return TrainingError(f"{where}: more than {MAX_SAMPLES:,} samples; split the dataset (at most {MAX_SAMPLES:,} per run)")


def scan_folder(root: Path, caption_extension: str = ".txt", skip_missing_captions: bool = False, videos: bool = False) -> DatasetScan:
    """Images (and with ``videos`` clips) under ``root`` (recursive, sorted) with their same-named caption files."""
    samples, missing = [], []
    text_bytes = 0
    extensions = IMAGE_EXTENSIONS + (VIDEO_EXTENSIONS if videos else ())
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file())  # is_file: regular only
    if len(images) > MAX_SAMPLES:
        raise _too_many(root)
    for path in images:
        caption_path = path.with_suffix(caption_extension)
        if not caption_path.exists():
            if not skip_missing_captions:
                raise TrainingError(f"{path}: no caption file {caption_path.name} (pass --skip-missing-captions to skip such images)")
            missing.append(path)
            continue
        caption = read_text(caption_path, MAX_CAPTION_BYTES, "caption file").strip()
        text_bytes += len(caption)
        if text_bytes > MAX_TEXT_BYTES:
            raise TrainingError(f"{root}: the captions add up to more than {format_size(MAX_TEXT_BYTES)}")
        samples.append(Sample(path, caption))
    return DatasetScan(samples, missing, root)


def _manifest_lines(manifest: Path):
    """(number, text) of each line, bounded in length, count and total size, decoded as UTF-8."""
    try:
        handle = open_regular(manifest)
    except NotARegularFile as exc:
        raise TrainingError(f"{manifest}: the manifest is {exc}") from None
    except OSError as exc:
        raise TrainingError(f"{manifest}: cannot read the manifest ({exc.strerror or type(exc).__name__})") from None
    total = 0
    with handle:
        for number in range(1, 2**62):
            line = handle.readline(MAX_MANIFEST_LINE_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_MANIFEST_LINE_BYTES:
                raise TrainingError(f"{manifest}:{number}: line longer than {format_size(MAX_MANIFEST_LINE_BYTES)}")
            total += len(line)
            if total > MAX_TEXT_BYTES:
                raise TrainingError(f"{manifest}: larger than {format_size(MAX_TEXT_BYTES)}; split the dataset")
            if number > 2 * MAX_SAMPLES:  # blank and skipped lines are allowed, but not without end
                raise TrainingError(f"{manifest}: more than {2 * MAX_SAMPLES:,} lines; split the dataset")
            yield number, decode_utf8(line, manifest, "manifest", number)


def read_manifest(manifest: Path, skip_missing_captions: bool = False) -> DatasetScan:
    """Samples of a JSONL manifest; image paths are relative to the manifest's folder unless absolute."""
    samples, missing = [], []
    base = manifest.parent
    for number, line in _manifest_lines(manifest):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainingError(f"{manifest}:{number}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise TrainingError(f"{manifest}:{number}: not valid JSON (nested too deeply)") from None
        except ValueError as exc:  # an integer too long to convert
            raise TrainingError(f"{manifest}:{number}: not valid JSON ({str(exc)[:100]})") from None
        if not isinstance(row, dict):
            raise TrainingError(f"{manifest}:{number}: expected a JSON object with image and caption")
        image = next((row[k] for k in ("image", "file_name", "path", "video") if k in row), None)
        if not isinstance(image, str) or not image:
            raise TrainingError(f"{manifest}:{number}: missing the image path (key 'image')")
        if "\0" in image or len(image) > 4096:
            raise TrainingError(f"{manifest}:{number}: not a usable image path ({shown(image)})")
        path = Path(image) if os.path.isabs(image) else base / image
        caption = next((row[k] for k in ("caption", "text") if k in row), None)
        if caption is None or not isinstance(caption, str):
            if not skip_missing_captions:
                raise TrainingError(f"{manifest}:{number}: missing caption for {clipped(image)} (pass --skip-missing-captions to skip such rows)")
            missing.append(path)
            continue
        if len(caption) > MAX_CAPTION_BYTES:
            raise TrainingError(f"{manifest}:{number}: caption longer than {format_size(MAX_CAPTION_BYTES)}")
        samples.append(Sample(path, caption.strip()))
        if len(samples) > MAX_SAMPLES:
            raise _too_many(manifest)
    return DatasetScan(samples, missing, base)


def scan_dataset(dataset: str | Path, caption_extension: str = ".txt", skip_missing_captions: bool = False, videos: bool = False) -> DatasetScan:
    """Find the samples of a folder or manifest (``videos``: clips too); an empty dataset is an error."""
    path = Path(dataset)
    if path.is_dir():
        scan = scan_folder(path, caption_extension, skip_missing_captions, videos)
        kind = (f"no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...){' or clips (.mp4, ...)' if videos else ''} with captions")
    elif path.exists():
        if path.suffix.lower() != ".jsonl":
            raise TrainingError(f"{path}: a dataset is a folder of images or a .jsonl manifest")
        scan = read_manifest(path, skip_missing_captions)
        kind = "no rows with an image and a caption"
    else:
        raise TrainingError(f"{path}: dataset not found")
    if not scan.samples:
        raise TrainingError(f"{path}: empty dataset, {kind}")
    return scan


# ------------------------------------------------------------------------------------------------------------ images


def check_image_size(width: int, height: int) -> None:
    """Refuse (ValueError: the image is skipped) sizes whose decode or resize would cost too much, before decoding."""
    if width < 1 or height < 1:
        raise ValueError(f"empty image ({width} x {height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{width} x {height} pixels is more than {MAX_IMAGE_PIXELS:,}")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(f"{width} x {height} is longer than {MAX_ASPECT_RATIO}:1")


def _high_depth_range(mode: str, low: float, high: float) -> tuple[float, float]:
    """The values that map to black and white for a 16-bit or float image whose pixels lie in [low, high]."""
    if mode.startswith("I;16"):
        return 0.0, 65535.0
    if mode == "I":  # 32-bit integers; PIL also reads some 16-bit files so
        return (0.0, 65535.0) if low >= 0 and high <= 65535 else (low, high)
    if low >= 0 and high <= 1:  # float: [0, 1] is the convention
        return 0.0, 1.0
    return min(low, 0.0), high


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """(3, R, R) float32 in [-1, 1]: the centered square of the image, resized to R (bicubic). Raises on files that cannot
    be used (see the module docstring), which the dataset turns into a skipped image."""
    from PIL import Image

    with open_regular(path) as raw, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(raw, formats=PIL_FORMATS) as handle:
            width, height = handle.size
            check_image_size(width, height)  # from the header: nothing is decoded yet
            handle.load()  # decode fully here so a truncated file fails now
            high_depth = handle.mode in HIGH_DEPTH_MODES
            image = handle.convert("F") if high_depth else handle.convert("RGB")
            mode = handle.mode
    # Crop then resize (the box): the resize target is R x R whatever the aspect ratio.
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
    if high_depth:
        low, high = image.getextrema()
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("infinite pixel values")
        black, white = _high_depth_range(mode, low, high)
        resized = image.resize((resolution, resolution), Image.BICUBIC, box=box)
        data = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.float32).reshape(resolution, resolution)
        if not torch.isfinite(data).all():  # getextrema skips NaN
            raise ValueError("NaN pixel values")
        gray = ((data - black) / max(white - black, 1e-30)).clamp(0, 1)
        return (gray * 2 - 1).expand(3, resolution, resolution).contiguous()
    image = image.resize((resolution, resolution), Image.BICUBIC, box=box)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return data.permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Items are dicts: ``pixels`` (3, R, R), or with ``frames`` set (the video families) (3, frames, R, R); or, with
    precomputed latents, ``latent_mean`` and ``latent_std``; and ``caption``, ``index``, and ``embeds``/``pooled``/``mask``
    with an embedding store. A sample that cannot be read gives ``{"failed": path, "reason": ..., "index": i}`` instead."""

    def __init__(self, samples: list[Sample], resolution: int, embeddings: EmbeddingStore | None = None, frames: int | None = None,
                 frame_stride: int = 1, latents: bool = False, root: Path | None = None):
        self.samples, self.resolution, self.embeddings = samples, resolution, embeddings
        self.frames, self.frame_stride, self.latents, self.root = frames, frame_stride, latents, root

    def __len__(self) -> int:
        return len(self.samples)

    def _pixels(self, path: Path) -> torch.Tensor:
        if self.frames is None:
            return load_image(path, self.resolution)
        if path.suffix.lower() in VIDEO_EXTENSIONS:
            return load_clip(path, self.resolution, self.frames, self.frame_stride)
        if self.frames != 1:
            raise ValueError(f"a still image is one frame; the run reads clips of {self.frames} frames")
        return load_image(path, self.resolution).unsqueeze(1)  # an image is a one-frame clip

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        try:
            if self.latents:
                item = self.embeddings.latent(sample_key(sample.image, self.root))
            else:
                item = {"pixels": self._pixels(sample.image)}
        except Exception as exc:  # PIL and FFmpeg raise many types for bad files; any of them means "skip this sample"
            return {"failed": str(sample.image), "reason": f"{type(exc).__name__}: {exc}"[:200], "index": index}
        item.update(caption=sample.caption, index=index)
        if self.embeddings is not None:
            item.update(self.embeddings.lookup(sample.caption))
        return item


def collate(items: list[dict]) -> dict:
    """Stack the readable items; ``failed`` lists the paths that could not be read; ``size`` counts the others (``pixels``
    is None if none could be read, or when the items are precomputed latents). Token embeddings of different lengths
    (Qwen-Image's) are padded to the longest, masked out."""
    good = [item for item in items if "failed" not in item]
    batch = {"failed": [item["failed"] for item in items if "failed" in item], "captions": [item["caption"] for item in good],
             "size": len(good), "pixels": None}
    for key in ("pixels", "latent_mean", "latent_std", "pooled"):
        if good and key in good[0]:
            batch[key] = torch.stack([item[key] for item in good])
    if good and "embeds" in good[0]:
        length = max(item["embeds"].shape[0] for item in good)
        if "mask" in good[0] or any(item["embeds"].shape[0] != length for item in good):
            if "mask" not in good[0]:
                raise TrainingError("precomputed embeddings of different token counts without a token mask cannot share a batch")
            batch["embeds"] = torch.stack([torch.nn.functional.pad(item["embeds"], (0, 0, 0, length - item["embeds"].shape[0])) for item in good])
            batch["mask"] = torch.stack([torch.nn.functional.pad(item["mask"], (0, length - item["mask"].shape[0])) for item in good])
        else:
            batch["embeds"] = torch.stack([item["embeds"] for item in good])
    return batch


class MicroBatchSampler(torch.utils.data.Sampler):
    """Deterministic, resumable stream of micro-batches for one process.

    Micro-batches are numbered globally: local micro-batch m of process r of P is global micro-batch g = m * P + r, so
    optimizer step s (A micro-batches per process) covers g = s * P * A ... (s + 1) * P * A - 1 whatever P is. Global
    micro-batch g is slice g mod E of epoch g div E's permutation ``randperm(N, seed + epoch)`` (E = N div batch_size;
    the tail is dropped). P processes with A micro-batches each therefore draw exactly the images of one process with
    P * A, and resuming at m reproduces the uninterrupted run.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self.per_epoch = num_samples // batch_size  # global micro-batches per epoch
        if self.per_epoch < world_size:
            raise TrainingError(
                f"the dataset has {num_samples} usable samples, fewer than batch_size x processes = {batch_size * world_size}"
            )

    def __iter__(self):
        m = self.start
        epoch, cached = None, None
        while True:
            current, offset = divmod(m * self.world_size + self.rank, self.per_epoch)
            if current != epoch:
                epoch = current
                cached = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + current)).tolist()
            yield cached[offset * self.batch_size : (offset + 1) * self.batch_size]
            m += 1

    def __len__(self) -> int:  # infinite in practice; DataLoader only needs this for len(), which we never call
        return 2**62


# ------------------------------------------------------------------------------------------------ precomputed embeddings


class EmbeddingStore:
    """Read side of an embeddings folder (see the module docstring). Shards are opened lazily, once per process."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.exists():
            raise TrainingError(f"{self.folder}: not an embeddings folder (no index.json); write one with `python -m training embed`")
        text = read_text(index_path, MAX_TEXT_BYTES, "embeddings index")
        try:
            self.index = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise TrainingError(f"{index_path}: cannot read the index ({str(exc)[:100]})") from None
        if not isinstance(self.index, dict) or self.index.get("format") != EMBEDDINGS_FORMAT:
            raise TrainingError(f"{index_path}: not an embeddings index (format is not {EMBEDDINGS_FORMAT!r})")
        shards, table = self.index.get("shards"), self.index.get("captions")
        if not (isinstance(shards, list) and all(isinstance(n, str) and n and os.path.basename(n) == n and n not in (".", "..") for n in shards)
                and isinstance(table, dict) and isinstance(self.index.get("model_family"), str)
                and isinstance(self.index.get("has_pooled"), bool)):
            raise TrainingError(f"{index_path}: malformed embeddings index (shards, captions, model_family or has_pooled)")
        if not all(isinstance(e, list) and len(e) == 2 and all(type(i) is int and i >= 0 for i in e) and e[0] < len(shards) for e in table.values()):
            raise TrainingError(f"{index_path}: malformed embeddings index (a caption entry is not [shard, row])")
        if not isinstance(self.index.get("has_mask", False), bool):
            raise TrainingError(f"{index_path}: malformed embeddings index (has_mask)")
        for shard in shards + ["uncond.safetensors"]:
            if not (self.folder / shard).is_file():
                raise TrainingError(f"{self.folder / shard}: embeddings shard missing")
        self.latents = _check_latents_section(index_path, self.index.get("latents"))
        self._handles: dict[int, object] = {}

    @property
    def model_family(self) -> str:
        return self.index["model_family"]

    @property
    def has_pooled(self) -> bool:
        return bool(self.index["has_pooled"])

    @property
    def has_mask(self) -> bool:
        return bool(self.index.get("has_mask", False))

    def check_latents(self, resolution: int, frames: int, frame_stride: int, latent_shape: tuple[int, ...]) -> None:
        """Precomputed latents must be of the run's resolution, frames, stride and latent shape (one-line error)."""
        have = self.latents
        want = {"resolution": resolution, "frames": frames, "frame_stride": frame_stride, "latent_shape": list(latent_shape)}
        for key, value in want.items():
            if have[key] != value:
                raise TrainingError(f"{self.folder}: the precomputed latents have {key} {have[key]}, the run needs {value}; re-run "
                                    f"`python -m training embed --latents` with the run's settings (or train without --embeddings' latents)")

    def latent(self, key: str) -> dict[str, torch.Tensor]:
        """A sample's precomputed posterior as float32 ``latent_mean`` / ``latent_std``; raises ValueError (the sample is
        skipped and counted) when there is none or the file is not one."""
        from safetensors.torch import load

        name = self.latents["files"].get(key)
        if name is None:
            raise ValueError("no precomputed latent (the embed run skipped it or did not see it)")
        shape = tuple(self.latents["latent_shape"])
        limit = 2 * math.prod(shape) * 4 + LATENT_FILE_SLACK
        with open_regular(self.folder / LATENTS_FOLDER / name) as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"the latent file is larger than {format_size(limit)}")
        tensors = load(data)
        out = {}
        for part in ("mean", "std"):
            value = tensors.get(part)
            if value is None or tuple(value.shape) != shape or not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                raise ValueError(f"the latent file's {part} is not a finite float tensor of shape {shape}")
            out[f"latent_{part}"] = value.to(torch.float32)
        return out

    def missing(self, captions: list[str]) -> list[str]:
        table = self.index["captions"]
        return [c for c in captions if caption_key(c) not in table]

    def _handle(self, shard: int):
        if shard not in self._handles:
            from safetensors import safe_open

            self._handles[shard] = safe_open(str(self.folder / self.index["shards"][shard]), framework="pt", device="cpu")
        return self._handles[shard]

    def lookup(self, caption: str) -> dict[str, torch.Tensor]:
        entry = self.index["captions"].get(caption_key(caption))
        if entry is None:
            raise TrainingError(f"{self.folder}: no embedding for caption {caption[:60]!r}; re-run `python -m training embed` on this dataset")
        shard, row = entry
        handle = self._handle(shard)
        out = {"embeds": handle.get_slice("embeds")[row : row + 1][0].to(torch.float32)}
        if self.has_pooled:
            out["pooled"] = handle.get_slice("pooled")[row : row + 1][0].to(torch.float32)
        if self.has_mask:
            out["mask"] = handle.get_slice("mask")[row : row + 1][0].to(torch.float32)
            if self.index.get("trim_to_mask"):  # the row's own tokens: a batch is padded to its longest, as the pipeline pads
                length = int(out["mask"].nonzero().max()) + 1 if bool(out["mask"].any()) else 1
                out["embeds"], out["mask"] = out["embeds"][:length], out["mask"][:length]
        return out

    def uncond(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        data = load_file(str(self.folder / "uncond.safetensors"))
        return {k: v.to(torch.float32) for k, v in data.items()}

    def __getstate__(self):  # DataLoader workers get a fresh copy without open handles
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def _check_latents_section(index_path: Path, section) -> dict | None:
    if section is None:
        return None
    ok = isinstance(section, dict) and all(type(section.get(k)) is int and section[k] >= 1 for k in ("resolution", "frames", "frame_stride"))
    shape, files = section.get("latent_shape") if ok else None, section.get("files") if ok else None
    ok = ok and isinstance(shape, list) and 1 <= len(shape) <= 5 and all(type(n) is int and 1 <= n <= 2**16 for n in shape)
    ok = ok and math.prod(shape) <= 2**31 and isinstance(files, dict) and len(files) <= MAX_SAMPLES
    ok = ok and all(isinstance(k, str) and isinstance(v, str) and v.endswith(".safetensors") and os.path.basename(v) == v and not v.startswith(".")
                    for k, v in files.items())
    if not ok:
        raise TrainingError(f"{index_path}: malformed embeddings index (latents)")
    return section


def write_embeddings(folder: Path, captions: list[str], encode, uncond: dict[str, torch.Tensor], *, model_family: str, base_model: str,
                     dtype: torch.dtype = torch.float16, shard_size: int = 512, batch_size: int = 8, progress: bool = True,
                     latents: dict | None = None, trim_to_mask: bool = False) -> dict:
    """Encode each distinct caption with ``encode(list[str]) -> {"embeds": (B,L,D), "pooled": (B,P) or absent, "mask": (B, L)
    or absent}`` and write the folder (``latents``: the index section :func:`write_latents` returned; ``trim_to_mask``:
    rows are read back cut to their masked tokens, for pipelines that pad to the longest prompt). Every file is
    written to a temporary name and renamed; ``index.json`` comes last, so an interrupted run leaves no index that points
    at missing shards."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from annealing.atomic_write import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    distinct = sorted(set(captions))
    table: dict[str, list[int]] = {}
    shards: list[str] = []
    has_pooled = "pooled" in uncond
    bar = tqdm(total=len(distinct), desc="embedding captions", unit="caption", disable=not progress)
    for shard_index in range(math.ceil(len(distinct) / shard_size)):
        chunk = distinct[shard_index * shard_size : (shard_index + 1) * shard_size]
        parts: dict[str, list[torch.Tensor]] = {"embeds": [], "pooled": [], "mask": []}
        for start in range(0, len(chunk), batch_size):
            encoded = encode(chunk[start : start + batch_size])
            for key in parts:
                if key in encoded:
                    kind = torch.uint8 if key == "mask" else dtype  # a mask is 0/1 (Chroma's is float, Qwen-Image's integer)
                    parts[key].append(encoded[key].detach().to("cpu", kind))
            bar.update(len(chunk[start : start + batch_size]))
        if parts["mask"]:  # batches of different token counts (Qwen-Image): padded to the shard's longest, masked out
            length = max(t.shape[1] for t in parts["embeds"])
            parts["embeds"] = [torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1])) for t in parts["embeds"]]
            parts["mask"] = [torch.nn.functional.pad(t, (0, length - t.shape[1])) for t in parts["mask"]]
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items() if v}
        name = f"shard-{shard_index:05d}.safetensors"
        atomic_write(folder / name, lambda tmp, t=tensors: save_file(t, tmp))
        shards.append(name)
        for row, caption in enumerate(chunk):
            table[caption_key(caption)] = [shard_index, row]
    bar.close()
    uncond_cpu = {k: v.detach().to("cpu", torch.uint8 if k == "mask" else dtype).contiguous() for k, v in uncond.items()}
    atomic_write(folder / "uncond.safetensors", lambda tmp: save_file(uncond_cpu, tmp))
    index = {
        "format": EMBEDDINGS_FORMAT,
        "version": 1,
        "model_family": model_family,
        "base_model": base_model,
        "has_pooled": has_pooled,
        "has_mask": "mask" in uncond,
        "trim_to_mask": bool(trim_to_mask and "mask" in uncond),
        "dtype": str(dtype).replace("torch.", ""),
        "count": len(distinct),
        "shards": shards,
        "captions": table,
        **({"latents": latents} if latents is not None else {}),
    }
    payload = json.dumps(index, indent=1, sort_keys=True)
    atomic_write(folder / "index.json", lambda tmp: Path(tmp).write_text(payload, encoding="utf-8"))
    return index


def write_latents(folder: Path, samples: list[Sample], root: Path | None, encode, *, resolution: int, frames: int | None, frame_stride: int,
                  latent_shape: tuple[int, ...], dtype: torch.dtype = torch.float32, progress: bool = True) -> dict:
    """Read every sample as training would and write its VAE posterior (``encode(pixels (1, ...)) -> (mean, std)``) to
    ``folder/latents/``; a sample that cannot be read is skipped and counted. Returns the index section (see the module
    docstring) for :func:`write_embeddings`, which writes the index last."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from annealing.atomic_write import atomic_write

    target = Path(folder) / LATENTS_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    dataset = ImageCaptionDataset(samples, resolution, frames=frames, frame_stride=frame_stride)
    files, skipped = {}, {}
    for index in tqdm(range(len(dataset)), desc="encoding latents", unit="sample", disable=not progress):
        item = dataset[index]
        if "failed" in item:
            skipped[item["failed"]] = item["reason"]
            continue
        mean, std = encode(item["pixels"].unsqueeze(0))
        if tuple(mean.shape[1:]) != tuple(latent_shape):
            raise TrainingError(f"the VAE made latents of shape {tuple(mean.shape[1:])}, expected {tuple(latent_shape)}")
        key = sample_key(samples[index].image, root)
        name = f"{key}.safetensors"
        tensors = {"mean": mean[0].detach().to("cpu", dtype).contiguous(), "std": std[0].detach().to("cpu", dtype).contiguous()}
        atomic_write(target / name, lambda tmp, t=tensors: save_file(t, tmp))
        files[key] = name
    return {"resolution": resolution, "frames": frames or 1, "frame_stride": frame_stride, "latent_shape": list(latent_shape),
            "dtype": str(dtype).replace("torch.", ""), "files": files, "skipped": dict(list(skipped.items())[:1000]), "skipped_count": len(skipped)}
