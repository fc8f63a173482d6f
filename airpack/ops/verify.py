"""The one verification pipeline: every command that reads a bundle, in any form, goes through ``verify_source``.

The check sequence runs once, in this order, whatever the source (folder,
tar, parts, OCI artifact):

1. the envelope, capped, exactly as stored;
2. signatures over those exact payload bytes, against the host's policy;
3. only then the payload is parsed (strictly) into a manifest;
4. freshness, and with registry facts the channel's sequence (``airpack.rules``);
5. the content policy the manifest signs (pickles, code);
6. the readable manifest copy, byte for byte;
7. for a delta bundle (``pack --for``), with the host's registry to hand (``host``, or a sink that
   relies on it: install), every registry copy of each file expected on the host, hashed again
   (``check_on_host``) before a byte of the bundle is read or written; then every path, size and
   digest of what the bundle carries, with one report of missing, extra and changed files;
8. the safetensors header of every weight file, parsed from the bytes that were hashed, and the
   content policy again over each file's first bytes as hashed (``content.check_file``: a pickle
   or a program is told by its bytes, whatever its name; a GGUF header must be sane).

A ``Sink`` receives every verified byte as it is hashed (install's staging,
export's tar, a pull's folder), so the medium is read once and what is
written is what was checked. ``policy=None`` is the unverified mode (sign's
own check before co-signing, a pull without ``--trust``): signatures and
freshness are not checked (both are the host's trust decisions) and the result
says so; every other step runs.

A delta's files expected on the host are never skipped silently: the bundle
must not carry them (carrying one is exit 3), the result lists them
(``VerifiedBundle.expected``) and says whether the host's copies were
hashed (``host_checked``).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Protocol

from .. import content, rules
from .._fs import NameSet, check_no_collisions, check_relpath, collision_key, oserror_to_airpack
from ..errors import (
    AirpackError,
    BundleMismatchError,
    EnvelopeError,
    FileMismatch,
    HostFilesError,
    IntegrityError,
    MismatchReport,
    PartsError,
    UnsafePathError,
)
from ..formats import HeadCollector
from ..hashing import FileDigest, copy_then_hash, parallel_map, stream_and_hash
from ..manifest import ENVELOPE_NAME, MANIFEST_NAME, FileEntry, Manifest, parse
from ..progress import NULL_PROGRESS, Progress, ProgressTask
from ..rules import ChannelHigh
from ..safetensors_check import HeaderCollector, SafetensorsInfo, read_header
from ..signing import PAYLOAD_TYPE, Envelope, parse_envelope
from ..sources import BundleSource, LocalFile, Member, open_source
from ..trust import TrustedKey, TrustPolicy, verify_envelope

MAX_KEPT_BYTES = 64 << 20  # a small file kept in memory for the caller (config.json, a shard index)
MAX_HOST_KEPT_BYTES = 4 << 20  # a delta's host file this small is kept as hashed: the fit check reads configs from it


@dataclass(frozen=True, kw_only=True)
class VerifyOptions:
    bundle: Path
    policy: TrustPolicy
    now: dt.datetime | None = None
    workers: int | None = None
    progress: Progress = NULL_PROGRESS
    host: HostCopies | None = None  # the registry's copies of a delta's host files (verify --registry)


@dataclass(frozen=True, kw_only=True)
class SequenceCheck:
    """Where the registry's facts for a channel come from, for the rollback rule to decide on before any file is read."""

    high: Callable[[str], ChannelHigh | None]  # channel -> its highest installed bundle, or None
    allow_downgrade: bool = False


@dataclass(frozen=True)
class Trusted:
    """The envelope and manifest once signatures, freshness, sequence, content policy and the copy held; no file read yet.

    ``headers`` holds safetensors headers a folder source could read up front
    (empty for streams): they are re-derived from the hashed bytes later and
    must match, so a sink may plan with them (install's fit check) but the
    final word is the ``VerifiedBundle``'s.
    """

    source: BundleSource = field(repr=False)
    manifest: Manifest
    signers: tuple[TrustedKey, ...]
    payload: bytes = field(repr=False)
    envelope: bytes = field(repr=False)
    verified: bool
    downgrade: bool
    headers: Mapping[str, SafetensorsInfo] = field(repr=False, default_factory=dict)
    host_kept: Mapping[str, bytes] = field(repr=False, default_factory=dict)  # a delta's small host files, hashed (fit)


