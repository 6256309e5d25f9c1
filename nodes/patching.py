"""How the pack attaches a guidance hook to a ComfyUI model: a clone with ComfyUI's list hooks, nothing else."""

from __future__ import annotations

import comfy.patcher_extension

from .hook import HOOKS_KEY, AnnealingHook, hook_functions

WRAPPER_KEY = "annealing_guidance"


def patch_model(model, hook: AnnealingHook):
    """A clone of ``model`` with the hook as a post-CFG function and two sampling wrappers.

    Never takes the single sampler_cfg_function slot; keeps the uncond pass at cfg 1 (disables the cfg1 optimisation).
    """
    patched = model.clone()
    post_cfg, outer_sample, sampler_sample, reference = hook_functions(hook)
    patched.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=True)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, sampler_sample)
    transformer_options = patched.model_options.setdefault("transformer_options", {})  # the clone owns a deep copy
    transformer_options[HOOKS_KEY] = list(transformer_options.get(HOOKS_KEY, [])) + [reference]
    return patched


def check_model(hook: AnnealingHook, model) -> None:
    """Fail now (shown on the node) when the checkpoint cannot work with this model; warn once on a family/space mismatch."""
    config = getattr(model.model, "model_config", None)
    hook.check_model(model.get_model_object("model_sampling"), type(config).__name__ if config is not None else None)
