"""The safetensors header check: every malformed kind refused, every real file accepted.

Malformed files are written byte by byte; valid ones come from the real
``safetensors`` library, which also serves as an oracle: whatever our check
refuses, the library refuses too (our rules are the format's rules).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
from factories import make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from airpack.errors import MalformedSafetensorsError, UnsafePathError
from airpack.safetensors_check import DTYPE_BITS, MAX_HEADER_BYTES, parse_header, read_header, summarize


def st_file(path: Path, header: dict[str, Any] | bytes, data: bytes = b"", *, length: int | None = None) -> Path:
    """Write a safetensors file by hand: 8-byte little-endian length, header, data."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return path


def t(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def library_refuses(path: Path) -> bool:
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                f.get_slice(k)
    except Exception:  # any refusal by the library counts
        return True
    return False


# (id, header, data, explicit length, message fragment)
MALFORMED: list[tuple[str, dict[str, Any] | bytes, bytes, int | None, str]] = [
    ("length-past-end", b'{"a":1}', b"", 1000, "runs past the end"),
    ("length-over-cap", b"{}", b"", MAX_HEADER_BYTES + 1, "exceeds the"),
    ("length-2^64-1", b"{}", b"", 2**64 - 1, "exceeds the"),
    ("not-json", b"{not json}", b"", None, "not valid JSON"),
    ("not-utf8", b'{"\xff\xfe": 1}', b"", None, "not valid JSON"),
    ("truncated-json", b'{"a": {"dtype": "F32"', b"", None, "not valid JSON"),
    ("not-an-object", b"[1, 2]", b"", None, "does not start with '{'"),
    ("leading-space", b' {"a": 1}', b"", None, "does not start with '{'"),
    ("tensor-not-an-object", {"a": [1]}, b"", None, "exactly dtype, shape and data_offsets"),
    ("tensor-extra-key", {"a": {**t("F32", [1], 0, 4), "x": 1}}, b"\0" * 4, None, "exactly dtype"),
    ("tensor-missing-key", {"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None, "exactly dtype"),
    ("metadata-not-strings", {"__metadata__": {"a": 1}}, b"", None, "__metadata__"),
    ("metadata-not-object", {"__metadata__": "x"}, b"", None, "__metadata__"),
    ("unknown-dtype", {"a": t("F128", [1], 0, 16)}, b"\0" * 16, None, "unknown dtype"),
    ("lowercase-dtype", {"a": t("f32", [1], 0, 4)}, b"\0" * 4, None, "unknown dtype"),
    ("dtype-not-string", {"a": t(4, [1], 0, 4)}, b"\0" * 4, None, "unknown dtype"),  # type: ignore[arg-type]
    ("negative-dim", {"a": t("F32", [-1], 0, 4)}, b"\0" * 4, None, "invalid shape"),
    ("string-dim", {"a": t("F32", ["1"], 0, 4)}, b"\0" * 4, None, "invalid shape"),
    ("bool-dim", {"a": t("F32", [True], 0, 4)}, b"\0" * 4, None, "invalid shape"),
    ("shape-not-list", {"a": t("F32", 1, 0, 4)}, b"\0" * 4, None, "invalid shape"),  # type: ignore[arg-type]
    ("float-dim", b'{"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}', b"\0" * 4, None,
     "floating-point"),
    ("offsets-past-data", {"a": t("F32", [2], 0, 8)}, b"\0" * 4, None, "out of bounds"),
    ("offsets-reversed", {"a": t("F32", [1], 4, 0)}, b"\0" * 4, None, "out of bounds"),
    ("offsets-negative", {"a": t("F32", [1], -4, 0)}, b"\0" * 4, None, "out of bounds"),
    ("offsets-three", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, b"\0" * 8, None,
     "invalid data_offsets"),
    ("offsets-strings", {"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, b"\0" * 4, None,
     "invalid data_offsets"),
    ("overlap", {"a": t("F32", [2], 0, 8), "b": t("F32", [2], 4, 12)}, b"\0" * 12, None, "overlaps"),
    ("same-range", {"a": t("F32", [1], 0, 4), "b": t("F32", [1], 0, 4)}, b"\0" * 4, None, "overlaps"),
    ("gap", {"a": t("F32", [2], 0, 8), "b": t("F32", [2], 12, 20)}, b"\0" * 20, None, "not contiguous"),
    ("gap-at-start", {"a": t("F32", [1], 4, 8)}, b"\0" * 8, None, "not contiguous"),
    ("trailing-bytes", {"a": t("F32", [2], 0, 8)}, b"\0" * 12, None, "trailing bytes"),
    ("trailing-bytes-no-tensors", {}, b"\0", None, "trailing bytes"),
    ("shape-times-dtype-too-small", {"a": t("F32", [3], 0, 8)}, b"\0" * 8, None, "data_offsets span"),
    ("shape-times-dtype-too-big", {"a": t("F16", [2, 2], 0, 16)}, b"\0" * 16, None, "data_offsets span"),
    ("f4-odd-elements", {"a": t("F4", [3], 0, 2)}, b"\0" * 2, None, "data_offsets span"),
    ("duplicate-tensor", b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                         b'"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0", None, "duplicate key"),
    ("deeply-nested", b'{"__metadata__": ' + b"[" * 500 + b"]" * 500 + b"}", b"", None, "not valid JSON"),
]


@pytest.mark.parametrize(("header", "data", "length", "match"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_header_is_refused(tmp_path: Path, header: dict[str, Any] | bytes, data: bytes,
                                     length: int | None, match: str) -> None:
    p = st_file(tmp_path / "bad.safetensors", header, data, length=length)
    with pytest.raises(MalformedSafetensorsError, match=match) as e:
        read_header(p, display="models/x/bad.safetensors")
    assert e.value.exit_code == 3
    assert e.value.path == "models/x/bad.safetensors"
    assert "models/x/bad.safetensors" in e.value.message


# Where airpack is deliberately stricter than the library's reader: an ambiguous header
# (a repeated tensor name, which the library resolves as "last wins"), unknown fields,
# and __metadata__ values it does not type-check.
STRICTER = {"tensor-extra-key", "duplicate-tensor", "metadata-not-strings", "metadata-not-object"}
ORACLE = [m for m in MALFORMED if m[0] not in STRICTER]


@pytest.mark.parametrize(("header", "data", "length"), [m[1:4] for m in ORACLE], ids=[m[0] for m in ORACLE])
def test_the_real_library_refuses_what_we_refuse(tmp_path: Path, header: dict[str, Any] | bytes, data: bytes,
                                                 length: int | None) -> None:
    p = st_file(tmp_path / "bad.safetensors", header, data, length=length)
    assert library_refuses(p)


@pytest.mark.parametrize("size", [0, 1, 7])
def test_file_shorter_than_eight_bytes(tmp_path: Path, size: int) -> None:
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x02" * size)
    with pytest.raises(MalformedSafetensorsError, match="shorter than the 8-byte header length"):
        read_header(p)


def test_header_cap_is_checked_before_reading(tmp_path: Path) -> None:
    """A length just over the cap, in a file that really is that long (sparse): refused without reading it."""
    p = tmp_path / "big.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{")
        f.truncate(8 + MAX_HEADER_BYTES + 1)
    with pytest.raises(MalformedSafetensorsError, match="exceeds the 100000000-byte limit"):
        read_header(p)


def test_symlinked_safetensors_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.safetensors"
    save_file({"a": np.zeros(2, dtype=np.float32)}, str(real))
    (tmp_path / "link.safetensors").symlink_to(real)
    with pytest.raises(UnsafePathError):
        read_header(tmp_path / "link.safetensors")


def test_parse_header_refuses_a_header_longer_than_the_file() -> None:
    with pytest.raises(MalformedSafetensorsError, match="past the end"):
        parse_header(b"{}", 5)


# -- valid files from the real library ---------------------------------------------------------------


def test_numpy_dtypes_from_the_real_library(tmp_path: Path) -> None:
    arrays = {
        "f16": np.ones((3, 4), dtype=np.float16),
        "f32": np.ones((5,), dtype=np.float32),
        "f64": np.ones((2, 2, 2), dtype=np.float64),
        "i8": np.ones((7,), dtype=np.int8),
        "u8": np.ones((1, 9), dtype=np.uint8),
        "i16": np.ones((3,), dtype=np.int16),
        "i32": np.ones((4, 1), dtype=np.int32),
        "i64": np.ones((2,), dtype=np.int64),
        "u64": np.ones((2,), dtype=np.uint64),
        "bool": np.ones((6,), dtype=np.bool_),
        "scalar": np.array(3.0, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    p = tmp_path / "m.safetensors"
    save_file(arrays, str(p), metadata={"format": "pt", "note": "x"})
    info = read_header(p)
    assert info.parameters == sum(int(a.size) for a in arrays.values())
    assert info.data_bytes == sum(a.nbytes for a in arrays.values())
    assert info.metadata == {"format": "pt", "note": "x"}
    assert info.file_size == p.stat().st_size
    by = {x.name: x for x in info.tensors}
    for name, a in arrays.items():
        assert by[name].shape == a.shape
        assert by[name].numel == a.size
        assert by[name].nbytes == a.nbytes
    # The library agrees on every tensor's shape and dtype.
    with safetensors.safe_open(str(p), framework="numpy") as f:
        for name in f.keys():  # noqa: SIM118
            assert list(by[name].shape) == f.get_slice(name).get_shape()
    assert info.dtype_parameters()["F16"] == 12 and info.dtype_parameters()["BOOL"] == 6


@pytest.mark.parametrize(
    ("lib_dtype", "header_dtype", "shape", "nbytes"),
    [
        ("bfloat16", "BF16", [3, 5], 30),
        ("float8_e4m3fn", "F8_E4M3", [4, 4], 16),
        ("float8_e5m2", "F8_E5M2", [8], 8),
        ("float8_e4m3fnuz", "F8_E4M3FNUZ", [2, 3], 6),
        ("float8_e5m2fnuz", "F8_E5M2FNUZ", [2, 3], 6),
        ("float8_e8m0fnu", "F8_E8M0", [5], 5),
        ("float4_e2m1fn_x2", "F4", [2, 6], 6),
        ("complex64", "C64", [3], 24),
        ("uint16", "U16", [4], 8),
        ("uint32", "U32", [4], 16),
    ],
)
def test_other_dtypes_from_the_real_library(tmp_path: Path, lib_dtype: str, header_dtype: str,
                                            shape: list[int], nbytes: int) -> None:
    buf = np.zeros(nbytes, dtype=np.uint8)
    storage_shape = [*shape[:-1], shape[-1] // 2] if lib_dtype == "float4_e2m1fn_x2" else shape
    spec = safetensors.TensorSpec(dtype=lib_dtype, shape=storage_shape, data_ptr=buf.ctypes.data, data_len=nbytes)
    p = tmp_path / "x.safetensors"
    p.write_bytes(safetensors.serialize({"x": spec, "y": spec}))
    info = read_header(p)
    numel = int(np.prod(shape))
    assert [x.dtype for x in info.tensors] == [header_dtype, header_dtype]
    assert info.parameters == 2 * numel
    assert info.dtype_parameters() == {header_dtype: 2 * numel}
    assert header_dtype in DTYPE_BITS


def test_tiny_model_shards_sum_to_the_model(tmp_path: Path) -> None:
    from factories import llama_config, llama_tensors

    d = make_model(tmp_path / "m", shards=3)
    infos = [read_header(p) for p in sorted(d.glob("*.safetensors"))]
    tensors = llama_tensors(llama_config())
    expected = sum(int(a.size) for a in tensors.values())
    assert summarize(infos) == {"parameters": expected, "dtypes": {"F16": expected}}
    assert sorted(x.name for i in infos for x in i.tensors) == sorted(tensors)


def test_header_padding_and_empty_file(tmp_path: Path) -> None:
    p = st_file(tmp_path / "pad.safetensors", b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}   ', b"ab")
    assert read_header(p).parameters == 2
    p = st_file(tmp_path / "empty.safetensors", b"{}")
    info = read_header(p)
    assert info.tensors == () and info.parameters == 0


# -- properties -------------------------------------------------------------------------------------------

DTYPES = ["F16", "BF16", "F32", "I8", "U8", "I64", "BOOL", "F8_E4M3"]
LIB = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "I8": "int8", "U8": "uint8", "I64": "int64",
       "BOOL": "bool", "F8_E4M3": "float8_e4m3fn"}

tensor_specs = st.dictionaries(
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12).filter(
        lambda s: s != "__metadata__"),
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)),
    max_size=6,
)


def serialize(specs: dict[str, tuple[str, list[int]]]) -> bytes:
    buffers = []
    tensors = {}
    for name, (dtype, shape) in specs.items():
        n = int(np.prod(shape)) * DTYPE_BITS[dtype] // 8
        buf = np.zeros(max(n, 1), dtype=np.uint8)
        buffers.append(buf)
        tensors[name] = safetensors.TensorSpec(dtype=LIB[dtype], shape=shape, data_ptr=buf.ctypes.data, data_len=n)
    return bytes(safetensors.serialize(tensors))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=tensor_specs)
def test_property_every_library_file_is_accepted_with_exact_counts(specs: dict[str, tuple[str, list[int]]]) -> None:
    raw = serialize(specs)
    (n,) = struct.unpack("<Q", raw[:8])
    info = parse_header(raw[8:8 + n], len(raw))
    assert {x.name for x in info.tensors} == set(specs)
    assert info.parameters == sum(int(np.prod(s)) for _, s in specs.values())
    assert info.data_bytes == len(raw) - 8 - n


@settings(max_examples=150, deadline=None)
@given(specs=tensor_specs, data=st.data())
def test_property_a_changed_header_byte_is_refused_or_still_consistent(
    specs: dict[str, tuple[str, list[int]]], data: st.DataObject
) -> None:
    """Change one byte of a valid header: refused with the named error, or (if still valid) self-consistent."""
    raw = bytearray(serialize(specs))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        if n > MAX_HEADER_BYTES or 8 + n > len(raw):
            return  # read_header refuses these by length before parsing (tested above)
        info = parse_header(bytes(raw[8:8 + n]), len(raw))
    except MalformedSafetensorsError:
        return
    # Still valid (e.g. a changed name or metadata byte): the numbers must still add up.
    assert info.data_bytes == len(raw) - 8 - n
    assert all(x.nbytes * 8 == x.numel * DTYPE_BITS[x.dtype] for x in info.tensors)
