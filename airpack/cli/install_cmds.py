"""install, list, show, remove, rollback, log verify: the offline registry's commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..oci_ref import is_oci_ref, parse_ref
from ..units import format_bytes
from . import cli
from ._common import Output, airpack_command
from .oci_cmds import access_from, access_options

if TYPE_CHECKING:
    from ..ops.install import InstallResult
    from ..registry import AuthorisingPolicy

PathArg = click.Path(path_type=Path)


def registry_option(fn: Any) -> Any:
    return click.option(
        "--registry", type=PathArg, envvar="AIRPACK_REGISTRY", required=True,
        help="The registry folder (or AIRPACK_REGISTRY).",
    )(fn)


def _signers_text(signers: Any) -> str:
    return ", ".join(f"{s['name']} ({s['keyid'][:12]})" for s in signers) or "nobody"


def _policy_text(p: AuthorisingPolicy | None) -> str:
    """Which policy authorised an install (its file's sha256, threshold, the keys that counted)."""
    if p is None:
        return "not recorded (installed before airpack recorded it)"
    digest = f"sha256 {p.sha256}" if p.sha256 else "built in memory (no file)"
    return f"{digest}, threshold {p.threshold}, met by {', '.join(k[:12] for k in p.keyids) or 'no key'}"


def _install_text(r: InstallResult) -> list[str]:
    m = r.manifest
    head = {
        "installed": f"installed {m.name} (channel {m.channel}, sequence {m.sequence}) into {r.registry}",
        "noop": f"{m.name} (channel {m.channel}, sequence {m.sequence}) is already installed in {r.registry}; nothing changed",
        "reactivated": f"{m.name} (channel {m.channel}, sequence {m.sequence}) was installed; its revisions are current again",
    }[r.result]
    lines = [head, f"  signed by: {_signers_text(r.signers)}"]
    if r.downgrade:
        lines.append("  DOWNGRADE: allowed by --allow-downgrade (logged)")
    for x in r.models:
        lines.append(f"  model {x['repo_id']} @ {x['commit'][:12]} (revision {x['ref']}): {x['files']} file(s)")
    if r.result == "installed":
        lines.append(f"  copied {format_bytes(r.bytes_copied)}; {format_bytes(r.bytes_shared)} already in the registry (shared)")
    if r.wheels:
        lines.append(f"  wheels: {len(r.wheels)}; requirements {r.requirements}")
    if r.fit is None:
        lines.append("  fit: not checked (the fit check is not available)")
    elif not r.fit:
        lines.append("  fit: no GPU given or found; not checked")
    else:
        for rep in r.fit:
            verdict = str(rep.get("verdict", "?")).replace("_", " ")
            what = rep.get("repo_id") or rep.get("model") or ""
            lines.append(f"  fit: {what} {verdict}{' (installed anyway: --ignore-fit)' if verdict == 'does not fit' else ''}")
    if r.models:
        first = r.models[0]["repo_id"]
        lines.append(f"  load it offline: `airpack show {first} --registry {r.registry}` prints the lines")
    return lines


@airpack_command(cli, "install")
@click.argument("bundle")
@registry_option
@click.option("--trust", "policy", type=PathArg, envvar="AIRPACK_TRUST", required=True, help="This host's trust policy (or AIRPACK_TRUST).")
@click.option("--gpu", help="Target GPUs, e.g. H100-80GB:2 (default: the GPUs NVML finds on this host).")
@click.option("--context", type=click.IntRange(min=1), help="Context length to check the fit at.")
@click.option("--runtime", help="Serving runtime to check the fit for (transformers, vllm).")
@click.option("--ignore-fit", is_flag=True, help="Install even if the model does not fit the GPUs.")
@click.option("--fit-trace", is_flag=True, help="Check the fit by tracing transformers' generate() (needs torch: airpack[trace]).")
@click.option("--allow-downgrade", is_flag=True, help="Install an older (or same-sequence, other) bundle of the channel; logged.")
@click.option("--allow-pickle", is_flag=True, help="Install pickled weights that the bundle's signed policy allows.")
@click.option("--allow-code", is_flag=True, help="Install code (*.py, scripts, binaries) that the bundle's signed policy allows.")
@access_options  # BUNDLE may be oci://HOST/REPO:TAG: these flags say how to reach that registry
def install_cmd(out: Output, bundle: str, registry: Path, policy: Path, gpu: str | None, context: int | None,
                runtime: str | None, ignore_fit: bool, fit_trace: bool, allow_downgrade: bool, allow_pickle: bool, allow_code: bool,
                plain_http: bool, username: str | None, password_file: Path | None, ca_file: Path | None) -> None:
    """Verify BUNDLE (a folder, a tar, a parts folder or oci://...) and install it into the registry, all or nothing."""
    from ..ops.install import InstallOptions, install
    from ..trust import load_policy

    p = load_policy(policy)
    p.check_usable()
    opts = InstallOptions(bundle=Path(bundle), registry=registry, policy=p, gpu=gpu, context=context, runtime=runtime,
                          ignore_fit=ignore_fit, fit_trace=fit_trace, allow_downgrade=allow_downgrade, allow_pickle=allow_pickle,
                          allow_code=allow_code,
                          progress=out.progress)
    if is_oci_ref(bundle):
        from ..ops.oci import OciInstallOptions, install_from_oci

        ref = parse_ref(bundle)
        res = install_from_oci(OciInstallOptions(source=ref, install=opts,
                                                 access=access_from(plain_http, username, password_file, ca_file)))
        out.info(f"fetched {ref} ({res.digest}): signatures checked before download, every blob digest while streaming")
        out.result(res.to_json(), lambda: _install_text(res.install))
        return
    r = install(opts)
    out.result(r.to_json(), lambda: _install_text(r))


_MARK = {"current": "*", "superseded": "="}  # list and show: the row a name points to; the same commit from an older bundle


def _pending_note(out: Output, note: str | None) -> None:
    """An interrupted write a reader could not settle: a warning on stderr, in --json mode too (stdout stays one document)."""
    if note is not None and not out.quiet:
        click.echo(f"warning: {note}", err=True)


@airpack_command(cli, "list")
@registry_option
def list_cmd(out: Output, registry: Path) -> None:
    """List the installed models: revision, commit, bundle, channel, sequence, signers."""
    from ..ops.manage import list_installed

    r = list_installed(registry)
    rows = r.models
    _pending_note(out, r.pending)

    def text() -> list[str]:
        if not rows:
            return [f"{registry}: nothing installed"]
        lines = [f"{'':1} {'REPO':<32} {'REVISION':<10} {'COMMIT':<12} {'BUNDLE':<24} {'SEQ':>6}  {'INSTALLED':<20} SIGNERS"]
        for x in rows:
            lines.append(
                f"{_MARK.get(x.status, ' ')} {x.repo_id:<32} {x.ref:<10} {x.commit[:12]:<12} {x.bundle:<24} {x.sequence:>6}  "
                f"{x.installed_at[:19]:<20} {', '.join(s['name'] for s in x.signers)}"
            )
        lines.append("(* = the revision its name points to; = the same commit, installed again by a newer bundle)")
        return lines

    out.result(r.to_json(), text)


@airpack_command(cli, "show")
@click.argument("name")
@registry_option
@click.option("--revision", help="A commit (or its first 7+ characters) or revision name; default: the current one.")
def show_cmd(out: Output, name: str, registry: Path, revision: str | None) -> None:
    """Show an installed model and the exact lines that load it offline."""
    from ..ops.manage import ShowOptions, show

    r = show(ShowOptions(registry=registry, name=name, revision=revision))
    _pending_note(out, r.pending)

    def text() -> list[str]:
        x, ld = r.model, r.load
        lines = [
            f"{x.repo_id} @ {x.commit} (revision {x.ref}{', current' if x.current else ''})",
            f"  bundle:    {x.bundle} (channel {x.channel}, sequence {x.sequence}), installed {x.installed_at}",
            f"  signed by: {_signers_text(x.signers)}",
            f"  policy:    {_policy_text(x.policy)}",
            f"  snapshot:  {r.snapshot}",
            f"  files:     {x.files}, {format_bytes(x.bytes)}",
        ]
        if out.verbose:
            lines += [f"    {f.sha256}  {f.size:>14}  {f.path}" for f in r.files]
        if len(r.revisions) > 1:
            lines.append("  installed revisions:")
            lines += [f"    {_MARK.get(o.status, ' ')} {o.commit[:12]} ({o.ref}) from {o.bundle} seq {o.sequence}"
                      for o in r.revisions]
        lines += ["", "Load it with no network (set both variables before Python starts):", f"  {ld.shell}"]
        lines += ["  python - <<'EOF'", *[f"  {line}" for line in ld.python], "  EOF"]
        lines += ["", "Serve it with vLLM:", f"  {ld.vllm}"]
        if ld.pip:
            lines += ["", "Install the bundle's wheels into a fresh virtualenv:", f"  {ld.pip}"]
        return lines

    out.result(r.to_json(), text)


@airpack_command(cli, "remove")
@click.argument("name")
@registry_option
@click.option("--revision", help="Remove only this revision (commit, its first 7+ characters, or revision name).")
@click.option("--dry-run", is_flag=True, help="Say what would be removed and freed; change nothing.")
def remove_cmd(out: Output, name: str, registry: Path, revision: str | None, dry_run: bool) -> None:
    """Remove an installed model (repo id) or bundle (bundle name); files still used elsewhere stay."""
    from ..ops.manage import RemoveOptions, remove

    r = remove(RemoveOptions(registry=registry, name=name, revision=revision, dry_run=dry_run))

    def text() -> list[str]:
        verb, freed = ("would remove", "would free") if r.dry_run else ("removed", "freed")
        lines = [f"{verb} {x.repo_id} @ {x.commit[:12]} ({x.revision}, bundle {x.bundle})" for x in r.removed]
        if not r.removed:
            lines.append(f"{verb} bundle {name}")
        lines.append(f"  {freed} {r.blobs_removed} blob(s), {format_bytes(r.bytes_freed)}; "
                     f"kept {r.blobs_kept_shared} shared with other revisions or models")
        if r.dry_run:
            lines.append("  (dry run: nothing was changed)")
        return lines

    out.result(r.to_json(), text)


@airpack_command(cli, "rollback")
@click.argument("name")
@registry_option
@click.option("--dry-run", is_flag=True, help="Say which revisions the names would point to; change nothing.")
def rollback_cmd(out: Output, name: str, registry: Path, dry_run: bool) -> None:
    """Point NAME back at the revision installed before the current one."""
    from ..ops.manage import RollbackOptions, rollback

    r = rollback(RollbackOptions(registry=registry, name=name, dry_run=dry_run))
    lines = [f"{'would move ' if r.dry_run else ''}{c.repo_id} ({c.revision}): {c.from_commit[:12]} -> {c.to_commit[:12]} "
             f"(bundle {c.bundle}, sequence {c.sequence})" for c in r.changes]
    out.result(r.to_json(), [*lines, "(dry run: nothing was changed)"] if r.dry_run else lines)


@cli.group("log")
def log_group() -> None:
    """The registry's audit log."""


@airpack_command(log_group, "verify")
@registry_option
def log_verify_cmd(out: Output, registry: Path) -> None:
    """Check the audit log's hash chain; name the first broken line."""
    from ..ops.manage import verify_log

    rep = verify_log(registry)
    out.result(rep.to_json(), [f"OK: {registry}/audit.log: {rep.lines} line(s), chain intact", f"  head sha256 {rep.head}"])
