"""``airpack install``: verify a bundle, check fit and rollback, then install it all or nothing.

Install reads each byte of the medium once. It checks the envelope, the
manifest, every path and size and every safetensors header up front
(``verify_payload`` and the tree checks of ``ops.verify``), runs the fit
check, and then copies each file into staging on the registry's filesystem
while hashing it: the kernel copies a chunk, and the chunk is hashed as read
back from the copy (``hashing.copy_then_hash``). The copy is what was hashed, so a medium that changes
bytes after those checks is caught, and nothing is installed. Files the bundle carries but the registry does not keep (an SBOM,
say) are hashed too, so every byte of the bundle is checked. Blobs the
registry already holds (same SHA-256) are reused, never read again.

What to copy and link is the plan (``ops._install_plan``); list, show, remove
and rollback are in ``ops.manage``. The registry side (staging, journal, the
commit point, recovery) is in ``airpack.registry``; see
``airpack.registry.transactions`` for why a SIGKILL between any two steps is
safe.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import content
from .._fs import oserror_to_airpack
from ..errors import DiskSpaceError, UsageError
from ..formats import SNIFF_BYTES
from ..hashing import Writeback, copy_local, write_all
from ..manifest import FileEntry, Manifest
from ..progress import NULL_PROGRESS, Progress
from ..registry import (
    FILE_MODE,
    HUB_DIR,
    KEPT_ENVELOPE,
    KEPT_MANIFEST,
    WHEELS_DIR,
    AuthorisingPolicy,
    Database,
    Registry,
    RegistryCopies,
    Txn,
    Writer,
    audit_base,
    crash_point,
    kept_bundle_dir,
    repo_folder,
    requirements_name,
)
from ..safetensors_check import SafetensorsInfo
from ..sources import BundleSource, open_source
from ..trust import TrustedKey, TrustPolicy
from ._install_plan import Plan, Read, make_plan, wheel_filename
from ._registry_ops import Attempt, abort_unless_committed, check_snapshot, logged_run, run_txn, switch_refs
from .fit import bundle_reader, estimate_bundle, keep_for_fit
from .verify import FileSink, SequenceCheck, Sink, Trusted, VerifiedBundle, verify_source

SPACE_MARGIN = 64 << 20  # keep this much free beyond the bytes to copy


# -- options and results ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class InstallOptions:
    """What to install and how. ``bundle`` is a local bundle in any form; ``source`` (an OCI artifact) stands in for it."""

    bundle: Path | None = None
    registry: Path
    policy: TrustPolicy
    gpu: str | None = None
    context: int | None = None
    runtime: str | None = None
    ignore_fit: bool = False
    fit_trace: bool = False  # check the fit with the trace of transformers' generate() (needs torch; --fit-trace)
    allow_downgrade: bool = False
    allow_pickle: bool = False
    allow_code: bool = False  # the operator's consent to code the signed policy allows (``--allow-code``)
    now: dt.datetime | None = None
    workers: int | None = None
    progress: Progress = NULL_PROGRESS
    source: BundleSource | None = None


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


# -- staging: where the pipeline writes what it verified ------------------------------------------


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class _StagedFile(FileSink):
    """One distinct content, created under the txn's staging at its final relative path, fsynced when its digest held."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
            self.where = str(path)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(path)) from None
        self._writeback = Writeback(self.fd, lambda n: None)

    def write(self, data: memoryview) -> None:
        assert self.fd is not None
        try:
            write_all(self.fd, data)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(self.path)) from None

    def wrote(self, n: int) -> None:
        self._writeback(n)

    def close(self) -> None:
        assert self.fd is not None
        try:
            os.fchmod(self.fd, FILE_MODE)
            os.fsync(self.fd)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(self.path)) from None
        finally:
            os.close(self.fd)
            self.fd = None
        crash_point("copy")

    def abort(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class _Staging(Sink):
    """Install's sink: once the manifest is trusted, decide (fit, consent, same bundle), plan, and stage each file.

    Each distinct content the registry lacks is written once, at its first
    path, straight from the medium into the txn's staging; the bytes the
    registry already holds are not read from a folder (a stream still hashes
    them as they pass); everything else is hashed and dropped.
    """

    action = "install"

    def __init__(self, w: Writer, attempt: Attempt, opts: InstallOptions, source: BundleSource) -> None:
        self.w = w
        self.attempt = attempt
        self.opts = opts
        self.source = source
        self.txn: Txn | None = None
        self.plan: Plan | None = None
        self.fit: list[dict[str, Any]] | None = None
        self._first: dict[str, Read] = {}  # path -> the read of a content the registry lacks (staged at its first path)
        self._hash_only: set[str] = set()  # paths nobody keeps (an SBOM, say): hashed, never written
        self.same: int | None = None  # this exact bundle is installed (its id): every byte is verified, nothing written
        # A delta's files expected on the host: every registry copy is hashed again before anything is staged.
        self.host = RegistryCopies(w.reg, w.conn)

    def identify(self, manifest: Manifest, signers: tuple[TrustedKey, ...]) -> None:
        m = manifest
        self.attempt.record.update({
            "bundle": {"name": m.name, "channel": m.channel, "sequence": m.sequence}, "manifest_sha256": m.digest,
            "signers": [k.keyid for k in signers], "signer_names": [k.name for k in signers], **self.source.audit_fields(),
        })
        self.attempt.record["policy"] = _authorising(self.opts.policy, signers).to_json()

    def begin(self, trusted: Trusted) -> None:
        m, opts = trusted.manifest, self.opts
        if self.source.random_access and self.source.root is not None:  # headers are known now: refuse before a byte is copied
            self.check_fit(m, trusted.headers, bundle_reader(self.source.root, trusted.host_kept))
        content.check_operator_consent(m, allow_pickle=opts.allow_pickle, allow_code=opts.allow_code)
        self.attempt.record["downgrade"] = trusted.downgrade
        crash_point("verified")
        same = self.w.conn.active_bundle_with_digest(m.digest)
        if same is not None:  # a no-op only once the medium proved whole: a flipped byte is still a refusal (exit 3)
            self.same = same.id
            return
        self.txn = self.w.begin("install", self.attempt.record)
        self.plan = make_plan(self.w, self.txn, m)
        self._first = {r.source.path: r for r in self.plan.reads.values() if r.live is None}
        self._hash_only = {f.path for f in self.plan.hash_only}
        self._check_space(m.name)

    def check_fit(self, m: Manifest, headers: Mapping[str, SafetensorsInfo], read: Callable[[str, int], bytes]) -> None:
        """The VRAM fit check: FitError unless --ignore-fit; [] when no GPU is given or detected."""
        o = self.opts
        self.fit = estimate_bundle(m, headers=headers, read=read, location=self.source.label, gpu=o.gpu, context=o.context,
                                   runtime=o.runtime, ignore=o.ignore_fit, trace=o.fit_trace)
        self.attempt.record["fit"] = self.fit

    @property
    def copy_bytes(self) -> int:
        return sum(r.source.size for r in self._first.values())

    def _check_space(self, name: str) -> None:
        assert self.txn is not None
        free = _free_bytes(self.txn.stage)
        if self.copy_bytes + SPACE_MARGIN > free:
            raise DiskSpaceError(
                f"registry {self.txn.reg.root} has {free:,} bytes free; installing {name} needs {self.copy_bytes + SPACE_MARGIN:,} "
                f"({self.copy_bytes:,} to copy plus a {SPACE_MARGIN:,}-byte ({SPACE_MARGIN >> 20} MiB) reserve kept free)",
                path=str(self.txn.reg.root), hint="Free space on the registry's filesystem, or remove models you no longer need.",
            )

    def holds(self, entry: FileEntry) -> bool:
        if self.same is not None:
            return False  # the same bundle again: read and hash every file, keep none
        return entry.path not in self._first and entry.path not in self._hash_only

    def head(self, entry: FileEntry) -> bytes | None:
        """The first bytes of the registry's own copy of a held content: what a loader will read, judged like the rest."""
        live = self.w.live_blob(entry.sha256)
        if live is None:
            return None
        try:
            fd = os.open(live, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                return os.read(fd, SNIFF_BYTES)
            finally:
                os.close(fd)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot read", str(live)) from None

    def open(self, entry: FileEntry) -> FileSink | None:
        r = self._first.get(entry.path)
        if r is None:
            return None
        assert self.txn is not None
        return _StagedFile(self.txn.staged(r.dests[0]))

    def link_copies(self) -> None:
        """Same bytes under more names: hard links (one copy on disk)."""
        assert self.txn is not None and self.plan is not None
        for r in self.plan.reads.values():
            src = r.live if r.live is not None else self.txn.staged(r.dests[0])
            for rel in r.dests if r.live is not None else r.dests[1:]:
                dst = self.txn.staged(rel)
                try:
                    os.link(src, dst, follow_symlinks=False)
                except OSError:
                    copy_local(src, dst, size=r.source.size, sha256=r.source.sha256, mode=FILE_MODE)


# -- recording -------------------------------------------------------------------------------


def _authorising(policy: TrustPolicy, signers: tuple[TrustedKey, ...]) -> AuthorisingPolicy:
    """What authorised an install, for its audit line and its row: the policy file's SHA-256, its threshold, the keys that counted."""
    return AuthorisingPolicy(sha256=policy.sha256, threshold=policy.threshold, keyids=tuple(k.keyid for k in signers))


def _record_install(conn: Database, txn: Txn, vb: VerifiedBundle, plan: Plan, *, source: str, downgrade: bool,
                    fit: list[dict[str, Any]] | None, policy_used: TrustPolicy) -> None:
    m = vb.manifest
    policy = _authorising(policy_used, vb.signers)
    bid = conn.insert_bundle(
        txn=txn.id, name=m.name, channel=m.channel, sequence=m.sequence, manifest_sha256=m.digest, created=f"{m.created:%Y-%m-%dT%H:%M:%SZ}",
        expires=f"{m.expires:%Y-%m-%dT%H:%M:%SZ}" if m.expires else None, signers=[{"name": k.name, "keyid": k.keyid} for k in vb.signers],
        source=source, installed_by=str(txn.audit.get("user")), downgrade=downgrade, fit=fit, policy=policy,
        envelope_sha256=hashlib.sha256(vb.envelope).hexdigest(),
    )
    for x in plan.models:
        mid = conn.insert_model(bid, repo_id=x["repo_id"], ref=x["ref"], commit=x["commit"], revision=x["revision"], source=x["source"],
                                license=x["license"])
        conn.insert_files(mid, x["files"])
        conn.set_ref(x["repo_id"], x["ref"], x["commit"], mid)
    conn.insert_wheels(bid, plan.wheels)
    if not downgrade:
        conn.raise_channel(m.channel, sequence=m.sequence, manifest_sha256=m.digest, bundle=m.name)


# -- install -----------------------------------------------------------------------------------


def install(opts: InstallOptions) -> InstallResult:
    """Verify, check fit and rollback, then install all or nothing; every attempt leaves one audit line."""
    reg = Registry.open(opts.registry, create=True)
    options = {"allow_downgrade": opts.allow_downgrade, "allow_pickle": opts.allow_pickle, "allow_code": opts.allow_code,
               "ignore_fit": opts.ignore_fit, "fit_trace": opts.fit_trace, "gpu": opts.gpu, "context": opts.context, "runtime": opts.runtime}
    where = opts.source.location if opts.source is not None else str(opts.bundle)
    attempt = Attempt(audit_base("install", source=where, options=options,
                                 policy={"sha256": opts.policy.sha256, "threshold": opts.policy.threshold}))
    result: InstallResult = logged_run(reg, attempt, lambda w: _install(w, attempt, opts))
    return result


def _install(w: Writer, attempt: Attempt, opts: InstallOptions) -> InstallResult:
    if opts.source is not None:
        source = opts.source
    elif opts.bundle is not None:
        source = open_source(opts.bundle, policy=opts.policy, workers=opts.workers)
    else:
        raise UsageError("install needs a bundle")
    sink = _Staging(w, attempt, opts, source)
    try:
        # A folder's fit is checked before copying (from its files); a stream's once it passed, from the small files kept.
        keep = None if source.random_access else keep_for_fit
        vb = verify_source(source, opts.policy, now=opts.now, sink=sink, keep=keep, workers=opts.workers,
                           sequence=SequenceCheck(high=w.conn.channel_high, allow_downgrade=opts.allow_downgrade),
                           progress=opts.progress)
        if sink.same is not None:
            return _reinstall(w, attempt, sink.same, lambda kind, **kw: _result(w.reg, vb, sink.fit, kind, **kw))
        return _commit(w, attempt, sink, vb)
    except BaseException:
        abort_unless_committed(sink.txn)
        raise


def _commit(w: Writer, attempt: Attempt, sink: _Staging, vb: VerifiedBundle) -> InstallResult:
    """Every byte held: check fit where only the stream could tell, link, move into place, commit, log."""
    txn, plan = sink.txn, sink.plan
    assert txn is not None and plan is not None
    if sink.fit is None:  # a tar, parts or an artifact: the headers were known only once they streamed past
        sink.check_fit(vb.manifest, vb.headers, bundle_reader(None, vb.kept))
    sink.link_copies()
    crash_point("staged")
    kept = kept_bundle_dir(vb.manifest.digest)  # the exact signed bytes, so `airpack check --trust` can re-verify them later
    txn.plan_creates([*plan.leaves, txn.stage_file(f"{kept}/{KEPT_ENVELOPE}", vb.envelope),
                      txn.stage_file(f"{kept}/{KEPT_MANIFEST}", vb.payload)])
    txn.refs = dict(plan.refs)
    txn.texts = dict(plan.texts)
    txn.result = "installed"
    txn.prepare()
    txn.apply()
    txn.commit(lambda conn: _record_install(conn, txn, vb, plan, source=sink.source.location, downgrade=vb.downgrade, fit=sink.fit,
                                              policy_used=sink.opts.policy))
    attempt.logged = True
    copied = sink.copy_bytes
    txn.finish({"models": [{"repo_id": x["repo_id"], "revision": x["ref"], "commit": x["commit"]} for x in plan.models],
                "bytes_copied": copied, "bytes_shared": plan.shared_bytes})
    return _result(w.reg, vb, sink.fit, "installed", models=plan.models, copied=copied, shared=plan.shared_bytes, txn=txn.id)


def _result(reg: Registry, bundle: Trusted, fit: list[dict[str, Any]] | None, kind: str, *,
            models: list[dict[str, Any]], copied: int = 0, shared: int = 0, txn: str | None = None) -> InstallResult:
    """The ``InstallResult`` of each outcome (installed, noop, reactivated), built one way."""
    m = bundle.manifest
    req = reg.path(f"{WHEELS_DIR}/{requirements_name(m.name)}") if m.wheels else None
    return InstallResult(
        result=kind, registry=reg.root, manifest=m, signers=tuple({"name": k.name, "keyid": k.keyid} for k in bundle.signers),
        models=tuple({k: v for k, v in x.items() if k != "files"} | {"files": len(x["files"])} for x in models),
        wheels=tuple(wheel_filename(x.path) for x in m.wheels), requirements=req, fit=fit, bytes_copied=copied,
        bytes_shared=shared, downgrade=bundle.downgrade, txn=txn,
    )


def _reinstall(w: Writer, attempt: Attempt, bundle_id: int, result: Callable[..., InstallResult]) -> InstallResult:
    """The same bundle again (every byte of the medium verified): a no-op, or (after a rollback) pointing its refs back at it.

    Either answer says the bundle's revisions are there, so each snapshot is checked first (``check_snapshot``).
    """
    rows = w.conn.bundle_models(bundle_id)
    models = [{"repo_id": r.repo_id, "ref": r.ref, "commit": r.commit, "revision": r.revision,
               "source": r.source, "license": r.license, "files": w.conn.model_files(r.model_id),
               "snapshot": str(w.reg.path(f"{HUB_DIR}/{repo_folder(r.repo_id)}/snapshots/{r.commit}"))} for r in rows]
    for r in rows:
        check_snapshot(w.reg, r.repo_id, r.commit, w.conn.model_files(r.model_id))
    stale = [r for r in rows if r.ref_commit != r.commit]
    if not stale:
        attempt.logged = True
        w.audit({**attempt.record, "result": "noop", "note": "this bundle is already installed; nothing changed"})
        return result("noop", models=models)
    txn = w.begin("reactivate", attempt.record)

    def body() -> dict[str, Any]:
        switch_refs(txn, attempt, [(r.repo_id, r.ref, r.commit, r.model_id) for r in stale], result="reactivated")
        txn.finish({"models": [{"repo_id": r.repo_id, "revision": r.ref, "commit": r.commit} for r in stale]})
        return {}

    run_txn(txn, body)
    return result("reactivated", models=models, txn=txn.id)


__all__ = ["InstallOptions", "InstallResult", "install"]
