"""``airpack check``: re-verify what is installed, long after install verified it.

Install proves a bundle was intact when it arrived; nothing after that would
notice a blob overwritten on the registry's disk, a snapshot link pointed
elsewhere, a ref moved by hand, or an audit log deleted. ``check`` compares the
registry folder with the database, which recorded every file's SHA-256 at
install time:

- every blob and wheel is re-hashed (in parallel, through the one hashing
  loop, ``hashing.hash_fd``) against the database's digest;
- every snapshot entry must be the relative link to its blob, every ref file
  must name the commit the database records (and that commit must be
  installed), every requirements file must be the hash-pinned text the
  wheels give;
- each installed bundle's kept envelope and manifest (``bundles/<digest>/``,
  written in the install transaction) must be the bytes recorded;
- the audit log's hash chain must hold, and every write the database
  committed (its ``ops`` table) must have its line: a deleted or truncated
  log is a failure, never "0 lines, chain intact";
- with a policy, each kept envelope is verified again against it, so a key
  revoked or removed since shows which installed bundles it let in.

Anything under ``hub/``, ``wheels/`` or ``bundles/`` the database does not
know is reported as extra, except huggingface_hub's own bookkeeping (names
starting with a dot directly under ``hub/`` or a repo folder, and
``hub/version.txt``). Nothing is written: a check changes nothing, not even
the audit log.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._fs import oserror_to_airpack, read_capped
from ..errors import (
    AirpackError,
    AuditLogError,
    FileMismatch,
    MismatchReport,
    NoLongerTrustedError,
    RegistryDamageError,
    TrustError,
    UnsafeRegistryError,
    error_record,
)
from ..hashing import FileDigest, hash_fd, parallel_map
from ..progress import NULL_PROGRESS, Progress, ProgressTask
from ..registry import (
    AUDIT_NAME,
    BUNDLES_DIR,
    HUB_DIR,
    KEPT_ENVELOPE,
    KEPT_MANIFEST,
    STAGING_DIR,
    WHEELS_DIR,
    Database,
    InstalledBundle,
    Registry,
    kept_bundle_dir,
    kept_ref,
    link_target,
    repo_folder,
    requirements_name,
)
from ..registry.audit_log import verify_chain
from ..signing import MAX_ENVELOPE_BYTES, PAYLOAD_TYPE, parse_envelope
from ..trust import TrustPolicy, verify_envelope
from ._install_plan import requirements_text

MAX_REF_BYTES = 256  # a ref file holds one 40-hex commit
AREAS = (HUB_DIR, WHEELS_DIR, BUNDLES_DIR)


@dataclass(frozen=True, kw_only=True)
class CheckOptions:
    """What to check: the registry, and optionally today's policy to re-verify each kept envelope against."""

    registry: Path
    policy: TrustPolicy | None = None
    workers: int | None = None
    progress: Progress = NULL_PROGRESS


# -- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditCheck:
    """The audit log's chain, held against the operations the database committed."""

    lines: int
    head: str
    operations: int
    unlogged: tuple[str, ...]  # committed txns with no line in the log: a deleted, truncated or replaced log
    pending: tuple[str, ...]  # committed txns whose line the next write command's recovery still appends
    error: dict[str, Any] | None  # the broken chain, as error_record gives it

    @property
    def ok(self) -> bool:
        return self.error is None and not self.unlogged

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "lines": self.lines, "head_sha256": self.head, "operations": self.operations,
                "unlogged_txns": list(self.unlogged), "pending_txns": list(self.pending), "error": self.error}


@dataclass(frozen=True)
class UntrustedBundle:
    """An installed bundle whose kept envelope the given policy does not accept (now)."""

    name: str
    channel: str
    sequence: int
    manifest_sha256: str
    reason: str
    type: str

    def to_json(self) -> dict[str, Any]:
        return {"bundle": self.name, "channel": self.channel, "sequence": self.sequence, "manifest_sha256": self.manifest_sha256,
                "reason": self.reason, "type": self.type}


@dataclass(frozen=True)
class TrustCheck:
    """Each kept envelope verified again against ``policy``."""

    policy: str
    policy_sha256: str | None
    threshold: int
    checked: tuple[str, ...]  # bundle names whose envelope was re-verified
    untrusted: tuple[UntrustedBundle, ...]
    not_kept: tuple[str, ...]  # bundles installed before envelopes were kept: nothing to re-verify

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "policy_sha256": self.policy_sha256, "threshold": self.threshold,
                "checked": list(self.checked), "untrusted": [u.to_json() for u in self.untrusted], "not_kept": list(self.not_kept)}


