"""Hostile and broken checkpoint files, built from scratch for the tests (no binary fixtures), and a child process that
loads files and reports each one's outcome, time and peak memory.

The builders write the formats by hand (zip records, pickle opcodes, safetensors headers, deflate bits) so a file can say
exactly the lie a test needs. They depend on torch only, so the real-ComfyUI tests can use them with the pack's own copy
of the ``annealing`` package.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

SMALL_ARCH = {"hidden_size": 8, "n_layers": 1}  # Linear(12, 8), ReLU, Linear(8, 8), ReLU, Linear(8, 1)


def small_shapes(arch=None) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape, written here from the architecture rule (in, hidden x (n_layers + 1), 1)."""
    arch = dict(SMALL_ARCH, **(arch or {}))
    dims = [12] + [arch["hidden_size"]] * (arch["n_layers"] + 1) + [1]
    shapes = {}
    for i in range(len(dims) - 1):
        shapes[f"combined_head.{2 * i}.weight"] = (dims[i + 1], dims[i])
        shapes[f"combined_head.{2 * i}.bias"] = (dims[i + 1],)
    return shapes


def small_state(seed: int = 0, arch=None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=generator) * 0.1 for k, shape in small_shapes(arch).items()}


# ------------------------------------------------------------------------------------------------------------------- zips


def write_zip(path: Path, entries: list[dict], comment: bytes = b"") -> None:
    """A zip written field by field. Each entry: name, data (the bytes stored), and optionally method (0 stored, 8 deflate),
    size (the uncompressed size the directory claims; default len(data)), crc, offset (point the directory at another
    entry's bytes: the offset of an entry written earlier, by index)."""
    out = bytearray()
    central = bytearray()
    offsets = []
    for entry in entries:
        name = entry["name"].encode()
        data = entry["data"]
        method = entry.get("method", 0)
        size = entry.get("size", len(data))
        crc = entry.get("crc", zlib.crc32(data) if method == 0 else 0)
        if "same_bytes_as" in entry:
            offset = offsets[entry["same_bytes_as"]]
        else:
            offset = len(out)
            out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(data), size, len(name), 0) + name + data
        offsets.append(offset)
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc, len(data), size, len(name), 0, 0, 0, 0, 0,
                               offset) + name
    cd_offset = len(out)
    out += central
    out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), cd_offset, len(comment)) + comment
    Path(path).write_bytes(bytes(out))


class StorageRef:
    """Stands for storage ``key`` of a torch zip: pickled as torch's persistent id ('storage', type, key, 'cpu', numel)."""

    def __init__(self, key: str, numel: int, kind: str = "FloatStorage"):
        self.key, self.numel, self.kind = key, numel, kind


class TensorRef:
    """A tensor as torch pickles it: _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)."""

    def __init__(self, storage: StorageRef, size, stride=None, offset: int = 0):
        size = tuple(size)
        if stride is None:
            stride = tuple(int(torch.tensor(size[i + 1:]).prod()) for i in range(len(size)))
        self.storage, self.size, self.stride, self.offset = storage, size, tuple(stride), offset

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


class Global:
    """Pickles as a reference to ``module.name`` (GLOBAL opcode) called with ``args``: what a malicious file asks for."""

    def __init__(self, module: str, name: str, args=()):
        self.module, self.name, self.args = module, name, args

    def __reduce__(self):
        return (_GlobalStub(self.module, self.name), self.args)


class Call:
    """Pickles as ``callee(*args)`` (REDUCE), then BUILD with ``state`` when given: callee may be a Global's stub, a
    CallableStorage, anything the pickler can write."""

    def __init__(self, callee, args=(), state=None):
        self.callee, self.args, self.state = callee, tuple(args), state

    def __reduce__(self):
        return (self.callee, self.args) if self.state is None else (self.callee, self.args, self.state)


class CallableStorage(StorageRef):
    """A storage reference the pickler accepts as a REDUCE callee (pickle insists on callables): what no real file does."""

    def __call__(self, *args):
        raise AssertionError("only ever pickled")


def stub(module: str, name: str):
    """The global ``module.name`` as a callee for Call."""
    return _GlobalStub(module, name)


class _GlobalStub:
    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # never called: only pickled (pickle insists that a reduce function be callable)
        raise AssertionError("a stub is only ever pickled")


class _PyTorchPickler(pickle._Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel)
        return None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _GlobalStub):
            self.write(pickle.GLOBAL + obj.module.encode("utf-8", "surrogateescape") + b"\n"
                       + obj.name.encode("utf-8", "surrogateescape") + b"\n")
            return
        super().save(obj, save_persistent_id)


