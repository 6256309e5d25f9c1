"""Every code block in the README runs as written, or says why the tests cannot run it.

Python and shell blocks run in a fresh folder holding the file the README tells users to create (the released checkpoint saved
as annealing_sdxl.pt; the blocks skip when the reference copy is absent). A block the tests cannot run (it clones, installs,
needs a user's own model) is preceded by ``<!-- not run by the tests: <reason> -->``; output samples are plain ``` blocks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from reference_data import REPO, UPSTREAM_MISSING, UPSTREAM_PT

README = REPO / "README.md"
BLOCK = re.compile(r"(?:<!-- not run by the tests: (?P<reason>[^>]*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<code>.*?)```", re.S)


def blocks():
    found = []
    for match in BLOCK.finditer(README.read_text(encoding="utf-8")):
        line = README.read_text(encoding="utf-8")[: match.start("code")].count("\n") + 1
        found.append((line, match["lang"], match["code"], match["reason"]))
    return found


RUNNABLE = [(line, lang, code) for line, lang, code, reason in blocks() if lang in ("python", "bash") and reason is None]


def test_every_code_block_runs_or_says_why_not():
    langs = {lang for _, lang, _, _ in blocks()}
    assert {"python", "bash"} <= langs
    for line, lang, _, reason in blocks():
        if reason is not None:
            assert len(reason.strip()) > 10, f"README line {line}: say why the tests cannot run this block"
        else:
            assert lang in ("python", "bash", "bibtex", ""), f"README line {line}: a {lang!r} block is neither run nor marked"
    assert RUNNABLE, "no README block is run"


def test_commands_the_tests_cannot_run_name_real_files_and_options():
    """A block the tests cannot run (it needs a user's model, or it is CI itself) still names files this repository has and
    only options its commands take: `python -m training ...` flags against the trainer's own parser."""
    from training.cli import train_parser

    options = {option for action in train_parser()._actions for option in action.option_strings}
    checked = 0
    for line, lang, code, reason in blocks():
        if reason is None or lang != "bash":
            continue
        for command in code.splitlines():
            command = command.split(" #")[0]
            for path in re.findall(r"(?:training/configs|scripts)/[\w.-]+|\.ci/run", command):
                assert (REPO / path).exists(), f"README line {line}: {path} does not exist"
                checked += 1
            tail = re.split(r"-m training(?=\s|$)", command, maxsplit=1)
            if len(tail) == 2 and not tail[1].lstrip().startswith(("embed", "plot")):
                for flag in re.findall(r"(?<!\S)(--[a-z0-9-]+)", tail[1]):
                    assert flag in options, f"README line {line}: python -m training has no {flag}"
                    checked += 1
    assert checked >= 10, "the unrun blocks were expected to name files and training options"


@pytest.mark.parametrize("line, lang, code", RUNNABLE, ids=[f"line{line}" for line, _, _ in RUNNABLE])
def test_readme_block_runs_as_written(tmp_path, line, lang, code):
    if UPSTREAM_PT is None:
        pytest.skip(f"the README's blocks use the released checkpoint; {UPSTREAM_MISSING}")
    os.symlink(UPSTREAM_PT, tmp_path / "annealing_sdxl.pt")
    bin_dir = Path(sys.executable).parent  # `python` in a block is this environment's, with the repository importable
    if not (bin_dir / "python").exists():
        pytest.skip(f"no `python` beside {sys.executable} to run the README's shell blocks with")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"README line {line} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
