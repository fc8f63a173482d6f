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
from ..errors import IntegrityError, UsageError
from ..hashing import write_all
from ..manifest import ENVELOPE_NAME, MANIFEST_NAME, FileEntry, Manifest
from ..parts import BackgroundSink, Layout, PartInfo, PartsWriter, build_statement, index_name, part_names, plan_layout, sign_index
from ..progress import NULL_PROGRESS, Progress
from ..signing import Signer
from ..sources import open_source
from ..tarball import TarWriter, archive_size
from ..trust import TrustedKey, TrustPolicy
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
    tar: Path
    tar_size: int
    tar_sha256: str
    manifest: Manifest
    signers: tuple[TrustedKey, ...]
    layout: Layout | None = None
    parts: tuple[PartInfo, ...] = ()
    index: Path | None = None


class _TarFile(FileSink):
    """One bundle file as a tar member: its bytes go into the archive as they are hashed."""

    def __init__(self, writer: TarWriter) -> None:
        self.writer = writer

    def write(self, data: memoryview) -> None:
        self.writer.write(bytes(data))  # a fresh copy: the writer thread holds it after the buffer is reused

    def close(self) -> None:
        self.writer.end()


class _TarSink(Sink):
    """Writes the verified bundle as one deterministic tar into ``consume`` (a file, or the parts writer).

    The envelope goes in exactly as stored, then the manifest copy, then each
    file in path order as the pipeline verifies it; a mismatch stops the
    pipeline, and the caller removes what was written.
    """

    action = "export"
    ordered = True

    def __init__(self, consume: Callable[[int, Manifest], Callable[[bytes], None]], tar_hash: Any) -> None:
        self._consume = consume
        self._tar_hash = tar_hash
        self._bg: BackgroundSink | None = None
        self.writer: TarWriter | None = None
        self.total = 0

    def begin(self, trusted: Trusted) -> None:
        m = trusted.manifest
        members = [(ENVELOPE_NAME, len(trusted.envelope)), (MANIFEST_NAME, len(trusted.payload))] + [(f.path, f.size) for f in m.files]
        self.total = archive_size(members)
        consume = self._consume(self.total, m)
        self._bg = BackgroundSink(consume)

        def emit(data: bytes) -> None:
            if self._tar_hash is not None:
                self._tar_hash.update(data)
            assert self._bg is not None
            self._bg(data)

        self.writer = TarWriter(emit, mtime=int(m.created.timestamp()))
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


def _run(opts: ExportOptions, sink: _TarSink) -> VerifiedBundle:
    source = open_source(opts.bundle, policy=opts.policy)
    ok = False
    try:
        vb = verify_source(source, opts.policy, now=opts.now, sink=sink, progress=opts.progress)
        ok = True
    finally:
        sink.finish(ok=ok)
    return vb


