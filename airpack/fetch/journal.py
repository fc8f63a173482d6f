"""The resume journal of Hub downloads: which bytes of which partial file are on disk, which files are done.

It lives in the pack's work folder (``.airpack-staging/hub/journal.jsonl``)
beside the partial files (``<content id>.part``) and goes away with it once
the bundle is signed. It is JSON lines, appended to while downloading:

- ``{"v": 1, "id": CID, "size": N, "seg": [START, END]}``: bytes [START, END)
  of ``CID.part`` are on disk. Written after ``pwrite`` returned (a killed
  process loses nothing the kernel already holds) at least every
  ``segments.CHECKPOINT`` bytes (1 MiB) of a segment in flight and when a segment ends or fails;
  the line that ends a segment is written after ``fdatasync`` of the partial,
  so a power loss also keeps completed segments.
- ``{"v": 1, "id": CID, "size": N, "done": {"path": P, "sha256": H, "mtime_ns": T, "ino": I}}``:
  the file P of the bundle was verified against the Hub's digest (CID) and
  renamed into place. On resume a file whose size, mtime and inode still
  match is accepted without reading a byte; anything else is hashed again.
- ``{"v": 1, "id": CID, "drop": true}``: forget CID (its partial failed its digest).

Each run compacts the journal at its first write (one ``seg`` line per
interval, rewritten atomically; a dry run writes nothing). The journal is local but may be damaged: a line
over ``MAX_LINE`` bytes, malformed JSON, an unknown field or a wrong type
makes the whole journal ignored (with a warning), and every file is then
judged by hash only and every partial file fetched again. A last line
without its newline is what a kill mid-write leaves: it alone is dropped.
The journal is a hint that saves work, never trust: every byte is still
hashed against the Hub's digest before a file counts as done.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._fs import oserror_to_airpack

JOURNAL_NAME = "journal.jsonl"
MAX_LINE = 1024
MAX_JOURNAL_BYTES = 256 * 1024 * 1024
_CID = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class JournalDamaged(ValueError):
    """The journal cannot be read as written by airpack: it is ignored."""


@dataclass(frozen=True)
class DoneRecord:
    """A file verified and put in place by an earlier run, with what it looked like then."""

    path: str
    sha256: str
    size: int
    mtime_ns: int
    ino: int


@dataclass
class _Entry:
    size: int
    intervals: list[tuple[int, int]] = field(default_factory=list)
    done: DoneRecord | None = None


def merge(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping, non-empty intervals covering the same bytes."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def missing(size: int, have: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The intervals of [0, size) not covered by ``have``."""
    out: list[tuple[int, int]] = []
    pos = 0
    for a, b in merge(have):
        if a > pos:
            out.append((pos, min(a, size)))
        pos = max(pos, b)
    if pos < size:
        out.append((pos, size))
    return [(a, b) for a, b in out if b > a]


def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 1 << 62:
        raise JournalDamaged(f"{what} is not a non-negative integer")
    return v


