"""One uncompressed POSIX (ustar + pax) tar of a bundle: a deterministic writer and a strict streaming reader.

The writer emits the envelope, the manifest copy, then every file sorted by
path, with fixed modes, owners and mtimes and no folder entries, so the same
bundle always gives the same bytes; a pax header carries names that do not
fit ustar and sizes of 8 GiB and more.

The reader is written here rather than taken from ``tarfile`` because a
hostile tar is untrusted input: ``tarfile`` reads pax and GNU long-name
headers into memory without a cap and takes a corrupt header in the middle of
an archive for its end. This reader caps every header, checks every
checksum, refuses every member that is not a regular file (naming it),
refuses data after the end marker, and names the member a truncation cut.
It never seeks, so it runs over a pipe or a chain of parts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .errors import IntegrityError, UnsafePathError

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
MAX_PAX_BYTES = 64 * 1024
PAX_NAME = b"././@PaxHeader"
FILE_MODE = 0o644
_USTAR_SIZE_LIMIT = 8**11  # 11 octal digits
_POSIX_MAGIC = b"ustar\x0000"
_GNU_MAGIC = b"ustar  \x00"

# What each refused type flag is, for the error message.
_REFUSED_TYPES = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "FIFO",
    b"7": "contiguous file",
    b"g": "global pax header",
    b"L": "GNU long name",
    b"K": "GNU long link name",
    b"S": "GNU sparse file",
    b"D": "GNU directory dump",
    b"M": "GNU multi-volume continuation",
    b"V": "GNU volume label",
}


def padding(size: int) -> int:
    """Bytes of zero padding after a member body of ``size`` bytes."""
    return -size % BLOCK


# -- writing ---------------------------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    """A ustar numeric field: ``width - 1`` octal digits then NUL."""
    return b"%0*o\0" % (width - 1, value)


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body)
    length = n + len(str(n))
    if len(str(length)) != len(str(n)):
        length = n + len(str(length))
    return str(length).encode() + body


def _ustar_block(name: bytes, size: int, mtime: int, typeflag: bytes) -> bytes:
    h = bytearray(BLOCK)
    h[0 : len(name)] = name
    h[100:108] = _octal(FILE_MODE, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(mtime, 12)
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[257:265] = _POSIX_MAGIC
    h[329:337] = _octal(0, 8)
    h[337:345] = _octal(0, 8)
    chk = sum(h)
    h[148:156] = b"%06o\0 " % chk
    return bytes(h)


def _needs_pax_path(name: str) -> bool:
    raw = name.encode("utf-8")
    return len(raw) > 100 or not name.isascii()


def header(name: str, size: int, mtime: int) -> bytes:
    """The header block(s) of one regular file: a pax header first when ustar cannot hold it."""
    if not 0 <= mtime < _USTAR_SIZE_LIMIT:
        raise ValueError("mtime out of range for a ustar header")
    records = b""
    if _needs_pax_path(name):
        records += _pax_record("path", name)
    if size >= _USTAR_SIZE_LIMIT:
        records += _pax_record("size", str(size))
    out = b""
    if records:
        out += _ustar_block(PAX_NAME, len(records), mtime, b"x") + records + b"\0" * padding(len(records))
        # Readers that ignore pax headers still get an ASCII, bounded stand-in name.
        shown = name.encode("ascii", "replace")[-100:].lstrip(b"/") or b"file"
        out += _ustar_block(shown, 0 if size >= _USTAR_SIZE_LIMIT else size, mtime, b"0")
    else:
        out += _ustar_block(name.encode("ascii"), size, mtime, b"0")
    return out


def member_span(name: str, size: int) -> int:
    """Bytes one member takes in the archive: header(s), body and padding."""
    return len(header(name, size, 0)) + size + padding(size)


def archive_size(members: list[tuple[str, int]]) -> int:
    """The exact size of the archive ``TarWriter`` writes for these (name, size) members."""
    return sum(member_span(n, s) for n, s in members) + len(END_OF_ARCHIVE)


class TarWriter:
    """Writes members to ``sink`` (a callable taking bytes) in order; the caller streams each body."""

    def __init__(self, sink: Callable[[bytes], None], *, mtime: int) -> None:
        self._sink = sink
        self._mtime = mtime
        self._name: str | None = None
        self._left = 0
        self._size = 0

    def begin(self, name: str, size: int) -> None:
        if self._name is not None:
            raise RuntimeError(f"member {self._name} is not finished")
        self._name, self._left, self._size = name, size, size
        self._sink(header(name, size, self._mtime))

    def write(self, data: bytes) -> None:
        if self._name is None or len(data) > self._left:
            raise IntegrityError(f"{self._name or 'a file'} grew while it was exported", path=self._name)
        self._left -= len(data)
        self._sink(data)

    def end(self) -> None:
        if self._name is None:
            raise RuntimeError("no member is open")
        if self._left:
            raise IntegrityError(f"{self._name} shrank while it was exported", path=self._name)
        pad = padding(self._size)
        if pad:
            self._sink(b"\0" * pad)
        self._name = None

    def add_bytes(self, name: str, data: bytes) -> None:
        self.begin(name, len(data))
        self.write(data)
        self.end()

    def close(self) -> None:
        if self._name is not None:
            raise RuntimeError(f"member {self._name} is not finished")
        self._sink(END_OF_ARCHIVE)


# -- reading ---------------------------------------------------------------------------


class ReadableStream(Protocol):
    def readinto(self, buf: memoryview) -> int: ...


class StreamReader:
    """Exact reads over a ``readinto`` stream, counting the offset; ``None`` means end of stream."""

    def __init__(self, stream: ReadableStream) -> None:
        self._stream = stream
        self.offset = 0

    def read_exact(self, n: int) -> bytes | None:
        """Read exactly ``n`` bytes; ``None`` at a clean end; the short bytes raise ``_ShortRead``."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self._stream.readinto(view[got:])
            if not k:
                break
            got += k
        self.offset += got
        if got == n:
            return bytes(buf)
        if got == 0:
            return None
        raise _ShortRead(got)

    def readinto(self, view: memoryview) -> int:
        k = self._stream.readinto(view)
        self.offset += k
        return k


