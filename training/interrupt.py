"""Ctrl-C in a long command: one line saying what was kept and how to go on, exit status 130, no traceback, and no
half-written file.

Four pieces, for any command (training, ``python -m training embed``, ``python -m training.toy``, the benchmarks, the
digits benchmark):

* :func:`exit_on_ctrl_c` wraps a command's work. A ``KeyboardInterrupt`` inside ends the process with the line
  ``interrupted: <what was kept>; <how to go on>`` on stderr and exit status 130 (what a shell reports for Ctrl-C).
  The line is the :class:`Interrupted` exception's own text when the work raised one, else the command's default::

      def main(argv=None) -> int:
          with exit_on_ctrl_c("nothing was written; run the same command again"):
              ...
          return 0

* :class:`Interrupted` is what work raises when it knows better than the default what it kept (a ``KeyboardInterrupt``
  subclass, so a caller that catches Ctrl-C still does): ``raise Interrupted("the resume state of step 40 is in runs/x;
  continue with the same command and --resume") from None``.
* :class:`StopRequest` lets a loop stop at its next safe point: inside ``with StopRequest() as stop:`` the first Ctrl-C
  only sets ``stop.requested`` (the loop finishes its step, saves, and raises :class:`Interrupted`); a second one
  raises ``KeyboardInterrupt`` at once.
* :func:`staged_folder` makes a folder of results all or nothing: the work writes into a hidden staging folder inside
  the output folder, and only a finished run moves its files into place (with Ctrl-C held off while it does). An
  interrupted or failed run removes the staging folder, and the output folder too when the run created it.

DataLoader workers get :func:`ignore_ctrl_c` as ``worker_init_fn``: the main process decides what Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

#: 128 + SIGINT: the status a shell gives a command that Ctrl-C ended.
EXIT_STATUS = 130
#: Prefix of staging folders (hidden; a killed run's are removed by the next one, see :func:`stale_staging`).
STAGING_PREFIX = ".partial-"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the line that says what was kept and how to go on. ``show`` is False on processes that should stay
    quiet (all but the main one of a multi-process run)."""

    def __init__(self, line: str, show: bool = True):
        super().__init__(" ".join(str(line).split()))
        self.line, self.show = str(self), show


@contextlib.contextmanager
def exit_on_ctrl_c(default_line: str) -> Iterator[None]:
    """Turn Ctrl-C inside the block into one line on stderr and ``SystemExit(130)`` (see the module docstring)."""
    try:
        yield
    except KeyboardInterrupt as exc:
        line, show = (exc.line, exc.show) if isinstance(exc, Interrupted) else (default_line, True)
        _close_progress_bars()
        if show:
            sys.stdout.flush()
            print(f"interrupted: {line}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STATUS) from None


def _close_progress_bars() -> None:
    """Finish the lines of the tqdm bars Ctrl-C left open, so the one line stands on its own line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


def _ctrl_c_is_ours() -> bool:
    """Only the main thread can set signal handlers, and a command started with Ctrl-C ignored (``nohup``, a background
    job of some shells) keeps ignoring it."""
    return threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler


class StopRequest:
    """Within the block the first Ctrl-C sets :attr:`requested` (and calls ``on_request``, e.g. to relabel a progress bar);
    the second raises ``KeyboardInterrupt`` unless ``hold`` (then every Ctrl-C only sets the flag). Outside the main
    thread, or where Ctrl-C is ignored, nothing changes."""

    def __init__(self, on_request=None, hold: bool = False):
        self.requested = False
        self.on_request, self.hold = on_request, hold
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested and not self.hold:
            raise KeyboardInterrupt
        first, self.requested = not self.requested, True
        if first and self.on_request is not None:
            self.on_request()

    def __enter__(self) -> StopRequest:
        if _ctrl_c_is_ours():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def ctrl_c_held() -> StopRequest:
    """``with ctrl_c_held():`` Ctrl-C does nothing until the block is done (a few renames that belong together)."""
    return StopRequest(hold=True)


def ignore_ctrl_c(worker_id: int | None = None) -> None:
    """``worker_init_fn`` for DataLoader workers: Ctrl-C reaches the whole process group, and a worker that dies of it
    would take the main process's orderly stop with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stale_staging(folder: Path) -> list[Path]:
    """Staging folders a killed run left in ``folder``."""
    folder = Path(folder)
    return sorted(p for p in folder.glob(f"{STAGING_PREFIX}*") if p.is_dir() and not p.is_symlink()) if folder.is_dir() else []


def is_empty_but_staging(folder: Path) -> bool:
    """``folder`` holds nothing but what killed runs left staged."""
    return all(p.name.startswith(STAGING_PREFIX) for p in Path(folder).iterdir())


@contextlib.contextmanager
def staged_folder(out: Path, created: bool | None = None, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a staging folder for the results of ``out``; on success move every file in it into ``out`` (replacing files of
    the same name; the names in ``last``, e.g. an index of the others, after the rest), on any failure or Ctrl-C remove
    it, and ``out`` as well when the run created it (``created``; by default: when ``out`` did not exist before)."""
    out = Path(out)
    created = not out.exists() if created is None else created
    out.mkdir(parents=True, exist_ok=True)
    for old in stale_staging(out):
        shutil.rmtree(old, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    with ctrl_c_held():  # the work is done: a Ctrl-C now must not leave half of it moved
        for path in sorted(staging.rglob("*"), key=lambda p: (p.name in last, p)):
            target = out / path.relative_to(staging)
            if path.is_dir():
                target.mkdir(exist_ok=True)
            else:
                os.replace(path, target)
        shutil.rmtree(staging)
