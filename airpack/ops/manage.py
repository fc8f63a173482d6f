"""The registry operations after install: list, show, remove, rollback, log verify.

It exists apart from ``ops.install`` because none of these reads a bundle:
they read the registry (``list_installed``, ``show``, ``verify_log``) or
change which installed bytes stay and which revision a ref names
(``remove``, ``rollback``), through the same transactions and the same
one-audit-line-per-attempt rule (``ops._registry_ops``).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import NotInstalledError, UsageError
from ..registry import (
    HUB_DIR,
    STAGING_DIR,
    WHEELS_DIR,
    Database,
    InstalledModel,
    LogReport,
    RefRow,
    Registry,
    StoredFile,
    Txn,
    Writer,
    audit_base,
    kept_ref,
    repo_folder,
    requirements_name,
)
from ._install_plan import requirements_text
from ._registry_ops import Attempt, check_snapshot, logged_run, run_txn, switch_refs


@dataclass(frozen=True, kw_only=True)
class RemoveOptions:
    registry: Path
    name: str
    revision: str | None = None
    dry_run: bool = False  # say what would go, change nothing (no lock, no audit line)


@dataclass(frozen=True, kw_only=True)
class RollbackOptions:
    registry: Path
    name: str
    dry_run: bool = False  # say which refs would move, change nothing (no lock, no audit line)


@dataclass(frozen=True, kw_only=True)
class ShowOptions:
    registry: Path
    name: str
    revision: str | None = None


@dataclass(frozen=True, kw_only=True)
class RemovedRevision:
    """One (repo, revision) a remove took out of the registry."""

    repo_id: str
    revision: str
    commit: str
    bundle: str
    sequence: int

    def to_json(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit, "bundle": self.bundle,
                "sequence": self.sequence}


@dataclass(frozen=True, kw_only=True)
class RemoveResult:
    """What a remove took out (or, with ``dry_run``, would take out).

    ``blobs_removed`` and ``bytes_freed`` count only bytes that leave the
    disk: a blob that is also a hard link elsewhere (another model's blob, a
    wheel) is counted in ``blobs_kept_shared``, with the blobs other revisions still use.
    """

    removed: tuple[RemovedRevision, ...]
    bundles_removed: tuple[int, ...]
    blobs_removed: int
    blobs_kept_shared: int
    bytes_freed: int
    registry: str
    txn: str | None
    dry_run: bool = False

    def record(self) -> dict[str, Any]:
        """What the audit line of the remove holds (the result without where and which txn)."""
        return {
            "removed": [x.to_json() for x in self.removed],
            "bundles_removed": list(self.bundles_removed),
            "blobs_removed": self.blobs_removed,
            "blobs_kept_shared": self.blobs_kept_shared,
            "bytes_freed": self.bytes_freed,
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.record(), "registry": self.registry, "txn": self.txn, "dry_run": self.dry_run}


@dataclass(frozen=True, kw_only=True)
class RefChange:
    """One ref a rollback moved: from the current commit to the one installed before it."""

    repo_id: str
    revision: str
    from_commit: str
    to_commit: str
    bundle: str
    sequence: int

    def to_json(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "from": self.from_commit, "to": self.to_commit,
                "bundle": self.bundle, "sequence": self.sequence}


@dataclass(frozen=True, kw_only=True)
class RollbackResult:
    changes: tuple[RefChange, ...]
    registry: str
    txn: str | None
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"changes": [c.to_json() for c in self.changes], "registry": self.registry, "txn": self.txn, "dry_run": self.dry_run}


@dataclass(frozen=True, kw_only=True)
class InstalledModels:
    """What ``list`` shows: every installed (repo, revision), in install order; ``pending``: an unsettled write, and why."""

    models: tuple[InstalledModel, ...]
    pending: str | None = None

    def to_json(self) -> list[dict[str, Any]]:
        return [x.to_json() for x in self.models]


@dataclass(frozen=True, kw_only=True)
class LoadInstructions:
    """The exact environment and lines that load an installed model with no network."""

    env: dict[str, str]
    shell: str
    python: tuple[str, ...]
    vllm: str
    pip: str | None

    def to_json(self) -> dict[str, Any]:
        return {"env": dict(self.env), "shell": self.shell, "python": list(self.python), "vllm": self.vllm, "pip": self.pip}


@dataclass(frozen=True, kw_only=True)
class ShowResult:
    """One installed model, its files, the other installed revisions of its repo, and how to load it offline."""

    model: InstalledModel
    registry: str
    snapshot: str
    files: tuple[StoredFile, ...]
    revisions: tuple[InstalledModel, ...]
    load: LoadInstructions
    pending: str | None = None  # an interrupted write the reader could not settle (printed on stderr, not in the JSON)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.model.to_json(),
            "registry": self.registry,
            "snapshot": self.snapshot,
            "files_list": [f.to_json() for f in self.files],
            "revisions": [{"revision": o.ref, "commit": o.commit, "current": o.current, "status": o.status, "bundle": o.bundle,
                           "sequence": o.sequence,
                           "installed_at": o.installed_at} for o in self.revisions],
            "load": self.load.to_json(),
        }


def _match_revision(x: InstalledModel, revision: str) -> bool:
    return revision in (x.commit, x.ref) or (len(revision) >= 7 and x.commit.startswith(revision))


def _resolve(conn: Database, name: str, revision: str | None) -> tuple[list[InstalledModel], list[int]]:
    """Model rows NAME means (a repo id, else a bundle name) and, for a bundle name, the bundles themselves."""
    rows = conn.models(repo_id=name)
    if rows:
        if revision is not None:
            rows = [x for x in rows if _match_revision(x, revision)]
            if not rows:
                raise NotInstalledError(f"{name} is installed, but not at revision {revision}", path=name)
        return rows, []
    if revision is None:
        bids = conn.active_bundle_ids(name)
        if bids:
            return [x for x in conn.models() if x.bundle_id in bids], bids
    raise NotInstalledError(f"{name} is not installed (no model repo id or bundle of that name)", path=name)


# -- remove ------------------------------------------------------------------------------------------


def remove(opts: RemoveOptions) -> RemoveResult:
    """Remove a model (all revisions, or one) or a whole bundle; bytes still used elsewhere stay.

    With ``dry_run`` the same plan is made from a read-only connection and
    returned: no lock, no staging, no audit line, nothing changed.
    """
    reg = Registry.open(opts.registry)
    if opts.dry_run:
        with reg.reader(settle=False) as conn:
            rows, bundle_ids = _resolve(conn, opts.name, opts.revision)
            plan = Txn(reg=reg, conn=conn, kind="remove", id="dry-run", stage=reg.path(STAGING_DIR), audit={})
            rec, _ = _plan_remove(reg, conn, plan, rows, bundle_ids)
        return _remove_result(rec, str(reg.root), None)
    attempt = Attempt(audit_base("remove", target=opts.name, revision=opts.revision))

    def body(w: Writer) -> RemoveResult:
        rows, bundle_ids = _resolve(w.conn, opts.name, opts.revision)
        txn = w.begin("remove", attempt.record)
        rec = run_txn(txn, lambda: _remove(w, txn, attempt, rows, bundle_ids))
        return _remove_result(rec, str(w.reg.root), txn.id)

    out: RemoveResult = logged_run(reg, attempt, body)
    return out


def _remove_result(rec: dict[str, Any], registry: str, txn: str | None) -> RemoveResult:
    return RemoveResult(
        removed=tuple(RemovedRevision(**x) for x in rec["removed"]), bundles_removed=tuple(rec["bundles_removed"]),
        blobs_removed=rec["blobs_removed"], blobs_kept_shared=rec["blobs_kept_shared"], bytes_freed=rec["bytes_freed"],
        registry=registry, txn=txn, dry_run=txn is None,
    )


@dataclass
class _Removal:
    """What a remove changes besides the paths it puts on the txn: ref rows to write, blobs deleted, blobs kept (shared)."""

    ref_updates: list[tuple[str, str, str | None, int | None]] = field(default_factory=list)  # (repo, ref, commit or None, model id)
    blobs: list[str] = field(default_factory=list)  # the blob files (registry paths) the remove deletes
    kept: int = 0


def _plan_remove(reg: Registry, conn: Database, txn: Txn, rows: list[InstalledModel],
                 bundle_ids: list[int]) -> tuple[dict[str, Any], _Removal]:
    """Put every path to delete and ref to move on ``txn``; returns the audit record and the row changes (nothing is written)."""
    removed = {x.model_id for x in rows}
    gather = _Removal()
    for repo in sorted({x.repo_id for x in rows}):
        _plan_repo(conn, txn, gather, repo, removed)
    wheels = _plan_wheels(conn, txn, bundle_ids)
    freed_blobs, linked, freed_bytes = _freed(reg, gather.blobs, wheels)
    out = {
        "removed": [{"repo_id": x.repo_id, "revision": x.ref, "commit": x.commit, "bundle": x.bundle, "sequence": x.sequence} for x in rows],
        "bundles_removed": bundle_ids,
        "blobs_removed": freed_blobs,
        "blobs_kept_shared": gather.kept + linked,
        "bytes_freed": freed_bytes,
    }
    return out, gather


def _freed(reg: Registry, blobs: list[str], wheels: list[str]) -> tuple[int, int, int]:
    """(blobs whose bytes leave the disk, blobs that live on as a hard link elsewhere, bytes freed).

    The store hard-links equal bytes across repos and into ``wheels/``, so
    deleting a name frees its bytes only when every link to that inode is
    deleted too (``st_nlink`` names them all, links outside this remove included).
    """
    inodes: dict[tuple[int, int], tuple[int, int, list[str]]] = {}  # (dev, ino) -> (nlink, size, names deleted)
    for rel in [*blobs, *wheels]:
        st = reg.lstat(rel)
        if st is None:
            continue
        key = (st.st_dev, st.st_ino)
        nlink, size, names = inodes.setdefault(key, (st.st_nlink, st.st_size, []))
        names.append(rel)
    blob_set = set(blobs)
    freed = linked = freed_bytes = 0
    for nlink, size, names in inodes.values():
        gone = len(names) >= nlink
        if gone:
            freed_bytes += size
        n_blobs = sum(1 for n in names if n in blob_set)
        if gone:
            freed += n_blobs
        else:
            linked += n_blobs
    return freed, linked, freed_bytes


def _remove(w: Writer, txn: Txn, attempt: Attempt, rows: list[InstalledModel], bundle_ids: list[int]) -> dict[str, Any]:
    """Plan, commit and log the remove; returns its audit record (what ``RemoveResult.record`` holds)."""
    out, gather = _plan_remove(w.reg, w.conn, txn, rows, bundle_ids)
    removed = {x.model_id for x in rows}
    txn.result = "removed"
    txn.prepare()
    affected_bundles = sorted({x.bundle_id for x in rows} | set(bundle_ids))

    def rec(conn: Database) -> None:
        conn.delete_models(sorted(removed))
        conn.delete_wheels(bundle_ids)
        for repo, ref, commit, mid in gather.ref_updates:
            if commit is None:
                conn.delete_ref(repo, ref)
            else:
                conn.set_ref(repo, ref, commit, mid)
        conn.retire_empty_bundles(affected_bundles)

    txn.commit(rec)
    attempt.logged = True
    txn.finish(out)
    return out


def _files_of(conn: Database, xs: list[InstalledModel]) -> dict[tuple[str, str], str]:
    """(commit, path) -> sha256 of every file of these model rows."""
    return {(x.commit, f.path): f.sha256 for x in xs for f in conn.model_files(x.model_id)}


def _plan_repo(conn: Database, txn: Txn, gather: _Removal, repo: str, removed: set[int]) -> None:
    """One repo: the whole folder if nothing of it stays, else the snapshots, links and blobs only the removed rows used."""
    base = f"{HUB_DIR}/{repo_folder(repo)}"
    all_rows = conn.models(repo_id=repo)
    remain = [x for x in all_rows if x.model_id not in removed]
    gone = [x for x in all_rows if x.model_id in removed]
    gone_files = _files_of(conn, gone)
    refs = conn.refs(repo)
    if not remain:
        txn.deletes.append(base)
        gather.blobs += [f"{base}/blobs/{sha}" for sha in sorted(set(gone_files.values()))]
        gather.ref_updates += [(repo, r.ref, None, None) for r in refs]
        return
    remain_files = _files_of(conn, remain)
    remain_commits = {x.commit for x in remain}
    for commit in sorted({x.commit for x in gone} - remain_commits):
        txn.deletes.append(f"{base}/snapshots/{commit}")
        txn.refs[f"{base}/refs/{kept_ref(commit)}"] = None  # the commit's last row goes: so does the ref that kept it
    for (commit, path), _sha in sorted(gone_files.items()):
        if commit in remain_commits and (commit, path) not in remain_files:
            txn.deletes.append(f"{base}/snapshots/{commit}/{path}")
            parts = path.split("/")[:-1]
            txn.prune += [f"{base}/snapshots/{commit}/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    remain_shas = set(remain_files.values())
    for sha in sorted(set(gone_files.values())):
        if sha in remain_shas:
            gather.kept += 1
        else:
            txn.deletes.append(f"{base}/blobs/{sha}")
            gather.blobs.append(f"{base}/blobs/{sha}")
    _plan_refs(txn, gather, repo, refs, remain)


def _plan_refs(txn: Txn, gather: _Removal, repo: str, refs: list[RefRow], remain: list[InstalledModel]) -> None:
    """Each ref keeps its commit if a remaining row holds it, else moves to the newest remaining row of that ref, else goes."""
    base = f"{HUB_DIR}/{repo_folder(repo)}"
    for r in refs:
        holders = [x for x in remain if x.ref == r.ref and x.commit == r.commit]
        if holders:
            gather.ref_updates.append((repo, r.ref, r.commit, max(x.model_id for x in holders)))
            continue
        same_ref = [x for x in remain if x.ref == r.ref]
        if same_ref:
            nxt = max(same_ref, key=lambda x: x.model_id)
            gather.ref_updates.append((repo, r.ref, nxt.commit, nxt.model_id))
            txn.refs[f"{base}/refs/{r.ref}"] = nxt.commit
        else:
            gather.ref_updates.append((repo, r.ref, None, None))
            txn.refs[f"{base}/refs/{r.ref}"] = None


def _plan_wheels(conn: Database, txn: Txn, bundle_ids: list[int]) -> list[str]:
    """Wheels go with their bundle (removed by bundle name); files another bundle uses stay; requirements follow.

    Returns the wheel files deleted.
    """
    deleted: list[str] = []
    for wr in conn.bundle_wheels(bundle_ids):
        if not conn.wheel_used_elsewhere(wr.filename, excluding=bundle_ids):
            txn.deletes.append(f"{WHEELS_DIR}/{wr.filename}")
            deleted.append(f"{WHEELS_DIR}/{wr.filename}")
    for name in conn.bundle_names(bundle_ids):
        other = conn.latest_bundle_with_wheels(name, excluding=bundle_ids)
        rel = f"{WHEELS_DIR}/{requirements_name(name)}"
        if other is None:
            txn.texts[rel] = None
        else:
            ws = conn.bundle_wheels([other.id])
            txn.texts[rel] = requirements_text(name, other.sequence, [(x.name, x.version, x.sha256) for x in ws])
    return deleted


# -- rollback ----------------------------------------------------------------------------------------


def rollback(opts: RollbackOptions) -> RollbackResult:
    """Point NAME's refs back at the revision installed before the current one (it must still be installed, snapshot and all).

    With ``dry_run`` the same changes are worked out from a read-only
    connection and returned: no lock, no audit line, nothing changed.
    """
    reg = Registry.open(opts.registry)
    if opts.dry_run:
        with reg.reader(settle=False) as conn:
            planned = _rollback_changes(reg, conn, opts.name)
        return RollbackResult(changes=tuple(c for c, _ in planned), registry=str(reg.root), txn=None, dry_run=True)
    attempt = Attempt(audit_base("rollback", target=opts.name))

    def body(w: Writer) -> RollbackResult:
        changes = _rollback_changes(w.reg, w.conn, opts.name)
        txn = w.begin("rollback", attempt.record)

        def steps() -> dict[str, Any]:
            switch_refs(txn, attempt, [(c.repo_id, c.revision, c.to_commit, mid) for c, mid in changes], result="rolled back")
            rec = {"changes": [c.to_json() for c, _ in changes]}
            txn.finish(rec)
            return rec

        run_txn(txn, steps)
        return RollbackResult(changes=tuple(c for c, _ in changes), registry=str(reg.root), txn=txn.id)

    out: RollbackResult = logged_run(reg, attempt, body)
    return out


def _rollback_changes(reg: Registry, conn: Database, name: str) -> list[tuple[RefChange, int]]:
    """Each ref of NAME and the earlier revision it would move to (with that row's model id); refuses a gone snapshot."""
    rows, _ = _resolve(conn, name, None)
    changes: list[tuple[RefChange, int]] = []
    for repo in sorted({x.repo_id for x in rows}):
        all_rows = conn.models(repo_id=repo)
        for r in conn.refs(repo):
            ref, cur = r.ref, r.commit
            at = [x.model_id for x in all_rows if x.ref == ref and x.commit == cur]
            pivot = max(at) if at else 1 << 62
            earlier = [x for x in all_rows if x.ref == ref and x.commit != cur and x.model_id < pivot]
            if earlier:
                prev = max(earlier, key=lambda x: x.model_id)
                check_snapshot(reg, repo, prev.commit, conn.model_files(prev.model_id))
                changes.append((RefChange(repo_id=repo, revision=ref, from_commit=cur, to_commit=prev.commit, bundle=prev.bundle,
                                          sequence=prev.sequence), prev.model_id))
    if not changes:
        raise NotInstalledError(f"{name}: no earlier installed revision to roll back to", path=name,
                                hint="`airpack list` shows the installed revisions; rollback goes back only to one still installed.")
    return changes


# -- reading the registry ------------------------------------------------------------------------------


def list_installed(registry: Path) -> InstalledModels:
    """Every installed revision, as a loader would see it; works on a read-only registry."""
    reg = Registry.open(registry)
    with reg.reader() as conn:
        return InstalledModels(models=_as_loaded(reg, conn.models()), pending=conn.pending)


def _as_loaded(reg: Registry, rows: list[InstalledModel]) -> tuple[InstalledModel, ...]:
    """The rows as a loader sees them: a row is current only if the ``refs/`` file on disk names its commit too.

    The database and the ref files agree except while a committed write is
    unfinished (a crash a reader could not settle: ``Registry.settle``) or
    after a hand edit; what loads then is what the ref file says, so that is
    what ``list`` and ``show`` report.
    """
    disk = {(x.repo_id, x.ref): reg.read_ref(f"{HUB_DIR}/{repo_folder(x.repo_id)}/refs/{x.ref}") for x in rows}
    # Where the file and the database disagree, the newest row of the commit the file names is the current one.
    newest: dict[tuple[str, str], int] = {}
    for x in rows:
        if disk[(x.repo_id, x.ref)] == x.commit:
            newest[(x.repo_id, x.ref)] = max(newest.get((x.repo_id, x.ref), 0), x.model_id)
    out = []
    for x in rows:
        on_disk = disk[(x.repo_id, x.ref)]
        if on_disk != x.ref_commit:
            x = replace(x, current=newest.get((x.repo_id, x.ref)) == x.model_id, ref_commit=on_disk)
        out.append(x)
    return tuple(out)


def load_instructions(root: Path, repo_id: str, revision: str, requirements: Path | None) -> LoadInstructions:
    """The exact environment and lines that load an installed model with no network."""
    hub = str(root / HUB_DIR)
    q = json.dumps
    env = {"HF_HUB_CACHE": hub, "HF_HUB_OFFLINE": "1"}
    shell = f"export HF_HUB_CACHE={shlex.quote(hub)} HF_HUB_OFFLINE=1"
    python = [
        "import os",
        f"os.environ[\"HF_HUB_CACHE\"] = {q(hub)}",
        "os.environ[\"HF_HUB_OFFLINE\"] = \"1\"  # set both before huggingface_hub or transformers is imported",
        "from huggingface_hub import snapshot_download",
        f"path = snapshot_download({q(repo_id)}, revision={q(revision)})",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"tokenizer = AutoTokenizer.from_pretrained({q(repo_id)}, revision={q(revision)}, local_files_only=True)",
        f"model = AutoModelForCausalLM.from_pretrained({q(repo_id)}, revision={q(revision)}, local_files_only=True)",
    ]
    vllm = f"HF_HUB_CACHE={shlex.quote(hub)} HF_HUB_OFFLINE=1 vllm serve {shlex.quote(repo_id)} --revision {shlex.quote(revision)}"
    pip = None
    if requirements is not None:
        pip = (f"pip install --no-index --find-links {shlex.quote(str(root / WHEELS_DIR))} --require-hashes "
               f"-r {shlex.quote(str(requirements))}")
    return LoadInstructions(env=env, shell=shell, python=tuple(python), vllm=vllm, pip=pip)


def show(opts: ShowOptions) -> ShowResult:
    """One installed model (NAME: repo id, or a bundle name with one model) and how to load it offline."""
    name, revision = opts.name, opts.revision
    reg = Registry.open(opts.registry)
    with reg.reader() as conn:
        rows, bids = _resolve(conn, name, revision)
        rows = list(_as_loaded(reg, rows))
        if bids:
            repos = sorted({x.repo_id for x in rows})
            if len(repos) != 1:
                raise UsageError(f"bundle {name} holds {len(repos)} models ({', '.join(repos) or 'none'}); name one by repo id", path=name)
        if revision is None:
            cur = [x for x in rows if x.current]
            x = max(cur or rows, key=lambda r: r.model_id)
        else:
            x = max(rows, key=lambda r: r.model_id)
        files = tuple(conn.model_files(x.model_id))
        check_snapshot(reg, x.repo_id, x.commit, files)  # the load lines below must not point at a snapshot that is gone
        others = _as_loaded(reg, conn.models(repo_id=x.repo_id))
        req_rel = f"{WHEELS_DIR}/{requirements_name(x.bundle)}"
        req = reg.path(req_rel) if x.has_wheels and reg.check_plain_file(req_rel) else None
        pending = conn.pending
    rev_arg = x.ref if x.current else x.commit
    return ShowResult(
        model=x, registry=str(reg.root), snapshot=str(reg.path(f"{HUB_DIR}/{repo_folder(x.repo_id)}/snapshots/{x.commit}")),
        files=files, revisions=others, load=load_instructions(reg.root, x.repo_id, rev_arg, req), pending=pending,
    )


def verify_log(registry: Path) -> LogReport:
    reg = Registry.open(registry)
    return reg.verify_log()


__all__ = [
    "InstalledModels", "LoadInstructions", "RefChange", "RemoveOptions", "RemoveResult", "RemovedRevision", "RollbackOptions",
    "RollbackResult", "ShowOptions", "ShowResult", "list_installed", "load_instructions", "remove", "rollback", "show", "verify_log",
]
