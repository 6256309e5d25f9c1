"""Checkpoints from strangers (issue 10): files crafted to exhaust memory or time, to escape the one-error contract, or to
smuggle advice and escape codes into messages. Every file is built here; bombs are loaded in a child process that reports
time and peak memory, under an address-space cap so that a regression fails the test instead of swamping the machine."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import sys
import zipfile
import zlib

import hostile_files as hf
import pytest
import torch
from safetensors import safe_open

import annealing
from annealing import CheckpointError
from annealing import untrusted as limits


def refuse(path, *words):
    """Load ``path``, expect a CheckpointError: one printable line naming the file, containing ``words`` (lower case),
    with no advice to load unsafely and no sentence cut off."""
    with pytest.raises(CheckpointError) as excinfo:
        annealing.load_guidance_model(path)
    message = str(excinfo.value)
    assert "\n" not in message and message.isprintable(), message
    assert message.count(str(path)) == 1, message  # named once: no error wrapped in another
    for word in words:
        assert word in message.lower(), message
    assert not re.search(r"weights_only|re-running|add_safe_globals|trust", message, re.IGNORECASE), message
    problem = excinfo.value.problem
    assert problem.count("(") == problem.count(")") and re.search(r"[\w)']$", problem), message
    assert len(problem) <= 400, message
    return message


def saved_model(path, training=None, seed=0):
    torch.manual_seed(seed)
    meta = annealing.CheckpointMetadata(training=training or {})
    model = annealing.GuidanceScaleModel(annealing.GuidanceModelConfig(hidden_size=8, n_layers=1), meta)
    annealing.save_guidance_model(model, path)
    return model


# ------------------------------------------------------------------------------------------------- the format, by structure


@pytest.mark.parametrize("target", [0x580, 0x780])
def test_safetensors_whose_header_length_ends_in_0x80_loads(tmp_path, target):
    """Our own file, written by save_guidance_model, whose header length's low byte is 0x80 (a pickle's first byte);
    0x580 also makes the second byte 5, a pickle protocol number."""
    path = tmp_path / "m.safetensors"
    for pad in range(4000):
        model = saved_model(path, {"note": "x" * pad})
        if struct.unpack("<Q", path.read_bytes()[:8])[0] == target:
            break
    else:
        pytest.fail(f"no padding gives a header of {target:#x} bytes")
    head = path.read_bytes()[:2]
    assert head[0] == 0x80 and (target != 0x580 or head[1] == 5)
    loaded = annealing.load_guidance_model(path)
    assert loaded.source_format == "safetensors" and loaded.metadata == model.metadata
    inputs = (torch.tensor([10.0, 900.0]), torch.tensor([1.0, 30.0]), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(loaded(*inputs), model(*inputs))


def test_legacy_and_raw_pickles_are_refused_without_running(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"guidance_scale_model": hf.small_state()}, path, _use_new_zipfile_serialization=False)
    refuse(path, "legacy", "not read")
    marker = tmp_path / "pwned"
    for protocol in (2, 4, 5):
        path = tmp_path / f"raw{protocol}.pt"
        path.write_bytes(pickle.dumps(_Exploit(marker), protocol=protocol))
        refuse(path, "may be malicious", "system")
    assert not marker.exists()


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))  # would create the marker file if unpickled


# ------------------------------------------------------------------------------------------------------------------- bombs

#: A guard against reading without bound, not a speed target: unbounded, these took 9-10 s or hit the child's 2 GiB
#: address-space cap; refused, they take milliseconds, so 5 s leaves a loaded CI machine a wide margin.
MAX_SECONDS = 5.0
MAX_GROWTH_MIB = 48  # peak RSS growth: each file below is refused before its claims are allocated


def _bombs(folder):
    """(name, path, words the refusal must contain). Built in ``folder``; sizes are what the file claims, not what it holds."""
    cases = []

    def add(name, words):
        cases.append((name, folder / name, words))
        return folder / name

    hf.zero_stride_bomb(add("zero_stride_30000.pt", ["hidden_size", "4096"]), 30000)  # 3.6 GB per layer from 1.3 KB
    hf.zero_stride_bomb(add("zero_stride_4096.pt", ["repeats its data"]), 4096)  # within the bounds: caught per tensor
    hf.deflate_bomb(add("deflate_1gib.pt", ["compressed"]), 1 << 30)  # 6.8 MB that inflates to 1 GiB
    hf.write_small_torch_checkpoint(add("size_lie.pt", ["claims", "3,221,225,472"]), storage_entries={"0": {"size": 3 << 30}})
    state = hf.small_state()  # 256 directory entries that all point at the same 1 MiB of bytes
    big = hf.StorageRef("0", 1 << 18)
    refs = {key: hf.TensorRef(hf.StorageRef(str(i + 1), t.numel()), t.shape) for i, (key, t) in enumerate(state.items())}
    extra = {"optimizer": [hf.TensorRef(hf.StorageRef(str(100 + i), 1 << 18), (1 << 18,)) for i in range(256)], "big": hf.TensorRef(big, (1,))}
    storages = {"0": bytes(1 << 20), **{str(i + 1): t.numpy().tobytes() for i, t in enumerate(state.values())}}
    storages.update({str(100 + i): b"" for i in range(256)})
    entries = {str(100 + i): {"same_bytes_as": 2, "data": bytes(1 << 20)} for i in range(256)}
    hf.write_torch_zip(add("overlapping.pt", ["overlaps"]), dict(hf.checkpoint_object(refs), **extra), storages, storage_entries=entries)
    hf.write_torch_zip(add("bytearray.pt", ["builtins.bytearray", "may be malicious"]),
                       hf.checkpoint_object({"combined_head.0.weight": hf.Global("builtins", "bytearray", (10**10,))}), {})
    hf.write_torch_zip(add("float_tensor.pt", ["torch.floattensor", "may be malicious"]),
                       hf.checkpoint_object({"combined_head.0.weight": hf.Global("torch", "FloatTensor", (100000, 100000))}), {})
    # what weights_only allows but must not run here: allocating storages, iterating a 10^9-row view, and calling a storage,
    # whose error message torch formats element by element (100 us each)
    hf.write_torch_zip(add("untyped_storage.pt", ["calls torch.storage.untypedstorage"]),
                       hf.checkpoint_object({"w": hf.Global("torch.storage", "UntypedStorage", (10**10,))}), {})
    rows = hf.TensorRef(hf.StorageRef("0", 1), (10**9, 2), stride=(0, 0))
    hf.write_torch_zip(add("ordered_dict_rows.pt", ["ordereddict with arguments"]),
                       hf.checkpoint_object({"w": hf.Global("collections", "OrderedDict", (rows,))}), {"0": bytes(4)})
    hf.write_torch_zip(add("build_rows.pt", ["state from something other than a dict"]),
                       hf.checkpoint_object({"w": hf.Call(hf.stub("collections", "OrderedDict"), (), rows)}), {"0": bytes(4)})
    hf.write_torch_zip(add("call_a_storage.pt", ["not a function"]),
                       hf.checkpoint_object({"w": hf.Call(hf.CallableStorage("0", 1 << 18), ())}), {"0": bytes(1 << 20)})
    version = [{"name": "a/byteorder", "data": b"little"}, {"name": "a/version", "data": b"3\n"}]
    many = b"\x80\x02" + b"]" * (limits.MAX_PICKLE_BYTES - 3) + b"."  # a million instructions, each microseconds to read
    hf.write_zip(add("pickle_ops.pt", ["more than 50,000 instructions"]), [{"name": "a/data.pkl", "data": many}, *version])
    just_under = b"\x80\x02" + b"]" * (limits.MAX_PICKLE_OPS - 3) + b"."  # what the bound still lets through: torch reads it
    hf.write_zip(add("pickle_ops_at_bound.pt", ["expected a dict checkpoint"]), [{"name": "a/data.pkl", "data": just_under}, *version])
    hf.write_safetensors(add("layers_1e8.safetensors", ["n_layers", "64"]), hf.small_state(),
                         hf.our_metadata({"hidden_size": 8, "n_layers": 10**8}))
    hf.write_safetensors(add("wide_1e6.safetensors", ["parameters"]), hf.small_state(),
                         hf.our_metadata({"hidden_size": 4096, "n_layers": 60}))
    huge = {"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 4 * 10**10]}}
    hf.write_safetensors(add("huge_shape.safetensors", ["truncated"]), {}, hf.our_metadata(), header_extra=huge)
    path = add("header_length.safetensors", ["header", "claims"])
    path.write_bytes(struct.pack("<Q", 1 << 40) + b'{"__metadata__": {}}')
    deep = "[" * 100000 + "]" * 100000
    hf.write_safetensors(add("deep_header.safetensors", ["header", "nests"]), hf.small_state(), hf.our_metadata(),
                         raw_header=('{"x": ' + deep + "}").encode())
    hf.write_safetensors(add("deep_metadata.safetensors", ["training"]), hf.small_state(), hf.our_metadata(training=deep))
    hf.write_safetensors(add("digits_5000.safetensors", ["number", "5000 characters"]), hf.small_state(),
                         hf.our_metadata(architecture='{"hidden_size": 1' + "0" * 4999 + "}"))
    fifo = folder / "fifo.pt"
    if hasattr(os, "mkfifo"):
        os.mkfifo(fifo)
        cases.append(("fifo.pt", fifo, ["not a regular file"]))
    return cases


@pytest.fixture(scope="module")
def bomb_results(tmp_path_factory):
    if not sys.platform.startswith("linux"):
        pytest.skip("peak memory is read from getrusage and /proc (Linux)")
    folder = tmp_path_factory.mktemp("bombs")
    cases = _bombs(folder)
    hf.write_small_torch_checkpoint(folder / "warm.pt")
    results = hf.measure_loads(sys.executable, hf.REPO, folder / "warm.pt", [path for _, path, _ in cases], timeout=180)
    return {name: (path, words, results[str(path)]) for name, path, words in cases}


BOMBS = ["zero_stride_30000.pt", "zero_stride_4096.pt", "deflate_1gib.pt", "size_lie.pt", "overlapping.pt", "bytearray.pt",
         "float_tensor.pt", "untyped_storage.pt", "ordered_dict_rows.pt", "build_rows.pt", "call_a_storage.pt", "pickle_ops.pt",
         "pickle_ops_at_bound.pt", "layers_1e8.safetensors", "wide_1e6.safetensors", "huge_shape.safetensors", "header_length.safetensors",
         "deep_header.safetensors", "deep_metadata.safetensors", "digits_5000.safetensors", "fifo.pt"]


@pytest.mark.parametrize("name", BOMBS)
def test_bomb_is_refused_fast_and_small(bomb_results, name):
    if name not in bomb_results:
        pytest.skip("this platform cannot make a FIFO")
    path, words, result = bomb_results[name]
    assert result["outcome"] == "CheckpointError", result
    message = result["message"]
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message.lower(), message
    assert result["seconds"] < MAX_SECONDS, result
    assert result["peak_growth_mib"] < MAX_GROWTH_MIB, result


def test_the_bombs_are_real(tmp_path):
    """The crafted files claim what the tests say: the deflate stream inflates to its size, the zero-stride views load
    in torch as the claimed shapes over one stored float."""
    stream, inflated = hf.deflate_zeros(5 << 20)
    out = zlib.decompressobj(-15).decompress(stream)
    assert len(out) == inflated >= 5 << 20 and not any(out[:: 4096]) and len(stream) * 150 < inflated
    path = tmp_path / "zs.pt"
    hf.zero_stride_bomb(path, 4096)
    state = torch.load(path, weights_only=True)["guidance_scale_model"]
    weight = state["combined_head.2.weight"]
    assert weight.shape == (4096, 4096) and weight.untyped_storage().nbytes() == 4 and path.stat().st_size < 2000
    path = tmp_path / "ok.pt"
    written = hf.write_small_torch_checkpoint(path)
    loaded = annealing.load_guidance_model(path)
    for key, tensor in written.items():
        torch.testing.assert_close(loaded.state_dict()[key], tensor, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------- the file system and the path


def test_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "locked.safetensors"
    saved_model(path)
    if getattr(os, "geteuid", lambda: 0)() != 0:  # root reads anything (and Windows has no chmod 0): the OS error is raised by hand below
        path.chmod(0)
        refuse(path, "permission denied")
        path.chmod(0o644)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(limits.os, "open", denied)
    refuse(path, "permission denied")


def test_odd_paths(tmp_path):
    long_name = tmp_path / ("x" * 300 + ".pt")
    refuse(long_name, "too long")
    with pytest.raises(CheckpointError, match="NUL"):
        annealing.load_guidance_model(str(tmp_path / "a\0b.pt"))
    path = tmp_path / "m.safetensors"
    model = saved_model(path)
    loaded = annealing.load_guidance_model(os.fsencode(path))  # a bytes path is a path
    assert loaded.metadata == model.metadata and loaded.source_path == str(path)
    for thing in (3, None, ["m.safetensors"]):
        with pytest.raises(CheckpointError, match="expected the path of a checkpoint file") as excinfo:
            annealing.load_guidance_model(thing)
        assert "\n" not in str(excinfo.value)
    with pytest.raises(CheckpointError, match="not found") as excinfo:
        annealing.load_guidance_model(tmp_path / "\x1b[2Jred\n.pt")
    message = str(excinfo.value)
    assert "\\x1b[2Jred .pt" in message and message.isprintable()


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_devices_are_not_files():
    refuse("/dev/zero", "not a regular file")


# ------------------------------------------------------------------------------------------------------ what the pickle holds


def _torch_save(path, value, key="combined_head.0.weight"):
    state = hf.small_state()
    state[key] = value
    torch.save({"config": {"guidance_scale_model": hf.SMALL_ARCH}, "guidance_scale_model": state}, path)


def test_tensors_that_are_not_plain_weights(tmp_path):
    weight = hf.small_state()["combined_head.0.weight"]
    cases = {
        "meta": (torch.empty(8, 12, device="meta"), ["_rebuild_meta_tensor_no_storage"]),
        "sparse": (weight.to_sparse(), ["_rebuild_sparse_tensor"]),
        "float8": (weight.to(torch.float8_e4m3fn), ["float8_e4m3fn", "expected floating point"]),
        "int": (weight.to(torch.int32), ["int32", "expected floating point"]),
    }
    shadowing = torch.nn.Parameter(weight.clone())
    shadowing.is_floating_point, shadowing.detach = 1, "not a method"  # attributes pickled with the Parameter
    cases["parameter_with_state"] = (shadowing, ["_rebuild_parameter_with_state"])
    for name, (value, words) in cases.items():
        path = tmp_path / f"{name}.pt"
        _torch_save(path, value)
        refuse(path, *words)
    path = tmp_path / "parameter.pt"
    _torch_save(path, torch.nn.Parameter(weight.clone()))  # a plain Parameter is a tensor: it loads
    torch.testing.assert_close(annealing.load_guidance_model(path).state_dict()["combined_head.0.weight"], weight)


def test_second_line_of_defence_checks_each_tensor(tmp_path):
    """What the pickle scan already refuses, _validate_state_dict refuses too (a future torch may build these otherwise)."""
    from annealing.checkpoint_reader import _validate_state_dict

    config = annealing.GuidanceModelConfig(hidden_size=8, n_layers=1)
    weight = hf.small_state()["combined_head.0.weight"]
    shadowing = torch.nn.Parameter(weight.clone())
    shadowing.is_floating_point, shadowing.detach, shadowing.to = 1, "x", None
    for value, words in [(torch.empty(8, 12, device="meta"), ["meta"]), (weight.to_sparse(), ["sparse"]),
                         (torch.zeros(1).expand(8, 12), ["repeats its data", "stores 1"]), ({"a": 1}, ["a dict", "expected a tensor"])]:
        state = dict(hf.small_state(), **{"combined_head.0.weight": value})
        with pytest.raises(CheckpointError) as excinfo:
            _validate_state_dict(tmp_path, state, config)
        for word in words:
            assert word in str(excinfo.value), excinfo.value
    clean = _validate_state_dict(tmp_path, dict(hf.small_state(), **{"combined_head.0.weight": shadowing}), config)
    assert type(clean["combined_head.0.weight"]) is torch.Tensor
    torch.testing.assert_close(clean["combined_head.0.weight"], weight)


def test_weight_names_must_be_strings(tmp_path):
    path = tmp_path / "keys.pt"
    _torch_save(path, torch.zeros(1), key=3)
    refuse(path, "names must be strings")
    path = tmp_path / "bare.pt"
    torch.save({**hf.small_state(), (1, 2): torch.zeros(1)}, path)  # a bare state dict: the architecture is inferred
    refuse(path, "names must be strings")


def test_huge_numbers_in_the_pickle(tmp_path):
    path = tmp_path / "w400.pt"
    hf.write_small_torch_checkpoint(path, config={"w_scale": 10**400})
    refuse(path, "w_scale", "401 digits")
    path = tmp_path / "h400.pt"
    hf.write_small_torch_checkpoint(path, config={"hidden_size": -(10**400)})
    refuse(path, "hidden_size", "401 digits")
    path = tmp_path / "w5000.pt"  # 2 KB integers need LONG4, which torch's safe unpickler refuses
    hf.write_small_torch_checkpoint(path, config={"w_scale": 10**5000})
    refuse(path, "refused", "long4")
    path = tmp_path / "step.pt"  # provenance that would not survive conversion is dropped, not fatal
    hf.write_small_torch_checkpoint(path, step=10**400, config={"w_scale": 2})
    assert "steps" not in annealing.load_guidance_model(path).metadata.training


def test_refusals_name_the_global_and_carry_no_escape_codes(tmp_path):
    path = tmp_path / "escape.pt"
    hf.write_torch_zip(path, hf.checkpoint_object({"combined_head.0.weight": hf.Global("\x1b[2J\x1b]0;pwn\x07os", "system\r", ("id",))}), {})
    message = refuse(path, "may be malicious", "objects other than tensors")
    assert "\\x1b[2J" in message and "os.system" in message and "\x1b" not in message and "\x07" not in message
    path = tmp_path / "long.pt"
    hf.write_torch_zip(path, hf.checkpoint_object({"w": hf.Global("a" * 5000, "b")}), {})
    message = refuse(path, "may be malicious", "characters, shortened")
    assert len(message) < 400 + len(str(path))


# ------------------------------------------------------------------------------------------------------- the zip structure


def test_zips_torch_never_writes_are_refused(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"config": {"guidance_scale_model": hf.SMALL_ARCH}, "guidance_scale_model": hf.small_state()}, good)
    annealing.load_guidance_model(good)
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    refuse(deflated, "compressed")
    commented = tmp_path / "comment.pt"
    commented.write_bytes(good.read_bytes()[:-2] + struct.pack("<H", 5) + b"hello")
    refuse(commented, "comment or appended data")
    prepended = tmp_path / "prepended.pt"  # a second zip before the real one: two readers could see different entries
    prepended.write_bytes(good.read_bytes() + good.read_bytes())
    refuse(prepended, "corrupt")
    for name, entries, words in [
        ("duplicate", [{"name": "a/data.pkl", "data": b"x"}, {"name": "a/data.pkl", "data": b"y"}], ["same name"]),
        ("no_pickle", [{"name": "a/other", "data": b"x"}], ["no data.pkl"]),
        ("two_folders", [{"name": "a/data.pkl", "data": b"x"}, {"name": "b/data/0", "data": b"y"}], ["no data.pkl"]),
        ("big_pickle", [{"name": "a/data.pkl", "data": bytes(limits.MAX_PICKLE_BYTES + 1)}], ["data.pkl", "1,048,577"]),
        ("garbage_pickle", [{"name": "a/data.pkl", "data": b"\x80\x02\xff\xff"}], ["data.pkl cannot be read"]),
    ]:
        path = tmp_path / f"{name}.pt"
        hf.write_zip(path, entries)
        refuse(path, *words)


@pytest.mark.parametrize("kind", ["torch", "safetensors"])
def test_truncated_files_say_so_in_whole_sentences(tmp_path, kind):
    path = tmp_path / f"good.{kind}"
    if kind == "torch":
        torch.save({"config": {"guidance_scale_model": hf.SMALL_ARCH}, "guidance_scale_model": hf.small_state()}, path)
    else:
        saved_model(path)
    data = path.read_bytes()
    for cut in sorted({1, 9, 30, 100, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 30, len(data) - 1}):
        path = tmp_path / f"cut{cut}.{kind}"
        path.write_bytes(data[:cut])
        message = refuse(path)
        assert any(word in message for word in ("truncated", "corrupt", "not a guidance checkpoint")), message


# ---------------------------------------------------------------------------------------------------------- safetensors


def test_safetensors_structure_is_checked_before_reading(tmp_path):
    state = hf.small_state()
    meta = hf.our_metadata()
    hf.write_safetensors(tmp_path / "ok.safetensors", state, meta)
    annealing.load_guidance_model(tmp_path / "ok.safetensors")
    first = next(iter(state))
    cases = [
        ("trailing", dict(trailing=b"\0" * 16), ["16 bytes follow the last tensor"]),
        ("unknown_dtype", dict(header_extra={"w": {"dtype": "F24", "shape": [0], "data_offsets": [0, 0]}}), ["unknown dtype"]),
        ("extra_field", dict(header_extra={"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": 1}}), ["exactly dtype"]),
        ("bad_shape", dict(header_extra={"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), ["invalid shape"]),
        ("bool_shape", dict(header_extra={"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}), ["invalid shape"]),
        ("float_offsets", dict(header_extra={"w": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}), ["invalid data_offsets"]),
        ("mismatch", dict(header_extra={"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}), ["8 bytes", "but 4 bytes"]),
        ("overlap", dict(header_extra={"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}), ["overlaps another tensor"]),
        ("gap", dict(header_extra={"w": {"dtype": "F32", "shape": [1], "data_offsets": [10**6, 10**6 + 4]}}), ["gap"]),
        ("metadata_type", dict(header_extra={"__metadata__": {"format": 1}}), ["__metadata__"]),
        ("extra_data", dict(raw_header=b'{"a": 1} [2]'), ["not valid json"]),
        ("list_entry", dict(raw_header=b'{"a": [1]}'), ["exactly dtype"]),
        ("not_utf8", dict(raw_header=b'{"\xff": 1}'), ["not utf-8"]),
        ("duplicate_tensor", dict(raw_header=json.dumps({first: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})[:-1].encode()
                                  + b", " + json.dumps({first: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})[1:].encode()),
         ["twice"]),
    ]
    for name, options, words in cases:
        path = tmp_path / f"{name}.safetensors"
        hf.write_safetensors(path, state, meta, **options)
        refuse(path, *words)
    path = tmp_path / "int_weight.safetensors"
    hf.write_safetensors(path, dict(state, **{first: state[first].to(torch.int32)}), meta)
    refuse(path, "i32", "expected floating point")


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"architecture": '{"hidden_size": 8, "n_layers": 1, "hidden_size": 4096}'}, ["architecture", "'hidden_size' twice"]),
        ({"architecture": '{"hidden_size": 8, "w_scale": 1' + "0" * 399 + "}"}, ["architecture", "400 characters"]),
        ({"architecture": '{"hidden_size": 8, "w_scale": 1e400}'}, ["w_scale", "finite"]),
        ({"architecture": '{"hidden_size": 8, "w_scale": NaN}'}, ["w_scale", "finite"]),
        ({"architecture": "[" * 30000 + "]" * 30000}, ["architecture", "nests 30,000 levels"]),
        ({"training": "[" * 100000 + "]" * 100000}, ["training", "more than the 65,536"]),
        ({"training_grid": '{"kind": "vp", "kind": "flow"}'}, ["training_grid", "twice"]),
        ({"training_grid": "{oops"}, ["training_grid", "not valid json"]),
        ({"format_version": "1", "sampling_steps": "9" * 30}, ["sampling_steps", "must be an integer"]),
        ({"format_version": "1" * 5000}, ["format_version", "5000 characters"]),
        ({"format_version": "\uff12"}, ["format_version"]),  # a full-width 2: int() would accept it
        ({"trained_latent_numel": "9" * 5000}, ["trained_latent_numel", "5000 characters"]),
        ({"trained_latent_numel": str(1 << 41)}, ["trained_latent_numel"]),
        ({"model_family": "\x1b[31m" + "a" * 10000}, ["model_family", "10005 characters"]),
        ({"format": "x" * 100000}, ["no annealing-guidance metadata", "100000 characters"]),
    ],
)
def test_metadata_is_bounded_before_it_is_parsed(tmp_path, changes, words):
    path = tmp_path / "meta.safetensors"
    hf.write_safetensors(path, hf.small_state(), hf.our_metadata(**changes))
    message = refuse(path, *words)
    assert "\x1b" not in message


def test_our_written_metadata_reads_back_through_the_bounded_parser(tmp_path):
    """What save_guidance_model writes (nested training provenance included) passes the same bounds."""
    path = tmp_path / "m.safetensors"
    model = saved_model(path, {"cads": {"enabled": True, "tau1": 0.0}, "seed": 2**62, "base_model": "stabilityai/stable-diffusion-xl-base-1.0"})
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["format"] == "annealing-guidance"  # the safetensors library reads it too
    assert annealing.load_guidance_model(path).metadata == model.metadata


def test_json_limits_directly():
    assert limits.load_json('{"a": [1, 2.5, {"b": "[[[\\"]]]"}]}') == {"a": [1, 2.5, {"b": '[[["]]]'}]}
    assert limits.json_depth('{"a": "[[[[", "b": [[1]]}') == 3
    for text, words in [("[" * 40 + "]" * 40, "nests 40"), ('{"a": 1, "a": 2}', "twice"), ("1" * 41, "41 characters"),
                        ("{", "not valid JSON"), ("x" * (limits.MAX_JSON_CHARS + 1), "characters, more than")]:
        with pytest.raises(ValueError, match=words):
            limits.load_json(text)


def test_the_largest_real_layouts_still_load(tmp_path):
    """The bounds leave room for real files: 64 layers saved with their Adam state (17,172 pickle instructions of the
    50,000 allowed), and a file at the parameter bound's edge in width (4096 hidden units)."""
    config = annealing.GuidanceModelConfig(hidden_size=4, n_layers=64)
    model = annealing.GuidanceScaleModel(config)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2), torch.ones(2), 0.5).sum().backward()
    optimizer.step()
    path = tmp_path / "deep.pt"
    torch.save({"config": {"guidance_scale_model": config.to_dict()}, "guidance_scale_model": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(), "step": 1}, path)
    loaded = annealing.load_guidance_model(path)
    torch.testing.assert_close(loaded(torch.ones(3), torch.ones(3), 0.2), model(torch.ones(3), torch.ones(3), 0.2))
    wide = annealing.GuidanceScaleModel(annealing.GuidanceModelConfig(hidden_size=4096, n_layers=0), annealing.CheckpointMetadata())
    annealing.save_guidance_model(wide, tmp_path / "wide.safetensors")
    assert annealing.load_guidance_model(tmp_path / "wide.safetensors").config.hidden_size == 4096


