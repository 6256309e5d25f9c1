"""The inputs the Annealing Guider and Apply Annealing Guidance share, declared once, and the one place that turns a
node's input values into :class:`annealing.AnnealingOptions`."""

from __future__ import annotations

from comfy_api.latest import io

from ..annealing import AnnealingOptions
from ..annealing.scale_rule import MODE_HELP, MODES

CATEGORY = "sampling/annealing_guidance"
ANNEALING_MODEL_TYPE = "ANNEALING_GUIDANCE_MODEL"
AnnealingGuidanceModel = io.Custom(ANNEALING_MODEL_TYPE)

#: The input id of lambda ("lambda" is a Python keyword: it reaches execute through **settings).
LAMBDA = "lambda"

MODE_TOOLTIP = "How the learned w (CFG++ units on the checkpoint's training grid) is applied. " + " ".join(
    f"{name}: {text}" for name, text in MODE_HELP.items()
) + (" A learn_to_guide checkpoint gives a CFG scale for a step from t to s: anchored takes s from its training grid, per_step "
     "from the running sampler; as_is does not apply to it.")


def annealing_inputs(fallback_source: str) -> list:
    """The shared inputs (after the node's model/conditioning inputs). ``fallback_source`` names where the plain CFG scale
    outside the active range comes from, for the tooltips."""
    return [
        AnnealingGuidanceModel.Input(
            "annealing_model", tooltip="The guidance network from Load Annealing Guidance Model: an annealing MLP, or a Learn to "
            "Guide network (it reads the prompt's embedding from the positive conditioning: the pooled output, or the mean token "
            "embedding, as it was trained)."),
        io.Float.Input(
            LAMBDA, default=0.4, min=0.0, max=1.0, step=0.01,
            tooltip="Trade-off the MLP was trained for: higher follows the prompt more, lower keeps image quality. 0.4 is the paper's "
            "default. Annealing checkpoints only: a learn_to_guide checkpoint reads the prompt instead.",
        ),
        io.Combo.Input("mode", options=list(MODES), default="anchored", tooltip=MODE_TOOLTIP),
        io.Boolean.Input(
            "normalize_delta_norm", default=True,
            tooltip="Scale ||delta|| by sqrt(trained latent size / this latent size) so other resolutions give the MLP in-range inputs. "
            "At the training resolution it changes nothing.",
        ),
        io.Boolean.Input("clamp_w", default=False, tooltip="Clamp the MLP's w to [w_min, w_max] (CFG++ units)."),
        io.Float.Input("w_min", default=0.0, min=-10.0, max=50.0, step=0.01, tooltip="Lower clamp of w when clamp_w is on (CFG++ units)."),
        io.Float.Input("w_max", default=3.0, min=-10.0, max=50.0, step=0.01, tooltip="Upper clamp of w when clamp_w is on (CFG++ units)."),
        io.Float.Input(
            "active_start", default=0.0, min=0.0, max=1.0, step=0.01,
            tooltip=f"Fraction of the schedule where annealing starts (0 = first step). Before it: plain CFG at {fallback_source}.",
        ),
        io.Float.Input(
            "active_end", default=1.0, min=0.0, max=1.0, step=0.01,
            tooltip=f"Fraction of the schedule where annealing ends (1 = last step); must exceed active_start. After it: plain CFG at {fallback_source}.",
        ),
    ]


def annealing_options(settings: dict, fallback_cfg: float | None = None) -> AnnealingOptions:
    """AnnealingOptions from the shared inputs' values (a ValueError naming the setting for a bad combination)."""
    clamp = bool(settings["clamp_w"])
    return AnnealingOptions(
        lam=float(settings[LAMBDA]), mode=settings["mode"], normalize_delta_norm=bool(settings["normalize_delta_norm"]),
        w_min=float(settings["w_min"]) if clamp else None, w_max=float(settings["w_max"]) if clamp else None,
        active_start=float(settings["active_start"]), active_end=float(settings["active_end"]), fallback_cfg=fallback_cfg,
    )


def validate_active_range(active_start, active_end) -> bool | str:
    """For a node's validate_inputs: an inverted or empty active range is refused before the prompt runs."""
    if isinstance(active_start, (int, float)) and isinstance(active_end, (int, float)):  # linked values arrive at execution time
        try:  # the core's rule (ComfyUI skips its own min/max check for inputs a validate_inputs takes)
            AnnealingOptions(active_start=float(active_start), active_end=float(active_end))
        except ValueError as exc:
            return str(exc)
    return True

#: The other guidance methods the pack offers for comparison (TV-CFG, ADG).
OTHER_GUIDANCE_CATEGORY = CATEGORY + "/other_guidance"


def sampler_scale_input(default: float, what: str) -> io.Float.Input:
    """The ``scale`` input of the comparison nodes: 0 takes the sampler's cfg at run time, any other value overrides it."""
    return io.Float.Input(
        "scale", default=default, min=0.0, max=100.0, step=0.1, round=0.01,
        tooltip=f"{what} 0 = use the sampler's cfg (KSampler's cfg, or the guider's cfg) at run time; any other value overrides "
        "it, and the sampler's cfg is then unused. Ordinary CFG units: 1 = no guidance.",
    )
