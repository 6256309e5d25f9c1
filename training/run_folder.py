"""The output folder of a training run: which files a run owns, which belong to another run, and what a new run may do.

One run per folder. A run is known by its output name N (``--output-name``, default annealing_<family> or
learn_to_guide_<family>); its files are

    N.safetensors                           the final checkpoint
    checkpoints/N-step000250.safetensors    periodic checkpoints (the last ``keep_checkpoints`` are kept)
    resume.pt                               the resume state (records N)
    train_log.jsonl                         the step log (its first record names N)
    training_report.json                    the final report (names N)
    training_curves.png                     drawn from the log by ``python -m training plot``

The last four have fixed names, so they belong to whichever run the resume state, the report or the log names. A run
refuses a folder whose fixed-name files belong to another run, naming them, whatever the flags: nothing a run does
removes or overwrites another run's file. Files that are no run's (notes, another run's checkpoints beside ours) are
never touched. Every decision here is made before anything is written (:meth:`RunFolder.plan`), and carried out only
when training starts (:meth:`RunFolder.prepare`).
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import valid_file_stem
from .errors import TrainingError
from .files import NotARegularFile, open_regular, shown

RESUME_FILE = "resume.pt"
LOG_FILE = "train_log.jsonl"
REPORT_FILE = "training_report.json"
CURVES_FILE = "training_curves.png"
#: The files whose names do not say which run they belong to.
SHARED_FILES = (RESUME_FILE, LOG_FILE, REPORT_FILE, CURVES_FILE)
CHECKPOINT_FOLDER = "checkpoints"
WRITE_TEST_PREFIX = ".write-test-"
#: What is read of a report or of the log's first line to learn whose it is (ours: about 1 KB each).
MAX_OWNER_RECORD_BYTES = 256 * 1024
#: Files named in one refusal before "and N more".
SHOWN_FILES = 6


def default_output_name(method: str, family: str) -> str:
    """The checkpoint's file name without extension: annealing_<family> or learn_to_guide_<family>."""
    return f"{'learn_to_guide' if method == 'learn-to-guide' else 'annealing'}_{family}"


def is_output_name(name) -> bool:
    """An output name as ``--output-name`` allows it (a plain file name, see :func:`training.config.valid_file_stem`)."""
    return isinstance(name, str) and valid_file_stem(name)


