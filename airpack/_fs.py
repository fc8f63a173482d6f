"""Filesystem helpers every layer shares: atomic writes, capped reads, path rules.

Paths inside a bundle come from untrusted manifests and tar headers, so the
rules for what a safe relative path is live here, once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import AirpackError, IntegrityError, UnsafePathError, from_oserror

MAX_PATH_BYTES = 1024
MAX_COMPONENT_BYTES = 255
MAX_PATH_DEPTH = 32


def check_relpath(name: object) -> str:
    """Return ``name`` if it is a safe, normalised, relative POSIX path; raise otherwise."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"unsafe path {name!r}: not a non-empty string", path=str(name))
    if "\x00" in name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise UnsafePathError(f"unsafe path {name!r}: control character", path=name)
    if "\\" in name:
        raise UnsafePathError(f"unsafe path {name!r}: backslash", path=name)
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"unsafe path {name!r}: absolute", path=name)
    if len(name.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise UnsafePathError(f"unsafe path {name[:60]!r}...: longer than {MAX_PATH_BYTES} bytes", path=name)
    parts = name.split("/")
    if len(parts) > MAX_PATH_DEPTH:
        raise UnsafePathError(f"unsafe path {name!r}: deeper than {MAX_PATH_DEPTH}", path=name)
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePathError(f"unsafe path {name!r}: empty, '.' or '..' component", path=name)
        if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            raise UnsafePathError(f"unsafe path {name!r}: component too long", path=name)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(f"unsafe path {name!r}: not valid UTF-8", path=name) from None
    if unicodedata.normalize("NFC", name) != name:
        raise UnsafePathError(f"unsafe path {name!r}: not in Unicode NFC form", path=name)
    return name


def collision_key(name: str) -> str:
    """The key under which two names would land on the same file on some filesystem."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFD", name).casefold())


class NameSet:
    """Names seen so far; ``add`` refuses one equal to an earlier one, byte for byte or up to case and Unicode form.

    A stream (a tar) is checked member by member with it, before a byte of the
    member is used; ``check_no_collisions`` runs it over a whole list.
    """

    def __init__(self, names: Iterable[str] = (), *, what: str = "path", where: str = "") -> None:
        self.seen: dict[str, str] = {}
        self.what = what
        self.where = where
        for name in names:
            self.add(name)

    def add(self, name: str) -> None:
        key = collision_key(name)
        other = self.seen.get(key)
        if other is not None:
            why = f"duplicate {self.what}" if other == name else f"collides with {other!r} (case or Unicode)"
            raise UnsafePathError(f"unsafe {self.what} {name!r}{self.where}: {why}", path=name)
        self.seen[key] = name

    def check_prefixes(self) -> None:
        """No name may be both a file and a folder of another (``a`` and ``a/b``)."""
        prefixes = {"/".join(key.split("/")[:i]) for key in self.seen for i in range(1, key.count("/") + 1)}
        for key, name in self.seen.items():
            if key in prefixes:
                raise UnsafePathError(f"unsafe {self.what} {name!r}{self.where}: is both a file and a folder", path=name)


def check_no_collisions(names: Iterable[str]) -> None:
    """Refuse duplicate names, names equal up to case or Unicode normalisation, and a name that is also a folder."""
    NameSet(names, what="path").check_prefixes()


def open_regular_nofollow(path: Path, *, display: str | None = None) -> int:
    """Open ``path`` read-only without following a final symlink; must be a plain file with one link."""
    shown = display or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f"unsafe path {shown!r}: symbolic link", path=shown) from None
        raise from_oserror(e, "cannot read", shown) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafePathError(f"unsafe path {shown!r}: not a regular file", path=shown)
    if st.st_nlink > 1:
        os.close(fd)
        raise UnsafePathError(f"unsafe path {shown!r}: hard link ({st.st_nlink} links)", path=shown)
    return fd


def read_capped(path: Path, cap: int, *, display: str | None = None, what: str = "file") -> bytes:
    """Read a small untrusted file, refusing it when it is larger than ``cap`` bytes."""
    shown = display or str(path)
    fd = open_regular_nofollow(path, display=shown)
    with os.fdopen(fd, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise IntegrityError(f"{what} {shown} is larger than the {cap}-byte limit", path=shown)
    return data


def walk_bundle(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Yield (relative POSIX path, lstat) of every non-directory entry under ``root``.

    Symlinks are never followed; whatever is not a directory is yielded so the
    caller can refuse links, devices and sockets by name.
    """
    stack = [("", root)]
    while stack:
        rel, here = stack.pop()
        with os.scandir(here) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            relname = f"{rel}{entry.name}"
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                stack.append((relname + "/", Path(entry.path)))
            else:
                yield relname, st


def describe_mode(st: os.stat_result) -> str | None:
    """Return why an entry is not a plain single-link file, or None if it is one."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    if st.st_nlink > 1:
        return f"hard link ({st.st_nlink} links)"
    return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def oserror_to_airpack(e: OSError, what: str, path: str) -> AirpackError:
    """The named error for an OSError at ``path`` (the one mapping is ``errors.from_oserror``)."""
    return from_oserror(e, what, path)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
        tmp_name = None
        fsync_dir(path.parent)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot write", str(path)) from None
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
