"""report: the review document of a bundle or a registry, as HTML (and PDF), or its facts as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import UsageError
from . import cli
from ._common import Output, airpack_command

if TYPE_CHECKING:
    from ..ops.report import ReportResult

PathArg = click.Path(path_type=Path)


def _text(r: ReportResult) -> list[str]:
    doc = r.facts.to_json()
    lines = []
    if doc["kind"] == "bundle":
        v, ident = doc["verification"], doc["identity"]
        state = (f"verified: signed by {', '.join(s['name'] for s in v['signers'])} (threshold {v['threshold']})" if v["verified"]
                 else "UNVERIFIED: what the bundle claims (pass --trust POLICY to verify)")
        lines.append(f"{ident['name']} sequence {ident['sequence']}, manifest sha256 {ident['manifest_sha256']}: {state}")
        lines += [f"fit: {f['model']} on {f['target'].get('count', 1)} x {f['target'].get('gpu')}: {f['verdict']}" for f in doc["fit"]]
        if doc["comparison"] is not None:
            lines.append(f"against {doc['comparison']['against']}: {doc['comparison']['sequence']['message']}")
    else:
        chain = doc["chain"]
        lines.append(f"registry {doc['registry']}: {len(doc['models'])} installed revision(s), audit chain "
                     + (f"intact ({chain['lines']} lines)" if chain["ok"] else f"BROKEN at line {chain['broken_line']}: {chain['error']}"))
    if r.html is not None:
        lines.append(f"wrote {r.html}")
    if r.pdf is not None:
        lines.append(f"wrote {r.pdf}")
    return lines


@airpack_command(cli, "report")
@click.argument("bundle", type=PathArg, required=False)
@click.option("--out", "out_file", type=PathArg, help="Write the HTML report here (one self-contained file).")
@click.option("--trust", "policy", type=PathArg, envvar="AIRPACK_TRUST",
              help="Verify the bundle first (or AIRPACK_TRUST); without it the report is marked UNVERIFIED on every page.")
@click.option("--against", type=PathArg,
              help="Show what changed since this older bundle, and whether the sequence would be accepted (wins over --registry).")
@click.option("--registry", type=PathArg, envvar="AIRPACK_REGISTRY",
              help="With BUNDLE: compare against what this registry has installed. Alone: the registry's report.")
@click.option("--pdf", type=PathArg, help="Also print the report to this PDF through headless Chromium.")
@click.option("--force", is_flag=True, help="Replace existing output files.")
def report_cmd(out: Output, bundle: Path | None, out_file: Path | None, policy: Path | None, against: Path | None,
               registry: Path | None, pdf: Path | None, force: bool) -> None:
    """Write an audit report of BUNDLE (or of --registry DIR) that a reviewer can read, print and sign off."""
    from ..ops.report import ReportOptions, report
    from ..trust import load_policy

    if bundle is None and registry is None:
        raise UsageError("report needs a BUNDLE, or --registry DIR for the registry's report")
    if bundle is None and against is not None:
        raise UsageError("--against compares two bundles: give the BUNDLE as well")
    if out_file is None and not out.as_json:
        raise UsageError("report needs --out REPORT.html (or --json to print its facts)")
    pol = None
    if policy is not None and bundle is not None:
        pol = load_policy(policy)
        pol.check_usable()
    r = report(ReportOptions(bundle=bundle, out=out_file, policy=pol, against=against, registry=registry, pdf=pdf, force=force,
                             progress=out.progress))
    if bundle is not None and pol is None:
        out.info("UNVERIFIED: the report shows the bundle as it claims itself; pass --trust POLICY to verify it first")
    out.result(r.to_json(), lambda: _text(r))
