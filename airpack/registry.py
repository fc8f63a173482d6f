"""The offline model registry: a Hugging Face cache, a wheelhouse, a database and an audit log.

Layout::

    REGISTRY/
      hub/models--ORG--NAME/blobs/<sha256>             file bytes, stored once (hard links across repos)
      hub/models--ORG--NAME/snapshots/<commit>/<path>  relative links to ../../blobs/<sha256>
      hub/models--ORG--NAME/refs/<revision or main>    the commit a revision name points to
      wheels/<file>.whl, wheels/<bundle>.txt           wheelhouse and hash-pinned requirements
      registry.db                                      SQLite (WAL): bundles, models, files, refs, channels
      audit.log                                        JSON lines, each holding the SHA-256 of the line before
      .lock                                            one writer at a time (flock: a killed holder releases it)
      .staging/<txn>/                                  a write in progress: a mirror of the live tree + journal

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

Recovery runs under the lock at the start of every write: a txn whose id is in
the database is finished (step 5 again: every action is idempotent); any
other is undone from its journal (step 3 reversed) and logged as interrupted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import getpass
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import stat
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from ._fs import atomic_write, check_relpath, fsync_dir, oserror_to_airpack
from .errors import (
    AirpackError,
    AuditLogError,
    ConflictError,
    IntegrityError,
    LockHeldError,
    NotInstalledError,
    RegistryError,
    ResourceError,
    UnsafeRegistryError,
    UsageError,
)

HUB_DIR = "hub"
WHEELS_DIR = "wheels"
DB_NAME = "registry.db"
AUDIT_NAME = "audit.log"
LOCK_NAME = ".lock"
STAGING_DIR = ".staging"
JOURNAL_NAME = "journal.json"
INTENT_NAME = "intent.json"
DIR_MODE = 0o755
FILE_MODE = 0o644
SCHEMA_VERSION = 1
MAX_SEQUENCE_JUMP = 1_000_000
MAX_AUDIT_LINE = 4 << 20
MAX_JOURNAL_BYTES = 1 << 30
GENESIS = "0" * 64

# Test hook (crash-safety tests only): when this variable names a step, the
# process SIGKILLs itself there. Steps: verified, copy, staged, journal, blobs,
# snapshots, committed, refs, audit. Unset in normal use; costs one dict lookup.
CRASH_ENV = "AIRPACK_TEST_CRASH_AT"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")


def crash_point(step: str) -> None:
    """SIGKILL this process at ``step`` when ``AIRPACK_TEST_CRASH_AT`` names it (a test hook)."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def now_text() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def repo_folder(repo_id: str) -> str:
    """The Hugging Face cache folder of a model repo: ``models--ORG--NAME``."""
    return "models--" + "--".join(repo_id.split("/"))


def ref_name(revision: str | None) -> str:
    """The ``refs/`` file a model's revision is recorded under: its branch or tag, else ``main``."""
    if revision is None or _COMMIT.match(revision):
        return "main"
    if not _REF.match(revision) or revision.endswith(("/", ".lock")) or "//" in revision:
        raise IntegrityError(f"model revision {revision!r} is not a usable ref name")
    check_relpath(revision)
    return revision


def link_target(rel: str, sha256: str) -> str:
    """The relative link from ``snapshots/<commit>/<rel>`` to ``blobs/<sha256>`` (what huggingface_hub writes)."""
    return "../" * (rel.count("/") + 2) + "blobs/" + sha256


