"""Writing a file so that a crash, a full disk or Ctrl-C never leaves half of it: a temporary file beside the target,
renamed into place. Serves checkpoints, the trainer's files and the plots."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import CheckpointError

#: errno values of a full disk or quota; the text forms are how torch's C++ writer and safetensors' Rust writer report them.
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_FULL_TEXT = ("no space left on device", "storagefull", "disk quota exceeded", "os error 28", "os error 122")
#: torch's zip writer on a short write ("unexpected pos 78272 vs 78160", "file write failed"): no errno is attached.
_WRITE_FAILED_TEXT = ("unexpected pos", "file write failed", "ioerror", "iostream error")
#: Free space below which a write failure without an errno is taken to be a full disk (measured while the failed
#: temporary file still holds what was written).
_NEARLY_FULL_BYTES = 2**20


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: flipping the process-wide umask per write would race with other threads


def _causes(exc: BaseException):
    seen = 0
    while exc is not None and seen < 8:  # the exception and what it was raised from or during
        yield exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1


def _write_failure(exc: BaseException, folder: Path) -> str | None:
    """The one-line reason if ``exc`` is a failure to write the file (full disk, I/O error), else None."""
    texts = []
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL_ERRNOS:
            return f"no space left on {folder}"
        texts.append(str(cause).lower())
    if any(marker in text for text in texts for marker in _DISK_FULL_TEXT):
        return f"no space left on {folder}"
    if isinstance(exc, OSError):
        return f"could not write the file: {exc.strerror or str(exc)[:200]}"
    if any(marker in texts[0] for marker in _WRITE_FAILED_TEXT):
        try:
            stats = os.statvfs(folder)
            if stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES:
                return f"no space left on {folder}"
        except (OSError, AttributeError):  # no statvfs on Windows
            pass
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"could not write the file: {first[:200]}"
    return None


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    A failed write removes the temporary file and leaves ``path`` as it was; a full disk or an I/O error is a
    one-line :class:`CheckpointError` ("no space left on <folder>"), whatever form the writer reported it in."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(path, f"the folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        reason = _write_failure(exc, folder) or f"cannot write to {folder}: {exc.strerror or exc}"
        raise CheckpointError(path, reason) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the result ordinary permissions
        os.replace(tmp, path)
    except BaseException as exc:
        reason = _write_failure(exc, folder) if isinstance(exc, Exception) else None  # before the unlink frees the space
        if os.path.exists(tmp):
            os.unlink(tmp)
        if reason is not None:
            raise CheckpointError(path, reason) from None
        raise