# -------------------------------------------------------------------------- files that load but would break the image (issue 22)

# Each of these loaded before the load-time domain check: then w was inf (the guided prediction +-inf) or NaN at every step
# (silently replaced by scale 1: no guidance at all). Now each is refused with one line naming the file and the problem.
DOMAIN_CASES = [
    ("weights_3e38_last.safetensors", lambda p: hf.write_safetensors(p, hf.state_with(3e38), hf.our_metadata()), ["w is inf", "timestep"]),
    ("weights_3e38_first.safetensors", lambda p: hf.write_safetensors(p, hf.state_with(3e38, "combined_head.0.weight"), hf.our_metadata()),
     ["w is nan", "||delta||", "lambda"]),
    ("bias_2e4.safetensors", lambda p: hf.write_safetensors(p, hf.state_with(2e4, "combined_head.4.bias"), hf.our_metadata()),
     ["w is 2", "at most 10000"]),
    ("w_scale_1e308.safetensors", lambda p: hf.write_with_architecture(p, w_scale=1e308), ["w_scale", "magnitude", "1e+308"]),
    ("w_scale_1e-300.safetensors", lambda p: hf.write_with_architecture(p, w_scale=1e-300), ["w_scale", "1e-300"]),
    ("w_bias_1e308.safetensors", lambda p: hf.write_with_architecture(p, w_bias=1e308), ["w_bias"]),
    ("t_norm_1e-300.safetensors", lambda p: hf.write_with_architecture(p, t_embed_normalization=1e-300), ["t_embed_normalization", "1e-300"]),
    ("t_norm_1e300.safetensors", lambda p: hf.write_with_architecture(p, t_embed_normalization=1e300), ["t_embed_normalization"]),
    ("delta_norm_1e-300.safetensors", lambda p: hf.write_with_architecture(p, delta_embed_normalization=1e-300), ["delta_embed_normalization"]),
    ("betas_1.safetensors", lambda p: hf.write_with_grid(p, beta_start=1.0, beta_end=1.0), ["training_grid", "every sigma is inf"]),
    ("betas_1e-300.safetensors", lambda p: hf.write_with_grid(p, beta_start=1e-300, beta_end=1e-300), ["every sigma is 0"]),
    ("betas_to_1.safetensors", lambda p: hf.write_with_grid(p, beta_start=0.00085, beta_end=1.0), ["some sigma is inf"]),
    ("shift_1e-300.safetensors", lambda p: hf.write_with_grid(p, kind="flow", shift=1e-300), ["flow grid", "sigma"]),
    ("w_scale_1e308.pt", lambda p: hf.write_small_torch_checkpoint(p, config={"w_scale": 1e308}), ["w_scale", "magnitude"]),
    ("t_norm_1e-300.pt", lambda p: hf.write_small_torch_checkpoint(p, config={"t_embed_normalization": 1e-300}), ["t_embed_normalization"]),
]


