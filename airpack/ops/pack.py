"""``airpack pack``: from a reviewed spec to a signed bundle.

Files are copied and hashed in one pass (in parallel), every safetensors
header is validated on the copy, the content policy is applied, and the
manifest is signed last: a folder without an envelope is an unfinished pack.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import content
from .._fs import MAX_PATH_DEPTH, atomic_write, check_no_collisions, check_relpath, describe_mode, oserror_to_airpack
from ..bundle import write_signed
from ..errors import (
    AccessDeniedError,
    AirpackError,
    ExpiredError,
    IntegrityError,
    SpecError,
    UnsafePathError,
    UsageError,
)
from ..gpus import parse_gpu
from ..hashing import parallel_map
from ..manifest import ENVELOPE_NAME, FileEntry, Manifest, build_statement, encode, model_slug, now_utc, parse, summary
from ..progress import NULL_PROGRESS, Progress
from ..rules import is_expired
from ..sbom import write_sbom
from ..signing import PAYLOAD_TYPE, Signer, envelope_bytes, parse_envelope, verify_sig
from ..sources import DirSource
from ..spec import ModelSpec, PackSpec, TargetSpec
from ..trust import TrustedKey, TrustPolicy, check_every_signature
from ._pack_common import (
    PICKLE_DUPLICATE,
    ModelPlan,
    Skipped,
    apply_content_policy,
    copy_into,
    finish_model_record,
    packer_hints,
    source_hints,
)
from ._pack_common import STAGING_DIR as STAGING_DIR  # re-exported, like the next two: this module's API
from ._pack_common import PackOptions as PackOptions
from ._pack_common import PlannedFile as PlannedFile
from ._pack_delta import delta_listing, dry_run_delta, for_host, on_host_paths
from ._pack_wheels import pack_wheels
from .fit import estimate_target, worst_estimate
from .verify import read_unverified, verify_source

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
    skipped: tuple[Skipped, ...] = ()  # source files left out without the spec saying so, with the reason
    hub: tuple[dict[str, Any], ...] = ()  # per Hub model: files, bytes, seconds, resumed/downloaded bytes, retries
    warnings: tuple[str, ...] = ()  # ``pack --for``: what the host's profile says it would doubt (an untrusted key, GPUs)
    delta: dict[str, Any] | None = None  # ``pack --for``: what is carried and what is left on the host (``delta_listing``)

    @property
    def total_bytes(self) -> int:
        return sum(p.size for p in self.planned)

    def to_json(self) -> dict[str, Any]:
        if self.dry_run:
            return {
                "dry_run": True,
                "out": str(self.out),
                "files": [{"path": p.bundle_path, "size": p.size, **({"transport": p.transport} if p.transport else {})}
                          for p in self.planned],
                "total_bytes": self.total_bytes,
                "skipped": [s.to_json() for s in self.skipped],
                **self.details,
                **self._for_host(),
            }
        assert self.manifest is not None
        doc = {"dry_run": False, "out": str(self.out), "keyid": self.keyid, **summary(self.manifest),
               "skipped": [s.to_json() for s in self.skipped]}
        if self.tar_sha256 is not None:
            doc.update({"tar_size": self.tar_size, "tar_sha256": self.tar_sha256})
        if self.hub:
            doc["hub"] = hub_totals(self.hub)
        return {**doc, **self._for_host()}

    def _for_host(self) -> dict[str, Any]:
        """``pack --for``'s keys (absent without it, so a full pack's document is as it always was)."""
        return {"delta": self.delta, "warnings": list(self.warnings)} if self.delta is not None else {}


def hub_totals(models: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """``pack --json``'s ``"hub"`` object: the totals over every Hub model, and each model's own figures."""
    keys = ("files", "bytes", "resumed_bytes", "downloaded_bytes", "retries")
    total: dict[str, Any] = {k: sum(int(m.get(k, 0)) for m in models) for k in keys}
    total["seconds"] = round(sum(float(m.get("seconds", 0.0)) for m in models), 3)
    total["connections"] = max(int(m.get("connections", 0)) for m in models)
    total["models"] = [dict(m) for m in models]
    return total


@dataclass(frozen=True)
class SignResult:
    """A co-signature added to ``bundle`` (or not: ``keyid`` had already signed); ``to_json``: ``sign --json``."""

    bundle: Path
    keyid: str
    added: bool
    manifest: Manifest
    checked: bool = False  # the signatures already there were checked against a trust policy
    signers: tuple[TrustedKey, ...] = ()  # with a policy: its keys that have signed, the new signature included
    threshold: int | None = None  # with a policy: how many of them verify requires

    def to_json(self) -> dict[str, Any]:
        return {"bundle": str(self.bundle), "keyid": self.keyid, "added": self.added, "manifest_sha256": self.manifest.digest,
                "signatures_checked": self.checked, "signers": [{"name": k.name, "keyid": k.keyid} for k in self.signers],
                "threshold": self.threshold}


# -- sources -------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalFile:
    """One file a local model folder contributes: its path in the folder, where its bytes really are, its size."""

    rel: str
    source: Path  # the resolved file: a link's target, already checked to stay inside the allowed folder
    size: int


def link_boundary(real_root: Path) -> Path:
    """Where links in a model folder may point: the folder itself, or for a Hub cache snapshot its repo's cache folder.

    A snapshot (``models--ORG--NAME/snapshots/COMMIT``) is made of links into
    ``../../blobs/``; anything else (``/etc/passwd``, a sibling model, a home
    folder) would be packed and signed as if it were part of the model.
    """
    snapshots = real_root.parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        return snapshots.parent
    return real_root


class FolderWalk:
    """The walk of a local model folder: every file it holds, refusing what a bundle must not carry from it.

    Links are followed only while they stay inside ``link_boundary``; a folder
    reached twice on one path is a loop; FIFOs, devices and sockets are
    refused by name (reading a FIFO would hang, a device has no end); anything
    that cannot be read stops the pack (exit 8) rather than being left out.
    The tool folders in ``SKIP_DIRS`` are never packed, and are reported.
    """

    def __init__(self, model: ModelSpec) -> None:
        assert model.path is not None
        self.model = model
        self.root = model.path
        try:
            self.real_root = Path(os.path.realpath(self.root, strict=True))
        except OSError:
            self.real_root = self.root
        if not self.real_root.is_dir():
            raise SpecError(f"model source {self.root} for {model.repo_id} is not a folder", path=str(self.root))
        self.boundary = link_boundary(self.real_root)
        self.files: list[LocalFile] = []
        self.skipped: list[tuple[str, str]] = []
        self.unreadable_hint = (f"airpack cannot read everything in the model folder {self.root}; fix the permissions "
                                "there (every file and folder must be readable by the packer), then run pack again.")

    def run(self) -> FolderWalk:
        st = self._stat(self.real_root, self.root, follow=True)
        self._folder(self.real_root, "", frozenset({(st.st_dev, st.st_ino)}))
        return self

    def _unreadable(self, e: OSError, shown: Path) -> AirpackError:
        err = oserror_to_airpack(e, "cannot read", str(shown))
        err.hint = self.unreadable_hint if isinstance(err, AccessDeniedError) else err.hint
        return err

    def _stat(self, path: Path, shown: Path, *, follow: bool) -> os.stat_result:
        try:
            return os.stat(path, follow_symlinks=follow)
        except OSError as e:
            raise self._unreadable(e, shown) from None

    def _folder(self, real: Path, rel: str, ancestors: frozenset[tuple[int, int]]) -> None:
        shown_dir = self.root / rel if rel else self.root
        if len(ancestors) > MAX_PATH_DEPTH:  # no bundle path may be deeper; and the walk recurses
            raise UnsafePathError(f"unsafe folder {shown_dir}: deeper than {MAX_PATH_DEPTH} levels", path=str(shown_dir))
        try:
            with os.scandir(real) as it:
                names = sorted(entry.name for entry in it)
        except OSError as e:
            raise self._unreadable(e, shown_dir) from None
        for name in names:
            relname = f"{rel}{name}"
            shown = self.root / relname
            path = real / name
            st = self._stat(path, shown, follow=False)
            if name in SKIP_DIRS and (stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                self.skipped.append((relname + "/", "tool folder: never packed"))
                continue
            if stat.S_ISLNK(st.st_mode):
                path = self._link_target(path, shown)
                st = self._stat(path, shown, follow=True)
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    raise UnsafePathError(f"unsafe link {shown}: it loops back to a folder above it ({path})", path=str(shown),
                                          hint=f"Remove the link {shown} from the model folder.")
                self._folder(path, relname + "/", ancestors | {key})
            elif stat.S_ISREG(st.st_mode):
                self._file(relname, path, st, shown)
            else:
                kind = describe_mode(st) or "not a regular file"
                raise UnsafePathError(f"unsafe file {shown}: {kind}; a model folder may hold only files, folders and links",
                                      path=str(shown), hint=f"Remove {shown} from the model folder, then run pack again.")

    def _link_target(self, link: Path, shown: Path) -> Path:
        """The file or folder a link resolves to, refused unless it stays inside the allowed folder."""
        try:
            points_to = os.readlink(link)
            target = Path(os.path.realpath(link, strict=True))
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP):
                why = "a link loop" if e.errno == errno.ELOOP else "a link to nothing"
                raise UnsafePathError(f"unsafe link {shown}: {why}", path=str(shown),
                                      hint=f"Remove or fix the link {shown} in the model folder.") from None
            raise self._unreadable(e, shown) from None
        if not target.is_relative_to(self.boundary):
            raise UnsafePathError(
                f"unsafe link {shown} -> {points_to}: it resolves to {target}, outside the model folder {self.boundary}",
                path=str(shown),
                hint="Copy the file into the model folder instead of linking it (links may point only inside the folder "
                     "the spec names, or for a Hub cache snapshot inside that repo's cache folder).",
            )
        return target

    def _file(self, rel: str, real: Path, st: os.stat_result, shown: Path) -> None:
        if not content.matches(rel, self.model.include, self.model.exclude):
            return
        check_relpath(rel)
        try:  # readable now, or the pack stops here: never a file silently left out
            os.close(os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)))
        except OSError as e:
            raise self._unreadable(e, shown) from None
        self.files.append(LocalFile(rel=rel, source=real, size=st.st_size))


def list_local_files(model: ModelSpec) -> tuple[list[LocalFile], list[tuple[str, str]]]:
    """The files a local model folder contributes, and what is left out without the spec saying so (path, reason)."""
    walk = FolderWalk(model).run()
    if not walk.files:
        raise SpecError(f"model source {walk.root} has no files matching the spec's include/exclude", path=str(walk.root))
    keep = set(content.prefer_safetensors([f.rel for f in walk.files]))
    skipped = list(walk.skipped)
    skipped += [(f.rel, PICKLE_DUPLICATE) for f in walk.files if f.rel not in keep]
    return [f for f in walk.files if f.rel in keep], skipped


def local_commit(entries: list[FileEntry], prefix: str) -> str:
    """A stable 40-hex revision for a local model: same files, same bytes → same commit."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.path):
        h.update(f"{e.path[len(prefix) + 1:]}\0{e.sha256}\n".encode())
    return h.hexdigest()[:40]


