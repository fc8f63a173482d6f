"""``airpack install`` and the registry operations: list, show, remove, rollback, log verify.

Install reads each byte of the medium once. It checks the envelope, the
manifest, every path and size and every safetensors header up front
(``verify_payload`` and the tree checks of ``ops.verify``), runs the fit
check, and then copies each file into staging on the registry's filesystem
while hashing it: the kernel copies a chunk, and the chunk is hashed as read
back from the copy. The copy is what was hashed, so a medium that changes
bytes after those checks is caught, and nothing is installed. Files the bundle carries but the registry does not keep (an SBOM,
say) are hashed too, so every byte of the bundle is checked. Blobs the
registry already holds (same SHA-256) are reused, never read again.

The registry side (staging, journal, the commit point, recovery) is in
``airpack.registry``; see its docstring for why a SIGKILL between any two
steps is safe.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import content
from .._fs import check_relpath, open_regular_nofollow, oserror_to_airpack
from ..bundle import BundleDir
from ..errors import (
    AirpackError,
    BundleMismatchError,
    ConflictError,
    ContentPolicyError,
    DiskSpaceError,
    FileMismatch,
    IntegrityError,
    MalformedManifestError,
    MismatchReport,
    NotInstalledError,
    RollbackError,
    SequenceJumpError,
    UsageError,
)
from ..hashing import FileDigest, copy_and_hash, hash_fd, hash_file, parallel_map
from ..manifest import FileEntry, Manifest
from ..progress import NULL_PROGRESS, Progress
from ..registry import (
    FILE_MODE,
    HUB_DIR,
    MAX_SEQUENCE_JUMP,
    STAGING_DIR,
    WHEELS_DIR,
    InstalledModel,
    LogReport,
    Registry,
    Txn,
    Writer,
    audit_base,
    crash_point,
    error_record,
    link_target,
    now_text,
    ref_name,
    repo_folder,
    requirements_name,
)
from ..safetensors_check import read_header
from ..trust import TrustPolicy
from .fit import check_bundle_fit
from .verify import VerifiedBundle, check_content_policy, check_safetensors, check_tree, verify_payload

SPACE_MARGIN = 64 << 20  # keep this much free beyond the bytes to copy
_WHEEL_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,200}[A-Za-z0-9])?$")
_WHEEL_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]{0,100}$")


# -- options and results ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class InstallOptions:
    bundle: Path
    registry: Path
    policy: TrustPolicy
    gpu: str | None = None
    context: int | None = None
    runtime: str | None = None
    ignore_fit: bool = False
    allow_downgrade: bool = False
    allow_pickle: bool = False
    now: dt.datetime | None = None
    workers: int | None = None
    progress: Progress = NULL_PROGRESS
    # The bundle folder is a private stage that airpack itself wrote inside this registry (the OCI
    # path): its files are moved into place (and hashed again), not copied. Never set for a user's folder.
    adopt_staged: bool = False


@dataclass(frozen=True)
class InstallResult:
    """What an install did: ``installed``, ``noop`` (the same bundle was already there) or ``reactivated``."""

    result: str
    registry: Path
    manifest: Manifest
    signers: tuple[dict[str, str], ...]
    models: tuple[dict[str, Any], ...]
    wheels: tuple[str, ...]
    requirements: Path | None
    fit: list[dict[str, Any]] | None
    bytes_copied: int
    bytes_shared: int
    downgrade: bool
    txn: str | None

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "result": self.result,
            "registry": str(self.registry),
            "bundle": m.name,
            "channel": m.channel,
            "sequence": m.sequence,
            "manifest_sha256": m.digest,
            "signers": [dict(s) for s in self.signers],
            "models": [dict(x) for x in self.models],
            "wheels": list(self.wheels),
            "requirements": str(self.requirements) if self.requirements else None,
            "fit": self.fit,
            "bytes_copied": self.bytes_copied,
            "bytes_shared": self.bytes_shared,
            "downgrade": self.downgrade,
            "txn": self.txn,
        }


# -- verification (each byte of the medium is read once: digests are checked on the copy) ---------


def verify_for_install(bundle_path: Path, policy: TrustPolicy, *, now: dt.datetime | None = None, spool: Path | None = None,
                       progress: Progress = NULL_PROGRESS) -> VerifiedBundle:
    """Signatures, manifest, content policy, every path and size, every safetensors header.

    File digests are checked while copying (``stage_files``): the bytes that
    are hashed are the bytes that get installed.
    """
    from ..parts import locate

    src = locate(bundle_path)
    if src.kind != "dir":  # a tar or parts: every digest is checked as it streams into ``spool`` (read once)
        from .transfer import spool_verified

        if spool is None:
            raise UsageError(f"{bundle_path} is a {src.kind}; install it through `install`", path=str(bundle_path))
        return spool_verified(src, policy, into=spool, now=now, progress=progress)
    bundle = BundleDir.open(bundle_path)
    verified, manifest = verify_payload(bundle, policy, now=now)
    check_content_policy(manifest)
    report = check_tree(bundle, manifest)
    if report:
        raise BundleMismatchError(report)
    headers = check_safetensors(bundle, manifest)
    return VerifiedBundle(root=bundle.root, manifest=manifest, signers=verified.signers, payload=verified.payload, safetensors=headers)


def check_pickles(manifest: Manifest, allow_pickle: bool) -> None:
    """Pickles the signed policy allowed still need the operator's --allow-pickle."""
    pickles = [f"{m.prefix}/{p}" for m in manifest.models for p in m.pickles]
    pickles += [f.path for f in manifest.files if content.is_pickle(f.path) and not f.path.startswith(WHEELS_DIR + "/")]
    if pickles and not allow_pickle:
        first = sorted(set(pickles))[0]
        raise ContentPolicyError(
            f"bundle {manifest.name} carries pickled weights ({first}); installing them needs --allow-pickle", path=first,
            hint="Loading a pickle runs code from the file; pass --allow-pickle only if you trust its signers for that.",
        )


