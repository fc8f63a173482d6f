"""Registry writes as transactions, and recovery after a process was killed mid-write.

Every write is a transaction (``Txn``) in five steps, so a process killed
between any two of them leaves the registry as it was or finishes on the next
run:

1. stage: new files are written under ``.staging/<txn>/`` at the relative
   path they will have in the live tree (same filesystem, fsynced);
2. journal: ``journal.json`` (fsynced) names every path about to appear in
   the live tree, and what to do once the database has committed;
3. apply: staged blobs, wheels and snapshot folders or links are renamed into
   place. They are all new names: no ref moves, so nothing a loader resolves
   by revision name changes, and content-addressed blobs are harmless;
4. commit: one SQLite transaction writes the rows and the txn id. This is the
   commit point;
5. finish: refs are switched (atomic replace), requirement files written,
   what a remove freed is deleted, the audit line appended, staging dropped.

Recovery (``recover``) runs under the lock at the start of every write: a txn
whose id is in the database is finished (step 5 again: every action is
idempotent); any other is undone from its journal (step 3 reversed) and
logged as interrupted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._fs import atomic_write, check_relpath, fsync_dir, oserror_to_airpack
from ..errors import ConflictError, IntegrityError, RegistryError, UnsafeRegistryError
from . import audit_log
from .audit_log import compact_json
from .database import Database
from .layout import BUNDLES_DIR, COMMIT_RE, DIR_MODE, FILE_MODE, HUB_DIR, STAGING_DIR, WHEELS_DIR, Layout, now_text

JOURNAL_NAME = "journal.json"
INTENT_NAME = "intent.json"
MAX_JOURNAL_BYTES = 1 << 30

# Test hook (crash-safety tests only): when this variable names a step, the
# process SIGKILLs itself there. Steps: verified, copy, staged, journal, blobs,
# snapshots, committed, refs, audit. Unset in normal use; costs one dict lookup.
CRASH_ENV = "AIRPACK_TEST_CRASH_AT"


def crash_point(step: str) -> None:
    """SIGKILL this process at ``step`` when ``AIRPACK_TEST_CRASH_AT`` names it (a test hook)."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


# -- a write, with its journal ---------------------------------------------------------------


