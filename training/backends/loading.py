"""Loading a pipeline folder's components, offline, with one-line errors (shared by the families' ``load``)."""

from __future__ import annotations

import contextlib
import os

import torch

from ..errors import TrainingError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # training never downloads; a missing file is an error, not a fetch

LOCAL = {"local_files_only": True}


def import_diffusers(*names: str):
    """diffusers (and transformers) or a one-line error; ``names`` are classes a family needs (newer diffusers releases)."""
    try:
        import diffusers
        import transformers  # noqa: F401
    except ImportError as exc:
        raise TrainingError(f"training needs the optional dependencies: pip install -e '.[train]' ({exc})") from None
    missing = [n for n in names if not hasattr(diffusers, n)]
    if missing:
        raise TrainingError(f"diffusers {diffusers.__version__} has no {', '.join(missing)}; this model family needs a newer diffusers "
                            "(pip install -U diffusers)")
    transformers.utils.logging.disable_progress_bar()  # per-component "Loading weights" bars would bury the training bar
    diffusers.utils.logging.disable_progress_bar()
    return diffusers


@contextlib.contextmanager
def load_errors(source):
    """Any loading failure as one line naming the model (the libraries' messages are long and multi-line)."""
    try:
        yield
    except TrainingError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"{source}: cannot load the model ({type(exc).__name__}: {first[:300]})") from None


def component_class(index, name: str):
    """The class ``model_index.json`` names for a component, from diffusers or transformers only (nothing else is imported)."""
    import diffusers
    import transformers

    entry = index.index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
        raise TrainingError(f"{index.folder}: model_index.json has no {name} component")
    library, class_name = entry
    module = {"diffusers": diffusers, "transformers": transformers}.get(library)
    cls = getattr(module, class_name, None) if module is not None and class_name.isidentifier() else None
    if not isinstance(cls, type):
        raise TrainingError(f"{index.folder}: the {name} component's class {library}.{class_name} is not a diffusers or transformers class")
    return cls


def load_model(folder, subfolder: str, cls, dtype: torch.dtype):
    """A model component from its subfolder: safetensors only (pickled .bin weights are never unpickled here)."""
    return cls.from_pretrained(str(folder), subfolder=subfolder, torch_dtype=dtype, use_safetensors=True, **LOCAL)


def load_tokenizer(folder, subfolder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), subfolder=subfolder, **LOCAL)


def load_single_file_network(cls, path, folder, subfolder: str, dtype: torch.dtype):
    """A network from a single .safetensors file (ComfyUI's diffusion_models/ files) with its config from the config folder."""
    if not hasattr(cls, "from_single_file"):
        raise TrainingError(f"{path}: diffusers cannot read a single-file {cls.__name__}; pass the diffusers pipeline folder as --model")
    return cls.from_single_file(str(path), config=str(folder), subfolder=subfolder, torch_dtype=dtype, **LOCAL)


def cast_like_from_pretrained(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(dtype)`` as ``from_pretrained(torch_dtype=dtype)`` casts it: the parameters of the modules the class keeps
    in float32 (``_keep_in_fp32_modules``: Wan's norms, time embedder and modulation tables) stay float32. For networks
    built from a config (the benchmarks) so that they run in the precision the trainer's loaded ones do."""
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    if all(t.dtype == dtype for t in module.parameters()):
        return module  # nothing to cast (and no warning from diffusers' to())
    module.to(dtype)
    if dtype != torch.float32 and keep:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if any(part in name.split(".") for part in keep) and tensor.is_floating_point():
                tensor.data = tensor.data.to(torch.float32)
    return module


def to_device(modules, device) -> None:
    for module in modules:
        if isinstance(module, torch.nn.Module):
            module.to(device)


def load_components(info, options, network_subfolder: str = "transformer", text_parts=(("tokenizer", "text_encoder"),)):
    """(network, vae, text, scheduler) of a pipeline folder, each from the class its model_index.json names, as far as the
    options ask: the network in ``options.dtype`` (from ``info.source`` when that is a single file), the VAE in
    ``options.vae_dtype``, the text encoders in ``options.dtype``; everything moved to ``options.device``."""
    from .interface import PipelineIndex

    folder, dtype = info.config_folder, options.dtype
    index = PipelineIndex(folder, info.source, info.single_file)
    network = vae = text = None
    with load_errors(info.source):
        if options.load_network:
            cls = component_class(index, network_subfolder)
            if info.single_file:
                network = load_single_file_network(cls, info.source, folder, network_subfolder, dtype)
            else:
                network = load_model(folder, network_subfolder, cls, dtype)
        if options.load_vae:
            vae = load_model(folder, "vae", component_class(index, "vae"), options.vae_dtype)
        scheduler = component_class(index, "scheduler").from_pretrained(str(folder), subfolder="scheduler", **LOCAL)
        if options.load_text_encoders:
            text = {}
            for tok, enc in text_parts:
                text[tok] = load_tokenizer(folder, tok)
                text[enc] = load_model(folder, enc, component_class(index, enc), dtype)
    to_device((network, vae, *(text or {}).values()), options.device)
    if options.gradient_checkpointing and network is not None:
        network.enable_gradient_checkpointing()  # diffusers' default: non-reentrant, gradients still reach the input
    return network, vae, text, scheduler
