"""What every registry-writing operation shares: one audit line per attempt, txn steps, ref switches.

It exists because install (from any form, OCI included), remove and rollback
all promise the same thing: every attempt leaves exactly one audit line, a
refusal changes nothing else, and a failure before the commit takes back
whatever reached the live tree. ``logged_run`` writes the one refusal line;
``abort_unless_committed`` (and ``run_txn`` over it) takes a txn back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import AirpackError, SnapshotMissingError
from ..registry import HUB_DIR, Database, Layout, Registry, StoredFile, Txn, Writer, error_record, repo_folder


@dataclass
class Attempt:
    """The audit record of one command, and whether its line has been written (exactly one per attempt)."""

    record: dict[str, Any]
    logged: bool = False


def logged_run(reg: Registry, attempt: Attempt, body: Callable[[Writer], Any]) -> Any:
    """Run ``body`` with the writer; any refusal (the lock held included) leaves one audit line.

    If even that line cannot be written, the original error says so rather than hide it.
    """
    try:
        with reg.writer() as w:
            return body(w)
    except BaseException as e:
        if not attempt.logged:
            attempt.logged = True
            try:
                reg.audit_append({**attempt.record, "result": "refused" if isinstance(e, AirpackError) else "failed",
                                  "error": error_record(e)})
            except AirpackError as log_err:
                if isinstance(e, AirpackError):
                    e.message = f"{e.message} (and the audit line could not be written: {log_err.message})"
        raise


def abort_unless_committed(txn: Txn | None) -> None:
    """Before its commit, a failed txn takes back whatever reached the live tree; after it, recovery finishes it."""
    if txn is not None and not txn.committed:
        txn.abort()


def run_txn(txn: Txn, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a txn's steps, taking the txn back if they fail before its commit."""
    try:
        return body()
    except BaseException:
        abort_unless_committed(txn)
        raise


def switch_refs(txn: Txn, attempt: Attempt, moves: list[tuple[str, str, str, int]], *, result: str) -> None:
    """Point refs at commits already installed ((repo_id, ref, commit, model_id) each): files first, then the row."""
    txn.refs = {f"{HUB_DIR}/{repo_folder(repo)}/refs/{ref}": commit for repo, ref, commit, _ in moves}
    txn.result = result
    txn.prepare()

    def rec(conn: Database) -> None:
        for repo, ref, commit, model_id in moves:
            conn.set_ref(repo, ref, commit, model_id)

    txn.commit(rec)
    attempt.logged = True


def snapshot_rel(repo_id: str, commit: str) -> str:
    return f"{HUB_DIR}/{repo_folder(repo_id)}/snapshots/{commit}"


def check_snapshot(reg: Layout, repo_id: str, commit: str, files: Iterable[StoredFile]) -> None:
    """Refuse (exit 6) to call an installed revision usable when its snapshot or a file of it is gone.

    Rollback, reactivation, ``show`` and the same-bundle no-op all answer
    "this revision is there"; a snapshot that a cache tool or a person deleted
    would make that a lie the offline load finds out later. One ``stat`` per
    file (following the link to its blob); no byte is read.
    """
    rel = snapshot_rel(repo_id, commit)
    missing: str | None = None
    if reg.safe_dir(rel, create=False) is None:
        missing = rel
    else:
        for f in files:
            if not os.path.exists(reg.path(f"{rel}/{f.path}")):
                missing = f"{rel}/{f.path}"
                break
    if missing is not None:
        raise SnapshotMissingError(
            f"{repo_id} @ {commit[:12]} is recorded as installed, but {missing} is gone from the registry", path=str(reg.path(missing)),
            hint=f"Remove that revision (`airpack remove {repo_id} --revision {commit}`), then install its bundle again "
                 "from the medium.")
