"""``airpack pack``: from a reviewed spec to a signed bundle.

Files are copied and hashed in one pass (in parallel), every safetensors
header is validated on the copy, the content policy is applied, and the
manifest is signed last: a folder without an envelope is an unfinished pack.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import content
from .._fs import atomic_write, check_no_collisions, check_relpath, oserror_to_airpack
from .._json import StrictJSONError, loads_strict
from ..bundle import BundleDir, write_signed
from ..errors import (
    AirpackError,
    ContentPolicyError,
    EnvelopeError,
    ExpiredError,
    IntegrityError,
    SpecError,
    UsageError,
)
from ..gpus import parse_gpu
from ..hashing import copy_and_hash, parallel_map
from ..manifest import ENVELOPE_NAME, FileEntry, Manifest, build_statement, encode, model_slug, now_utc, parse
from ..progress import NULL_PROGRESS, Progress
from ..safetensors_check import read_header, summarize
from ..signing import PAYLOAD_TYPE, Signer, envelope_bytes
from ..spec import ModelSpec, PackSpec
from .fit import estimate_target, worst_estimate
from .verify import check_content_policy, check_files, check_manifest_copy, check_safetensors

PARTIAL_MARKER = ".airpack-partial"
STAGING_DIR = ".airpack-staging"  # partial downloads of an unfinished pack; removed before signing
SKIP_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}
CONFIG_SUMMARY_KEYS = (
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
    "torch_dtype", "dtype", "tie_word_embeddings", "sliding_window", "num_experts", "num_local_experts",
    "n_routed_experts", "num_experts_per_tok", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
    "qk_nope_head_dim", "v_head_dim",
)


@dataclass(frozen=True, kw_only=True)
class PackOptions:
    spec: PackSpec
    out: Path
    signer: Signer | None
    dry_run: bool = False
    allow_expired: bool = False
    endpoint: str | None = None
    token: str | None = None
    now: dt.datetime | None = None
    workers: int | None = None
    progress: Progress = NULL_PROGRESS


@dataclass(frozen=True)
class PlannedFile:
    """One file a pack will write: where it comes from and where it lands in the bundle."""

    bundle_path: str
    size: int
    source: str


@dataclass(frozen=True)
class PackResult:
    out: Path
    manifest: Manifest | None
    planned: tuple[PlannedFile, ...]
    keyid: str | None
    dry_run: bool
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(p.size for p in self.planned)


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


def apply_content_policy(repo_id: str, rels: list[str], *, allow_pickle: bool, allow_code: bool) -> tuple[list[str], list[str]]:
    """Return (pickles, code) among ``rels``, refusing them when the spec does not allow them."""
    pickles = sorted(r for r in rels if content.is_pickle(r))
    code = sorted(r for r in rels if content.is_code(r))
    if pickles and not allow_pickle:
        raise ContentPolicyError(
            f"{repo_id}: pickled weights are not allowed by the spec: {', '.join(pickles[:5])}", path=pickles[0]
        )
    if code and not allow_code:
        raise ContentPolicyError(f"{repo_id}: code files are not allowed by the spec: {', '.join(code[:5])}", path=code[0])
    return pickles, code


def config_summary(config_bytes: bytes | None) -> dict[str, Any]:
    """The config fields an auditor and the fit estimator care about (integers, strings, booleans only)."""
    if config_bytes is None:
        return {}
    try:
        cfg = loads_strict(config_bytes, allow_floats=True, max_depth=16)
    except StrictJSONError as e:
        raise IntegrityError(f"config.json is not valid JSON: {e}", path="config.json") from None
    if not isinstance(cfg, dict):
        raise IntegrityError("config.json is not a JSON object", path="config.json")

    def pick(d: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in CONFIG_SUMMARY_KEYS:
            v = d.get(k)
            if isinstance(v, (bool, int, str)) or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                out[k] = v
        return out

    summary = pick(cfg)
    if isinstance(cfg.get("text_config"), dict):
        summary["text_config"] = pick(cfg["text_config"])
    return summary


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


def copy_into(src: Path, out: Path, bundle_path: str, on_bytes: Callable[[int], None]) -> FileEntry:
    """Copy one file into the bundle through a temp file, hashing exactly what was written."""
    dest = out.joinpath(*bundle_path.split("/"))
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        sfd = os.open(src, os.O_RDONLY)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
            try:
                d = copy_and_hash(sfd, fd, on_bytes=on_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            os.close(sfd)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        tmp = None
    except OSError as e:
        raise oserror_to_airpack(e, "cannot copy", f"{src} -> {dest}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return FileEntry(path=bundle_path, size=d.size, sha256=d.sha256)


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


def finish_model_record(record: dict[str, Any], entries: list[FileEntry], out: Path, prefix: str) -> None:
    """Validate safetensors headers on the copies; record parameters, dtypes and the config summary."""
    infos = []
    for e in entries:
        if content.is_safetensors(e.path):
            infos.append(read_header(out.joinpath(*e.path.split("/")), display=e.path))
    summary = summarize(infos)
    record["parameters"] = summary["parameters"]
    record["dtypes"] = summary["dtypes"]
    cfg_path = out.joinpath(*prefix.split("/"), "config.json")
    cfg = cfg_path.read_bytes() if cfg_path.is_file() else None
    record["config"] = config_summary(cfg)


# -- the operation ---------------------------------------------------------------------


def pack(opts: PackOptions) -> PackResult:
    spec = opts.spec
    now = opts.now or now_utc()
    if spec.expires is not None and spec.expires <= now and not opts.allow_expired:
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
            from ._pack_hub import pack_hub_model

            record, ents, plan = pack_hub_model(m, opts)
        models.append(record)
        entries.extend(ents)
        planned.extend(plan)

    wheels: list[dict[str, Any]] = []
    if spec.wheels is not None:
        from ._pack_wheels import pack_wheels

        wheel_records, wheel_entries, wheel_plan = pack_wheels(spec.wheels, opts)
        wheels.extend(wheel_records)
        entries.extend(wheel_entries)
        planned.extend(wheel_plan)

    check_no_collisions(p.bundle_path for p in planned)
    if opts.dry_run:
        return PackResult(out=opts.out, manifest=None, planned=tuple(planned), keyid=None, dry_run=True,
                          details={"models": models, "wheels": wheels})

    targets = fit_targets(spec, opts.out, models, files=[e.path for e in entries])
    from ..sbom import write_sbom  # the CycloneDX SBOM is a bundle file, so the signature covers it

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


def add_signature(bundle: Path, signer: Signer, *, progress: Progress = NULL_PROGRESS) -> tuple[bool, Manifest]:
    """Co-sign: check the content matches the (still untrusted) payload, then append a signature.

    The co-signer vouches for the bytes, so every file is hashed first. Returns
    (added, manifest); a key that already signed adds nothing.
    """
    b = BundleDir.open(bundle)
    env = b.envelope()
    if env.payload_type != PAYLOAD_TYPE:
        raise EnvelopeError(f"envelope {b.envelope_path} has payload type {env.payload_type!r}", path=str(b.envelope_path))
    manifest = parse(env.payload, digest=hashlib.sha256(env.payload).hexdigest())
    check_manifest_copy(b, env.payload)
    check_content_policy(manifest)
    check_files(b, manifest, progress=progress)
    check_safetensors(b, manifest)
    if any(s.keyid == signer.keyid for s in env.signatures):
        return False, manifest
    sigs = [{"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")} for s in env.signatures]
    sigs.append(signer.sign(PAYLOAD_TYPE, env.payload))
    atomic_write(b.envelope_path, envelope_bytes(PAYLOAD_TYPE, env.payload, sigs))
    return True, manifest
