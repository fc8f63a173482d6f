"""Streamed SHA-256 of files, in parallel, in constant memory.

hashlib releases the GIL while it hashes large buffers, so threads give real
parallelism across files; each worker reuses one fixed buffer, so memory does
not grow with file size or bundle size.

Copying is hashing too: ``copy_then_hash`` (install's copy into staging)
hashes each chunk as read back from the copy, and ``copy_local`` checks a
copy of the registry's own bytes. ``write_all`` is the one "write the whole
buffer" loop.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ._fs import open_regular_nofollow, oserror_to_airpack
from .errors import IntegrityError

CHUNK = 1 << 20  # 1 MiB: large enough that hashlib drops the GIL, small enough for constant memory

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str


def default_workers() -> int:
    """One hashing thread per CPU this process may run on (taskset/cpuset aware), 2 to 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 2
    return max(2, min(8, cpus))


def hash_fd(fd: int, *, on_bytes: Callable[[int], None] | None = None, limit: int | None = None) -> FileDigest:
    """Hash from ``fd`` to its end (or to ``limit`` bytes plus one, to detect growth)."""
    return copy_and_hash(fd, None, on_bytes=on_bytes, limit=limit)


def hash_file(path: Path, *, on_bytes: Callable[[int], None] | None = None, display: str | None = None) -> FileDigest:
    """SHA-256 of a plain file, refusing symlinks and hard links."""
    fd = open_regular_nofollow(Path(path), display=display)
    try:
        return hash_fd(fd, on_bytes=on_bytes)
    finally:
        os.close(fd)


def parallel_map(fn: Callable[[T], R], items: Sequence[T] | Iterable[T], *, workers: int | None = None) -> list[R]:
    """Map ``fn`` over ``items`` on a thread pool, keeping order; the first exception propagates."""
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        futures = [pool.submit(fn, i) for i in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def copy_and_hash(
    src_fd: int,
    dst_fd: int | None,
    *,
    on_bytes: Callable[[int], None] | None = None,
    limit: int | None = None,
) -> FileDigest:
    """Copy ``src_fd`` to ``dst_fd`` (or nowhere) and hash exactly the bytes written (each byte read once)."""
    write = None if dst_fd is None else (lambda chunk: write_all(dst_fd, chunk))
    return stream_and_hash(lambda view: os.readv(src_fd, [view]), write=write, on_bytes=on_bytes, limit=limit)


def stream_and_hash(
    readinto: Callable[[memoryview], int],
    *,
    write: Callable[[memoryview], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    limit: int | None = None,
) -> FileDigest:
    """The one hashing loop: read chunks until the end, hash each, hand it to ``write``; stop past ``limit`` bytes.

    ``readinto`` fills a view and returns how many bytes it put there (0 at the
    end): a file descriptor, a tar member, an HTTP body. Stopping one byte past
    ``limit`` is how a file that grew is told from one of the signed size
    without reading all of it.
    """
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    size = 0
    while True:
        n = readinto(view)
        if n == 0:
            break
        chunk = view[:n]
        h.update(chunk)
        if write is not None:
            write(chunk)
        size += n
        if on_bytes is not None:
            on_bytes(n)
        if limit is not None and size > limit:
            break
    return FileDigest(size=size, sha256=h.hexdigest())


def write_all(fd: int, data: memoryview | bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- copying while hashing the copy ---------------------------------------------------------------

COPY_STEP = 8 << 20
# Errors that mean "this kernel or filesystem pair cannot copy in the kernel": use the next way down.
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def copy_then_hash(src: int, dst: int, *, limit: int, on_bytes: Callable[[int], None] | None = None,
                   on_chunk: Callable[[memoryview], None] | None = None) -> FileDigest:
    """Copy ``src`` to ``dst`` chunk by chunk, hashing each chunk as read back from ``dst``: the copy is what is hashed.

    The kernel copies (``copy_file_range``, else ``sendfile``; plain reads and
    writes where neither works), so each byte of the medium is read once and
    never crosses into Python; the chunk just written is then read back from
    the page cache and hashed. A medium that serves other bytes than at verify
    time gives another digest. Stops past ``limit`` bytes, so a file that grew
    is seen without copying all of it. ``dst`` must be open for reading too.
    ``on_chunk`` sees each chunk exactly as hashed (a safetensors header is
    taken from it).
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
            write_all(dst, view[:n])
        if n == 0:
            break
        if way != "read":
            _read_back(dst, view[:n], off)
        h.update(view[:n])
        if on_chunk is not None:
            on_chunk(view[:n])
        off += n
        if on_bytes is not None:
            on_bytes(n)
    return FileDigest(size=off, sha256=h.hexdigest())


def _read_back(fd: int, into: memoryview, off: int) -> None:
    """Fill ``into`` with the bytes of ``fd`` at ``off`` (what was just written there)."""
    got = 0
    n = len(into)
    while got < n:
        r = os.preadv(fd, [into[got:n]], off + got)
        if r == 0:
            raise OSError(errno.EIO, "the staged copy is shorter than what was written")
        got += r


class Writeback:
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


def copy_local(src: Path, dst: Path, *, size: int, sha256: str, mode: int = 0o644) -> None:
    """Copy a file the registry holds to a new name where a hard link is refused, checking it holds ``sha256``."""
    try:
        sfd = open_regular_nofollow(src) if not os.path.samefile(src.parent, dst.parent) else os.open(src, os.O_RDONLY)
        try:
            dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
            try:
                d = copy_and_hash(sfd, dfd, limit=size)
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot write", str(dst)) from None
    if d.sha256 != sha256:
        raise IntegrityError(f"registry blob {src} does not hold the bytes its name says", path=str(src))
