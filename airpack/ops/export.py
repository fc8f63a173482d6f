"""``airpack export``: a verified bundle folder to one deterministic tar, or to signed parts with parity.

Export never launders a tampered bundle: the envelope is checked against the
host's policy, the tree against the manifest, and every file is hashed in the
same read that streams it into the tar; a mismatch aborts the export and
removes what it wrote. Nothing lands under its final name until the whole
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

from .._fs import atomic_write, fsync_dir, open_regular_nofollow, oserror_to_airpack, read_capped
from ..bundle import BundleDir
from ..errors import BundleMismatchError, FileMismatch, IntegrityError, MismatchReport, UsageError
from ..hashing import CHUNK
from ..manifest import ENVELOPE_NAME, MANIFEST_NAME, Manifest, parse
from ..parts import BackgroundSink, Layout, PartInfo, PartsWriter, build_statement, index_name, part_names, plan_layout, sign_index
from ..progress import NULL_PROGRESS, Progress
from ..signing import MAX_ENVELOPE_BYTES, PAYLOAD_TYPE, Signer, parse_envelope
from ..tarball import TarWriter, archive_size
from ..trust import TrustedKey, TrustPolicy, verify_envelope
from .pack import PARTIAL_MARKER
from .verify import check_content_policy, check_fresh, check_manifest_copy, check_safetensors, check_tree

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


def _verified_inputs(opts: ExportOptions) -> tuple[BundleDir, bytes, bytes, Manifest, tuple[TrustedKey, ...]]:
    """The envelope bytes exactly as on disk, verified; the payload; the parsed manifest; its signers."""
    b = BundleDir.open(opts.bundle)
    where = str(b.envelope_path)
    try:
        raw = read_capped(b.envelope_path, MAX_ENVELOPE_BYTES, display=where, what="envelope")
    except FileNotFoundError:
        from ..errors import EnvelopeError

        raise EnvelopeError(f"no signature envelope at {where}", path=where) from None
    verified = verify_envelope(parse_envelope(raw, where=where), opts.policy, expected_type=PAYLOAD_TYPE, where=where)
    manifest = parse(verified.payload, digest=hashlib.sha256(verified.payload).hexdigest())
    check_fresh(manifest, now=opts.now)
    check_content_policy(manifest)
    check_manifest_copy(b, verified.payload)
    report = check_tree(b, manifest)
    if report:
        raise BundleMismatchError(report)
    check_safetensors(b, manifest)
    return b, raw, verified.payload, manifest, verified.signers


def _stream_file(b: BundleDir, path: str, size: int, sha256: str, writer: TarWriter, advance: Callable[[int], None]) -> None:
    """Copy one file into the tar and hash exactly the bytes copied; a mismatch aborts the export."""
    fd = open_regular_nofollow(b.path_of(path), display=path)
    h = hashlib.sha256()
    got = 0
    try:
        writer.begin(path, size)
        while True:
            data = os.read(fd, CHUNK)
            if not data:
                break
            got += len(data)
            if got > size:
                break
            h.update(data)
            writer.write(data)
            advance(len(data))
    except OSError as e:
        raise oserror_to_airpack(e, "cannot read", path) from None
    finally:
        os.close(fd)
    if got != size:
        raise BundleMismatchError(MismatchReport(changed=(FileMismatch(path=path, reason="size changed while exporting",
                                                                      expected_size=size, actual_size=got),)))
    actual = h.hexdigest()
    if actual != sha256:
        raise BundleMismatchError(MismatchReport(changed=(FileMismatch(path=path, reason="digest differs", expected_size=size,
                                                                      actual_size=got, expected_sha256=sha256, actual_sha256=actual),)))
    writer.end()


def _write_tar(b: BundleDir, raw_env: bytes, payload: bytes, manifest: Manifest, consume: Callable[[bytes], None],
               progress: Progress, *, tar_hash: Any = None) -> None:
    """Stream the tar into ``consume`` on a worker thread; ``tar_hash`` (if given) is fed here, balancing the two threads."""
    sink = BackgroundSink(consume)

    def emit(data: bytes) -> None:
        if tar_hash is not None:
            tar_hash.update(data)
        sink(data)

    writer = TarWriter(emit, mtime=int(manifest.created.timestamp()))
    task = progress.task(f"export {manifest.name}", manifest.total_bytes)
    done = False
    try:
        writer.add_bytes(ENVELOPE_NAME, raw_env)
        writer.add_bytes(MANIFEST_NAME, payload)
        for f in sorted(manifest.files, key=lambda f: f.path):
            _stream_file(b, f.path, f.size, f.sha256, writer, task.advance)
        writer.close()
        done = True
    finally:
        task.close()
        if done:
            sink.close()  # a write error on the worker surfaces here
        else:
            with contextlib.suppress(Exception):  # the error already on its way names the cause
                sink.close()


def _refuse_existing(paths: list[Path]) -> None:
    for p in paths:
        if os.path.lexists(p):
            raise UsageError(f"{p} already exists; remove it or choose another --tar name", path=str(p))


def export(opts: ExportOptions) -> ExportResult:
    """Verify the bundle, then write the tar (or its parts and the signed index) in one pass over the files."""
    tar = Path(opts.tar)
    if opts.split is None and opts.parity:
        raise UsageError("--parity needs --split SIZE")
    if opts.split is not None and opts.signer is None:
        raise UsageError("export --split needs --key KEY to sign the parts index")
    folder = tar.parent if str(tar.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"folder {folder} for --tar does not exist", path=str(folder))
    b, raw_env, payload, manifest, signers = _verified_inputs(opts)
    members = [(ENVELOPE_NAME, len(raw_env)), (MANIFEST_NAME, len(payload))] + [(f.path, f.size) for f in manifest.files]
    total = archive_size(members)
    tar_hash = hashlib.sha256()

    if opts.split is None:
        _refuse_existing([tar])
        tmp_fd, tmp_name = tempfile.mkstemp(prefix=f".{tar.name}.", suffix=".tmp", dir=folder)
        tmp = Path(tmp_name)

        def to_file(data: bytes) -> None:
            tar_hash.update(data)
            view = memoryview(data)
            while view:
                view = view[os.write(tmp_fd, view):]

        try:
            try:
                _write_tar(b, raw_env, payload, manifest, to_file, opts.progress)
                os.fsync(tmp_fd)
            finally:
                os.close(tmp_fd)
            size = tmp.stat().st_size
            if size != total:
                raise IntegrityError(f"the tar is {size} bytes, {total} were planned", path=str(tar))
            os.chmod(tmp, 0o644)
            os.replace(tmp, tar)
            fsync_dir(folder)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(tar)) from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return ExportResult(tar=tar, tar_size=total, tar_sha256=tar_hash.hexdigest(), manifest=manifest, signers=signers)

    layout = plan_layout(total, opts.split, opts.parity)
    names = part_names(tar.name, layout)
    idx = folder / index_name(tar.name)
    _refuse_existing([folder / n for n in names] + [idx])
    pw = PartsWriter(folder, names, layout)

    try:
        # The worker codes parity and hashes each part; this thread hashes files and the tar.
        _write_tar(b, raw_env, payload, manifest, pw.write, opts.progress, tar_hash=tar_hash)
        parts = pw.finish()
        statement = build_statement(
            tar_name=tar.name, tar_size=total, tar_sha256=tar_hash.hexdigest(), layout=layout, parts=parts,
            bundle={"name": manifest.name, "channel": manifest.channel, "sequence": manifest.sequence,
                    "manifest_sha256": manifest.digest},
        )
        assert opts.signer is not None
        envelope = sign_index(statement, opts.signer)
        pw.commit()
    except BaseException:
        pw.discard()
        raise
    atomic_write(idx, envelope)
    return ExportResult(tar=tar, tar_size=total, tar_sha256=tar_hash.hexdigest(), manifest=manifest, signers=signers,
                        layout=layout, parts=tuple(parts), index=idx)


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
