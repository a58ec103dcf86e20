"""Bounded, paranoid reading of a safetensors file: header and finite-value check.

The 8-byte header length and the JSON header are parsed here, with a cap, before anything
else touches the file, so a corrupt or hostile file (huge length, offsets out of range,
overlapping tensors) is refused in bounded time and memory. Values are checked through a
read-only memory map, chunk by chunk. This module knows nothing about LoRA or PEFT.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraplex.errors import InvalidAdapter

MAX_HEADER_BYTES = 16 << 20
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: dtype, shape and absolute byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class TensorFile:
    """The checked header of a safetensors file."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def _bad(path: Path, problem: str) -> InvalidAdapter:
    return InvalidAdapter(f"{path.name} is not a valid safetensors file: {problem}.")


def read_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> TensorFile:
    """Parse and check the header of ``path``; raise ``InvalidAdapter`` on any inconsistency."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _bad(path, f"it is {size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > max_header_bytes:
            raise _bad(
                path,
                f"header length {header_len} exceeds the {max_header_bytes}-byte limit "
                "(corrupt or hostile file)",
            )
        if header_len > size - 8:
            raise _bad(path, f"header length {header_len} is larger than the file ({size} bytes)")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(path, f"the header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, "__metadata__ must map strings to strings")
    data_start = 8 + header_len
    tensors = {
        name: _entry(path, name, entry, data_start, size - data_start)
        for name, entry in header.items()
    }
    _check_layout(path, tensors, data_start, size)
    return TensorFile(path=path, tensors=tensors, metadata=metadata)


def element_count(path: Path) -> int:
    """The number of elements of every tensor in ``path``, a file ``read_header`` accepted
    before (a validated version). The header is parsed but not checked again: a third of
    ``read_header``'s time, on every cold load. A header that no longer parses is refused
    with ``read_header``'s error."""
    try:
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(min(header_len, MAX_HEADER_BYTES)))
        return sum(math.prod(e["shape"]) for name, e in header.items() if name != "__metadata__")
    except (struct.error, ValueError, TypeError, KeyError, AttributeError):
        read_header(path)  # names what is wrong
        raise _bad(path, "its header changed since it was checked") from None


def _entry(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    """Check one header entry and return it with absolute offsets."""
    if not isinstance(entry, dict):
        raise _bad(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _bad(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or not offsets[0] <= offsets[1] <= data_len
    ):
        raise _bad(
            path, f"tensor {name!r} has data offsets {offsets!r} outside the {data_len}-byte data"
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise _bad(
            path,
            f"tensor {name!r} of shape {shape} {dtype} needs {expected} bytes, "
            f"its offsets span {offsets[1] - offsets[0]}",
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """Tensors must tile the data section exactly: no overlap, no gap, no trailing bytes."""
    cursor = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != cursor:
            problem = "overlaps another tensor" if info.start < cursor else "leaves a gap before it"
            raise _bad(path, f"tensor {info.name!r} {problem}")
        cursor = info.end
    if cursor != size:
        raise _bad(path, f"{size - cursor} bytes after the last tensor are not described")


def nonfinite_tensors(tensor_file: TensorFile, names: list[str] | None = None) -> list[str]:
    """Names of float tensors that contain NaN or Inf (read via one memory map, in chunks)."""
    float_tensors = [
        tensor_file.tensors[name]
        for name in (names if names is not None else list(tensor_file.tensors))
        if tensor_file.tensors[name].dtype in FLOAT_DTYPES
        and tensor_file.tensors[name].end > tensor_file.tensors[name].start
    ]
    if not float_tensors:
        return []
    # One map for the file: a map per tensor cost ~0.2 ms each (path resolution), which was
    # most of a cold adapter load.
    raw = np.memmap(tensor_file.path, dtype=np.uint8, mode="r")
    try:
        return [info.name for info in float_tensors if _has_nonfinite(raw, info)]
    finally:
        del raw


def _has_nonfinite(raw: np.ndarray, info: TensorInfo) -> bool:
    """Whether the tensor holds a NaN or an Inf; bf16 is checked on its bit pattern."""
    np_dtype = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}[info.dtype]
    values = raw[info.start : info.end].view(np_dtype)
    for begin in range(0, values.size, _CHUNK_ELEMENTS):
        chunk = values[begin : begin + _CHUNK_ELEMENTS]
        if info.dtype == "BF16":
            if np.any((chunk & 0x7F80) == 0x7F80):
                return True
        elif not np.isfinite(chunk).all():
            return True
    return False
