"""ComfyUI glue of the Annealing Guidance pack: one small module per node group (:mod:`.guider`, :mod:`.loader`,
:mod:`.plots`, :mod:`.tvcfg`, :mod:`.adg`), plus the host-free parts they share, each named by its job:
:mod:`.post_cfg` (ComfyUI's post-CFG contract, once for every guidance node), :mod:`.hook` (the annealing guide and the
bookkeeping of its runs), :mod:`.model_inspection` (what the loaded model is), :mod:`.compatibility` (whether a checkpoint
serves it), :mod:`.model_folder` and :mod:`.warn_once`. :mod:`.patching` attaches the hook to a ModelPatcher.

Only ever imported relatively (``from .nodes import ...``): ComfyUI has a top-level module called ``nodes``.
This package's ``__init__`` imports nothing from ComfyUI, so the host-free modules are tested without a host.
"""
