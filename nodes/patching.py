"""How the pack attaches guidance to a ComfyUI model: a clone with ComfyUI's list hooks, nothing else."""

from __future__ import annotations

import comfy.patcher_extension

from .hook import HOOKS_KEY, AnnealingHook, hook_functions
from .host import warn_once

WRAPPER_KEY = "annealing_guidance"


def clone_with_post_cfg(model, post_cfg):
    """A clone of ``model`` with ``post_cfg`` appended to its post-CFG functions, keeping the uncond pass at cfg 1.

    Never the single sampler_cfg_function slot: other packs' post-CFG functions keep running, in the order applied.
    """
    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=True)
    return patched


def patch_model(model, hook: AnnealingHook):
    """A clone of ``model`` with the hook as a post-CFG function and two sampling wrappers."""
    post_cfg, outer_sample, sampler_sample, reference = hook_functions(hook)
    patched = clone_with_post_cfg(model, post_cfg)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, sampler_sample)
    transformer_options = patched.model_options.setdefault("transformer_options", {})  # the clone owns a deep copy
    transformer_options[HOOKS_KEY] = list(transformer_options.get(HOOKS_KEY, [])) + [reference]
    return patched


def attach_guidance(model, name: str, guide):
    """A clone of ``model`` whose post-CFG function replaces the CFG result by ``guide(d_cond, d_uncond, args)``.

    ``guide`` gets the x0-predictions in float32 (fp16/bf16 models) and ComfyUI's post-CFG ``args``; its result is cast
    back to the predictions' dtype. Without an uncond pass (a guider with no negative, or a patch that dropped it) the
    CFG result passes through. Post-CFG functions applied after this one see its result; earlier ones are replaced.
    ``guide`` must be a plain function (clones deep-copy model_options; a function is kept, a bound method's object is not).
    """

    def post_cfg(args):
        d_cond, d_uncond = args.get("cond_denoised"), args.get("uncond_denoised")
        if d_cond is None or d_uncond is None or args.get("uncond") is None:  # a skipped uncond arrives as zeros
            warn_once(f"{name}: no unconditional prediction reached it (no negative, or another patch removed it): it is off")
            return args["denoised"]
        if args.get("model_options", {}).get("sampler_cfg_function") is not None:
            warn_once(f"{name}: another node set a sampler_cfg_function (e.g. RescaleCFG, PerpNeg): {name} replaces its result")
        return guide(d_cond.float(), d_uncond.float(), args).to(d_cond.dtype)

    return clone_with_post_cfg(model, post_cfg)


def nominal_scale(scale: float, args: dict) -> float:
    """A node's scale input: itself when > 0, else the sampler's cfg (KSampler's, or the guider's) from ``args``."""
    return float(scale) if scale > 0 else float(args.get("cond_scale", 1.0))


def check_model(hook: AnnealingHook, model) -> None:
    """Fail now (shown on the node) when the checkpoint cannot work with this model; warn once on a family/space mismatch."""
    config = getattr(model.model, "model_config", None)
    hook.check_model(model.get_model_object("model_sampling"), type(config).__name__ if config is not None else None)