def ensure_writable(folder: Path) -> None:
    """Check that ``folder`` is a writable folder, or can be created as one, without creating it (one-line error).

    The folder is only made once every check has passed, so a refused run leaves nothing behind."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TrainingError(f"{folder}: the output path exists and is not a folder")
    if folder.is_dir():
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=WRITE_TEST_PREFIX, delete=True):
                pass
        except OSError as exc:
            raise TrainingError(f"{folder}: output folder is not writable ({exc.strerror or exc})") from None
        return
    parent = folder.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise TrainingError(f"{folder}: cannot create the output folder, {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrainingError(f"{folder}: cannot create the output folder, {parent} is not writable")


@dataclass(frozen=True)
class FolderPlan:
    """What starting the run does to the folder: the files it removes (the earlier state of this same run) and the line
    that says so."""

    remove: tuple[Path, ...] = ()
    note: str | None = None


@dataclass(frozen=True)
class ResumeFile:
    """What the folder's resume state is, as read once by the run plan: the run it belongs to and its step, or why it
    cannot be used."""

    owner: str | None = None
    step: int | None = None
    problem: str | None = None


def _exists(path: Path) -> bool:
    return path.is_file() or path.is_symlink()


@dataclass(frozen=True)
class RunFolder:
    """The files of run ``name`` in folder ``path``."""

    path: Path
    name: str

    # ------------------------------------------------------------------------------------------------ names
    @property
    def resume_file(self) -> Path:
        return self.path / RESUME_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def report_file(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def final_checkpoint(self) -> Path:
        return self.checkpoint_of(self.name)

    def checkpoint_of(self, name: str) -> Path:
        return self.path / f"{name}.safetensors"

    def periodic_checkpoint(self, step: int) -> Path:
        return self.path / CHECKPOINT_FOLDER / f"{self.name}-step{step:06d}.safetensors"

    def periodic_checkpoints(self, name: str | None = None) -> list[Path]:
        """The periodic checkpoints of run ``name`` (default this one) that exist, oldest first."""
        prefix = f"{name or self.name}-step"
        steps = {}
        for path in (self.path / CHECKPOINT_FOLDER).glob(f"{glob.escape(prefix)}*.safetensors"):
            digits = path.name[len(prefix):-len(".safetensors")]
            if len(digits) >= 6 and digits.isascii() and digits.isdigit() and _exists(path):
                steps[path] = int(digits)
        return sorted(steps, key=steps.get)

    # ------------------------------------------------------------------------------------------------ ownership
    def files_of(self, name: str) -> list[Path]:
        """Run ``name``'s files that exist, when the fixed-name files are its: they, its final and its periodic checkpoints."""
        found = [self.path / fixed for fixed in SHARED_FILES] + [self.checkpoint_of(name)] + self.periodic_checkpoints(name)
        return [path for path in found if _exists(path)]

    def recorded_owners(self, resume: ResumeFile) -> dict[str, str]:
        """Fixed-name file -> the output name it records, for those that record one (an unreadable or older file records
        none; the curves are the log's)."""
        owners = {}
        if resume.owner is not None:
            owners[RESUME_FILE] = resume.owner
        report = self._read_record(self.report_file, whole=True)
        if isinstance(report, dict):
            name = report.get("output_name")
            if name is None and isinstance(report.get("checkpoint"), str) and report["checkpoint"].endswith(".safetensors"):
                name = Path(report["checkpoint"]).name.removesuffix(".safetensors")  # reports written before output_name
            if is_output_name(name):
                owners[REPORT_FILE] = name
        start = self._read_record(self.log_file, whole=False)
        if isinstance(start, dict) and is_output_name(start.get("output_name")):
            owners[LOG_FILE] = start["output_name"]
            if _exists(self.path / CURVES_FILE):
                owners[CURVES_FILE] = start["output_name"]
        return owners

    @staticmethod
    def _read_record(path: Path, whole: bool):
        """The JSON object of a report (``whole``) or of a log's first line; None when there is none to read."""
        try:
            with open_regular(path) as handle:
                data = handle.read(MAX_OWNER_RECORD_BYTES + 1)
        except (OSError, NotARegularFile, ValueError):
            return None
        if whole and len(data) > MAX_OWNER_RECORD_BYTES:
            return None
        text = data.decode("utf-8", errors="replace")
        try:
            return json.loads(text if whole else text.split("\n", 1)[0])
        except (ValueError, RecursionError):
            return None

    # ------------------------------------------------------------------------------------------------ the decision
    def plan(self, resume_file: ResumeFile, *, resume: bool, overwrite: bool) -> FolderPlan:
        """Decide what becomes of what the folder holds; nothing is changed here. Refused (one line): a folder whose
        fixed-name files belong to another run (always), and one with this run's resume state or final checkpoint unless
        ``resume`` continues it or ``overwrite`` starts again. The files of a run that left neither (it was killed before
        its first resume state was complete) are removed when training starts, and the run says so."""
        if not self.path.is_dir():
            return FolderPlan()
        owners = self.recorded_owners(resume_file)
        others = sorted(set(owners.values()) - {self.name})
        if others:
            theirs = sorted({p for other in others for p in self.files_of(other)})
            listed = ", ".join(str(p.relative_to(self.path)) for p in theirs[:SHOWN_FILES])
            more = f" and {len(theirs) - SHOWN_FILES} more" if len(theirs) > SHOWN_FILES else ""
            whose = " and ".join(shown(o) for o in others)
            raise TrainingError(
                f"{self.path} holds the files of another run ({whose}): {listed}{more}; nothing was changed. Write this run to "
                f"another --output folder, or pass --output-name {others[0]} to continue (--resume) or replace (--overwrite) that run"
            )
        if resume:
            return FolderPlan()
        held = [f"a resume state at step {resume_file.step}"] if resume_file.step is not None else []
        held += [self.final_checkpoint.name] if _exists(self.final_checkpoint) else []
        if held and not overwrite:
            raise TrainingError(f"{self.path} holds a training run ({', '.join(held)}); pass --resume to continue it or --overwrite to start again")
        remove = tuple(self.files_of(self.name))
        if not remove:
            return FolderPlan()
        if held:
            return FolderPlan(remove, f"--overwrite: removing the {len(remove)} file(s) of the earlier run in {self.path}")
        unusable = f" ({RESUME_FILE} is unusable: {resume_file.problem})" if resume_file.problem else ""
        return FolderPlan(remove, f"{self.path}: an earlier run left no resume state and no final checkpoint{unusable}; starting again "
                                  f"(removing its {len(remove)} file(s))")

    def stale_temp_files(self) -> list[Path]:
        """Temporary files a killed run of this name left (``atomic_write`` names them ``.<file>.<random>.tmp``)."""
        found = list(self.path.glob(f"{WRITE_TEST_PREFIX}*"))
        for fixed in SHARED_FILES:
            found += self.path.glob(f".{glob.escape(fixed)}.*.tmp")
        found += self.path.glob(f".{glob.escape(self.name)}.safetensors.*.tmp")
        found += (self.path / CHECKPOINT_FOLDER).glob(f".{glob.escape(self.name)}-step*.safetensors.*.tmp")
        return sorted(path for path in found if _exists(path))

    def prepare(self, plan: FolderPlan, say=print) -> None:
        """Create the folder (only now, so a run refused by any check leaves none), remove what :meth:`plan` chose and the
        temporary files a killed run left."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainingError(f"{self.path}: cannot create the output folder ({exc.strerror or exc})") from None
        if plan.note:
            say(plan.note)
        for path in plan.remove + tuple(self.stale_temp_files()):
            path.unlink(missing_ok=True)

    def prune_checkpoints(self, keep: int) -> None:
        """Keep the newest ``keep`` periodic checkpoints of this run."""
        found = self.periodic_checkpoints()
        for old in found[: max(0, len(found) - keep)] if keep > 0 else found:
            old.unlink(missing_ok=True)
