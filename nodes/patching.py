"""How the annealing hook is attached to a ComfyUI model: a clone with ComfyUI's list hooks (the post-CFG function and
two sampling wrappers), nothing else."""

from __future__ import annotations

import comfy.patcher_extension

from .hook import HOOKS_KEY, AnnealingHook, hook_functions
from .model_inspection import config_class_name
from .post_cfg import clone_with_post_cfg

WRAPPER_KEY = "annealing_guidance"
WRAPPER_TYPES = (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE)


def patch_model(model, hook: AnnealingHook):
    """A clone of ``model`` with the hook as a post-CFG function and two sampling wrappers."""
    post_cfg, outer_sample, sampler_sample, reference = hook_functions(hook)
    patched = clone_with_post_cfg(model, post_cfg)
    for wrapper_type, wrapper in zip(WRAPPER_TYPES, (outer_sample, sampler_sample)):
        patched.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, wrapper)
    transformer_options = patched.model_options.setdefault("transformer_options", {})  # the clone owns a deep copy
    transformer_options[HOOKS_KEY] = list(transformer_options.get(HOOKS_KEY, [])) + [reference]
    return patched


def check_model(hook: AnnealingHook, model) -> None:
    """Fail now (shown on the node) when the checkpoint cannot work with this model; warn once on a family/space mismatch."""
    hook.check_model(model.get_model_object("model_sampling"), config_class_name(model.model))