def check_sequence(w: Writer, m: Manifest, *, allow_downgrade: bool) -> bool:
    """Rollback protection per channel; returns True when this install is an allowed downgrade."""
    row = w.conn.execute("SELECT sequence, manifest_sha256, bundle FROM channels WHERE channel = ?", (m.channel,)).fetchone()
    if row is None:
        return False
    high, digest, name = int(row[0]), str(row[1]), str(row[2])
    if m.sequence > high + MAX_SEQUENCE_JUMP:
        raise SequenceJumpError(
            f"bundle {m.name} has sequence {m.sequence}, more than {MAX_SEQUENCE_JUMP:,} beyond {high}, "
            f"the highest installed on channel {m.channel}"
        )
    if m.sequence < high:
        why = f"bundle {m.name} has sequence {m.sequence}, lower than {high} ({name}) already installed on channel {m.channel}"
    elif m.sequence == high and m.digest != digest:
        why = f"bundle {m.name} has sequence {m.sequence} of channel {m.channel}, already installed with other content ({name})"
    else:
        return False
    if not allow_downgrade:
        raise RollbackError(f"{why}: refusing a rollback")
    return True


# -- the install plan -----------------------------------------------------------------------


@dataclass
class _Read:
    """One distinct content: where to read it on the medium and the staged names that receive it."""

    source: FileEntry
    dests: list[str] = field(default_factory=list)
    live: Path | None = None  # bytes the registry already holds (hard-link instead of reading)


@dataclass
class _Plan:
    leaves: list[str] = field(default_factory=list)
    reads: dict[str, _Read] = field(default_factory=dict)
    hash_only: list[FileEntry] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    wheels: list[dict[str, Any]] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    shared_bytes: int = 0