def requirements_name(bundle_name: str) -> str:
    return f"{bundle_name}.txt"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def _db_error(e: sqlite3.Error, path: Path) -> AirpackError:
    msg = str(e)
    if isinstance(e, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg):
        return LockHeldError(f"registry database {path} is busy: {msg}", path=str(path))
    if isinstance(e, sqlite3.OperationalError) and ("disk" in msg and "full" in msg):
        return ResourceError(f"registry database {path}: {msg}", path=str(path))
    return RegistryError(f"registry database {path}: {msg}", path=str(path),
                         hint="The registry database is damaged or not airpack's; restore it from a backup.")


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ops (
    txn TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS bundles (
    id INTEGER PRIMARY KEY,
    txn TEXT NOT NULL REFERENCES ops(txn),
    name TEXT NOT NULL,
    channel TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    created TEXT NOT NULL,
    expires TEXT,
    signers TEXT NOT NULL,
    source TEXT NOT NULL,
    installed_at TEXT NOT NULL,
    installed_by TEXT NOT NULL,
    downgrade INTEGER NOT NULL DEFAULT 0,
    fit TEXT,
    state TEXT NOT NULL CHECK (state IN ('active', 'removed')),
    removed_at TEXT
);
CREATE INDEX IF NOT EXISTS bundles_digest ON bundles(manifest_sha256);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    bundle_id INTEGER NOT NULL REFERENCES bundles(id) ON DELETE CASCADE,
    repo_id TEXT NOT NULL,
    ref TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    revision TEXT,
    source TEXT NOT NULL,
    license TEXT
);
CREATE INDEX IF NOT EXISTS models_repo ON models(repo_id);
CREATE TABLE IF NOT EXISTS files (
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (model_id, path)
);
CREATE INDEX IF NOT EXISTS files_sha ON files(sha256);
CREATE TABLE IF NOT EXISTS wheels (
    bundle_id INTEGER NOT NULL REFERENCES bundles(id) ON DELETE CASCADE,
    filename TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (bundle_id, filename)
);
CREATE TABLE IF NOT EXISTS refs (
    repo_id TEXT NOT NULL,
    ref TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    model_id INTEGER REFERENCES models(id) ON DELETE SET NULL,
    PRIMARY KEY (repo_id, ref)
);
CREATE TABLE IF NOT EXISTS channels (
    channel TEXT PRIMARY KEY,
    sequence INTEGER NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    bundle TEXT NOT NULL
);
"""


# -- what the registry holds ----------------------------------------------------------


@dataclass(frozen=True)
class InstalledModel:
    """One installed (repo, revision) as installed by one bundle."""

    model_id: int
    repo_id: str
    ref: str
    commit: str
    revision: str | None
    source: str
    license: str | None
    bundle_id: int
    bundle: str
    channel: str
    sequence: int
    manifest_sha256: str
    signers: tuple[dict[str, str], ...]
    installed_at: str
    installed_by: str
    current: bool
    files: int
    bytes: int
    has_wheels: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "revision": self.ref,
            "commit": self.commit,
            "current": self.current,
            "bundle": self.bundle,
            "channel": self.channel,
            "sequence": self.sequence,
            "manifest_sha256": self.manifest_sha256,
            "signers": [dict(s) for s in self.signers],
            "installed_at": self.installed_at,
            "installed_by": self.installed_by,
            "source": self.source,
            "license": self.license,
            "files": self.files,
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class LogReport:
    lines: int
    head: str
    first: str | None
    last: str | None

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, "lines": self.lines, "head_sha256": self.head, "first_time": self.first, "last_time": self.last}


# -- the registry folder ------------------------------------------------------------------


class Registry:
    """A registry folder. ``open`` checks it; ``writer()`` takes the lock and recovers."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # opening and path safety

    @classmethod
    def open(cls, path: Path, *, create: bool = False) -> Registry:
        p = Path(path)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            if not create:
                raise NotInstalledError(f"no registry at {p}", path=str(p),
                                        hint="Install a bundle first: airpack install BUNDLE --registry DIR --trust POLICY") from None
            try:
                p.mkdir(parents=True, mode=DIR_MODE)
                os.chmod(p, DIR_MODE)
            except OSError as e:
                raise oserror_to_airpack(e, "cannot create registry", str(p)) from None
            st = os.lstat(p)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot open registry", str(p)) from None
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeRegistryError(f"registry folder {p} is a symbolic link; give its real path", path=str(p))
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"registry {p} is not a folder", path=str(p))
        reg = cls(p.resolve())
        db = reg.root / DB_NAME
        if not os.path.lexists(db):
            if not create:
                raise NotInstalledError(f"{p} is not an airpack registry (no {DB_NAME})", path=str(p))
            if any(not e.name.startswith(".") for e in reg.root.iterdir()):
                raise UsageError(f"{p} is not empty and holds no airpack registry; choose a new or empty folder", path=str(p))
        return reg

    def path(self, rel: str) -> Path:
        return self.root.joinpath(*rel.split("/")) if rel else self.root

    def safe_dir(self, rel: str, *, create: bool) -> Path | None:
        """``root/rel`` after checking each component is a real folder (never a link); create missing ones (0755).

        Returns None when a component is missing and ``create`` is False.
        """
        cur = self.root
        for part in rel.split("/") if rel else []:
            cur = cur / part
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                if not create:
                    return None
                try:
                    os.mkdir(cur, DIR_MODE)
                    os.chmod(cur, DIR_MODE)
                except OSError as e:
                    raise oserror_to_airpack(e, "cannot create", str(cur)) from None
                continue
            except OSError as e:
                raise oserror_to_airpack(e, "cannot read", str(cur)) from None
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeRegistryError(
                    f"registry path {self.rel(cur)} is a symbolic link; refusing to write through it", path=str(cur)
                )
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeRegistryError(f"registry path {self.rel(cur)} is not a folder", path=str(cur))
        return cur

    def rel(self, p: Path) -> str:
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:
            return str(p)

    def lstat(self, rel: str) -> os.stat_result | None:
        try:
            return os.lstat(self.path(rel))
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            raise UnsafeRegistryError(f"registry path {rel}: a parent is not a folder", path=rel) from None

    def check_plain_file(self, rel: str) -> bool:
        """True if ``rel`` is a plain file, False if absent; refuse links and anything else."""
        st = self.lstat(rel)
        if st is None:
            return False
        if not stat.S_ISREG(st.st_mode):
            what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a plain file"
            raise UnsafeRegistryError(f"registry path {rel} is {what}", path=str(self.path(rel)))
        return True

    def check_layout(self) -> None:
        """The fixed top-level entries must be real folders and plain files, never links."""
        for d in (HUB_DIR, WHEELS_DIR, STAGING_DIR):
            self.safe_dir(d, create=True)
        for f in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", AUDIT_NAME, LOCK_NAME):
            self.check_plain_file(f)

    # the lock

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the one-writer lock (fcntl.flock: released by the kernel even if this process is killed)."""
        self.check_plain_file(LOCK_NAME)
        path = self.path(LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeRegistryError(f"registry lock {path} is a symbolic link", path=str(path)) from None
            raise oserror_to_airpack(e, "cannot open lock", str(path)) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                raise LockHeldError(
                    f"registry {self.root} is being written by another airpack process (pid {holder})", path=str(path)
                ) from None
            os.fchmod(fd, FILE_MODE)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # the database

    def connect(self, *, write: bool) -> sqlite3.Connection:
        path = self.path(DB_NAME)
        self.check_plain_file(DB_NAME)
        try:
            if write:
                conn = sqlite3.connect(str(path), isolation_level=None, timeout=30)
            else:
                if not path.exists():
                    raise NotInstalledError(f"{self.root} is not an airpack registry (no {DB_NAME})", path=str(self.root))
                uri = "file:" + urllib.parse.quote(str(path)) + "?mode=ro"
                conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            if write:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(
                    "BEGIN IMMEDIATE;" + SCHEMA
                    + f"INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', '{SCHEMA_VERSION}'); COMMIT;"
                )
                for f in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
                    if self.check_plain_file(f):
                        os.chmod(self.path(f), FILE_MODE)
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.Error as e:
            raise _db_error(e, path) from None
        if row is None or row[0] != str(SCHEMA_VERSION):
            conn.close()
            raise RegistryError(f"registry database {path} has schema {row[0] if row else 'none'}; this airpack reads {SCHEMA_VERSION}",
                                path=str(path))
        return conn

    @contextlib.contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        conn = self.connect(write=False)
        try:
            yield conn
        except sqlite3.Error as e:
            raise _db_error(e, self.path(DB_NAME)) from None
        finally:
            conn.close()

    @contextlib.contextmanager
    def writer(self) -> Iterator[Writer]:
        """Take the lock, open the database, finish or undo any interrupted write, then hand over."""
        self.check_layout()
        with self.locked():
            conn = self.connect(write=True)
            try:
                w = Writer(self, conn)
                w.recover()
                yield w
            except sqlite3.Error as e:
                raise _db_error(e, self.path(DB_NAME)) from None
            finally:
                conn.close()

    # the audit log

    def audit_append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append one hash-chained line under the log's own flock; a partial line left by a crash is dropped first (and noted)."""
        self.check_plain_file(AUDIT_NAME)
        path = self.path(AUDIT_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeRegistryError(f"audit log {path} is a symbolic link", path=str(path)) from None
            raise oserror_to_airpack(e, "cannot open", str(path)) from None
        try:
            # The log's own lock keeps the chain whole when a process refused by the writer lock logs its refusal.
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.fchmod(fd, FILE_MODE)
            prev, dropped = _chain_tail(fd)
            rec = {k: v for k, v in record.items() if k not in ("prev", "sha256")}
            if dropped:
                rec["dropped_partial_bytes"] = dropped
            rec["prev"] = prev
            rec["sha256"] = hashlib.sha256(_dumps(rec)).hexdigest()
            line = _dumps(rec) + b"\n"
            view = memoryview(line)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot append to", str(path)) from None
        finally:
            os.close(fd)
        return rec

    def audit_has_txn(self, txn: str, *, window: int = 4 << 20) -> bool:
        """Whether one of the log's last lines (the last ``window`` bytes) belongs to ``txn``.

        A txn's line is written under the lock, so it is among the newest; only
        refusals of processes that met the lock can follow it.
        """
        if not self.check_plain_file(AUDIT_NAME):
            return False
        fd = os.open(self.path(AUDIT_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            start = max(0, size - window)
            tail = os.pread(fd, size - start, start)
        finally:
            os.close(fd)
        needle = _dumps({"txn": txn})[1:-1]  # "txn":"<id>" exactly as a line holds it
        return needle in tail

    def verify_log(self) -> LogReport:
        """Check every line's own hash and its link to the line before; name the first broken line."""
        if not self.check_plain_file(AUDIT_NAME):
            return LogReport(lines=0, head=GENESIS, first=None, last=None)
        prev = GENESIS
        first: str | None = None
        last: str | None = None
        n = 0
        shown = AUDIT_NAME
        with open(os.open(self.path(AUDIT_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
            while True:
                raw = f.readline(MAX_AUDIT_LINE + 1)
                if not raw:
                    break
                n += 1
                if len(raw) > MAX_AUDIT_LINE:
                    raise AuditLogError(f"{shown} line {n} is longer than {MAX_AUDIT_LINE} bytes", line=n, path=shown)
                if not raw.endswith(b"\n"):
                    raise AuditLogError(f"{shown} line {n} is cut short (no newline): the log was truncated", line=n, path=shown)
                body = raw[:-1]
                try:
                    rec = json.loads(body.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    raise AuditLogError(f"{shown} line {n} is not valid JSON: it was edited", line=n, path=shown) from None
                if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str):
                    raise AuditLogError(f"{shown} line {n} is not an audit record: it was edited", line=n, path=shown)
                claimed = rec.pop("sha256")
                if hashlib.sha256(_dumps(rec)).hexdigest() != claimed:
                    raise AuditLogError(f"{shown} line {n} was edited: its content does not match its own sha256", line=n, path=shown)
                if rec.get("prev") != prev:
                    what = "the start of the log" if n == 1 else f"line {n - 1}"
                    raise AuditLogError(
                        f"{shown} line {n} does not follow {what}: its prev hash differs "
                        f"(a line before it was changed, removed or inserted)",
                        line=n, path=shown,
                    )
                prev = hashlib.sha256(body).hexdigest()
                t = rec.get("time")
                if isinstance(t, str):
                    first = first or t
                    last = t
        return LogReport(lines=n, head=prev, first=first, last=last)

    # what is installed

    def models(self, conn: sqlite3.Connection, *, repo_id: str | None = None) -> list[InstalledModel]:
        q = """
            SELECT m.id, m.repo_id, m.ref, m.commit_sha, m.revision, m.source, m.license,
                   b.id AS bundle_id, b.name, b.channel, b.sequence, b.manifest_sha256, b.signers,
                   b.installed_at, b.installed_by,
                   (SELECT COUNT(*) FROM files f WHERE f.model_id = m.id) AS nfiles,
                   (SELECT COALESCE(SUM(size), 0) FROM files f WHERE f.model_id = m.id) AS nbytes,
                   (SELECT COUNT(*) FROM wheels w WHERE w.bundle_id = b.id) AS nwheels,
                   r.commit_sha AS ref_commit
            FROM models m JOIN bundles b ON b.id = m.bundle_id
            LEFT JOIN refs r ON r.repo_id = m.repo_id AND r.ref = m.ref
            WHERE b.state = 'active'
        """
        args: tuple[Any, ...] = ()
        if repo_id is not None:
            q += " AND m.repo_id = ?"
            args = (repo_id,)
        q += " ORDER BY m.repo_id, m.id"
        out = []
        for r in conn.execute(q, args):
            out.append(
                InstalledModel(
                    model_id=r["id"], repo_id=r["repo_id"], ref=r["ref"], commit=r["commit_sha"], revision=r["revision"],
                    source=r["source"], license=r["license"], bundle_id=r["bundle_id"], bundle=r["name"], channel=r["channel"],
                    sequence=r["sequence"], manifest_sha256=r["manifest_sha256"], signers=tuple(json.loads(r["signers"])),
                    installed_at=r["installed_at"], installed_by=r["installed_by"], current=r["ref_commit"] == r["commit_sha"],
                    files=r["nfiles"], bytes=r["nbytes"], has_wheels=r["nwheels"] > 0,
                )
            )
        return out

    def model_files(self, conn: sqlite3.Connection, model_id: int) -> list[dict[str, Any]]:
        return [
            {"path": r["path"], "sha256": r["sha256"], "size": r["size"]}
            for r in conn.execute("SELECT path, sha256, size FROM files WHERE model_id = ? ORDER BY path", (model_id,))
        ]


def _last_line(fd: int) -> bytes | None:
    """The last newline-terminated line of a file (without its newline), read from the end."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) != b"\n":
        return None
    end = size - 1
    pos = end
    while pos > 0:
        start = max(0, pos - 65536)
        block = os.pread(fd, pos - start, start)
        i = block.rfind(b"\n")
        if i >= 0:
            start += i + 1
            return os.pread(fd, end - start, start)
        pos = start
        if end - pos > MAX_AUDIT_LINE:
            raise AuditLogError(f"{AUDIT_NAME}: its last line is longer than {MAX_AUDIT_LINE} bytes", line=0, path=AUDIT_NAME)
    return os.pread(fd, end, 0)


def _chain_tail(fd: int) -> tuple[str, int]:
    """(sha256 of the last complete line or the genesis hash, bytes of a partial line dropped)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return GENESIS, 0
    dropped = 0
    if os.pread(fd, 1, size - 1) != b"\n":
        # A line cut short by a crash: drop it so the chain continues from the last whole line.
        pos = size
        keep = 0
        while pos > 0:
            start = max(0, pos - 65536)
            block = os.pread(fd, pos - start, start)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        dropped = size - keep
        os.ftruncate(fd, keep)
        if keep == 0:
            return GENESIS, dropped
    line = _last_line(fd)
    if line is None:
        return GENESIS, dropped
    return hashlib.sha256(line).hexdigest(), dropped


# -- a write, with its journal ---------------------------------------------------------------


@dataclass
class Txn:
    """One registry write: staging folder, the live paths it creates, what to do after the commit."""

    writer: Writer
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

    @property
    def reg(self) -> Registry:
        return self.writer.reg

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
            atomic_write(self.stage / JOURNAL_NAME, _dumps(self._journal()))
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

    def commit(self, fn: Callable[[sqlite3.Connection], None]) -> None:
        """The commit point: one SQLite transaction holding the rows and this txn's id."""
        conn = self.writer.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("INSERT INTO ops(txn, kind, at) VALUES (?, ?, ?)", (self.id, self.kind, now_text()))
                fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise _db_error(e, self.reg.path(DB_NAME)) from None
        self.committed = True
        crash_point("committed")

    def finish(self, audit: dict[str, Any] | None = None) -> dict[str, Any]:
        """After the commit: switch refs, write texts, delete what was freed, log, drop staging."""
        self.writer.redo(self._journal(), self.stage)
        crash_point("refs")
        rec = self.reg.audit_append({**self.audit, **(audit or {}), "txn": self.id, "result": self.result})
        crash_point("audit")
        shutil.rmtree(self.stage, ignore_errors=True)
        return rec

    def abort(self) -> None:
        """Before the commit: take back whatever reached the live tree, drop staging."""
        if self.prepared:
            self.writer.undo(self._journal())
        shutil.rmtree(self.stage, ignore_errors=True)


class Writer:
    """The registry with the lock held and the database open for writing."""

    def __init__(self, reg: Registry, conn: sqlite3.Connection) -> None:
        self.reg = reg
        self.conn = conn

    def begin(self, kind: str, audit: dict[str, Any]) -> Txn:
        """Start a write; ``intent.json`` lets recovery log an interrupted attempt."""
        tid = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(6)
        staging = self.reg.safe_dir(STAGING_DIR, create=True)
        assert staging is not None
        stage = staging / tid
        try:
            os.mkdir(stage, 0o700)
            atomic_write(stage / INTENT_NAME, _dumps({**audit, "txn": tid}))
        except OSError as e:
            raise oserror_to_airpack(e, "cannot create", str(stage)) from None
        return Txn(writer=self, kind=kind, id=tid, stage=stage, audit={**audit, "txn": tid})

    def audit(self, record: dict[str, Any]) -> dict[str, Any]:
        return self.reg.audit_append(record)

    def committed(self, txn: str) -> bool:
        return self.conn.execute("SELECT 1 FROM ops WHERE txn = ?", (txn,)).fetchone() is not None

    # recovery

    def recover(self) -> list[str]:
        """Finish committed writes and undo the others, for every staging folder a killed process left."""
        staging = self.reg.safe_dir(STAGING_DIR, create=True)
        assert staging is not None
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
            if self.committed(tid):
                if journal is not None:
                    self.redo(journal, d)
                if not self.reg.audit_has_txn(tid):
                    result = journal.get("result", "done") if journal else "done"
                    self.audit({**intent, "txn": tid, "result": result, "time": now_text(),
                                "note": "finished by recovery after the writing process stopped"})
            else:
                if journal is not None:
                    self.undo(journal)
                if intent:
                    self.audit({**intent, "txn": tid, "result": "interrupted", "time": now_text(),
                                "note": "the writing process stopped before committing; nothing was installed or removed"})
            shutil.rmtree(d, ignore_errors=True)
            done.append(tid)
        return done

    def _journal_rel(self, rel: object) -> str:
        """A path from a staging journal: only ever a safe path under hub/ or wheels/ (a journal is not trusted blindly)."""
        ok = isinstance(rel, str) and (rel.startswith(HUB_DIR + "/") or rel.startswith(WHEELS_DIR + "/"))
        if ok:
            try:
                check_relpath(rel)
            except IntegrityError:
                ok = False
        if not ok:
            raise UnsafeRegistryError(
                f"a staging journal under {self.reg.path(STAGING_DIR)} names {rel!r}, outside the registry's hub/ and wheels/",
                path=str(self.reg.path(STAGING_DIR)),
                hint="Someone edited the registry's staging folder; inspect it, then delete the folder by hand.",
            )
        assert isinstance(rel, str)
        return rel

    def undo(self, journal: dict[str, Any]) -> None:
        """Remove the live names a txn created (never following links); replaced blobs stay (same bytes)."""
        for c in reversed(journal.get("creates") or []):
            rel = self._journal_rel(c.get("path"))
            if c.get("kind") == "replace":
                continue
            parent_rel = rel.rsplit("/", 1)[0]
            if self.reg.safe_dir(parent_rel, create=False) is None:
                continue
            _remove(self.reg.path(rel))

    def redo(self, journal: dict[str, Any], stage: Path) -> None:
        """The after-commit actions, each idempotent: refs, texts, deletes, empty-folder pruning."""
        touched: set[Path] = set()
        for rel, commit in sorted((journal.get("refs") or {}).items()):
            rel = self._journal_rel(rel)
            parent = self.reg.safe_dir(rel.rsplit("/", 1)[0], create=commit is not None)
            if parent is None:
                continue
            p = self.reg.path(rel)
            if commit is None:
                _remove(p)
            else:
                if not isinstance(commit, str) or not _COMMIT.match(commit):
                    raise RegistryError("a staging journal holds a malformed commit")
                self.reg.check_plain_file(rel)
                atomic_write(p, commit.encode("ascii"), mode=FILE_MODE)
            touched.add(parent)
        for rel, text in sorted((journal.get("texts") or {}).items()):
            rel = self._journal_rel(rel)
            parent = self.reg.safe_dir(rel.rsplit("/", 1)[0], create=text is not None)
            if parent is None:
                continue
            if text is None:
                _remove(self.reg.path(rel))
            else:
                self.reg.check_plain_file(rel)
                atomic_write(self.reg.path(rel), str(text).encode("utf-8"), mode=FILE_MODE)
        trash = stage / "trash"
        for i, rel in enumerate(journal.get("deletes") or []):
            rel = self._journal_rel(rel)
            parent = self.reg.safe_dir(rel.rsplit("/", 1)[0], create=False)
            if parent is None:
                continue
            p = self.reg.path(rel)
            st = self.reg.lstat(rel)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                # Move the folder out in one rename, so a loader never sees half of it.
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
        for rel in sorted(journal.get("prune") or [], key=lambda r: -r.count("/")):
            rel = self._journal_rel(rel)
            if self.reg.safe_dir(rel, create=False) is None:
                continue
            with contextlib.suppress(OSError):
                os.rmdir(self.reg.path(rel))
        for p in touched:
            with contextlib.suppress(OSError):
                fsync_dir(p)

    # facts the install plan needs

    def live_blob(self, sha256: str) -> Path | None:
        """A live, database-referenced file holding these bytes (to hard-link instead of copying)."""
        for r in self.conn.execute(
            """SELECT DISTINCT m.repo_id FROM files f JOIN models m ON m.id = f.model_id
               JOIN bundles b ON b.id = m.bundle_id WHERE f.sha256 = ? AND b.state = 'active'""",
            (sha256,),
        ):
            rel = f"{HUB_DIR}/{repo_folder(r[0])}/blobs/{sha256}"
            if self.reg.safe_dir(rel.rsplit("/", 1)[0], create=False) is not None and self.reg.check_plain_file(rel):
                return self.reg.path(rel)
        for r in self.conn.execute(
            "SELECT DISTINCT w.filename FROM wheels w JOIN bundles b ON b.id = w.bundle_id WHERE w.sha256 = ? AND b.state = 'active'",
            (sha256,),
        ):
            rel = f"{WHEELS_DIR}/{r[0]}"
            if self.reg.check_plain_file(rel):
                return self.reg.path(rel)
        return None

    def repo_has_blob(self, repo_id: str, sha256: str) -> bool:
        row = self.conn.execute(
            """SELECT 1 FROM files f JOIN models m ON m.id = f.model_id JOIN bundles b ON b.id = m.bundle_id
               WHERE m.repo_id = ? AND f.sha256 = ? AND b.state = 'active' LIMIT 1""",
            (repo_id, sha256),
        ).fetchone()
        if row is None:
            return False
        rel = f"{HUB_DIR}/{repo_folder(repo_id)}/blobs/{sha256}"
        return self.reg.safe_dir(rel.rsplit("/", 1)[0], create=False) is not None and self.reg.check_plain_file(rel)

    def wheel_sha(self, filename: str) -> str | None:
        row = self.conn.execute(
            "SELECT w.sha256 FROM wheels w JOIN bundles b ON b.id = w.bundle_id WHERE w.filename = ? AND b.state = 'active' LIMIT 1",
            (filename,),
        ).fetchone()
        return None if row is None else str(row[0])


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


def hostname() -> str:
    try:
        return socket.gethostname()
    except OSError:
        return "?"


def audit_base(command: str, **fields: Any) -> dict[str, Any]:
    """The fields every audit line carries: when, who, where, which command, which airpack."""
    return {"time": now_text(), "user": _user(), "uid": os.getuid(), "host": hostname(), "command": command,
            "tool": f"airpack {__version__}", **fields}


def error_record(e: BaseException) -> dict[str, Any]:
    if isinstance(e, AirpackError):
        return {"type": type(e).__name__, "exit_code": e.exit_code, "message": e.message, "path": e.path}
    return {"type": type(e).__name__, "exit_code": 1, "message": str(e) or repr(e), "path": None}