def torch_pickle(obj) -> bytes:
    """Protocol-2 pickle of ``obj`` the way torch.save writes data.pkl (StorageRef -> persistent ids, Global -> GLOBAL)."""
    buffer = io.BytesIO()
    _PyTorchPickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def write_torch_zip(path: Path, obj, storages: dict[str, bytes], folder: str = "archive", storage_entries=None, **zip_options) -> None:
    """A torch.save-style zip: data.pkl (``obj``), the small records torch writes, and one record per storage.
    ``storage_entries`` overrides the entry dicts of storages (compression, lies about sizes)."""
    entries = [{"name": f"{folder}/data.pkl", "data": torch_pickle(obj)}, {"name": f"{folder}/byteorder", "data": b"little"}]
    for key, data in storages.items():
        entry = {"name": f"{folder}/data/{key}", "data": data}
        entry.update((storage_entries or {}).get(key, {}))
        entries.append(entry)
    entries += [{"name": f"{folder}/version", "data": b"3\n"}, {"name": f"{folder}/.data/serialization_id", "data": b"0" * 40}]
    write_zip(path, entries, **zip_options)


def checkpoint_object(state_refs, arch=None) -> dict:
    """The upstream layout: {'config': {'guidance_scale_model': arch}, 'guidance_scale_model': state}."""
    return {"config": {"guidance_scale_model": dict(SMALL_ARCH, **(arch or {}))}, "guidance_scale_model": state_refs}


def write_small_torch_checkpoint(path: Path, seed: int = 0, config=None, replace=None, storage_entries=None, **extra) -> dict[str, torch.Tensor]:
    """A valid upstream-layout checkpoint of the small architecture built by hand (one storage per tensor); returns its state.
    ``config`` changes the stored architecture only (not the weights); ``replace`` puts other objects in place of weights."""
    state = small_state(seed)
    refs, storages = {}, {}
    for i, (key, tensor) in enumerate(state.items()):
        storage = StorageRef(str(i), tensor.numel())
        refs[key] = TensorRef(storage, tensor.shape)
        storages[str(i)] = tensor.numpy().tobytes()
    refs.update(replace or {})
    write_torch_zip(path, dict(checkpoint_object(refs, config), **extra), storages, storage_entries=storage_entries)
    return state


def zero_stride_bomb(path: Path, width: int, n_layers: int = 1) -> None:
    """A ~1 KB torch file whose weights are all views of one stored float (strides 0), claiming a ``width``-wide MLP."""
    arch = {"hidden_size": width, "n_layers": n_layers}
    one = StorageRef("0", 1)
    refs = {key: TensorRef(one, shape, stride=(0,) * len(shape)) for key, shape in small_shapes(arch).items()}
    write_torch_zip(path, checkpoint_object(refs, arch), {"0": struct.pack("<f", 0.5)})


# ----------------------------------------------------------------------------------------------------------------- deflate


class _Bits:
    def __init__(self):
        self.bits: list[int] = []

    def raw(self, value: int, count: int):  # an integer field, least significant bit first
        self.bits += [(value >> i) & 1 for i in range(count)]

    def code(self, value: int, count: int):  # a Huffman code, most significant bit first
        self.bits += [(value >> i) & 1 for i in reversed(range(count))]

    def tobytes(self) -> bytes:
        padded = self.bits + [0] * (-len(self.bits) % 8)
        return bytes(sum(bit << i for i, bit in enumerate(padded[j:j + 8])) for j in range(0, len(padded), 8))


def _match(bits: _Bits):
    bits.code(0b11000101, 8)  # length symbol 285 (length 258, no extra bits) in the fixed Huffman code
    bits.code(0, 5)  # distance code 0: distance 1