class _ShortRead(Exception):
    def __init__(self, got: int) -> None:
        super().__init__(got)
        self.got = got


def _field_str(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def _parse_number(raw: bytes, what: str, where: str) -> int:
    if raw and raw[0] & 0x80:  # GNU base-256
        if raw[0] & 0x40:
            raise IntegrityError(f"tar header {where}: negative {what}", path=where)
        n = raw[0] & 0x3F
        for b in raw[1:]:
            n = (n << 8) | b
        return n
    s = raw.replace(b"\0", b" ").strip()
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise IntegrityError(f"tar header {where}: {what} field is not a number", path=where) from None


def _decode_name(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        shown = raw.decode("utf-8", "replace")
        raise UnsafePathError(f"unsafe member {shown!r} in tar: name is not valid UTF-8", path=shown) from None


def parse_pax(records: bytes, where: str) -> dict[str, str]:
    """Parse pax extended-header records strictly (length-prefixed, newline-terminated, no repeats)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(records):
        if records[pos:] == b"\0" * (len(records) - pos):
            break
        sp = records.find(b" ", pos)
        if sp < 0 or sp - pos > 10:
            raise IntegrityError(f"malformed pax header {where}", path=where)
        try:
            length = int(records[pos:sp].decode("ascii"))
        except ValueError:
            raise IntegrityError(f"malformed pax header {where}: bad record length", path=where) from None
        end = pos + length
        if length <= sp - pos + 1 or end > len(records) or records[end - 1 : end] != b"\n":
            raise IntegrityError(f"malformed pax header {where}: record length does not match", path=where)
        rec = records[sp + 1 : end - 1]
        key_b, eq, value_b = rec.partition(b"=")
        if not eq:
            raise IntegrityError(f"malformed pax header {where}: record without '='", path=where)
        try:
            key, value = key_b.decode("utf-8"), value_b.decode("utf-8")
        except UnicodeDecodeError:
            raise UnsafePathError(f"malformed pax header {where}: not valid UTF-8", path=where) from None
        if key in out:
            raise IntegrityError(f"malformed pax header {where}: {key!r} given twice", path=where)
        out[key] = value
        pos = end
    return out


@dataclass(frozen=True)
class MemberHeader:
    """A regular-file member as the archive describes it; the name is not yet checked against any rule."""

    name: str
    size: int
    offset: int  # where its header starts in the archive


class TarReader:
    """Yields regular-file members of a tar stream in order; everything else is refused by name.

    Use: ``for m in reader: ... reader.read(n) ...`` then the next iteration
    skips what is left of the body (reading it: the stream never seeks).
    """

    def __init__(self, stream: ReadableStream, *, source: str = "tar") -> None:
        self._r = StreamReader(stream)
        self._source = source
        self._current: MemberHeader | None = None
        self._left = 0
        self._last_name: str | None = None
        self._ended = False

    @property
    def offset(self) -> int:
        return self._r.offset

    def _after(self) -> str:
        return f"after member {self._last_name}" if self._last_name else "at the start"

    def _block(self, what: str) -> bytes | None:
        try:
            return self._r.read_exact(BLOCK)
        except _ShortRead:
            raise IntegrityError(
                f"{self._source} is truncated inside a {what} {self._after()} (offset {self._r.offset})",
                path=self._last_name,
            ) from None

    def _truncated_in(self, name: str, got: int, size: int) -> IntegrityError:
        return IntegrityError(
            f"{self._source} is truncated inside member {name} ({got} of {size} bytes present)", path=name
        )

    def __iter__(self) -> TarReader:
        return self

    def __next__(self) -> MemberHeader:
        m = self.next_member()
        if m is None:
            raise StopIteration
        return m

    def next_member(self) -> MemberHeader | None:
        """The next regular file, or ``None`` after a valid end-of-archive marker."""
        if self._current is not None:
            self.skip()
        if self._ended:
            return None
        pax: dict[str, str] | None = None
        while True:
            start = self._r.offset
            blk = self._block("header")
            if blk is None:
                raise IntegrityError(
                    f"{self._source} is truncated {self._after()}: it ends without the end-of-archive marker",
                    path=self._last_name,
                )
            if blk == b"\0" * BLOCK:
                if pax is not None:
                    raise IntegrityError(f"{self._source}: a pax header {self._after()} has no member", path=self._last_name)
                self._finish_end()
                return None
            where = f"at offset {start} ({self._after()})"
            self._check_header(blk, where)
            typeflag = blk[156:157]
            size = _parse_number(blk[124:136], "size", where)
            name = self._name_of(blk, pax, where)
            if typeflag == b"x":
                if pax is not None:
                    raise IntegrityError(f"{self._source}: two pax headers in a row {where}", path=self._last_name)
                if size > MAX_PAX_BYTES:
                    raise IntegrityError(
                        f"{self._source}: pax header {where} is {size} bytes, over the {MAX_PAX_BYTES}-byte limit",
                        path=self._last_name,
                    )
                body = self._read_body("pax header", size)
                pax = parse_pax(body, where)
                if any(k.startswith("GNU.sparse") for k in pax):
                    raise UnsafePathError(f"unsafe member in {self._source} {where}: GNU sparse file", path=pax.get("path"))
                continue
            if typeflag in (b"0", b"\0"):
                if pax is not None and "size" in pax:
                    try:
                        size = int(pax["size"])
                    except ValueError:
                        raise IntegrityError(f"{self._source}: pax size of {name!r} is not a number", path=name) from None
                    if size < 0:
                        raise IntegrityError(f"{self._source}: pax size of {name!r} is negative", path=name)
                self._current = MemberHeader(name=name, size=size, offset=start)
                self._left = size
                self._last_name = name
                return self._current
            kind = _REFUSED_TYPES.get(typeflag, f"unknown type {typeflag!r}")
            raise UnsafePathError(f"unsafe member {name} in {self._source}: {kind}", path=name)

    def _check_header(self, blk: bytes, where: str) -> None:
        magic = blk[257:265]
        if magic != _POSIX_MAGIC and magic != _GNU_MAGIC:
            raise IntegrityError(f"{self._source}: not a POSIX tar header {where}", path=self._last_name)
        stored = _parse_number(blk[148:156], "checksum", where)
        unsigned = sum(blk[:148]) + 256 + sum(blk[156:])
        signed = sum((b - 256 if b > 127 else b) for b in blk[:148]) + 256 + sum((b - 256 if b > 127 else b) for b in blk[156:])
        if stored not in (unsigned, signed):
            raise IntegrityError(f"{self._source}: header checksum mismatch {where}", path=self._last_name)

    def _name_of(self, blk: bytes, pax: dict[str, str] | None, where: str) -> str:
        if pax is not None and "path" in pax:
            return pax["path"]
        name = _field_str(blk[0:100])
        if blk[257:265] == _POSIX_MAGIC:
            prefix = _field_str(blk[345:500])
            if prefix:
                name = prefix + b"/" + name
        return _decode_name(name, where)

    def _read_body(self, what: str, size: int) -> bytes:
        try:
            data = self._r.read_exact(size) if size else b""
            pad = padding(size)
            tail = self._r.read_exact(pad) if pad else b""
        except _ShortRead:
            raise IntegrityError(f"{self._source} is truncated inside a {what} {self._after()}", path=self._last_name) from None
        if data is None or tail is None:
            raise IntegrityError(f"{self._source} is truncated inside a {what} {self._after()}", path=self._last_name)
        return data

    def _finish_end(self) -> None:
        second = self._block("end-of-archive marker")
        if second is None:
            raise IntegrityError(f"{self._source} is truncated inside the end-of-archive marker", path=self._last_name)
        if second != b"\0" * BLOCK:
            raise IntegrityError(f"{self._source}: a zero block {self._after()} is not followed by a second one", path=self._last_name)
        # Only zero padding may follow: bytes after the end marker would be ignored by every reader.
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        while True:
            k = self._r.readinto(view)
            if not k:
                break
            if view[:k].tobytes().count(0) != k:
                raise IntegrityError(f"{self._source} has data after its end-of-archive marker", path=self._last_name)
        self._ended = True

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current member's body; ``b''`` at its end."""
        m = self._current
        if m is None:
            return b""
        want = min(n, self._left)
        if want == 0:
            return b""
        try:
            data = self._r.read_exact(want)
        except _ShortRead as e:
            raise self._truncated_in(m.name, m.size - self._left + e.got, m.size) from None
        if data is None:
            raise self._truncated_in(m.name, m.size - self._left, m.size)
        self._left -= want
        if self._left == 0:
            self._end_member()
        return data

    def readinto(self, view: memoryview) -> int:
        """Read into ``view`` (up to its length) from the current body; 0 at its end."""
        m = self._current
        if m is None or self._left == 0:
            return 0
        want = min(len(view), self._left)
        got = 0
        while got < want:
            k = self._r.readinto(view[got:want])
            if not k:
                raise self._truncated_in(m.name, m.size - self._left + got, m.size)
            got += k
        self._left -= got
        if self._left == 0:
            self._end_member()
        return got

    def _end_member(self) -> None:
        m = self._current
        assert m is not None
        pad = padding(m.size)
        if pad:
            try:
                tail = self._r.read_exact(pad)
            except _ShortRead:
                tail = None
            if tail is None:
                raise self._truncated_in(m.name, m.size, m.size + pad)
            if tail != b"\0" * pad:
                raise IntegrityError(f"{self._source}: non-zero padding after member {m.name}", path=m.name)
        self._current = None

    def skip(self) -> None:
        """Read past the rest of the current member (the stream never seeks)."""
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while self._current is not None:
            if self._left == 0:
                self._end_member()
                break
            self.readinto(view)
