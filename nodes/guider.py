"""Annealing Guider (GUIDER for SamplerCustomAdvanced) and Apply Annealing Guidance (MODEL patch for KSampler)."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..annealing import AnnealingOptions
from .hook import AnnealingHook
from .patching import check_model, patch_model
from .schema import CATEGORY, annealing_inputs, annealing_options, refused_by


class AnnealingCFGGuider(comfy.samplers.CFGGuider):
    """ComfyUI's CFGGuider on a patched model: CFG at ``fallback_cfg``, replaced by the annealing hook's guided prediction.

    Going through CFGGuider keeps every other pack's pre/post-CFG functions and wrappers working.
    """

    def __init__(self, model_patcher, hook):
        super().__init__(model_patcher)
        self.annealing_hook = hook


class AnnealingGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AnnealingGuider",
            display_name="Annealing Guider",
            category=CATEGORY,
            description="Classifier-free guidance whose scale a learned MLP anneals at every step (Yehezkel et al. 2025). "
            "Use with SamplerCustomAdvanced and any sampler and step count.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (EPS, V-prediction or flow). Cloned, never changed."),
                io.Conditioning.Input("positive", tooltip="The prompt's conditioning."),
                io.Conditioning.Input("negative", tooltip="The unconditional / negative conditioning (the MLP was trained with an empty prompt)."),
                *annealing_inputs("fallback_cfg"),
                io.Float.Input(
                    "fallback_cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                    tooltip="Plain CFG scale used outside the active range (ordinary CFG units). Unused when the range is 0..1.",
                ),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, active_start, active_end):
        return refused_by(AnnealingOptions, active_start=active_start, active_end=active_end)

    @classmethod
    def execute(cls, model, positive, negative, annealing_model, mode, normalize_delta_norm, clamp_w, w_min, w_max, active_start,
                active_end, fallback_cfg, **keyword_inputs) -> io.NodeOutput:
        options = annealing_options(mode, normalize_delta_norm, clamp_w, w_min, w_max, active_start, active_end, fallback_cfg,
                                    **keyword_inputs)
        hook = AnnealingHook(annealing_model, options)
        check_model(hook, model)
        guider = AnnealingCFGGuider(patch_model(model, hook), hook)
        guider.set_conds(positive, negative)
        guider.set_cfg(fallback_cfg)
        return io.NodeOutput(guider)


class ApplyAnnealingGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyAnnealingGuidance",
            display_name="Apply Annealing Guidance",
            category=CATEGORY,
            description="Patches a model so the plain KSampler uses annealing guidance (a post-CFG function; composes with other packs). "
            "KSampler's cfg only matters outside the active range. Apply it before other guidance patches: post-CFG functions "
            "added after it see its result.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The diffusion model (EPS, V-prediction or flow). It is cloned, never changed. KSampler's cfg then only "
                    "matters outside the active range (plain CFG there); inside it, the MLP's w replaces it.",
                ),
                *annealing_inputs("KSampler's cfg"),
            ],
            outputs=[io.Model.Output(tooltip="The patched model, for KSampler (its cfg is only used outside the active range).")],
        )

    @classmethod
    def validate_inputs(cls, active_start, active_end):
        return refused_by(AnnealingOptions, active_start=active_start, active_end=active_end)

    @classmethod
    def execute(cls, model, annealing_model, mode, normalize_delta_norm, clamp_w, w_min, w_max, active_start, active_end,
                **keyword_inputs) -> io.NodeOutput:
        options = annealing_options(mode, normalize_delta_norm, clamp_w, w_min, w_max, active_start, active_end,
                                    **keyword_inputs)  # fallback_cfg None: the sampler's own cfg
        hook = AnnealingHook(annealing_model, options)
        check_model(hook, model)
        return io.NodeOutput(patch_model(model, hook))
