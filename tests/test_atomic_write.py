"""annealing.atomic_write on a full disk: one line that says so, whatever form the writer reported it in,
and the previous file untouched with no temporary file left behind."""

from __future__ import annotations

import errno
import io
import os

import pytest
import torch

from annealing.atomic_write import atomic_write
from annealing.errors import CheckpointError


def _write_then(error: BaseException):
    def write(tmp):
        with open(tmp, "wb") as handle:
            handle.write(b"part of a file")
        raise error

    return write


def _assert_untouched(tmp_path, target):
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"old")
    return path


def test_an_enospc_oserror_says_no_space_left(tmp_path, target):
    with pytest.raises(CheckpointError) as info:
        atomic_write(target, _write_then(OSError(errno.ENOSPC, "No space left on device")))
    assert str(info.value) == f"{target}: no space left on {tmp_path}"
    _assert_untouched(tmp_path, target)


class _FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes and then fails as a full disk does."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)


def test_torch_save_onto_a_full_disk_says_no_space_left(tmp_path, target):
    """torch.save itself reports the short write as 'unexpected pos ...' (a RuntimeError), the OSError only as context."""

    def write(tmp):
        with open(tmp, "wb") as handle:
            torch.save({"w": torch.zeros(10000)}, _FullDisk(handle, 5000))

    with pytest.raises(CheckpointError) as info:
        atomic_write(target, write)
    assert str(info.value) == f"{target}: no space left on {tmp_path}"
    assert isinstance(info.value.__context__, RuntimeError) and "unexpected pos" in str(info.value.__context__)
    _assert_untouched(tmp_path, target)


def test_torch_runtime_error_without_errno_on_a_full_disk(tmp_path, target, monkeypatch):
    """torch.save to a path reports a full disk only as a RuntimeError; the free space of the folder tells."""
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 78272 vs 78160")
    full = os.statvfs_result((4096, 4096, 1000, 0, 0, 1000, 0, 0, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda folder: full)
    with pytest.raises(CheckpointError) as info:
        atomic_write(target, _write_then(error))
    assert str(info.value) == f"{target}: no space left on {tmp_path}"
    _assert_untouched(tmp_path, target)

    # with space left the same error is a write failure, still one line, without the C++ source location's newline
    roomy = os.statvfs_result((4096, 4096, 10**6, 10**6, 10**6, 1000, 0, 0, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda folder: roomy)
    with pytest.raises(CheckpointError, match=r"could not write the file: \[enforce fail .* unexpected pos 78272 vs 78160$"):
        atomic_write(target, _write_then(error))
    _assert_untouched(tmp_path, target)


def test_rust_style_storage_full_text_says_no_space_left(tmp_path, target):
    """safetensors raises its own exception type with the io::Error's debug text."""

    class SafetensorError(Exception):
        pass

    text = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    with pytest.raises(CheckpointError, match=f"no space left on {tmp_path}$"):
        atomic_write(target, _write_then(SafetensorError(text)))
    _assert_untouched(tmp_path, target)


def test_other_errors_are_not_disguised(tmp_path, target):
    with pytest.raises(CheckpointError, match="could not write the file: Permission denied"):
        atomic_write(target, _write_then(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(TypeError, match="a bug in the writer"):  # a programming error stays a traceback
        atomic_write(target, _write_then(TypeError("a bug in the writer")))
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, _write_then(KeyboardInterrupt()))
    _assert_untouched(tmp_path, target)
