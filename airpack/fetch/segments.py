"""The segmented download engine: many files, each in byte ranges, over one budget of connections.

Why this shape: one HTTP stream per file cannot fill a fast link (the CDN
paces each connection), cannot resume part of a file cleanly, and a pool
sized by CPU count has nothing to do with the link. Here:

- ``connections`` worker threads (default 16, independent of the CPUs) take
  segments from one queue, biggest files first, so the largest file is split
  over every connection while small files (one GET each) fill the gaps.
- A file larger than one segment is cut into ranges of
  ``clamp(size / connections, min_segment, segment_size)`` bytes. Each range is
  one GET with ``Range``; the answer must be ``206`` with a ``Content-Range``
  naming exactly that range and the file's total size. A ``200`` to a range
  means the server ignores ranges: the file falls back to one stream from 0.
- Bytes are written as they arrive (the client's reads, ~64 KiB) with
  ``os.pwrite`` at their offsets into the partial file, so memory stays
  bounded by ``connections`` x a read buffer whatever the file size, and a
  cut connection loses nothing that was received.
- One in-order hasher per file hashes the contiguous prefix of completed
  segments by reading it back (from the page cache): every byte is hashed
  once, in order, SHA-256 and for plain git files the git blob SHA-1. It runs
  on whichever worker completes the segment that extends the prefix.
- Every segment's progress goes to the resume journal (``journal.py``);
  a resumed file fetches only the missing intervals and re-reads only what is
  already on disk (to hash it), never a complete file.
- Each segment is retried on its own (connection errors, timeouts, 5xx, 429,
  a 403 from the CDN: an expired signed URL) from the byte where it stopped,
  after a fresh HEAD against the Hub for a new location, with exponential
  backoff and jitter or the server's ``Retry-After`` / ``RateLimit`` reset
  (capped), at most ``retries`` times. Then the whole download stops with the
  file's name and cause; what is on disk stays journaled for the next run.

The engine knows nothing about the Hub's API: a ``Locator`` (from ``hub.py``)
gives each file's current location and the headers to send there (the token
only to the Hub's own origin).
"""

from __future__ import annotations

import email.utils
import errno
import hashlib
import math
import os
import queue
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

from .._fs import oserror_to_airpack
from ..download_defaults import (
    DEFAULT_CONNECTIONS,
    DEFAULT_RETRIES,
    DEFAULT_RETRY_BASE,
    DEFAULT_SEGMENT,
    DEFAULT_TIMEOUT,
    MAX_WAIT,
)
from ..errors import AirpackError, FetchError, IntegrityError
from ..hashing import CHUNK, FileDigest
from ..progress import Progress, ProgressTask
from .journal import DoneRecord, Journal, merge, missing

MIN_SEGMENT = 8 * 1024 * 1024
CHECKPOINT = CHUNK  # bytes of a segment in flight between two journal lines: a kill loses at most this per connection
MAX_FILE_BARS = 4  # per-file progress bars at once: the largest files in flight
FILE_BAR_MIN = 1 << 20
_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_RATELIMIT_T = re.compile(r"(?:^|[;,\s])t=(\d+)")


def git_blob_sha1_header(size: int) -> bytes:
    """What git hashes before a blob's bytes: its object id is SHA-1 over this header and the content."""
    return b"blob %d\0" % size


def range_answered(content_range: str, start: int, end: int, size: int) -> bool:
    """Whether a 206's ``Content-Range`` names exactly bytes ``start``..``end - 1`` of a ``size``-byte file."""
    m = _RANGE.match(content_range)
    return m is not None and int(m.group(1)) == start and int(m.group(2)) == end - 1 and (
        m.group(3) == "*" or int(m.group(3)) == size)


@dataclass(frozen=True)
class Location:
    """Where a file's bytes are now, and the headers to send there."""

    url: str
    headers: dict[str, str]
    hub_origin: bool  # the Hub itself (a 403 there is an answer, not an expired URL)


Locator = Callable[[], Location]


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    connections: int = DEFAULT_CONNECTIONS
    segment_size: int = DEFAULT_SEGMENT
    retries: int = DEFAULT_RETRIES
    retry_base: float = DEFAULT_RETRY_BASE
    max_wait: float = MAX_WAIT
    timeout: float = DEFAULT_TIMEOUT