@dataclass
class Txn:
    """One registry write: staging folder, the live paths it creates, what to do after the commit."""

    reg: Layout
    conn: Database
    kind: str
    id: str
    stage: Path
    audit: dict[str, Any]
    creates: list[dict[str, Any]] = field(default_factory=list)
    refs: dict[str, str | None] = field(default_factory=dict)
    texts: dict[str, str | None] = field(default_factory=dict)
    deletes: list[str] = field(default_factory=list)
    prune: list[str] = field(default_factory=list)
    result: str = "done"
    committed: bool = False
    prepared: bool = False

    def staged(self, rel: str) -> Path:
        """The staging path of live path ``rel``; its parent folders are created (0755)."""
        p = self.stage.joinpath("tree", *rel.split("/"))
        missing = []
        d = p.parent
        while d != self.stage and not d.is_dir():
            missing.append(d)
            d = d.parent
        try:
            for d in reversed(missing):
                with contextlib.suppress(FileExistsError):  # copy workers may race to make the same folder
                    os.mkdir(d, DIR_MODE)
                os.chmod(d, DIR_MODE)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot create", str(p.parent)) from None
        return p

    def stage_file(self, rel: str, data: bytes) -> str:
        """Stage a small file for live path ``rel`` (written and fsynced whole); returns ``rel``, a leaf for ``plan_creates``."""
        atomic_write(self.staged(rel), data, mode=FILE_MODE)
        return rel

    def plan_creates(self, leaves: list[str]) -> None:
        """Turn staged leaf paths into the smallest set of live names to rename in (a new folder moves whole)."""
        units: dict[str, str] = {}
        for rel in leaves:
            parts = rel.split("/")
            for i in range(1, len(parts) + 1):
                prefix = "/".join(parts[:i])
                st = self.reg.lstat(prefix)
                if st is None:
                    kind = "tree" if i < len(parts) else "leaf"
                    units.setdefault(prefix, kind)
                    break
                if i < len(parts):
                    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
                        raise UnsafeRegistryError(
                            f"registry path {prefix} is {'a symbolic link' if stat.S_ISLNK(st.st_mode) else 'not a folder'}; "
                            "refusing to write through it", path=str(self.reg.path(prefix)))
                else:
                    # The leaf exists: only a plain file (a blob not referenced by the database) may be replaced.
                    if not stat.S_ISREG(st.st_mode):
                        raise ConflictError(f"registry path {rel} already exists", path=str(self.reg.path(rel)))
                    units.setdefault(prefix, "replace")
        # A unit inside another unit moves with it.
        names = sorted(units)
        keep = [n for n in names if not any(n.startswith(o + "/") for o in names if o != n)]
        order = {"replace": 0, "leaf": 1, "tree": 2}
        self.creates = [{"path": n, "kind": units[n]} for n in sorted(keep, key=lambda n: (order[units[n]], "snapshots" in n, n))]

    def _journal(self) -> dict[str, Any]:
        return {
            "txn": self.id, "kind": self.kind, "creates": self.creates, "refs": self.refs, "texts": self.texts,
            "deletes": self.deletes, "prune": self.prune, "result": self.result,
        }

    def prepare(self) -> None:
        """fsync what was staged, then write the journal: after this, every live change can be undone or redone."""
        # What runs after the commit must not meet a planted link: check its paths now, while refusing is free.
        for rel in [*self.refs, *self.texts, *self.deletes]:
            self.reg.safe_dir(rel.rsplit("/", 1)[0], create=False)
        for rel in [*self.refs, *self.texts]:
            if self.reg.safe_dir(rel.rsplit("/", 1)[0], create=False) is not None:
                self.reg.check_plain_file(rel)
        try:
            tree = self.stage / "tree"
            if tree.is_dir():
                for dirpath, _dirs, _files in os.walk(tree):
                    fsync_dir(Path(dirpath))
            atomic_write(self.stage / JOURNAL_NAME, compact_json(self._journal()))
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(self.stage)) from None
        self.prepared = True
        crash_point("journal")

    def apply(self) -> None:
        """Rename staged units into the live tree (new names only, blobs first)."""
        parents: set[Path] = set()
        stepped = False
        for c in self.creates:
            rel = c["path"]
            if not stepped and "/snapshots/" in f"/{rel}/":
                crash_point("blobs")
                stepped = True
            parent_rel = rel.rsplit("/", 1)[0] if "/" in rel else ""
            parent = self.reg.safe_dir(parent_rel, create=False)
            if parent is None:
                raise ConflictError(f"registry path {parent_rel} vanished during install", path=parent_rel)
            src = self.stage.joinpath("tree", *rel.split("/"))
            dst = self.reg.path(rel)
            if c["kind"] != "replace" and os.path.lexists(dst):
                raise ConflictError(f"registry path {rel} appeared during install", path=str(dst))
            try:
                os.rename(src, dst)
            except OSError as e:
                raise oserror_to_airpack(e, "cannot move into place", str(dst)) from None
            parents.add(parent)
        for p in parents:
            fsync_dir(p)
        if not stepped:
            crash_point("blobs")
        crash_point("snapshots")

    def commit(self, fn: Callable[[Database], None]) -> None:
        """The commit point: one SQLite transaction holding the rows ``fn`` writes and this txn's id."""
        with self.conn.recording(self.id, self.kind):
            fn(self.conn)
        self.committed = True
        crash_point("committed")

    def finish(self, audit: dict[str, Any] | None = None) -> dict[str, Any]:
        """After the commit: switch refs, write texts, delete what was freed, log, drop staging."""
        redo(self.reg, self._journal(), self.stage)
        crash_point("refs")
        rec = audit_log.append_record(self.reg, {**self.audit, **(audit or {}), "txn": self.id, "result": self.result})
        crash_point("audit")
        shutil.rmtree(self.stage, ignore_errors=True)
        return rec

    def abort(self) -> None:
        """Before the commit: take back whatever reached the live tree, drop staging."""
        if self.prepared:
            undo(self.reg, self._journal())
        shutil.rmtree(self.stage, ignore_errors=True)


def begin(reg: Layout, conn: Database, kind: str, audit: dict[str, Any]) -> Txn:
    """Start a write; ``intent.json`` lets recovery log an interrupted attempt."""
    tid = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(6)
    staging = reg.safe_dir(STAGING_DIR, create=True)
    assert staging is not None
    stage = staging / tid
    try:
        os.mkdir(stage, 0o700)
        atomic_write(stage / INTENT_NAME, compact_json({**audit, "txn": tid}))
    except OSError as e:
        raise oserror_to_airpack(e, "cannot create", str(stage)) from None
    return Txn(reg=reg, conn=conn, kind=kind, id=tid, stage=stage, audit={**audit, "txn": tid})


# -- recovery ------------------------------------------------------------------------------------


def recover(reg: Layout, conn: Database) -> list[str]:
    """Finish committed writes and undo the others, for every staging folder a killed process left."""
    staging = reg.safe_dir(STAGING_DIR, create=False)
    if staging is None:
        return []
    done = []
    for entry in sorted(os.scandir(staging), key=lambda e: e.name):
        d = Path(entry.path)
        if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(d)
            continue
        journal = _read_json(d / JOURNAL_NAME)
        intent = _read_json(d / INTENT_NAME) or {}
        tid = entry.name
        if conn.txn_committed(tid):
            if journal is not None:
                redo(reg, journal, d)
            if not audit_log.has_txn(reg, tid):
                result = journal.get("result", "done") if journal else "done"
                audit_log.append_record(reg, {**intent, "txn": tid, "result": result, "time": now_text(),
                                              "note": "finished by recovery after the writing process stopped"})
        else:
            if journal is not None:
                undo(reg, journal)
            if intent:
                audit_log.append_record(reg, {**intent, "txn": tid, "result": "interrupted", "time": now_text(),
                                              "note": "the writing process stopped before committing; nothing was installed or removed"})
        shutil.rmtree(d, ignore_errors=True)
        done.append(tid)
    return done


