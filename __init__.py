"""ComfyUI entry point of the Annealing Guidance node pack (ComfyUI loads this file from custom_nodes/).

The pack's own ``nodes`` package is imported relatively: ComfyUI has a top-level module called ``nodes`` too.
"""