@dataclass
class FileJob:
    """One file to fetch: its identity, where it goes, how to find it, what it must hash to."""

    repo_id: str
    path: str  # in the repo, for messages
    bundle_path: str  # in the bundle, for the journal's done record
    size: int
    content_id: str  # the LFS sha256, or the git blob sha1
    lfs: bool
    partial: Path
    dest: Path
    locate: Locator
    location: Location
    # -- state (under lock) --
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    hash_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    done: list[tuple[int, int]] = field(default_factory=list)
    hashed: int = 0
    gen: int = 0
    stream: bool = False
    restarted: bool = False
    resumed: int = 0
    pending: int = 0
    finished: bool = False  # hashed to the end (or given up): no more work on it
    settled: bool = False  # counted as done or failed
    abandoned: bool = False  # given up: its other ranges stop (what they wrote is still journaled)
    loc_gen: int = 0
    digest: FileDigest | None = None
    inflight: dict[int, int] = field(default_factory=dict)  # segment start -> bytes on disk up to (journaled)
    bar: ProgressTask | None = None
    _sha: Any = None
    _sha1: Any = None

    def reset_hashers(self) -> None:
        self._sha = hashlib.sha256()
        self._sha1 = None if self.lfs else hashlib.sha1(git_blob_sha1_header(self.size), usedforsecurity=False)
        self.hashed = 0

    def contiguous(self) -> int:
        end = 0
        for a, b in self.done:
            if a > end:
                break
            end = max(end, b)
        return end

    def where(self) -> str:
        return f"{self.repo_id}/{self.path}"

    def kept(self) -> int:
        """Bytes on disk and journaled: what the next run does not fetch again."""
        with self.lock:
            return sum(b - a for a, b in self.done) + sum(p - s for s, p in self.inflight.items())


@dataclass(order=True)
class _Seg:
    prio: tuple[int, int, int]
    job: FileJob = field(compare=False)
    start: int = field(compare=False)
    end: int = field(compare=False)
    gen: int = field(compare=False)
    ranged: bool = field(compare=False, default=True)


@dataclass
class Stats:
    files: int = 0
    bytes: int = 0
    resumed_bytes: int = 0
    downloaded_bytes: int = 0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


