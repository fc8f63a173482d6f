"""A bundle's tar split into numbered parts for media, with a signed parts index and optional parity.

Two layouts, recorded in the index:

``concat`` (no parity)
    Part *i* holds tar bytes ``[i*S, (i+1)*S)``: ``cat NAME.part* > NAME``
    rebuilds the tar with standard tools.
``striped`` (``--parity N``)
    The tar is cut into stripes of *k* blocks of *B* bytes (the last one
    zero-padded); Reed-Solomon (zfec) turns each stripe into *k + N* blocks and
    block *j* is appended to part *j*. Memory stays at one stripe, export is a
    single pass, and ANY *k* intact parts give back every stripe, so up to *N*
    missing or damaged parts can be rebuilt.

The index is a DSSE envelope over an in-toto Statement with its own predicate
type, so it can never be mistaken for a bundle manifest. It names each part
with its size and SHA-256 (a damaged part is named before anything is
reassembled), the tar's size and SHA-256, the bundle's manifest digest (parts
of two exports cannot be mixed), and everything repair needs.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import math
import os
import queue
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from ._fs import fsync_dir, oserror_to_airpack, read_capped
from ._json import StrictJSONError, dumps_canonical, loads_strict
from .errors import (
    AirpackError,
    EnvelopeError,
    IntegrityError,
    MalformedManifestError,
    PartsError,
    UsageError,
)
from .hashing import hash_fd, parallel_map
from .manifest import ENVELOPE_NAME, STATEMENT_TYPE
from .signing import PAYLOAD_TYPE, Envelope, Signer, envelope_bytes, parse_envelope
from .trust import TrustPolicy, VerifiedPayload, verify_envelope

PARTS_PREDICATE = "https://airpack.dev/parts/v1"
INDEX_SUFFIX = ".index.dsse.json"
MAX_INDEX_BYTES = 4 * 1024 * 1024
MIN_PART_BYTES = 4096
MAX_CONCAT_PARTS = 9999
MAX_STRIPED_PARTS = 256  # zfec works over GF(2^8): at most 256 blocks per stripe
MAX_BLOCK = 1 << 20
MIN_BLOCK = 64 * 1024
STRIPE_BUDGET = 64 * 1024 * 1024  # memory for one stripe of data blocks
CODEC = "zfec-reed-solomon-gf256"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PART_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")

# -- the layout ------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How the tar maps onto parts; everything repair and the readers need."""

    kind: str  # "concat" | "striped"
    tar_size: int
    data_parts: int
    parity_parts: int
    part_size: int  # concat: every part but the last; striped: every part
    block_size: int = 0  # striped only
    rows: int = 0  # striped only: stripes, i.e. blocks per part

    @property
    def total_parts(self) -> int:
        return self.data_parts + self.parity_parts

    def expected_size(self, i: int) -> int:
        if self.kind == "striped":
            return self.part_size
        if i < self.data_parts - 1:
            return self.part_size
        return self.tar_size - self.part_size * (self.data_parts - 1)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind, "data_parts": self.data_parts, "parity_parts": self.parity_parts, "part_size": self.part_size,
        }
        if self.kind == "striped":
            out.update({"block_size": self.block_size, "rows": self.rows, "codec": CODEC,
                        "stripe": "tar bytes [r*k*B + j*B, +B) are block j of stripe r, stored at offset r*B of part j; "
                                  "parts k..k+N-1 hold zfec.Encoder(k, k+N) blocks k..k+N-1 of each stripe; "
                                  "the last stripe is zero-padded"})
        return out


