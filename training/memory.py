"""Does a training step fit the device without gradient checkpointing? An estimate, made once after loading.

Checkpointing costs two extra forwards per image (pass 2's two branches are recomputed in the backward), so it is only
worth turning on when pass 2's stored activations do not fit. Pass 2 is the only pass that keeps activations (pass 1 runs
under ``no_grad``), so the step needs, beyond the weights already loaded:

    need = saved + 2 x working

* saved:   the bytes pass 2's forward keeps for the backward, counted exactly by running that forward once (batch 2B,
           the real latent shape) with a saved-tensor hook that counts each tensor and drops it at once, so the count
           costs no more memory than a forward without a graph;
* working: the transient memory of that forward beyond the weights (CUDA: the allocator's peak; Linux CPU: the peak
           resident set), counted once for the forward and once for the backward, which frees and allocates alike.

The device's free memory is CUDA's free memory plus what torch's cache holds unused, or MemAvailable on the CPU
divided among the processes of this machine. Checkpointing is turned on when need exceeds ``FILL`` of it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

#: Fraction of the free memory a step may plan to use (the rest absorbs fragmentation and what the estimate misses).
FILL = 0.9


@dataclass
class StepMemory:
    saved: int  # bytes pass 2 keeps for the backward
    working: int  # transient bytes of one forward
    weights: int  # bytes of the frozen modules' parameters and buffers on the device
    free: int | None  # bytes free for this process, None if unknown

    @property
    def need(self) -> int:
        return self.saved + 2 * self.working

    @property
    def fits(self) -> bool:
        return self.free is None or self.need <= FILL * self.free


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of a DTensor (a network sharded with --fsdp), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def module_bytes(modules) -> int:
    """Bytes of the modules' parameters and buffers held by this process (each storage once; a sharded network's shards)."""
    seen, total = set(), 0
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor = _local(tensor)
            ptr = tensor.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += tensor.untyped_storage().nbytes()
    return total


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def free_bytes(device: torch.device, local_processes: int = 1) -> int | None:
    """Memory this process may still use: CUDA free + torch's unused cache, or the host's MemAvailable / local processes."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    available = _meminfo_available()
    return None if available is None else available // max(1, local_processes)


def process_memory_bytes(field: str) -> int | None:
    """A field of /proc/self/status (VmRSS, VmHWM, ...) in bytes, or None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        return True
    except OSError:
        return False


def count_saved_bytes(run, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` builds its graph, without keeping any of them.

    A storage is recognised as already counted while its tensor (or the tensor it is a view of) is alive; once that is
    gone its address may be reused by a new tensor, which is then counted afresh."""
    counted: dict[int, weakref.ref] = {}
    total = 0

    def pack(tensor):
        nonlocal total
        owner = tensor._base if tensor._base is not None else tensor
        if isinstance(owner, torch.nn.Parameter):  # a weight (with --fsdp, one gathered for this block): not an activation
            return None
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in exclude or storage.nbytes() == 0:
            return None
        known = counted.get(ptr)
        if known is None or known() is None:
            counted[ptr] = weakref.ref(owner)
            total += storage.nbytes()
        return None  # dropped: the probe's graph is never run backward

    def unpack(_):
        raise RuntimeError("the memory probe's graph cannot be run backward")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        run()
    return total


def estimate_step_memory(backend, grid, latent_shape, batch_size: int, cond, local_processes: int = 1) -> StepMemory:
    """Run pass 2's forward once (batch 2B at ``latent_shape``, with a graph) and measure what it would keep."""
    device = backend.device
    network = backend.network
    exclude = {_local(t).untyped_storage().data_ptr() for t in [*network.parameters(), *network.buffers()]}
    weights = module_bytes([network, backend.vae, *(backend.text or {}).values()])
    free = free_bytes(device, local_processes)
    z = torch.zeros(batch_size, *latent_shape, device=device, requires_grad=True)
    t = grid.model_timesteps[len(grid) // 2].reshape(1).expand(batch_size)

    def run():
        backend.predict_pair(z, t, cond, cond)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        saved = count_saved_bytes(run, exclude)
        torch.cuda.synchronize(device)
        working = max(0, torch.cuda.max_memory_allocated(device) - base)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before = process_memory_bytes("VmRSS") if _reset_peak_rss() else None
        saved = count_saved_bytes(run, exclude)
        peak = process_memory_bytes("VmHWM") if before is not None else None
        working = max(0, peak - before) if peak is not None else saved // 4  # no peak reading: a guess, said in the docs
    return StepMemory(saved=saved, working=working, weights=weights, free=free)


def decide(config_value: bool | None, estimate: StepMemory | None, device: torch.device) -> tuple[bool, str]:
    """(checkpointing on?, the one log line that says why)."""
    if config_value is not None:
        return config_value, f"gradient checkpointing {'on' if config_value else 'off'} (set in the config)"
    if estimate is None:
        return True, "gradient checkpointing on (auto): pass 2's forward did not fit in memory even once"
    where = "GPU" if device.type == "cuda" else "host"
    free = "unknown" if estimate.free is None else gib(estimate.free)
    detail = (f"a step needs about {gib(estimate.need)} ({gib(estimate.saved)} of activations kept for the backward + 2 x "
              f"{gib(estimate.working)} working memory) of {free} free on the {where}; frozen weights {gib(estimate.weights)}")
    if estimate.fits:
        return False, f"gradient checkpointing off (auto): {detail}"
    return True, f"gradient checkpointing on (auto, +2 forwards per image): {detail}"