def _parse_line(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE:
        raise JournalDamaged("a line is longer than airpack writes")
    try:
        doc = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        raise JournalDamaged("a line is not JSON") from None
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise JournalDamaged("a line is not a version 1 record")
    keys = set(doc)
    if not isinstance(doc.get("id"), str) or not _CID.match(doc["id"]):
        raise JournalDamaged("a line names no content id")
    if keys == {"v", "id", "drop"} and doc["drop"] is True:
        return doc
    if keys not in ({"v", "id", "size", "seg"}, {"v", "id", "size", "done"}):
        raise JournalDamaged(f"a line has unexpected fields {sorted(keys)}")
    _int(doc["size"], "size")
    if "seg" in doc:
        seg = doc["seg"]
        if not isinstance(seg, list) or len(seg) != 2:
            raise JournalDamaged("a segment is not [start, end]")
        a, b = _int(seg[0], "segment start"), _int(seg[1], "segment end")
        if a > b or b > doc["size"]:
            raise JournalDamaged("a segment lies outside its file")
        return doc
    done = doc["done"]
    if not isinstance(done, dict) or set(done) != {"path", "sha256", "mtime_ns", "ino"}:
        raise JournalDamaged("a done record has unexpected fields")
    if not isinstance(done["path"], str) or not done["path"] or len(done["path"]) > 512:
        raise JournalDamaged("a done record names no path")
    if not isinstance(done["sha256"], str) or not _HEX64.match(done["sha256"]):
        raise JournalDamaged("a done record has no sha256")
    _int(done["mtime_ns"], "mtime")
    _int(done["ino"], "inode")
    return doc


def parse(data: bytes) -> dict[str, _Entry]:
    """The journal's state; raises JournalDamaged for anything airpack would not have written."""
    lines = data.split(b"\n")
    if lines and lines[-1] != b"":
        lines = lines[:-1]  # a kill mid-write: the unfinished last line only
    entries: dict[str, _Entry] = {}
    for line in lines:
        if not line:
            continue
        doc = _parse_line(line)
        cid = doc["id"]
        if "drop" in doc:
            entries.pop(cid, None)
            continue
        e = entries.get(cid)
        if e is None or e.size != doc["size"]:
            e = entries[cid] = _Entry(size=doc["size"])
        if "seg" in doc:
            e.intervals.append((doc["seg"][0], doc["seg"][1]))
        else:
            d = doc["done"]
            e.done = DoneRecord(path=d["path"], sha256=d["sha256"], size=doc["size"], mtime_ns=d["mtime_ns"], ino=d["ino"])
    for e in entries.values():
        e.intervals = merge(e.intervals)
    return entries


class Journal:
    """The journal of one work folder: read (and compacted) once, appended to from any thread."""

    def __init__(self, folder: Path, *, warn: Any = None) -> None:
        self.path = folder / JOURNAL_NAME
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.warning: str | None = None
        self._entries: dict[str, _Entry] = {}
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_JOURNAL_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as e:
            raise oserror_to_airpack(e, "cannot read", str(self.path)) from None
        try:
            if len(data) > MAX_JOURNAL_BYTES:
                raise JournalDamaged(f"it is larger than {MAX_JOURNAL_BYTES} bytes")
            self._entries = parse(data)
        except JournalDamaged as e:
            self.warning = (f"warning: ignoring the resume journal {self.path} ({e}); finished files are checked by hash "
                            "and unfinished ones fetched again")
            self._entries = {}  # rewritten without them at the first write, so no later run reads them again

    # -- reading -----------------------------------------------------------------------

    def have(self, cid: str, size: int) -> list[tuple[int, int]]:
        """The byte intervals of ``cid``'s partial file that earlier runs wrote (none if the size differs)."""
        e = self._entries.get(cid)
        return list(e.intervals) if e is not None and e.size == size else []

    def done(self, cid: str, size: int, path: str) -> DoneRecord | None:
        e = self._entries.get(cid)
        if e is None or e.done is None or e.size != size or e.done.path != path:
            return None
        return e.done

    # -- writing -----------------------------------------------------------------------

    def _lines(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for cid, e in sorted(self._entries.items()):
            if e.done is not None:
                out.append(_done_doc(cid, e.done))
            out.extend({"v": 1, "id": cid, "size": e.size, "seg": [a, b]} for a, b in e.intervals)
        return out

    def _compact(self) -> None:
        tmp = self.path.with_name(f".{JOURNAL_NAME}.tmp")
        body = b"".join(_dump(d) for d in self._lines())
        try:
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(self.path)) from None

    def _append(self, doc: dict[str, Any]) -> None:
        line = _dump(doc)
        with self._lock:
            if self._fd is None:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise oserror_to_airpack(e, "cannot create", str(self.path.parent)) from None
                self._compact()
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                os.write(self._fd, line)  # one write of a short line under O_APPEND: never interleaved
            except OSError as e:
                raise oserror_to_airpack(e, "cannot write", str(self.path)) from None

    def record_segment(self, cid: str, size: int, start: int, end: int) -> None:
        if end > start:
            self._append({"v": 1, "id": cid, "size": size, "seg": [start, end]})

    def record_done(self, cid: str, rec: DoneRecord) -> None:
        self._append(_done_doc(cid, rec))

    def record_drop(self, cid: str) -> None:
        self._append({"v": 1, "id": cid, "drop": True})

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _done_doc(cid: str, rec: DoneRecord) -> dict[str, Any]:
    """A ``done`` line: one writer for the appended line and the compacted one, so the two cannot drift apart."""
    return {"v": 1, "id": cid, "size": rec.size,
            "done": {"path": rec.path, "sha256": rec.sha256, "mtime_ns": rec.mtime_ns, "ino": rec.ino}}


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode() + b"\n"
