"""``Registry`` and ``Writer``: one registry folder, opened, locked, read and written.

It exists to tie the other registry modules together behind the two handles
the operations use: ``Registry.open(path)`` checks the folder, ``reg.reader()``
gives a read-only ``Database``, and ``reg.writer()`` takes the one-writer
lock, opens the database for writing and finishes or undoes any write a killed
process left (``transactions.recover``) before handing over a ``Writer``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._fs import oserror_to_airpack
from ..errors import LockHeldError, NotInstalledError, UnsafeRegistryError, UsageError
from . import audit_log, transactions
from .audit_log import LogReport
from .database import Database, connect, db_error
from .layout import DB_NAME, DIR_MODE, FILE_MODE, HUB_DIR, LOCK_NAME, WHEELS_DIR, Layout, repo_folder
from .transactions import Txn


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
            if any(not e.name.startswith(".") for e in reg.root.iterdir()):
                raise UsageError(f"{p} is not empty and holds no airpack registry; choose a new or empty folder", path=str(p))
        return reg

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

    def connect(self, *, write: bool) -> Database:
        return connect(self, write=write)

    @contextlib.contextmanager
    def reader(self) -> Iterator[Database]:
        conn = self.connect(write=False)
        try:
            yield conn
        except sqlite3.Error as e:
            raise db_error(e, self.path(DB_NAME)) from None
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
                raise db_error(e, self.path(DB_NAME)) from None
            finally:
                conn.close()

    # the audit log

    def audit_append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append one hash-chained line (``audit_log.append_record``)."""
        return audit_log.append_record(self, record)

    def verify_log(self) -> LogReport:
        """Check every line's own hash and its link to the line before; name the first broken line."""
        return audit_log.verify_chain(self)


class Writer:
    """The registry with the lock held and the database open for writing."""

    def __init__(self, reg: Registry, conn: Database) -> None:
        self.reg = reg
        self.conn = conn

    def begin(self, kind: str, audit: dict[str, Any]) -> Txn:
        """Start a write (``transactions.begin``)."""
        return transactions.begin(self.reg, self.conn, kind, audit)

    def audit(self, record: dict[str, Any]) -> dict[str, Any]:
        return self.reg.audit_append(record)

    def recover(self) -> list[str]:
        """Finish committed writes and undo the others (``transactions.recover``)."""
        return transactions.recover(self.reg, self.conn)

    # facts the install plan needs

    def live_blob(self, sha256: str) -> Path | None:
        """A live, database-referenced file holding these bytes (to hard-link instead of copying)."""
        for repo in self.conn.repos_holding(sha256):
            rel = f"{HUB_DIR}/{repo_folder(repo)}/blobs/{sha256}"
            if self.reg.plain_file_under(rel):
                return self.reg.path(rel)
        for filename in self.conn.wheel_files_holding(sha256):
            rel = f"{WHEELS_DIR}/{filename}"
            if self.reg.check_plain_file(rel):
                return self.reg.path(rel)
        return None

    def repo_has_blob(self, repo_id: str, sha256: str) -> bool:
        if not self.conn.repo_holds(repo_id, sha256):
            return False
        return self.reg.plain_file_under(f"{HUB_DIR}/{repo_folder(repo_id)}/blobs/{sha256}")