@dataclass(frozen=True)
class VerifiedBundle(Trusted):
    """A bundle whose every check held; ``verified`` is False only in the unverified mode (no policy given).

    ``headers`` are now the safetensors headers parsed from the very bytes that
    were hashed; ``kept`` the verified bytes of the small files the caller asked for.
    """

    kept: Mapping[str, bytes] = field(repr=False, compare=False, default_factory=dict)
    host_checked: bool = False  # a delta whose files expected on the host were hashed in the host's registry

    @property
    def expected(self) -> tuple[FileEntry, ...]:
        """The files a delta relies on the host for (none for a full bundle)."""
        return self.manifest.expected_on_host

    @property
    def signer_names(self) -> list[str]:
        return [k.name for k in self.signers]


class HostCopies(Protocol):
    """Where the host holds a delta's files: the registry's root, and every copy its database names of one file's bytes.

    ``registry.RegistryCopies`` is the one implementation (kept there, so that verifying a bundle imports no SQLite).
    """

    @property
    def root(self) -> Path:
        """The registry folder: a copy resolving outside it is refused."""
        ...

    def copies(self, entry: FileEntry) -> list[Path]:
        """Every path under ``root`` that should hold ``entry``'s bytes; empty when the registry holds none."""
        ...


class FileSink:
    """Where one file's verified bytes go. ``close`` is called only when its size and digest held, else ``abort``.

    A sink that sets ``fd`` (a local file open for reading and writing) lets a
    folder source copy in the kernel; the chunk written is then read back from
    ``fd`` and hashed, so the copy is what is checked.
    """

    fd: int | None = None
    where: str = "the output"  # how an error names the file being written

    def write(self, data: memoryview) -> None:
        """Bytes read from the source (not called when ``fd`` took a kernel copy)."""

    def wrote(self, n: int) -> None:
        """``n`` more bytes reached the file, by either path (e.g. to start writeback early)."""

    def close(self) -> None:
        """The file's digest held: keep it."""

    def abort(self) -> None:
        """The file failed a check or the pipeline stopped: drop what was written."""


class Sink:
    """Receives a verified bundle. ``ordered`` sinks (a tar being written) get files one at a time in path order."""

    ordered: bool = False
    action: str = "verify"  # the progress bar's label: what the user asked for
    host: HostCopies | None = None  # install: a delta's files expected on the host must be in this registry, hashed again

    def identify(self, manifest: Manifest, signers: tuple[TrustedKey, ...]) -> None:
        """The signed manifest just parsed, before any decision on it (install records what it may be about to refuse)."""

    def begin(self, trusted: Trusted) -> None:
        """The manifest is trusted and the entries are as signed; no file byte has been read yet."""

    def holds(self, entry: FileEntry) -> bool:
        """True when the sink already has these exact bytes, so a random-access source need not read them."""
        return False

    def open(self, entry: FileEntry) -> FileSink | None:
        """Where ``entry``'s bytes go, or None to hash them only."""
        return None

    def head(self, entry: FileEntry) -> bytes | None:
        """The first bytes of the copy the sink holds of ``entry`` (``holds`` was True), for the content policy.

        None when the sink cannot tell; the file is then judged by its name,
        unless the same content was read under another name in this run.
        """
        return None


# -- steps 1 to 6: the envelope and the manifest ------------------------------------------------


