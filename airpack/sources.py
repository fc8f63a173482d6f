"""The forms a bundle arrives in (folder, tar, parts), behind the one interface the verification pipeline reads.

A source only *presents* bytes; it decides nothing. ``ops.verify.verify_source``
asks it, in order, for the envelope bytes (capped), the manifest copy, the
entries it holds and each file's bytes, and runs every check itself, so a
threat gets the same answer whatever form the bundle came in. An OCI artifact
is the fourth form; its source lives in ``ops.oci`` because it needs the
network client, which the offline side never loads.

``open_source`` is the one place that tells the forms apart.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from ._fs import describe_mode, open_regular_nofollow, oserror_to_airpack, read_capped, walk_bundle
from ._json import printable
from .errors import (
    EnvelopeError,
    IntegrityError,
    NotABundleError,
    ResourceError,
    TrustError,
    UnsafePathError,
    UsageError,
)
from .manifest import ENVELOPE_NAME, MANIFEST_NAME, RESERVED, FileEntry
from .parts import (
    INDEX_SUFFIX,
    PartsIndex,
    PartsReader,
    check_parts,
    find_index,
    load_index,
    parse_index,
    parts_error,
    read_index_envelope,
)
from .signing import MAX_ENVELOPE_BYTES, oversized_envelope
from .tarball import MemberHeader, ReadableStream, TarReader
from .trust import TrustPolicy


@dataclass(frozen=True)
class Member:
    """A file as the source lists it: its path, its size, and why it is not a plain file (if it is not)."""

    path: str
    size: int
    problem: str | None = None
    sha256: str | None = None  # known before reading when the container indexes by digest (OCI layers)


class FileReader(Protocol):
    """A file's bytes: ``readinto`` fills a view and returns the count, 0 at the end."""

    def readinto(self, view: memoryview) -> int: ...


class LocalFile:
    """A plain file of a bundle folder, opened without following links; its descriptor allows kernel copies."""

    def __init__(self, fd: int, display: str) -> None:
        self.fd = fd
        self.display = display

    def readinto(self, view: memoryview) -> int:
        try:
            return os.readv(self.fd, [view])
        except OSError as e:  # an unreadable sector on the medium: the bundle is damaged
            raise IntegrityError(f"cannot read {self.display} in the bundle: {e.strerror}", path=self.display) from None


class BundleSource:
    """What every form offers the pipeline. Nothing read from a source is trusted until the pipeline says so.

    Random-access sources (folder, OCI) list their entries up front and open
    each file on its own, so files are hashed in parallel; streaming sources
    (tar, parts) yield their members once, in order, after the envelope and
    the manifest copy.
    """

    random_access: ClassVar[bool]

    def __init__(self, label: str, location: str | None = None) -> None:
        self.label = label  # how messages name the bundle (a folder, a tar's name, an OCI reference)
        # Where it is, in full: what an install records as its source, so a name that is not UTF-8 is escaped (\xff).
        self.location = printable(location or label)

    @property
    def root(self) -> Path | None:
        """The bundle folder, for a folder source (files can be opened by path); None for every other form."""
        return None

    @property
    def envelope_where(self) -> str:
        """How messages name the envelope of this source."""
        return f"{self.label}:{ENVELOPE_NAME}"

    def session(self) -> AbstractContextManager[None]:
        """Hold what reading needs (an open tar, a connection) for the length of one verification."""
        return contextlib.nullcontext()

    def envelope_bytes(self) -> bytes:
        """The envelope exactly as stored, capped; any failure to get it is an ``EnvelopeError`` (exit 4)."""
        raise NotImplementedError

    def manifest_copy(self) -> bytes | None:
        """The readable manifest copy as stored (capped), or None when the bundle has none."""
        raise NotImplementedError

    def bound_manifest_sha256(self) -> str | None:
        """A manifest digest the container itself is signed for (a parts index), checked against the envelope's."""
        return None

    def audit_fields(self) -> dict[str, str]:
        """What an install's audit line records about the transport, beyond the source's location."""
        return {}

    # -- random access
    def members(self) -> list[Member]:
        raise NotImplementedError

    def open(self, entry: FileEntry) -> AbstractContextManager[FileReader]:
        raise NotImplementedError

    # -- streaming
    def stream(self) -> Iterator[tuple[MemberHeader, TarReader]]:
        raise NotImplementedError


# -- a folder -------------------------------------------------------------------------------------

_UNREADABLE_HINT = "The envelope's bytes could not be read: check the file's permissions and the medium, or copy the bundle again."


