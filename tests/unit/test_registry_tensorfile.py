"""Bounded safetensors header parsing and the NaN/Inf check, on hand-made files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from loraplex.errors import InvalidAdapter
from loraplex.registry.tensorfile import element_count, nonfinite_tensors, read_header


def _raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    body = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def test_reads_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    save_file({"a": np.ones((2, 3), np.float32), "b": np.zeros(4, np.float16)}, path)
    header = read_header(path)
    assert header.tensors["a"].shape == (2, 3)
    assert header.tensors["b"].dtype == "F16"
    assert nonfinite_tensors(header) == []
    assert element_count(path) == 2 * 3 + 4


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"a": {"dtype": "F32"}}', b""])
def test_element_count_of_a_file_broken_since_its_check_names_the_problem(
    tmp_path: Path, body: bytes
) -> None:
    path = _raw(tmp_path / "broken.safetensors", body)
    with pytest.raises(InvalidAdapter, match="not a valid safetensors file"):
        element_count(path)


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        ({}, b"", 2**63, "exceeds the 16777216-byte limit"),
        ({}, b"", 1000, "larger than the file"),
        (b"{not json", b"", None, "not valid JSON"),
        (b"\xff\xfe", b"", None, "not valid JSON"),
        ([1, 2], b"", None, "not a JSON object"),
        (
            {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"",
            None,
            "outside the 0-byte data",
        ),
        (
            {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 2**62]}},
            b"\0" * 8,
            None,
            "outside the 8-byte data",
        ),
        (
            {"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "needs 12 bytes, its offsets span 8",
        ),
        (
            {"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "invalid shape",
        ),
        (
            {"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
            b"\0" * 8,
            None,
            "outside the 8-byte data",
        ),
        (
            {"t": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            None,
            "unknown dtype",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\0" * 8,
            None,
            "overlaps another tensor",
        ),
        (
            {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
            b"\0" * 8,
            None,
            "leaves a gap",
        ),
        (
            {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
            b"\0" * 8,
            None,
            "4 bytes after the last tensor",
        ),
        ({"__metadata__": {"k": 1}}, b"", None, "__metadata__ must map strings"),
        ({"t": [1]}, b"", None, "is not an object"),
    ],
)
def test_refuses_corrupt_or_lying_headers(
    tmp_path: Path, header: object, data: bytes, length: int | None, message: str
) -> None:
    path = _raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(InvalidAdapter, match="not a valid safetensors file") as err:
        read_header(path)
    assert message in err.value.message


def test_refuses_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(InvalidAdapter, match="shorter than the 8-byte header length"):
        read_header(path)


def test_huge_claimed_header_is_refused_without_reading_it(tmp_path: Path) -> None:
    """A file claiming a 1 TB header is refused from its first 8 bytes (bounded memory)."""
    path = _raw(tmp_path / "huge.safetensors", {}, b"", 10**12)
    with pytest.raises(InvalidAdapter, match="exceeds"):
        read_header(path, max_header_bytes=1024)


def test_deeply_nested_json_is_refused(tmp_path: Path) -> None:
    path = _raw(tmp_path / "deep.safetensors", b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(InvalidAdapter, match="not valid JSON"):
        read_header(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_finds_nonfinite_values(tmp_path: Path, bad: float, dtype: type) -> None:
    values = np.zeros(100, dtype)
    values[57] = bad
    path = tmp_path / "nan.safetensors"
    save_file({"good": np.ones(3, dtype), "bad": values}, path)
    assert nonfinite_tensors(read_header(path)) == ["bad"]


@pytest.mark.parametrize("bits", [0x7FC0, 0x7F80, 0xFF80, 0x7F81])
def test_finds_nonfinite_bf16_by_bit_pattern(tmp_path: Path, bits: int) -> None:
    words = np.full(10, 0x3F80, np.uint16)  # 1.0 in bf16
    words[3] = bits
    header = {"t": {"dtype": "BF16", "shape": [10], "data_offsets": [0, 20]}}
    path = _raw(tmp_path / "bf16.safetensors", header, words.tobytes())
    assert nonfinite_tensors(read_header(path)) == ["t"]


def test_finite_bf16_passes(tmp_path: Path) -> None:
    words = np.array([0x3F80, 0x7F7F, 0xFF7F, 0x0001], np.uint16)  # 1, max, -max, tiny
    header = {"t": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}
    path = _raw(tmp_path / "bf16.safetensors", header, words.tobytes())
    assert nonfinite_tensors(read_header(path)) == []