def plan_layout(tar_size: int, max_part: int, parity: int) -> Layout:
    """Choose the parts for a tar of ``tar_size`` bytes with parts of at most ``max_part`` bytes."""
    if max_part < MIN_PART_BYTES:
        raise UsageError(f"--split must be at least {MIN_PART_BYTES} bytes")
    if parity < 0:
        raise UsageError("--parity must be 0 or more")
    if parity == 0:
        k = max(1, math.ceil(tar_size / max_part))
        if k > MAX_CONCAT_PARTS:
            raise UsageError(f"--split {max_part} would make {k} parts (at most {MAX_CONCAT_PARTS}); choose a larger size")
        return Layout(kind="concat", tar_size=tar_size, data_parts=k, parity_parts=0, part_size=max_part)
    k0 = max(1, math.ceil(tar_size / max_part))
    block = min(MAX_BLOCK, max_part, max(MIN_BLOCK, STRIPE_BUDGET // k0))
    rows_max = max_part // block
    k = max(1, math.ceil(tar_size / (rows_max * block)))
    rows = max(1, math.ceil(tar_size / (k * block)))
    if k + parity > MAX_STRIPED_PARTS:
        raise UsageError(
            f"--split {max_part} with --parity {parity} would make {k + parity} parts; with parity at most "
            f"{MAX_STRIPED_PARTS} parts are possible: choose a larger --split or less parity"
        )
    return Layout(kind="striped", tar_size=tar_size, data_parts=k, parity_parts=parity, part_size=rows * block,
                  block_size=block, rows=rows)


# zfec's tables and k blocks' columns stay in cache when a stripe is coded 64 KiB at a time (2-3x faster than whole MiB blocks).
_COLUMN = 64 * 1024
Buf = bytes | bytearray | memoryview


def _columns(size: int) -> list[tuple[int, int]]:
    return [(s, min(size, s + _COLUMN)) for s in range(0, size, _COLUMN)]


def encode_stripe(encoder: Any, blocks: Sequence[Buf], nums: tuple[int, ...], size: int) -> list[bytes]:
    """The blocks ``nums`` (parity) of one stripe, coded column by column."""
    if size <= _COLUMN:
        return [bytes(x) for x in encoder.encode(tuple(blocks), nums)]
    out = [bytearray(size) for _ in nums]
    views = [memoryview(b) for b in blocks]
    for s, e in _columns(size):
        for j, piece in enumerate(encoder.encode(tuple(v[s:e] for v in views), nums)):
            out[j][s:e] = piece
    return [bytes(x) for x in out]


def decode_stripe(decoder: Any, blocks: Sequence[Buf], nums: tuple[int, ...], k: int, size: int) -> list[Buf]:
    """The k data blocks of one stripe from any k blocks ``nums``, column by column."""
    if nums == tuple(range(k)):
        return list(blocks)
    out: list[bytearray] = [bytearray(size) for _ in range(k)]
    views = [memoryview(b) for b in blocks]
    for s, e in _columns(size):
        for j, piece in enumerate(decoder.decode(tuple(v[s:e] for v in views), nums)):
            out[j][s:e] = piece
    return list(out)


def part_names(tar_name: str, layout: Layout) -> list[str]:
    """``NAME.part0001``... for data parts, ``NAME.parity0001``... for parity parts."""
    width = 4
    data = [f"{tar_name}.part{i + 1:0{width}d}" for i in range(layout.data_parts)]
    par = [f"{tar_name}.parity{i + 1:0{width}d}" for i in range(layout.parity_parts)]
    return data + par


def index_name(tar_name: str) -> str:
    return tar_name + INDEX_SUFFIX


def check_tar_name(tar_name: str) -> None:
    """Refuse (exit 2), before anything is written, a tar name the signed parts index could not hold."""
    if not _PART_NAME.fullmatch(tar_name):
        raise UsageError(f"--tar name {tar_name!r} cannot name a split export: its parts index allows only letters, digits, "
                         "'.', '_', '+' and '-' (at most 255, starting with a letter or digit)", path=tar_name)


# -- the index -------------------------------------------------------------------------


@dataclass(frozen=True)
class PartInfo:
    name: str
    index: int
    role: str  # "data" | "parity"
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "role": self.role, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class PartsIndex:
    """A parsed parts index. Build it only through ``parse_index`` (after the signature held) or ``build_index``."""

    tar_name: str
    tar_size: int
    tar_sha256: str
    layout: Layout
    parts: tuple[PartInfo, ...]
    bundle: dict[str, Any]
    statement: dict[str, Any]

    @property
    def manifest_sha256(self) -> str:
        return str(self.bundle["manifest_sha256"])

    @property
    def data(self) -> tuple[PartInfo, ...]:
        return tuple(p for p in self.parts if p.role == "data")


def build_statement(*, tar_name: str, tar_size: int, tar_sha256: str, layout: Layout, parts: Sequence[PartInfo],
                    bundle: dict[str, Any]) -> dict[str, Any]:
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": p.name, "digest": {"sha256": p.sha256}} for p in parts],
        "predicateType": PARTS_PREDICATE,
        "predicate": {
            "tar": {"name": tar_name, "size": tar_size, "sha256": tar_sha256},
            "bundle": bundle,
            "layout": layout.to_json(),
            "parts": [{"name": p.name, "index": p.index, "role": p.role, "size": p.size} for p in parts],
            "tool": {"name": "airpack", "version": __version__},
        },
    }


def sign_index(statement: dict[str, Any], signer: Signer) -> bytes:
    payload = dumps_canonical(statement)
    return envelope_bytes(PAYLOAD_TYPE, payload, [signer.sign(PAYLOAD_TYPE, payload)])


def _bad(msg: str) -> MalformedManifestError:
    return MalformedManifestError(f"parts index: {msg}")


def _int(d: dict[str, Any], key: str, lo: int = 0) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise _bad(f"{key} is missing or not an integer >= {lo}")
    return v


def parse_index(payload: bytes) -> PartsIndex:
    """Parse an index payload whose signature already held; every number is checked against the others."""
    st = _load_index_statement(payload)
    pred, subjects = st.get("predicate"), st.get("subject")
    if not isinstance(pred, dict) or not isinstance(subjects, list):
        raise _bad("predicate or subject missing")
    tar, bundle, lay, plist = pred.get("tar"), pred.get("bundle"), pred.get("layout"), pred.get("parts")
    if not (isinstance(tar, dict) and isinstance(bundle, dict) and isinstance(lay, dict) and isinstance(plist, list)):
        raise _bad("tar, bundle, layout or parts missing")
    tar_name, tar_sha = _check_tar(tar, bundle)
    tar_size = _int(tar, "size", 1)
    layout = _parse_layout(lay, tar_size)
    if len(plist) != layout.total_parts or len(subjects) != layout.total_parts:
        raise _bad("the number of parts does not match the layout")
    digests = _subject_digests(subjects)
    parts = _parse_parts(plist, digests, layout, tar_name)
    return PartsIndex(tar_name=tar_name, tar_size=tar_size, tar_sha256=tar_sha, layout=layout, parts=tuple(parts),
                      bundle=dict(bundle), statement=st)


def _load_index_statement(payload: bytes) -> dict[str, Any]:
    """The payload as an in-toto Statement with the parts predicate type (anything else is a trust failure)."""
    try:
        st = loads_strict(payload, max_depth=8)
    except StrictJSONError as e:
        raise _bad(f"malformed JSON: {e}") from None
    if not isinstance(st, dict) or st.get("_type") != STATEMENT_TYPE:
        raise EnvelopeError("parts index payload is not an in-toto Statement v1")
    if st.get("predicateType") != PARTS_PREDICATE:
        raise EnvelopeError(f"parts index has predicate type {st.get('predicateType')!r}, expected {PARTS_PREDICATE}")
    return st


def _check_tar(tar: dict[str, Any], bundle: dict[str, Any]) -> tuple[str, str]:
    """(tar name, tar sha256); the name is a plain file name and both digests are SHA-256s."""
    tar_name = tar.get("name")
    if not isinstance(tar_name, str) or not _PART_NAME.match(tar_name):
        raise _bad("tar.name is not a plain file name")
    tar_sha = tar.get("sha256")
    if not isinstance(tar_sha, str) or not _HEX64.match(tar_sha):
        raise _bad("tar.sha256 is not a SHA-256")
    if not isinstance(bundle.get("manifest_sha256"), str) or not _HEX64.match(bundle["manifest_sha256"]):
        raise _bad("bundle.manifest_sha256 is not a SHA-256")
    return tar_name, tar_sha


def _parse_layout(lay: dict[str, Any], tar_size: int) -> Layout:
    """The layout, whose part count and sizes must cover exactly ``tar_size`` bytes."""
    kind = lay.get("kind")
    k, n, part_size = _int(lay, "data_parts", 1), _int(lay, "parity_parts"), _int(lay, "part_size", 1)
    if kind == "concat":
        if n or k > MAX_CONCAT_PARTS or not part_size * (k - 1) < tar_size <= part_size * k:
            raise _bad("concat layout does not add up to the tar size")
        return Layout(kind="concat", tar_size=tar_size, data_parts=k, parity_parts=0, part_size=part_size)
    if kind == "striped":
        block, rows = _int(lay, "block_size", 1), _int(lay, "rows", 1)
        if lay.get("codec") != CODEC:
            raise _bad(f"unknown codec {lay.get('codec')!r}")
        if (n < 1 or k + n > MAX_STRIPED_PARTS or block > MAX_BLOCK or part_size != rows * block
                or not (rows - 1) * k * block < tar_size <= rows * k * block):
            raise _bad("striped layout does not add up to the tar size")
        return Layout(kind="striped", tar_size=tar_size, data_parts=k, parity_parts=n, part_size=part_size,
                      block_size=block, rows=rows)
    raise _bad(f"unknown layout {kind!r}")


def _subject_digests(subjects: list[Any]) -> dict[str, str]:
    """Name -> sha256 of each subject; a name may appear once."""
    digests: dict[str, str] = {}
    for s in subjects:
        if not isinstance(s, dict) or not isinstance(s.get("digest"), dict):
            raise _bad("a subject is malformed")
        name, sha = s.get("name"), s["digest"].get("sha256")
        if not isinstance(name, str) or not isinstance(sha, str) or not _HEX64.match(sha) or name in digests:
            raise _bad("a subject has no valid name and sha256, or repeats")
        digests[name] = sha
    return digests


def _parse_parts(plist: list[Any], digests: dict[str, str], layout: Layout, tar_name: str) -> list[PartInfo]:
    """The parts in order: safe names, unique even case-folded (and not the index's own name), signed, placed as the layout says."""
    parts: list[PartInfo] = []
    seen: set[str] = {index_name(tar_name).casefold()}
    for i, p in enumerate(plist):
        if not isinstance(p, dict):
            raise _bad("a parts entry is malformed")
        name = p.get("name")
        if not isinstance(name, str) or not _PART_NAME.match(name) or name.casefold() in seen or name not in digests:
            raise _bad(f"part {i + 1} has an unsafe, repeated or unsigned name")
        seen.add(name.casefold())
        role = "data" if i < layout.data_parts else "parity"
        if p.get("role") != role or _int(p, "index") != i or _int(p, "size") != layout.expected_size(i):
            raise _bad(f"part {name} has the wrong role, index or size for the layout")
        parts.append(PartInfo(name=name, index=i, role=role, size=p["size"], sha256=digests[name]))
    return parts


def read_index_envelope(path: Path) -> Envelope:
    """The parts index's envelope, capped and parsed; not trusted yet (``load_index`` checks who signed it)."""
    shown = str(path)
    try:
        raw = read_capped(Path(path), MAX_INDEX_BYTES, display=shown, what="parts index")
    except FileNotFoundError:
        raise EnvelopeError(f"no parts index at {shown}", path=shown) from None
    except AirpackError as e:
        raise EnvelopeError(f"cannot read parts index {shown}: {e}", path=shown) from None
    return parse_envelope(raw, where=shown)


def load_index(path: Path, policy: TrustPolicy) -> tuple[PartsIndex, VerifiedPayload]:
    """Read, cap and verify the index: at least one key of the host's policy must have signed it.

    One trusted signer is enough (not the policy's threshold): the index only
    locates damage; the bundle inside is verified against the full threshold.
    """
    shown = str(path)
    env = read_index_envelope(path)
    one = TrustPolicy(keys=policy.keys, threshold=1, source=policy.source, revoked=policy.revoked)  # revoked: named if they signed
    verified = verify_envelope(env, one, expected_type=PAYLOAD_TYPE, where=shown)
    return parse_index(verified.payload), verified


def find_index(folder: Path) -> Path | None:
    """The one parts index in ``folder`` (None when there is none); several are a usage error."""
    found = sorted(p for p in folder.iterdir() if p.name.endswith(INDEX_SUFFIX) and not p.name.startswith("."))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UsageError(f"{folder} holds several parts indexes ({names}); give the index file itself", path=str(folder))
    return found[0] if found else None


# -- writing parts ---------------------------------------------------------------------


class _PartOut:
    """One part being written: a temp file beside its final name, hashed as written."""

    def __init__(self, folder: Path, name: str) -> None:
        self.name = name
        self.final = folder / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        self.fd: int | None = fd
        self.tmp = Path(tmp)
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: Buf) -> None:
        assert self.fd is not None
        self.hash.update(data)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.size += len(data)

    def close(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
        os.chmod(self.tmp, 0o644)

    def commit(self) -> None:
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


class PartsWriter:
    """Takes the tar stream in order and writes the parts of ``layout``; ``finish`` returns them."""

    def __init__(self, folder: Path, names: list[str], layout: Layout) -> None:
        self.folder = folder
        self.names = names
        self.layout = layout
        self.outs: list[_PartOut] = []
        self.written = 0
        if layout.kind == "striped":
            import zfec  # a C extension, loaded only when parity is used

            k, n, b = layout.data_parts, layout.parity_parts, layout.block_size
            self._encoder = zfec.Encoder(k, k + n)
            self._stripe = bytearray(k * b)
            self._fill = 0
            self._rows = 0
            try:
                self.outs = [_PartOut(folder, nm) for nm in names]
            except OSError as e:
                self.discard()
                raise oserror_to_airpack(e, "cannot write", str(folder)) from None

    def write(self, data: bytes) -> None:
        try:
            if self.layout.kind == "striped":
                self._write_striped(memoryview(data))
            else:
                self._write_concat(memoryview(data))
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(self.folder)) from None
        self.written += len(data)

    def _write_concat(self, view: memoryview) -> None:
        size = self.layout.part_size
        while view:
            if not self.outs or self.outs[-1].size == size:
                if self.outs:
                    self.outs[-1].close()
                if len(self.outs) == len(self.names):
                    raise IntegrityError("the tar grew past the size planned for its parts")
                self.outs.append(_PartOut(self.folder, self.names[len(self.outs)]))
            cur = self.outs[-1]
            n = min(len(view), size - cur.size)
            cur.write(view[:n])
            view = view[n:]

    def _write_striped(self, view: memoryview) -> None:
        stripe = self._stripe
        while view:
            n = min(len(view), len(stripe) - self._fill)
            stripe[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == len(stripe):
                self._emit_stripe()

    def _emit_stripe(self) -> None:
        k, n, b = self.layout.data_parts, self.layout.parity_parts, self.layout.block_size
        if self._rows >= self.layout.rows:
            raise IntegrityError("the tar grew past the size planned for its parts")
        sv = memoryview(self._stripe)
        blocks = tuple(sv[j * b : (j + 1) * b] for j in range(k))
        parity = encode_stripe(self._encoder, blocks, tuple(range(k, k + n)), b)
        for j in range(k):
            self.outs[j].write(blocks[j])
        for j in range(n):
            self.outs[k + j].write(parity[j])
        self._fill = 0
        self._rows += 1

    def finish(self) -> list[PartInfo]:
        """Pad the last stripe, close every part; nothing is renamed yet (see ``commit``)."""
        if self.written != self.layout.tar_size:
            raise IntegrityError(f"the tar is {self.written} bytes, {self.layout.tar_size} were planned")
        try:
            if self.layout.kind == "striped" and self._fill:
                self._stripe[self._fill :] = bytes(len(self._stripe) - self._fill)
                self._emit_stripe()
            for o in self.outs:
                o.close()
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(self.folder)) from None
        k = self.layout.data_parts
        out = []
        for i, o in enumerate(self.outs):
            if o.size != self.layout.expected_size(i):
                raise IntegrityError(f"part {o.name} is {o.size} bytes, {self.layout.expected_size(i)} were planned")
            out.append(PartInfo(name=o.name, index=i, role="data" if i < k else "parity", size=o.size, sha256=o.hash.hexdigest()))
        return out

    def commit(self) -> None:
        try:
            for o in self.outs:
                o.commit()
            fsync_dir(self.folder)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(self.folder)) from None

    def discard(self) -> None:
        for o in self.outs:
            o.discard()