def _trust(source: BundleSource, policy: TrustPolicy | None, *, now: dt.datetime | None, sequence: SequenceCheck | None,
           sink: Sink | None) -> Trusted:
    where = source.envelope_where
    raw = source.envelope_bytes()
    env = parse_envelope(raw, where=where)
    if policy is not None:
        vp = verify_envelope(env, policy, expected_type=PAYLOAD_TYPE, where=where)
        payload, signers = vp.payload, vp.signers
    else:
        _check_payload_type(env, where)
        payload, signers = env.payload, ()
    digest = hashlib.sha256(payload).hexdigest()
    bound = source.bound_manifest_sha256()
    if bound is not None and bound != digest:
        raise PartsError(
            f"{source.label}: the parts index is for manifest sha256 {bound[:16]}… but the parts hold "
            f"manifest sha256 {digest[:16]}…: parts of two different exports are mixed",
            path=source.label,
        )
    manifest = parse(payload, digest=digest)
    if sink is not None:
        sink.identify(manifest, signers)
    downgrade = False
    if policy is not None:
        rules.check_fresh(name=manifest.name, sequence=manifest.sequence, expires=manifest.expires, now=now)
        rules.check_sequence_range(name=manifest.name, sequence=manifest.sequence)
    if sequence is not None:
        downgrade = rules.check_sequence(sequence.high(manifest.channel), name=manifest.name, channel=manifest.channel, sequence=manifest.sequence,
                                         manifest_sha256=manifest.digest, allow_downgrade=sequence.allow_downgrade)
    content.check_signed_policy(manifest)
    copy = source.manifest_copy()
    if copy is None:
        raise BundleMismatchError(MismatchReport(missing=(MANIFEST_NAME,)), path=MANIFEST_NAME)
    if copy != payload:
        raise IntegrityError(
            f"{MANIFEST_NAME} in {source.label} differs from the signed payload in {ENVELOPE_NAME}; the readable copy was altered",
            path=MANIFEST_NAME,
        )
    return Trusted(source=source, manifest=manifest, signers=signers, payload=payload, envelope=raw, verified=policy is not None,
                   downgrade=downgrade)


def _check_payload_type(env: Envelope, where: str) -> None:
    if env.payload_type != PAYLOAD_TYPE:
        raise EnvelopeError(f"envelope {where} has payload type {env.payload_type!r}, expected {PAYLOAD_TYPE!r}", path=where)


@dataclass(frozen=True)
class Unverified:
    """A manifest as a bundle claims it, signatures unchecked: for inspect, diff and sbom without ``--trust``."""

    manifest: Manifest
    envelope: Envelope


def read_unverified(source: BundleSource) -> Unverified:
    """The envelope and the manifest it carries, parsed strictly but trusted for nothing."""
    with source.session():
        env = parse_envelope(source.envelope_bytes(), where=source.envelope_where)
    _check_payload_type(env, source.envelope_where)
    return Unverified(manifest=parse(env.payload, digest=hashlib.sha256(env.payload).hexdigest()), envelope=env)


# -- step 7: the entries against the manifest ---------------------------------------------------


def _tree_report(members: list[Member], manifest: Manifest) -> MismatchReport:
    """Paths and sizes: unsafe entries refused by name; missing, extra and resized files reported."""
    for e in members:
        check_relpath(e.path)
        if e.problem:
            raise UnsafePathError(f"unsafe entry {e.path} in bundle: {e.problem}", path=e.path)
    check_no_collisions([ENVELOPE_NAME, MANIFEST_NAME, *(e.path for e in members)])
    present = {e.path: e for e in members}
    both = sorted(manifest.on_host & set(present))
    if both:
        raise _carried_on_host(both[0])
    expected = {f.path: f for f in manifest.carried}
    aliases = _Aliases(expected, what="entry", where="in bundle")
    for p in present:
        aliases.refuse(p)
    changed = []
    for p, f in sorted(expected.items()):
        there = present.get(p)
        if there is not None and (there.size != f.size or there.sha256 not in (None, f.sha256)):
            why = "size differs" if there.size != f.size else "digest differs (as the container lists it)"
            changed.append(_mismatch(f, size=there.size, sha256=there.sha256, reason=why))
    return MismatchReport(missing=tuple(sorted(set(expected) - set(present))), extra=tuple(sorted(set(present) - set(expected))),
                          changed=tuple(changed))


def _carried_on_host(path: str) -> IntegrityError:
    return IntegrityError(f"{path} is marked in the manifest as expected on the host, but the bundle also carries it", path=path)


class _Aliases:
    """A name equal to a signed one up to case or Unicode form, but not byte-equal, is a collision, not an extra file."""

    def __init__(self, expected: Mapping[str, FileEntry], *, what: str, where: str) -> None:
        self.expected = expected
        self.keys = {collision_key(p): p for p in expected}
        self.what, self.where = what, where

    def refuse(self, name: str) -> None:
        if name not in self.expected and collision_key(name) in self.keys:
            raise UnsafePathError(f"unsafe {self.what} {name!r} {self.where}: collides with {self.keys[collision_key(name)]!r}",
                                  path=name)


