"""``airpack verify``: prove a bundle is what trusted people signed.

Order matters: cap and parse the envelope, verify signatures over the exact
payload bytes, only then parse the payload, then check the manifest copy,
every path, every size, every digest, every safetensors header, and freshness.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from .. import content
from .._fs import check_no_collisions, check_relpath, collision_key, oserror_to_airpack, read_capped
from ..bundle import BundleDir
from ..errors import (
    BundleMismatchError,
    ContentPolicyError,
    ExpiredError,
    FileMismatch,
    IntegrityError,
    MismatchReport,
    UnsafePathError,
)
from ..hashing import FileDigest, hash_file, parallel_map
from ..manifest import MANIFEST_NAME, FileEntry, Manifest, parse
from ..progress import NULL_PROGRESS, Progress
from ..safetensors_check import SafetensorsInfo, read_header
from ..signing import MAX_ENVELOPE_BYTES, PAYLOAD_TYPE
from ..trust import TrustedKey, TrustPolicy, VerifiedPayload, verify_envelope


@dataclass(frozen=True, kw_only=True)
class VerifyOptions:
    bundle: Path
    policy: TrustPolicy
    now: dt.datetime | None = None
    workers: int | None = None
    progress: Progress = NULL_PROGRESS


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signatures, paths, sizes and digests all held at verify time."""

    root: Path
    manifest: Manifest
    signers: tuple[TrustedKey, ...]
    payload: bytes
    safetensors: dict[str, SafetensorsInfo] = field(repr=False, compare=False, default_factory=dict)

    @property
    def signer_names(self) -> list[str]:
        return [k.name for k in self.signers]


def verify_payload(bundle: BundleDir, policy: TrustPolicy, *, now: dt.datetime | None = None) -> tuple[VerifiedPayload, Manifest]:
    """Signatures, then parse, then freshness and the manifest copy: everything but file contents."""
    where = str(bundle.envelope_path)
    envelope = bundle.envelope()
    verified = verify_envelope(envelope, policy, expected_type=PAYLOAD_TYPE, where=where)
    digest = hashlib.sha256(verified.payload).hexdigest()
    manifest = parse(verified.payload, digest=digest)
    check_fresh(manifest, now=now)
    check_manifest_copy(bundle, verified.payload)
    return verified, manifest


def check_manifest_copy(bundle: BundleDir, payload: bytes) -> None:
    """The readable manifest.json must be byte-identical to the payload the envelope carries."""
    try:
        copy = read_capped(bundle.manifest_path, MAX_ENVELOPE_BYTES, display=f"{bundle.root}/{MANIFEST_NAME}", what="manifest copy")
    except FileNotFoundError:
        raise BundleMismatchError(MismatchReport(missing=(MANIFEST_NAME,)), path=MANIFEST_NAME) from None
    if copy != payload:
        raise IntegrityError(
            f"{MANIFEST_NAME} differs from the signed payload in {bundle.envelope_path.name}; the readable copy was altered",
            path=MANIFEST_NAME,
        )


def check_fresh(manifest: Manifest, *, now: dt.datetime | None = None) -> None:
    t = now or dt.datetime.now(dt.UTC)
    if manifest.expires is not None and t >= manifest.expires:
        raise ExpiredError(
            f"bundle {manifest.name} (sequence {manifest.sequence}) expired at {manifest.expires:%Y-%m-%dT%H:%M:%SZ}"
        )


def check_content_policy(manifest: Manifest) -> None:
    """Pickles and code must be both listed on their model and allowed by the signed policy."""
    flagged_p = {f"{m.prefix}/{p}" for m in manifest.models for p in m.pickles}
    flagged_c = {f"{m.prefix}/{p}" for m in manifest.models for p in m.code}
    for f in manifest.files:
        if f.path.startswith("wheels/"):
            continue
        if content.is_pickle(f.path) and (not manifest.allow_pickle or f.path not in flagged_p):
            raise ContentPolicyError(f"pickled file {f.path} is not allowed by the bundle's signed policy", path=f.path)
        if content.is_code(f.path) and (not manifest.allow_code or f.path not in flagged_c):
            raise ContentPolicyError(f"code file {f.path} is not allowed by the bundle's signed policy", path=f.path)


