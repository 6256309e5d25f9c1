"""ComfyUI glue of the Annealing Guidance pack: one small module per node group, plus the host-free parts they share
(:mod:`.host`: the model folder and what the loaded model is; :mod:`.hook`: the hook and its run bookkeeping).

Only ever imported relatively (``from .nodes import ...``): ComfyUI has a top-level module called ``nodes``.
This package's ``__init__`` imports nothing from ComfyUI, so :mod:`.host` and :mod:`.hook` are tested without a host.
"""
