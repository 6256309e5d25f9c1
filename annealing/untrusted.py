"""Reading checkpoint files from strangers: every size, count and depth is checked before anything is allocated or parsed.

Used by :mod:`annealing.checkpoint_reader`; docs/security.md explains the limits. Nothing here unpickles:

* a torch zip is inspected first (its central directory, every entry's local header, then its pickle, walked opcode by
  opcode: what it names, calls and builds) and only then handed to ``torch.load(weights_only=True)``; entries must be
  stored uncompressed, inside the file, without overlaps, so what torch reads is never more than the file holds;
* a safetensors file is parsed here: header length, JSON, dtypes, shapes and offsets are checked against the file size
  before one tensor is read;
* JSON (the safetensors header and our metadata) is bounded in size, nesting depth and number length before it is parsed,
  and duplicate keys are refused.

Every failure raises :class:`annealing.errors.CheckpointError`.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import re
import stat
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .errors import CheckpointError, printable, show

MAX_FILE_BYTES = 512 << 20  # the largest MLP the bounds allow is 128 MiB in float32; with Adam state and fp64 this still fits
MAX_HEADER_BYTES = 1 << 20  # a safetensors JSON header (ours: about 2 KB)
MAX_JSON_CHARS = 64 << 10  # one JSON metadata value (ours: well under 2 KB)
MAX_JSON_DEPTH = 32  # ours nest 3 deep
MAX_NUMBER_CHARS = 40  # digits of one JSON number: any float64 fits in 24; int() of thousands of digits is slow or refused
MAX_ZIP_ENTRIES = 4096  # a torch file has one entry per storage plus 6 (upstream: 42)
MAX_PICKLE_BYTES = 1 << 20  # data.pkl of a torch file (upstream: 4.7 KB; 64 layers with Adam state: 50 KB)
MAX_PICKLE_OPS = 50_000  # its instructions (upstream: 1,524; 64 layers with Adam state: 17,172); each costs microseconds
MAX_TENSOR_DIMS = 8

#: Globals a torch pickle of plain tensors names (module and name as the pickle spells them). Everything else is refused
#: before torch.load runs, even what weights_only would allow: bytearray, torch.FloatTensor and the like allocate whatever size
#: the pickle asks for, and meta, sparse, quantised or subclass tensors are not weights.
TENSOR_GLOBALS = frozenset(
    {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_parameter"}
    | {f"torch {kind}Storage" for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")}
    # dtypes without a storage class (float8, uint16, ...) are written as _rebuild_tensor_v3 of an UntypedStorage and a dtype
    | {"torch._utils _rebuild_tensor_v3", "torch.storage UntypedStorage"}
    | {f"torch {dtype}" for dtype in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
                                      "uint16", "uint32", "uint64", "complex32", "complex64", "complex128")}
)

#: safetensors dtype -> (torch dtype or None when it is not floating point, bytes per element)
SAFETENSORS_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (None, 1), "F8_E5M2": (None, 1), "C64": (None, 8),
    "I64": (None, 8), "I32": (None, 4), "I16": (None, 2), "I8": (None, 1),
    "U64": (None, 8), "U32": (None, 4), "U16": (None, 2), "U8": (None, 1), "BOOL": (None, 1),
}


# ------------------------------------------------------------------------------------------------------------ the file itself


def open_checkpoint(path: Path) -> tuple[BinaryIO, int]:
    """Open ``path`` for reading once (later checks read this handle, never the name again): (binary file, size).
    Only a regular file of 1 byte to MAX_FILE_BYTES is accepted; a FIFO would block the open, so it is opened non-blocking."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except PermissionError:
        if os.path.isdir(path):  # Windows refuses to open folders with EACCES
            raise CheckpointError(path, "is a directory, expected a checkpoint file") from None
        raise CheckpointError(path, "permission denied: this process may not read the file") from None
    except OSError as exc:  # a name too long, a symlink loop, a path through a file, ...
        raise CheckpointError(path, f"cannot open the file: {exc.strerror or type(exc).__name__}") from None
    except ValueError:
        raise CheckpointError(path, "the path contains a NUL character") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise CheckpointError(path, "is a directory, expected a checkpoint file")
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(path, "is not a regular file (a FIFO, device or socket); a checkpoint must be a file")
        if info.st_size == 0:
            raise CheckpointError(path, "the file is empty")
        if info.st_size > MAX_FILE_BYTES:
            raise CheckpointError(path, f"the file has {info.st_size:,} bytes, more than the {MAX_FILE_BYTES:,} a guidance checkpoint may have")
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise


