"""check: re-verify what the registry holds against its database, its audit log and (optionally) today's policy."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..units import format_bytes
from . import cli
from ._common import Output, airpack_command
from .install_cmds import PathArg, registry_option

if TYPE_CHECKING:
    from ..ops.check import CheckResult


def _check_text(r: CheckResult) -> list[str]:
    a = r.audit
    lines = [
        f"{'OK' if r.ok else 'FAILED'}: {r.registry}: {r.models} model(s) of {r.bundles} bundle(s); "
        f"{r.files} file(s), {format_bytes(r.bytes)} re-hashed",
    ]
    lines += [f"  {line}" for line in r.report.lines()]
    if a.error is not None:
        lines.append(f"  audit log: {a.error['message']}")
    else:
        state = "chain intact" if a.ok else "chain intact, but operations are missing from it"
        lines.append(f"  audit log: {a.lines} line(s), {state}; the database records {a.operations} operation(s)")
    if r.trust is not None:
        t = r.trust
        lines.append(f"  trust: {len(t.checked)} kept envelope(s) re-verified against {t.policy} (threshold {t.threshold})")
        lines += [f"  NOT TRUSTED: {u.name} (channel {u.channel}, sequence {u.sequence}): {u.reason}" for u in t.untrusted]
    lines += [f"  note: {n}" for n in r.notes]
    return lines


@airpack_command(cli, "check")
@registry_option
@click.option("--trust", "policy", type=PathArg, envvar="AIRPACK_TRUST",
              help="Also re-verify each installed bundle's kept envelope against this policy (or AIRPACK_TRUST).")
def check_cmd(out: Output, registry: Path, policy: Path | None) -> None:
    """Re-hash every installed file and check refs, links, kept envelopes and the audit log against the database.

    Exit 3 names every missing, changed or unknown file; with --trust, exit 4
    names the installed bundles that policy no longer trusts.
    """
    from ..ops.check import CheckOptions, check
    from ..trust import load_policy

    p = load_policy(policy) if policy is not None else None
    if p is not None:
        p.check_usable()
    r = check(CheckOptions(registry=registry, policy=p, progress=out.progress))
    err = r.failure()
    if err is None:
        out.result(r.to_json(), lambda: _check_text(r))
        return
    out.result_then_fail(r.to_json(), lambda: _check_text(r), err)