class BackgroundSink:
    """Runs ``consume`` on a worker thread so reading and hashing the bundle overlap writing the tar.

    Chunks must not be mutated after they are handed over (the exporter passes
    fresh ``bytes``). An error in the worker is raised on the next call.
    """

    _STOP = object()

    def __init__(self, consume: Callable[[bytes], None], *, depth: int = 16) -> None:
        self._consume = consume
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="airpack-tar-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is self._STOP:
                return
            if self._error is None:
                try:
                    self._consume(item)
                except BaseException as e:  # noqa: BLE001 - handed to the producer thread
                    self._error = e

    def __call__(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._q.put(data)

    def close(self) -> None:
        self._q.put(self._STOP)
        self._thread.join()
        if self._error is not None:
            raise self._error


# -- reading parts ---------------------------------------------------------------------


def _open_part(path: Path, name: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise PartsError(f"part {name} is missing", missing=(name,)) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PartsError(f"part {name} is a symbolic link", bad=((name, "symbolic link"),)) from None
        raise oserror_to_airpack(e, "cannot read", str(path)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PartsError(f"part {name} is not a regular file", bad=((name, "not a regular file"),))
    return fd


class PartsReader:
    """The tar's bytes (exactly ``tar_size`` of them) read back from the data parts, never from parity."""

    def __init__(self, folder: Path, index: PartsIndex) -> None:
        self.index = index
        self.layout = index.layout
        self._names = [p.name for p in index.data]
        self._fds: list[int] = []
        try:
            for p in index.data:
                self._fds.append(_open_part(folder / p.name, p.name))
        except BaseException:
            self.close()
            raise
        self._pos = 0  # tar offset

    def _locate(self) -> tuple[int, int, int]:
        """(part, offset in part, bytes left in this run) for the current tar offset."""
        lay = self.layout
        if lay.kind == "concat":
            j, off = divmod(self._pos, lay.part_size)
            return j, off, lay.part_size - off
        b, k = lay.block_size, lay.data_parts
        row, rem = divmod(self._pos, k * b)
        j, inblock = divmod(rem, b)
        return j, row * b + inblock, b - inblock

    def readinto(self, view: memoryview) -> int:
        left = self.layout.tar_size - self._pos
        if left <= 0 or not len(view):
            return 0
        j, off, run = self._locate()
        want = min(len(view), run, left)
        try:
            n = os.preadv(self._fds[j], [view[:want]], off)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot read", self._names[j]) from None
        if n == 0:
            raise PartsError(f"part {self._names[j]} is shorter than the parts index says", bad=((self._names[j], "truncated"),))
        self._pos += n
        return n

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def __enter__(self) -> PartsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- checking and repairing --------------------------------------------------------------


@dataclass(frozen=True)
class PartsReport:
    ok: tuple[str, ...]
    missing: tuple[str, ...]
    bad: tuple[tuple[str, str], ...]  # (name, reason)

    def __bool__(self) -> bool:
        return bool(self.missing or self.bad)

    @property
    def lost(self) -> tuple[str, ...]:
        return self.missing + tuple(n for n, _ in self.bad)

    def to_json(self) -> dict[str, Any]:
        return {"ok": list(self.ok), "missing": list(self.missing), "bad": [{"name": n, "reason": r} for n, r in self.bad]}


def parts_error(index: PartsIndex, report: PartsReport, folder: Path) -> PartsError:
    """Name every lost part in ``folder`` (data and parity), and say whether ``airpack repair`` can rebuild them.

    The repair hint counts only the parity parts that are intact: ``k + N`` parts rebuild any
    ``k``, so repair works while no more than ``N`` parts (of either kind) are lost. What can be
    shown to come from another export says so: data part 1 starts with the bundle's envelope,
    whose bundle name and sequence (or, when it is whole, manifest digest) are compared with the
    ones the index is signed for; part files of another tar name in the folder are named too.
    """
    roles = {p.name: p.role for p in index.parts}
    why = dict(report.bad)
    first = index.data[0].name
    foreign = _foreign_first_part(folder, index) if first in why else None
    if foreign is not None:
        why[first] = foreign
    bad = tuple((n, why[n]) for n, _ in report.bad)
    what = [f"{n} ({roles.get(n, 'data')}, missing)" for n in report.missing] + [f"{n} ({roles.get(n, 'data')}, {r})" for n, r in bad]
    lost = report.lost
    strangers = _strangers(folder, index)
    others = (f"; {', '.join(strangers[:3])}{' and more' if len(strangers) > 3 else ''} in {folder} belong to another "
              f"export (not in the parts index {index_name(index.tar_name)})") if strangers else ""
    if foreign is not None and 2 * len(lost) > len(index.parts):
        b = index.bundle
        return PartsError(
            f"{len(lost)} of the {len(index.parts)} parts in {folder} do not match the parts index "
            f"{index_name(index.tar_name)} (bundle {b.get('name')} sequence {b.get('sequence')}): the parts and the index "
            f"belong to different exports; {first} {foreign}{others}", missing=report.missing, bad=bad,
            hint="Keep each export's parts in a folder with its own index; copy the parts that belong to this index.")
    return PartsError(f"{len(lost)} part(s) missing or damaged: {', '.join(what)}{others}", missing=report.missing, bad=bad,
                      hint=_repair_hint(index, lost, roles, folder))


_PART_FILE = re.compile(r"\.(part|parity)[0-9]{4}$")


def _strangers(folder: Path, index: PartsIndex) -> list[str]:
    """Part files in ``folder`` that this index does not name (another export's, by their tar name)."""
    mine = {p.name for p in index.parts}
    try:
        return sorted(e.name for e in os.scandir(folder) if _PART_FILE.search(e.name) and e.name not in mine)
    except OSError:
        return []


def _repair_hint(index: PartsIndex, lost: tuple[str, ...], roles: dict[str, str], folder: Path) -> str:
    """What to do about ``lost``: repair when the intact parity parts suffice, else copy the named parts again."""
    n = index.layout.parity_parts
    if not n:
        return "This export has no parity parts: copy the named parts again from the source media."
    lost_data = sum(1 for name in lost if roles.get(name) == "data")
    lost_parity = len(lost) - lost_data
    intact = n - lost_parity
    if len(lost) <= n:
        if not lost_data:
            return f"Run `airpack repair {folder}`: it codes the {lost_parity} lost parity part(s) again from the data parts."
        again = f", and codes the {lost_parity} lost parity part(s) again" if lost_parity else ""
        return (f"Run `airpack repair {folder}`: the {intact} intact parity part(s) rebuild the {lost_data} lost data "
                f"part(s){again}.")
    return (f"Only {intact} of {n} parity part(s) are intact, too few for {lost_data} lost data part(s) "
            f"({len(lost)} parts lost, repair rebuilds at most {n}): copy the named parts again, then run `airpack repair {folder}`.")


_TAR_HEADER = 512


def _foreign_first_part(folder: Path, index: PartsIndex) -> str | None:
    """Why data part 1 belongs to another export, when the envelope it starts with proves it; else None.

    Reads only the part's first block: the tar header, then as much of the envelope as is there.
    A whole envelope gives the manifest digest; else the start of its payload (base64 of the
    manifest, whose ``bundle`` object comes first) gives the bundle's name and sequence. It is
    a diagnosis for the message only, never trusted: the part has already failed its digest.
    """
    p = index.data[0]
    span = index.layout.block_size if index.layout.kind == "striped" else p.size  # where tar bytes run unbroken
    try:
        fd = _open_part(folder / p.name, p.name)
    except AirpackError:
        return None
    try:
        head = os.pread(fd, min(span, MAX_INDEX_BYTES), 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(head) < _TAR_HEADER or head[:100].rstrip(b"\0") != ENVELOPE_NAME.encode():
        return None
    try:
        size = int(head[124:136].rstrip(b"\0 ").decode("ascii") or "0", 8)
    except ValueError:
        return None
    body = head[_TAR_HEADER:_TAR_HEADER + size]
    ours = f"the index {index_name(index.tar_name)} is for"
    if len(body) == size:
        with contextlib.suppress(AirpackError):
            digest = hashlib.sha256(parse_envelope(body, where=p.name).payload).hexdigest()
            if digest == index.manifest_sha256:
                return None
            return (f"belongs to another export: it holds the bundle with manifest sha256 {digest[:16]}…, "
                    f"{ours} {index.manifest_sha256[:16]}…")
    claimed = _bundle_prefix(body)
    if claimed is None:
        return None
    name, seq = claimed
    if (name, seq) == (index.bundle.get("name"), index.bundle.get("sequence")):
        return None
    return (f"belongs to another export: it starts bundle {name} sequence {seq}, "
            f"{ours} {index.bundle.get('name')} sequence {index.bundle.get('sequence')}")


_PAYLOAD_START = re.compile(rb'"payload":\s*"([A-Za-z0-9+/]*)')
_BUNDLE_FIELDS = re.compile(r'"bundle":\s*\{[^}]*?"name":\s*"([^"\\]{1,200})"[^}]*?"sequence":\s*([0-9]{1,20})')


def _bundle_prefix(envelope_start: bytes) -> tuple[str, int] | None:
    """(bundle name, sequence) from the first bytes of an envelope, or None when they are not there."""
    m = _PAYLOAD_START.search(envelope_start)
    if m is None:
        return None
    b64 = m.group(1)[: len(m.group(1)) // 4 * 4]
    try:
        text = base64.b64decode(b64, validate=True).decode("utf-8", "replace")
    except ValueError:
        return None
    f = _BUNDLE_FIELDS.search(text)
    return (f.group(1), int(f.group(2))) if f else None


def _check_one(folder: Path, p: PartInfo, on_bytes: Callable[[int], None]) -> tuple[str, str | None]:
    """(name, None) when the part is intact, else (name, why): 'missing' or the damage."""
    try:
        fd = _open_part(folder / p.name, p.name)
    except PartsError as e:
        return p.name, "missing" if e.missing else (e.bad[0][1] if e.bad else str(e))
    try:
        size = os.fstat(fd).st_size
        if size != p.size:
            return p.name, f"size {size}, expected {p.size}"
        d = hash_fd(fd, on_bytes=on_bytes)
        if d.size != p.size:
            return p.name, f"size changed while reading ({d.size} bytes)"
        if d.sha256 != p.sha256:
            return p.name, "sha256 differs from the parts index"
        return p.name, None
    finally:
        os.close(fd)


def check_parts(folder: Path, index: PartsIndex, *, parts: Sequence[PartInfo] | None = None, workers: int | None = None,
                on_bytes: Callable[[int], None] = lambda n: None) -> PartsReport:
    """Hash every part (in parallel) against the signed index; name the missing and the damaged ones."""
    todo = list(parts if parts is not None else index.parts)
    results = parallel_map(lambda p: _check_one(folder, p, on_bytes), todo, workers=workers)
    missing = tuple(n for n, why in results if why == "missing")
    bad = tuple((n, why) for n, why in results if why is not None and why != "missing")
    ok = tuple(n for n, why in results if why is None)
    return PartsReport(ok=ok, missing=missing, bad=bad)


def repair(folder: Path, index: PartsIndex, report: PartsReport, *, on_bytes: Callable[[int], None] = lambda n: None) -> list[str]:
    """Rebuild every lost part from any ``k`` intact ones; each rebuilt part is checked against the index before it lands."""
    lost = set(report.lost)
    if not lost:
        return []
    lay = index.layout
    _check_repairable(lay, lost, report)
    import zfec  # a C extension, loaded only when parity is used

    k, n = lay.data_parts, lay.parity_parts
    good = [p for p in index.parts if p.name not in lost][:k]  # data parts first: decoding them is a copy
    rebuild = [p for p in index.parts if p.name in lost]
    decoder = zfec.Decoder(k, k + n)
    encoder = zfec.Encoder(k, k + n)
    fds: list[int] = []
    outs: list[_PartOut] = []
    try:
        for p in good:
            fds.append(_open_part(folder / p.name, p.name))
        for p in rebuild:
            outs.append(_PartOut(folder, p.name))
        targets = list(zip(rebuild, outs, strict=True))
        _rebuild_stripes(lay, decoder, encoder, list(zip(good, fds, strict=True)), targets, on_bytes)
        _land_rebuilt(folder, targets)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot repair in", str(folder)) from None
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        for o in outs:
            o.discard()
    return [p.name for p in rebuild]


def _check_repairable(lay: Layout, lost: set[str], report: PartsReport) -> None:
    """Refuse, naming the lost parts, when there is no parity or fewer parity parts than lost ones."""
    names = ", ".join(sorted(lost))
    if lay.kind != "striped":
        raise PartsError(f"cannot repair {names}: this export has no parity parts", missing=report.missing, bad=report.bad,
                         hint="Copy the named parts again from the source media.")
    if len(lost) > lay.parity_parts:
        raise PartsError(
            f"cannot repair: {len(lost)} parts are lost ({names}) but {lay.parity_parts} parity part(s) rebuild at most "
            f"{lay.parity_parts}", missing=report.missing, bad=report.bad,
            hint="Copy some of the named parts again from the source media, then run repair.",
        )


def _rebuild_stripes(lay: Layout, decoder: Any, encoder: Any, sources: list[tuple[PartInfo, int]],
                     targets: list[tuple[PartInfo, _PartOut]], on_bytes: Callable[[int], None]) -> None:
    """Stripe by stripe: read the block of each intact part, decode the data blocks, re-encode the lost parity blocks."""
    k, b = lay.data_parts, lay.block_size
    nums = tuple(p.index for p, _ in sources)
    need_parity = tuple(p.index for p, _ in targets if p.role == "parity")
    for row in range(lay.rows):
        blocks = [_read_block(p, fd, row, b) for p, fd in sources]
        primary = decode_stripe(decoder, blocks, nums, k, b)
        parity = dict(zip(need_parity, encode_stripe(encoder, primary, need_parity, b), strict=True)) if need_parity else {}
        for p, o in targets:
            o.write(primary[p.index] if p.role == "data" else parity[p.index])
        on_bytes(b * len(sources))


def _read_block(p: PartInfo, fd: int, row: int, b: int) -> bytes:
    """Block ``row`` of an intact part; a short read means the part changed after it was checked."""
    blk = os.pread(fd, b, row * b)
    if len(blk) != b:
        raise PartsError(f"part {p.name} changed while repair read it", bad=((p.name, "truncated"),))
    return blk


def _land_rebuilt(folder: Path, targets: list[tuple[PartInfo, _PartOut]]) -> None:
    """Check every rebuilt part against the index, then rename them all into place."""
    for p, o in targets:
        o.close()
        if o.hash.hexdigest() != p.sha256 or o.size != p.size:
            raise PartsError(f"rebuilt {p.name} does not match the parts index; another part changed during repair",
                             bad=((p.name, "rebuild mismatch"),))
    for _, o in targets:
        o.commit()
    fsync_dir(folder)
