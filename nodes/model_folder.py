"""The pack's model folder, ``models/annealing_guidance``, in ComfyUI's folder table (no ComfyUI import: the table is
passed in)."""

from __future__ import annotations

import os

MODEL_FOLDER = "annealing_guidance"
MODEL_EXTENSIONS = frozenset({".safetensors", ".pt"})


def register_model_folder(folder_names_and_paths: dict, models_dir: str, name: str = MODEL_FOLDER) -> str:
    """Register ``models/<name>`` with ComfyUI's folder table (created if missing) and accept .safetensors and .pt there.

    Paths a user already configured (extra_model_paths.yaml runs before custom nodes load) are kept, and stay first.
    Returns the default folder's path.
    """
    default = os.path.join(models_dir, name)
    os.makedirs(default, exist_ok=True)
    if name in folder_names_and_paths:
        paths, extensions = folder_names_and_paths[name]
        paths = list(paths)
        if default not in paths:
            paths.append(default)
        folder_names_and_paths[name] = (paths, set(extensions) | set(MODEL_EXTENSIONS))
    else:
        folder_names_and_paths[name] = ([default], set(MODEL_EXTENSIONS))
    return default