# -- writing -------------------------------------------------------------------------


def check_out(out: Path) -> str:
    """What ``--out`` is now ("absent", "empty" or "partial"), refusing a bundle or someone else's folder; writes nothing."""
    if not (out.exists() or out.is_symlink()):
        return "absent"
    if out.is_symlink() or not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder", path=str(out))
    if (out / ENVELOPE_NAME).exists():
        raise UsageError(f"--out {out} already holds a signed bundle; choose another folder", path=str(out))
    if (out / PARTIAL_MARKER).exists():
        return "partial"
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise oserror_to_airpack(e, "cannot read", str(out)) from None
    if not empty:
        raise UsageError(f"--out {out} is not empty; choose a new folder", path=str(out))
    return "empty"


def create_out(out: Path) -> None:
    """Create the output folder (or reuse the one ``check_out`` accepted) and mark it unfinished."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / PARTIAL_MARKER).touch()
    except OSError as e:
        raise oserror_to_airpack(e, "cannot create", str(out)) from None


def _holds_downloads(out: Path, prefixes: list[str]) -> bool:
    """Whether a failed run left downloads a next run resumes from (Hub files, partial files, pip's wheels)."""
    for d in [out / STAGING_DIR, *(out.joinpath(*p.split("/")) for p in prefixes)]:
        if d.is_dir() and any(os.path.isfile(os.path.join(dp, fn)) for dp, _, fns in os.walk(d) for fn in fns):
            return True
    return False


def discard_out(out: Path, state: str, hub_prefixes: list[str]) -> None:
    """After a failed pack, take back what it created, unless it holds downloads to resume (or was unfinished before).

    A folder another run left unfinished stays as it was found plus this
    run's files: the next run prunes what its bundle does not list.
    """
    if state == "partial" or _holds_downloads(out, hub_prefixes):
        return
    if state == "absent":
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in list(out.iterdir()) if out.is_dir() else []:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()


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


def plan_local_model(model: ModelSpec, opts: PackOptions) -> ModelPlan:
    """List, check and plan a local model folder; its ``fetch`` copies and hashes the files."""
    prefix = model_slug(model.repo_id)
    hints = source_hints(f"The model folder {model.path}")
    with packer_hints(hints):
        files, left_out = list_local_files(model)
        pickles, code = apply_content_policy(
            model.repo_id, [f.rel for f in files], allow_pickle=opts.spec.allow_pickle, allow_code=opts.spec.allow_code
        )
        planned = [PlannedFile(bundle_path=f"{prefix}/{f.rel}", size=f.size, source=str(f.source)) for f in files]
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

    def fetch() -> list[FileEntry]:
        task = opts.progress.task(f"copy {model.repo_id}", sum(p.size for p in planned))
        try:
            entries = parallel_map(
                lambda f: copy_into(f.source, opts.out, f"{prefix}/{f.rel}", task.advance), files, workers=opts.workers
            )
        finally:
            task.close()
        finish_model_record(record, entries, opts.out, prefix, spec=opts.spec)
        record["commit"] = local_commit(entries, prefix)
        return entries

    skipped = [Skipped(path=f"{prefix}/{rel}", reason=why) for rel, why in left_out]
    return ModelPlan(record=record, planned=planned, fetch=fetch, skipped=skipped, hints=hints)


def plan_model(model: ModelSpec, opts: PackOptions) -> ModelPlan:
    """One model's plan, from its folder or from the Hub; nothing is written until every model has one."""
    if model.source == "local":
        return plan_local_model(model, opts)
    from ._pack_hub import plan_hub_model  # loads huggingface_hub and its HTTP client: only when a model comes from the Hub

    return plan_hub_model(model, opts)


# -- the operation ---------------------------------------------------------------------

WHEEL_HINTS: dict[type[AirpackError], str] = {
    IntegrityError: "A wheel pip fetched is not what the package index lists; check the index (index_url, find_links) "
                    "and run pack again.",
}


def pack(opts: PackOptions) -> PackResult:
    """Pack a spec: every check that needs no writing first, then the output folder, the files, the signature.

    A refusal before the files are written leaves nothing behind; a failure
    after it takes back the folder it created, unless it holds downloads that
    the next run resumes from.
    """
    warnings: list[str] = []
    if opts.profile is not None:  # before anything is fetched: a sequence the host would refuse is exit 4 here
        adjusted, warnings = for_host(opts.spec, opts.profile, opts.signer.keyid if opts.signer is not None else None)
        opts = dataclasses.replace(opts, spec=adjusted)
    spec = opts.spec
    now = opts.now or now_utc()
    if is_expired(spec.expires, now) and not opts.allow_expired:
        raise ExpiredError(
            f"spec {spec.name}: expires {spec.expires:%Y-%m-%dT%H:%M:%SZ} is already past",
            hint="Set a later bundle.expires, or pass --allow-expired to write it anyway.",
        )
    check_targets(spec)
    if not opts.dry_run and opts.signer is None:
        raise UsageError("pack needs --key to sign the bundle")
    state = check_out(opts.out) if not opts.dry_run else "absent"
    plans = [plan_model(m, opts) for m in spec.models]
    planned = [p for plan in plans for p in plan.planned]
    skipped = tuple(s for plan in plans for s in plan.skipped)
    with packer_hints({UnsafePathError: "Two models of the spec would write the same bundle path; rename one."}):
        check_no_collisions(p.bundle_path for p in planned)
    if opts.dry_run:
        wheels, _, wheel_plan = pack_wheels(spec.wheels, opts) if spec.wheels is not None else ([], [], [])
        details: dict[str, Any] = {"models": [p.record for p in plans], "wheels": wheels}
        if spec.targets:  # the estimate per target, from the Hub's headers or the folder's, before anything is fetched
            from .fit_hub import dry_run_estimator

            details["targets"] = fit_targets(spec, opts.out, details["models"], estimate=dry_run_estimator(plans, opts))
        delta = dry_run_delta(planned + wheel_plan, wheels, opts.profile) if opts.profile is not None else None
        return PackResult(out=opts.out, manifest=None, planned=tuple(planned + wheel_plan), keyid=None, dry_run=True,
                          details=details, skipped=skipped, warnings=tuple(warnings), delta=delta)
    create_out(opts.out)
    try:
        return dataclasses.replace(_write_bundle(opts, plans, now, skipped), warnings=tuple(warnings))
    except Exception:
        discard_out(opts.out, state, [p.record["path"] for p in plans if p.record["source"] == "hub"])
        raise


def _write_bundle(opts: PackOptions, plans: list[ModelPlan], now: dt.datetime, skipped: tuple[Skipped, ...]) -> PackResult:
    """Fetch every planned file into ``opts.out``, then the wheels, the SBOM, the manifest and its signature."""
    spec = opts.spec
    entries: list[FileEntry] = []
    planned = [p for plan in plans for p in plan.planned]
    for plan in plans:
        with packer_hints(plan.hints):
            entries.extend(plan.fetch())
    models = [plan.record for plan in plans]
    wheels: list[dict[str, Any]] = []
    if spec.wheels is not None:
        with packer_hints(WHEEL_HINTS):
            wheel_records, wheel_entries, wheel_plan = pack_wheels(spec.wheels, opts)
        wheels.extend(wheel_records)
        entries.extend(wheel_entries)
        planned.extend(wheel_plan)

    targets = fit_targets(spec, opts.out, models, files=[e.path for e in entries])
    # the CycloneDX SBOM is a bundle file, so the signature covers it
    entries.append(write_sbom(opts.out, name=spec.name, channel=spec.channel, sequence=spec.sequence, created=now,
                              files=entries, models=models, wheels=wheels))
    on_host = on_host_paths(entries, models, wheels, opts.profile) if opts.profile is not None else []
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
        on_host=on_host,
    )
    payload = encode(statement)
    assert opts.signer is not None
    prune_out(opts.out, {e.path for e in entries} - set(on_host))  # a delta's files the host holds leave the folder here
    sig = opts.signer.sign(PAYLOAD_TYPE, payload)
    try:
        write_signed(opts.out, payload, envelope_bytes(PAYLOAD_TYPE, payload, [sig]))
        (opts.out / PARTIAL_MARKER).unlink(missing_ok=True)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot write", str(opts.out)) from None
    manifest = parse(payload, digest=hashlib.sha256(payload).hexdigest())
    delta = None
    if opts.profile is not None:
        delta = delta_listing([(f.path, f.size) for f in manifest.carried], [(f.path, f.size) for f in manifest.expected_on_host], [])
    return PackResult(out=opts.out, manifest=manifest, planned=tuple(planned), keyid=opts.signer.keyid, dry_run=False,
                      skipped=skipped, hub=tuple(p.hub_stats for p in plans if p.hub_stats), delta=delta)


