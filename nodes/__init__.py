"""ComfyUI glue of the Annealing Guidance pack: one small module per node group, plus :mod:`.helpers` (pure logic).

Only ever imported relatively (``from .nodes import ...``): ComfyUI has a top-level module called ``nodes``.
This package's ``__init__`` imports nothing from ComfyUI, so :mod:`.helpers` is importable (and tested) without a host.
"""
