"""ComfyUI entry point of the Annealing Guidance node pack (ComfyUI loads this file from custom_nodes/).

The pack's own ``nodes`` package is imported relatively: ComfyUI has a top-level module called ``nodes`` too.
Inside ComfyUI, importing this registers the ``annealing_guidance`` model folder and exposes :func:`comfy_entrypoint`
(the V3 node API). Outside ComfyUI (pytest imports the repository root as a package) it does nothing.
"""

from importlib.util import find_spec

if find_spec("folder_paths") is not None and find_spec("comfy_api") is not None:  # running inside ComfyUI
    from .nodes.extension import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
