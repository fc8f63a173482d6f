"""Pack one model from the Hugging Face Hub: resolve, choose files, HEAD each, check space, fetch, hash.

Planning HEADs every file (over the connection budget) before anything is
written: sizes are checked against the listing and each file's transport is
chosen (``choose_transport``), so a file nothing can fetch is refused, also in
a dry run. Fetching keeps what an earlier run finished (on the journal's word
when the file is untouched since, else by hash), sends the Xet-backed files
through huggingface_hub's Xet path one at a time (hf_xet has its own
concurrency), and all the others through one ``segments.Engine`` run.

Resuming is by content, not by name: a partial download is keyed by the
hash the Hub lists, so a branch that moved between two runs can never splice
old bytes into a new file.
"""

from __future__ import annotations

import shutil
import stat
import time
from pathlib import Path
from typing import Any

from .. import content
from .._fs import check_no_collisions, oserror_to_airpack
from ..errors import DiskSpaceError, FetchError, IntegrityError, SpecError
from ..fetch.hub import (
    HeadInfo,
    HubClient,
    HubFile,
    HubSnapshot,
    Refusal,
    Transport,
    choose_transport,
    whole_file_matches,
    xet_available,
)
from ..fetch.journal import DoneRecord, Journal
from ..fetch.segments import Engine, EngineOptions, FileJob, Stats
from ..hashing import parallel_map
from ..manifest import FileEntry, model_slug
from ..progress import ProgressTask
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


def _bytes_still_needed(files: list[HubFile], root: Path, journal: Journal) -> int:
    """What is left to download, judged by sizes and the journal (the hashes are checked when each file's turn comes)."""
    need = 0
    for f in files:
        dest = root.joinpath(*f.path.split("/"))
        try:
            if dest.is_file() and dest.stat().st_size == f.size:
                continue
        except OSError:
            pass
        need += max(0, f.size - sum(b - a for a, b in journal.have(f.content_id, f.size)))
    return need


def _heads(client: HubClient, snap: HubSnapshot, files: list[HubFile], opts: PackOptions) -> dict[str, HeadInfo]:
    """One HEAD per file (over the connection budget): sizes checked and transports chosen before anything is written."""
    heads = parallel_map(lambda f: client.head(snap, f), files, workers=max(1, min(opts.connections, len(files))))
    return {f.path: h for f, h in zip(files, heads, strict=True)}


def _transports(snap: HubSnapshot, files: list[HubFile], heads: dict[str, HeadInfo], xet_ok: bool) -> dict[str, Transport]:
    out: dict[str, Transport] = {}
    for f in files:
        t = choose_transport(f, heads[f.path], xet_ok)
        if isinstance(t, Refusal):
            raise FetchError(f"cannot fetch {snap.repo_id}/{f.path} @ {snap.commit[:12]}: no way to fetch it: {t.reason}",
                             path=f.path, hint="Exclude it in the spec's include/exclude, or install what the reason names.")
        out[f.path] = t
    return out


