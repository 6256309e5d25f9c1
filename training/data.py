"""Training data: image folders with captions, JSONL manifests, image loading, and precomputed text embeddings.

Dataset layouts
* A folder of images, each with a same-named caption file (``cat.jpg`` + ``cat.txt``), searched recursively, so
  img2dataset output (``00000/000000001.jpg`` + ``.txt``) works as is.
* A ``.jsonl`` manifest, one JSON object per line: ``{"image": "path/relative/to/manifest.jpg", "caption": "..."}``
  (``file_name``/``path`` and ``text`` are accepted as aliases).

Images are resized so the short side equals the resolution (bicubic), center-cropped to a square and scaled to [-1, 1].
An image that cannot be decoded is skipped and counted, never fatal; a missing caption is an error unless skipping
is asked for.

Precomputed embeddings (``python -m training embed``) live in a folder:
* ``index.json``: {"format": "annealing-training-embeddings", "version": 1, "model_family", "base_model",
  "has_pooled", "dtype", "shards": [file names], "captions": {sha1(caption): [shard, row]}}
* ``shard-00000.safetensors`` ...: ``embeds`` (n, L, D) and, for SDXL/SD3, ``pooled`` (n, P), one row per distinct caption;
* ``uncond.safetensors``: the empty prompt's ``embeds`` (1, L, D) and ``pooled`` (1, P).
Rows are looked up by the caption's SHA-1, so the same embeddings serve any dataset with the same captions.
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

from .config import TrainingError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EMBEDDINGS_FORMAT = "annealing-training-embeddings"


@dataclass(frozen=True)
class Sample:
    image: Path
    caption: str


@dataclass
class DatasetScan:
    samples: list[Sample]
    missing_captions: list[Path]


def caption_key(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------------------ scanning


def scan_folder(root: Path, caption_extension: str = ".txt", skip_missing_captions: bool = False) -> DatasetScan:
    """Images under ``root`` (recursive, sorted) with their same-named caption files."""
    samples, missing = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        caption_path = path.with_suffix(caption_extension)
        if not caption_path.is_file():
            if not skip_missing_captions:
                raise TrainingError(f"{path}: no caption file {caption_path.name} (pass --skip-missing-captions to skip such images)")
            missing.append(path)
            continue
        try:
            caption = caption_path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise TrainingError(f"{caption_path}: cannot read the caption ({exc})") from None
        samples.append(Sample(path, caption))
    return DatasetScan(samples, missing)


def read_manifest(manifest: Path, skip_missing_captions: bool = False) -> DatasetScan:
    """Samples of a JSONL manifest; image paths are relative to the manifest's folder unless absolute."""
    samples, missing = [], []
    base = manifest.parent
    with open(manifest, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TrainingError(f"{manifest}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise TrainingError(f"{manifest}:{number}: expected a JSON object with image and caption")
            image = next((row[k] for k in ("image", "file_name", "path") if k in row), None)
            if not isinstance(image, str) or not image:
                raise TrainingError(f"{manifest}:{number}: missing the image path (key 'image')")
            path = Path(image) if os.path.isabs(image) else base / image
            caption = next((row[k] for k in ("caption", "text") if k in row), None)
            if caption is None or not isinstance(caption, str):
                if not skip_missing_captions:
                    raise TrainingError(f"{manifest}:{number}: missing caption for {image} (pass --skip-missing-captions to skip such rows)")
                missing.append(path)
                continue
            samples.append(Sample(path, caption.strip()))
    return DatasetScan(samples, missing)


def scan_dataset(dataset: str | Path, caption_extension: str = ".txt", skip_missing_captions: bool = False) -> DatasetScan:
    """Find the samples of a folder or manifest; an empty dataset is an error."""
    path = Path(dataset)
    if path.is_dir():
        scan = scan_folder(path, caption_extension, skip_missing_captions)
        kind = f"no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) with captions"
    elif path.is_file():
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


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """(3, R, R) float32 in [-1, 1]: short side resized to R (bicubic), center crop. Raises on undecodable files."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as handle:
            handle.load()  # decode fully here so a truncated file fails now
            image = handle.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return data.permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Items are dicts: ``pixels`` (3, R, R), ``caption``, ``index``, and ``embeds``/``pooled`` with an embedding store;
    an image that cannot be read gives ``{"failed": path, "reason": ..., "index": i}`` instead of raising."""

    def __init__(self, samples: list[Sample], resolution: int, embeddings: EmbeddingStore | None = None):
        self.samples, self.resolution, self.embeddings = samples, resolution, embeddings

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        try:
            pixels = load_image(sample.image, self.resolution)
        except Exception as exc:  # PIL raises many types for bad files; any of them means "skip this image"
            return {"failed": str(sample.image), "reason": f"{type(exc).__name__}: {exc}"[:200], "index": index}
        item = {"pixels": pixels, "caption": sample.caption, "index": index}
        if self.embeddings is not None:
            item.update(self.embeddings.lookup(sample.caption))
        return item


def collate(items: list[dict]) -> dict:
    """Stack the readable items; ``failed`` lists the paths that could not be read (``pixels`` is None if none could)."""
    good = [item for item in items if "failed" not in item]
    batch = {"failed": [item["failed"] for item in items if "failed" in item], "captions": [item["caption"] for item in good]}
    batch["pixels"] = torch.stack([item["pixels"] for item in good]) if good else None
    for key in ("embeds", "pooled"):
        if good and key in good[0]:
            batch[key] = torch.stack([item[key] for item in good])
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
        if not index_path.is_file():
            raise TrainingError(f"{self.folder}: not an embeddings folder (no index.json); write one with `python -m training embed`")
        try:
            self.index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainingError(f"{index_path}: cannot read the index ({exc})") from None
        if not isinstance(self.index, dict) or self.index.get("format") != EMBEDDINGS_FORMAT:
            raise TrainingError(f"{index_path}: not an embeddings index (format is not {EMBEDDINGS_FORMAT!r})")
        for shard in self.index["shards"] + ["uncond.safetensors"]:
            if not (self.folder / shard).is_file():
                raise TrainingError(f"{self.folder / shard}: embeddings shard missing")
        self._handles: dict[int, object] = {}

    @property
    def model_family(self) -> str:
        return self.index["model_family"]

    @property
    def has_pooled(self) -> bool:
        return bool(self.index["has_pooled"])

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
        return out

    def uncond(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        data = load_file(str(self.folder / "uncond.safetensors"))
        return {k: v.to(torch.float32) for k, v in data.items()}

    def __getstate__(self):  # DataLoader workers get a fresh copy without open handles
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def write_embeddings(folder: Path, captions: list[str], encode, uncond: dict[str, torch.Tensor], *, model_family: str, base_model: str,
                     dtype: torch.dtype = torch.float16, shard_size: int = 512, batch_size: int = 8, progress: bool = True) -> dict:
    """Encode each distinct caption with ``encode(list[str]) -> {"embeds": (B,L,D), "pooled": (B,P) or absent}`` and write
    the folder. Every file is written to a temporary name and renamed; ``index.json`` comes last, so an interrupted run
    leaves no index that points at missing shards."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from annealing.checkpoint import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    distinct = sorted(set(captions))
    table: dict[str, list[int]] = {}
    shards: list[str] = []
    has_pooled = "pooled" in uncond
    bar = tqdm(total=len(distinct), desc="embedding captions", unit="caption", disable=not progress)
    for shard_index in range(math.ceil(len(distinct) / shard_size)):
        chunk = distinct[shard_index * shard_size : (shard_index + 1) * shard_size]
        parts: dict[str, list[torch.Tensor]] = {"embeds": [], "pooled": []}
        for start in range(0, len(chunk), batch_size):
            encoded = encode(chunk[start : start + batch_size])
            for key in parts:
                if key in encoded:
                    parts[key].append(encoded[key].detach().to("cpu", dtype))
            bar.update(len(chunk[start : start + batch_size]))
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items() if v}
        name = f"shard-{shard_index:05d}.safetensors"
        atomic_write(folder / name, lambda tmp, t=tensors: save_file(t, tmp))
        shards.append(name)
        for row, caption in enumerate(chunk):
            table[caption_key(caption)] = [shard_index, row]
    bar.close()
    uncond_cpu = {k: v.detach().to("cpu", dtype).contiguous() for k, v in uncond.items()}
    atomic_write(folder / "uncond.safetensors", lambda tmp: save_file(uncond_cpu, tmp))
    index = {
        "format": EMBEDDINGS_FORMAT,
        "version": 1,
        "model_family": model_family,
        "base_model": base_model,
        "has_pooled": has_pooled,
        "dtype": str(dtype).replace("torch.", ""),
        "count": len(distinct),
        "shards": shards,
        "captions": table,
    }
    payload = json.dumps(index, indent=1, sort_keys=True)
    atomic_write(folder / "index.json", lambda tmp: Path(tmp).write_text(payload, encoding="utf-8"))
    return index
