"""``Registry`` and ``Writer``: one registry folder, opened, locked, read and written.

It exists to tie the other registry modules together behind the two handles
the operations use: ``Registry.open(path)`` checks the folder, ``reg.reader()``
gives a read-only ``Database``, and ``reg.writer()`` takes the one-writer
lock, opens the database for writing and finishes or undoes any write a killed
process left (``transactions.recover``) before handing over a ``Writer``.

Readers settle first: when a killed write left something in ``.staging``,
``reader()`` takes the lock and recovers exactly as a writer would, so a
reader sees the old state or the new one, never a commit whose refs were not
switched yet. Where it cannot (the lock is held, the registry is read-only)
it says so in ``Database.pending``.

Nothing is created until something must be written: the writer of a folder
with no database answers from an empty in-memory one, and creates the real
folders and database in ``Writer.begin``; a first install that fails before
its commit removes them again, so a refusal leaves at most its audit line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fs import oserror_to_airpack
from ..errors import AirpackError, LockHeldError, NotInstalledError, UnsafeRegistryError, UsageError
from . import audit_log, transactions
from .audit_log import LogReport
from .database import Database, connect, connect_empty, db_error
from .layout import (
    AUDIT_NAME,
    DB_NAME,
    DIR_MODE,
    FILE_MODE,
    HUB_DIR,
    LOCK_NAME,
    STAGING_DIR,
    WHEELS_DIR,
    Layout,
    repo_folder,
)
from .transactions import Txn

if TYPE_CHECKING:
    from ..manifest import FileEntry


def _left_by_a_first_install(e: os.DirEntry[str]) -> bool:
    """What a failed first install may leave: its audit line (and dot-files), or an older airpack's empty hub/ and wheels/."""
    if e.name.startswith(".") or e.name == AUDIT_NAME:
        return True
    if e.name in (HUB_DIR, WHEELS_DIR) and e.is_dir(follow_symlinks=False):
        with os.scandir(e.path) as inner:
            return not any(True for _ in inner)
    return False