def fit_targets(spec: PackSpec, out: Path, models: list[dict[str, Any]], *, files: list[str] | None = None,
                estimate: Callable[[TargetSpec, dict[str, Any]], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The spec's GPU targets, each with the fit estimate made now from the packed files (integers and strings only).

    ``estimate(target, model record)`` replaces the reading of the packed files (a dry run reads the plan's).
    """
    targets: list[dict[str, Any]] = []
    for t in spec.targets:
        entry: dict[str, Any] = {"gpu": t.gpu, "count": t.count, "runtime": t.runtime, "batch": t.batch}
        if t.context is not None:
            entry["context"] = t.context
        estimates = [
            estimate(t, m) if estimate is not None else
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


def add_signature(bundle: Path, signer: Signer, *, policy: TrustPolicy | None = None,
                  progress: Progress = NULL_PROGRESS) -> SignResult:
    """Co-sign: check the content matches the (still untrusted) payload, then append a signature.

    The co-signer vouches for the bytes, so the whole pipeline runs first in
    its unverified mode (every check but whose signatures are there). With a
    ``policy``, every signature already there must also be by one of its keys
    (``trust.check_every_signature``, exit 4): a co-signature must never lend
    weight to a signature nobody trusted, or to garbage. That check runs on the
    cheap envelope before any file is hashed, and again on the very envelope
    the new signature joins. A key whose valid signature is already there adds
    nothing (``added`` is False); a key id alone proves nothing.
    """
    if Path(bundle).is_file():
        raise UsageError(
            f"sign takes a bundle folder; {bundle} is a file (a tar?), which cannot be co-signed in place",
            path=str(bundle),
            hint="Co-sign the bundle folder, then write the tar with `airpack export BUNDLE --tar OUT.tar`; "
                 "pack without --format tar when a bundle needs more than one signature.",
        )
    source = DirSource.existing(bundle)
    where = source.envelope_where
    if policy is not None:  # refuse early, before hashing what may be many gigabytes
        check_every_signature(read_unverified(source).envelope, policy, expected_type=PAYLOAD_TYPE, where=where)
    vb = verify_source(source, None, progress=progress)
    env = parse_envelope(vb.envelope, where=where)
    signers = check_every_signature(env, policy, expected_type=PAYLOAD_TYPE, where=where) if policy is not None else ()
    public = signer.public_key
    added = not any(verify_sig(public, env.payload_type, env.payload, s.sig) for s in env.signatures)
    if added:
        sigs = [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")} for s in env.signatures]
        sigs.append(signer.sign(PAYLOAD_TYPE, env.payload))
        atomic_write(source.folder / ENVELOPE_NAME, envelope_bytes(PAYLOAD_TYPE, env.payload, sigs))
    if policy is not None:
        signed = {k.keyid for k in signers} | {signer.keyid}
        signers = tuple(k for k in policy.keys if k.keyid in signed)
    return SignResult(bundle=bundle, keyid=signer.keyid, added=added, manifest=vb.manifest, checked=policy is not None,
                      signers=signers, threshold=policy.threshold if policy is not None else None)
