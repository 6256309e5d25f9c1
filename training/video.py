"""Decoding training clips with PyAV (FFmpeg's libraries; no torchvision), bounded like the images.

A clip is read as ``frames`` frames, every ``stride``-th from the first, each center-cropped to a square and resized to
the resolution (bicubic, as the images), scaled to [-1, 1]: (3, frames, R, R). Clips come from strangers, so before any
frame is decoded the container must be one of the known formats for its extension (FFmpeg never probes for another
demuxer: no playlist or concat demuxer that would open other files), have a video stream whose frames pass the image
size bounds, and be at most ``MAX_CLIP_SECONDS`` long; decoding stops once the frames are there, after at most
``MAX_PACKETS_PER_FRAME`` packets per frame needed, and every decoded frame is checked again (a stream may change size).
Any failure raises, and the dataset turns it into a skipped, counted clip.
"""

from __future__ import annotations

import math

import torch

from .files import open_regular

#: Container formats (FFmpeg demuxer names) by extension: a file is only ever opened with its extension's demuxer.
VIDEO_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "matroska", ".avi": "avi"}
VIDEO_EXTENSIONS = tuple(VIDEO_FORMATS)
#: Longest clip (from the container's header): a training clip is seconds long; an hour is not one.
MAX_CLIP_SECONDS = 3600.0
#: Packets read per frame needed (plus a slack) before a clip counts as broken (a stream of packets that decode to nothing).
MAX_PACKETS_PER_FRAME = 16
_PACKET_SLACK = 64
#: Frames x pixels of one decoded clip (the float32 tensor is 12 bytes per pixel): 121 frames at 2100^2, 81 at 2560^2.
MAX_CLIP_PIXELS = 2**29


class ClipError(ValueError):
    """A clip that cannot be used (the dataset skips and counts it)."""


def _import_av():
    try:
        import av
    except ImportError:
        raise ClipError("reading video clips needs PyAV: pip install av (or pip install -e '.[train]')") from None
    return av


def square_resize(image, resolution: int):
    """The centered square of a PIL image, resized to resolution x resolution (bicubic): crop then resize, as images are."""
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((resolution, resolution), Image.BICUBIC, box=(left, top, left + side, top + side))


def load_clip(path, resolution: int, frames: int, stride: int = 1) -> torch.Tensor:
    """(3, frames, R, R) float32 in [-1, 1]: ``frames`` frames, every ``stride``-th from the first; raises ClipError (or
    FFmpeg's errors) for a clip that cannot be used."""
    if frames * resolution * resolution > MAX_CLIP_PIXELS:
        raise ClipError(f"{frames} frames at {resolution} px is more than {MAX_CLIP_PIXELS:,} pixels per clip")
    av = _import_av()
    suffix = str(path)[str(path).rfind("."):].lower()
    if suffix not in VIDEO_FORMATS:
        raise ClipError(f"not a clip extension ({', '.join(VIDEO_EXTENSIONS)})")
    needed = (frames - 1) * stride + 1
    try:
        kept, index = _decode(av, path, VIDEO_FORMATS[suffix], resolution, frames, stride, needed)
    except av.error.FFmpegError as exc:
        raise ClipError(f"not a readable {VIDEO_FORMATS[suffix]} clip ({exc.strerror or type(exc).__name__})") from None
    if len(kept) < frames:
        raise ClipError(f"has {index} frames; {frames} frames every {stride} need {needed}")
    return torch.stack(kept).permute(3, 0, 1, 2).to(torch.float32) / 127.5 - 1.0


def _decode(av, path, format_name: str, resolution: int, frames: int, stride: int, needed: int):
    """(the kept frames as (R, R, 3) uint8 tensors, how many frames were decoded)."""
    from .data import check_image_size

    kept = []
    with open_regular(path) as raw, av.open(raw, mode="r", format=format_name) as container:
        if not container.streams.video:
            raise ClipError("no video stream")
        stream = container.streams.video[0]
        check_image_size(stream.codec_context.width, stream.codec_context.height)
        seconds = _duration(container, stream)
        if seconds is not None and seconds > MAX_CLIP_SECONDS:
            raise ClipError(f"{seconds:.0f} s is longer than {MAX_CLIP_SECONDS:.0f} s")
        index = packets = 0
        for packet in container.demux(stream):
            packets += 1
            if packets > MAX_PACKETS_PER_FRAME * needed + _PACKET_SLACK:
                raise ClipError(f"no {needed} frames in {packets - 1} packets")
            for frame in packet.decode():
                check_image_size(frame.width, frame.height)
                if index % stride == 0:
                    image = square_resize(frame.to_image(), resolution)  # RGB, 8 bits
                    kept.append(torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3))
                index += 1
                if len(kept) == frames:
                    break
            if len(kept) == frames:
                break
    return kept, index


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1_000_000
    else:
        return None
    return seconds if math.isfinite(seconds) else None
