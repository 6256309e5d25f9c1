"""Sharding a frozen network across processes with HF Accelerate's FSDP (``--fsdp``), for networks too large for one GPU.

Accelerate's FSDP2 preparation (``accelerate.utils.fsdp_utils.fsdp2_prepare_model``, PyTorch's ``fully_shard``) wraps
each of the family's transformer blocks (``FamilyBackend.block_classes``) and the root: every process holds 1/P of the
weights and gathers one block at a time for its forward (and, in pass 2, again for the backward to the latents). Only the
frozen network is sharded; the guidance MLP stays replicated under DDP as in every run, so checkpoints and resume states
are the same files with and without sharding. The network's parameters are frozen, so no gradient is reduced for them.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

from ..errors import TrainingError


def fsdp_plugin(block_classes):
    """Accelerate's FSDP settings for a frozen network: FSDP2, one unit per block, weights resharded after each forward."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          transformer_cls_names_to_wrap=list(block_classes), reshard_after_forward=True,
                                          cpu_ram_efficient_loading=False, state_dict_type="FULL_STATE_DICT")


def shard_network(backend, accelerator):
    """``backend.network`` sharded across the accelerator's processes (returns the sharded module; one-line errors)."""
    if accelerator.num_processes < 2:
        raise TrainingError("--fsdp shards the frozen network across processes, and this run has one; start it with "
                            "`accelerate launch --num_processes N -m training ...` or `torchrun --nproc_per_node N -m training ...`")
    if backend.network is None or not backend.block_classes:
        raise TrainingError(f"--fsdp: the {backend.info.family} family names no network blocks to shard")
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    # fsdp2_prepare_model reads these attributes of an Accelerator: handing it the frozen network alone, with its own
    # plugin, leaves the run's Accelerator (and the MLP's DDP) as it is.
    view = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=fsdp_plugin(backend.block_classes)), torch_device_mesh=None, mixed_precision="no",
                           is_main_process=accelerator.is_main_process, device=accelerator.device, parallelism_config=None)
    # the networks return views of their output (unpatchify); nothing here changes them in place, which is what the warning is about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return fsdp2_prepare_model(view, backend.network)