def _size_of(path: Path) -> int | None:
    """A file's size for a message, or None when it cannot be had."""
    try:
        return os.lstat(path).st_size
    except OSError:
        return None


class DirSource(BundleSource):
    random_access = True

    @classmethod
    def existing(cls, path: Path) -> DirSource:
        """A folder the operator named; the root may be a mount point or a link to one (links *inside* are refused)."""
        p = Path(path)
        if not p.exists():
            raise UsageError(f"bundle {p} does not exist", path=str(p))
        if not p.is_dir():
            raise UsageError(f"bundle {p} is not a folder", path=str(p))
        return cls(p)

    def __init__(self, folder: Path) -> None:
        super().__init__(str(folder))
        self.folder = Path(folder)

    @property
    def root(self) -> Path:
        return self.folder

    @property
    def envelope_where(self) -> str:
        return f"{self.folder}/{ENVELOPE_NAME}"

    def path_of(self, rel: str) -> Path:
        return self.folder.joinpath(*rel.split("/"))

    def envelope_bytes(self) -> bytes:
        shown = self.envelope_where
        try:
            return read_capped(self.folder / ENVELOPE_NAME, MAX_ENVELOPE_BYTES, display=shown, what="envelope")
        except FileNotFoundError:
            raise EnvelopeError(f"no signature envelope at {shown}", path=shown) from None
        except EnvelopeError:
            raise
        except ResourceError as e:  # permission denied, EIO on open: the bytes could not be read, no trust verdict (exit 8)
            raise type(e)(e.message, path=shown, hint=_UNREADABLE_HINT) from None
        except OSError as e:  # EIO (or a permission change) while reading
            err = oserror_to_airpack(e, "cannot read envelope", shown)
            err.hint = _UNREADABLE_HINT
            raise err from None
        except UnsafePathError as e:  # a link, a device, a hard link in the envelope's place
            raise EnvelopeError(f"cannot use envelope: {e.message}", path=shown) from None
        except IntegrityError:  # read_capped's size cap
            raise oversized_envelope(shown, _size_of(self.folder / ENVELOPE_NAME)) from None

    def manifest_copy(self) -> bytes | None:
        shown = f"{self.folder}/{MANIFEST_NAME}"
        try:
            return read_capped(self.folder / MANIFEST_NAME, MAX_ENVELOPE_BYTES, display=shown, what="manifest copy")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise oserror_to_airpack(e, "cannot read", shown) from None

    def members(self) -> list[Member]:
        try:
            return [Member(path=rel, size=st.st_size, problem=describe_mode(st))
                    for rel, st in walk_bundle(self.folder) if rel not in RESERVED]
        except OSError as err:
            raise oserror_to_airpack(err, "cannot read", str(err.filename or self.folder)) from None

    @contextlib.contextmanager
    def open(self, entry: FileEntry) -> Iterator[FileReader]:
        fd = open_regular_nofollow(self.path_of(entry.path), display=entry.path)
        try:
            if hasattr(os, "posix_fadvise"):
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # read ahead further on the medium
            yield LocalFile(fd, entry.path)
        finally:
            os.close(fd)


# -- one tar --------------------------------------------------------------------------------------


class _StreamSource(BundleSource):
    """A tar read once, front to back: the envelope is its first member, the manifest copy its second."""

    random_access = False

    @property
    def envelope_where(self) -> str:
        return f"{self.tar_name}:{ENVELOPE_NAME}"

    def __init__(self, location: str, tar_name: str) -> None:
        super().__init__(tar_name, location)
        self.tar_name = tar_name
        self._reader: TarReader | None = None

    def _open_stream(self) -> AbstractContextManager[ReadableStream]:
        raise NotImplementedError

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        with self._open_stream() as stream:
            self._reader = TarReader(stream, source=self.tar_name)
            try:
                yield
            finally:
                self._reader = None

    @property
    def reader(self) -> TarReader:
        if self._reader is None:
            raise RuntimeError("a stream source is read inside its session()")
        return self._reader

    def envelope_bytes(self) -> bytes:
        first = self.reader.next_member()
        if first is None or first.name != ENVELOPE_NAME:
            found = first.name if first else "no member"
            raise EnvelopeError(f"{self.tar_name}: the first member must be {ENVELOPE_NAME}, found {found}", path=ENVELOPE_NAME)
        if first.size > MAX_ENVELOPE_BYTES:
            raise oversized_envelope(self.envelope_where, first.size)
        return self.reader.read(first.size)  # the whole body (capped above), or a named truncation

    def manifest_copy(self) -> bytes | None:
        second = self.reader.next_member()
        if second is None or second.name != MANIFEST_NAME:  # the copy must come second: without it here, it is missing
            return None
        if second.size > MAX_ENVELOPE_BYTES:
            raise IntegrityError(f"{MANIFEST_NAME} in {self.tar_name} is larger than the {MAX_ENVELOPE_BYTES}-byte limit",
                                 path=MANIFEST_NAME)
        return self.reader.read(second.size)

    def stream(self) -> Iterator[tuple[MemberHeader, TarReader]]:
        reader = self.reader
        for m in reader:
            yield m, reader


