"""export, repair, diff, sbom (and the body of ``verify --parts``): across the gap and under review."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .._fs import atomic_write
from ..errors import UsageError
from ..units import format_bytes, parse_size
from . import cli
from ._common import KEY_HELP, KEY_METAVAR, Output, airpack_command, pin_file_option

if TYPE_CHECKING:
    from ..ops.audit import DiffRegistryResult, DiffResult
    from ..ops.export import ExportResult
    from ..trust import TrustPolicy

PathArg = click.Path(path_type=Path)


def _policy(path: Path) -> TrustPolicy:
    from ..trust import load_policy

    p = load_policy(path)
    p.check_usable()
    return p


def _export_text(r: ExportResult) -> list[str]:
    m = r.manifest
    lines = [f"verified {m.name} (sequence {m.sequence}; signed by {', '.join(k.name for k in r.signers)})"]
    if r.layout is None:
        lines += [f"wrote {r.tar}: {format_bytes(r.tar_size)}", f"  sha256 {r.tar_sha256}"]
        return lines
    lay = r.layout
    lines.append(f"wrote {lay.total_parts} part(s) of {r.tar.name} ({format_bytes(r.tar_size)}, sha256 {r.tar_sha256}) to {r.tar.parent}")
    width = max(len(p.name) for p in r.parts)
    for p in r.parts:
        lines.append(f"  {p.name:<{width}}  {p.size:>14}  {p.sha256}  {p.role}")
    lines.append(f"  index: {r.index} (signed)")
    if lay.parity_parts:
        lines.append(f"  any {lay.parity_parts} of the {lay.total_parts} parts may be lost or damaged: `airpack repair` rebuilds them")
    else:
        lines.append(f"  no parity: `cat {r.tar.name}.part* > {r.tar.name}` rebuilds the tar")
    return lines


@airpack_command(cli, "export")
@click.argument("bundle", type=PathArg)
@click.option("--tar", "tar", type=PathArg, required=True, help="The tar to write (with --split: the name its parts start with).")
@click.option("--split", help="Split into parts of at most SIZE: 4GiB, 25GB, 700MB, 1MiB, or fat32 (4 GiB - 1 byte).")
@click.option("--parity", type=click.IntRange(min=0), default=0, show_default=True,
              help="Extra parity parts: any N lost or damaged parts can be rebuilt (needs --split).")
@click.option("--trust", "policy", type=PathArg, envvar="AIRPACK_TRUST", required=True,
              help="Trust policy the bundle must satisfy before it is exported (or AIRPACK_TRUST).")
@click.option("--key", metavar=KEY_METAVAR, help=f"Key that signs the parts index (required with --split): {KEY_HELP}.")
@click.option("--passphrase-file", type=PathArg, help="Passphrase of an encrypted key (or AIRPACK_PASSPHRASE).")
@pin_file_option
def export_cmd(out: Output, bundle: Path, tar: Path, split: str | None, parity: int, policy: Path, key: str | None,
               passphrase_file: Path | None, pin_file: Path | None) -> None:
    """Write a verified BUNDLE folder as one deterministic tar, or as parts for media with a signed index."""
    from ..ops.export import ExportOptions, export
    from ..parts import MIN_PART_BYTES
    from ..signing import open_signer

    size = parse_size(split) if split is not None else None
    if size is not None and size < MIN_PART_BYTES:
        raise UsageError(f"part size {split!r} is below the {MIN_PART_BYTES}-byte minimum")
    if size is None and parity:
        raise UsageError("--parity needs --split SIZE")
    if size is not None and key is None:
        raise UsageError("--split needs --key KEY: the parts index is signed so a damaged or foreign part is named")
    signer = (open_signer(key, passphrase_file=passphrase_file, pin_file=pin_file, warn=out.warn)
              if key is not None else None)
    r = export(ExportOptions(bundle=bundle, tar=tar, policy=_policy(policy), split=size, parity=parity, signer=signer,
                             progress=out.progress))
    out.result(r.to_json(), lambda: _export_text(r))


def verify_parts(out: Output, path: Path, policy: TrustPolicy) -> None:
    """``airpack verify --parts DIR``: the index's signature, then every part's size and SHA-256."""
    from ..ops.transfer import check_parts_folder

    c = check_parts_folder(path, policy, progress=out.progress)
    lay = c.index.layout
    out.result(
        c.to_json(),
        [f"OK: all {lay.total_parts} part(s) of {c.index.tar_name} match the signed index {c.index_path.name}",
         f"  index signed by: {', '.join(k.name for k in c.signers)}",
         f"  bundle {c.index.bundle.get('name')} sequence {c.index.bundle.get('sequence')}, manifest sha256 {c.index.manifest_sha256}",
         f"  parity: {lay.parity_parts} part(s)"],
    )


@airpack_command(cli, "repair")
@click.argument("parts_dir", type=PathArg)
@click.option("--trust", "policy", type=PathArg, envvar="AIRPACK_TRUST", required=True,
              help="Trust policy whose keys may sign the parts index (or AIRPACK_TRUST).")
def repair_cmd(out: Output, parts_dir: Path, policy: Path) -> None:
    """Rebuild missing or damaged parts of a split export from its parity parts."""
    from ..ops.transfer import repair_parts

    c = repair_parts(parts_dir, _policy(policy), progress=out.progress)
    lost = c.report.lost
    text = ([f"nothing to repair: all {c.index.layout.total_parts} part(s) of {c.index.tar_name} are intact"] if not lost else
            [f"rebuilt {len(c.repaired)} part(s) of {c.index.tar_name}; each matches the signed index:",
             *[f"  {n}" for n in c.repaired]])
    out.result(c.to_json(), text)


def _diff_text(d: DiffResult) -> list[str]:
    o, n = d.old.to_json(), d.new.to_json()
    lines = [f"old: {o['path']}  {o['name']} seq {o['sequence']}  created {o['created']}  {'verified' if o['verified'] else 'UNVERIFIED'}",
             f"new: {n['path']}  {n['name']} seq {n['sequence']}  created {n['created']}  {'verified' if n['verified'] else 'UNVERIFIED'}"]
    if d.identical:
        return [*lines, "identical: same signed manifest"]
    for flag in d.flags:
        lines.append(f"! {flag}")
    for k, v in d.bundle.items():
        lines.append(f"bundle {k}: {v['old']} -> {v['new']}")
    s = d.signers
    if s["added"] or s["removed"]:
        lines.append(f"signers: {', '.join(s['old']) or '-'} -> {', '.join(s['new']) or '-'}")
    for m in d.models["added"]:
        lines.append(f"+ model {m['repo_id']} @ {m['commit']} (licence {m['license']})")
    for m in d.models["removed"]:
        lines.append(f"- model {m['repo_id']} @ {m['commit']}")
    for m in d.models["changed"]:
        for k, v in m["changes"].items():
            if k == "config":
                lines.append(f"~ model {m['repo_id']}: config summary changed")
            else:
                lines.append(f"~ model {m['repo_id']}: {k} {v['old']} -> {v['new']}")
    f = d.files
    for x in f["added"]:
        lines.append(f"+ {x['path']}  {format_bytes(x['size'])}  {x['sha256']}")
    for x in f["removed"]:
        lines.append(f"- {x['path']}  {format_bytes(x['size'])}  {x['sha256']}")
    for x in f["changed"]:
        lines.append(f"~ {x['path']}  {format_bytes(x['old_size'])} -> {format_bytes(x['new_size'])}  "
                     f"{x['old_sha256'][:12]} -> {x['new_sha256'][:12]}")
    w = d.wheels
    lines += [f"+ wheel {x['name']} {x['version']}" for x in w["added"]]
    lines += [f"- wheel {x['name']} {x['version']}" for x in w["removed"]]
    lines += [f"~ wheel {x['name']} {x['old_version']} -> {x['new_version']}" for x in w["changed"]]
    t = d.targets
    lines += [f"+ target {x.get('count', 1)}x {x.get('gpu')}" for x in t["added"]]
    lines += [f"- target {x.get('count', 1)}x {x.get('gpu')}" for x in t["removed"]]
    for x in t["changed"]:
        ov, nv = (x["old_estimate"] or {}).get("verdict"), (x["new_estimate"] or {}).get("verdict")
        lines.append(f"~ target {x['target']}: fit estimate changed ({ov} -> {nv})")
    lines.append(f"files: {len(f['added'])} added, {len(f['removed'])} removed, {len(f['changed'])} changed, {f['unchanged']} unchanged; "
                 f"{format_bytes(f['old_bytes'])} -> {format_bytes(f['new_bytes'])}")
    return lines


@airpack_command(cli, "diff")
@click.argument("old", type=PathArg)
@click.argument("new", type=PathArg, required=False)
@click.option("--trust", "policy", type=PathArg, help="Verify both bundles first (otherwise manifests are read UNVERIFIED).")
@click.option("--registry", type=PathArg, envvar="AIRPACK_REGISTRY",
              help="Compare OLD against what this registry has installed: what installing it would change.")
def diff_cmd(out: Output, old: Path, new: Path | None, policy: Path | None, registry: Path | None) -> None:
    """Show what changed between bundles OLD and NEW: models, files, wheels, signers, licences, policy, fit."""
    from ..ops.audit import DiffOptions, DiffRegistryOptions, diff, diff_registry

    pol = _policy(policy) if policy is not None else None
    if new is None:
        if registry is None:
            raise UsageError("diff needs OLD and NEW bundles, or BUNDLE --registry DIR")
        rr = diff_registry(DiffRegistryOptions(bundle=old, registry=registry, policy=pol, progress=out.progress))
        out.result(rr.to_json(), lambda: _registry_text(rr))
        return
    d = diff(DiffOptions(old=old, new=new, policy=pol, progress=out.progress))
    if not (d.old.verified and d.new.verified):
        out.info("UNVERIFIED: the manifests are shown as the bundles claim them; pass --trust POLICY to verify")
    out.result(d.to_json(), lambda: _diff_text(d))


def _registry_text(d: DiffRegistryResult) -> list[str]:
    b = d.bundle
    lines = [f"bundle {b.manifest.name} seq {b.manifest.sequence} ({'verified' if b.verified else 'UNVERIFIED'})"]
    lines += [f"! {f}" for f in d.flags]
    for m in d.models:
        lines.append(f"{m.action:<10} {m.repo_id}  {m.installed_commit or '-'} -> {m.commit}")
        for x in m.files.get("changed", []):
            lines.append(f"  ~ {x['path']}")
        for x in m.files.get("added", []):
            lines.append(f"  + {x['path']}")
        for x in m.files.get("removed", []):
            lines.append(f"  - {x['path']}")
    return lines


@airpack_command(cli, "sbom")
@click.argument("bundle", type=PathArg)
@click.option("--format", "fmt", type=click.Choice(["cyclonedx"]), default="cyclonedx", show_default=True)
@click.option("--out", "out_file", type=PathArg, help="Write the SBOM here instead of stdout.")
@click.option("--trust", "policy", type=PathArg, help="Verify the bundle first (otherwise the manifest is read UNVERIFIED).")
def sbom_cmd(out: Output, bundle: Path, fmt: str, out_file: Path | None, policy: Path | None) -> None:
    """Write BUNDLE's CycloneDX 1.6 SBOM (JSON): the model, each file and wheel with its SHA-256."""
    from ..ops.audit import SbomOptions, sbom

    r = sbom(SbomOptions(bundle=bundle, policy=_policy(policy) if policy is not None else None, progress=out.progress))
    side = r.side
    if not side.verified:
        out.info("UNVERIFIED: made from the manifest as the bundle claims it; pass --trust POLICY to verify first")
    if out_file is not None:
        atomic_write(out_file, r.data)
        out.result({"sbom": str(out_file), "format": "cyclonedx-1.6", "verified": side.verified, "bundle": side.manifest.name},
                   [f"wrote {out_file} (CycloneDX 1.6)"])
        return
    if out.as_json:
        out.result(r.to_json())
        return
    sys.stdout.write(r.data.decode("utf-8"))
