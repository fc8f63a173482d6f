"""Push a verified bundle to an OCI registry inside the gap; pull or install it on every GPU node.

This is the cluster's transport, not the offline file path: it is the one
operation that imports ``airpack.fetch`` and ``airpack.ops.install`` together.
``ops/verify``, ``ops/install``, ``ops/fit`` and ``registry`` still never reach
the network; a node that installs from a folder or a disk never loads this.

An artifact is the fourth form a bundle takes: ``OciSource`` presents it to
the one verification pipeline like a folder (entries listed up front, each
file opened on its own), so trust does not travel with the registry and
nothing is decided here. The node fetches the OCI manifest and the envelope,
checks the signatures against its OWN policy, freshness, the channel's
sequence, the manifest copy and that the layers are exactly the signed files,
all BEFORE a model byte is downloaded; each blob is then hashed as it streams
into a fresh folder (pull) or straight into the install's staging (install).
Nothing is left on failure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .._fs import fsync_dir, oserror_to_airpack
from ..errors import EnvelopeError, IntegrityError, UsageError
from ..fetch.oci import BlobReader, OciAccess, OciClient
from ..hashing import parallel_map, write_all
from ..manifest import ENVELOPE_NAME, MANIFEST_NAME, FileEntry, Manifest, format_time
from ..oci_artifact import (
    EMPTY_BYTES,
    EMPTY_CONFIG,
    ENVELOPE_MEDIA_TYPE,
    MANIFEST_COPY_MEDIA_TYPE,
    Artifact,
    Descriptor,
    blob_descriptor,
    build_manifest,
    file_descriptor,
    parse_artifact,
)
from ..oci_ref import OciRef
from ..progress import NULL_PROGRESS, Progress
from ..signing import MAX_ENVELOPE_BYTES
from ..sources import BundleSource, Member, detect
from ..trust import TrustedKey, TrustPolicy
from .install import InstallOptions, InstallResult, install
from .verify import FileSink, Sink, Trusted, VerifyOptions, verify_bundle, verify_source

DEFAULT_WORKERS = 4  # parallel blob transfers; a registry on loopback or a LAN is bound by its own disk


# -- push ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PushOptions:
    bundle: Path
    target: OciRef
    policy: TrustPolicy
    access: OciAccess = field(default_factory=OciAccess)
    chunk_size: int | None = None  # None: one streamed PUT per blob; else PATCH chunks of this size
    workers: int | None = None
    now: dt.datetime | None = None
    progress: Progress = NULL_PROGRESS


def _signers(signers: tuple[TrustedKey, ...]) -> list[dict[str, str]]:
    return [{"name": k.name, "keyid": k.keyid} for k in signers]


@dataclass(frozen=True)
class PushResult:
    target: OciRef
    digest: str  # the OCI manifest digest: nodes pin to oci://HOST/REPO@DIGEST
    manifest: Manifest
    signers: tuple[TrustedKey, ...]
    uploaded: tuple[str, ...]  # titles of the blobs sent
    skipped: tuple[str, ...]  # titles of the blobs the registry already held
    bytes_uploaded: int

    @property
    def pinned(self) -> str:
        return str(OciRef(host=self.target.host, repository=self.target.repository, digest=self.digest))

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        return {"pushed": True, "target": str(self.target), "digest": self.digest, "pinned": self.pinned, "name": m.name,
                "channel": m.channel, "sequence": m.sequence, "manifest_sha256": m.digest, "signers": _signers(self.signers),
                "uploaded": list(self.uploaded), "skipped": list(self.skipped), "bytes_uploaded": self.bytes_uploaded,
                "total_bytes": m.total_bytes}


def push(opts: PushOptions) -> PushResult:
    """Verify the bundle, then send each blob the registry lacks, then the manifest under the tag."""
    if opts.target.tag is None or opts.target.digest is not None:
        raise UsageError(f"push needs a tag and no digest: oci://HOST/REPOSITORY:TAG (got {opts.target})")
    if opts.chunk_size is not None and opts.chunk_size < 1024 * 1024:
        raise UsageError("--chunk-size must be at least 1 MiB")
    if detect(opts.bundle)[0] != "dir":  # blobs are uploaded from the folder's files
        raise UsageError(f"push takes a bundle folder; {opts.bundle} is a tar or parts folder", path=str(opts.bundle),
                         hint="Push the bundle folder the tar was exported from (`airpack pull` recreates one from a registry).")
    vb = verify_bundle(VerifyOptions(bundle=opts.bundle, policy=opts.policy, now=opts.now, workers=opts.workers, progress=opts.progress))
    root = Path(opts.bundle)
    m = vb.manifest
    env_bytes = vb.envelope  # the envelope sent is the one just verified, byte for byte

    env_desc = blob_descriptor(ENVELOPE_MEDIA_TYPE, env_bytes, ENVELOPE_NAME)
    copy_desc = blob_descriptor(MANIFEST_COPY_MEDIA_TYPE, vb.payload, MANIFEST_NAME)
    files = [file_descriptor(f.path, f.sha256, f.size) for f in m.carried]  # a delta: only what it carries
    annotations = {
        "org.opencontainers.image.created": format_time(m.created),
        "org.opencontainers.image.title": m.name,
        "dev.airpack.bundle.name": m.name,
        "dev.airpack.bundle.channel": m.channel,
        "dev.airpack.bundle.sequence": str(m.sequence),
        "dev.airpack.manifest.sha256": m.digest,
    }
    oci_manifest = build_manifest(envelope=env_desc, manifest_copy=copy_desc, files=files, annotations=annotations)
    small = {env_desc.digest: env_bytes, copy_desc.digest: vb.payload, EMPTY_CONFIG.digest: EMPTY_BYTES}
    workers = opts.workers or DEFAULT_WORKERS

    with OciClient(opts.target, opts.access) as client:
        client.ping()
        # One transfer per distinct digest: a file twice in a bundle (or the same bytes as a small blob) goes once.
        unique: dict[str, Descriptor] = {}
        for d in (EMPTY_CONFIG, env_desc, copy_desc, *files):
            unique.setdefault(d.digest, d)
        present = dict(zip(unique, parallel_map(client.blob_exists, list(unique.values()), workers=workers), strict=True))
        to_send = [d for dg, d in unique.items() if not present[dg]]
        task = opts.progress.task(f"push {m.name}", sum(d.size for d in to_send))

        def send(d: Descriptor) -> None:
            if d.digest in small:
                client.upload_bytes(small[d.digest], d)
                task.advance(d.size)
            elif d.size == 0:
                client.upload_bytes(b"", d)
            else:
                client.upload_file(root.joinpath(*(d.title or "").split("/")), d, chunk_size=opts.chunk_size, on_bytes=task.advance)

        try:
            parallel_map(send, to_send, workers=workers)
        finally:
            task.close()
        digest = client.put_manifest(oci_manifest)
    def label(d: Descriptor) -> str:
        return d.title or ("config" if d.digest == EMPTY_CONFIG.digest else d.digest)

    return PushResult(
        target=opts.target, digest=digest, manifest=m, signers=vb.signers,
        uploaded=tuple(label(d) for d in to_send),
        skipped=tuple(label(d) for dg, d in unique.items() if present[dg]),
        bytes_uploaded=sum(d.size for d in to_send),
    )


# -- the artifact as a bundle source ---------------------------------------------------------------


class OciSource(BundleSource):
    """An airpack artifact in an OCI registry, read through one client for the length of a verification."""

    random_access = True

    def __init__(self, ref: OciRef, access: OciAccess | None = None) -> None:
        super().__init__(str(ref))
        self.ref = ref
        self.access = access or OciAccess()
        self._client: OciClient | None = None
        self._artifact: Artifact | None = None
        self._layers: dict[str, Descriptor] = {}

    @property
    def envelope_where(self) -> str:
        return f"{self.ref} ({ENVELOPE_NAME})"

    @property
    def artifact(self) -> Artifact:
        if self._artifact is None:
            raise RuntimeError("an OCI source is read inside its session()")
        return self._artifact

    @property
    def client(self) -> OciClient:
        if self._client is None:
            raise RuntimeError("an OCI source is read inside its session()")
        return self._client

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        with OciClient(self.ref, self.access) as client:
            raw, digest = client.get_manifest()
            self._client, self._artifact = client, parse_artifact(raw, where=str(self.ref), digest=digest)
            self._layers = {d.title or "": d for d in self._artifact.files}  # titles are unique once the entries are checked
            # What an install records as its source: the artifact pinned to the digest just read.
            self.location = str(OciRef(host=self.ref.host, repository=self.ref.repository, digest=digest))
            try:
                yield
            finally:
                self._client = None

    @property
    def digest_seen(self) -> str:
        """The OCI manifest digest a session read (nodes pin to oci://HOST/REPO@DIGEST); empty before one."""
        return self._artifact.digest if self._artifact is not None else ""

    def audit_fields(self) -> dict[str, str]:
        return {"transport": "oci", "oci_digest": self.digest_seen}

    def envelope_bytes(self) -> bytes:
        try:
            return self.client.get_blob_bytes(self.artifact.envelope, MAX_ENVELOPE_BYTES)
        except IntegrityError as e:  # oversized or not the blob its digest names: the envelope cannot be had
            raise EnvelopeError(f"cannot read envelope {self.envelope_where}: {e.message}", path=self.envelope_where) from None

    def manifest_copy(self) -> bytes | None:
        return self.client.get_blob_bytes(self.artifact.manifest_copy, MAX_ENVELOPE_BYTES)

    def members(self) -> list[Member]:
        return [Member(path=d.title or "", size=d.size, sha256=d.sha256) for d in self.artifact.files]

    @contextlib.contextmanager
    def open(self, entry: FileEntry) -> Iterator[BlobReader]:
        with self.client.open_blob(self._layers[entry.path]) as reader:
            yield reader


# -- pull -------------------------------------------------------------------------------------------


class _NewFile(FileSink):
    """One file of a pulled bundle, created new; removed unless its digest held."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(path)) from None

    def write(self, data: memoryview) -> None:
        try:
            write_all(self._fd, data)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(self.path)) from None

    def close(self) -> None:
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class _FolderSink(Sink):
    """Recreates the bundle folder under ``dest``: its files as verified, then the manifest copy, the envelope last."""

    action = "pull"

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.trusted: Trusted | None = None

    def begin(self, trusted: Trusted) -> None:
        self.trusted = trusted
        for f in trusted.manifest.carried:
            self.dest.joinpath(*f.path.split("/")).parent.mkdir(parents=True, exist_ok=True)

    def open(self, entry: FileEntry) -> FileSink:
        return _NewFile(self.dest.joinpath(*entry.path.split("/")))

    def seal(self) -> None:
        assert self.trusted is not None
        for name, data in ((MANIFEST_NAME, self.trusted.payload), (ENVELOPE_NAME, self.trusted.envelope)):
            with open(self.dest / name, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for folder in sorted({p.parent for p in self.dest.rglob("*")} | {self.dest}, key=lambda p: -len(p.parts)):
            fsync_dir(folder)


@contextlib.contextmanager
def _temp_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh folder under ``parent`` that is removed on the way out unless it was renamed away."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as e:
        raise oserror_to_airpack(e, "cannot create a folder in", str(parent)) from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True, kw_only=True)
class PullOptions:
    source: OciRef
    out: Path
    access: OciAccess = field(default_factory=OciAccess)
    policy: TrustPolicy | None = None  # with a policy, nothing untrusted is downloaded and the result is verified
    workers: int | None = None
    now: dt.datetime | None = None
    progress: Progress = NULL_PROGRESS


@dataclass(frozen=True)
class PullResult:
    source: OciRef
    out: Path
    digest: str
    manifest: Manifest
    signers: tuple[TrustedKey, ...]
    bytes_received: int

    @property
    def verified(self) -> bool:
        return bool(self.signers)

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        return {"pulled": True, "source": str(self.source), "out": str(self.out), "digest": self.digest, "verified": self.verified,
                "signers": _signers(self.signers), "name": m.name, "channel": m.channel, "sequence": m.sequence,
                "manifest_sha256": m.digest, "files": len(m.files), "bytes": self.bytes_received}


def pull(opts: PullOptions) -> PullResult:
    """Recreate the bundle folder ``out`` from the registry, all or nothing."""
    out = Path(opts.out)
    if os.path.lexists(out):
        raise UsageError(f"{out} already exists; pull writes a new folder", path=str(out))
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot create", str(parent)) from None
    source = OciSource(opts.source, opts.access)
    with _temp_dir(parent, f".{out.name}.pull-") as tmp:
        sink = _FolderSink(tmp)
        vb = verify_source(source, opts.policy, now=opts.now, sink=sink, workers=opts.workers or DEFAULT_WORKERS,
                           progress=opts.progress)
        sink.seal()
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, out)
        except OSError as e:
            if os.path.lexists(out):
                raise UsageError(f"{out} appeared while pulling; nothing was written there", path=str(out)) from None
            raise oserror_to_airpack(e, "cannot rename into", str(out)) from None
        fsync_dir(parent)
    digest = source.digest_seen
    return PullResult(source=opts.source, out=out, digest=digest, manifest=vb.manifest, signers=vb.signers,
                      bytes_received=vb.manifest.total_bytes)


# -- install from the registry ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class OciInstallOptions:
    """Install from ``source``; ``install`` holds everything else the file install takes (its ``bundle`` is unused)."""

    source: OciRef
    install: InstallOptions
    access: OciAccess = field(default_factory=OciAccess)


@dataclass(frozen=True)
class OciInstallResult:
    """The file install's result and the OCI manifest digest it came from; ``to_json``: ``install oci://... --json``."""

    source: OciRef
    digest: str
    install: InstallResult

    def to_json(self) -> dict[str, Any]:
        return self.install.to_json()


def install_from_oci(opts: OciInstallOptions) -> OciInstallResult:
    """Everything ``airpack install`` guarantees, with the registry inside the gap as the medium."""
    source = OciSource(opts.source, opts.access)
    result = install(replace(opts.install, source=source, workers=opts.install.workers or DEFAULT_WORKERS))
    return OciInstallResult(source=opts.source, digest=source.digest_seen, install=result)
