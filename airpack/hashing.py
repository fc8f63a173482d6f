"""Streamed SHA-256 of files, in parallel, in constant memory.

hashlib releases the GIL while it hashes large buffers, so threads give real
parallelism across files; each worker reuses one fixed buffer, so memory does
not grow with file size or bundle size.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ._fs import open_regular_nofollow

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
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    size = 0
    while True:
        n = os.readv(src_fd, [view])
        if n == 0:
            break
        chunk = view[:n]
        h.update(chunk)
        if dst_fd is not None:
            written = 0
            while written < n:
                written += os.write(dst_fd, chunk[written:])
        size += n
        if on_bytes is not None:
            on_bytes(n)
        if limit is not None and size > limit:
            break
    return FileDigest(size=size, sha256=h.hexdigest())