@pytest.mark.parametrize("name, build, words", DOMAIN_CASES, ids=[case[0] for case in DOMAIN_CASES])
def test_files_that_would_break_the_image_are_refused(tmp_path, name, build, words):
    path = tmp_path / name
    build(path)
    refuse(path, *words)


def test_huge_weights_in_an_upstream_layout_file_are_refused(tmp_path):
    path = tmp_path / "huge.pt"
    state = hf.state_with(3e38)
    torch.save({"config": {"guidance_scale_model": hf.SMALL_ARCH}, "guidance_scale_model": state}, path)
    refuse(path, "w is inf")
    path = tmp_path / "fine.pt"
    torch.save({"config": {"guidance_scale_model": hf.SMALL_ARCH}, "guidance_scale_model": hf.small_state()}, path)
    annealing.load_guidance_model(path)  # the same layout with ordinary weights loads


def test_learn_to_guide_files_that_would_break_the_image_are_refused(tmp_path):
    meta = annealing.CheckpointMetadata(method="learn_to_guide")
    torch.manual_seed(0)
    net = annealing.LearnToGuideNet(annealing.LearnToGuideConfig(prompt_dim=8, hidden_size=8), meta)
    path = tmp_path / "l2g.safetensors"
    annealing.save_guidance_model(net, path)
    annealing.load_guidance_model(path)
    with torch.no_grad():
        net.head[-1].weight.fill_(3e38)
        net.head[-1].bias.fill_(3e38)
    annealing.save_guidance_model(net, path)  # finite weights: the writer takes them
    refuse(path, "omega is inf", "prompt embedding")
    for field, value in (("t_embed_normalization", 1e-300), ("t_embed_normalization", 1e300)):
        path = tmp_path / f"{field}.safetensors"
        config = dict(annealing.LearnToGuideConfig(prompt_dim=8, hidden_size=8).to_dict(), **{field: value})
        state = {k: torch.zeros(shape) for k, shape in annealing.LearnToGuideConfig(prompt_dim=8, hidden_size=8).expected_shapes().items()}
        hf.write_safetensors(path, state, hf.our_metadata(architecture=json.dumps(config), method="learn_to_guide"))
        refuse(path, field)