def check_tree(bundle: BundleDir, manifest: Manifest) -> MismatchReport:
    """Paths and sizes: links and devices refused by name; missing, extra and resized files reported."""
    try:
        entries = bundle.entries()
    except OSError as err:
        raise oserror_to_airpack(err, "cannot read", str(err.filename or bundle.root)) from None
    for e in entries:
        check_relpath(e.path)
        if e.problem:
            raise UnsafePathError(f"unsafe entry {e.path} in bundle: {e.problem}", path=e.path)
    check_no_collisions(e.path for e in entries)
    on_disk = {e.path: e for e in entries}
    expected = {f.path: f for f in manifest.files}
    # Names that are equal up to case/normalisation but not byte-equal are collisions, not extras.
    keys = {collision_key(p): p for p in expected}
    for p in on_disk:
        if p not in expected and collision_key(p) in keys:
            raise UnsafePathError(f"unsafe entry {p} in bundle: collides with {keys[collision_key(p)]!r}", path=p)
    missing = tuple(sorted(set(expected) - set(on_disk)))
    extra = tuple(sorted(set(on_disk) - set(expected)))
    changed = tuple(
        FileMismatch(path=p, reason="size differs", expected_size=f.size, actual_size=on_disk[p].size, expected_sha256=f.sha256)
        for p, f in sorted(expected.items())
        if p in on_disk and on_disk[p].size != f.size
    )
    return MismatchReport(missing=missing, extra=extra, changed=changed)


def check_files(bundle: BundleDir, manifest: Manifest, *, workers: int | None = None, progress: Progress = NULL_PROGRESS) -> None:
    """Every path, size and digest against the manifest; one report lists every difference."""
    report = check_tree(bundle, manifest)
    # Hash every file that is there, resized ones too, so the report lists every changed file with both digests.
    resized = {c.path: c.actual_size or 0 for c in report.changed}
    to_hash = [f for f in manifest.files if f.path not in report.missing]
    task = progress.task(f"verify {manifest.name}", sum(resized.get(f.path, f.size) for f in to_hash))

    def one(f: FileEntry) -> tuple[str, FileDigest | None]:
        try:
            return f.path, hash_file(bundle.path_of(f.path), on_bytes=task.advance, display=f.path)
        except FileNotFoundError:  # removed while verify ran
            return f.path, None
        except OSError as e:  # an unreadable sector on the medium: the bundle is damaged
            raise IntegrityError(f"cannot read {f.path} in the bundle: {e.strerror}", path=f.path) from None

    try:
        # Largest first, so one big file started last does not leave the other workers idle.
        digests = dict(parallel_map(one, sorted(to_hash, key=lambda f: -resized.get(f.path, f.size)), workers=workers))
    finally:
        task.close()
    vanished = tuple(p for p, d in digests.items() if d is None)
    changed: list[FileMismatch] = []
    for f in to_hash:
        d = digests[f.path]
        if d is None:
            continue
        if f.path in resized or d.size != f.size:
            why = "size differs" if f.path in resized else "size changed while reading"
            changed.append(FileMismatch(path=f.path, reason=why, expected_size=f.size, actual_size=d.size,
                                        expected_sha256=f.sha256, actual_sha256=d.sha256))
        elif d.sha256 != f.sha256:
            changed.append(
                FileMismatch(path=f.path, reason="digest differs", expected_size=f.size, actual_size=d.size,
                             expected_sha256=f.sha256, actual_sha256=d.sha256)
            )
    missing = tuple(sorted(report.missing + vanished))
    final = MismatchReport(missing=missing, extra=report.extra, changed=tuple(sorted(changed, key=lambda c: c.path)))
    if final:
        raise BundleMismatchError(final)


def check_safetensors(bundle: BundleDir, manifest: Manifest) -> dict[str, SafetensorsInfo]:
    out: dict[str, SafetensorsInfo] = {}
    for f in manifest.files:
        if content.is_safetensors(f.path):
            try:
                out[f.path] = read_header(bundle.path_of(f.path), display=f.path)
            except FileNotFoundError:
                raise BundleMismatchError(MismatchReport(missing=(f.path,))) from None
            except OSError as e:
                raise IntegrityError(f"cannot read {f.path} in the bundle: {e.strerror}", path=f.path) from None
    return out


def verify_bundle(opts: VerifyOptions) -> VerifiedBundle:
    """Run every check; return the trusted bundle or raise the first named refusal."""
    from ..parts import locate

    src = locate(opts.bundle)  # a tar or a parts folder is streamed, never extracted
    if src.kind != "dir":
        from .transfer import verify_source

        return verify_source(opts, src)
    bundle = BundleDir.open(opts.bundle)
    verified, manifest = verify_payload(bundle, opts.policy, now=opts.now)
    check_content_policy(manifest)
    check_files(bundle, manifest, workers=opts.workers, progress=opts.progress)
    headers = check_safetensors(bundle, manifest)
    return VerifiedBundle(root=bundle.root, manifest=manifest, signers=verified.signers, payload=verified.payload, safetensors=headers)