class Registry(Layout):
    """A registry folder. ``open`` checks it; ``writer()`` takes the lock and recovers."""

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
            try:
                with os.scandir(reg.root) as entries:
                    usable = all(_left_by_a_first_install(e) for e in entries)
            except OSError as e:
                raise oserror_to_airpack(e, "cannot read", str(p)) from None
            if not usable:
                raise UsageError(f"{p} is not empty and holds no airpack registry; choose a new or empty folder", path=str(p))
        return reg

    # what the database says the folder holds

    def live_blob(self, conn: Database, sha256: str) -> Path | None:
        """A live, database-referenced plain file holding these bytes (to hard-link instead of copying)."""
        for repo in conn.repos_holding(sha256):
            rel = f"{HUB_DIR}/{repo_folder(repo)}/blobs/{sha256}"
            if self.plain_file_under(rel):
                return self.path(rel)
        for filename in conn.wheel_files_holding(sha256):
            rel = f"{WHEELS_DIR}/{filename}"
            if self.check_plain_file(rel):
                return self.path(rel)
        return None

    def copies_of(self, conn: Database, sha256: str) -> list[Path]:
        """Every path the database says holds these bytes (each repo's blob, each wheelhouse file), checked for nothing:
        a delta's install hashes each one itself, so a link or a missing file is named there, not refused here."""
        rels = [f"{HUB_DIR}/{repo_folder(r)}/blobs/{sha256}" for r in conn.repos_holding(sha256)]
        rels += [f"{WHEELS_DIR}/{fn}" for fn in conn.wheel_files_holding(sha256)]
        return [self.path(r) for r in sorted(set(rels))]

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
            now = self.lstat(LOCK_NAME)
            if now is None or (now.st_dev, now.st_ino) != (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                # The holder of a registry with no database removed the lock file as it finished (see below).
                raise LockHeldError(f"registry {self.root} was being written by another airpack process just now; retry",
                                    path=str(path))
            os.fchmod(fd, FILE_MODE)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                    if not os.path.lexists(self.path(DB_NAME)):
                        os.unlink(path)  # still no registry here: leave no lock file behind (a later locker sees the inode change)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # the database

    def connect(self, *, write: bool) -> Database:
        return connect(self, write=write)

    @contextlib.contextmanager
    def reader(self, *, settle: bool = True) -> Iterator[Database]:
        """A read-only connection, after settling any write a killed process left (``settle``; a dry run skips it)."""
        pending = self.settle() if settle else None
        conn = self.connect(write=False)
        conn.pending = pending
        try:
            yield conn
        except sqlite3.Error as e:
            raise db_error(e, self.path(DB_NAME)) from None
        finally:
            conn.close()

    def settle(self) -> str | None:
        """Finish or undo an interrupted write before a read; None when nothing is pending, else why it could not be done."""
        try:
            with os.scandir(self.path(STAGING_DIR)) as it:
                busy = any(True for _ in it)
        except OSError:
            busy = False
        if not busy or not self.path(DB_NAME).exists():
            return None
        try:
            with self.writer():
                pass
        except LockHeldError:
            return "another airpack process is writing this registry right now; what is shown may change when it finishes"
        except AirpackError as e:
            return (f"a write was interrupted and could not be finished here ({e.message}); run any airpack write command "
                    "(install, remove, rollback) where the registry is writable to finish it")
        return None

    @contextlib.contextmanager
    def writer(self) -> Iterator[Writer]:
        """Take the lock, open the database, finish or undo any interrupted write, then hand over."""
        self.check_layout()
        with self.locked():
            fresh = not os.path.lexists(self.path(DB_NAME))
            w = Writer(self, connect_empty(self) if fresh else self.connect(write=True), fresh=fresh)
            try:
                try:
                    if not fresh:
                        w.recover()
                    yield w
                except sqlite3.Error as e:
                    raise db_error(e, self.path(DB_NAME)) from None
            except BaseException:
                w.undo_creation()
                raise
            finally:
                w.conn.close()

    # the audit log

    def audit_append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append one hash-chained line (``audit_log.append_record``)."""
        return audit_log.append_record(self, record)

    def verify_log(self) -> LogReport:
        """Check every line's own hash and its link to the line before; name the first broken line."""
        return audit_log.verify_chain(self)


class Writer:
    """The registry with the lock held and the database open for writing."""

    def __init__(self, reg: Registry, conn: Database, *, fresh: bool = False) -> None:
        self.reg = reg
        self.conn = conn
        self.fresh = fresh  # no registry.db yet: ``conn`` is an empty in-memory one until ``begin``
        self._existed: set[str] | None = None  # top-level names before this writer created the registry

    def begin(self, kind: str, audit: dict[str, Any]) -> Txn:
        """Start a write (``transactions.begin``); in a new registry, first create its folders and database."""
        if self.fresh:
            self._create()
        return transactions.begin(self.reg, self.conn, kind, audit)

    def _create(self) -> None:
        """The first write into a new registry: now, and not before, the folders and the database file appear."""
        try:
            self._existed = set(os.listdir(self.reg.root))
        except OSError as e:
            raise oserror_to_airpack(e, "cannot read", str(self.reg.root)) from None
        for d in (HUB_DIR, WHEELS_DIR, STAGING_DIR):
            self.reg.safe_dir(d, create=True)
        conn = self.reg.connect(write=True)
        self.conn.close()
        self.conn = conn
        self.fresh = False

    def undo_creation(self) -> None:
        """A first install that failed before its commit: remove what it created, so at most its audit line remains."""
        if self._existed is None:
            return
        try:
            if self.conn.any_committed():
                return
        except sqlite3.Error:
            pass  # a database that cannot even answer this holds no commit worth keeping
        self.conn.close()
        try:
            names = set(os.listdir(self.reg.root)) - self._existed - {AUDIT_NAME, LOCK_NAME}
        except OSError:
            return
        for name in sorted(names):
            p = self.reg.path(name)
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.lstat(p).st_mode):
                    shutil.rmtree(p)
                else:
                    os.unlink(p)
        self._existed = None

    def audit(self, record: dict[str, Any]) -> dict[str, Any]:
        return self.reg.audit_append(record)

    def recover(self) -> list[str]:
        """Finish committed writes and undo the others (``transactions.recover``)."""
        return transactions.recover(self.reg, self.conn)

    # facts the install plan needs

    def live_blob(self, sha256: str) -> Path | None:
        """A live, database-referenced file holding these bytes (to hard-link instead of copying)."""
        return self.reg.live_blob(self.conn, sha256)

    def repo_has_blob(self, repo_id: str, sha256: str) -> bool:
        if not self.conn.repo_holds(repo_id, sha256):
            return False
        return self.reg.plain_file_under(f"{HUB_DIR}/{repo_folder(repo_id)}/blobs/{sha256}")


class RegistryCopies:
    """The registry's copies of a file's bytes, as its database names them (``verify --registry``, install of a delta).

    It answers ``ops.verify.HostCopies``: the pipeline hashes each path itself
    and refuses a missing, changed or linked one, so nothing here is trusted.
    """

    def __init__(self, reg: Registry, conn: Database) -> None:
        self.reg = reg
        self.conn = conn

    @property
    def root(self) -> Path:
        return self.reg.root

    def copies(self, entry: FileEntry) -> list[Path]:
        return self.reg.copies_of(self.conn, entry.sha256)
