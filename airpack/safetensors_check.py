"""Validate a safetensors header without loading a tensor.

A malformed header is how a hostile weight file attacks a loader (huge
allocations, overlapping reads, data hidden after the last tensor), so every
rule of the format is checked against the file's real size. The result is
also what the VRAM estimator needs: exact bytes, dtypes and parameter counts.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._fs import open_regular_nofollow
from ._json import StrictJSONError, loads_strict
from .errors import MalformedSafetensorsError

MAX_HEADER_BYTES = 100_000_000

# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SafetensorsInfo:
    """A validated header: the tensors in file order and the metadata strings."""

    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    header_size: int = 0
    file_size: int = 0

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def dtype_parameters(self) -> dict[str, int]:
        c: Counter[str] = Counter()
        for t in self.tensors:
            c[t.dtype] += t.numel
        return dict(sorted(c.items()))


def _bad(display: str, why: str) -> MalformedSafetensorsError:
    return MalformedSafetensorsError(f"malformed safetensors {display}: {why}", path=display)


def parse_header(header: bytes, file_size: int, *, display: str = "<safetensors>") -> SafetensorsInfo:
    """Validate header bytes (the JSON after the 8-byte length) against the file size."""
    n = len(header)
    data_len = file_size - 8 - n
    if data_len < 0:
        raise _bad(display, "header runs past the end of the file")
    obj = _load_header_object(header, display)
    metadata: dict[str, str] = {}
    tensors: list[TensorInfo] = []
    for name, spec in obj.items():
        if name == "__metadata__":
            metadata = _parse_metadata(spec, display)
        else:
            tensors.append(_parse_tensor(name, spec, data_len, display))
    tensors.sort(key=lambda t: (t.begin, t.end))
    _check_contiguous(tensors, data_len, display)
    return SafetensorsInfo(tensors=tuple(tensors), metadata=metadata, header_size=n, file_size=file_size)


def _load_header_object(header: bytes, display: str) -> dict[str, Any]:
    if not header.startswith(b"{"):
        raise _bad(display, "header does not start with '{'")
    try:
        obj = loads_strict(header, allow_floats=False, max_depth=4)
    except StrictJSONError as e:
        raise _bad(display, f"header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _bad(display, "header is not a JSON object")
    return obj


def _parse_metadata(spec: object, display: str) -> dict[str, str]:
    if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
        raise _bad(display, "__metadata__ must map strings to strings")
    return dict(spec)


def _parse_tensor(name: str, spec: object, data_len: int, display: str) -> TensorInfo:
    """One tensor entry: a known dtype, a shape of non-negative ints, offsets inside the data whose span is exactly its bytes."""
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise _bad(display, f"tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _bad(display, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad(display, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise _bad(display, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _bad(display, f"tensor {name!r} offsets [{begin}, {end}] are out of bounds (data is {data_len} bytes)")
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8 != 0 or bits // 8 != end - begin:
        raise _bad(
            display,
            f"tensor {name!r}: shape {shape} x {dtype} is {bits / 8:g} bytes but data_offsets span {end - begin}",
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_contiguous(tensors: list[TensorInfo], data_len: int, display: str) -> None:
    """Tensors sorted by offset must tile the data exactly: no overlap, no gap, nothing after the last."""
    pos = 0
    for t in tensors:
        if t.begin < pos:
            raise _bad(display, f"tensor {t.name!r} overlaps the tensor before it")
        if t.begin > pos:
            raise _bad(display, f"gap of {t.begin - pos} bytes before tensor {t.name!r} (not contiguous)")
        pos = t.end
    if pos != data_len:
        raise _bad(display, f"{data_len - pos} trailing bytes after the last tensor")


class HeaderCollector:
    """The 8-byte length and the JSON header of a safetensors file, taken from its bytes in whatever chunks they come.

    The one reader of the header's framing: ``read_header_fd`` feeds it from a
    file, the verification pipeline from the very bytes it hashes (a tar
    member, a blob, a kernel copy read back). The length is capped before a
    byte of the header is kept.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.want = 8
        self.length: int | None = None

    @property
    def wanted(self) -> int:
        """How many more bytes the header needs (0 once it is whole, or once the length is over the cap)."""
        if self.length is not None and self.length > MAX_HEADER_BYTES:
            return 0
        return self.want - len(self.buf)

    def feed(self, view: memoryview | bytes) -> None:
        take = min(self.wanted, len(view))
        if take <= 0:
            return
        self.buf += view[:take]
        if self.length is None and len(self.buf) >= 8:
            (self.length,) = struct.unpack("<Q", self.buf[:8])
            if self.length <= MAX_HEADER_BYTES:
                self.want = 8 + self.length
                self.feed(view[take:])

    def info(self, file_size: int, *, display: str) -> SafetensorsInfo:
        """The parsed header of a ``file_size``-byte file, or a named refusal of its framing or content."""
        if self.length is None:
            raise _bad(display, f"file is {file_size} bytes, shorter than the 8-byte header length")
        if self.length > MAX_HEADER_BYTES:
            raise _bad(display, f"header length {self.length} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + self.length > file_size or len(self.buf) < self.want:
            raise _bad(display, f"header length {self.length} runs past the end of the {file_size}-byte file")
        return parse_header(bytes(self.buf[8:]), file_size, display=display)


def read_header_fd(fd: int, *, display: str) -> SafetensorsInfo:
    file_size = os.fstat(fd).st_size
    c = HeaderCollector()
    off = 0
    while c.wanted and off < file_size:
        chunk = os.pread(fd, min(c.wanted, 1 << 20), off)
        if not chunk:
            break  # shrank while reading: ``info`` names what is missing
        c.feed(chunk)
        off += len(chunk)
    return c.info(file_size, display=display)


def read_header(path: Path, *, display: str | None = None) -> SafetensorsInfo:
    """Read and validate the header of a safetensors file (refusing links)."""
    shown = display or str(path)
    fd = open_regular_nofollow(Path(path), display=shown)
    try:
        return read_header_fd(fd, display=shown)
    finally:
        os.close(fd)


def summarize(infos: list[SafetensorsInfo]) -> dict[str, Any]:
    """Parameter count and per-dtype parameters over the shards of one model."""
    dtypes: Counter[str] = Counter()
    for info in infos:
        dtypes.update(info.dtype_parameters())
    return {"parameters": sum(dtypes.values()), "dtypes": dict(sorted(dtypes.items()))}