def plan_hub_model(model: ModelSpec, opts: PackOptions) -> ModelPlan:
    """Resolve the revision, choose the files, HEAD each, check policy, transports and disk; ``fetch`` downloads (resuming)."""
    assert model.revision is not None
    client = HubClient(endpoint=opts.endpoint, token=opts.token, etag_timeout=opts.timeout)
    snap = client.resolve(model.repo_id, model.revision)
    client.require_access(snap)
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
        heads = _heads(client, snap, files, opts)
    transports = _transports(snap, files, heads, opts.xet and xet_available())
    planned = [
        PlannedFile(bundle_path=f"{prefix}/{f.path}", size=f.size, source=f"{client.endpoint}/{model.repo_id}@{snap.commit}/{f.path}",
                    transport=transports[f.path], sha256=f.sha256)
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
    journal = Journal(staging)
    total = sum(f.size for f in files)
    needed = _bytes_still_needed(files, root, journal) if not opts.dry_run else total
    disk_preflight(opts.out, needed, f"{model.repo_id}@{snap.commit[:12]}")
    stats: dict[str, Any] = {}

    def fetch() -> list[FileEntry]:
        if journal.warning:
            opts.progress.message(journal.warning)
        try:
            entries = _Download(client, snap, files, heads, transports, root, prefix, staging, journal, opts).run(stats)
        finally:
            journal.close()
        finish_model_record(record, entries, opts.out, prefix, spec=opts.spec)
        return entries

    skipped = [Skipped(path=f"{prefix}/{p}", reason=PICKLE_DUPLICATE) for p in left_out]
    return ModelPlan(record=record, planned=planned, fetch=fetch, skipped=skipped, hints=hints, hub_stats=stats)


class _Download:
    """One model's files: those already whole are kept (by the journal, else by hash), the rest fetched."""

    def __init__(self, client: HubClient, snap: HubSnapshot, files: list[HubFile], heads: dict[str, HeadInfo],
                 transports: dict[str, Transport], root: Path, prefix: str, staging: Path, journal: Journal,
                 opts: PackOptions) -> None:
        self.client, self.snap, self.files, self.heads, self.transports = client, snap, files, heads, transports
        self.root, self.prefix, self.staging, self.journal, self.opts = root, prefix, staging, journal, opts
        self.stats = Stats()

    def _dest(self, f: HubFile) -> Path:
        return self.root.joinpath(*f.path.split("/"))

    def _already_whole(self, f: HubFile, overall: ProgressTask) -> FileEntry | None:
        """A file an earlier run finished: taken on the journal's word if untouched since, else only if it hashes right."""
        dest, bundle_path = self._dest(f), f"{self.prefix}/{f.path}"
        rec = self.journal.done(f.content_id, f.size, bundle_path)
        try:
            st = dest.lstat()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise oserror_to_airpack(e, "cannot read", str(dest)) from None
        if rec is not None and stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns, st.st_ino) == (
                rec.size, rec.mtime_ns, rec.ino):
            sha256 = rec.sha256
        else:
            whole = whole_file_matches(dest, f)
            if whole is None:
                try:
                    dest.unlink()
                except OSError as e:
                    raise oserror_to_airpack(e, "cannot replace", str(dest)) from None
                return None
            # changed on disk since (or never journaled): verified by hash, kept, and journaled for the next run
            sha256 = whole.sha256
            self.journal.record_done(f.content_id, DoneRecord(path=bundle_path, sha256=sha256, size=f.size,
                                                              mtime_ns=st.st_mtime_ns, ino=st.st_ino))
        overall.advance(f.size)
        self.stats.add(resumed_bytes=f.size, files=1, bytes=f.size)
        return FileEntry(path=bundle_path, size=f.size, sha256=sha256)

    def run(self, stats_out: dict[str, Any]) -> list[FileEntry]:
        opts, snap = self.opts, self.snap
        t0 = time.monotonic()
        overall = opts.progress.task(f"{snap.repo_id} @ {snap.commit[:12]}", sum(f.size for f in self.files))
        done: dict[str, FileEntry] = {}
        try:
            todo = []
            for f in self.files:
                entry = self._already_whole(f, overall)
                if entry is not None:
                    done[f.path] = entry
                else:
                    todo.append(f)
            http = [f for f in todo if self.transports[f.path] == "http"]
            for f in todo:
                if self.transports[f.path] == "xet":
                    d = self.client.fetch_xet(snap, f, self._dest(f), self.staging, overall.advance)
                    self.stats.add(files=1, bytes=f.size, downloaded_bytes=f.size)
                    done[f.path] = FileEntry(path=f"{self.prefix}/{f.path}", size=d.size, sha256=d.sha256)
            jobs = [self._job(f) for f in http]
            engine = Engine(self._engine_options(), self.journal, opts.progress, overall, self.stats,
                            fail_message=lambda j, cause: self.client.fail(snap, j.path, j.size, cause, j.kept()))
            engine.run(jobs)
            for j in jobs:
                assert j.digest is not None
                done[j.path] = FileEntry(path=j.bundle_path, size=j.digest.size, sha256=j.digest.sha256)
        finally:
            overall.close()
            s = self.stats
            stats_out.update(repo_id=snap.repo_id, files=s.files, bytes=s.bytes, seconds=round(time.monotonic() - t0, 3),
                             resumed_bytes=s.resumed_bytes, downloaded_bytes=s.downloaded_bytes, retries=s.retries,
                             connections=opts.connections)
        return [done[f.path] for f in self.files]

    def _engine_options(self) -> EngineOptions:
        o = self.opts
        return EngineOptions(connections=o.connections, segment_size=o.segment_size, retries=o.retries,
                             retry_base=o.retry_base, max_wait=o.max_retry_wait, timeout=o.timeout)

    def _job(self, f: HubFile) -> FileJob:
        return FileJob(repo_id=self.snap.repo_id, path=f.path, bundle_path=f"{self.prefix}/{f.path}", size=f.size,
                       content_id=f.content_id, lfs=f.lfs, partial=self.staging / f"{f.content_id}.part",
                       dest=self._dest(f), locate=self.client.locator(self.snap, f),
                       location=self.client.location(self.heads[f.path]))  # the plan's HEAD; fresh ones on retries