@dataclass(frozen=True)
class CheckResult:
    """What ``check`` found. ``failure()`` is the error a command ends with (exit 3 before exit 4), or None."""

    registry: str
    files: int
    bytes: int
    models: int
    bundles: int
    report: MismatchReport
    audit: AuditCheck
    trust: TrustCheck | None
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.report and self.audit.ok and not (self.trust and self.trust.untrusted)

    def failure(self) -> AirpackError | None:
        if self.report:
            n = len(self.report.missing) + len(self.report.extra) + len(self.report.changed)
            first = (*self.report.missing, *self.report.extra, *(c.path for c in self.report.changed))[0]
            return RegistryDamageError(
                f"registry {self.registry} differs from its database: {n} entr{'y' if n == 1 else 'ies'} "
                f"({len(self.report.missing)} missing, {len(self.report.extra)} extra, {len(self.report.changed)} changed); "
                f"first: {first}", report=self.report, path=first)
        if self.trust and self.trust.untrusted:
            names = ", ".join(f"{u.name} (sequence {u.sequence})" for u in self.trust.untrusted)
            return NoLongerTrustedError(
                f"policy {self.trust.policy} no longer trusts {len(self.trust.untrusted)} installed bundle(s): {names}",
                path=self.trust.policy)
        return None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "registry": self.registry,
                "checked": {"files": self.files, "bytes": self.bytes, "models": self.models, "bundles": self.bundles},
                **self.report.to_json(), "audit": self.audit.to_json(),
                "trust": self.trust.to_json() if self.trust is not None else None, "notes": list(self.notes)}


# -- what the database says should be there ---------------------------------------------------------


@dataclass(frozen=True)
class _Blob:
    """A plain file whose bytes must hash to ``sha256`` (``size`` None: only the digest was recorded)."""

    sha256: str
    size: int | None


@dataclass(frozen=True)
class _Link:
    target: str


@dataclass(frozen=True)
class _Ref:
    commit: str


_Expect = _Blob | _Link | _Ref


@dataclass
class _Expected:
    """Every entry the database accounts for under hub/, wheels/ and bundles/, and the folders that lead to them."""

    entries: dict[str, _Expect] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=lambda: set(AREAS))
    known: set[str] = field(default_factory=set)  # folders kept whole but not checked (removed bundles' envelopes)
    optional: set[str] = field(default_factory=set)  # entries whose absence is a note, not damage (kept refs)
    changed: list[FileMismatch] = field(default_factory=list)  # what the database itself shows to be wrong
    models: int = 0
    bundles: list[InstalledBundle] = field(default_factory=list)

    def add(self, rel: str, what: _Expect) -> None:
        self.entries[rel] = what
        parts = rel.split("/")
        self.dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))


def _expected(conn: Database) -> _Expected:
    exp = _Expected()
    commits: dict[str, set[str]] = {}
    for x in conn.models():
        exp.models += 1
        base = f"{HUB_DIR}/{repo_folder(x.repo_id)}"
        commits.setdefault(x.repo_id, set()).add(x.commit)
        for f in conn.model_files(x.model_id):
            exp.add(f"{base}/blobs/{f.sha256}", _Blob(f.sha256, f.size))
            exp.add(f"{base}/snapshots/{x.commit}/{f.path}", _Link(link_target(f.path, f.sha256)))
    for repo, held in commits.items():
        for commit in held:  # refs/airpack/kept-<commit>: keeps the revision safe from `hf cache prune`; older installs lack it
            rel = f"{HUB_DIR}/{repo_folder(repo)}/refs/{kept_ref(commit)}"
            exp.add(rel, _Ref(commit))
            exp.optional.add(rel)
    for repo, r in conn.all_refs():
        rel = f"{HUB_DIR}/{repo_folder(repo)}/refs/{r.ref}"
        exp.add(rel, _Ref(r.commit))
        if r.commit not in commits.get(repo, set()):
            exp.changed.append(FileMismatch(path=rel, reason=f"the database points this ref at {r.commit}, which no installed model holds"))
    names_with_wheels: set[str] = set()
    for w in conn.active_wheel_files():
        exp.add(f"{WHEELS_DIR}/{w.filename}", _Blob(w.sha256, w.size))
    for b in conn.active_bundles():
        exp.bundles.append(b)
        if conn.bundle_wheels([b.id]):
            names_with_wheels.add(b.name)
        if b.envelope_sha256 is not None:
            kept = kept_bundle_dir(b.manifest_sha256)
            exp.add(f"{kept}/{KEPT_ENVELOPE}", _Blob(b.envelope_sha256, None))
            exp.add(f"{kept}/{KEPT_MANIFEST}", _Blob(b.manifest_sha256, None))
    for name in sorted(names_with_wheels):
        latest = conn.latest_bundle_with_wheels(name, excluding=[])
        if latest is not None:
            ws = conn.bundle_wheels([latest.id])
            text = requirements_text(name, latest.sequence, [(w.name, w.version, w.sha256) for w in ws]).encode("utf-8")
            exp.add(f"{WHEELS_DIR}/{requirements_name(name)}", _Blob(hashlib.sha256(text).hexdigest(), len(text)))
    exp.known = {kept_bundle_dir(d) for d in conn.bundle_digests()} - exp.dirs
    return exp