def wheel_filename(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    check_relpath(name)
    if name.startswith("."):
        raise IntegrityError(f"wheel file name {name!r} starts with a dot", path=path)
    return name


def requirements_text(bundle: str, sequence: int, wheels: list[tuple[str, str, str]]) -> str:
    """Hash-pinned requirements for ``pip install --no-index --require-hashes``: one line per name==version."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, version, sha in wheels:
        if not _WHEEL_NAME.match(name) or not _WHEEL_VERSION.match(version):
            raise MalformedManifestError(f"manifest: wheel {name!r} {version!r} is not a valid name and version")
        key = (re.sub(r"[-_.]+", "-", name).lower(), version)
        groups.setdefault(key, [])
        if sha not in groups[key]:
            groups[key].append(sha)
    lines = [
        f"# Hash-pinned requirements of bundle {bundle} (sequence {sequence}), written by airpack.",
        "# pip install --no-index --find-links REGISTRY/wheels --require-hashes -r REGISTRY/wheels/" + requirements_name(bundle),
    ]
    for (name, version), shas in sorted(groups.items()):
        hashes = " \\\n".join(f"    --hash=sha256:{s}" for s in sorted(shas))
        lines.append(f"{name}=={version} \\\n{hashes}")
    return "\n".join(lines) + "\n"


def _plan(w: Writer, txn: Txn, vb: VerifiedBundle) -> _Plan:
    """Which bytes to read, which blobs to share, which links to make; links are staged here."""
    m = vb.manifest
    reg = w.reg
    plan = _Plan()
    first_of: dict[str, FileEntry] = {}
    for f in m.files:
        first_of.setdefault(f.sha256, f)
    covered: set[str] = set()

    def need(sha: str, rel: str) -> None:
        r = plan.reads.get(sha)
        if r is None:
            r = plan.reads[sha] = _Read(source=first_of[sha])
        r.dests.append(rel)
        plan.leaves.append(rel)

    for model in m.models:
        folder = repo_folder(model.repo_id)
        base = f"{HUB_DIR}/{folder}"
        ref = ref_name(model.revision)
        files = [(f.path[len(model.prefix) + 1:], f) for f in m.model_files(model)]
        blob_shas = {f.sha256 for _, f in files}
        for sha in sorted(blob_shas):
            covered.add(sha)
            if w.repo_has_blob(model.repo_id, sha):
                plan.shared_bytes += first_of[sha].size
                continue
            need(sha, f"{base}/blobs/{sha}")
        snap = f"{base}/snapshots/{model.commit}"
        snap_exists = reg.lstat(snap) is not None
        if snap_exists:
            reg.safe_dir(snap, create=False)
        for rel, f in files:
            link_rel = f"{snap}/{rel}"
            target = link_target(rel, f.sha256)
            if snap_exists:
                st = reg.lstat(link_rel) if reg.safe_dir(link_rel.rsplit("/", 1)[0], create=False) is not None else None
                if st is not None:
                    if os.path.islink(reg.path(link_rel)) and os.readlink(reg.path(link_rel)) == target:
                        continue
                    raise ConflictError(
                        f"registry path {link_rel} exists and is not the link to {f.sha256[:12]} this bundle needs", path=link_rel
                    )
            try:
                os.symlink(target, txn.staged(link_rel))
            except OSError as e:
                raise oserror_to_airpack(e, "cannot stage", link_rel) from None
            plan.leaves.append(link_rel)
        plan.refs[f"{base}/refs/{ref}"] = model.commit
        plan.models.append({
            "repo_id": model.repo_id, "ref": ref, "commit": model.commit, "revision": model.revision, "source": model.source,
            "license": model.license, "files": [(rel, f.sha256, f.size) for rel, f in files],
            "snapshot": str(reg.path(snap)), "bytes": sum(f.size for _, f in files),
        })

    seen_wheels: dict[str, str] = {}
    req = requirements_name(m.name)
    for wh in m.wheels:
        fn = wheel_filename(wh.path)
        if fn == req or fn in seen_wheels:
            raise ConflictError(f"bundle {m.name} carries two wheel files named {fn}", path=wh.path)
        seen_wheels[fn] = wh.sha256
        entry = m.file(wh.path)
        assert entry is not None
        plan.wheels.append({"filename": fn, "name": wh.name, "version": wh.version, "sha256": wh.sha256, "size": entry.size})
        covered.add(wh.sha256)
        live_rel = f"{WHEELS_DIR}/{fn}"
        have = w.wheel_sha(fn)
        if have == wh.sha256 and reg.check_plain_file(live_rel):
            plan.shared_bytes += entry.size
            continue
        if have is not None or reg.check_plain_file(live_rel):
            raise ConflictError(f"registry file {live_rel} already holds other content than bundle {m.name}'s wheel", path=live_rel)
        need(wh.sha256, live_rel)
    if m.wheels:
        plan.texts[f"{WHEELS_DIR}/{req}"] = requirements_text(m.name, m.sequence, [(x.name, x.version, x.sha256) for x in m.wheels])

    # Bytes the registry already holds are linked, not read; bytes nobody keeps are still hashed.
    for sha, r in plan.reads.items():
        r.live = w.live_blob(sha)
        if r.live is not None:
            plan.shared_bytes += r.source.size
    plan.hash_only = [f for sha, f in first_of.items() if sha not in covered]
    return plan


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def stage_files(txn: Txn, vb: VerifiedBundle, plan: _Plan, *, workers: int | None, progress: Progress, adopt: bool = False) -> int:
    """Copy each distinct content once into staging while hashing it; check every digest; return bytes copied."""
    root = BundleDir(vb.root)
    to_copy = [r for r in plan.reads.values() if r.live is None]
    copy_bytes = sum(r.source.size for r in to_copy)
    # A tar, parts or OCI install first spools the files into a private folder of this registry
    # (hashed as they were written); with ``adopt`` those files are moved into staging, not copied again.
    adopt = adopt and vb.root.resolve().is_relative_to(txn.reg.root.resolve())
    free = _free_bytes(txn.stage)
    if (0 if adopt else copy_bytes) + SPACE_MARGIN > free:
        raise DiskSpaceError(
            f"registry {txn.reg.root} has {free:,} bytes free; installing {vb.manifest.name} needs {copy_bytes + SPACE_MARGIN:,}",
            path=str(txn.reg.root), hint="Free space on the registry's filesystem, or remove models you no longer need.",
        )
    total = copy_bytes + sum(f.size for f in plan.hash_only)
    task = progress.task(f"install {vb.manifest.name}", total)

    def adopt_one(r: _Read) -> tuple[str, FileDigest]:
        f = r.source
        src = root.path_of(f.path)
        sfd = open_regular_nofollow(src, display=f.path)
        try:
            try:
                os.rename(src, txn.staged(r.dests[0]))  # the spool is ours and goes away after the install
                os.fchmod(sfd, FILE_MODE)
                d = hash_fd(sfd, on_bytes=task.advance, limit=f.size)  # the installed inode is what is hashed
                os.fsync(sfd)
            except OSError as e:
                raise oserror_to_airpack(e, "cannot stage", f"{txn.staged(r.dests[0])} (adopting {f.path})") from None
        finally:
            os.close(sfd)
        crash_point("copy")
        return f.path, d

    def copy(r: _Read) -> tuple[str, FileDigest]:
        if adopt:
            return adopt_one(r)
        f = r.source
        dst = txn.staged(r.dests[0])
        sfd = open_regular_nofollow(root.path_of(f.path), display=f.path)
        if hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(sfd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # read ahead further on the medium
        try:
            try:
                dfd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
            except OSError as e:
                raise oserror_to_airpack(e, "cannot write", str(dst)) from None
            try:
                d = copy_then_hash(sfd, dfd, limit=f.size, on_bytes=_Writeback(dfd, task.advance))
                os.fchmod(dfd, FILE_MODE)
                os.fsync(dfd)
            except OSError as e:
                raise oserror_to_airpack(e, "cannot write", f"{dst} (copying {f.path})") from None
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        crash_point("copy")
        return f.path, d

    def check_only(f: FileEntry) -> tuple[str, FileDigest]:
        return f.path, hash_file(root.path_of(f.path), on_bytes=task.advance, display=f.path)

    jobs: list[Callable[[], tuple[str, FileDigest]]] = [lambda r=r: copy(r) for r in to_copy]  # type: ignore[misc]
    jobs += [lambda f=f: check_only(f) for f in plan.hash_only]  # type: ignore[misc]
    try:
        results = dict(parallel_map(lambda job: job(), jobs, workers=workers))
    finally:
        task.close()

    changed = []
    for f in [r.source for r in to_copy] + plan.hash_only:
        d = results[f.path]
        if d.size != f.size:
            changed.append(FileMismatch(path=f.path, reason="size changed after verify", expected_size=f.size, actual_size=d.size))
        elif d.sha256 != f.sha256:
            changed.append(FileMismatch(path=f.path, reason="digest differs (changed on the medium after verify?)",
                                        expected_size=f.size, actual_size=d.size, expected_sha256=f.sha256, actual_sha256=d.sha256))
    if changed:
        raise BundleMismatchError(MismatchReport(changed=tuple(sorted(changed, key=lambda c: c.path))))

    # The installed bytes are the signed bytes; check their safetensors headers on the copy too.
    for r in to_copy:
        f = r.source
        if content.is_safetensors(f.path) and read_header(txn.staged(r.dests[0]), display=f.path) != vb.safetensors.get(f.path):
            raise IntegrityError(f"safetensors header of {f.path} changed between verify and copy", path=f.path)

    # Same bytes under more names: hard links (one copy on disk).
    for r in plan.reads.values():
        src = r.live if r.live is not None else txn.staged(r.dests[0])
        for rel in r.dests if r.live is not None else r.dests[1:]:
            dst = txn.staged(rel)
            try:
                os.link(src, dst, follow_symlinks=False)
            except OSError:
                _copy_local(src, dst, r.source)
    return copy_bytes


COPY_STEP = 8 << 20
# Errors that mean "this kernel or filesystem pair cannot copy in the kernel": use the next way down.
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def copy_then_hash(src: int, dst: int, *, limit: int, on_bytes: Callable[[int], None] | None = None) -> FileDigest:
    """Copy ``src`` to ``dst`` chunk by chunk, hashing each chunk as read back from ``dst``: the copy is what is hashed.

    The kernel copies (``copy_file_range``, else ``sendfile``; plain reads and
    writes where neither works), so each byte of the medium is read once and
    never crosses into Python; the chunk just written is then read back from
    the page cache and hashed. A medium that serves other bytes than at verify
    time gives another digest. Stops past ``limit`` bytes, so a file that grew
    is seen without copying all of it. ``dst`` must be open for reading too.
    """
    h = hashlib.sha256()
    buf = bytearray(COPY_STEP)
    view = memoryview(buf)
    way = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"
    off = 0
    while off <= limit:
        want = min(COPY_STEP, limit + 1 - off)
        if way == "copy_file_range":
            try:
                n = os.copy_file_range(src, dst, want)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                way = "sendfile"
                continue
        elif way == "sendfile":
            try:
                n = os.sendfile(dst, src, None, want)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                way = "read"
                continue
        else:
            n = os.readv(src, [view[:want]])
            done = 0
            while done < n:
                done += os.write(dst, view[done:n])
        if n == 0:
            break
        if way != "read":
            got = 0
            while got < n:
                r = os.preadv(dst, [view[got:n]], off + got)
                if r == 0:
                    raise OSError(errno.EIO, "the staged copy is shorter than what was written")
                got += r
        h.update(view[:n])
        off += n
        if on_bytes is not None:
            on_bytes(n)
    return FileDigest(size=off, sha256=h.hexdigest())


class _Writeback:
    """Start the disk writing a staged file while it is still being copied and hashed.

    Without this the kernel holds the whole copy as dirty pages until the
    fsync, and the disk then writes it while nothing else happens; asking for
    writeback every few MiB (``POSIX_FADV_DONTNEED`` starts it without
    waiting) overlaps the disk with the hashing, so the final fsync finds
    little left to do.
    """

    STEP = 32 << 20

    def __init__(self, fd: int, advance: Callable[[int], None]) -> None:
        self.fd = fd
        self.advance = advance
        self.done = 0
        self.kicked = 0

    def __call__(self, n: int) -> None:
        self.advance(n)
        self.done += n
        if self.done - self.kicked >= self.STEP and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, self.kicked, self.done - self.kicked, os.POSIX_FADV_DONTNEED)
            self.kicked = self.done


def _copy_local(src: Path, dst: Path, f: FileEntry) -> None:
    """Fallback where a hard link is refused: copy the registry's own bytes, checking the digest."""
    try:
        sfd = open_regular_nofollow(src) if not os.path.samefile(src.parent, dst.parent) else os.open(src, os.O_RDONLY)
        try:
            dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
            try:
                d = copy_and_hash(sfd, dfd, limit=f.size)
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot write", str(dst)) from None
    if d.sha256 != f.sha256:
        raise IntegrityError(f"registry blob {src} does not hold the bytes its name says", path=str(src))


# -- recording -------------------------------------------------------------------------------


def _record_install(conn: sqlite3.Connection, txn: Txn, vb: VerifiedBundle, plan: _Plan, *, source: str, downgrade: bool,
                    fit: list[dict[str, Any]] | None) -> None:
    m = vb.manifest
    signers = [{"name": k.name, "keyid": k.keyid} for k in vb.signers]
    cur = conn.execute(
        """INSERT INTO bundles(txn, name, channel, sequence, manifest_sha256, created, expires, signers, source,
                               installed_at, installed_by, downgrade, fit, state)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'active')""",
        (txn.id, m.name, m.channel, m.sequence, m.digest, f"{m.created:%Y-%m-%dT%H:%M:%SZ}",
         f"{m.expires:%Y-%m-%dT%H:%M:%SZ}" if m.expires else None, json.dumps(signers), source, now_text(),
         str(txn.audit.get("user")), int(downgrade), json.dumps(fit, default=str) if fit is not None else None),
    )
    bid = cur.lastrowid
    for x in plan.models:
        mid = conn.execute(
            "INSERT INTO models(bundle_id, repo_id, ref, commit_sha, revision, source, license) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (bid, x["repo_id"], x["ref"], x["commit"], x["revision"], x["source"], x["license"]),
        ).lastrowid
        conn.executemany("INSERT INTO files(model_id, path, sha256, size) VALUES (?, ?, ?, ?)",
                         [(mid, rel, sha, size) for rel, sha, size in x["files"]])
        _set_ref(conn, x["repo_id"], x["ref"], x["commit"], mid)
    conn.executemany(
        "INSERT INTO wheels(bundle_id, filename, name, version, sha256, size) VALUES (?, ?, ?, ?, ?, ?)",
        [(bid, x["filename"], x["name"], x["version"], x["sha256"], x["size"]) for x in plan.wheels],
    )
    if not downgrade:
        conn.execute(
            """INSERT INTO channels(channel, sequence, manifest_sha256, bundle) VALUES (?, ?, ?, ?)
               ON CONFLICT(channel) DO UPDATE SET sequence = excluded.sequence, manifest_sha256 = excluded.manifest_sha256,
               bundle = excluded.bundle WHERE excluded.sequence >= channels.sequence""",
            (m.channel, m.sequence, m.digest, m.name),
        )


def _set_ref(conn: sqlite3.Connection, repo_id: str, ref: str, commit: str, model_id: int | None) -> None:
    conn.execute(
        """INSERT INTO refs(repo_id, ref, commit_sha, model_id) VALUES (?, ?, ?, ?)
           ON CONFLICT(repo_id, ref) DO UPDATE SET commit_sha = excluded.commit_sha, model_id = excluded.model_id""",
        (repo_id, ref, commit, model_id),
    )


def _switch_refs(txn: Txn, attempt: _Attempt, moves: list[tuple[str, str, str, int]], *, result: str) -> None:
    """Point refs at commits already installed ((repo_id, ref, commit, model_id) each): files first, then the row."""
    txn.refs = {f"{HUB_DIR}/{repo_folder(repo)}/refs/{ref}": commit for repo, ref, commit, _ in moves}
    txn.result = result
    txn.prepare()

    def rec(conn: sqlite3.Connection) -> None:
        for repo, ref, commit, model_id in moves:
            _set_ref(conn, repo, ref, commit, model_id)

    txn.commit(rec)
    attempt.logged = True


def _run(txn: Txn, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a txn's steps; before its commit any failure takes back what reached the live tree."""
    try:
        return body()
    except BaseException:
        if not txn.committed:
            txn.abort()
        raise


@dataclass
class _Attempt:
    """The audit record of one command, and whether its line has been written (exactly one per attempt)."""

    record: dict[str, Any]
    logged: bool = False


def _refused(reg: Registry, attempt: _Attempt, e: BaseException) -> None:
    """Log a refusal; if even that fails, say so in the original error rather than hide it."""
    if attempt.logged:
        return
    attempt.logged = True
    try:
        reg.audit_append({**attempt.record, "result": "refused" if isinstance(e, AirpackError) else "failed", "error": error_record(e)})
    except AirpackError as log_err:
        if isinstance(e, AirpackError):
            e.message = f"{e.message} (and the audit line could not be written: {log_err.message})"


def _logged_run(reg: Registry, attempt: _Attempt, body: Callable[[Writer], Any]) -> Any:
    """Run ``body`` with the writer; any refusal (the lock held included) leaves one audit line."""
    try:
        with reg.writer() as w:
            return body(w)
    except BaseException as e:
        _refused(reg, attempt, e)
        raise


# -- install -----------------------------------------------------------------------------------


def install(opts: InstallOptions) -> InstallResult:
    """Verify, check fit and rollback, then install all or nothing; every attempt leaves one audit line."""
    reg = Registry.open(opts.registry, create=True)
    options = {"allow_downgrade": opts.allow_downgrade, "allow_pickle": opts.allow_pickle, "ignore_fit": opts.ignore_fit,
               "gpu": opts.gpu, "context": opts.context, "runtime": opts.runtime}
    attempt = _Attempt(audit_base("install", source=str(opts.bundle), options=options))
    spool = f"{STAGING_DIR}/spool-{secrets.token_hex(8)}"  # a tar or parts is verified into it; recovery drops a stale one
    try:
        result: InstallResult = _logged_run(reg, attempt, lambda w: _install(w, attempt, opts, spool=spool))
    finally:
        shutil.rmtree(reg.path(spool), ignore_errors=True)
    return result


def _install(w: Writer, attempt: _Attempt, opts: InstallOptions, *, spool: str | None = None) -> InstallResult:
    audit = attempt.record
    w.reg.safe_dir(STAGING_DIR, create=True)
    vb = verify_for_install(opts.bundle, opts.policy, now=opts.now, spool=w.reg.path(spool) if spool else None,
                            progress=opts.progress)
    m = vb.manifest
    signers = tuple({"name": k.name, "keyid": k.keyid} for k in vb.signers)
    audit.update({
        "bundle": {"name": m.name, "channel": m.channel, "sequence": m.sequence},
        "manifest_sha256": m.digest,
        "signers": [s["keyid"] for s in signers],
        "signer_names": [s["name"] for s in signers],
    })
    # The VRAM fit check: FitError unless --ignore-fit; [] when no GPU is given or detected.
    fit = check_bundle_fit(vb, gpu=opts.gpu, context=opts.context, runtime=opts.runtime, ignore=opts.ignore_fit)
    audit["fit"] = fit
    check_pickles(m, opts.allow_pickle)
    downgrade = check_sequence(w, m, allow_downgrade=opts.allow_downgrade)
    audit["downgrade"] = downgrade
    crash_point("verified")

    def result(kind: str, *, models: list[dict[str, Any]], copied: int = 0, shared: int = 0, txn: str | None = None) -> InstallResult:
        req = w.reg.path(f"{WHEELS_DIR}/{requirements_name(m.name)}") if m.wheels else None
        return InstallResult(
            result=kind, registry=w.reg.root, manifest=m, signers=signers,
            models=tuple({k: v for k, v in x.items() if k != "files"} | {"files": len(x["files"])} for x in models),
            wheels=tuple(wheel_filename(x.path) for x in m.wheels), requirements=req, fit=fit, bytes_copied=copied,
            bytes_shared=shared, downgrade=downgrade, txn=txn,
        )

    same = w.conn.execute(
        "SELECT id FROM bundles WHERE manifest_sha256 = ? AND state = 'active' ORDER BY id DESC LIMIT 1", (m.digest,)
    ).fetchone()
    if same is not None:
        return _reinstall(w, attempt, int(same[0]), result)

    txn = w.begin("install", audit)

    def body() -> dict[str, Any]:
        plan = _plan(w, txn, vb)
        spooled = spool is not None and vb.root == w.reg.path(spool)
        copied = stage_files(txn, vb, plan, workers=opts.workers, progress=opts.progress, adopt=opts.adopt_staged or spooled)
        crash_point("staged")
        txn.plan_creates(plan.leaves)
        txn.refs = dict(plan.refs)
        txn.texts = dict(plan.texts)
        txn.result = "installed"
        txn.prepare()
        txn.apply()
        txn.commit(lambda conn: _record_install(conn, txn, vb, plan, source=str(opts.bundle), downgrade=downgrade, fit=fit))
        attempt.logged = True
        txn.finish({"models": [{"repo_id": x["repo_id"], "revision": x["ref"], "commit": x["commit"]} for x in plan.models],
                    "bytes_copied": copied, "bytes_shared": plan.shared_bytes})
        return {"plan": plan, "copied": copied}

    out = _run(txn, body)
    plan = out["plan"]
    return result("installed", models=plan.models, copied=out["copied"], shared=plan.shared_bytes, txn=txn.id)


def _reinstall(w: Writer, attempt: _Attempt, bundle_id: int, result: Callable[..., InstallResult]) -> InstallResult:
    """The same bundle again: a no-op, or (after a rollback) pointing its refs back at it."""
    rows = w.conn.execute(
        """SELECT m.id, m.repo_id, m.ref, m.commit_sha, m.revision, m.source, m.license, r.commit_sha AS current
           FROM models m LEFT JOIN refs r ON r.repo_id = m.repo_id AND r.ref = m.ref WHERE m.bundle_id = ?""",
        (bundle_id,),
    ).fetchall()
    models = [{"repo_id": r["repo_id"], "ref": r["ref"], "commit": r["commit_sha"], "revision": r["revision"],
               "source": r["source"], "license": r["license"], "files": w.reg.model_files(w.conn, r["id"]),
               "snapshot": str(w.reg.path(f"{HUB_DIR}/{repo_folder(r['repo_id'])}/snapshots/{r['commit_sha']}"))} for r in rows]
    stale = [r for r in rows if r["current"] != r["commit_sha"]]
    if not stale:
        attempt.logged = True
        w.audit({**attempt.record, "result": "noop", "note": "this bundle is already installed; nothing changed"})
        return result("noop", models=models)
    txn = w.begin("reactivate", attempt.record)

    def body() -> dict[str, Any]:
        _switch_refs(txn, attempt, [(r["repo_id"], r["ref"], r["commit_sha"], r["id"]) for r in stale], result="reactivated")
        txn.finish({"models": [{"repo_id": r["repo_id"], "revision": r["ref"], "commit": r["commit_sha"]} for r in stale]})
        return {}

    _run(txn, body)
    return result("reactivated", models=models, txn=txn.id)


# -- remove and rollback ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RemoveOptions:
    registry: Path
    name: str
    revision: str | None = None


@dataclass(frozen=True, kw_only=True)
class RollbackOptions:
    registry: Path
    name: str


def _match_revision(x: InstalledModel, revision: str) -> bool:
    return revision in (x.commit, x.ref) or (len(revision) >= 7 and x.commit.startswith(revision))


def _resolve(reg: Registry, conn: sqlite3.Connection, name: str, revision: str | None) -> tuple[list[InstalledModel], list[int]]:
    """Model rows NAME means (a repo id, else a bundle name) and, for a bundle name, the bundles themselves."""
    rows = reg.models(conn, repo_id=name)
    if rows:
        if revision is not None:
            rows = [x for x in rows if _match_revision(x, revision)]
            if not rows:
                raise NotInstalledError(f"{name} is installed, but not at revision {revision}", path=name)
        return rows, []
    if revision is None:
        bids = [int(r[0]) for r in conn.execute("SELECT id FROM bundles WHERE name = ? AND state = 'active' ORDER BY id", (name,))]
        if bids:
            return [x for x in reg.models(conn) if x.bundle_id in bids], bids
    raise NotInstalledError(f"{name} is not installed (no model repo id or bundle of that name)", path=name)


def remove(opts: RemoveOptions) -> dict[str, Any]:
    """Remove a model (all revisions, or one) or a whole bundle; bytes still used elsewhere stay."""
    reg = Registry.open(opts.registry)
    attempt = _Attempt(audit_base("remove", target=opts.name, revision=opts.revision))

    def body(w: Writer) -> dict[str, Any]:
        rows, bundle_ids = _resolve(reg, w.conn, opts.name, opts.revision)
        txn = w.begin("remove", attempt.record)
        return _run(txn, lambda: _remove(w, txn, attempt, rows, bundle_ids))

    out: dict[str, Any] = _logged_run(reg, attempt, body)
    return out


def _remove(w: Writer, txn: Txn, attempt: _Attempt, rows: list[InstalledModel], bundle_ids: list[int]) -> dict[str, Any]:
    conn = w.conn
    reg = w.reg
    removed = {x.model_id for x in rows}
    ref_updates: list[tuple[str, str, str | None, int | None]] = []
    freed: set[str] = set()
    kept = 0
    for repo in sorted({x.repo_id for x in rows}):
        base = f"{HUB_DIR}/{repo_folder(repo)}"
        all_rows = reg.models(conn, repo_id=repo)
        remain = [x for x in all_rows if x.model_id not in removed]
        gone = [x for x in all_rows if x.model_id in removed]

        def files_of(xs: list[InstalledModel]) -> dict[tuple[str, str], str]:
            out: dict[tuple[str, str], str] = {}
            for x in xs:
                for f in reg.model_files(conn, x.model_id):
                    out[(x.commit, f["path"])] = f["sha256"]
            return out

        gone_files = files_of(gone)
        refs = conn.execute("SELECT ref, commit_sha FROM refs WHERE repo_id = ?", (repo,)).fetchall()
        if not remain:
            txn.deletes.append(base)
            freed.update(gone_files.values())
            ref_updates += [(repo, r["ref"], None, None) for r in refs]
            continue
        remain_files = files_of(remain)
        remain_commits = {x.commit for x in remain}
        remain_shas = set(remain_files.values())
        for commit in sorted({x.commit for x in gone} - remain_commits):
            txn.deletes.append(f"{base}/snapshots/{commit}")
        for (commit, path), _sha in sorted(gone_files.items()):
            if commit in remain_commits and (commit, path) not in remain_files:
                txn.deletes.append(f"{base}/snapshots/{commit}/{path}")
                parts = path.split("/")[:-1]
                txn.prune += [f"{base}/snapshots/{commit}/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for sha in sorted(set(gone_files.values())):
            if sha in remain_shas:
                kept += 1
            else:
                txn.deletes.append(f"{base}/blobs/{sha}")
                freed.add(sha)
        for r in refs:
            holders = [x for x in remain if x.ref == r["ref"] and x.commit == r["commit_sha"]]
            if holders:
                ref_updates.append((repo, r["ref"], r["commit_sha"], max(x.model_id for x in holders)))
                continue
            same_ref = [x for x in remain if x.ref == r["ref"]]
            if same_ref:
                nxt = max(same_ref, key=lambda x: x.model_id)
                ref_updates.append((repo, r["ref"], nxt.commit, nxt.model_id))
                txn.refs[f"{base}/refs/{r['ref']}"] = nxt.commit
            else:
                ref_updates.append((repo, r["ref"], None, None))
                txn.refs[f"{base}/refs/{r['ref']}"] = None  # type: ignore[assignment]

    # Wheels go with their bundle (removed by bundle name); files another bundle uses stay.
    wheel_rows = conn.execute(
        f"SELECT bundle_id, filename, sha256 FROM wheels WHERE bundle_id IN ({','.join('?' * len(bundle_ids))})", bundle_ids
    ).fetchall() if bundle_ids else []
    for wr in wheel_rows:
        others = conn.execute(
            f"""SELECT 1 FROM wheels w JOIN bundles b ON b.id = w.bundle_id
                WHERE w.filename = ? AND b.state = 'active' AND w.bundle_id NOT IN ({','.join('?' * len(bundle_ids))}) LIMIT 1""",
            (wr["filename"], *bundle_ids),
        ).fetchone()
        if others is None:
            txn.deletes.append(f"{WHEELS_DIR}/{wr['filename']}")
    for name in sorted({str(r[0]) for r in conn.execute(
            f"SELECT name FROM bundles WHERE id IN ({','.join('?' * len(bundle_ids))})", bundle_ids)} if bundle_ids else set()):
        other = conn.execute(
            f"""SELECT b.id, b.sequence FROM bundles b WHERE b.name = ? AND b.state = 'active'
                AND b.id NOT IN ({','.join('?' * len(bundle_ids))}) AND EXISTS (SELECT 1 FROM wheels w WHERE w.bundle_id = b.id)
                ORDER BY b.id DESC LIMIT 1""",
            (name, *bundle_ids),
        ).fetchone()
        rel = f"{WHEELS_DIR}/{requirements_name(name)}"
        if other is None:
            txn.texts[rel] = None  # type: ignore[assignment]
        else:
            ws = conn.execute("SELECT name, version, sha256 FROM wheels WHERE bundle_id = ?", (other["id"],)).fetchall()
            txn.texts[rel] = requirements_text(name, int(other["sequence"]), [(r[0], r[1], r[2]) for r in ws])

    freed_bytes = 0
    for sha in freed:
        row = conn.execute("SELECT size FROM files WHERE sha256 = ? LIMIT 1", (sha,)).fetchone()
        freed_bytes += int(row[0]) if row else 0
    txn.result = "removed"
    txn.prepare()
    affected_bundles = sorted({x.bundle_id for x in rows} | set(bundle_ids))

    def rec(conn: sqlite3.Connection) -> None:
        if removed:
            conn.execute(f"DELETE FROM models WHERE id IN ({','.join('?' * len(removed))})", sorted(removed))
        if bundle_ids:
            conn.execute(f"DELETE FROM wheels WHERE bundle_id IN ({','.join('?' * len(bundle_ids))})", bundle_ids)
        for repo, ref, commit, mid in ref_updates:
            if commit is None:
                conn.execute("DELETE FROM refs WHERE repo_id = ? AND ref = ?", (repo, ref))
            else:
                _set_ref(conn, repo, ref, commit, mid)
        for bid in affected_bundles:
            conn.execute(
                """UPDATE bundles SET state = 'removed', removed_at = ? WHERE id = ?
                   AND NOT EXISTS (SELECT 1 FROM models WHERE bundle_id = ?) AND NOT EXISTS (SELECT 1 FROM wheels WHERE bundle_id = ?)""",
                (now_text(), bid, bid, bid),
            )

    txn.commit(rec)
    out = {
        "removed": [{"repo_id": x.repo_id, "revision": x.ref, "commit": x.commit, "bundle": x.bundle, "sequence": x.sequence} for x in rows],
        "bundles_removed": bundle_ids,
        "blobs_removed": len(freed),
        "blobs_kept_shared": kept,
        "bytes_freed": freed_bytes,
    }
    attempt.logged = True
    txn.finish(out)
    return {**out, "registry": str(w.reg.root), "txn": txn.id}


def rollback(opts: RollbackOptions) -> dict[str, Any]:
    """Point NAME's refs back at the revision installed before the current one (it must still be installed)."""
    reg = Registry.open(opts.registry)
    attempt = _Attempt(audit_base("rollback", target=opts.name))

    def body(w: Writer) -> dict[str, Any]:
        rows, _ = _resolve(reg, w.conn, opts.name, None)
        changes = []
        for repo in sorted({x.repo_id for x in rows}):
            all_rows = reg.models(w.conn, repo_id=repo)
            for r in w.conn.execute("SELECT ref, commit_sha FROM refs WHERE repo_id = ? ORDER BY ref", (repo,)).fetchall():
                ref, cur = r["ref"], r["commit_sha"]
                at = [x.model_id for x in all_rows if x.ref == ref and x.commit == cur]
                pivot = max(at) if at else 1 << 62
                earlier = [x for x in all_rows if x.ref == ref and x.commit != cur and x.model_id < pivot]
                if earlier:
                    prev = max(earlier, key=lambda x: x.model_id)
                    changes.append({"repo_id": repo, "revision": ref, "from": cur, "to": prev.commit, "model_id": prev.model_id,
                                    "bundle": prev.bundle, "sequence": prev.sequence})
        if not changes:
            raise NotInstalledError(f"{opts.name}: no earlier installed revision to roll back to", path=opts.name,
                                    hint="`airpack list` shows the installed revisions; rollback goes back only to one still installed.")
        txn = w.begin("rollback", attempt.record)

        def steps() -> dict[str, Any]:
            _switch_refs(txn, attempt, [(c["repo_id"], c["revision"], c["to"], c["model_id"]) for c in changes], result="rolled back")
            public = [{k: v for k, v in c.items() if k != "model_id"} for c in changes]
            txn.finish({"changes": public})
            return {"changes": public, "registry": str(reg.root), "txn": txn.id}

        return _run(txn, steps)

    out: dict[str, Any] = _logged_run(reg, attempt, body)
    return out


# -- reading the registry ------------------------------------------------------------------------------


def list_installed(registry: Path) -> list[InstalledModel]:
    reg = Registry.open(registry)
    with reg.reader() as conn:
        return reg.models(conn)


def load_instructions(root: Path, repo_id: str, revision: str, requirements: Path | None) -> dict[str, Any]:
    """The exact environment and lines that load an installed model with no network."""
    import shlex

    hub = str(root / HUB_DIR)
    q = json.dumps
    env = {"HF_HUB_CACHE": hub, "HF_HUB_OFFLINE": "1"}
    shell = f"export HF_HUB_CACHE={shlex.quote(hub)} HF_HUB_OFFLINE=1"
    python = [
        "import os",
        f"os.environ[\"HF_HUB_CACHE\"] = {q(hub)}",
        "os.environ[\"HF_HUB_OFFLINE\"] = \"1\"  # set both before huggingface_hub or transformers is imported",
        "from huggingface_hub import snapshot_download",
        f"path = snapshot_download({q(repo_id)}, revision={q(revision)})",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"tokenizer = AutoTokenizer.from_pretrained({q(repo_id)}, revision={q(revision)}, local_files_only=True)",
        f"model = AutoModelForCausalLM.from_pretrained({q(repo_id)}, revision={q(revision)}, local_files_only=True)",
    ]
    vllm = f"HF_HUB_CACHE={shlex.quote(hub)} HF_HUB_OFFLINE=1 vllm serve {shlex.quote(repo_id)} --revision {shlex.quote(revision)}"
    pip = None
    if requirements is not None:
        pip = (f"pip install --no-index --find-links {shlex.quote(str(root / WHEELS_DIR))} --require-hashes "
               f"-r {shlex.quote(str(requirements))}")
    return {"env": env, "shell": shell, "python": python, "vllm": vllm, "pip": pip}


def show(registry: Path, name: str, *, revision: str | None = None) -> dict[str, Any]:
    """One installed model (NAME: repo id, or a bundle name with one model) and how to load it offline."""
    reg = Registry.open(registry)
    with reg.reader() as conn:
        rows, bids = _resolve(reg, conn, name, revision)
        if bids:
            repos = sorted({x.repo_id for x in rows})
            if len(repos) != 1:
                raise UsageError(f"bundle {name} holds {len(repos)} models ({', '.join(repos) or 'none'}); name one by repo id", path=name)
        if revision is None:
            cur = [x for x in rows if x.current]
            x = max(cur or rows, key=lambda r: r.model_id)
        else:
            x = max(rows, key=lambda r: r.model_id)
        files = reg.model_files(conn, x.model_id)
        others = reg.models(conn, repo_id=x.repo_id)
        req_rel = f"{WHEELS_DIR}/{requirements_name(x.bundle)}"
        req = reg.path(req_rel) if x.has_wheels and reg.check_plain_file(req_rel) else None
    rev_arg = x.ref if x.current else x.commit
    return {
        **x.to_json(),
        "registry": str(reg.root),
        "snapshot": str(reg.path(f"{HUB_DIR}/{repo_folder(x.repo_id)}/snapshots/{x.commit}")),
        "files_list": files,
        "revisions": [{"revision": o.ref, "commit": o.commit, "current": o.current, "bundle": o.bundle, "sequence": o.sequence,
                       "installed_at": o.installed_at} for o in others],
        "load": load_instructions(reg.root, x.repo_id, rev_arg, req),
    }


def verify_log(registry: Path) -> LogReport:
    reg = Registry.open(registry)
    return reg.verify_log()


__all__ = [
    "InstallOptions", "InstallResult", "RemoveOptions", "RollbackOptions", "install", "list_installed", "load_instructions",
    "remove", "rollback", "show", "verify_for_install", "verify_log",
]
