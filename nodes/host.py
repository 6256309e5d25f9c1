"""What the pack needs to know about the host: the model folder, the loaded diffusion model's kind and family, and
whether a checkpoint can serve it. Never imports ComfyUI (tested without a host): it reads ComfyUI objects by duck typing.
"""

from __future__ import annotations

import logging
import os

LOG = logging.getLogger("annealing_guidance")

MODEL_FOLDER = "annealing_guidance"
MODEL_EXTENSIONS = frozenset({".safetensors", ".pt"})


# ------------------------------------------------------------------------------------------------------------ model folder


def register_model_folder(folder_names_and_paths: dict, models_dir: str, name: str = MODEL_FOLDER) -> str:
    """Register ``models/<name>`` with ComfyUI's folder table (created if missing) and accept .safetensors and .pt there.

    Paths a user already configured (extra_model_paths.yaml runs before custom nodes load) are kept, and stay first.
    Returns the default folder's path.
    """
    default = os.path.join(models_dir, name)
    os.makedirs(default, exist_ok=True)
    if name in folder_names_and_paths:
        paths, extensions = folder_names_and_paths[name]
        paths = list(paths)
        if default not in paths:
            paths.append(default)
        folder_names_and_paths[name] = (paths, set(extensions) | set(MODEL_EXTENSIONS))
    else:
        folder_names_and_paths[name] = ([default], set(MODEL_EXTENSIONS))
    return default


# ------------------------------------------------------------------------------------------------------ model inspection

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

    EPS, V_PREDICTION and CONST are ComfyUI's mixins; X0 and EDM models share the x = x0 + sigma * eps x-space of EPS.
    """
    names = {cls.__name__ for cls in type(model_sampling).__mro__}
    if "CONST" in names:
        return "const"
    if "V_PREDICTION" in names:
        return "v_prediction"
    if "EPS" in names:
        return "eps"
    raise ValueError(f"model sampling type {type(model_sampling).__name__} is not supported (need an EPS, V_PREDICTION or CONST model)")


def model_family(config_class_name: str | None) -> str | None:
    """Our family name for a ComfyUI model-config class name (None when unknown)."""
    if not config_class_name:
        return None
    return FAMILY_BY_CONFIG.get(config_class_name, config_class_name.lower())


def is_discrete_ddpm(model_sampling) -> bool:
    """True for ComfyUI's discrete DDPM schedules (SD1.x, SDXL): their sigmas have DDPM timestep indices."""
    return any(cls.__name__ == "ModelSamplingDiscrete" for cls in type(model_sampling).__mro__) and hasattr(model_sampling, "log_sigmas")


def compatibility_problems(metadata, kind: str, family: str | None, discrete_ddpm: bool, source: str = "the checkpoint"):
    """(error, warnings) for using a checkpoint with ``metadata`` on a host model.

    error (a one-line string, or None): the checkpoint's timestep convention cannot be computed for this model.
    warnings: trained for another model family or prediction space; it runs, but w was not trained for this model.
    """
    warnings = []
    convention = metadata.timestep_convention
    if convention == "ddpm_index" and (kind == "const" or not discrete_ddpm):
        return (f"{source} uses DDPM timesteps (trained on {metadata.model_family}, a discrete-time model) but the loaded model is a "
                f"{'flow (CONST)' if kind == 'const' else 'continuous-time'} model; use a checkpoint trained for it"), warnings
    if convention in ("sigma", "sigma_x1000") and kind != "const":
        return (f"{source} uses flow timesteps ({convention}, trained on {metadata.model_family}) but the loaded model is a "
                f"{kind.upper()} model; use a checkpoint trained for it"), warnings
    if family is not None and family != metadata.model_family:
        warnings.append(f"{source} was trained for {metadata.model_family} but the loaded model is {family}: w may be off-scale")
    # What the base model predicted, when the checkpoint says (our training records it); else the delta space it measures
    # (annealing only: a learn_to_guide network never reads delta, and its CFG scale is the same in every prediction space).
    host = HOST_PREDICTION[kind]
    trained = metadata.training.get("base_prediction_type") if isinstance(metadata.training, dict) else None
    if trained in HOST_PREDICTION.values():
        if trained != host:
            warnings.append(f"{source} was trained on a model predicting {trained} but the loaded model predicts {host}: w may be off-scale")
    elif getattr(metadata, "method", "annealing") == "annealing" and metadata.prediction_space != NATIVE_DELTA_SPACE[kind]:
        warnings.append(f"{source} measures delta in {metadata.prediction_space} space but the loaded model is a {host} model: "
                        f"delta is converted, w may be off-scale")
    return None, warnings


_WARNED: set[str] = set()


def warn_once(message: str) -> bool:
    """Log ``message`` once per process; True when it was logged now."""
    if message in _WARNED:
        return False
    _WARNED.add(message)
    LOG.warning("Annealing guidance: %s", message)
    return True