def _journal_rel(reg: Layout, rel: object) -> str:
    """A path from a staging journal: only ever a safe path under hub/, wheels/ or bundles/ (a journal is not trusted blindly)."""
    # bundles/ itself too: the first install after an upgrade creates it whole (a registry's first write makes hub/ and wheels/)
    ok = isinstance(rel, str) and (rel == BUNDLES_DIR or rel.startswith((HUB_DIR + "/", WHEELS_DIR + "/", BUNDLES_DIR + "/")))
    if ok:
        try:
            check_relpath(rel)
        except IntegrityError:
            ok = False
    if not ok:
        raise UnsafeRegistryError(
            f"a staging journal under {reg.path(STAGING_DIR)} names {rel!r}, outside the registry's hub/, wheels/ and bundles/",
            path=str(reg.path(STAGING_DIR)),
            hint="Someone edited the registry's staging folder; inspect it, then delete the folder by hand.",
        )
    assert isinstance(rel, str)
    return rel


def undo(reg: Layout, journal: dict[str, Any]) -> None:
    """Remove the live names a txn created (never following links); replaced blobs stay (same bytes)."""
    for c in reversed(journal.get("creates") or []):
        rel = _journal_rel(reg, c.get("path"))
        if c.get("kind") == "replace":
            continue
        parent_rel = rel.rsplit("/", 1)[0]
        if reg.safe_dir(parent_rel, create=False) is None:
            continue
        _remove(reg.path(rel))


def redo(reg: Layout, journal: dict[str, Any], stage: Path) -> None:
    """The after-commit actions, each idempotent: refs, texts, deletes, empty-folder pruning."""
    touched = _redo_refs(reg, journal.get("refs") or {})
    _redo_texts(reg, journal.get("texts") or {})
    touched |= _redo_deletes(reg, journal.get("deletes") or [], stage / "trash")
    for rel in sorted(journal.get("prune") or [], key=lambda r: -r.count("/")):
        rel = _journal_rel(reg, rel)
        if reg.safe_dir(rel, create=False) is None:
            continue
        with contextlib.suppress(OSError):
            os.rmdir(reg.path(rel))
    for p in touched:
        with contextlib.suppress(OSError):
            fsync_dir(p)


def _redo_refs(reg: Layout, refs: dict[str, Any]) -> set[Path]:
    """Write (or, for None, remove) each ref file; returns the folders touched."""
    touched: set[Path] = set()
    for rel, commit in sorted(refs.items()):
        rel = _journal_rel(reg, rel)
        parent = reg.safe_dir(rel.rsplit("/", 1)[0], create=commit is not None)
        if parent is None:
            continue
        p = reg.path(rel)
        if commit is None:
            _remove(p)
        else:
            if not isinstance(commit, str) or not COMMIT_RE.match(commit):
                raise RegistryError("a staging journal holds a malformed commit")
            reg.check_plain_file(rel)
            atomic_write(p, commit.encode("ascii"), mode=FILE_MODE)
        touched.add(parent)
    return touched


def _redo_texts(reg: Layout, texts: dict[str, Any]) -> None:
    """Write (or, for None, remove) each text file (requirements)."""
    for rel, text in sorted(texts.items()):
        rel = _journal_rel(reg, rel)
        parent = reg.safe_dir(rel.rsplit("/", 1)[0], create=text is not None)
        if parent is None:
            continue
        if text is None:
            _remove(reg.path(rel))
        else:
            reg.check_plain_file(rel)
            atomic_write(reg.path(rel), str(text).encode("utf-8"), mode=FILE_MODE)


def _redo_deletes(reg: Layout, deletes: list[Any], trash: Path) -> set[Path]:
    """Delete what a remove freed; a folder leaves in one rename, so a loader never sees half of it. Returns folders touched."""
    touched: set[Path] = set()
    for i, rel in enumerate(deletes):
        rel = _journal_rel(reg, rel)
        parent = reg.safe_dir(rel.rsplit("/", 1)[0], create=False)
        if parent is None:
            continue
        p = reg.path(rel)
        st = reg.lstat(rel)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            trash.mkdir(exist_ok=True)
            dst = trash / str(i)
            _remove(dst)
            try:
                os.rename(p, dst)
            except OSError as e:
                raise oserror_to_airpack(e, "cannot remove", str(p)) from None
            shutil.rmtree(dst, ignore_errors=True)
        else:
            _remove(p)
        touched.add(parent)
    return touched


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_JOURNAL_BYTES + 1)
    if len(data) > MAX_JOURNAL_BYTES:
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _remove(p: Path) -> None:
    """Remove a file, link or folder without following links; absent is fine."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    try:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(p)
        else:
            os.unlink(p)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise oserror_to_airpack(e, "cannot remove", str(p)) from None