class TarSource(_StreamSource):

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), Path(path).name)
        self.path = Path(path)

    @contextlib.contextmanager
    def _open_stream(self) -> Iterator[ReadableStream]:
        try:
            f = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed below
        except OSError as e:
            raise UsageError(f"cannot read {self.path}: {e.strerror}", path=str(self.path)) from None
        with f:
            yield f


# -- split parts ----------------------------------------------------------------------------------


class PartsSource(_StreamSource):
    """The tar read back from its data parts, after the signed parts index located each one.

    With a policy, the index must be signed by a trusted key and the parts'
    manifest digest must be the envelope's (parts of two exports cannot mix).
    When the bundle inside fails a check, the parts are hashed against the
    index so the error names the damaged part rather than what the damage
    broke inside the tar.
    """


    def __init__(self, index_path: Path, policy: TrustPolicy | None, *, workers: int | None = None) -> None:
        self.index_path = Path(index_path)
        self.folder = self.index_path.parent
        self.policy = policy
        self.workers = workers
        self.index = self._load_index()
        super().__init__(str(self.index_path), self.index.tar_name)

    def _load_index(self) -> PartsIndex:
        if self.policy is not None:
            return load_index(self.index_path, self.policy)[0]
        return parse_index(read_index_envelope(self.index_path).payload)  # unverified mode: inspect, diff, sbom

    def bound_manifest_sha256(self) -> str | None:
        return self.index.manifest_sha256

    @contextlib.contextmanager
    def _open_stream(self) -> Iterator[ReadableStream]:
        check_data_present(self.folder, self.index)
        with PartsReader(self.folder, self.index) as pr:
            yield pr

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        with super().session():
            try:
                yield
            except (IntegrityError, TrustError) as e:
                # Name every lost part, parity ones too (they decide whether repair can help), not just the first.
                report = check_parts(self.folder, self.index, workers=self.workers)
                if report:
                    raise parts_error(self.index, report, self.folder) from e
                raise


def check_data_present(folder: Path, index: PartsIndex) -> None:
    """Before streaming: every data part is there at its signed size (a cheap stat; hashes come later).

    Parity parts are looked at too, and on a refusal every part is hashed, so that the error names
    every lost part and the repair hint counts only the parity parts still intact; a lost parity
    part alone refuses nothing (the bundle reads from the data parts).
    """
    missing: list[str] = []
    bad: list[tuple[str, str]] = []
    for p in index.parts:
        try:
            st = os.stat(folder / p.name, follow_symlinks=False)
        except FileNotFoundError:
            missing.append(p.name)
            continue
        if st.st_size != p.size:
            bad.append((p.name, f"size {st.st_size}, expected {p.size}"))
    data = {p.name for p in index.data}
    if data & ({*missing} | {n for n, _ in bad}):
        # Refused: now hash every part, so that the error names damaged parity parts as well (their size held).
        raise parts_error(index, check_parts(folder, index), folder)


# -- telling the forms apart ----------------------------------------------------------------------


UNFINISHED_MARKER = ".airpack-partial"  # ops.pack.PARTIAL_MARKER (a test keeps the two equal): a pack still under way
_PART_FILE = re.compile(r"\.(part|parity)\d{4}$")
_WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt")
_BUNDLE_LAYOUT = (MANIFEST_NAME, "models", "wheels", "sbom.cdx.json")  # what a bundle folder holds besides its envelope


