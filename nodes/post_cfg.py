"""ComfyUI's post-CFG contract, written once for every guidance method of the pack (annealing, TV-CFG, ADG).

A post-CFG function (``sampler_post_cfg_function``) gets ComfyUI's ``args`` after each CFG combine and returns the
x0-prediction the sampler uses. Here that is ``guide(d_cond, d_uncond, args)``, computed in float32 from
``cond_denoised`` / ``uncond_denoised`` and cast back to the predictions' dtype (fp16 clamped to its finite range).
Without an uncond pass (a guider with no negative, or a patch that dropped it: ComfyUI then hands zeros as
``uncond_denoised`` and None as ``uncond``) the CFG result passes through. Post-CFG functions applied after one of these
see its result; earlier ones, and a ``sampler_cfg_function`` another node set, are replaced (said once).

Never imports ComfyUI (tested without a host): a model is only asked for ``clone()`` and
``set_model_sampler_post_cfg_function``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .warn_once import warn_once

FP16_MAX = torch.finfo(torch.float16).max


def guided_prediction(name: str, guide: Callable, args: dict) -> torch.Tensor:
    """One post-CFG call: ``guide(d_cond, d_uncond, args)`` (float32 in, float32 out) in the predictions' dtype."""
    d_cond, d_uncond = args.get("cond_denoised"), args.get("uncond_denoised")
    if d_cond is None or d_uncond is None or args.get("uncond") is None:  # a skipped uncond arrives as zeros
        warn_once(f"{name}: no unconditional prediction reached it (no negative, or another patch removed it): it passes the CFG "
                  "result through")
        return args["denoised"]
    if args.get("model_options", {}).get("sampler_cfg_function") is not None:
        warn_once(f"{name}: another node set a sampler_cfg_function (e.g. RescaleCFG, PerpNeg): {name} replaces its result")
    dtype = d_cond.dtype
    if dtype == torch.float32 and d_uncond.dtype == torch.float32:  # the common case dispatches no cast (this runs every step)
        return guide(d_cond, d_uncond, args)
    guided = guide(d_cond.float(), d_uncond.float(), args)
    if dtype == torch.float16:  # keep an fp16 model's result finite
        guided = guided.clamp(-FP16_MAX, FP16_MAX)
    return guided.to(dtype)


def post_cfg_function(name: str, guide: Callable) -> Callable[[dict], torch.Tensor]:
    """The post-CFG function ComfyUI calls, as a plain function: ComfyUI 0.3.x clones deep-copy model_options (a plain
    function is kept as is, a bound method's object would be copied), 0.21 copies only its dicts and lists; either way
    every clone calls this one function and so the one ``guide``."""

    def post_cfg(args):
        return guided_prediction(name, guide, args)

    return post_cfg


def clone_with_post_cfg(model, post_cfg):
    """A clone of ``model`` with ``post_cfg`` appended to its post-CFG functions, keeping the uncond pass at cfg 1.

    Never the single sampler_cfg_function slot: other packs' post-CFG functions keep running, in the order applied.
    """
    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=True)
    return patched


def attach_guidance(model, name: str, guide: Callable):
    """A clone of ``model`` whose post-CFG function replaces the CFG result by ``guide(d_cond, d_uncond, args)``."""
    return clone_with_post_cfg(model, post_cfg_function(name, guide))


def nominal_scale(scale: float, args: dict) -> float:
    """A node's scale input: itself when > 0, else the sampler's cfg (KSampler's, or the guider's) from ``args``."""
    return float(scale) if scale > 0 else float(args.get("cond_scale", 1.0))
