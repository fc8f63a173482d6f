"""``airpack export``: a verified bundle folder to one deterministic tar, or to signed parts with parity.

Export never launders a tampered bundle: it runs the one verification
pipeline with the tar as its sink, so every file is hashed in the same read
that streams it into the tar; a mismatch aborts the export and removes what it
wrote. Nothing lands under its final name until the whole
tar is written: parts first, the parts index last.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .._fs import atomic_write, fsync_dir, oserror_to_airpack
from ..errors import AirpackError, IntegrityError, UsageError
from ..hashing import write_all
from ..manifest import ENVELOPE_NAME, MANIFEST_NAME, FileEntry, Manifest
from ..parts import (
    BackgroundSink,
    Layout,
    PartInfo,
    PartsWriter,
    build_statement,
    check_tar_name,
    index_name,
    part_names,
    plan_layout,
    sign_index,
)
from ..progress import NULL_PROGRESS, Progress
from ..signing import Signer, public_pem
from ..sources import open_source
from ..tarball import TarWriter, archive_size
from ..trust import TrustedKey, TrustPolicy, new_policy
from ._pack_common import packer_hints
from .pack import PARTIAL_MARKER
from .verify import FileSink, Sink, Trusted, VerifiedBundle, verify_source

R = TypeVar("R")


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    bundle: Path
    tar: Path
    policy: TrustPolicy
    split: int | None = None  # bytes per part; None writes one tar
    parity: int = 0
    signer: Signer | None = None  # signs the parts index; required with ``split``
    now: dt.datetime | None = None
    progress: Progress = NULL_PROGRESS


@dataclass(frozen=True)
class ExportResult:
    """The tar written (or its parts and their signed index); ``to_json``: ``export --json``."""

    tar: Path
    tar_size: int
    tar_sha256: str
    manifest: Manifest
    signers: tuple[TrustedKey, ...]
    layout: Layout | None = None
    parts: tuple[PartInfo, ...] = ()
    index: Path | None = None

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        doc: dict[str, Any] = {
            "bundle": m.name, "sequence": m.sequence, "manifest_sha256": m.digest,
            "signers": [k.name for k in self.signers], "tar": str(self.tar), "tar_size": self.tar_size,
            "tar_sha256": self.tar_sha256,
        }
        if self.layout is not None:
            doc.update({"index": str(self.index), "layout": self.layout.to_json(), "parts": [p.to_json() for p in self.parts]})
        return doc


class _TarFile(FileSink):
    """One bundle file as a tar member: its bytes go into the archive as they are hashed."""

    def __init__(self, writer: TarWriter) -> None:
        self.writer = writer

    def write(self, data: memoryview) -> None:
        self.writer.write(bytes(data))  # a fresh copy: the writer thread holds it after the buffer is reused

    def close(self) -> None:
        self.writer.end()


class _Target:
    """Where the tar's bytes go: opened once its size is known, made final only after every file verified.

    The tar is written on a thread of its own; ``hash_on_writer`` says whether that thread also
    hashes the tar (a plain file: it has time to spare) or the verifying thread does (parts: the
    writer thread codes parity), so the two cores stay balanced.
    """

    hash_on_writer = False

    def open(self, total: int) -> Callable[[bytes], None]:
        """Refuse names in the way, create the output, return what writes the tar's next bytes."""
        raise NotImplementedError

    def commit(self, vb: VerifiedBundle, *, total: int, tar_sha256: str) -> ExportResult:
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError


