"""Where the tests find the released SDXL checkpoint and the golden outputs (tests needing either skip, saying why, without it).

The released checkpoint (upstream's src/model/checkpoints/checkpoint.pt) is taken from the first of these that holds it:

1. ``$ANNEALING_SDXL_CHECKPOINT``: a path to the file, under any name;
2. ``$ANNEALING_REFERENCE_DIR/annealing_sdxl_upstream.pt`` (default ``../shared/reference/`` beside the repository);
3. ``$COMFYUI_PATH/models/annealing_guidance/annealing_sdxl.pt``: where the README tells users to save it.

A candidate counts only if it is that file, byte for byte (its SHA-256), so a fine-tune or a converted copy under the same
name is reported, not tested as if it were the release. The golden outputs (``upstream_w_golden.json``) come from the
reference folder only: they are ours, not something a user downloads.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RELEASED_SHA256 = "f55006de3180651251dd86d0a81b7bfae88f45e6beed241355b0fdcc63626af1"  # upstream checkpoint.pt, 630081 bytes
RELEASED_SIZE = 630081
CHECKPOINT_ENV = "ANNEALING_SDXL_CHECKPOINT"


def reference_dir(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get("ANNEALING_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


def golden_json(environ: Mapping[str, str] = os.environ) -> Path:
    return reference_dir(environ) / "upstream_w_golden.json"


def checkpoint_candidates(environ: Mapping[str, str] = os.environ) -> list[tuple[str, Path]]:
    """(how it was named, path) in the order they are tried."""
    found = []
    if environ.get(CHECKPOINT_ENV):
        found.append((f"${CHECKPOINT_ENV}", Path(environ[CHECKPOINT_ENV]).expanduser()))
    found.append(("the reference folder", reference_dir(environ) / "annealing_sdxl_upstream.pt"))
    if environ.get("COMFYUI_PATH"):
        found.append(("$COMFYUI_PATH's models folder", Path(environ["COMFYUI_PATH"]).expanduser() / "models" / "annealing_guidance" / "annealing_sdxl.pt"))
    return found


def why_not_released(path: Path) -> str | None:
    """None if ``path`` is the released checkpoint, else what it is instead (one phrase)."""
    if not path.is_file():
        return "not found"
    size = path.stat().st_size
    if size != RELEASED_SIZE:
        return f"{size} bytes, not the released checkpoint's {RELEASED_SIZE}"
    with path.open("rb") as stream:
        digest = hashlib.sha256(stream.read(RELEASED_SIZE + 1)).hexdigest()
    return None if digest == RELEASED_SHA256 else f"not the released checkpoint (SHA-256 {digest[:12]}..., expected {RELEASED_SHA256[:12]}...)"


def find_released_checkpoint(environ: Mapping[str, str] = os.environ) -> tuple[Path | None, str]:
    """(the path, "") of the first candidate that is the released checkpoint, or (None, why each was rejected)."""
    rejected = []
    for label, path in checkpoint_candidates(environ):
        reason = why_not_released(path)
        if reason is None:
            return path, ""
        rejected.append(f"{path} ({label}): {reason}")
    return None, ("the released SDXL checkpoint was not found: " + "; ".join(rejected)
                  + f". Save it as ComfyUI/models/annealing_guidance/annealing_sdxl.pt and set COMFYUI_PATH, or set {CHECKPOINT_ENV}")


UPSTREAM_PT, UPSTREAM_MISSING = find_released_checkpoint()
GOLDEN_JSON = golden_json()