# -- what the folder holds -------------------------------------------------------------------------


def _describe(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    return "a plain file" if stat.S_ISREG(st.st_mode) else "not a plain file"


def _ignored(parent: str, name: str) -> bool:
    """huggingface_hub's own bookkeeping beside the repos (``.locks``, ``.no_exist``, ``version.txt``): not airpack's to judge."""
    in_hub_or_repo = parent == HUB_DIR or (parent.startswith(HUB_DIR + "/models--") and parent.count("/") == 1)
    return in_hub_or_repo and (name.startswith(".") or (parent == HUB_DIR and name == "version.txt"))


class _Scan:
    """One walk over the registry's areas: links and refs judged on the spot, files queued for hashing."""

    def __init__(self, reg: Registry, exp: _Expected) -> None:
        self.reg = reg
        self.exp = exp
        self.seen: set[str] = set()
        self.extra: list[str] = []
        self.changed: list[FileMismatch] = list(exp.changed)
        self.jobs: list[tuple[str, _Blob, int]] = []  # (path, what it must hash to, its size when the walk saw it)

    def run(self) -> None:
        for area in AREAS:
            st = self.reg.lstat(area)
            if st is None:
                continue
            if not stat.S_ISDIR(st.st_mode):
                self.changed.append(FileMismatch(path=area, reason=f"{_describe(st)} where the registry's folder belongs"))
                continue
            self._walk(area)

    def _walk(self, rel_dir: str) -> None:
        try:
            entries = sorted(os.scandir(self.reg.path(rel_dir)), key=lambda e: e.name)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot read", str(self.reg.path(rel_dir))) from None
        for entry in entries:
            if _ignored(rel_dir, entry.name):
                continue
            rel = f"{rel_dir}/{entry.name}"
            if rel in self.exp.known:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # gone since the folder was listed: reported as missing if it was expected
                continue
            if stat.S_ISDIR(st.st_mode) and rel in self.exp.dirs:
                self._walk(rel)
            elif rel in self.exp.dirs:
                self.changed.append(FileMismatch(path=rel, reason=f"{_describe(st)} where a folder belongs"))
            elif rel not in self.exp.entries:
                self.extra.append(rel + "/" if stat.S_ISDIR(st.st_mode) else rel)
            else:
                self.seen.add(rel)
                self._judge(rel, st, self.exp.entries[rel])

    def _judge(self, rel: str, st: os.stat_result, what: _Expect) -> None:
        if isinstance(what, _Link):
            if not stat.S_ISLNK(st.st_mode):
                self.changed.append(FileMismatch(path=rel, reason=f"{_describe(st)} where the link to {what.target} belongs"))
                return
            try:
                target = os.readlink(self.reg.path(rel))
            except OSError:  # replaced since the walk saw it: judged as absent
                self.seen.discard(rel)
                return
            if target != what.target:
                self.changed.append(FileMismatch(path=rel, reason=f"the link points to {target}, expected {what.target}"))
            return
        if not stat.S_ISREG(st.st_mode):
            self.changed.append(FileMismatch(path=rel, reason=f"{_describe(st)} where a plain file belongs"))
            return
        if isinstance(what, _Ref):
            self._judge_ref(rel, what)
            return
        if what.size is not None and st.st_size != what.size:
            self.changed.append(FileMismatch(path=rel, reason="size differs", expected_size=what.size, actual_size=st.st_size,
                                             expected_sha256=what.sha256))
            return
        self.jobs.append((rel, what, st.st_size))

    def _judge_ref(self, rel: str, what: _Ref) -> None:
        try:
            data = read_capped(self.reg.path(rel), MAX_REF_BYTES, display=rel, what="ref file")
        except FileNotFoundError:
            self.seen.discard(rel)
            return
        except AirpackError as e:
            self.changed.append(FileMismatch(path=rel, reason=e.message))
            return
        if data != what.commit.encode("ascii"):
            shown = data.decode("utf-8", "replace")[:60]
            self.changed.append(FileMismatch(path=rel, reason=f"names {shown!r}, the database records {what.commit}"))

    def missing(self) -> list[str]:
        return sorted(set(self.exp.entries) - self.seen - self.exp.optional)

    def absent_optional(self) -> list[str]:
        return sorted(self.exp.optional - self.seen)


def _hash_one(reg: Registry, rel: str, what: _Blob, task: ProgressTask) -> FileMismatch | str | None:
    """Re-hash one file: None if its bytes are as recorded, its path if it vanished, else what changed."""
    path = reg.path(rel)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return rel
    except OSError as e:
        if e.errno == errno.ELOOP:
            return FileMismatch(path=rel, reason="a symbolic link where a plain file belongs")
        raise oserror_to_airpack(e, "cannot read", str(path)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return FileMismatch(path=rel, reason=f"{_describe(st)} where a plain file belongs")
        limit = what.size if what.size is not None else MAX_ENVELOPE_BYTES
        d: FileDigest = hash_fd(fd, on_bytes=task.advance, limit=limit)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot read", str(path)) from None
    finally:
        os.close(fd)
    if d.sha256 == what.sha256 and (what.size is None or d.size == what.size):
        return None
    reason = "size differs" if what.size is not None and d.size != what.size else "digest differs"
    return FileMismatch(path=rel, reason=reason, expected_size=what.size, actual_size=d.size, expected_sha256=what.sha256,
                        actual_sha256=d.sha256 if d.size <= limit else None)


# -- the audit log and the trust re-check --------------------------------------------------------------


def _check_audit(reg: Registry, conn: Database) -> tuple[AuditCheck, list[FileMismatch], list[str]]:
    """The chain, then every committed txn's line; returns the audit summary, what changed, what is missing."""
    ops = conn.ops()
    logged: set[str] = set()

    def visit(rec: dict[str, Any]) -> None:
        t = rec.get("txn")
        if isinstance(t, str) and rec.get("result") != "interrupted":
            logged.add(t)

    try:
        present = reg.check_plain_file(AUDIT_NAME)
        rep = verify_chain(reg, visit=visit)
    except (AuditLogError, UnsafeRegistryError) as e:
        audit = AuditCheck(lines=0, head="", operations=len(ops), unlogged=(), pending=(), error=error_record(e))
        return audit, [FileMismatch(path=AUDIT_NAME, reason=e.message)], []
    stale = reg.path(STAGING_DIR)
    waiting = [o.txn for o in ops if o.txn not in logged]
    pending = tuple(t for t in waiting if (stale / t).is_dir())
    unlogged = tuple(t for t in waiting if t not in pending)
    audit = AuditCheck(lines=rep.lines, head=rep.head, operations=len(ops), unlogged=unlogged, pending=pending, error=None)
    if unlogged and not present:
        return audit, [], [AUDIT_NAME]
    if unlogged:
        why = (f"the database records {len(ops)} committed operation(s) and {len(unlogged)} of them have no line in the log "
               f"({rep.lines} line(s)); first: txn {unlogged[0]}: the log was truncated, replaced or lines were removed")
        return audit, [FileMismatch(path=AUDIT_NAME, reason=why)], []
    return audit, [], []


def _check_trust(reg: Registry, policy: TrustPolicy, bundles: list[InstalledBundle], damaged: set[str]) -> TrustCheck:
    """Verify each intact kept envelope against ``policy``; a damaged one is already reported as integrity."""
    checked: list[str] = []
    untrusted: list[UntrustedBundle] = []
    not_kept: list[str] = []
    for b in bundles:
        rel = f"{kept_bundle_dir(b.manifest_sha256)}/{KEPT_ENVELOPE}"
        if b.envelope_sha256 is None:
            not_kept.append(b.name)
            continue
        if rel in damaged:
            continue
        checked.append(b.name)
        try:
            raw = read_capped(reg.path(rel), MAX_ENVELOPE_BYTES, display=rel, what="kept envelope")
            verify_envelope(parse_envelope(raw, where=rel), policy, expected_type=PAYLOAD_TYPE, where=rel)
        except FileNotFoundError:
            untrusted.append(UntrustedBundle(name=b.name, channel=b.channel, sequence=b.sequence, manifest_sha256=b.manifest_sha256,
                                             reason=f"{rel} vanished during the check", type="FileNotFoundError"))
        except TrustError as e:
            untrusted.append(UntrustedBundle(name=b.name, channel=b.channel, sequence=b.sequence, manifest_sha256=b.manifest_sha256,
                                             reason=e.message, type=type(e).__name__))
    return TrustCheck(policy=policy.source, policy_sha256=policy.sha256, threshold=policy.threshold, checked=tuple(checked),
                      untrusted=tuple(untrusted), not_kept=tuple(not_kept))


# -- check -----------------------------------------------------------------------------------------


def check(opts: CheckOptions) -> CheckResult:
    """Re-hash every installed file, check links, refs, kept envelopes and the audit log (and, with a policy, trust)."""
    reg = Registry.open(opts.registry)
    if opts.policy is not None:
        opts.policy.check_usable()
    with reg.reader() as conn:
        exp = _expected(conn)
        audit, audit_changed, audit_missing = _check_audit(reg, conn)
    scan = _Scan(reg, exp)
    scan.run()
    total = sum(size for _, _, size in scan.jobs)
    task = opts.progress.task(f"check {reg.root.name}", total)
    try:
        jobs = sorted(scan.jobs, key=lambda j: -j[2])  # largest first: the pool ends together
        outcomes = parallel_map(lambda j: _hash_one(reg, j[0], j[1], task), jobs, workers=opts.workers)
    finally:
        task.close()
    vanished = [o for o in outcomes if isinstance(o, str)]
    changed = [*scan.changed, *audit_changed, *(o for o in outcomes if isinstance(o, FileMismatch))]
    report = MismatchReport(missing=tuple(sorted({*scan.missing(), *vanished, *audit_missing})), extra=tuple(sorted(scan.extra)),
                            changed=tuple(sorted(changed, key=lambda c: c.path)))
    damaged = set(report.missing) | {c.path for c in report.changed}
    trust = _check_trust(reg, opts.policy, exp.bundles, damaged) if opts.policy is not None else None
    return CheckResult(registry=str(reg.root), files=len(scan.jobs), bytes=total, models=exp.models, bundles=len(exp.bundles),
                       report=report, audit=audit, trust=trust, notes=tuple(_notes(reg, audit, trust, scan.absent_optional())))


def _notes(reg: Registry, audit: AuditCheck, trust: TrustCheck | None, no_kept_ref: list[str]) -> list[str]:
    notes = []
    if no_kept_ref:
        notes.append(f"{len(no_kept_ref)} installed revision(s) have no refs/airpack/kept-<commit> (installed by an older airpack), "
                     f"so `hf cache prune` could delete them; the next install of that model adds it: {', '.join(no_kept_ref)}")
    if audit.pending:
        notes.append(f"{len(audit.pending)} committed write(s) still wait for their audit line (a writer stopped after its "
                     f"commit); the next install, remove or rollback finishes them: {', '.join(audit.pending)}")
    staging = reg.path(STAGING_DIR)
    if staging.is_dir() and any(staging.iterdir()) and not audit.pending:
        notes.append("a write is in progress or was interrupted (the staging folder is not empty); check again once it is done")
    if trust is not None and trust.not_kept:
        notes.append(f"{len(trust.not_kept)} bundle(s) were installed before airpack kept envelopes, so their signatures cannot "
                     f"be re-checked: {', '.join(sorted(set(trust.not_kept)))}")
    return notes


__all__ = ["AuditCheck", "CheckOptions", "CheckResult", "TrustCheck", "UntrustedBundle", "check"]