def _export_tar(opts: ExportOptions, tar: Path, folder: Path) -> ExportResult:
    _refuse_existing([tar])
    tmp_fd, tmp_name = tempfile.mkstemp(prefix=f".{tar.name}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    tar_hash = hashlib.sha256()

    def to_file(_total: int, _m: Manifest) -> Callable[[bytes], None]:
        return lambda data: write_all(tmp_fd, data)

    sink = _TarSink(to_file, tar_hash)
    try:
        try:
            vb = _run(opts, sink)
            os.fsync(tmp_fd)
        finally:
            os.close(tmp_fd)
        size = tmp.stat().st_size
        if size != sink.total:
            raise IntegrityError(f"the tar is {size} bytes, {sink.total} were planned", path=str(tar))
        os.chmod(tmp, 0o644)
        os.replace(tmp, tar)
        fsync_dir(folder)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot write", str(tar)) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return ExportResult(tar=tar, tar_size=sink.total, tar_sha256=tar_hash.hexdigest(), manifest=vb.manifest, signers=vb.signers)


def _export_parts(opts: ExportOptions, tar: Path, folder: Path, split: int) -> ExportResult:
    tar_hash = hashlib.sha256()
    made: dict[str, Any] = {}

    def to_parts(total: int, m: Manifest) -> Callable[[bytes], None]:
        layout = plan_layout(total, split, opts.parity)
        names = part_names(tar.name, layout)
        idx = folder / index_name(tar.name)
        _refuse_existing([folder / n for n in names] + [idx])
        made.update(layout=layout, idx=idx, writer=PartsWriter(folder, names, layout))
        return made["writer"].write  # type: ignore[no-any-return]

    # The writer thread codes parity and hashes each part; the pipeline's threads hash the files, this one the tar.
    sink = _TarSink(to_parts, tar_hash)
    try:
        vb = _run(opts, sink)
        pw: PartsWriter = made["writer"]
        parts = pw.finish()
        m = vb.manifest
        statement = build_statement(
            tar_name=tar.name, tar_size=sink.total, tar_sha256=tar_hash.hexdigest(), layout=made["layout"], parts=parts,
            bundle={"name": m.name, "channel": m.channel, "sequence": m.sequence, "manifest_sha256": m.digest},
        )
        assert opts.signer is not None
        envelope = sign_index(statement, opts.signer)
        pw.commit()
    except BaseException:
        if "writer" in made:
            made["writer"].discard()
        raise
    atomic_write(made["idx"], envelope)
    return ExportResult(tar=tar, tar_size=sink.total, tar_sha256=tar_hash.hexdigest(), manifest=m, signers=vb.signers,
                        layout=made["layout"], parts=tuple(parts), index=made["idx"])


def export(opts: ExportOptions) -> ExportResult:
    """Verify the bundle and write the tar (or its parts and the signed index) in the same pass over the files."""
    tar = Path(opts.tar)
    if opts.split is None and opts.parity:
        raise UsageError("--parity needs --split SIZE")
    if opts.split is not None and opts.signer is None:
        raise UsageError("export --split needs --key KEY to sign the parts index")
    folder = tar.parent if str(tar.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"folder {folder} for --tar does not exist", path=str(folder))
    opts.policy.check_usable()
    if opts.split is None:
        return _export_tar(opts, tar, folder)
    return _export_parts(opts, tar, folder, opts.split)


def pack_as_tar(pack_fn: Callable[[Path], R], tar: Path, signer: Signer, *, split: int | None = None, parity: int = 0,
                progress: Progress = NULL_PROGRESS) -> tuple[R, ExportResult]:
    """``pack --format tar``: pack into a work folder beside ``tar``, export it, remove the folder.

    ``pack_fn(out_dir)`` runs the pack. The work folder has a fixed name
    (``.NAME.tar.packing``), and a failed pack leaves it in place, so running
    the same command again resumes the downloads as a folder pack does. The
    export is verified against the packer's own key (it just signed), so a
    file changed mid-pack is still caught.
    """
    from cryptography.hazmat.primitives import serialization

    from ..signing import algorithm_of

    folder = tar.parent if str(tar.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"folder {folder} for the tar does not exist", path=str(folder))
    _refuse_existing([tar])
    work = folder / f".{tar.name}.packing"
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise UsageError(f"{work} is in the way (not a folder airpack made); remove it", path=str(work))
    out = work / "bundle"
    if (out / ENVELOPE_NAME).exists():  # packed, then killed before the export: pack it again (resuming from the files there)
        (out / ENVELOPE_NAME).unlink()
        (out / PARTIAL_MARKER).touch()
    try:
        work.mkdir(exist_ok=True)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot create", str(work)) from None
    result = pack_fn(out)  # on failure the work folder stays: the next run resumes in it
    try:
        pub = signer.private_key.public_key()
        pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")
        own = TrustPolicy(keys=(TrustedKey(name="packer", keyid=signer.keyid, algorithm=algorithm_of(pub), public_key=pub, pem=pem),),
                          threshold=1, source="<the packing key>")
        exported = export(ExportOptions(bundle=out, tar=tar, policy=own, split=split, parity=parity,
                                        signer=signer if split else None, progress=progress))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result, exported