class _Retry(Exception):
    """A failure worth another try (after a fresh location), with the server's wait if it gave one."""

    def __init__(self, cause: str, wait: float | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.wait = wait


class _NoRanges(Exception):
    """The server answered 200 to a range request: it serves the whole file or nothing."""


def retry_wait(headers: Any, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: ``RateLimit`` ``t=``, else ``Retry-After`` (seconds or an HTTP date)."""
    rl = headers.get("ratelimit") if headers is not None else None
    if rl:
        m = _RATELIMIT_T.search(rl)
        if m:
            return float(m.group(1))
    ra = headers.get("retry-after") if headers is not None else None
    if not ra:
        return None
    ra = ra.strip()
    if ra.isdigit():
        return float(ra)
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff(attempt: int, base: float, cap: float, server_wait: float | None) -> float:
    """The pause before retry number ``attempt`` (1-based): the server's wish (capped), else exponential with jitter."""
    if server_wait is not None:
        return min(cap, max(0.0, server_wait))
    return float(min(cap, base * (2.0 ** (attempt - 1))) * random.uniform(0.5, 1.0))


def segment_length(size: int, opts: EngineOptions) -> int:
    """Ranges of a file: about one per connection, never smaller than MIN_SEGMENT or larger than segment_size."""
    lo = min(MIN_SEGMENT, opts.segment_size)
    return max(lo, min(opts.segment_size, math.ceil(size / max(1, opts.connections))))


class Engine:
    """Fetch a set of files over one connection budget; see the module docstring."""

    def __init__(self, opts: EngineOptions, journal: Journal, progress: Progress, overall: ProgressTask,
                 stats: Stats, *, fail_message: Callable[[FileJob, str], FetchError]) -> None:
        self.opts = opts
        self.journal = journal
        self.progress = progress
        self.overall = overall
        self.stats = stats
        self._fail_message = fail_message
        self._q: queue.PriorityQueue[_Seg] = queue.PriorityQueue()
        self._error: BaseException | None = None
        self._gave_up: list[AirpackError] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._bars = 0
        self._left = 0
        self._all_done = threading.Condition(self._lock)
        limits = httpx2.Limits(max_connections=opts.connections, max_keepalive_connections=opts.connections)
        timeout = httpx2.Timeout(opts.timeout, connect=min(opts.timeout, 30.0))
        self._http = httpx2.Client(limits=limits, timeout=timeout, follow_redirects=True)  # cross-origin: no auth header

    # -- set-up --------------------------------------------------------------------------

    def _enqueue(self, job: FileJob, idx: int) -> None:
        job.reset_hashers()
        job.done = merge(job.done)
        todo = missing(job.size, job.done)
        job.resumed = sum(b - a for a, b in job.done)
        self.stats.add(resumed_bytes=job.resumed)
        self.overall.advance(job.resumed)
        segs: list[_Seg] = []
        seg_len = segment_length(job.size, self.opts)
        whole_fresh = job.size <= seg_len and not job.done
        for a, b in todo:
            for s in range(a, b, seg_len):
                segs.append(_Seg((-job.size, idx, s), job, s, min(b, s + seg_len), job.gen, ranged=not whole_fresh))
        job.pending = len(segs)
        for seg in segs:
            self._q.put(seg)
        if not segs:  # everything is on disk already: hash it and finish
            self._q.put(_Seg((-job.size, idx, -1), job, 0, 0, job.gen, ranged=False))
            job.pending = 1

    def run(self, jobs: list[FileJob]) -> None:
        """Fetch every job into its ``dest`` (verified); raises the first fatal error after stopping the workers."""
        if not jobs:
            self._http.close()
            return
        jobs = sorted(jobs, key=lambda j: -j.size)
        for j in jobs:
            j.done = [(a, b) for a, b in self.journal.have(j.content_id, j.size)]
            if j.done and not _holds(j.partial, j.done):
                j.done = []  # the journal names bytes the partial file does not hold
            _trim(j.partial, j.size if j.done else 0)  # bytes no journal line vouches for are never kept
        self._left = len(jobs)
        for i, j in enumerate(jobs):
            self._enqueue(j, i)
        workers = [threading.Thread(target=self._worker, name=f"airpack-fetch-{n}", daemon=True)
                   for n in range(min(self.opts.connections, max(1, self._q.qsize())))]
        for w in workers:
            w.start()
        try:
            with self._all_done:
                while self._left > 0 and self._error is None:
                    self._all_done.wait(0.5)
        except BaseException as e:  # noqa: BLE001 -- Ctrl-C: stop the workers, keep what is journaled; re-raised below
            self._fail(e)
        finally:
            self._stop.set()
            for _ in workers:
                self._q.put(_Seg((1 << 62, 0, 0), jobs[0], 0, 0, -1))  # wake idle workers
            for w in workers:
                w.join()
            self._http.close()
            for j in jobs:
                if j.bar is not None:
                    j.bar.close()
        if self._error is not None:
            raise self._error
        if self._gave_up:
            raise self._gave_up[0]

    # -- workers -------------------------------------------------------------------------

    def _fail(self, e: BaseException) -> None:
        with self._all_done:
            if self._error is None:
                self._error = e
            self._stop.set()
            self._all_done.notify_all()

    def _worker(self) -> None:
        while not self._stop.is_set():
            seg = self._q.get()
            if self._stop.is_set() or seg.gen == -1:
                return
            try:
                if seg.gen != seg.job.gen or seg.job.abandoned:
                    continue  # the file started over (or was given up) since this segment was queued
                self._open_bar(seg.job)
                if seg.start >= seg.end or self._fetch_with_retries(seg):
                    self._segment_done(seg)
            except (IntegrityError, FetchError) as e:  # this file only: the others finish, then the pack stops
                self._give_up(seg.job, e)
            except BaseException as e:  # noqa: BLE001 -- a full disk, a bug: everything stops; re-raised by run()
                self._fail(e)
                return

    def _give_up(self, job: FileJob, error: AirpackError) -> None:
        """Drop one file's remaining segments (what is on disk stays journaled); the error is raised once all settle."""
        with job.lock:
            if job.settled:
                return
            job.settled = job.finished = job.abandoned = True
        with self._all_done:
            self._gave_up.append(error)
            self._retire(job)

    def _retire(self, job: FileJob) -> None:
        """One file leaves the pool (finished or given up): its bar closes and the waiters wake. ``_all_done`` is held."""
        if job.bar is not None:
            job.bar.close()
            job.bar = None
            self._bars -= 1
        self._left -= 1
        self._all_done.notify_all()

    def _open_bar(self, job: FileJob) -> None:
        with self._lock:
            if job.bar is not None or job.finished or job.size < FILE_BAR_MIN or self._bars >= MAX_FILE_BARS:
                return
            self._bars += 1
            job.bar = self.progress.task(job.path, job.size)
        job.bar.advance(job.hashed if job.stream else sum(b - a for a, b in job.done))

    def _advance(self, job: FileJob, n: int) -> None:
        self.overall.advance(n)
        if job.bar is not None:
            job.bar.advance(n)

    def _relocate(self, job: FileJob, used: int) -> None:
        """A fresh HEAD against the Hub for a new location, once per failure generation of the file."""
        with job.lock:
            if job.loc_gen != used:
                return
        loc = job.locate()
        with job.lock:
            if job.loc_gen == used:
                job.location = loc
                job.loc_gen += 1

    def _fetch_with_retries(self, seg: _Seg) -> bool:
        """Fetch one segment, retrying; True once all its bytes are on disk (False: stopped or superseded)."""
        job, pos, attempt = seg.job, seg.start, 0
        while True:
            with job.lock:
                loc, loc_gen = job.location, job.loc_gen
            try:
                try:
                    pos = self._fetch(seg, loc, pos)
                    return pos >= seg.end
                except _NoRanges:
                    if not job.stream:
                        self._restart(job, stream=True)
                        return False
                    pos = seg.start  # a stream cannot resume where the server ignores ranges: from byte 0 again
                    raise _Retry("the server ignores range requests, so the stream starts over") from None
            except _Retry as r:
                if self._stop.is_set() or seg.gen != job.gen or job.abandoned:
                    return False
                with job.lock:  # go on from the last byte written (and journaled), not from the range's start
                    pos = max(pos, job.inflight.get(seg.start, seg.start)) if not job.stream or pos else pos
                attempt += 1
                if attempt > self.opts.retries:
                    # this file's retries are spent: the other files go on, then the pack stops with its error
                    raise self._fail_message(job, f"{r.cause} (gave up after {self.opts.retries} retries)") from None
                self.stats.add(retries=1)
                time.sleep(backoff(attempt, self.opts.retry_base, self.opts.max_wait, r.wait))
                try:
                    self._relocate(job, loc_gen)
                except FetchError as e:
                    if type(e) is not FetchError:  # gated, gone: a named answer, not a hiccup
                        raise
                    # the HEAD failed too: counted as this attempt; the next one asks again

    def _fetch(self, seg: _Seg, loc: Location, pos: int) -> int:
        """GET bytes [pos, seg.end) into the partial; returns the end; raises _Retry, _NoRanges or a fatal error."""
        job = seg.job
        headers = dict(loc.headers)
        headers["accept-encoding"] = "identity"
        ranged = seg.ranged or pos > seg.start
        if ranged:
            headers["range"] = f"bytes={pos}-{seg.end - 1}" if seg.end < job.size else f"bytes={pos}-"
        try:
            with self._http.stream("GET", loc.url, headers=headers) as resp:
                self._check_answer(job, resp, loc, pos, seg.end, ranged)
                return self._write_body(seg, resp, pos)
        except httpx2.TimeoutException as e:
            raise _Retry(f"timed out ({type(e).__name__})") from None
        except httpx2.TransportError as e:
            raise _Retry(f"connection failed ({type(e).__name__})") from None
        except httpx2.HTTPError as e:
            raise _Retry(f"HTTP error ({type(e).__name__})") from None

    def _check_answer(self, job: FileJob, resp: httpx2.Response, loc: Location, pos: int, end: int, ranged: bool) -> None:
        st = resp.status_code
        if st == 429 or st >= 500 or st == 408:
            raise _Retry(f"HTTP {st}", retry_wait(resp.headers))
        if st == 403:
            body = b"" if loc.hub_origin else _capped_body(resp, 4096)
            if not loc.hub_origin or b"expired" in body.lower():
                raise _Retry("HTTP 403 from the CDN (an expired signed URL)")
            raise self._fail_message(job, "HTTP 403: the Hub refused this token for the file")
        if st == 401:
            raise self._fail_message(job, "HTTP 401: the Hub asks for a valid token (gated or private)")
        if st == 404:
            raise self._fail_message(job, "HTTP 404: the file is not there at this commit")
        if st == 416:
            raise _Retry("HTTP 416: the server refused the range")
        if ranged and st == 200:
            if pos == 0 and end == job.size:
                return  # the whole file asked for, the whole file given
            raise _NoRanges()
        if st not in (200, 206):
            raise self._fail_message(job, f"unexpected HTTP {st}")
        enc = resp.headers.get("content-encoding", "identity").lower()
        if enc not in ("", "identity"):
            raise self._fail_message(job, f"the server sent {enc}-encoded bytes although asked for identity")
        if st == 206 and not range_answered(resp.headers.get("content-range", ""), pos, end, job.size):
            raise self._fail_message(
                job, f"the CDN answered range {resp.headers.get('content-range')!r} to bytes={pos}-{end - 1} "
                f"of a {job.size}-byte file (a different file or size than the Hub lists)")
        length = resp.headers.get("content-length")
        want = end - pos
        if length is not None and length.isdigit() and int(length) != want:
            raise self._fail_message(job, f"the CDN announced {length} bytes where {want} were asked (the Hub lists "
                                          f"{job.size} bytes)")

    def _write_body(self, seg: _Seg, resp: httpx2.Response, pos: int) -> int:
        job = seg.job
        fd = self._open_partial(job)
        mark = pos
        try:
            try:
                for chunk in resp.iter_raw():  # as it arrives (~64 KiB): a cut loses nothing already received
                    if self._stop.is_set() or seg.gen != job.gen or job.abandoned:
                        break
                    if pos + len(chunk) > seg.end:
                        raise self._fail_message(job, f"the CDN sent more than the {seg.end - pos} bytes asked")
                    _pwrite_all(fd, chunk, pos)
                    pos += len(chunk)
                    self.stats.add(downloaded_bytes=len(chunk))
                    self._advance(job, len(chunk))
                    if pos - mark >= CHECKPOINT:
                        self._checkpoint(seg, pos)
                        mark = pos
            except OSError as e:
                raise oserror_to_airpack(e, "cannot write", str(job.partial)) from None
            except (httpx2.TransportError, httpx2.StreamError) as e:
                self._checkpoint(seg, pos)
                raise _Retry(f"connection lost after {pos - seg.start} of {seg.end - seg.start} bytes of a range "
                             f"({type(e).__name__})") from None
            if pos < seg.end and not self._stop.is_set() and seg.gen == job.gen and not job.abandoned:
                self._checkpoint(seg, pos)
                raise _Retry(f"the transfer ended after {pos - seg.start} of {seg.end - seg.start} bytes of a range")
            if pos >= seg.end:
                try:
                    os.fdatasync(fd)
                except OSError as e:
                    raise oserror_to_airpack(e, "cannot write", str(job.partial)) from None
            self._checkpoint(seg, pos)
        finally:
            os.close(fd)
        return pos

    def _checkpoint(self, seg: _Seg, pos: int) -> None:
        job = seg.job
        if seg.gen != job.gen:
            return
        self.journal.record_segment(job.content_id, job.size, seg.start, pos)
        with job.lock:
            if seg.gen == job.gen:
                job.inflight[seg.start] = pos

    @staticmethod
    def _open_partial(job: FileJob) -> int:
        try:
            job.partial.parent.mkdir(parents=True, exist_ok=True)
            return os.open(job.partial, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(job.partial)) from None

    # -- completion ----------------------------------------------------------------------

    def _restart(self, job: FileJob, *, stream: bool) -> None:
        """Start the file over from byte 0 (one stream if the server ignores ranges)."""
        with job.lock:
            if stream and job.stream:
                return
            job.gen += 1
            job.stream = job.stream or stream
            job.done = []
            job.inflight.clear()
            job.reset_hashers()
            job.pending = 1
            gen = job.gen
        _trim(job.partial, 0)
        self.journal.record_drop(job.content_id)
        self._q.put(_Seg((-job.size, 0, 0), job, 0, job.size, gen, ranged=False))

    def _segment_done(self, seg: _Seg) -> None:
        job = seg.job
        with job.lock:
            if seg.gen != job.gen:
                return
            if seg.end > seg.start:
                job.done = merge([*job.done, (seg.start, seg.end)])
            job.inflight.pop(seg.start, None)
            job.pending -= 1
        self._hash_forward(job)

    def _hash_forward(self, job: FileJob) -> None:
        """Hash the contiguous prefix of completed segments, on whichever worker gets the lock."""
        while True:
            if not job.hash_lock.acquire(blocking=False):
                return
            try:
                with job.lock:
                    gen, upto = job.gen, job.contiguous()
                    start = job.hashed
                if upto > start:
                    self._hash_range(job, start, upto, gen)
                with job.lock:
                    complete = job.gen == gen and job.hashed == job.size and job.pending == 0 and not job.finished
                    if complete:
                        job.finished = True
            finally:
                job.hash_lock.release()
            if complete:
                self._finish(job)
                return
            with job.lock:
                if job.gen != gen or job.contiguous() <= job.hashed or job.finished:
                    return

    def _hash_range(self, job: FileJob, start: int, end: int, gen: int) -> None:
        try:
            fd = os.open(job.partial, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise oserror_to_airpack(e, "cannot read", str(job.partial)) from None
        try:
            pos = start
            while pos < end:
                if job.gen != gen or self._stop.is_set():
                    return
                b = os.pread(fd, min(CHUNK, end - pos), pos)
                if not b:
                    raise IntegrityError(f"{job.where()}: the partial file {job.partial} is shorter than the bytes written "
                                         "into it", path=job.path)
                job._sha.update(b)
                if job._sha1 is not None:
                    job._sha1.update(b)
                pos += len(b)
                with job.lock:
                    if job.gen == gen:
                        job.hashed = pos
        except OSError as e:
            raise oserror_to_airpack(e, "cannot read", str(job.partial)) from None
        finally:
            os.close(fd)

    def _finish(self, job: FileJob) -> None:
        sha256 = job._sha.hexdigest()
        got = sha256 if job.lfs else job._sha1.hexdigest()
        if got != job.content_id:
            _unlink(job.partial)
            self.journal.record_drop(job.content_id)
            if job.resumed and not job.restarted:
                # bytes an earlier run left did not add up (a power loss, a changed partial): start over, once
                job.restarted = True
                self._advance(job, -job.size)
                with job.lock:
                    job.finished = False
                    job.resumed = 0
                self._restart(job, stream=job.stream)
                return
            kind = "sha256" if job.lfs else "git sha1"
            raise IntegrityError(
                f"{job.where()}: downloaded bytes do not match the Hub's {kind} (expected {job.content_id}, got {got}, "
                f"{job.size} bytes); the partial file was discarded",
                path=job.path,
                hint="The Hub or something between it and you served other bytes; nothing was kept. "
                     "Try again later or from another network.",
            )
        try:
            fd = os.open(job.partial, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            job.dest.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(job.partial, 0o644)
            os.replace(job.partial, job.dest)
            st = job.dest.stat()
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(job.dest)) from None
        job.digest = FileDigest(size=job.size, sha256=sha256)
        self.journal.record_done(job.content_id, DoneRecord(path=job.bundle_path, sha256=sha256, size=job.size,
                                                             mtime_ns=st.st_mtime_ns, ino=st.st_ino))
        self.stats.add(files=1, bytes=job.size)
        with job.lock:
            job.settled = True
        with self._all_done:
            self._retire(job)


def _capped_body(resp: httpx2.Response, cap: int) -> bytes:
    """At most ``cap`` bytes of an error answer's body (an untrusted server may send any amount)."""
    out = b""
    try:
        for chunk in resp.iter_raw():
            out += chunk
            if len(out) >= cap:
                break
    except httpx2.HTTPError:
        pass
    return out[:cap]


def _pwrite_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        pos += n


def _holds(partial: Path, intervals: list[tuple[int, int]]) -> bool:
    try:
        return partial.stat().st_size >= max(b for _, b in intervals)
    except OSError:
        return False


def _trim(path: Path, size: int) -> None:
    """Cut ``path`` to at most ``size`` bytes, if it exists."""
    try:
        if path.stat().st_size > size:
            os.truncate(path, size)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise oserror_to_airpack(e, "cannot write", str(path)) from None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise oserror_to_airpack(e, "cannot remove", str(path)) from None