class _OneTar(_Target):
    """A temporary file beside ``tar``, renamed to it at the end."""

    hash_on_writer = True

    def __init__(self, tar: Path, folder: Path) -> None:
        self.tar, self.folder = tar, folder
        self.tmp: Path | None = None
        self.fd: int | None = None

    def open(self, total: int) -> Callable[[bytes], None]:
        _refuse_existing([self.tar])
        try:
            fd, name = tempfile.mkstemp(prefix=f".{self.tar.name}.", suffix=".tmp", dir=self.folder)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(self.tar)) from None
        self.fd, self.tmp = fd, Path(name)
        tar = str(self.tar)

        def write(data: bytes) -> None:  # runs on the writer thread; a full disk surfaces as the named error
            try:
                write_all(fd, data)
            except OSError as e:
                raise oserror_to_airpack(e, "cannot write", tar) from None

        return write

    def commit(self, vb: VerifiedBundle, *, total: int, tar_sha256: str) -> ExportResult:
        assert self.fd is not None and self.tmp is not None
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            size = self.tmp.stat().st_size
            if size != total:
                raise IntegrityError(f"the tar is {size} bytes, {total} were planned", path=str(self.tar))
            os.chmod(self.tmp, 0o644)
            os.replace(self.tmp, self.tar)
            fsync_dir(self.folder)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(self.tar)) from None
        return ExportResult(tar=self.tar, tar_size=total, tar_sha256=tar_sha256, manifest=vb.manifest, signers=vb.signers)

    def discard(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                self.tmp.unlink()


class _Parts(_Target):
    """Numbered parts (with parity) beside ``tar``, and the signed parts index written last."""

    def __init__(self, tar: Path, folder: Path, *, split: int, parity: int, signer: Signer) -> None:
        self.tar, self.folder, self.split, self.parity, self.signer = tar, folder, split, parity, signer
        self.layout: Layout | None = None
        self.writer: PartsWriter | None = None

    @property
    def index(self) -> Path:
        return self.folder / index_name(self.tar.name)

    def open(self, total: int) -> Callable[[bytes], None]:
        self.layout = plan_layout(total, self.split, self.parity)
        names = part_names(self.tar.name, self.layout)
        _refuse_existing([self.folder / n for n in names] + [self.index])
        # The writer codes parity and hashes each part on the tar-writing thread.
        self.writer = PartsWriter(self.folder, names, self.layout)
        return self.writer.write

    def commit(self, vb: VerifiedBundle, *, total: int, tar_sha256: str) -> ExportResult:
        assert self.writer is not None and self.layout is not None
        parts = self.writer.finish()
        m = vb.manifest
        statement = build_statement(
            tar_name=self.tar.name, tar_size=total, tar_sha256=tar_sha256, layout=self.layout, parts=parts,
            bundle={"name": m.name, "channel": m.channel, "sequence": m.sequence, "manifest_sha256": m.digest},
        )
        envelope = sign_index(statement, self.signer)
        self.writer.commit()
        atomic_write(self.index, envelope)
        return ExportResult(tar=self.tar, tar_size=total, tar_sha256=tar_sha256, manifest=m, signers=vb.signers,
                            layout=self.layout, parts=tuple(parts), index=self.index)

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.discard()


class _TarSink(Sink):
    """Writes the verified bundle as one deterministic tar into the target, hashing the tar as it goes.

    The envelope goes in exactly as stored, then the manifest copy, then each
    file in path order as the pipeline verifies it; a mismatch stops the
    pipeline, and the target removes what was written.
    """

    action = "export"
    ordered = True

    def __init__(self, target: _Target) -> None:
        self.target = target
        self.tar_hash = hashlib.sha256()
        self._bg: BackgroundSink | None = None
        self.writer: TarWriter | None = None
        self.total = 0

    def begin(self, trusted: Trusted) -> None:
        m = trusted.manifest
        members = [(ENVELOPE_NAME, len(trusted.envelope)), (MANIFEST_NAME, len(trusted.payload))] + [(f.path, f.size) for f in m.carried]
        self.total = archive_size(members)
        write, tar_hash = self.target.open(self.total), self.tar_hash

        def hash_and_write(data: bytes) -> None:
            tar_hash.update(data)
            write(data)

        bg = self._bg = BackgroundSink(hash_and_write if self.target.hash_on_writer else write)

        def hash_then_queue(data: bytes) -> None:
            tar_hash.update(data)
            bg(data)

        self.writer = TarWriter(bg if self.target.hash_on_writer else hash_then_queue, mtime=int(m.created.timestamp()))
        self.writer.add_bytes(ENVELOPE_NAME, trusted.envelope)
        self.writer.add_bytes(MANIFEST_NAME, trusted.payload)

    def open(self, entry: FileEntry) -> FileSink:
        assert self.writer is not None
        self.writer.begin(entry.path, entry.size)
        return _TarFile(self.writer)

    def finish(self, *, ok: bool) -> None:
        """End the archive and wait for the writer thread (whose write error surfaces here)."""
        if self._bg is None:
            return
        if ok:
            assert self.writer is not None
            self.writer.close()
            self._bg.close()
        else:
            with contextlib.suppress(Exception):  # the error already on its way names the cause
                self._bg.close()


def _refuse_existing(paths: list[Path]) -> None:
    for p in paths:
        if os.path.lexists(p):
            raise UsageError(f"{p} already exists; remove it or choose another --tar name", path=str(p))


def _export(opts: ExportOptions, target: _Target) -> ExportResult:
    """One pass: the pipeline verifies each file as the tar sink streams it into the target; all or nothing."""
    sink = _TarSink(target)
    try:
        ok = False
        try:
            vb = verify_source(open_source(opts.bundle, policy=opts.policy), opts.policy, now=opts.now, sink=sink,
                               progress=opts.progress)
            ok = True
        finally:
            sink.finish(ok=ok)
        return target.commit(vb, total=sink.total, tar_sha256=sink.tar_hash.hexdigest())
    except BaseException:
        target.discard()
        raise


def export(opts: ExportOptions) -> ExportResult:
    """Verify the bundle and write the tar (or its parts and the signed index) in the same pass over the files."""
    tar = Path(opts.tar)
    if opts.split is None and opts.parity:
        raise UsageError("--parity needs --split SIZE")
    if opts.split is not None and opts.signer is None:
        raise UsageError("export --split needs --key KEY to sign the parts index")
    if opts.split is not None:
        check_tar_name(tar.name)
    folder = tar.parent if str(tar.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"folder {folder} for --tar does not exist", path=str(folder))
    if opts.split is None:
        return _export(opts, _OneTar(tar, folder))
    assert opts.signer is not None
    return _export(opts, _Parts(tar, folder, split=opts.split, parity=opts.parity, signer=opts.signer))


PACKED_CHANGED_HINTS: dict[type[AirpackError], str] = {
    IntegrityError: "A file changed in the pack's work folder while it was packed (or the disk returned other bytes); "
                    "run pack again.",
}


def pack_as_tar(pack_fn: Callable[[Path], R], tar: Path, signer: Signer, *, split: int | None = None, parity: int = 0,
                progress: Progress = NULL_PROGRESS) -> tuple[R, ExportResult]:
    """``pack --format tar``: pack into a work folder beside ``tar``, export it, remove the folder.

    ``pack_fn(out_dir)`` runs the pack. The work folder has a fixed name
    (``.NAME.tar.packing``), and a failed pack leaves it in place, so running
    the same command again resumes the downloads as a folder pack does. The
    export is verified against the packer's own key (it just signed), so a
    file changed mid-pack is still caught.
    """
    folder = tar.parent if str(tar.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"folder {folder} for the tar does not exist", path=str(folder))
    _refuse_existing([tar])
    if split is not None:
        check_tar_name(tar.name)  # before the pack, not after it
    work = folder / f".{tar.name}.packing"
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise UsageError(f"{work} is in the way (not a folder airpack made); remove it", path=str(work))
    out = work / "bundle"
    if (out / ENVELOPE_NAME).exists():  # packed, then killed before the export: pack it again (resuming from the files there)
        (out / ENVELOPE_NAME).unlink()
        (out / PARTIAL_MARKER).touch()
    created = not work.exists()
    try:
        work.mkdir(exist_ok=True)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot create", str(work)) from None
    try:
        result = pack_fn(out)  # on failure the work folder stays if the pack kept downloads: the next run resumes in it
    except Exception:
        if created:
            with contextlib.suppress(OSError):
                work.rmdir()  # only when empty: the pack took back everything it wrote
        raise
    try:
        pub = signer.public_key
        own = new_policy(1, source="<the packing key>").with_key("packer", pub, public_pem(pub))
        with packer_hints(PACKED_CHANGED_HINTS):  # the packer's own bundle: not "get a fresh copy from the packer"
            exported = export(ExportOptions(bundle=out, tar=tar, policy=own, split=split, parity=parity,
                                            signer=signer if split else None, progress=progress))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result, exported