def _mismatch(f: FileEntry, *, size: int, sha256: str | None = None, reason: str | None = None) -> FileMismatch:
    """The one way a changed file is described: what was signed against what is there."""
    why = reason or ("size differs" if size != f.size else "digest differs")
    return FileMismatch(path=f.path, reason=why, expected_size=f.size, actual_size=size, expected_sha256=f.sha256,
                        actual_sha256=sha256)


# -- steps 7 and 8: every byte ------------------------------------------------------------------


class _Keep:
    def __init__(self) -> None:
        self.data = bytearray()

    def feed(self, view: memoryview) -> None:
        if len(self.data) <= MAX_KEPT_BYTES:
            self.data += view


@dataclass
class _Outcome:
    """What the file loop learnt of one file."""

    mismatch: FileMismatch | None = None
    header: SafetensorsInfo | None = None
    header_error: AirpackError | None = None  # a malformed safetensors header, or a file the content policy refuses
    kept: bytes | None = None
    vanished: bool = False
    head: bytes | None = None  # the first bytes as hashed, for the content policy
    held: bool = False  # the sink already had these bytes: not read


class _Files:
    """The per-file check both kinds of source share: hash, compare, parse the header, hand over or drop."""

    def __init__(self, sink: Sink | None, keep: Callable[[str], bool] | None, task: ProgressTask,
                 policy: content.Policy) -> None:
        self.sink = sink
        self.keep = keep
        self.task = task
        self.policy = policy  # the signed content policy, applied to each file's first bytes as hashed

    def check(self, f: FileEntry, read: Callable[[memoryview], int], *, src_fd: int | None = None,
              limit: int | None = None) -> _Outcome:
        out = self.sink.open(f) if self.sink is not None else None
        grab = HeaderCollector() if content.is_safetensors(f.path) else None
        kept = _Keep() if self.keep is not None and f.size <= MAX_KEPT_BYTES and self.keep(f.path) else None
        head = HeadCollector()
        feeds: list[Callable[[memoryview], None]] = [x.feed for x in (grab, kept, head) if x is not None]
        try:
            d = self._hash(read, out, feeds, src_fd=src_fd, limit=limit)
            result = self._judge(f, d, grab, kept)
            if result.mismatch is None and result.header_error is None:
                result.head = bytes(head.data)
                self.judge(f, result.head, result)
        except BaseException:
            if out is not None:
                out.abort()
            raise
        if out is not None:
            (out.abort if result.mismatch else out.close)()
        return result

    def judge(self, f: FileEntry, head: bytes | None, result: _Outcome) -> None:
        """The content policy over the file's first bytes; a refusal is kept for the final report, like a bad header."""
        try:
            content.check_file(self.policy, f.path, head, f.size)
        except AirpackError as e:
            result.header_error = e

    def judge_held(self, entries: list[FileEntry], outcomes: Mapping[str, _Outcome]) -> None:
        """Files the sink held were not read: judge each by the first bytes of the same content, read here or held there."""
        heads = {e.sha256: o.head for e in entries if (o := outcomes.get(e.path)) is not None and o.head is not None}
        for e in entries:
            o = outcomes.get(e.path)
            if o is not None and o.held:
                head = heads.get(e.sha256)
                self.judge(e, head if head is not None or self.sink is None else self.sink.head(e), o)

    def _hash(self, read: Callable[[memoryview], int], out: FileSink | None, feeds: list[Callable[[memoryview], None]], *,
              src_fd: int | None, limit: int | None) -> FileDigest:
        def on_bytes(n: int) -> None:
            self.task.advance(n)
            if out is not None:
                out.wrote(n)

        def fan_out(chunk: memoryview) -> None:
            for feed in feeds:
                feed(chunk)

        if out is not None and out.fd is not None and src_fd is not None:
            try:
                return copy_then_hash(src_fd, out.fd, limit=limit if limit is not None else 1 << 62, on_bytes=on_bytes,
                                      on_chunk=fan_out if feeds else None)
            except OSError as e:  # the kernel copies both ways at once; what fails there is the write (full disk, a file limit)
                raise oserror_to_airpack(e, "cannot write", out.where) from None

        def write(chunk: memoryview) -> None:
            fan_out(chunk)
            if out is not None:
                out.write(chunk)

        return stream_and_hash(read, write=write if (feeds or out is not None) else None, on_bytes=on_bytes, limit=limit)

    @staticmethod
    def _judge(f: FileEntry, d: FileDigest, grab: HeaderCollector | None, kept: _Keep | None) -> _Outcome:
        if d.size != f.size:
            return _Outcome(mismatch=_mismatch(f, size=d.size, sha256=d.sha256, reason="size changed while reading"))
        if d.sha256 != f.sha256:
            return _Outcome(mismatch=_mismatch(f, size=d.size, sha256=d.sha256))
        result = _Outcome(kept=bytes(kept.data) if kept is not None else None)
        if grab is not None:
            try:
                result.header = grab.info(d.size, display=f.path)
            except AirpackError as e:
                result.header_error = e
        return result


