"""ComfyUI glue shared by the nodes: the custom socket type, the shared inputs, and how a hook is attached to a model."""

from __future__ import annotations

import comfy.patcher_extension
from comfy_api.latest import io

from .helpers import HOOKS_KEY, RENOISE_AUTO, RENOISE_MODES, RENOISE_TOOLTIP, AnnealingHook, hook_functions

CATEGORY = "sampling/annealing_guidance"
ANNEALING_MODEL_TYPE = "ANNEALING_GUIDANCE_MODEL"
AnnealingGuidanceModel = io.Custom(ANNEALING_MODEL_TYPE)
WRAPPER_KEY = "annealing_guidance"


def annealing_inputs() -> list:
    """The inputs the guider and the model patch share (after their model/conditioning inputs)."""
    return [
        AnnealingGuidanceModel.Input("annealing_model", tooltip="The guidance-scale MLP, from Load Annealing Guidance Model."),
        io.Float.Input(
            "lam", display_name="lambda", default=0.4, min=0.0, max=1.0, step=0.01,
            tooltip="Trade-off the MLP was trained for: higher follows the prompt more, lower keeps image quality. 0.4 is the paper's default.",
        ),
        io.Combo.Input("renoise", options=list(RENOISE_MODES), default=RENOISE_AUTO, tooltip=RENOISE_TOOLTIP),
        io.Boolean.Input(
            "normalize_delta_norm", default=True,
            tooltip="Scale ||delta|| by sqrt(trained latent size / this latent size) so other resolutions give the MLP in-range inputs. "
            "Off reproduces the upstream sampler exactly (at the training resolution both are the same).",
        ),
        io.Boolean.Input("clamp_w", default=False, tooltip="Clamp the MLP's w to [w_min, w_max] (CFG++ units)."),
        io.Float.Input("w_min", default=0.0, min=-10.0, max=50.0, step=0.01, tooltip="Lower clamp of w when clamp_w is on (CFG++ units)."),
        io.Float.Input("w_max", default=3.0, min=-10.0, max=50.0, step=0.01, tooltip="Upper clamp of w when clamp_w is on (CFG++ units)."),
        io.Float.Input(
            "active_start", default=0.0, min=0.0, max=1.0, step=0.01,
            tooltip="Fraction of the schedule where annealing starts (0 = first step). Before it: plain CFG at the fallback scale "
            "(the guider's fallback_cfg; KSampler's cfg for Apply Annealing Guidance).",
        ),
        io.Float.Input(
            "active_end", default=1.0, min=0.0, max=1.0, step=0.01,
            tooltip="Fraction of the schedule where annealing ends (1 = last step). After it: plain CFG at the fallback scale "
            "(the guider's fallback_cfg; KSampler's cfg for Apply Annealing Guidance).",
        ),
    ]


def make_hook(annealing_model, lam, renoise, normalize_delta_norm, clamp_w, w_min, w_max, active_start, active_end) -> AnnealingHook:
    return AnnealingHook(
        annealing_model, lam=lam, normalize_delta_norm=normalize_delta_norm, w_min=w_min if clamp_w else None,
        w_max=w_max if clamp_w else None, active_start=active_start, active_end=active_end, renoise=renoise,
    )


def check_model(hook: AnnealingHook, model) -> None:
    """Fail now (shown on the node) when the checkpoint cannot work with this model; warn once on a family/space mismatch."""
    config = getattr(model.model, "model_config", None)
    hook.check_model(model.get_model_object("model_sampling"), type(config).__name__ if config is not None else None)


def patch_model(model, hook: AnnealingHook):
    """A clone of ``model`` with the hook in ComfyUI's list hooks (post-CFG function and two sampling wrappers).

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
