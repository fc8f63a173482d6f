"""What a file is, judged from its first bytes: the per-format half of the content policy.

A name is a claim the packer (or an attacker with a signing key) chooses; the
bytes are what a loader acts on. ``torch.load`` unpickles whatever starts with
a pickle opcode, whether the file is called ``pytorch_model.bin`` or
``tokenizer.json``. So every file's beginning is sniffed, whatever its suffix,
and anything that runs code when loaded is named here: raw pickle streams,
ZIP archives (``torch.save``, ``.npz``, Keras v3: their members may be
pickles), numpy arrays of object dtype (``np.load`` unpickles them), HDF5
files (Keras ``.h5`` may hold Lambda layers, marshalled code), native
binaries and scripts with a shebang.

GGUF is header-checked: the magic, a known version, and tensor and key/value
counts that the file's size can hold, so a loader is not talked into huge
allocations by a forged count.

Only the first ``SNIFF_BYTES`` of a file are ever looked at, and they are the
bytes that were hashed (the pipeline collects them as it hashes), so the
check costs no second read and cannot be fooled by a medium that changes.
This module is pure: bytes in, a verdict out; ``airpack.content`` applies the
policy to the verdict.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import Enum

from .errors import MalformedWeightsError

SNIFF_BYTES = 4096  # how much of each file's beginning the content policy reads (a numpy header, a GGUF header, a ZIP member name)

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # version 1 (32-bit counts) is long gone from llama.cpp; a big-endian file reads as another version
GGUF_HEADER_BYTES = 24  # magic, version (u32), tensor count (u64), key/value count (u64)
MAX_GGUF_TENSORS = 1 << 20  # far above any published model (llama.cpp merges experts into one tensor per layer)
MAX_GGUF_KV = 1 << 20
GGUF_MIN_TENSOR_INFO = 24  # name length (u64), dimension count (u32), type (u32), offset (u64), with an empty name and no dims
GGUF_MIN_KV = 13  # key length (u64), value type (u32), the smallest value (one byte)

PICKLE_PROTOCOLS = range(0, 6)  # PROTO opcode 0x80 and a protocol number; writers emit 2 to 5, but pickle.load takes 0 and 1 too
# Protocols 0 and 1 have no PROTO opcode. These openings are what their writers emit first: a GLOBAL
# (``cos\nsystem\n`` and friends) followed by an opcode that uses it, or a MARK with a dict, list, string, int or
# INST after it, or an EMPTY_DICT / EMPTY_LIST and a memo write. Chosen so that plain text (a vocabulary starting
# ``can\ndo\npeople``) does not match.
_OLD_PICKLE = re.compile(
    rb"\A(?:\(?c[A-Za-z_][\w.]*\n[A-Za-z_][\w.]*\n(?:[()}\]\x94]|p\d+\n|q[\x00-\x1f]|S')"
    rb"|\((?:[dl]p\d+\n|S'|I-?\d+\n|i[A-Za-z_][\w.]*\n)"
    rb"|[}\]]q\x00)"
)
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
NPY_MAGIC = b"\x93NUMPY"
_NPY_OBJECT = re.compile(rb"""['"][|<>=]?O\d*['"]""")  # an 'O' type code anywhere in the dtype: object fields unpickle
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
HDF5_OFFSETS = (0, 512, 1024, 2048)  # the superblock may follow a user block of 512 * 2^n bytes
ELF_MAGIC = b"\x7fELF"
MACHO_MAGICS = (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe")
SHEBANG = b"#!"


class Risk(Enum):
    """What loading a file can do, as far as its first bytes tell."""

    PICKLE = "pickle"  # deserialising it can run code: the spec's allow_pickle and the operator's --allow-pickle
    CODE = "code"  # it is a program: the spec's allow_code and the operator's --allow-code


@dataclass(frozen=True)
class Sniffed:
    """A format recognised from a file's first bytes, and why it matters."""

    fmt: str
    risk: Risk | None  # None: data
    why: str


def sniff(head: bytes) -> Sniffed | None:
    """The format ``head`` (a file's first bytes) opens, or None when it is none airpack has a rule for."""
    if head.startswith(GGUF_MAGIC):
        return Sniffed("gguf", None, "a GGUF file")
    for check in (_pickle, _zip, _numpy, _hdf5, _program):
        found = check(head)
        if found is not None:
            return found
    return None


def _pickle(head: bytes) -> Sniffed | None:
    if len(head) >= 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS:
        return Sniffed("pickle", Risk.PICKLE, f"its bytes open a pickle stream (protocol {head[1]})")
    if _OLD_PICKLE.match(head):
        return Sniffed("pickle", Risk.PICKLE, "its bytes open a pickle stream (protocol 0 or 1)")
    return None


def _zip(head: bytes) -> Sniffed | None:
    if not head.startswith(ZIP_MAGICS):
        return None
    first = ""
    if head.startswith(ZIP_MAGICS[0]) and len(head) >= 30:
        (name_len,) = struct.unpack_from("<H", head, 26)
        first = head[30:30 + name_len].decode("utf-8", "replace")
    if first.endswith(".pkl"):
        return Sniffed("zip", Risk.PICKLE, f"it is a torch.save archive (member {first})")
    member = f" (first member {first})" if first else ""
    return Sniffed("zip", Risk.PICKLE, f"it is a ZIP archive{member}, whose members may be pickles (torch.save, .npz, .keras)")


def _numpy(head: bytes) -> Sniffed | None:
    if not head.startswith(NPY_MAGIC) or len(head) < 10:
        return None
    major = head[6]
    if major == 1:
        (n,) = struct.unpack_from("<H", head, 8)
        start = 10
    else:
        (n,) = struct.unpack_from("<I", head, 8) if len(head) >= 12 else (1 << 32,)
        start = 12
    header = head[start:start + n]
    if major not in (1, 2, 3) or len(header) < n:
        return Sniffed("numpy", Risk.PICKLE, "it is a numpy array whose header cannot be read, so its dtype may be object (pickled)")
    if _NPY_OBJECT.search(header):
        return Sniffed("numpy", Risk.PICKLE, "it is a numpy array of object dtype, which np.load unpickles")
    return Sniffed("numpy", None, "a numpy array")


def _hdf5(head: bytes) -> Sniffed | None:
    if any(head[o:o + len(HDF5_MAGIC)] == HDF5_MAGIC for o in HDF5_OFFSETS):
        return Sniffed("hdf5", Risk.PICKLE, "it is an HDF5 file (a Keras .h5 may hold Lambda layers: code run when loaded)")
    return None


def _program(head: bytes) -> Sniffed | None:
    if head.startswith(SHEBANG):
        return Sniffed("script", Risk.CODE, "it starts with #!, a script")
    if head.startswith(ELF_MAGIC) or head.startswith(MACHO_MAGICS):
        return Sniffed("binary", Risk.CODE, "it is a native executable or library")
    if head.startswith(b"MZ") and len(head) >= 64:
        (pe,) = struct.unpack_from("<I", head, 0x3C)
        if head[pe:pe + 4] == b"PE\x00\x00":
            return Sniffed("binary", Risk.CODE, "it is a Windows executable or library")
    return None


@dataclass(frozen=True)
class GgufHeader:
    version: int
    tensors: int
    kv: int


def check_gguf(head: bytes, size: int, *, display: str) -> GgufHeader:
    """The GGUF header in ``head``, or a named refusal: magic, version, and counts the file's ``size`` can hold."""
    if len(head) < GGUF_HEADER_BYTES or size < GGUF_HEADER_BYTES:
        raise MalformedWeightsError(f"GGUF file {display} is shorter than its {GGUF_HEADER_BYTES}-byte header", path=display)
    if not head.startswith(GGUF_MAGIC):
        raise MalformedWeightsError(f"GGUF file {display} does not start with the GGUF magic", path=display)
    version, tensors, kv = struct.unpack_from("<IQQ", head, 4)
    if version not in GGUF_VERSIONS:
        raise MalformedWeightsError(f"GGUF file {display} has version {version}; airpack reads versions 2 and 3 "
                                    "(little-endian)", path=display)
    if tensors > MAX_GGUF_TENSORS or kv > MAX_GGUF_KV:
        raise MalformedWeightsError(f"GGUF file {display} claims {tensors} tensors and {kv} metadata entries, over the "
                                    f"limit of {MAX_GGUF_TENSORS}", path=display)
    least = GGUF_HEADER_BYTES + tensors * GGUF_MIN_TENSOR_INFO + kv * GGUF_MIN_KV
    if least > size:
        raise MalformedWeightsError(f"GGUF file {display} claims {tensors} tensors and {kv} metadata entries, which need at "
                                    f"least {least} bytes; the file has {size}", path=display)
    return GgufHeader(version=version, tensors=tensors, kv=kv)


class HeadCollector:
    """The first ``SNIFF_BYTES`` of a file, from its bytes in whatever chunks they come (the pipeline feeds what it hashes)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def feed(self, view: memoryview | bytes) -> None:
        want = SNIFF_BYTES - len(self.data)
        if want > 0:
            self.data += view[:want]