def _random_access_files(source: BundleSource, manifest: Manifest, files: _Files, report: MismatchReport, *,
                         workers: int | None) -> dict[str, _Outcome]:
    """Folder and OCI: every file opened on its own, in parallel (largest first), or in path order for an ordered sink."""
    sink = files.sink
    resized = {c.path: c.actual_size or 0 for c in report.changed}
    listed_reason = {c.path: c.reason for c in report.changed}

    def one(f: FileEntry) -> tuple[str, _Outcome]:
        if sink is not None and sink.holds(f):
            return f.path, _Outcome(held=True)  # the sink holds these bytes already: nothing to read
        try:
            with source.open(f) as reader:
                src_fd = reader.fd if isinstance(reader, LocalFile) else None
                # Without a sink, a resized file is hashed whole, so the report gives both digests.
                limit = None if sink is None else f.size
                outcome = files.check(f, reader.readinto, src_fd=src_fd, limit=limit)
        except FileNotFoundError:  # removed while verify ran
            return f.path, _Outcome(vanished=True)
        if f.path in listed_reason and outcome.mismatch is not None:
            outcome.mismatch = replace(outcome.mismatch, reason=listed_reason[f.path])
        if sink is not None and sink.ordered and outcome.mismatch is not None:
            raise BundleMismatchError(MismatchReport(changed=(outcome.mismatch,)))
        return f.path, outcome

    todo = [f for f in manifest.carried if f.path not in report.missing]
    if sink is not None and sink.ordered:
        outcomes = dict(one(f) for f in sorted(todo, key=lambda f: f.path))
    else:
        outcomes = dict(parallel_map(one, sorted(todo, key=lambda f: -resized.get(f.path, f.size)), workers=workers))
    files.judge_held(todo, outcomes)
    return outcomes


def _stream_files(source: BundleSource, manifest: Manifest, files: _Files) -> tuple[dict[str, _Outcome], MismatchReport]:
    """Tar and parts: each member once, in order, checked by name before a byte of it is used."""
    expected = {f.path: f for f in manifest.carried}
    seen = NameSet([ENVELOPE_NAME, MANIFEST_NAME], what="member", where=f" in {source.label}")
    aliases = _Aliases(expected, what="member", where=f"in {source.label}")
    names: list[str] = []
    extra: list[str] = []
    resized: list[FileMismatch] = []
    outcomes: dict[str, _Outcome] = {}
    for m, reader in source.stream():
        name = check_relpath(m.name)
        seen.add(name)
        aliases.refuse(name)
        names.append(name)
        if name in manifest.on_host:
            raise _carried_on_host(name)
        entry = expected.get(name)
        if entry is None:
            extra.append(name)
        elif m.size != entry.size:
            resized.append(_mismatch(entry, size=m.size))
        else:
            outcomes[name] = files.check(entry, reader.readinto)
    seen.check_prefixes()
    report = MismatchReport(missing=tuple(sorted(set(expected) - set(names))), extra=tuple(sorted(extra)), changed=tuple(resized))
    return outcomes, report


