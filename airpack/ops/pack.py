"""``airpack pack``: from a reviewed spec to a signed bundle.

Files are copied and hashed in one pass (in parallel), every safetensors
header is validated on the copy, the content policy is applied, and the
manifest is signed last: a folder without an envelope is an unfinished pack.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import content
from .._fs import atomic_write, check_no_collisions, check_relpath, oserror_to_airpack
from ..bundle import write_signed
from ..errors import (
    AirpackError,
    ExpiredError,
    SpecError,
    UsageError,
)
from ..gpus import parse_gpu
from ..hashing import parallel_map
from ..manifest import ENVELOPE_NAME, FileEntry, Manifest, build_statement, encode, model_slug, now_utc, parse, summary
from ..progress import NULL_PROGRESS, Progress
from ..rules import is_expired
from ..sbom import write_sbom
from ..signing import PAYLOAD_TYPE, Signer, envelope_bytes, parse_envelope
from ..sources import DirSource
from ..spec import ModelSpec, PackSpec
from ._pack_common import STAGING_DIR as STAGING_DIR  # re-exported, like the next two: this module's API
from ._pack_common import PackOptions as PackOptions
from ._pack_common import PlannedFile as PlannedFile
from ._pack_common import apply_content_policy, copy_into, finish_model_record
from ._pack_wheels import pack_wheels
from .fit import estimate_target, worst_estimate
from .verify import verify_source

PARTIAL_MARKER = ".airpack-partial"
SKIP_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}


@dataclass(frozen=True)
class PackResult:
    """The bundle packed (or, for a dry run, what would be); ``to_json``: ``pack --json``.

    ``tar_size`` and ``tar_sha256`` are set by ``pack --format tar`` (``out`` then names the tar).
    """

    out: Path
    manifest: Manifest | None
    planned: tuple[PlannedFile, ...]
    keyid: str | None
    dry_run: bool
    details: dict[str, Any] = field(default_factory=dict)
    tar_size: int | None = None
    tar_sha256: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(p.size for p in self.planned)

    def to_json(self) -> dict[str, Any]:
        if self.dry_run:
            return {
                "dry_run": True,
                "out": str(self.out),
                "files": [{"path": p.bundle_path, "size": p.size} for p in self.planned],
                "total_bytes": self.total_bytes,
                **self.details,
            }
        assert self.manifest is not None
        doc = {"dry_run": False, "out": str(self.out), "keyid": self.keyid, **summary(self.manifest)}
        if self.tar_sha256 is not None:
            doc.update({"tar_size": self.tar_size, "tar_sha256": self.tar_sha256})
        return doc


@dataclass(frozen=True)
class SignResult:
    """A co-signature added to ``bundle`` (or not: ``keyid`` had already signed); ``to_json``: ``sign --json``."""

    bundle: Path
    keyid: str
    added: bool
    manifest: Manifest

    def to_json(self) -> dict[str, Any]:
        return {"bundle": str(self.bundle), "keyid": self.keyid, "added": self.added, "manifest_sha256": self.manifest.digest}


# -- sources -------------------------------------------------------------------------


def list_local_files(model: ModelSpec) -> list[tuple[str, Path, int]]:
    """(relative path, absolute source, size) of every file a local model folder contributes."""
    assert model.path is not None
    root = model.path
    if not root.is_dir():
        raise SpecError(f"model source {root} for {model.repo_id} is not a folder", path=str(root))
    found: list[tuple[str, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not os.path.islink(os.path.join(dirpath, d)))
        for fn in sorted(filenames):
            full = Path(dirpath) / fn
            rel = full.relative_to(root).as_posix()
            try:
                st = full.stat()  # the packer's own folder: a link to a blob (HF cache) is fine
            except OSError as e:
                raise oserror_to_airpack(e, "cannot read", str(full)) from None
            if not os.path.isfile(full):
                continue
            check_relpath(rel)
            if content.matches(rel, model.include, model.exclude):
                found.append((rel, full, st.st_size))
    if not found:
        raise SpecError(f"model source {root} has no files matching the spec's include/exclude", path=str(root))
    keep = set(content.prefer_safetensors([r for r, _, _ in found]))
    return [f for f in found if f[0] in keep]


def local_commit(entries: list[FileEntry], prefix: str) -> str:
    """A stable 40-hex revision for a local model: same files, same bytes → same commit."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.path):
        h.update(f"{e.path[len(prefix) + 1:]}\0{e.sha256}\n".encode())
    return h.hexdigest()[:40]


