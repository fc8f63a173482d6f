"""What every registry-writing operation shares: one audit line per attempt, txn steps, ref switches.

It exists because install (from any form, OCI included), remove and rollback
all promise the same thing: every attempt leaves exactly one audit line, a
refusal changes nothing else, and a failure before the commit takes back
whatever reached the live tree. ``logged_run`` writes the one refusal line;
``abort_unless_committed`` (and ``run_txn`` over it) takes a txn back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import AirpackError
from ..registry import HUB_DIR, Database, Registry, Txn, Writer, error_record, repo_folder


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
