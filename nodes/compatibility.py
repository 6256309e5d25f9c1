"""Whether a guidance checkpoint can serve the loaded diffusion model: refused with one line where the pack cannot compute
what the checkpoint was trained on, warned once where it runs but w was trained for another model."""

from __future__ import annotations

from .model_inspection import HOST_PREDICTION, NATIVE_DELTA_SPACE, is_discrete_ddpm, model_family, noise_scale, sampling_kind
from .warn_once import warn_once


def compatibility_problems(metadata, kind: str, family: str | None, discrete_ddpm: bool, source: str = "the checkpoint",
                           host_noise_scale: float = 1.0):
    """(error, warnings) for using a checkpoint with ``metadata`` on a host model.

    error (a one-line string, or None): the checkpoint's timestep convention cannot be computed for this model, or the
    model's noise scale is not the 1 every checkpoint was trained with (its delta and noise levels would mean other things).
    warnings: trained for another model family or prediction space; it runs, but w was not trained for this model.
    """
    warnings = []
    if host_noise_scale != 1.0:
        return (f"the loaded model's sampling scales its noise by noise_scale {host_noise_scale:g} (x = sigma * {host_noise_scale:g} * "
                f"eps + ...); {source} was trained with noise scale 1, so its delta and noise levels do not apply"), warnings
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


def check_model(metadata, model_sampling, config_class_name: str | None, source: str = "the checkpoint") -> tuple[str, list[str]]:
    """(sampling kind, warnings) for serving a ComfyUI model: ValueError (one line) when the checkpoint cannot, each
    family/space mismatch warned once."""
    kind = sampling_kind(model_sampling)
    error, warnings = compatibility_problems(metadata, kind, model_family(config_class_name), is_discrete_ddpm(model_sampling),
                                             source=source, host_noise_scale=noise_scale(model_sampling))
    if error:
        raise ValueError(error)
    for message in warnings:
        warn_once(message)
    return kind, warnings
