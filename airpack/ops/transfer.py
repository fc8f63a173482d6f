"""Verify a bundle that arrives as one tar or as split parts, without extracting it; check and repair parts.

The tar is read as a stream, once. Its first member is the envelope: it is
capped, and its signatures are checked against the host's policy before any
other member is looked at. The second is the manifest copy, which must equal
the signed payload. Every later member must be a regular file whose name
passes the same path rules as a bundle folder, and whose size and SHA-256
match the manifest; the bytes are hashed as they stream past (and, for
install, written to staging in the same pass).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .. import content
from .._fs import check_no_collisions, check_relpath, collision_key
from ..errors import (
    BundleMismatchError,
    EnvelopeError,
    FileMismatch,
    IntegrityError,
    MalformedSafetensorsError,
    MismatchReport,
    PartsError,
    TrustError,
    UnsafePathError,
    UsageError,
)
from ..hashing import CHUNK
from ..manifest import ENVELOPE_NAME, MANIFEST_NAME, FileEntry, Manifest, parse
from ..parts import PartsIndex, PartsReader, PartsReport, Source, check_parts, load_index, locate, parse_index, repair
from ..progress import NULL_PROGRESS, Progress
from ..safetensors_check import MAX_HEADER_BYTES, SafetensorsInfo, parse_header
from ..signing import MAX_ENVELOPE_BYTES, PAYLOAD_TYPE, Envelope, parse_envelope
from ..tarball import ReadableStream, TarReader
from ..trust import TrustedKey, TrustPolicy, verify_envelope
from .verify import VerifiedBundle, VerifyOptions, check_content_policy, check_fresh


class FileSink(Protocol):
    """Where install puts a member's bytes while they are verified; closed only when its digest matched."""

    def write(self, data: memoryview) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


SinkFactory = Callable[[FileEntry], FileSink]


@dataclass(frozen=True)
class StreamResult:
    manifest: Manifest
    signers: tuple[TrustedKey, ...]
    payload: bytes
    safetensors: dict[str, SafetensorsInfo] = field(repr=False, default_factory=dict)


