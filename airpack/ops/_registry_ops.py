"""What every registry-writing operation shares: one audit line per attempt, txn steps, ref switches.

It exists because install, remove, rollback (and the OCI install's early
refusals) all promise the same thing: every attempt leaves exactly one audit
line, a refusal changes nothing else, and a failure before the commit takes
back whatever reached the live tree. ``log_refusal`` is the one
refusal-audit helper; ``logged_run`` and ``run_txn`` wrap the two places a
refusal can happen (before the writer is held, and inside a txn).
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


def log_refusal(reg: Registry, record: dict[str, Any], e: BaseException) -> None:
    """Append the refusal line of ``record`` for ``e``; if even that fails, say so in the original error rather than hide it."""
    try:
        reg.audit_append({**record, "result": "refused" if isinstance(e, AirpackError) else "failed", "error": error_record(e)})
    except AirpackError as log_err:
        if isinstance(e, AirpackError):
            e.message = f"{e.message} (and the audit line could not be written: {log_err.message})"


def logged_run(reg: Registry, attempt: Attempt, body: Callable[[Writer], Any]) -> Any:
    """Run ``body`` with the writer; any refusal (the lock held included) leaves one audit line."""
    try:
        with reg.writer() as w:
            return body(w)
    except BaseException as e:
        if not attempt.logged:
            attempt.logged = True
            log_refusal(reg, attempt.record, e)
        raise


def run_txn(txn: Txn, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a txn's steps; before its commit any failure takes back what reached the live tree."""
    try:
        return body()
    except BaseException:
        if not txn.committed:
            txn.abort()
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
