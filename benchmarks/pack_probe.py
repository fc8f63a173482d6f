"""What the pack benchmark measures about a process from outside it, with no tracing and no help from the code under test.

- ``run_probed``: runs a command in a fresh process and reports its wall time,
  exit code, peak RSS (``wait4`` rusage of exactly that child) and its I/O
  counters from ``/proc/PID/io`` (``rchar``: every byte it read, sockets and
  files; ``wchar``: every byte it wrote), read while the process is a zombie so
  the figures cover all its threads until the last one. With ``kill_at`` it
  SIGKILLs the process once it has written that many bytes: the honest
  "interrupted half way" that a power cut or an OOM kill leaves behind.
- ``evict`` and ``resident_bytes``: to tell whether a resumed run read a file
  that was already complete, drop that file from the page cache before the
  run (``posix_fadvise DONTNEED``) and ask ``mincore`` afterwards how much of
  it came back: every byte read, by any path, is a byte in the cache again
  (readahead rounds up a little), and the run's ``read_bytes`` (from storage)
  counts the same reads. atime is no evidence (relatime).
- ``served_bytes``: bytes the servers say they sent, from nginx's access log
  and the test Hub's request log (both one JSON object per request).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Run:
    """One finished (or killed) process, as seen from outside."""

    seconds: float
    returncode: int
    max_rss: int  # bytes
    rchar: int  # bytes read by any means (network and files)
    wchar: int  # bytes written by any means
    read_bytes: int  # bytes it made the kernel read from storage (page cache misses)
    killed: bool
    stdout: str
    stderr: str

    def json_doc(self) -> dict[str, object] | None:
        """The last line of stdout that parses as a JSON object (``--json`` output), if any."""
        for line in reversed(self.stdout.strip().splitlines()):
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    return doc
        with contextlib.suppress(ValueError):
            doc = json.loads(self.stdout)
            if isinstance(doc, dict):
                return doc
        return None


def proc_io(pid: int) -> dict[str, int]:
    """``/proc/PID/io`` as a dict (empty where the kernel does not offer it)."""
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        with contextlib.suppress(ValueError):
            out[k.strip()] = int(v)
    return out


def _exited(pid: int) -> bool:
    """True once the child has exited; it stays a zombie (WNOWAIT) so /proc/PID/io can still be read."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def run_probed(cmd: Sequence[str], *, env: Mapping[str, str], cwd: Path, logs: Path, kill_at: int | None = None,
               kill_when: Callable[[int], bool] | None = None, poll: float = 0.002) -> Run:
    """Run ``cmd``; with ``kill_at``, SIGKILL it as soon as it has written ``kill_at`` bytes (``wchar``)
    and ``kill_when(wchar)`` (if given) holds."""
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / "stdout", logs / "stderr"
    killed = False
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t = time.perf_counter()
        p = subprocess.Popen(list(cmd), env=dict(env), cwd=cwd, stdout=out, stderr=err)
        if kill_at is None:
            os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
        else:
            while not _exited(p.pid):
                wrote = proc_io(p.pid).get("wchar", 0)
                if wrote >= kill_at and (kill_when is None or kill_when(wrote)):
                    os.kill(p.pid, signal.SIGKILL)
                    killed = True
                    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
                    break
                time.sleep(poll)
        seconds = time.perf_counter() - t
        io = proc_io(p.pid)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    return Run(seconds=seconds, returncode=p.returncode, max_rss=usage.ru_maxrss * 1024, rchar=io.get("rchar", -1),
               wchar=io.get("wchar", -1), read_bytes=io.get("read_bytes", -1), killed=killed, stdout=out_path.read_text(errors="replace"),
               stderr=err_path.read_text(errors="replace"))


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def resident_bytes(path: Path) -> int:
    """How much of the file is in the page cache now (mincore), in bytes."""
    size = path.stat().st_size
    if size == 0:
        return 0
    libc = _libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path} failed")
        try:
            vec = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path} failed")
            return min(size, sum(b & 1 for b in vec.raw) * mmap.PAGESIZE)
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def evict(path: Path) -> int:
    """Drop the file's pages from the page cache (fsync first: only clean pages can go); what stayed, in bytes.

    Neither changes the file's bytes, size, mtime or inode, so a resume
    journal's record of the file still holds.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_bytes(path)


def _json_lines(path: Path, since: int, until: int | None) -> Iterator[dict[str, object]]:
    with open(path, "rb") as f:
        f.seek(since)
        data = f.read() if until is None else f.read(max(0, until - since))
    for line in data.splitlines():
        with contextlib.suppress(ValueError):
            d = json.loads(line)
            if isinstance(d, dict):
                yield d


def _sent(d: Mapping[str, object]) -> int:
    v = d.get("sent")
    return v if isinstance(v, int) else 0


def served_bytes(nginx_log: Path | None, hub_log: Path | None, *, since: tuple[int, int] = (0, 0),
                 until: tuple[int, int] | None = None) -> int | None:
    """Body bytes the CDN (nginx) and the Hub (its resolve-cache/resolve GETs) sent between two log offsets.

    Both logs hold one JSON object per request with ``method`` and ``sent``
    (nginx's ``$body_bytes_sent``, written when the request ends: a request cut
    by a SIGKILL is logged with what nginx had handed to the socket). None when
    neither log exists. Only GETs of file bytes count, not the Hub's API answers.
    """
    total, found = 0, False
    if nginx_log is not None and nginx_log.exists():
        found = True
        total += sum(_sent(d) for d in _json_lines(nginx_log, since[0], until and until[0]) if d.get("method") == "GET")
    if hub_log is not None and hub_log.exists():
        found = True
        for d in _json_lines(hub_log, since[1], until and until[1]):
            if d.get("method") == "GET" and d.get("file") and (d.get("origin") == "hub" or nginx_log is None):
                total += _sent(d)
    return total if found else None


def log_offsets(nginx_log: Path | None, hub_log: Path | None) -> tuple[int, int]:
    """The current ends of both logs, to count only what a later run adds.

    Servers write a request's line after its last byte, which the client may
    already have read: wait until neither log has grown for a moment (3 s at most).
    """
    def size(p: Path | None) -> int:
        try:
            return p.stat().st_size if p is not None else 0
        except OSError:
            return 0
    now, deadline = (size(nginx_log), size(hub_log)), time.monotonic() + 3
    while time.monotonic() < deadline:
        time.sleep(0.2)
        later = (size(nginx_log), size(hub_log))
        if later == now:
            break
        now = later
    return now