def detect(path: Path) -> tuple[str, Path]:
    """(kind, path) for what the operator pointed at: a bundle folder, one tar, or a parts folder (or its index file).

    The one place that tells the forms apart, so it is also the one place that says what a thing
    is when it is no bundle at all: a model folder, an unfinished pack, parts without their
    index, an empty folder, a plain file. Those are ``NotABundleError`` (exit 2) naming what was
    found. A folder laid out as a bundle (``manifest.json``, ``models/``) whose envelope is missing
    stays a bundle, whose verification then fails on the envelope (exit 4).
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"bundle {p} does not exist", path=str(p))
    if p.is_dir():
        if os.path.lexists(p / ENVELOPE_NAME):
            return "dir", p
        idx = find_index(p)
        if idx is not None:
            return "parts", idx
        _refuse_folder(p)
        return "dir", p
    if p.name.endswith(INDEX_SUFFIX):
        return "parts", p
    _refuse_file(p)
    return "tar", p


def _names(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder))
    except OSError as e:
        raise oserror_to_airpack(e, "cannot read", str(folder)) from None


def _refuse_folder(p: Path) -> None:
    """A folder with no envelope and no parts index: raise ``NotABundleError`` unless it is laid out as a bundle."""
    names = _names(p)
    if UNFINISHED_MARKER in names:
        raise NotABundleError(
            f"{p} looks like an unfinished pack ({UNFINISHED_MARKER} is there, {ENVELOPE_NAME} is not), not a bundle",
            path=str(p), hint=f"Run the same `airpack pack SPEC --out {p}` again: it resumes and signs the bundle last.")
    if any(n in names for n in _BUNDLE_LAYOUT):
        return  # a bundle whose envelope is gone: the pipeline refuses it as a trust failure
    parts = [n for n in names if _PART_FILE.search(n)]
    if parts:
        tar = _PART_FILE.sub("", parts[0])
        raise NotABundleError(
            f"{p} holds parts ({_few(parts)}) but no parts index ({tar}{INDEX_SUFFIX})", path=str(p),
            hint=f"Copy {tar}{INDEX_SUFFIX} from the export into {p} too; it is written last, beside the parts.")
    model = [n for n in names if n == "config.json"] + [f"*{ext}" for ext in _WEIGHTS if any(n.endswith(ext) for n in names)]
    if model:
        raise NotABundleError(
            f"{p} is a model folder ({', '.join(model)}), not a bundle: it has no {ENVELOPE_NAME}", path=str(p),
            hint="Pack it first: name it as `path` under [[models]] in a spec, then run `airpack pack SPEC --out BUNDLE --key KEY`.")
    what = "an empty folder" if not names else f"a folder without {ENVELOPE_NAME} ({_few(names)})"
    raise NotABundleError(f"{p} is {what}, not a bundle", path=str(p))


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _refuse_file(p: Path) -> None:
    """A file that is not a parts index: raise ``NotABundleError`` unless it could be a tar (ustar magic, or named .tar)."""
    try:
        st = p.stat()
    except OSError as e:
        raise oserror_to_airpack(e, "cannot read", str(p)) from None
    if not stat.S_ISREG(st.st_mode):
        what = {"device": "a device", "FIFO": "a FIFO", "socket": "a socket"}.get(describe_mode(st) or "", "not a regular file")
        raise NotABundleError(f"{p} is {what}, not a bundle", path=str(p))
    if p.name == ENVELOPE_NAME:
        raise NotABundleError(f"{p} is a bundle's envelope, not the bundle", path=str(p),
                              hint=f"Give the folder that holds it: {p.parent}")
    if _PART_FILE.search(p.name):
        raise NotABundleError(f"{p} is one part of a split export, not the whole bundle", path=str(p),
                              hint=f"Give the folder that holds every part and the *{INDEX_SUFFIX} index: {p.parent}")
    if st.st_size == 0:
        raise NotABundleError(f"{p} is an empty file, not a bundle", path=str(p))
    if p.name.endswith(".tar"):
        return  # named as a tar: damage inside it is an integrity failure the tar reader names
    try:
        with open(p, "rb") as f:
            head = f.read(_TAR_BLOCK)
    except OSError:
        return  # the tar source reports why it cannot be read
    if head[257:262] != b"ustar":
        raise NotABundleError(f"{p} is a plain file (not a tar, and not a folder), not a bundle", path=str(p))


_TAR_BLOCK = 512


def open_source(path: Path, *, policy: TrustPolicy | None = None, workers: int | None = None) -> BundleSource:
    """The source for a local bundle in any form; ``policy`` checks a parts index's signature as it is opened.

    A policy that can never be met is refused first (exit 2), before a parts index is read against it.
    """
    if policy is not None:
        policy.check_usable()
    kind, p = detect(path)
    if kind == "dir":
        return DirSource(p)
    if kind == "parts":
        return PartsSource(p, policy, workers=workers)
    return TarSource(p)
