"""Pack one model from the Hugging Face Hub: resolve, choose files, check space, fetch, hash.

Resuming is by content, not by name: a file already in the output folder is
kept only if it hashes to what the Hub lists at the resolved commit, and a
partial download is keyed by that hash, so a branch that moved between two
runs can never splice old bytes into a new file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .. import content
from .._fs import check_no_collisions, oserror_to_airpack
from ..errors import DiskSpaceError, GatedRepoError, IntegrityError, SpecError
from ..fetch.hub import HubClient, HubFile, HubSnapshot, whole_file_matches
from ..hashing import parallel_map
from ..manifest import FileEntry, model_slug
from ..spec import ModelSpec
from ..units import format_bytes
from ._pack_common import (
    PICKLE_DUPLICATE,
    STAGING_DIR,
    ModelPlan,
    PackOptions,
    PlannedFile,
    Skipped,
    apply_content_policy,
    finish_model_record,
    packer_hints,
    source_hints,
)

# Kept free beyond the files themselves: the manifest, temp files, the filesystem's own needs.
DISK_RESERVE = 64 * 1024 * 1024


def select_files(model: ModelSpec, snap: HubSnapshot) -> tuple[list[HubFile], list[str]]:
    """The spec's include/exclude, then safetensors over pickled duplicates (without being asked): (kept, left out)."""
    chosen = [f for f in snap.files if content.matches(f.path, model.include, model.exclude)]
    if not chosen:
        raise SpecError(
            f"{model.repo_id}@{snap.commit[:12]}: no file matches the spec's include/exclude "
            f"({len(snap.files)} file(s) in the repo)"
        )
    keep = set(content.prefer_safetensors([f.path for f in chosen]))
    return [f for f in chosen if f.path in keep], [f.path for f in chosen if f.path not in keep]


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def disk_preflight(out: Path, needed: int, what: str) -> None:
    """Refuse (exit 8) before downloading when the Hub's sizes cannot fit on the output filesystem."""
    where = _existing_ancestor(out)
    try:
        free = shutil.disk_usage(where).free
    except OSError as e:
        raise oserror_to_airpack(e, "cannot check free space on", str(where)) from None
    if needed + DISK_RESERVE > free:
        raise DiskSpaceError(
            f"{what} needs {format_bytes(needed)} more (plus {format_bytes(DISK_RESERVE)} reserve) but {where} has only "
            f"{format_bytes(free)} free",
            path=str(out),
        )


def _bytes_still_needed(files: list[HubFile], root: Path, staging: Path) -> int:
    """What is left to download, judged by sizes (the hashes are checked when each file's turn comes)."""
    need = 0
    for f in files:
        dest = root.joinpath(*f.path.split("/"))
        part = staging / f"{f.content_id}.part"
        try:
            if dest.is_file() and dest.stat().st_size == f.size:
                continue
            have = part.stat().st_size if part.is_file() else 0
        except OSError:
            have = 0
        need += max(0, f.size - have)
    return need


def plan_hub_model(model: ModelSpec, opts: PackOptions) -> ModelPlan:
    """Resolve the revision, choose the files, check the policy and the disk; its ``fetch`` downloads (resuming)."""
    assert model.revision is not None
    client = HubClient(endpoint=opts.endpoint, token=opts.token)
    snap = client.resolve(model.repo_id, model.revision)
    if snap.gated and not client.has_token:
        raise GatedRepoError(
            f"{model.repo_id} is gated: pass a token (HF_TOKEN or --token-file) from an account that accepted its licence"
        )
    hints = source_hints(f"{model.repo_id}@{snap.commit[:12]} on the Hub")
    hints[IntegrityError] = (f"The Hub's copy of {model.repo_id}@{snap.commit[:12]} does not match its own listing; "
                             "run pack again (it resumes), or check --endpoint if a mirror serves it.")
    with packer_hints(hints):
        files, left_out = select_files(model, snap)
        pickles, code = apply_content_policy(
            model.repo_id, [f.path for f in files], allow_pickle=opts.spec.allow_pickle, allow_code=opts.spec.allow_code
        )
        prefix = model_slug(model.repo_id)
        check_no_collisions(f"{prefix}/{f.path}" for f in files)  # before writing: on some disks they would overwrite
    planned = [
        PlannedFile(bundle_path=f"{prefix}/{f.path}", size=f.size, source=f"{client.endpoint}/{model.repo_id}@{snap.commit}/{f.path}")
        for f in files
    ]
    record: dict[str, Any] = {
        "repo_id": model.repo_id,
        "source": "hub",
        "path": prefix,
        "revision": model.revision,
        "commit": snap.commit,
        "license": snap.license or model.license,
        "gated": snap.gated,
        "pipeline_tag": snap.pipeline_tag,
        "library_name": snap.library_name,
        "hub_files": {f.path: f.hub_record() for f in files},
        "pickles": pickles,
        "code": code,
    }
    root = opts.out.joinpath(*prefix.split("/"))
    staging = opts.out / STAGING_DIR / "hub"
    total = sum(f.size for f in files)
    needed = _bytes_still_needed(files, root, staging) if not opts.dry_run else total
    disk_preflight(opts.out, needed, f"{model.repo_id}@{snap.commit[:12]}")

    def fetch() -> list[FileEntry]:
        entries = _download(client, snap, files, root, prefix, staging, opts)
        finish_model_record(record, entries, opts.out, prefix, spec=opts.spec)
        return entries

    skipped = [Skipped(path=f"{prefix}/{p}", reason=PICKLE_DUPLICATE) for p in left_out]
    return ModelPlan(record=record, planned=planned, fetch=fetch, skipped=skipped, hints=hints)


def _download(client: HubClient, snap: HubSnapshot, files: list[HubFile], root: Path, prefix: str, staging: Path,
              opts: PackOptions) -> list[FileEntry]:
    """Fetch every file not already whole in ``root`` (judged by hash), in parallel, resuming partial downloads."""
    overall = opts.progress.task(f"{snap.repo_id} @ {snap.commit[:12]}", sum(f.size for f in files))

    def one(f: HubFile) -> FileEntry:
        dest = root.joinpath(*f.path.split("/"))
        bundle_path = f"{prefix}/{f.path}"
        whole = whole_file_matches(dest, f)
        if whole is not None:  # left whole by an interrupted run: verified by hash, kept
            overall.advance(f.size)
            return FileEntry(path=bundle_path, size=whole.size, sha256=whole.sha256)
        if dest.exists() or dest.is_symlink():
            try:
                dest.unlink()
            except OSError as e:
                raise oserror_to_airpack(e, "cannot replace", str(dest)) from None
        task = opts.progress.task(f.path, f.size)

        def on_bytes(n: int) -> None:
            task.advance(n)
            overall.advance(n)

        try:
            d = client.download(snap, f, dest, partial=staging / f"{f.content_id}.part", on_bytes=on_bytes)
        finally:
            task.close()
        return FileEntry(path=bundle_path, size=d.size, sha256=d.sha256)

    try:
        return parallel_map(one, files, workers=opts.workers)
    finally:
        overall.close()