def _preread_headers(source: BundleSource, manifest: Manifest) -> dict[str, SafetensorsInfo]:
    """Headers a folder source can read before hashing (for a sink's plan); a header that fails now fails again later."""
    root = source.root
    if root is None:
        return {}
    out: dict[str, SafetensorsInfo] = {}
    for f in manifest.carried:  # only called once the entries are exactly as signed
        if content.is_safetensors(f.path):
            try:
                out[f.path] = read_header(root.joinpath(*f.path.split("/")), display=f.path)
            except (AirpackError, OSError):
                continue  # reported, with the rest, once the file is hashed
    return out


def verify_source(source: BundleSource, policy: TrustPolicy | None, *, now: dt.datetime | None = None,
                  sequence: SequenceCheck | None = None, sink: Sink | None = None, keep: Callable[[str], bool] | None = None,
                  workers: int | None = None, progress: Progress = NULL_PROGRESS,
                  host: HostCopies | None = None) -> VerifiedBundle:
    """Run the check sequence once over ``source``; return the verified bundle or raise the first named refusal.

    ``sink`` receives every verified byte; ``keep(path)`` names small files
    whose verified bytes the caller wants back (``VerifiedBundle.kept``).
    ``host`` (``verify --registry``) names the host's copies of a delta's
    files expected on the host; a sink that ``relies_on_host`` names its own.
    """
    if policy is not None:
        policy.check_usable()
    locate = sink.host if sink is not None and sink.host is not None else host
    with source.session():
        trusted = _trust(source, policy, now=now, sequence=sequence, sink=sink)
        manifest = trusted.manifest
        held = None
        if manifest.is_delta and locate is not None:  # before a byte of the bundle is read or written
            held = check_on_host(manifest.expected_on_host, locate, workers=workers, progress=progress)
            trusted = replace(trusted, headers=held.headers, host_kept=held.kept)
        task = progress.task(f"{sink.action if sink is not None else 'verify'} {manifest.name}",
                             sum(f.size for f in manifest.carried))
        files = _Files(sink, keep, task, content.Policy.signed(manifest))
        try:
            if source.random_access:
                report = _tree_report(source.members(), manifest)
                if sink is not None and report:
                    raise BundleMismatchError(report)  # nothing is written for a bundle whose entries are not as signed
                if sink is not None:  # the sink plans with the headers (install's fit check) before a byte is copied
                    trusted = replace(trusted, headers={**trusted.headers, **_preread_headers(source, manifest)})
                    sink.begin(trusted)
                outcomes = _random_access_files(source, manifest, files, report, workers=workers)
            else:
                if sink is not None:
                    sink.begin(trusted)
                outcomes, report = _stream_files(source, manifest, files)
        finally:
            task.close()
        vb = _conclude(trusted, report, outcomes)  # inside the session: a parts source names the damaged part
    if held is None:
        return vb
    return replace(vb, host_checked=True, headers={**held.headers, **vb.headers}, kept={**held.kept, **vb.kept})


# -- step 7 for a delta: what the host holds ------------------------------------------------------


@dataclass
class _HostRead:
    """What hashing the host's copy of one file learnt: a mismatch, or its safetensors header and (small files) its bytes."""

    mismatch: FileMismatch | None = None
    header: SafetensorsInfo | None = None
    data: bytes | None = None


def _hash_copy(f: FileEntry, path: Path, root: Path) -> _HostRead:
    """One registry copy of ``f``'s bytes: a plain file inside the registry (never a link) with exactly those bytes."""
    def refused(why: str) -> _HostRead:
        return _HostRead(mismatch=FileMismatch(path=f.path, reason=why, expected_size=f.size, expected_sha256=f.sha256))

    try:
        if not os.path.realpath(path).startswith(os.path.realpath(root) + os.sep):
            return refused("its registry copy resolves to outside the registry")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return refused("missing from the registry")
    except OSError as e:
        return refused("its registry copy is a symbolic link" if e.errno == errno.ELOOP else f"unreadable in the registry ({e.strerror})")
    grab = HeaderCollector() if content.is_safetensors(f.path) else None
    kept = _Keep() if f.size <= MAX_HOST_KEPT_BYTES else None
    feeds = [x.feed for x in (grab, kept) if x is not None]

    def feed(chunk: memoryview) -> None:
        for x in feeds:
            x(chunk)

    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return refused("its registry copy is not a plain file")
        d = stream_and_hash(lambda view: os.readv(fd, [view]), write=feed if feeds else None, limit=f.size)
    finally:
        os.close(fd)
    if d.size != f.size or d.sha256 != f.sha256:
        return _HostRead(mismatch=_mismatch(f, size=d.size, sha256=d.sha256, reason="the registry's copy has other bytes"
                                            if d.size == f.size else "the registry's copy has another size"))
    try:
        header = grab.info(d.size, display=f.path) if grab is not None else None
    except AirpackError:
        header = None  # installed (and checked) before; the fit estimate then says it cannot read it
    return _HostRead(header=header, data=bytes(kept.data) if kept is not None else None)


