"""Broken and hostile checkpoints in a real ComfyUI: each runs through ComfyUI's own prompt execution (validate_prompt,
PromptExecutor) as a queued workflow would, and must fail on the loader node with the one line the UI shows, naming the file.
The files are built by tests/hostile_files.py into a subfolder of models/annealing_guidance, removed afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import struct

import comfy_internals
import hostile_files as hf
import pytest
import torch

SUBFOLDER = "hostile"



def _header_0x80(annealing, path):
    """Our own valid file whose safetensors header length is 0x580: its first two bytes read like a pickle's (0x80, 5)."""
    for pad in range(4000):
        torch.manual_seed(0)
        meta = annealing.CheckpointMetadata(training={"note": "x" * pad})
        annealing.save_guidance_model(annealing.GuidanceScaleModel(annealing.GuidanceModelConfig(hidden_size=8, n_layers=1), meta), path)
        if struct.unpack("<Q", path.read_bytes()[:8])[0] == 0x580:
            return
    raise AssertionError("no padding gives a 0x580-byte header")


def _torch_save(path, value=None, key="combined_head.0.weight", **kwargs):
    state = hf.small_state()
    if value is not None:
        state[key] = value
    torch.save({"config": {"guidance_scale_model": hf.SMALL_ARCH}, "guidance_scale_model": state}, path, **kwargs)


def _truncated(path, write):
    full = path.with_name("full_" + path.name)
    write(full)
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()


# file name -> (builder(path, annealing), words the message must contain); every one fails on the loader node
BROKEN = {
    "zero_stride_30000.pt": (lambda p, a: hf.zero_stride_bomb(p, 30000), ["hidden_size"]),
    "zero_stride_4096.pt": (lambda p, a: hf.zero_stride_bomb(p, 4096), ["repeats its data"]),
    "deflate_1gib.pt": (lambda p, a: hf.deflate_bomb(p, 1 << 30), ["compressed"]),
    "layers_1e8.safetensors": (lambda p, a: hf.write_safetensors(p, hf.small_state(), hf.our_metadata({"hidden_size": 8, "n_layers": 10**8})),
                               ["n_layers"]),
    "deep_json.safetensors": (lambda p, a: hf.write_safetensors(p, hf.small_state(), hf.our_metadata(architecture="[" * 30000 + "]" * 30000)),
                              ["nests"]),
    "digits_5000.safetensors": (lambda p, a: hf.write_safetensors(p, hf.small_state(),
                                                                  hf.our_metadata(architecture='{"hidden_size": 1' + "0" * 4999 + "}")),
                                ["number of 5000 characters"]),
    "duplicate_keys.safetensors": (lambda p, a: hf.write_safetensors(p, hf.small_state(),
                                                                     hf.our_metadata(architecture='{"hidden_size": 8, "hidden_size": 8}')),
                                   ["twice"]),
    "escape_codes.pt": (lambda p, a: hf.write_torch_zip(p, hf.checkpoint_object({"w": hf.Global("\x1b[2J\x1b[31mos", "system", ("id",))}), {}),
                        ["may be malicious", "\\x1b[2j"]),
    "bytearray.pt": (lambda p, a: hf.write_torch_zip(p, hf.checkpoint_object({"w": hf.Global("builtins", "bytearray", (10**10,))}), {}),
                     ["builtins.bytearray"]),
    "huge_int.pt": (lambda p, a: hf.write_small_torch_checkpoint(p, config={"w_scale": 10**5000}), ["long4"]),
    "legacy.pt": (lambda p, a: _torch_save(p, _use_new_zipfile_serialization=False), ["legacy"]),
    "meta_tensor.pt": (lambda p, a: _torch_save(p, torch.empty(8, 12, device="meta")), ["_rebuild_meta_tensor_no_storage"]),
    "int_keys.pt": (lambda p, a: _torch_save(p, torch.zeros(1), key=7), ["names must be strings"]),
    "truncated.pt": (lambda p, a: _truncated(p, _torch_save), ["truncated"]),
    "truncated.safetensors": (lambda p, a: _truncated(p, lambda q: hf.write_safetensors(q, hf.small_state(), hf.our_metadata())),
                              ["truncated"]),
    "empty.safetensors": (lambda p, a: p.write_bytes(b""), ["empty"]),
}


