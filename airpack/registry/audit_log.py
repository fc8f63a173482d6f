"""The registry's audit log: append-only JSON lines, each holding the SHA-256 of the line before.

It exists so that the hash chain is written and checked in one place:
``append_record`` (under the log's own flock, dropping a line a crash cut
short), ``verify_chain`` (``airpack log verify``), and the fields every line
carries (``audit_base``, ``error_record``). Every install attempt, a refused
one too, leaves exactly one line; the callers see to the "exactly one".
"""

from __future__ import annotations

import errno
import fcntl
import getpass
import hashlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import __version__, errors
from .._fs import oserror_to_airpack
from .._json import scrub
from ..errors import AuditLogError, UnsafeRegistryError
from ..hashing import write_all
from .layout import AUDIT_NAME, FILE_MODE, Layout, now_text

MAX_AUDIT_LINE = 4 << 20
GENESIS = "0" * 64


def compact_json(obj: Any) -> bytes:
    """The bytes of one audit line (and of a staging journal): sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class LogReport:
    lines: int
    head: str
    first: str | None
    last: str | None

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, "lines": self.lines, "head_sha256": self.head, "first_time": self.first, "last_time": self.last}


# -- what every line carries -----------------------------------------------------------------


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def hostname() -> str:
    try:
        return socket.gethostname()
    except OSError:
        return "?"


def audit_base(command: str, **fields: Any) -> dict[str, Any]:
    """The fields every audit line carries: when, who, where, which command, which airpack.

    The fields are scrubbed (``_json.scrub``): a source path that is not UTF-8 is kept as ``\\xff``,
    so the staged intent and the line can always be written.
    """
    return {"time": now_text(), "user": _user(), "uid": os.getuid(), "host": hostname(), "command": command,
            "tool": f"airpack {__version__}", **scrub(fields)}


def error_record(e: BaseException) -> dict[str, Any]:
    """The audit log's error: errors.error_record's type, exit code, message and path (a bug is an InternalError)."""
    rec = errors.error_record(e)
    return {k: rec[k] for k in ("type", "exit_code", "message", "path")}


# -- writing -----------------------------------------------------------------------------------


def append_record(layout: Layout, record: dict[str, Any]) -> dict[str, Any]:
    """Append one hash-chained line under the log's own flock; a partial line left by a crash is dropped first (and noted)."""
    layout.check_plain_file(AUDIT_NAME)
    path = layout.path(AUDIT_NAME)
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
        # scrub: a name that is not UTF-8 (a folder named with byte 0xff) is recorded as \xff, never a write error.
        rec = {k: scrub(v) for k, v in record.items() if k not in ("prev", "sha256")}
        if dropped:
            rec["dropped_partial_bytes"] = dropped
        rec["prev"] = prev
        rec["sha256"] = hashlib.sha256(compact_json(rec)).hexdigest()
        write_all(fd, compact_json(rec) + b"\n")
        os.fsync(fd)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot append to", str(path)) from None
    finally:
        os.close(fd)
    return rec


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


# -- reading -----------------------------------------------------------------------------------


def has_txn(layout: Layout, txn: str, *, window: int = 4 << 20) -> bool:
    """Whether one of the log's last lines (the last ``window`` bytes) belongs to ``txn``.

    A txn's line is written under the lock, so it is among the newest; only
    refusals of processes that met the lock can follow it.
    """
    if not layout.check_plain_file(AUDIT_NAME):
        return False
    fd = os.open(layout.path(AUDIT_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - window)
        tail = os.pread(fd, size - start, start)
    finally:
        os.close(fd)
    needle = compact_json({"txn": txn})[1:-1]  # "txn":"<id>" exactly as a line holds it
    return needle in tail


def verify_chain(layout: Layout, *, visit: Callable[[dict[str, Any]], None] | None = None) -> LogReport:
    """Check every line's own hash and its link to the line before; name the first broken line.

    ``visit`` sees each line once it checked (``airpack check`` collects the
    txn ids, to hold them against the database's own record of operations).
    """
    if not layout.check_plain_file(AUDIT_NAME):
        return LogReport(lines=0, head=GENESIS, first=None, last=None)
    prev = GENESIS
    first: str | None = None
    last: str | None = None
    n = 0
    try:
        fd = os.open(layout.path(AUDIT_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:  # unreadable (permissions), or replaced by a link since the check above
        raise oserror_to_airpack(e, "cannot read", str(layout.path(AUDIT_NAME))) from None
    with open(fd, "rb") as f:
        while True:
            try:
                raw = f.readline(MAX_AUDIT_LINE + 1)
            except OSError as e:
                raise oserror_to_airpack(e, "cannot read", str(layout.path(AUDIT_NAME))) from None
            if not raw:
                break
            n += 1
            rec, prev = _check_line(raw, n, prev)
            if visit is not None:
                visit(rec)
            t = rec.get("time")
            if isinstance(t, str):
                first = first or t
                last = t
    return LogReport(lines=n, head=prev, first=first, last=last)


def _check_line(raw: bytes, n: int, prev: str) -> tuple[dict[str, Any], str]:
    """Line ``n`` (with its newline) checked against its own hash and ``prev``; returns it and its own hash."""
    shown = AUDIT_NAME
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
    if hashlib.sha256(compact_json(rec)).hexdigest() != claimed:
        raise AuditLogError(f"{shown} line {n} was edited: its content does not match its own sha256", line=n, path=shown)
    if rec.get("prev") != prev:
        what = "the start of the log" if n == 1 else f"line {n - 1}"
        raise AuditLogError(
            f"{shown} line {n} does not follow {what}: its prev hash differs "
            f"(a line before it was changed, removed or inserted)",
            line=n, path=shown,
        )
    return rec, hashlib.sha256(body).hexdigest()
