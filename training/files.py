"""Reading input files from strangers (configs, manifests, captions, images) without hanging or reading without limit.

Only regular files are read: a FIFO, socket or device in a dataset would block ``open()`` or never end. The file is
opened with ``O_NONBLOCK`` (so opening a FIFO returns at once; the flag changes nothing for regular files) and its
type is checked on the open descriptor, so a file swapped after a check cannot slip through.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import TrainingError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


class NotARegularFile(ValueError):
    """The path exists but is a FIFO, socket, device or folder."""


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file (symlinks followed); raises OSError or NotARegularFile."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise NotARegularFile(f"not a regular file ({kind})")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; anything else is a one-line TrainingError naming ``what``."""
    try:
        with open_regular(path) as handle:
            data = handle.read(limit + 1)
    except NotARegularFile as exc:
        raise TrainingError(f"{path}: the {what} is {exc}") from None
    except OSError as exc:
        raise TrainingError(f"{path}: cannot read the {what} ({exc.strerror or type(exc).__name__})") from None
    if len(data) > limit:
        raise TrainingError(f"{path}: the {what} is larger than {format_size(limit)}")
    return data


def decode_utf8(data: bytes, path: str | os.PathLike, what: str, line: int | None = None) -> str:
    """UTF-8 text of ``data`` (a leading byte-order mark is dropped), or a TrainingError naming the byte offset."""
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"{path}:{line}" if line is not None else str(path)
        offset = start + exc.start
        at = f"at offset {offset} of the line" if line is not None else f"at offset {offset}"
        raise TrainingError(f"{where}: the {what} is not UTF-8 text (invalid byte 0x{data[offset]:02x} {at})") from None


def read_text(path: str | os.PathLike, limit: int, what: str) -> str:
    return decode_utf8(read_bounded(path, limit, what), path, what)


def format_size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size} bytes"


def clipped(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters for a message (a path or caption from a stranger may be long)."""
    return text if len(text) <= limit else text[:limit] + "..."


def shown(value, limit: int = 60) -> str:
    """A short, one-line rendering of a value for an error message: never the whole of a huge string or number."""
    if isinstance(value, str):
        text = repr(value[:limit])
        return text + "..." if len(value) > limit else text
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**24 else f"an integer of about {int(abs(value).bit_length() * 0.30103) + 1} digits"
    if isinstance(value, Path):
        return shown(str(value), limit)
    return f"a {type(value).__name__}"