def deflate_zeros(inflated_at_least: int) -> tuple[bytes, int]:
    """A raw deflate stream of zeros, built bit by bit in one fixed-Huffman block: a literal 0, then copies of 258 bytes
    from distance 1 (13 bits each, so 8 copies are 13 whole bytes that repeat). Returns (stream, inflated size)."""
    head = _Bits()
    head.raw(1, 1)  # BFINAL
    head.raw(1, 2)  # BTYPE 01: fixed Huffman
    head.code(0x30, 8)  # literal 0 (codes 0x30 + value for literals 0..143)
    _match(head)  # 3 + 8 + 13 = 24 bits: the repeating part starts on a byte boundary
    group = _Bits()
    for _ in range(8):
        _match(group)
    tail = _Bits()
    tail.code(0, 7)  # end of block (symbol 256)
    groups = max(0, -(-(inflated_at_least - 259) // (8 * 258)))
    stream = head.tobytes() + group.tobytes() * groups + tail.tobytes()
    return stream, 1 + 258 * (1 + 8 * groups)


def deflate_bomb(path: Path, inflated_bytes: int) -> int:
    """A valid small checkpoint whose first weight's storage record is a deflate stream of ``inflated_bytes`` zeros, with a
    pickle that declares that storage size (so a reader that inflates records inflates all of it). Returns the inflated size."""
    stream, inflated = deflate_zeros(inflated_bytes)
    state = small_state()
    refs, storages, options = {}, {}, {}
    for i, (key, tensor) in enumerate(state.items()):
        if i == 0:
            storage = StorageRef("0", inflated // 4)
            storages["0"] = stream
            options["0"] = {"method": 8, "size": inflated // 4 * 4}
        else:
            storage = StorageRef(str(i), tensor.numel())
            storages[str(i)] = tensor.numpy().tobytes()
        refs[key] = TensorRef(storage, tensor.shape)
    write_torch_zip(path, checkpoint_object(refs), storages, storage_entries=options)
    return inflated


# ------------------------------------------------------------------------------------------------------------- safetensors


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None, header_extra: dict | None = None,
                      raw_header: bytes | None = None, trailing: bytes = b"") -> None:
    """A safetensors file written by hand: 8-byte header length, JSON header, tensor bytes in order."""
    header, blobs, offset = {}, [], 0
    for name, tensor in tensors.items():
        data = tensor.contiguous().numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.float16: "F16", torch.int32: "I32"}[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata is not None:
        header["__metadata__"] = metadata
    header.update(header_extra or {})
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs) + trailing)


def our_metadata(arch=None, **changes) -> dict[str, str]:
    """String metadata of a valid version-2 file for the small architecture (what save_guidance_model writes); ``changes``
    replace or (None) remove values."""
    meta = {
        "format": "annealing-guidance", "format_version": "2",
        "architecture": json.dumps(arch if arch is not None else SMALL_ARCH),
        "model_family": "sdxl", "prediction_space": "epsilon", "timestep_convention": "ddpm_index", "trained_latent_numel": "16384",
        "training_grid": json.dumps({"kind": "vp", "num_steps": 50}), "training": "{}", "method": "annealing",
    }
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


# ------------------------------------------------------------------------------------------------------------ measurement

_CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, os.getcwd())
import annealing
try:
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), resource.RLIM_INFINITY))  # a bomb fails here, not the machine
except (ValueError, OSError):
    pass
annealing.load_guidance_model(sys.argv[2])  # warm up: the first load initialises torch's serialization machinery
results = {}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[3:]:
    start = time.perf_counter()
    try:
        annealing.load_guidance_model(path)
        outcome, message = "loaded", ""
    except annealing.CheckpointError as exc:
        outcome, message = "CheckpointError", str(exc)
    except BaseException as exc:
        outcome, message = type(exc).__name__, str(exc)[:500]
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # KiB on Linux -> MiB
    results[path] = {"outcome": outcome, "message": message, "seconds": seconds, "peak_growth_mib": grown}
print("RESULTS" + json.dumps(results))
"""


def measure_loads(python: str, package_root: Path, warm_file: Path, paths: list[Path], address_space_headroom: int = 2 << 30,
                  timeout: float = 300) -> dict[str, dict]:
    """Load each file in one child process (``python``, importing ``annealing`` from ``package_root``) and report, per file,
    the outcome, the message, the seconds the call took and how far the process's peak RSS grew (MiB, cumulative: a file's
    figure includes every file before it, so each is an upper bound). The child's address space is capped at its size after
    import plus ``address_space_headroom``, so a loader that does allocate gigabytes fails instead of swamping the machine."""
    probe = subprocess.run([python, "-c", "import sys, os; sys.path.insert(0, os.getcwd()); import annealing; "
                            "print(open('/proc/self/status').read())"], cwd=package_root, capture_output=True, text=True, timeout=timeout)
    vm = next((int(line.split()[1]) * 1024 for line in probe.stdout.splitlines() if line.startswith("VmPeak:")), None)
    limit = vm + address_space_headroom if vm else -1
    done = subprocess.run([python, "-c", _CHILD, str(limit), str(warm_file), *map(str, paths)], cwd=package_root,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = next((line for line in done.stdout.splitlines() if line.startswith("RESULTS")), None)
    if line is None:
        raise AssertionError(f"the child process failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(line[len("RESULTS"):])


def current_python() -> str:
    return sys.executable


# -------------------------------------------------------------------------------------- files that load but break the image


def state_with(value: float, key: str = "combined_head.4.weight", seed: int = 0) -> dict[str, torch.Tensor]:
    """The small architecture's weights with every value of ``key`` set to ``value`` (3e38: huge but finite in float32)."""
    state = small_state(seed)
    state[key] = torch.full_like(state[key], value)
    return state


def write_with_architecture(path: Path, **arch) -> None:
    """A valid small safetensors file whose architecture metadata also says ``arch`` (w_scale, normalisations, ...)."""
    write_safetensors(path, small_state(), our_metadata(architecture=json.dumps(dict(SMALL_ARCH, **arch))))


def write_with_grid(path: Path, **grid) -> None:
    """A valid small safetensors file whose training grid is ``grid`` (a VP grid unless ``kind`` says otherwise)."""
    kind = grid.pop("kind", "vp")
    changes = {"timestep_convention": "sigma_x1000", "prediction_space": "velocity", "model_family": "sd3"} if kind == "flow" else {}
    write_safetensors(path, small_state(), our_metadata(training_grid=json.dumps({"kind": kind, **grid}), **changes))