# -- writing -------------------------------------------------------------------------


def prepare_out(out: Path) -> None:
    """Create the output folder, or reuse one left by an interrupted pack; never overwrite a bundle."""
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder", path=str(out))
        if (out / ENVELOPE_NAME).exists():
            raise UsageError(f"--out {out} already holds a signed bundle; choose another folder", path=str(out))
        if any(out.iterdir()) and not (out / PARTIAL_MARKER).exists():
            raise UsageError(f"--out {out} is not empty; choose a new folder", path=str(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / PARTIAL_MARKER).touch()
    except OSError as e:
        raise oserror_to_airpack(e, "cannot create", str(out)) from None


def prune_out(out: Path, keep: set[str]) -> None:
    """Drop what an interrupted run left that this bundle does not list (staging, files of another spec)."""
    try:
        if (out / STAGING_DIR).exists():
            shutil.rmtree(out / STAGING_DIR)
        for dirpath, dirnames, filenames in os.walk(out, topdown=False):
            rel_dir = Path(dirpath).relative_to(out).as_posix()
            for fn in filenames:
                rel = fn if rel_dir == "." else f"{rel_dir}/{fn}"
                if rel not in keep and rel != PARTIAL_MARKER:
                    os.unlink(os.path.join(dirpath, fn))
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if os.path.islink(full):
                    os.unlink(full)
                elif not os.listdir(full):
                    os.rmdir(full)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot clean", str(out)) from None


def pack_local_model(model: ModelSpec, opts: PackOptions) -> tuple[dict[str, Any], list[FileEntry], list[PlannedFile]]:
    files = list_local_files(model)
    prefix = model_slug(model.repo_id)
    pickles, code = apply_content_policy(
        model.repo_id, [r for r, _, _ in files], allow_pickle=opts.spec.allow_pickle, allow_code=opts.spec.allow_code
    )
    planned = [PlannedFile(bundle_path=f"{prefix}/{rel}", size=size, source=str(src)) for rel, src, size in files]
    check_no_collisions(p.bundle_path for p in planned)  # before copying: on some media they would overwrite
    record: dict[str, Any] = {
        "repo_id": model.repo_id,
        "source": "local",
        "path": prefix,
        "pickles": pickles,
        "code": code,
    }
    if model.license:
        record["license"] = model.license
    if opts.dry_run:
        return record, [], planned
    task = opts.progress.task(f"copy {model.repo_id}", sum(p.size for p in planned))
    try:
        entries = parallel_map(
            lambda f: copy_into(f[1], opts.out, f"{prefix}/{f[0]}", task.advance), files, workers=opts.workers
        )
    finally:
        task.close()
    finish_model_record(record, entries, opts.out, prefix)
    record["commit"] = local_commit(entries, prefix)
    return record, entries, planned


# -- the operation ---------------------------------------------------------------------


def pack(opts: PackOptions) -> PackResult:
    spec = opts.spec
    now = opts.now or now_utc()
    if is_expired(spec.expires, now) and not opts.allow_expired:
        raise ExpiredError(
            f"spec {spec.name}: expires {spec.expires:%Y-%m-%dT%H:%M:%SZ} is already past",
            hint="Set a later bundle.expires, or pass --allow-expired to write it anyway.",
        )
    check_targets(spec)
    if not opts.dry_run:
        if opts.signer is None:
            raise UsageError("pack needs --key to sign the bundle")
        prepare_out(opts.out)

    models: list[dict[str, Any]] = []
    entries: list[FileEntry] = []
    planned: list[PlannedFile] = []
    for m in spec.models:
        if m.source == "local":
            record, ents, plan = pack_local_model(m, opts)
        else:
            from ._pack_hub import pack_hub_model  # loads huggingface_hub and its HTTP client: only when a model comes from the Hub

            record, ents, plan = pack_hub_model(m, opts)
        models.append(record)
        entries.extend(ents)
        planned.extend(plan)

    wheels: list[dict[str, Any]] = []
    if spec.wheels is not None:
        wheel_records, wheel_entries, wheel_plan = pack_wheels(spec.wheels, opts)
        wheels.extend(wheel_records)
        entries.extend(wheel_entries)
        planned.extend(wheel_plan)

    check_no_collisions(p.bundle_path for p in planned)
    if opts.dry_run:
        return PackResult(out=opts.out, manifest=None, planned=tuple(planned), keyid=None, dry_run=True,
                          details={"models": models, "wheels": wheels})

    targets = fit_targets(spec, opts.out, models, files=[e.path for e in entries])
    # the CycloneDX SBOM is a bundle file, so the signature covers it
    entries.append(write_sbom(opts.out, name=spec.name, channel=spec.channel, sequence=spec.sequence, created=now,
                              files=entries, models=models, wheels=wheels))
    statement = build_statement(
        name=spec.name,
        channel=spec.channel,
        sequence=spec.sequence,
        created=now,
        expires=spec.expires,
        files=entries,
        models=models,
        wheels=wheels,
        allow_pickle=spec.allow_pickle,
        allow_code=spec.allow_code,
        targets=targets,
    )
    payload = encode(statement)
    assert opts.signer is not None
    prune_out(opts.out, {e.path for e in entries})
    sig = opts.signer.sign(PAYLOAD_TYPE, payload)
    try:
        write_signed(opts.out, payload, envelope_bytes(PAYLOAD_TYPE, payload, [sig]))
        (opts.out / PARTIAL_MARKER).unlink(missing_ok=True)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot write", str(opts.out)) from None
    manifest = parse(payload, digest=hashlib.sha256(payload).hexdigest())
    return PackResult(out=opts.out, manifest=manifest, planned=tuple(planned), keyid=opts.signer.keyid, dry_run=False)


def fit_targets(spec: PackSpec, out: Path, models: list[dict[str, Any]], *, files: list[str] | None = None) -> list[dict[str, Any]]:
    """The spec's GPU targets, each with the fit estimate made now from the packed files (integers and strings only)."""
    targets: list[dict[str, Any]] = []
    for t in spec.targets:
        entry: dict[str, Any] = {"gpu": t.gpu, "count": t.count, "runtime": t.runtime, "batch": t.batch}
        if t.context is not None:
            entry["context"] = t.context
        estimates = [
            estimate_target(out, m["path"], m["repo_id"], gpu=t.gpu, count=t.count, context=t.context, runtime=t.runtime,
                            batch=t.batch, files=files)
            for m in models
        ]
        if estimates:
            entry["estimate"] = worst_estimate(estimates)
        if len(estimates) > 1:
            entry["estimates"] = estimates
        targets.append(entry)
    return targets


def check_targets(spec: PackSpec) -> None:
    """Refuse a target GPU the catalog does not know before anything is fetched."""
    for i, t in enumerate(spec.targets):
        try:
            parse_gpu(t.gpu, count=t.count)
        except AirpackError as e:
            raise SpecError(f"spec [[targets]] #{i + 1}: {e.message}") from None


def add_signature(bundle: Path, signer: Signer, *, progress: Progress = NULL_PROGRESS) -> SignResult:
    """Co-sign: check the content matches the (still untrusted) payload, then append a signature.

    The co-signer vouches for the bytes, so the whole pipeline runs first in
    its unverified mode (every check but whose signatures are there). A key
    that already signed adds nothing (``added`` is False).
    """
    source = DirSource.existing(bundle)
    vb = verify_source(source, None, progress=progress)
    env = parse_envelope(vb.envelope, where=source.envelope_where)
    if any(s.keyid == signer.keyid for s in env.signatures):
        return SignResult(bundle=bundle, keyid=signer.keyid, added=False, manifest=vb.manifest)
    sigs = [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")} for s in env.signatures]
    sigs.append(signer.sign(PAYLOAD_TYPE, env.payload))
    atomic_write(source.folder / ENVELOPE_NAME, envelope_bytes(PAYLOAD_TYPE, env.payload, sigs))
    return SignResult(bundle=bundle, keyid=signer.keyid, added=True, manifest=vb.manifest)
