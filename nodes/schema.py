"""The inputs the pack's nodes share, declared once: the annealing inputs of the Annealing Guider and Apply Annealing
Guidance (and the one place their values become :class:`annealing.AnnealingOptions`), the comparison nodes' scale, and
the one validate_inputs rule."""

from __future__ import annotations

from comfy_api.latest import io

from ..annealing import AnnealingOptions
from ..annealing.scale_rule import MODE_HELP, MODES

CATEGORY = "sampling/annealing_guidance"
ANNEALING_MODEL_TYPE = "ANNEALING_GUIDANCE_MODEL"
AnnealingGuidanceModel = io.Custom(ANNEALING_MODEL_TYPE)

#: The input id of lambda (saved workflows use it). A Python keyword: execute names every other input and takes this one
#: through ``**keyword_inputs`` (:func:`annealing_options`).
LAMBDA = "lambda"

MODE_TOOLTIP = "How the learned w (CFG++ units on the checkpoint's training grid) is applied. " + " ".join(
    f"{name}: {text}" for name, text in MODE_HELP.items()
) + (" A Learn to Guide checkpoint gives a CFG scale for the step from t to s. One trained on continuous (s, t) (the pack's "
     "trainer, the paper's way) takes s from the running sampler in anchored (the default) and per_step alike: the end of the "
     "sampler's step, sigma_down for ancestral samplers. An older one, trained on its grid's next point, takes s from that "
     "grid under anchored and from the sampler under per_step. as_is does not apply to Learn to Guide.")


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


def annealing_options(mode, normalize_delta_norm, clamp_w, w_min, w_max, active_start, active_end, fallback_cfg=None,
                      **keyword_inputs) -> AnnealingOptions:
    """The shared inputs' values as the core's options, which check them (a ValueError naming the setting). lambda arrives
    in ``keyword_inputs``, the one input a node's execute cannot name (a Python keyword); anything else there is an error.
    w_min and w_max only apply with clamp_w on."""
    unexpected = sorted(set(keyword_inputs) - {LAMBDA})
    if unexpected or LAMBDA not in keyword_inputs:
        raise TypeError(f"unexpected node inputs: {', '.join(unexpected)}" if unexpected else f"missing node input: {LAMBDA}")
    return AnnealingOptions(
        lam=float(keyword_inputs[LAMBDA]), mode=mode, normalize_delta_norm=bool(normalize_delta_norm),
        w_min=float(w_min) if clamp_w else None, w_max=float(w_max) if clamp_w else None,
        active_start=float(active_start), active_end=float(active_end), fallback_cfg=fallback_cfg,
    )


def refused_by(config, **values) -> bool | str:
    """For a node's validate_inputs: the core's own rule on these numeric inputs when the prompt is queued (ComfyUI
    skips its min/max check for the inputs a validate_inputs takes); linked values arrive at execution time and pass."""
    if all(isinstance(value, (int, float)) for value in values.values()):
        try:
            config(**{name: float(value) for name, value in values.items()})
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
