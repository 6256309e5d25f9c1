"""How the annealing hook is attached to a ComfyUI model: a clone with ComfyUI's list hooks (the post-CFG function and
two sampling wrappers), nothing else.

What a clone carries, by release: ModelPatcher.clone() copies the wrappers' lists, and model_options with
copy.deepcopy (0.3.x) or as copies of its dicts and lists only (0.21); the hook's functions are plain functions, which
both keep as they are (:func:`.hook.hook_functions`). So a clone downstream of the patch shares the hook (the plot node
finds its runs), a new patch gets a new hook, and the lists a patch appends to belong to its own clone.
"""

from __future__ import annotations

import comfy.patcher_extension

from .hook import HOOKS_KEY, AnnealingHook, hook_functions
from .model_inspection import config_class_name
from .post_cfg import clone_with_post_cfg

WRAPPER_KEY = "annealing_guidance"
WRAPPER_TYPES = (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE)


def patch_model(model, hook: AnnealingHook):
    """A clone of ``model`` with the hook as a post-CFG function and two sampling wrappers.

    An annealing hook the model already carries (Apply Annealing Guidance twice, or the Annealing Guider on a patched
    model) is replaced, not stacked: its result would be overwritten at every step, and its plot would show guidance
    that was never applied.
    """
    post_cfg, outer_sample, sampler_sample = hook_functions(hook)[:3]
    patched = clone_with_post_cfg(model, post_cfg)
    options = patched.model_options
    options["sampler_post_cfg_function"] = [function for function in options["sampler_post_cfg_function"]
                                            if function is post_cfg or not hasattr(function, "annealing_hook")]
    for wrapper_type, wrapper in zip(WRAPPER_TYPES, (outer_sample, sampler_sample)):
        patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
        patched.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, wrapper)
    # setdefault: the clone owns its copies of model_options' dicts (both releases); the list is new, never appended to
    options.setdefault("transformer_options", {})[HOOKS_KEY] = [post_cfg.annealing_hook]
    return patched


def check_model(hook: AnnealingHook, model) -> None:
    """Fail now (shown on the node) when the checkpoint cannot work with this model; warn once on a family/space mismatch."""
    hook.check_model(model.get_model_object("model_sampling"), config_class_name(model.model))