def read_exactly(path: Path, handle: BinaryIO, offset: int, count: int, what: str) -> bytes:
    """``count`` bytes at ``offset`` (callers have checked that they lie inside the file); a file that shrank is truncated."""
    handle.seek(offset)
    data = handle.read(count)
    if len(data) != count:
        raise CheckpointError(path, f"truncated file: {what} ends past the end of the file")
    return data


def sniff_format(path: Path, handle: BinaryIO, size: int) -> str:
    """'safetensors', 'torch' (a zip) or 'pickle' (a raw pickle stream: torch's legacy format), decided by structure.

    A safetensors file starts with its header length (8 bytes, little endian) and then '{'; when that length ends in 0x80
    its first byte is the one a pickle starts with, so the safetensors structure is checked first."""
    head = read_exactly(path, handle, 0, min(size, 16), "the first bytes")
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if len(head) >= 10 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= MAX_HEADER_BYTES:
            if 8 + header_len > size:
                raise CheckpointError(path, f"truncated safetensors file: the header says {header_len:,} bytes, the file has {size:,}")
            return "safetensors"
        if head[0] != 0x80:
            raise CheckpointError(path, f"the safetensors header claims {header_len:,} bytes, more than the {MAX_HEADER_BYTES:,} allowed")
    if head[0] == 0x80 and len(head) >= 2 and 2 <= head[1] <= 5:
        return "pickle"
    raise CheckpointError(path, "not a guidance checkpoint: neither safetensors nor a PyTorch file")


# --------------------------------------------------------------------------------------------------------------------- JSON


class _JSONLimit(ValueError):
    pass


