"""Push a verified bundle to an OCI registry inside the gap; pull or install it on every GPU node.

This is the cluster's transport, not the offline file path: it is the one
operation that imports ``airpack.fetch`` and ``airpack.ops.install`` together.
``ops/verify``, ``ops/install``, ``ops/fit`` and ``registry`` still never reach
the network; a node that installs from a folder or a disk never loads this.

Trust does not travel with the registry. Push verifies before it sends a
byte. Pull and install fetch the OCI manifest and the envelope first, check
the signatures against the node's OWN policy, freshness, that the artifact
carries exactly the manifest those signatures cover, and that its layers are
exactly the signed files, all BEFORE any model byte is downloaded. Each blob
is then checked for size and digest while it streams, into a temp folder
that is renamed into place (pull) or handed to the file install (install),
which verifies again and installs atomically. Nothing is left on failure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from .._fs import check_no_collisions, fsync_dir, oserror_to_airpack, read_capped
from ..bundle import BundleDir
from ..errors import (
    AirpackError,
    ArtifactMismatchError,
    BundleMismatchError,
    EnvelopeError,
    FileMismatch,
    IntegrityError,
    MismatchReport,
    UsageError,
)
from ..fetch.oci import (
    EMPTY_BYTES,
    EMPTY_CONFIG,
    ENVELOPE_MEDIA_TYPE,
    MANIFEST_COPY_MEDIA_TYPE,
    Artifact,
    Descriptor,
    OciAccess,
    OciClient,
    OciRef,
    blob_descriptor,
    build_manifest,
    file_descriptor,
    parse_artifact,
)
from ..hashing import parallel_map
from ..manifest import ENVELOPE_NAME, MANIFEST_NAME, Manifest, format_time, parse
from ..progress import NULL_PROGRESS, Progress
from ..registry import DB_NAME, Registry, Writer, audit_base, error_record
from ..signing import MAX_ENVELOPE_BYTES, PAYLOAD_TYPE, parse_envelope
from ..trust import TrustedKey, TrustPolicy, verify_envelope
from .install import InstallOptions, InstallResult, check_sequence, install
from .verify import VerifyOptions, check_content_policy, check_fresh, check_safetensors, verify_bundle

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


def push(opts: PushOptions) -> PushResult:
    """Verify the bundle, then send each blob the registry lacks, then the manifest under the tag."""
    if opts.target.tag is None or opts.target.digest is not None:
        raise UsageError(f"push needs a tag and no digest: oci://HOST/REPOSITORY:TAG (got {opts.target})")
    if opts.chunk_size is not None and opts.chunk_size < 1024 * 1024:
        raise UsageError("--chunk-size must be at least 1 MiB")
    opts.policy.check_usable()
    vb = verify_bundle(VerifyOptions(bundle=opts.bundle, policy=opts.policy, now=opts.now, workers=opts.workers, progress=opts.progress))
    m = vb.manifest
    # The envelope we send is the one we verify now, byte for byte; its payload must be the one verify saw.
    env_path = BundleDir(root=vb.root).envelope_path
    env_bytes = read_capped(env_path, MAX_ENVELOPE_BYTES, display=str(env_path), what="envelope")
    vp = verify_envelope(parse_envelope(env_bytes, where=str(env_path)), opts.policy, expected_type=PAYLOAD_TYPE, where=str(env_path))
    if vp.payload != vb.payload:
        raise IntegrityError(f"{env_path} changed while it was being pushed; verify and push again", path=ENVELOPE_NAME)

    env_desc = blob_descriptor(ENVELOPE_MEDIA_TYPE, env_bytes, ENVELOPE_NAME)
    copy_desc = blob_descriptor(MANIFEST_COPY_MEDIA_TYPE, vb.payload, MANIFEST_NAME)
    files = [file_descriptor(f.path, f.sha256, f.size) for f in m.files]
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
                client.upload_file(BundleDir(root=vb.root).path_of(d.title or ""), d, chunk_size=opts.chunk_size, on_bytes=task.advance)

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


# -- fetch and check before downloading -----------------------------------------------------------


@dataclass(frozen=True)
class CheckedArtifact:
    """An artifact whose envelope, signed manifest and layer list agree; its file blobs are not fetched yet."""

    source: OciRef
    artifact: Artifact
    envelope: bytes
    payload: bytes
    manifest: Manifest
    signers: tuple[TrustedKey, ...]  # empty when no policy was given (pull without --trust)

    @property
    def verified(self) -> bool:
        return bool(self.signers)


def check_artifact(client: OciClient, policy: TrustPolicy | None, *, now: dt.datetime | None = None) -> CheckedArtifact:
    """Fetch the OCI manifest and the envelope, and refuse anything untrusted before a model byte moves.

    Exit 4 when the envelope does not vouch for this artifact (untrusted or too few signers, expired, or
    an envelope that signs another manifest than the one the artifact carries); exit 3 when the signed
    manifest holds but the artifact's layers are not exactly its files.
    """
    raw, digest = client.get_manifest()
    where = str(client.ref)
    art = parse_artifact(raw, where=where, digest=digest)
    env_bytes = client.get_blob_bytes(art.envelope, MAX_ENVELOPE_BYTES)
    env_where = f"{where} ({ENVELOPE_NAME})"
    env = parse_envelope(env_bytes, where=env_where)
    signers: tuple[TrustedKey, ...] = ()
    if policy is not None:
        vp = verify_envelope(env, policy, expected_type=PAYLOAD_TYPE, where=env_where)
        payload, signers = vp.payload, vp.signers
    else:
        if env.payload_type != PAYLOAD_TYPE:
            raise EnvelopeError(f"envelope {env_where} has payload type {env.payload_type!r}, expected {PAYLOAD_TYPE!r}", path=env_where)
        payload = env.payload
    pdigest = hashlib.sha256(payload).hexdigest()
    if art.manifest_copy.sha256 != pdigest or art.manifest_copy.size != len(payload):
        raise ArtifactMismatchError(
            f"{where}: the envelope signs manifest sha256 {pdigest}, but the artifact carries manifest {art.manifest_copy.digest}: "
            "a signature moved onto another bundle",
            path=ENVELOPE_NAME,
        )
    manifest = parse(payload, digest=pdigest)
    if policy is not None:
        check_fresh(manifest, now=now)
        check_content_policy(manifest)
    check_layers(art, manifest)
    return CheckedArtifact(source=client.ref, artifact=art, envelope=env_bytes, payload=payload, manifest=manifest, signers=signers)


def check_layers(art: Artifact, manifest: Manifest) -> None:
    """The file layers must be exactly the signed files: same paths, sizes and digests (exit 3 otherwise)."""
    check_no_collisions([d.title or "" for d in art.files] + [ENVELOPE_NAME, MANIFEST_NAME])
    layers = {d.title: d for d in art.files}
    expected = {f.path: f for f in manifest.files}
    missing = tuple(sorted(set(expected) - set(layers)))
    extra = tuple(sorted(p for p in layers if p not in expected and p is not None))
    changed = tuple(
        FileMismatch(path=p, reason="layer differs from the signed manifest", expected_size=f.size, actual_size=layers[p].size,
                     expected_sha256=f.sha256, actual_sha256=layers[p].sha256)
        for p, f in sorted(expected.items())
        if p in layers and (layers[p].sha256 != f.sha256 or layers[p].size != f.size)
    )
    report = MismatchReport(missing=missing, extra=extra, changed=changed)
    if report:
        raise BundleMismatchError(report)


def download_into(client: OciClient, checked: CheckedArtifact, dest: Path, *, workers: int | None = None,
                  progress: Progress = NULL_PROGRESS) -> None:
    """Write the bundle into the empty folder ``dest``: every blob size- and digest-checked as it streams."""
    art, m = checked.artifact, checked.manifest
    task = progress.task(f"pull {m.name}", art.total_bytes)
    made: set[Path] = {dest}

    for d in art.files:
        parent = dest.joinpath(*(d.title or "").split("/")).parent
        if parent not in made:
            parent.mkdir(parents=True, exist_ok=True)
            made.add(parent)

    def one(d: Descriptor) -> None:
        path = dest.joinpath(*(d.title or "").split("/"))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o644)
        try:
            client.download_blob(d, fd, on_bytes=task.advance)
            os.fsync(fd)
        finally:
            os.close(fd)

    try:
        parallel_map(one, sorted(art.files, key=lambda d: -d.size), workers=workers or DEFAULT_WORKERS)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot write", str(dest)) from None
    finally:
        task.close()
    for name, data in ((MANIFEST_NAME, checked.payload), (ENVELOPE_NAME, checked.envelope)):
        with open(dest / name, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    for folder in sorted(made, key=lambda p: -len(p.parts)):
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


# -- pull ------------------------------------------------------------------------------------


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


def pull(opts: PullOptions) -> PullResult:
    """Recreate the bundle folder ``out`` from the registry, all or nothing."""
    out = Path(opts.out)
    if os.path.lexists(out):
        raise UsageError(f"{out} already exists; pull writes a new folder", path=str(out))
    if opts.policy is not None:
        opts.policy.check_usable()
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot create", str(parent)) from None
    with OciClient(opts.source, opts.access) as client:
        checked = check_artifact(client, opts.policy, now=opts.now)
        with _temp_dir(parent, f".{out.name}.pull-") as tmp:
            download_into(client, checked, tmp, workers=opts.workers, progress=opts.progress)
            if opts.policy is not None:
                # Digests held while streaming; safetensors headers are the one check verify makes beyond them.
                check_safetensors(BundleDir(root=tmp), checked.manifest)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, out)
            except OSError as e:
                if os.path.lexists(out):
                    raise UsageError(f"{out} appeared while pulling; nothing was written there", path=str(out)) from None
                raise oserror_to_airpack(e, "cannot rename into", str(out)) from None
            fsync_dir(parent)
    return PullResult(source=opts.source, out=out, digest=checked.artifact.digest, manifest=checked.manifest,
                      signers=checked.signers, bytes_received=checked.artifact.total_bytes)


# -- install from the registry ------------------------------------------------------------------

STAGE_PREFIX = ".oci-stage-"
STALE_UNLOCKED_SECONDS = 3600  # a stage folder with no lock file this old was left by a crash before it was locked


class _ConnOnly:
    """What ``check_sequence`` reads of a writer: its connection (here a read-only one)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn


def _early_sequence_check(reg: Registry, manifest: Manifest, *, allow_downgrade: bool) -> None:
    """Refuse a rollback or a sequence jump before downloading; the file install checks again under its lock."""
    if not os.path.lexists(reg.path(DB_NAME)):
        return
    with reg.reader() as conn:
        check_sequence(cast(Writer, _ConnOnly(conn)), manifest, allow_downgrade=allow_downgrade)


def _sweep_stale_stages(root: Path) -> None:
    """Remove stage folders whose process is gone (its flock is free); never one in use by another install."""
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith(STAGE_PREFIX) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for e in entries:
        lock = Path(e.path) / ".lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if time.time() - os.lstat(e.path).st_mtime > STALE_UNLOCKED_SECONDS:
                    shutil.rmtree(e.path, ignore_errors=True)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # another install is downloading into it
        else:
            shutil.rmtree(e.path, ignore_errors=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _stage_dir(root: Path) -> Iterator[Path]:
    """A locked stage folder on the registry's filesystem, removed on the way out whatever happens."""
    _sweep_stale_stages(root)
    with _temp_dir(root, STAGE_PREFIX) as tmp:
        fd = os.open(tmp / ".lock", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield tmp
        finally:
            os.close(fd)


def _stage_name(ref: OciRef, digest: str) -> str:
    """The staged bundle's folder name, which the file install records as its source: the artifact, pinned."""
    return re.sub(r"[^A-Za-z0-9._:@-]", "_", f"{ref.host}_{ref.repository}@{digest}")[:200]


@contextlib.contextmanager
def staged_bundle(*, source: OciRef, registry: Path, policy: TrustPolicy, access: OciAccess | None = None,
                  allow_downgrade: bool = False, options: dict[str, Any] | None = None, workers: int | None = None,
                  now: dt.datetime | None = None, progress: Progress = NULL_PROGRESS) -> Iterator[tuple[Path, CheckedArtifact]]:
    """Check trust and rollback, then download the bundle into a stage folder on the registry's filesystem.

    The caller hands the folder to the file install, which verifies again, installs atomically and
    writes its audit line. A refusal here, before that hand-over (untrusted, rollback, a tampered
    blob, the registry gone), writes the audit line itself, so every attempt leaves exactly one.
    The stage folder is removed however the block ends.
    """
    reg = Registry.open(Path(registry), create=True)
    record = audit_base("install", source=str(source), transport="oci", options=dict(options or {}))
    handed_over = False
    try:
        policy.check_usable()
        with OciClient(source, access or OciAccess()) as client:
            checked = check_artifact(client, policy, now=now)
            m = checked.manifest
            record.update({"bundle": {"name": m.name, "channel": m.channel, "sequence": m.sequence}, "manifest_sha256": m.digest,
                           "oci_digest": checked.artifact.digest, "signers": [k.keyid for k in checked.signers],
                           "signer_names": [k.name for k in checked.signers]})
            _early_sequence_check(reg, m, allow_downgrade=allow_downgrade)
            with _stage_dir(reg.root) as tmp:
                bundle = tmp / _stage_name(source, checked.artifact.digest)
                bundle.mkdir()
                download_into(client, checked, bundle, workers=workers, progress=progress)
                handed_over = True
                yield bundle, checked
    except BaseException as e:
        if not handed_over:
            try:
                reg.audit_append({**record, "result": "refused" if isinstance(e, AirpackError) else "failed", "error": error_record(e)})
            except AirpackError as log_err:
                if isinstance(e, AirpackError):
                    e.message = f"{e.message} (and the audit line could not be written: {log_err.message})"
        raise


@dataclass(frozen=True, kw_only=True)
class OciInstallOptions:
    """Install from ``source``; ``install`` is what the file install gets, its ``bundle`` replaced by the staged folder."""

    source: OciRef
    install: InstallOptions
    access: OciAccess = field(default_factory=OciAccess)


@dataclass(frozen=True)
class OciInstallResult:
    source: OciRef
    digest: str
    install: InstallResult


def install_from_oci(opts: OciInstallOptions) -> OciInstallResult:
    """Everything ``airpack install`` guarantees, with the registry inside the gap as the medium."""
    i = opts.install
    options = {"allow_downgrade": i.allow_downgrade, "allow_pickle": i.allow_pickle, "ignore_fit": i.ignore_fit,
               "gpu": i.gpu, "context": i.context, "runtime": i.runtime}
    with staged_bundle(source=opts.source, registry=i.registry, policy=i.policy, access=opts.access, allow_downgrade=i.allow_downgrade,
                       options=options, workers=i.workers, now=i.now, progress=i.progress) as (folder, checked):
        result = install(replace(i, bundle=folder, adopt_staged=True))  # the stage is ours: move, do not copy
    return OciInstallResult(source=opts.source, digest=checked.artifact.digest, install=result)
