"""What the loaded diffusion model is, read off ComfyUI's objects by duck typing (no ComfyUI import): its sampling kind
(how x, the noise and the x0-prediction relate), whether its schedule is DDPM's, its noise scale, and its family."""

from __future__ import annotations

import math

#: ComfyUI's model-config class names -> the checkpoint metadata's model_family names.
FAMILY_BY_CONFIG = {
    "SDXL": "sdxl", "SDXLRefiner": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl", "KOALA_700M": "sdxl", "KOALA_1B": "sdxl",
    "SDXL_instructpix2pix": "sdxl", "SD15": "sd15", "SD15_instructpix2pix": "sd15", "SD20": "sd2", "SD21UnclipL": "sd2",
    "SD21UnclipH": "sd2", "SD3": "sd3", "Flux": "flux", "FluxSchnell": "flux", "FluxInpaint": "flux",
}

#: ComfyUI sampling type -> what the model predicts (the names our training records as base_prediction_type).
HOST_PREDICTION = {"eps": "epsilon", "v_prediction": "v_prediction", "const": "flow"}
#: ComfyUI sampling type -> the delta space its predictions give without conversion (V-prediction x-space is EPS's).
NATIVE_DELTA_SPACE = {"eps": "epsilon", "v_prediction": "epsilon", "const": "velocity"}


def sampling_kind(model_sampling) -> str:
    """'eps', 'v_prediction' or 'const' from a ComfyUI model_sampling object (by its class hierarchy's names).

    EPS, V_PREDICTION and CONST are ComfyUI's mixins; X0, IMG_TO_IMG and EDM models share the x = x0 + sigma * eps x-space
    of EPS, and so does V_PREDICTION_DDPM (CogVideoX, ComfyUI 0.21: its noise enters as sigma * eps, its model reads raw x).
    IMG_TO_IMG_FLOW (ComfyUI 0.21, e.g. Wan FlowRVS) starts from an image instead of noise: refused, like every other type.
    """
    names = {cls.__name__ for cls in type(model_sampling).__mro__}
    if "IMG_TO_IMG_FLOW" in names:
        raise ValueError("model sampling IMG_TO_IMG_FLOW starts sampling from an image, not from noise; annealing guidance was "
                         "trained on noise-to-image sampling (need an EPS, V_PREDICTION or CONST model)")
    if "CONST" in names:
        return "const"
    if "V_PREDICTION" in names or "V_PREDICTION_DDPM" in names:
        return "v_prediction"
    if "EPS" in names:
        return "eps"
    raise ValueError(f"model sampling type {type(model_sampling).__name__} is not supported (need an EPS, V_PREDICTION or CONST model)")


def noise_scale(model_sampling) -> float:
    """The factor on the noise in the model's x-space (newer ComfyUI releases: x = sigma * s * eps + (1 - sigma) x0 for
    CONST); 1 where the model sampling has none."""
    value = getattr(model_sampling, "noise_scale", 1.0)
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # a tensor of several values, or something else entirely
        return math.nan


def model_family(config_class_name: str | None) -> str | None:
    """Our family name for a ComfyUI model-config class name (None when unknown)."""
    if not config_class_name:
        return None
    return FAMILY_BY_CONFIG.get(config_class_name, config_class_name.lower())


def is_discrete_ddpm(model_sampling) -> bool:
    """True for ComfyUI's discrete DDPM schedules (SD1.x, SDXL): their sigmas have DDPM timestep indices."""
    return any(cls.__name__ == "ModelSamplingDiscrete" for cls in type(model_sampling).__mro__) and hasattr(model_sampling, "log_sigmas")


def config_class_name(base_model) -> str | None:
    """The class name of a ComfyUI BaseModel's model_config (SDXL, SD3, ...), or None."""
    config = getattr(base_model, "model_config", None)
    return type(config).__name__ if config is not None else None