def _read_member(reader: TarReader, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = reader.read(min(CHUNK, size - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def read_envelope_member(reader: TarReader, *, source: str) -> tuple[bytes, Envelope]:
    """The first member, capped and parsed (not yet trusted)."""
    first = reader.next_member()
    if first is None or first.name != ENVELOPE_NAME:
        found = first.name if first else "no member"
        raise EnvelopeError(f"{source}: the first member must be {ENVELOPE_NAME}, found {found}", path=ENVELOPE_NAME)
    if first.size > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(f"{source}: {ENVELOPE_NAME} is larger than {MAX_ENVELOPE_BYTES} bytes", path=ENVELOPE_NAME)
    raw = _read_member(reader, first.size)
    return raw, parse_envelope(raw, where=f"{source}:{ENVELOPE_NAME}")


class _HeaderGrab:
    """Keeps the first bytes of a safetensors member: the 8-byte length and the JSON header, capped."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.want = 8
        self.error: str | None = None

    def feed(self, view: memoryview) -> None:
        pos = 0
        while self.error is None and len(self.buf) < self.want and pos < len(view):
            take = min(self.want - len(self.buf), len(view) - pos)
            self.buf += view[pos : pos + take]
            pos += take
            if self.want == 8 and len(self.buf) == 8:
                (n,) = struct.unpack("<Q", self.buf)
                if n > MAX_HEADER_BYTES:
                    self.error = f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit"
                else:
                    self.want = 8 + n

    def info(self, size: int, name: str) -> SafetensorsInfo:
        if self.error:
            raise MalformedSafetensorsError(f"malformed safetensors {name}: {self.error}", path=name)
        if len(self.buf) < 8:
            raise MalformedSafetensorsError(f"malformed safetensors {name}: file is {size} bytes, shorter than the 8-byte header length", path=name)
        if len(self.buf) < self.want:
            raise MalformedSafetensorsError(f"malformed safetensors {name}: header length runs past the end of the {size}-byte file", path=name)
        return parse_header(bytes(self.buf[8:]), size, display=name)


def verify_stream(
    stream: ReadableStream,
    policy: TrustPolicy,
    *,
    source: str,
    now: dt.datetime | None = None,
    expected_manifest_sha256: str | None = None,
    sink: SinkFactory | None = None,
    progress: Progress = NULL_PROGRESS,
) -> StreamResult:
    """Verify a bundle tar read once from ``stream``; with ``sink``, each file is also written as it is hashed."""
    reader = TarReader(stream, source=source)
    _, env = read_envelope_member(reader, source=source)
    verified = verify_envelope(env, policy, expected_type=PAYLOAD_TYPE, where=f"{source}:{ENVELOPE_NAME}")
    payload = verified.payload
    digest = hashlib.sha256(payload).hexdigest()
    if expected_manifest_sha256 is not None and digest != expected_manifest_sha256:
        raise PartsError(
            f"{source}: the parts index is for manifest sha256 {expected_manifest_sha256[:16]}… but the parts hold "
            f"manifest sha256 {digest[:16]}…: parts of two different exports are mixed",
            path=source,
        )
    manifest = parse(payload, digest=digest)
    check_fresh(manifest, now=now)
    check_content_policy(manifest)

    second = reader.next_member()
    if second is None or second.name != MANIFEST_NAME:
        raise IntegrityError(f"{source}: the second member must be {MANIFEST_NAME}", path=MANIFEST_NAME)
    if second.size != len(payload) or _read_member(reader, second.size) != payload:
        raise IntegrityError(f"{MANIFEST_NAME} in {source} differs from the signed payload; the readable copy was altered",
                             path=MANIFEST_NAME)

    expected = {f.path: f for f in manifest.files}
    keys: dict[str, str] = {collision_key(ENVELOPE_NAME): ENVELOPE_NAME, collision_key(MANIFEST_NAME): MANIFEST_NAME}
    names: list[str] = []
    changed: list[FileMismatch] = []
    extra: list[str] = []
    headers: dict[str, SafetensorsInfo] = {}
    task = progress.task(f"verify {manifest.name}", manifest.total_bytes)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        for m in reader:
            name = check_relpath(m.name)
            key = collision_key(name)
            if key in keys:
                other = keys[key]
                why = "duplicate member" if other == name else f"collides with {other!r} (case or Unicode)"
                raise UnsafePathError(f"unsafe member {name!r} in {source}: {why}", path=name)
            keys[key] = name
            names.append(name)
            entry = expected.get(name)
            if entry is None:
                extra.append(name)
                continue
            if m.size != entry.size:
                changed.append(FileMismatch(path=name, reason="size differs", expected_size=entry.size, actual_size=m.size,
                                            expected_sha256=entry.sha256))
                continue
            out = sink(entry) if sink is not None else None
            grab = _HeaderGrab() if content.is_safetensors(name) else None
            h = hashlib.sha256()
            try:
                while True:
                    n = reader.readinto(view)
                    if not n:
                        break
                    chunk = view[:n]
                    h.update(chunk)
                    if grab is not None:
                        grab.feed(chunk)
                    if out is not None:
                        out.write(chunk)
                    task.advance(n)
            except BaseException:
                if out is not None:
                    out.abort()
                raise
            actual = h.hexdigest()
            if actual != entry.sha256:
                if out is not None:
                    out.abort()
                changed.append(FileMismatch(path=name, reason="digest differs", expected_size=entry.size, actual_size=m.size,
                                            expected_sha256=entry.sha256, actual_sha256=actual))
                continue
            if grab is not None:
                try:
                    headers[name] = grab.info(m.size, name)
                except BaseException:
                    if out is not None:
                        out.abort()
                    raise
            if out is not None:
                out.close()
    finally:
        task.close()
    check_no_collisions([ENVELOPE_NAME, MANIFEST_NAME, *names])
    missing = tuple(sorted(set(expected) - set(names)))
    report = MismatchReport(missing=missing, extra=tuple(sorted(extra)), changed=tuple(sorted(changed, key=lambda c: c.path)))
    if report:
        raise BundleMismatchError(report)
    return StreamResult(manifest=manifest, signers=verified.signers, payload=payload, safetensors=headers)


# -- the three forms ---------------------------------------------------------------------


def _check_data_present(folder: Path, index: PartsIndex) -> None:
    """Before streaming: every data part is there at its signed size (a cheap stat; hashes come later)."""
    missing: list[str] = []
    bad: list[tuple[str, str]] = []
    for p in index.data:
        try:
            st = os.stat(folder / p.name, follow_symlinks=False)
        except FileNotFoundError:
            missing.append(p.name)
            continue
        if st.st_size != p.size:
            bad.append((p.name, f"size {st.st_size}, expected {p.size}"))
    if missing or bad:
        raise _parts_error(index, PartsReport(ok=(), missing=tuple(missing), bad=tuple(bad)))


def _parts_error(index: PartsIndex, report: PartsReport) -> PartsError:
    lost = report.lost
    what = [f"{n} (missing)" for n in report.missing] + [f"{n} ({why})" for n, why in report.bad]
    n = index.layout.parity_parts
    if n and len(lost) <= n:
        hint = f"Run `airpack repair {{DIR}}`: {n} parity part(s) can rebuild {len(lost)} lost part(s)."
    elif n:
        hint = f"Only {n} parity part(s): copy the named parts again, then run `airpack repair`."
    else:
        hint = "This export has no parity parts: copy the named parts again from the source media."
    return PartsError(f"{len(lost)} part(s) missing or damaged: {', '.join(what)}", missing=report.missing, bad=report.bad,
                      hint=hint)


def _with_dir(e: PartsError, folder: Path) -> PartsError:
    if e.hint and "{DIR}" in e.hint:
        e.hint = e.hint.replace("{DIR}", str(folder))
    return e


def verify_source(opts: VerifyOptions, src: Source, *, sink: SinkFactory | None = None) -> VerifiedBundle:
    """Verify a tar or a parts folder in one streaming pass; the result is what ``verify_bundle`` returns."""
    if src.kind == "tar":
        try:
            f = open(src.path, "rb", buffering=0)  # noqa: SIM115 - closed below
        except OSError as e:
            raise UsageError(f"cannot read {src.path}: {e.strerror}", path=str(src.path)) from None
        with f:
            r = verify_stream(f, opts.policy, source=src.path.name, now=opts.now, sink=sink, progress=opts.progress)
    elif src.kind == "parts":
        index, _ = load_index(src.path, opts.policy)
        folder = src.folder
        try:
            _check_data_present(folder, index)
            with PartsReader(folder, index) as pr:
                try:
                    r = verify_stream(pr, opts.policy, source=index.tar_name, now=opts.now,
                                      expected_manifest_sha256=index.manifest_sha256, sink=sink, progress=opts.progress)
                except (IntegrityError, TrustError) as e:
                    # Name the damaged part rather than what the damage broke inside the tar.
                    report = check_parts(folder, index, parts=index.data, workers=opts.workers)
                    if report:
                        raise _parts_error(index, report) from e
                    raise
        except PartsError as e:
            raise _with_dir(e, folder) from None
    else:
        raise UsageError(f"{src.path} is a bundle folder, not a tar or parts", path=str(src.path))
    return VerifiedBundle(root=src.path, manifest=r.manifest, signers=r.signers, payload=r.payload, safetensors=r.safetensors)


# -- parts only: check and repair ---------------------------------------------------------


@dataclass(frozen=True)
class PartsCheck:
    index_path: Path
    index: PartsIndex
    signers: tuple[TrustedKey, ...]
    report: PartsReport
    repaired: tuple[str, ...] = ()


def _index_path(path: Path) -> Path:
    src = locate(path)
    if src.kind != "parts":
        raise UsageError(f"{path} is not a parts folder (no *.index.dsse.json parts index in it)", path=str(path))
    return src.path


def check_parts_folder(path: Path, policy: TrustPolicy, *, workers: int | None = None,
                       progress: Progress = NULL_PROGRESS) -> PartsCheck:
    """Signature of the index first, then every part (data and parity) hashed; raises naming the lost ones."""
    idx_path = _index_path(path)
    index, verified = load_index(idx_path, policy)
    task = progress.task(f"check parts of {index.tar_name}", sum(p.size for p in index.parts))
    try:
        report = check_parts(idx_path.parent, index, workers=workers, on_bytes=task.advance)
    finally:
        task.close()
    if report:
        raise _with_dir(_parts_error(index, report), idx_path.parent)
    return PartsCheck(index_path=idx_path, index=index, signers=verified.signers, report=report)


def repair_parts(path: Path, policy: TrustPolicy, *, workers: int | None = None,
                 progress: Progress = NULL_PROGRESS) -> PartsCheck:
    """Find the lost parts, rebuild them from parity, and check each against the signed index."""
    idx_path = _index_path(path)
    index, verified = load_index(idx_path, policy)
    folder = idx_path.parent
    task = progress.task(f"check parts of {index.tar_name}", sum(p.size for p in index.parts))
    try:
        report = check_parts(folder, index, workers=workers, on_bytes=task.advance)
    finally:
        task.close()
    if not report:
        return PartsCheck(index_path=idx_path, index=index, signers=verified.signers, report=report)
    task = progress.task(f"repair {index.tar_name}", index.layout.part_size * index.layout.data_parts)
    try:
        rebuilt = repair(folder, index, report, on_bytes=task.advance)
    finally:
        task.close()
    return PartsCheck(index_path=idx_path, index=index, signers=verified.signers, report=report, repaired=tuple(rebuilt))


# -- reading a manifest without verifying (inspect, diff, sbom) -----------------------------


def read_envelope_any(path: Path) -> tuple[Envelope, Source]:
    """The (untrusted) envelope of a bundle in any of its three forms."""
    src = locate(path)
    if src.kind == "dir":
        from ..bundle import BundleDir

        return BundleDir.open(src.path).envelope(), src
    if src.kind == "tar":
        try:
            f = open(src.path, "rb", buffering=0)  # noqa: SIM115
        except OSError as e:
            raise UsageError(f"cannot read {src.path}: {e.strerror}", path=str(src.path)) from None
        with f:
            _, env = read_envelope_member(TarReader(f, source=src.path.name), source=src.path.name)
        return env, src
    from .._fs import read_capped
    from ..parts import MAX_INDEX_BYTES

    raw = read_capped(src.path, MAX_INDEX_BYTES, what="parts index")
    index = parse_index(parse_envelope(raw, where=str(src.path)).payload)
    with PartsReader(src.folder, index) as pr:
        _, env = read_envelope_member(TarReader(pr, source=index.tar_name), source=index.tar_name)
    return env, src


def read_manifest_unverified(path: Path) -> tuple[Manifest, Envelope]:
    env, _ = read_envelope_any(path)
    if env.payload_type != PAYLOAD_TYPE:
        raise EnvelopeError(f"envelope of {path} has payload type {env.payload_type!r}", path=str(path))
    return parse(env.payload, digest=hashlib.sha256(env.payload).hexdigest()), env


# -- install from a tar or parts: verified while spooled ------------------------------------


class _SpoolFile:
    """One member written under the spool folder; removed unless its digest matched."""

    def __init__(self, root: Path, rel: str) -> None:
        self.path = root.joinpath(*rel.split("/"))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            from .._fs import oserror_to_airpack

            raise oserror_to_airpack(e, "cannot write", str(self.path)) from None

    def write(self, data: memoryview) -> None:
        assert self.fd is not None
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as e:
            from .._fs import oserror_to_airpack

            raise oserror_to_airpack(e, "cannot write", str(self.path)) from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def abort(self) -> None:
        self.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def spool_verified(src: Source, policy: TrustPolicy, *, into: Path, now: dt.datetime | None = None,
                   workers: int | None = None, progress: Progress = NULL_PROGRESS) -> VerifiedBundle:
    """Verify a tar or parts in one streaming pass, writing each file into ``into`` as it is hashed.

    Install calls this with a folder on the registry's filesystem: the medium is
    read once, only files whose digest matched stay, and the install then runs
    on that folder exactly as on a bundle folder (hashing again as it stages).
    """
    try:
        os.mkdir(into, 0o700)
    except OSError as e:
        from .._fs import oserror_to_airpack

        raise oserror_to_airpack(e, "cannot create", str(into)) from None
    opts = VerifyOptions(bundle=src.path, policy=policy, now=now, workers=workers, progress=progress)
    vb = verify_source(opts, src, sink=lambda entry: _SpoolFile(into, entry.path))
    return VerifiedBundle(root=into, manifest=vb.manifest, signers=vb.signers, payload=vb.payload, safetensors=vb.safetensors)