def _json_number(text: str):
    if len(text) > MAX_NUMBER_CHARS:
        raise _JSONLimit(f"has a number of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
    return float(text) if any(c in text for c in ".eE") else int(text)


def _json_object(pairs: list[tuple[str, object]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise _JSONLimit(f"has the key {show(key)} twice")
        result[key] = value
    return result


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included (unrolled: linear time)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """Deepest nesting of ``text`` (brackets inside strings do not count), without recursion."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def load_json(text: str, max_chars: int = MAX_JSON_CHARS):
    """Parse JSON from a stranger, bounded before parsing: ``ValueError`` saying what is wrong (``str(exc)`` reads
    after "the <field> ...")."""
    if len(text) > max_chars:
        raise ValueError(f"has {len(text):,} characters, more than the {max_chars:,} allowed")
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nests {depth:,} levels deep, more than the {MAX_JSON_DEPTH} allowed")
    try:
        return json.loads(text, object_pairs_hook=_json_object, parse_int=_json_number, parse_float=_json_number)
    except _JSONLimit:
        raise
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except (ValueError, RecursionError) as exc:  # cannot happen within the bounds above; kept so nothing escapes
        raise ValueError(f"is not valid JSON ({type(exc).__name__})") from None


# -------------------------------------------------------------------------------------------------------------- safetensors


class TensorEntry:
    """One tensor of a safetensors header: checked, not yet read."""

    __slots__ = ("name", "dtype_name", "dtype", "shape", "begin", "end")

    def __init__(self, name, dtype_name, dtype, shape, begin, end):
        self.name, self.dtype_name, self.dtype, self.shape, self.begin, self.end = name, dtype_name, dtype, shape, begin, end


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def safetensors_header(path: Path, handle: BinaryIO, size: int) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """(tensor entries by name, the string metadata, offset of the data section). Every entry's byte range is checked
    against its dtype and shape, the ranges must tile the data section exactly, and the data section must fit the file."""
    (header_len,) = struct.unpack("<Q", read_exactly(path, handle, 0, 8, "the header length"))
    raw = read_exactly(path, handle, 8, header_len, "the header")  # sniff_format bounded header_len
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(path, "corrupt safetensors file: the header is not UTF-8") from None
    try:
        header = load_json(text, MAX_HEADER_BYTES)
    except ValueError as exc:
        raise CheckpointError(path, f"corrupt safetensors file: the header {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors file: the header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(path, "corrupt safetensors file: '__metadata__' must map names to strings")
    entries = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(path, f"corrupt safetensors file: tensor {show(name)} needs exactly dtype, shape and data_offsets")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(path, f"tensor {show(name)} has an unknown dtype {show(dtype_name)}")
        if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS or not all(_is_count(d) for d in shape):
            raise CheckpointError(path, f"corrupt safetensors file: tensor {show(name)} has an invalid shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]:
            raise CheckpointError(path, f"corrupt safetensors file: tensor {show(name)} has invalid data_offsets")
        dtype, itemsize = SAFETENSORS_DTYPES[dtype_name]
        numel = 1
        for dim in shape:
            numel *= dim
        if numel * itemsize != offsets[1] - offsets[0]:
            raise CheckpointError(path, f"corrupt safetensors file: tensor {show(name)} has shape {tuple(shape)} of {dtype_name} "
                                        f"({numel * itemsize:,} bytes) but {offsets[1] - offsets[0]:,} bytes of data")
        entries[name] = TensorEntry(name, dtype_name, dtype, tuple(shape), offsets[0], offsets[1])
    data_start = 8 + header_len
    end = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != end:  # safetensors itself requires this: no gaps, no two tensors sharing bytes
            problem = "overlaps another tensor" if entry.begin < end else "leaves a gap before it"
            raise CheckpointError(path, f"corrupt safetensors file: tensor {show(entry.name)} {problem}")
        end = entry.end
    if data_start + end > size:
        raise CheckpointError(path, f"truncated safetensors file: the tensors need {end:,} bytes after the header, the file has {size - data_start:,}")
    if data_start + end < size:
        raise CheckpointError(path, f"corrupt safetensors file: {size - data_start - end:,} bytes follow the last tensor")
    return entries, meta, data_start


def read_safetensor(path: Path, handle: BinaryIO, data_start: int, entry: TensorEntry) -> torch.Tensor:
    """The tensor of a checked entry (floating point dtypes only), as a CPU tensor that owns its memory."""
    data = read_exactly(path, handle, data_start + entry.begin, entry.end - entry.begin, f"tensor {show(entry.name)}")
    if not data:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return torch.frombuffer(bytearray(data), dtype=entry.dtype).reshape(entry.shape)  # safetensors is little endian, as are hosts


# ---------------------------------------------------------------------------------------------------------------- torch zip

_EOCD = struct.Struct("<4s4H2LH")  # signature, disk, cd disk, entries on disk, entries, cd size, cd offset, comment length
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # flags at 3, method 4, sizes 8 and 9, name/extra/comment lengths 10-12, offset 16
_LOCAL = struct.Struct("<4s5H3L2H")  # method at 3, name and extra lengths at 9 and 10


def inspect_torch_zip(path: Path, handle: BinaryIO, size: int) -> bytes:
    """Check the zip a torch file is, entry by entry, from its central directory; return the pickle (``<folder>/data.pkl``).

    torch.save writes every entry stored (uncompressed), one after another, with the directory at the end. Anything else is
    refused: a compressed entry can inflate a small file to gigabytes, entries that share bytes can multiply the file, and a
    second directory could show another zip reader (torch's) different entries than the one checked here."""

    def corrupt(problem: str):
        return CheckpointError(path, f"corrupt or truncated PyTorch file: {problem}")

    if size < _EOCD.size + _LOCAL.size:
        raise corrupt("too short to be a zip")
    end = read_exactly(path, handle, size - _EOCD.size, _EOCD.size, "the zip directory")
    signature, disk, cd_disk, on_disk, count, cd_size, cd_offset, comment = _EOCD.unpack(end)
    if signature != b"PK\x05\x06":
        tail = read_exactly(path, handle, max(0, size - 65557), min(size, 65557), "the end of the file")
        if b"PK\x05\x06" in tail:  # zip readers disagree about where such a directory is; torch never writes one
            raise corrupt("bytes follow its zip directory (a comment or appended data), which torch never writes")
        raise corrupt("no zip directory at its end")
    if comment or disk or cd_disk or on_disk != count:
        raise corrupt("a zip with a comment or several disks, which torch never writes")
    cd_end = size - _EOCD.size
    if size >= _EOCD.size + _ZIP64_LOCATOR.size:
        locator = read_exactly(path, handle, cd_end - _ZIP64_LOCATOR.size, _ZIP64_LOCATOR.size, "the zip directory")
        sig, _, record_offset, _ = _ZIP64_LOCATOR.unpack(locator)
        if sig == b"PK\x06\x07":  # torch writes a zip64 record too; it must say exactly what the plain record says
            if record_offset + _ZIP64_EOCD.size != cd_end - _ZIP64_LOCATOR.size:
                raise corrupt("its zip64 directory record is misplaced")
            record = _ZIP64_EOCD.unpack(read_exactly(path, handle, record_offset, _ZIP64_EOCD.size, "the zip directory"))
            if record[0] != b"PK\x06\x06" or record[6:10] != (count, count, cd_size, cd_offset):
                raise corrupt("its zip64 directory record disagrees with the zip directory")
            cd_end = record_offset
    if count > MAX_ZIP_ENTRIES:
        raise corrupt(f"{count:,} zip entries, more than the {MAX_ZIP_ENTRIES:,} allowed")
    if cd_offset + cd_size != cd_end:  # the one place every zip reader finds the directory
        raise corrupt("its zip directory is not where the end record says")
    directory = read_exactly(path, handle, cd_offset, cd_size, "the zip directory")
    entries = []
    pos = 0
    for _ in range(count):
        if pos + _CENTRAL.size > len(directory):
            raise corrupt("its zip directory is cut short")
        fields = _CENTRAL.unpack_from(directory, pos)
        if fields[0] != b"PK\x01\x02":
            raise corrupt("its zip directory is damaged")
        flags, method, compressed, uncompressed = fields[3], fields[4], fields[8], fields[9]
        name_len, extra_len, comment_len, offset = fields[10], fields[11], fields[12], fields[16]
        raw_name = directory[pos + _CENTRAL.size:pos + _CENTRAL.size + name_len]
        pos += _CENTRAL.size + name_len + extra_len + comment_len
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise corrupt("a zip entry name is not UTF-8") from None
        if flags & 0x1:
            raise corrupt(f"the zip entry {show(name)} is encrypted")
        if method != 0:
            raise CheckpointError(path, f"refused: the zip entry {show(name)} is compressed (method {method}); torch writes entries "
                                        "uncompressed, and inflating one is how a small file asks for gigabytes")
        if compressed != uncompressed:
            raise corrupt(f"the zip entry {show(name)} claims {uncompressed:,} bytes but stores {compressed:,}")
        entries.append((offset, name, raw_name, uncompressed))
    if pos != len(directory):
        raise corrupt("its zip directory has bytes that belong to no entry")
    names = [name for _, name, _, _ in entries]
    if len(set(names)) != len(names):
        raise corrupt("two zip entries have the same name")
    folder = names[0].split("/", 1)[0] if names else ""
    pickle_name = f"{folder}/data.pkl"
    if pickle_name not in names or any(not n.startswith(folder + "/") for n in names):
        raise corrupt("no data.pkl in the zip (not a torch.save file)")
    position = 0  # entries must follow one another inside the file, before the directory: no shared bytes, nothing outside
    pickle_range = None
    for offset, name, raw_name, length in sorted(entries):
        if offset < position:
            raise corrupt(f"the zip entry {show(name)} overlaps another")
        if offset + _LOCAL.size > cd_offset:
            raise corrupt(f"the zip entry {show(name)} lies outside the file")
        fields = _LOCAL.unpack(read_exactly(path, handle, offset, _LOCAL.size, f"the zip entry {show(name)}"))
        data_start = offset + _LOCAL.size + fields[9] + fields[10]
        if fields[0] != b"PK\x03\x04" or fields[3] != 0 or data_start + length > cd_offset:
            raise corrupt(f"the zip entry {show(name)} is damaged or lies outside the file")
        if read_exactly(path, handle, offset + _LOCAL.size, fields[9], "a zip entry name") != raw_name:
            raise corrupt(f"the zip entry {show(name)} has a different name in its local header")
        position = data_start + length
        if name == pickle_name:
            pickle_range = (data_start, length)
    if pickle_range[1] > MAX_PICKLE_BYTES:
        raise corrupt(f"its data.pkl has {pickle_range[1]:,} bytes, more than the {MAX_PICKLE_BYTES:,} allowed")
    return read_exactly(path, handle, pickle_range[0], pickle_range[1], "data.pkl")


# ------------------------------------------------------------------------------------------------------------------ pickles

#: The globals a torch pickle may call (REDUCE), and what it calls them with: every other global (storage classes, dtypes) is
#: only data inside a persistent id or an argument. torch.FloatStorage(n) or UntypedStorage(n) would allocate n elements, and
#: OrderedDict(x) iterates x, which a zero-stride view can make 10^9 rows long.
CALLABLE_GLOBALS = frozenset({"torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_tensor_v3", "torch._utils _rebuild_parameter",
                              "collections OrderedDict"})

#: The opcodes torch.save writes (pickle protocol 2, the subset torch's weights_only unpickler implements, less NEWOBJ).
TORCH_OPCODES = frozenset({
    "PROTO", "STOP", "GLOBAL", "REDUCE", "BUILD", "BINPERSID", "MARK", "POP", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE",
    "EMPTY_LIST", "APPEND", "APPENDS", "EMPTY_DICT", "SETITEM", "SETITEMS", "EMPTY_SET", "NONE", "NEWTRUE", "NEWFALSE", "BININT",
    "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT",
})

_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_MARK, _EMPTY_TUPLE = object(), object()


class _Global:
    __slots__ = ("key",)

    def __init__(self, key: str):
        self.key = key  # "module name", as the pickle spells it

    def __str__(self):
        return self.key.replace(" ", ".", 1)


def scan_pickle(data: bytes, max_pickles: int = 1, strict: bool = True) -> tuple[str, str] | None:
    """Why the pickle(s) in ``data`` are not plain tensors, or None. Reads the opcodes only (pickletools), never builds an
    object, and follows the stack abstractly to see what each REDUCE calls and with what:

    ('global', 'module.name'): a global outside :data:`TENSOR_GLOBALS`;
    ('call', what): a REDUCE of anything but a tensor rebuilder (or of OrderedDict with arguments);
    ('build', what): a BUILD whose state is not a dict;
    ('opcode', name): an instruction torch.save never writes;
    ('size', count): more than MAX_PICKLE_OPS instructions.

    With ``strict`` False only globals are looked for (to name what a raw pickle asks for). A stream that cannot be read
    to its end raises ``ValueError``. Time and memory are linear in ``len(data)``."""
    stream = io.BytesIO(data)
    for _ in range(max_pickles):
        if stream.tell() >= len(data):
            break
        stack = _AbstractStack()
        strings: list = []  # recent string constants, to name a STACK_GLOBAL (protocol 4) in the message
        try:
            for count, (opcode, arg, _) in enumerate(pickletools.genops(stream)):
                if count >= MAX_PICKLE_OPS:
                    return "size", f"{MAX_PICKLE_OPS:,}"
                name = opcode.name
                if name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    if f"{module} {attr}" not in TENSOR_GLOBALS:
                        return "global", f"{module}.{attr}"
                elif name == "STACK_GLOBAL":
                    return "global", ".".join(strings[-2:]) if len(strings) >= 2 else "a global named on the stack"
                elif name in ("EXT1", "EXT2", "EXT4"):
                    return "global", f"extension code {arg}"
                if name in _STRING_OPS:
                    strings = [*strings[-1:], arg if isinstance(arg, str) else arg.decode("latin-1")]
                if not strict:
                    continue
                if name not in TORCH_OPCODES:
                    return "opcode", name
                items = stack.items
                if name == "REDUCE":
                    callee, args = items[-2:] if len(items) >= 2 else (None, None)
                    if not isinstance(callee, _Global) or callee.key not in CALLABLE_GLOBALS:
                        return "call", str(callee) if isinstance(callee, _Global) else "an object that is not a function"
                    if callee.key == "collections OrderedDict" and args is not _EMPTY_TUPLE:
                        return "call", "collections.OrderedDict with arguments"
                elif name == "BUILD" and (len(items) < 2 or items[-1] != "dict"):
                    return "build", "a state that is not a dict"
                stack.apply(opcode, arg)
        except Exception as exc:  # pickletools raises ValueError for bad opcodes and lengths, and more for odd arguments
            raise ValueError(printable(str(exc), 120) or type(exc).__name__) from None
    return None


class _AbstractStack:
    """The pickle machine's stack and memo with each object replaced by what the checks need: a global, the empty tuple,
    or pickletools' name for its kind ("dict", "tuple", "any", ...). Every opcode costs O(1) amortised."""

    def __init__(self):
        self.items: list = []
        self.memo: dict = {}
        self.marks = 0

    def apply(self, opcode, arg) -> None:
        """What ``opcode`` does to the stack, as pickletools documents it (``stack_before`` / ``stack_after``)."""
        items, name, before, after = self.items, opcode.name, opcode.stack_before, opcode.stack_after
        if pickletools.markobject in before or (name == "POP" and items and items[-1] is _MARK):
            if not self.marks:
                raise ValueError(f"{name} without a MARK")
            while items.pop() is not _MARK:
                pass
            self.marks -= 1
            count = before.index(pickletools.markobject) if pickletools.markobject in before else 0
        else:
            count = len(before)
        if count > len(items):
            raise ValueError(f"{name} pops {count} items from a stack of {len(items)}")
        top = items[-1] if items else None
        if name in ("BINPUT", "LONG_BINPUT", "PUT"):
            self.memo[arg] = top
        for _ in range(count):
            if items.pop() is _MARK:
                raise ValueError(f"{name} takes a MARK as an argument")
        if name == "GLOBAL":
            items.append(_Global(str(arg)))
        elif name == "EMPTY_TUPLE":
            items.append(_EMPTY_TUPLE)
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            if arg not in self.memo:
                raise ValueError(f"{name} of memo {arg}, never stored")
            items.append(self.memo[arg])
        elif name == "DUP":
            items += [top, top]
        else:
            for kind in after:
                if kind is pickletools.markobject:
                    self.marks += 1
                    items.append(_MARK)
                else:
                    items.append(kind.name)


_TORCH_GLOBAL_MESSAGE = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")
_TORCH_ERROR = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")
_ADVICE = re.compile(r"weights_only|safe_globals|trust", re.IGNORECASE)


def torch_refusal(message: str) -> tuple[str | None, str | None]:
    """(the global, or else the instruction) torch's weights_only unpickler refused, from its message; the rest of that
    message is advice to load the file unsafely, which we never relay."""
    match = _TORCH_GLOBAL_MESSAGE.search(message)
    if match:
        return match.group(1), None
    match = _TORCH_ERROR.search(message)
    detail = re.split(r"(?<=[.!?])\s", match.group(1).strip(), maxsplit=1)[0].rstrip(".") if match else ""
    return None, (detail if detail and len(detail) <= 120 and not _ADVICE.search(detail) else None)


def short_reason(exc: BaseException) -> str:
    """A library's error as a short clause for our message: its first sentence when that is short and gives no advice about
    loading unsafely, else only the exception's type."""
    text = printable(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].rstrip(".")
    if not sentence or len(sentence) > 160 or "weights_only" in sentence or "pickle" in sentence.lower():
        return type(exc).__name__
    return f"{type(exc).__name__}: {sentence}"