@pytest.fixture(scope="module")
def hostile_folder(comfy_host):
    folder = comfy_host.models_dir / "annealing_guidance" / SUBFOLDER
    folder.mkdir()
    for name, (build, _) in BROKEN.items():
        build(folder / name, comfy_host.annealing)
    _header_0x80(comfy_host.annealing, folder / "header_0x80.safetensors")
    yield folder
    shutil.rmtree(folder)


@contextlib.contextmanager
def address_space_cap(headroom: int = 2 << 30):
    """Cap this process's address space at its current size plus ``headroom`` while a hostile file loads: should the loader
    regress and allocate what a bomb claims, the node fails with MemoryError (and the test with it) instead of the machine
    running out of memory. The soft limit is restored afterwards."""
    try:
        import resource

        with open("/proc/self/status") as status:
            size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    except (ImportError, OSError, StopIteration):  # not Linux: no cap
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + headroom if hard == resource.RLIM_INFINITY else min(size + headroom, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_loader(comfy_host, name):
    """Queue loader -> Annealing Model Explorer (an output node) through ComfyUI's validation and executor."""
    prompt = {
        "1": {"class_type": "LoadAnnealingGuidanceModel", "inputs": {"model_name": f"{SUBFOLDER}/{name}"}},
        "2": {"class_type": "AnnealingModelExplorer", "inputs": {"annealing_model": ["1", 0], "lambdas": "0.4"}},
    }
    valid, error, outputs, node_errors = comfy_internals.validate(prompt, "hostile")
    assert valid, (error, node_errors)  # the file is listed: validation passes, the failure is the loader's
    with address_space_cap():
        return comfy_internals.execute(prompt, f"hostile-{name}", outputs)


def the_ui_error(executor) -> dict:
    errors = comfy_internals.execution_errors(executor)
    assert not executor.success and len(errors) == 1, executor.status_messages
    return errors[0]


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_file_fails_on_the_loader_node_with_one_line(comfy_host, hostile_folder, name):
    error = the_ui_error(run_loader(comfy_host, name))
    assert error["node_id"] == "1" and error["node_type"] == "LoadAnnealingGuidanceModel"
    assert error["exception_type"].endswith(".CheckpointError"), error["exception_type"]
    message = error["exception_message"].strip()  # what the UI shows (ComfyUI appends a newline and its tips, none here)
    assert "\n" not in message and message.isprintable(), message
    assert str(hostile_folder / name) in message, message
    for word in BROKEN[name][1]:
        assert word in message.lower(), message
    assert "weights_only" not in message and "Re-running" not in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="this platform cannot make a FIFO")
def test_a_fifo_does_not_hang_the_ui(comfy_host, hostile_folder):
    fifo = hostile_folder / "fifo.pt"
    os.mkfifo(fifo)
    try:
        message = the_ui_error(run_loader(comfy_host, "fifo.pt"))["exception_message"].strip()
    finally:
        fifo.unlink()
    # ComfyUI 0.3.64 lists the FIFO but its get_full_path only returns regular files, so the node says "not found";
    # a host that passed the path on would get the loader's "not a regular file". Either way: one line, no hang.
    assert "\n" not in message and "fifo.pt" in message, message
    assert "not found in models/annealing_guidance" in message or "not a regular file" in message, message


def test_our_file_whose_header_starts_like_a_pickle_loads_and_runs(comfy_host, hostile_folder):
    assert (hostile_folder / "header_0x80.safetensors").read_bytes()[:2] == b"\x80\x05"
    executor = run_loader(comfy_host, "header_0x80.safetensors")
    assert executor.success, executor.status_messages[-3:]