@dataclass(frozen=True)
class HostFiles:
    """A delta's host files once every copy held: their safetensors headers and small files (for the fit check)."""

    headers: Mapping[str, SafetensorsInfo]
    kept: Mapping[str, bytes]


def check_on_host(entries: tuple[FileEntry, ...], locate: HostCopies, *, workers: int | None = None,
                  progress: Progress = NULL_PROGRESS) -> HostFiles:
    """Hash every copy the host holds of each file a delta relies on; exit 3 naming each one missing or changed.

    The registry's database says what it holds, but its disk may have rotted or
    been changed by hand since, so no row is taken on its word: a file with no
    copy, a copy that is a link (inside the registry or out of it), or a copy
    with other bytes is a refusal, and nothing has been written yet.
    """
    copies = {f.path: locate.copies(f) for f in entries}
    task = progress.task("check the host's files", sum(f.size * max(1, len(copies[f.path])) for f in entries))

    def one(job: tuple[FileEntry, Path]) -> tuple[str, _HostRead]:
        f, path = job
        try:
            return f.path, _hash_copy(f, path, locate.root)
        finally:
            task.advance(f.size)

    try:
        jobs = [(f, p) for f in entries for p in copies[f.path]]
        reads = parallel_map(one, jobs, workers=workers)
    finally:
        task.close()
    bad = [r.mismatch for _, r in reads if r.mismatch is not None]
    missing = tuple(sorted(f.path for f in entries if not copies[f.path]))
    changed = {m.path: m for m in bad}
    report = MismatchReport(missing=missing, changed=tuple(changed[p] for p in sorted(changed)))
    if report:
        first = (*missing, *sorted(changed))[0]
        raise HostFilesError(f"this delta bundle relies on {len(missing) + len(changed)} file(s) the registry does not hold intact "
                             f"(first: {first}: {changed[first].reason if first in changed else 'not in the registry'})",
                             report=report, path=first)
    return HostFiles(headers={p: r.header for p, r in reads if r.header is not None},
                     kept={p: r.data for p, r in reads if r.data is not None})


def _conclude(trusted: Trusted, report: MismatchReport, outcomes: dict[str, _Outcome]) -> VerifiedBundle:
    """One report of every difference first; then the first malformed safetensors header; else the verified bundle."""
    changed = {c.path: c for c in report.changed}
    changed.update({p: o.mismatch for p, o in outcomes.items() if o.mismatch is not None})
    vanished = [p for p, o in outcomes.items() if o.vanished]
    final = MismatchReport(missing=tuple(sorted((*report.missing, *vanished))), extra=report.extra,
                           changed=tuple(changed[p] for p in sorted(changed)))
    if final:
        raise BundleMismatchError(final)
    for p in sorted(outcomes):
        err = outcomes[p].header_error
        if err is not None:
            raise err
    headers = {p: o.header for p, o in outcomes.items() if o.header is not None}
    for p, early in trusted.headers.items():
        if p in headers and headers[p] != early:
            raise IntegrityError(f"safetensors header of {p} changed while the bundle was being read", path=p)
    head = {f.name: getattr(trusted, f.name) for f in fields(Trusted)}
    return VerifiedBundle(**{**head, "headers": headers}, kept={p: o.kept for p, o in outcomes.items() if o.kept is not None})


def verify_bundle(opts: VerifyOptions) -> VerifiedBundle:
    """``airpack verify``: any local form, every check, nothing written (``host``: a delta's host files too)."""
    source = open_source(opts.bundle, policy=opts.policy, workers=opts.workers)
    return verify_source(source, opts.policy, now=opts.now, workers=opts.workers, progress=opts.progress, host=opts.host)
