"""keygen, trust, pack, sign, verify, inspect: the trust core's commands."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .._fs import oserror_to_airpack, read_capped
from ..errors import PolicyError, UsageError
from ..manifest import summary
from ..signing import ALGORITHMS
from ..units import format_bytes
from . import cli
from ._common import Output, airpack_command

if TYPE_CHECKING:
    from ..manifest import Manifest
    from ..ops.pack import PackResult, SignResult
    from ..trust import TrustPolicy

# Each command imports the operations it runs inside its body, so that `airpack verify`
# loads the verify code and not the packer's (the Hub client, pip, the fit estimator).

PathArg = click.Path(path_type=Path)


def _warner(out: Output) -> Callable[[str], None]:
    """Warnings (a private key others can read) go to stderr, in every mode but -q: --json keeps stdout."""

    def warn(message: str) -> None:
        if not out.quiet:
            click.echo(f"warning: {message}", err=True)

    return warn


def _signer(key: Path, passphrase_file: Path | None, out: Output) -> Any:
    from ..signing import load_signer, passphrase_from

    warn = _warner(out)
    return load_signer(key, passphrase=passphrase_from(passphrase_file, warn=warn), warn=warn)


# -- keygen ----------------------------------------------------------------------------


@airpack_command(cli, "keygen")
@click.argument("name")
@click.option("--dir", "directory", type=PathArg, default=Path("."), show_default=True, help="Where to write NAME.key and NAME.pub.")
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default="ed25519", show_default=True)
@click.option("--passphrase-file", type=PathArg, help="Encrypt the private key with the first line of this file (or set AIRPACK_PASSPHRASE).")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def keygen_cmd(out: Output, name: str, directory: Path, algorithm: str, passphrase_file: Path | None, force: bool) -> None:
    """Create a signing key pair: NAME.key (private, 0600) and NAME.pub."""
    from ..signing import generate, passphrase_from, write_keypair

    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"invalid key name {name!r}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"--dir {directory} exists and is not a folder", path=str(directory)) from None
    except OSError as e:
        raise oserror_to_airpack(e, "cannot create", str(directory)) from None
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    for p in (key_path, pub_path):
        if p.exists() and not force:
            raise UsageError(f"{p} already exists; pass --force to replace it", path=str(p))
    passphrase = passphrase_from(passphrase_file, warn=_warner(out))
    kid = write_keypair(generate(algorithm), key_path, pub_path, passphrase=passphrase)
    out.result(
        {"keyid": kid, "algorithm": algorithm, "private_key": str(key_path), "public_key": str(pub_path), "encrypted": bool(passphrase)},
        [f"wrote {key_path} (private{', encrypted' if passphrase else ''}) and {pub_path}", f"key id: {kid}"],
    )


# -- trust -----------------------------------------------------------------------------


@cli.group("trust")
def trust_group() -> None:
    """Manage this host's trust policy (who may sign bundles)."""


def _policy_json(policy: TrustPolicy) -> dict[str, Any]:
    return {
        "policy": policy.source,
        "threshold": policy.threshold,
        "keys": [{"name": k.name, "keyid": k.keyid, "algorithm": k.algorithm} for k in policy.keys],
    }


@airpack_command(trust_group, "init")
@click.argument("policy", type=PathArg)
@click.option("--threshold", type=click.IntRange(min=1), default=1, show_default=True, help="Distinct trusted signers required.")
@click.option("--force", is_flag=True, help="Replace an existing policy.")
def trust_init(out: Output, policy: Path, threshold: int, force: bool) -> None:
    """Create an empty trust policy file."""
    from ..trust import new_policy, save_policy

    if policy.exists() and not force:
        raise PolicyError(f"trust policy {policy} already exists; pass --force to replace it", path=str(policy))
    p = new_policy(threshold, source=str(policy))
    save_policy(p, policy)
    out.result(_policy_json(p), [f"wrote {policy} (threshold {threshold}, no keys yet: add them with `airpack trust add`)"])


@airpack_command(trust_group, "add")
@click.argument("policy", type=PathArg)
@click.argument("pubkey", type=PathArg)
@click.option("--name", required=True, help="A human name for the key (shown in verify reports).")
def trust_add(out: Output, policy: Path, pubkey: Path, name: str) -> None:
    """Trust the public key PUBKEY (SPKI PEM) under NAME."""
    from ..signing import read_public_file
    from ..trust import load_policy, save_policy

    p = load_policy(policy)
    pub, pem = read_public_file(pubkey)
    p = p.with_key(name, pub, pem)
    save_policy(p, policy)
    k = p.keys[-1]
    out.result(_policy_json(p), [f"trusted {name}: {k.algorithm} {k.keyid}", f"policy {policy}: {len(p.keys)} key(s), threshold {p.threshold}"])


@airpack_command(trust_group, "remove")
@click.argument("policy", type=PathArg)
@click.argument("key", metavar="NAME|KEYID")
def trust_remove(out: Output, policy: Path, key: str) -> None:
    """Stop trusting one key (by its name or key id); refused if the keys left could not meet the threshold."""
    from ..trust import load_policy, save_policy

    p, gone = load_policy(policy).without_key(key)
    save_policy(p, policy)
    out.result({**_policy_json(p), "removed": {"name": gone.name, "keyid": gone.keyid, "algorithm": gone.algorithm}},
               [f"no longer trusted: {gone.name} ({gone.keyid})", f"policy {policy}: {len(p.keys)} key(s), threshold {p.threshold}"])


@airpack_command(trust_group, "set-threshold")
@click.argument("policy", type=PathArg)
@click.argument("threshold", type=click.IntRange(min=1), metavar="N")
def trust_set_threshold(out: Output, policy: Path, threshold: int) -> None:
    """Require N distinct trusted signers; refused if the policy lists fewer than N keys."""
    from ..trust import load_policy, save_policy

    old = load_policy(policy)
    p = old.with_threshold(threshold)
    save_policy(p, policy)
    out.result({**_policy_json(p), "previous_threshold": old.threshold},
               [f"policy {policy}: threshold {old.threshold} -> {p.threshold} of {len(p.keys)} key(s)"])


@airpack_command(trust_group, "list")
@click.argument("policy", type=PathArg)
def trust_list(out: Output, policy: Path) -> None:
    """Show the keys of a trust policy and its threshold."""
    from ..trust import load_policy

    p = load_policy(policy)

    def text() -> list[str]:
        lines = [f"{policy}: threshold {p.threshold} of {len(p.keys)} key(s)"]
        lines += [f"  {k.name:<20} {k.algorithm:<10} {k.keyid}" for k in p.keys]
        return lines

    out.result(_policy_json(p), text)


# -- pack and sign ---------------------------------------------------------------------


def _pack_text(r: PackResult) -> list[str]:
    if r.dry_run:
        lines = [f"dry run: would write {len(r.planned)} file(s), {format_bytes(r.total_bytes)} to {r.out}"]
        for m in r.details.get("models", []):
            extra = f" @ {m['commit']}" if m.get("commit") else ""
            asked = f" (asked: {m['revision']})" if m.get("revision") and m.get("revision") != m.get("commit") else ""
            gated = ", gated" if m.get("gated") else ""
            lines.append(f"  model {m['repo_id']}{extra}{asked} (licence: {m.get('license') or 'unknown'}{gated})")
        for w in r.details.get("wheels", []):
            lines.append(f"  wheel {w['name']} {w['version']} ({w['filename']})")
        lines += [f"  {p.bundle_path}  {format_bytes(p.size)}" for p in r.planned]
        lines += [f"  left out: {s.path} ({s.reason})" for s in r.skipped]
        return lines
    m = r.manifest
    assert m is not None
    lines = [f"packed {m.name} (channel {m.channel}, sequence {m.sequence}) into {r.out}"]
    for model in m.models:
        files = m.model_files(model)
        lines.append(
            f"  model {model.repo_id} @ {model.commit}: {len(files)} file(s), {format_bytes(sum(f.size for f in files))}, "
            f"licence {model.license or 'unknown'}" + (f" (from {model.source}, asked {model.revision})" if model.revision else "")
        )
    if m.wheels:
        lines.append(
            f"  wheels: {len(m.wheels)}, {format_bytes(sum(f.size for f in m.files if f.path.startswith('wheels/')))}: "
            + ", ".join(f"{w.name} {w.version}" for w in m.wheels[:8]) + (" ..." if len(m.wheels) > 8 else "")
        )
    lines.append(f"  total: {len(m.files)} file(s), {format_bytes(m.total_bytes)}; manifest sha256 {m.digest}")
    lines.append(f"  signed by key {r.keyid}")
    return lines


@airpack_command(cli, "pack")
@click.argument("spec", type=PathArg)
@click.option("--out", "out_dir", type=PathArg, required=True, help="The bundle folder to write.")
@click.option("--key", type=PathArg, help="Private key to sign with (not needed for --dry-run).")
@click.option("--passphrase-file", type=PathArg, help="Passphrase of an encrypted key (or AIRPACK_PASSPHRASE).")
@click.option("--format", "fmt", type=click.Choice(["dir", "tar"]), default="dir", show_default=True)
@click.option("--endpoint", envvar="HF_ENDPOINT", help="Hub endpoint (default: HF_ENDPOINT or the public Hub).")
@click.option("--token-file", type=PathArg, help="File holding a Hub token (default: the HF_TOKEN variable).")
@click.option("--dry-run", is_flag=True, help="Resolve everything, print what would be fetched, write nothing.")
@click.option("--allow-expired", is_flag=True, help="Write a bundle whose expiry is already past.")
def pack_cmd(
    out: Output, spec: Path, out_dir: Path, key: Path | None, passphrase_file: Path | None, fmt: str,
    endpoint: str | None, token_file: Path | None, dry_run: bool, allow_expired: bool,
) -> None:
    """Pack the models (and wheels) a SPEC names into a signed bundle."""
    from ..ops.pack import PackOptions, pack
    from ..spec import load_spec

    s = load_spec(spec)
    if not dry_run and key is None:
        raise UsageError("pack needs --key KEY to sign the bundle (or --dry-run)")
    signer = _signer(key, passphrase_file, out) if key is not None and not dry_run else None
    token = None
    if token_file is not None:
        try:
            token = read_capped(token_file, 4096, what="token file").decode("utf-8").strip()
        except FileNotFoundError:
            raise UsageError(f"token file {token_file} not found", path=str(token_file)) from None
    else:
        token = os.environ.get("HF_TOKEN", "").strip() or None

    def run(dest: Path) -> PackResult:
        return pack(PackOptions(spec=s, out=dest, signer=signer, dry_run=dry_run, allow_expired=allow_expired,
                                endpoint=endpoint, token=token, progress=out.progress))

    if fmt == "tar" and not dry_run:  # --out names the tar: pack beside it, export, remove the folder
        from ..ops.export import pack_as_tar

        assert signer is not None
        r0, ex = pack_as_tar(run, out_dir, signer, progress=out.progress)
        r = dataclasses.replace(r0, out=out_dir, tar_size=ex.tar_size, tar_sha256=ex.tar_sha256)
        out.result(r.to_json(), lambda: [*_pack_text(r), f"  tar: {format_bytes(ex.tar_size)}, sha256 {ex.tar_sha256}"])
    else:
        r = run(out_dir)
        out.result(r.to_json(), lambda: _pack_text(r))
    for skipped in r.skipped:  # never silent: what the folder holds and the bundle does not
        out.info(f"note: left out {skipped.path}: {skipped.reason}")


def _sign_text(r: SignResult, policy: Path | None) -> list[str]:
    name = r.manifest.name
    lines = [f"added signature by {r.keyid} to {name}" if r.added else f"{r.keyid} had already signed {name}; nothing changed"]
    if policy is not None and r.threshold is not None:
        names = ", ".join(k.name for k in r.signers) or "none"
        state = "met: verify will accept the signatures" if len(r.signers) >= r.threshold else "not met yet"
        lines.append(f"  every signature checked against {policy}; policy keys that signed: {names} "
                     f"({len(r.signers)} of the {r.threshold} required: {state})")
    return lines


@airpack_command(cli, "sign")
@click.argument("bundle", type=PathArg)
@click.option("--key", type=PathArg, required=True, help="Private key of the co-signer.")
@click.option("--passphrase-file", type=PathArg, help="Passphrase of an encrypted key (or AIRPACK_PASSPHRASE).")
@click.option("--trust", "policy", type=PathArg, envvar="AIRPACK_TRUST",
              help="Check first that every signature already there is by a key of this policy (or AIRPACK_TRUST).")
def sign_cmd(out: Output, bundle: Path, key: Path, passphrase_file: Path | None, policy: Path | None) -> None:
    """Add a signature to BUNDLE (co-signing) after checking every file against its manifest."""
    from ..ops.pack import add_signature
    from ..trust import load_policy

    p = load_policy(policy) if policy is not None else None
    signer = _signer(key, passphrase_file, out)
    r = add_signature(bundle, signer, policy=p, progress=out.progress)
    if p is None and not out.quiet:
        click.echo("note: the signatures already on the bundle were NOT checked (no --trust POLICY or AIRPACK_TRUST); "
                   "only its files were checked against the manifest", err=True)
    out.result(r.to_json(), _sign_text(r, policy))


# -- verify and inspect ------------------------------------------------------------------


def _manifest_lines(m: Manifest, *, verbose: int) -> list[str]:
    lines = [
        f"  bundle:   {m.name}   channel {m.channel}   sequence {m.sequence}",
        f"  created:  {m.created:%Y-%m-%d %H:%M:%SZ}" + (f"   expires {m.expires:%Y-%m-%d %H:%M:%SZ}" if m.expires else ""),
        f"  manifest: sha256 {m.digest}",
    ]
    for x in m.models:
        files = m.model_files(x)
        params = x.raw.get("parameters")
        ptxt = f", {params:,} parameters" if isinstance(params, int) and params else ""
        lines.append(
            f"  model:    {x.repo_id} ({x.source}) @ {x.commit[:12]}: {len(files)} file(s), "
            f"{format_bytes(sum(f.size for f in files))}{ptxt}, licence {x.license or 'unknown'}"
        )
        if x.pickles:
            lines.append(f"            pickled files (allowed by policy): {', '.join(x.pickles)}")
        if x.code:
            lines.append(f"            code files (allowed by policy): {', '.join(x.code)}")
    for w in m.wheels:
        lines.append(f"  wheel:    {w.name} {w.version}")
    for t in m.targets:
        est = t.get("estimate") or {}
        verdict = f": {est.get('verdict')}" if est.get("verdict") else ""
        lines.append(f"  target:   {t.get('count', 1)} x {t.get('gpu')} ({t.get('runtime')}){verdict}")
        if isinstance(est, dict) and all(isinstance(est.get(k), int) for k in ("per_gpu_bytes", "limit_bytes", "max_context", "context")):
            lines.append(f"            {format_bytes(est['per_gpu_bytes'])} per GPU of {format_bytes(est['limit_bytes'])} at context "
                         f"{est['context']}; longest context that fits: {est['max_context']}")
        elif isinstance(est, dict) and isinstance(est.get("reason"), str):
            lines.append(f"            not estimated: {est['reason'][:200]}")
    lines.append(f"  files:    {len(m.files)}, {format_bytes(m.total_bytes)}")
    if verbose:
        lines += [f"    {f.sha256}  {f.size:>14}  {f.path}" for f in m.files]
    return lines


@airpack_command(cli, "verify")
@click.argument("bundle", type=PathArg)
@click.option("--trust", "policy", type=PathArg, envvar="AIRPACK_TRUST", required=True, help="This host's trust policy (or AIRPACK_TRUST).")
@click.option("--parts", "parts_only", is_flag=True, help="Only check each part of a split export against its signed index.")
def verify_cmd(out: Output, bundle: Path, policy: Path, parts_only: bool = False) -> None:
    """Check BUNDLE (a folder, a tar, or a folder of parts) against the trust policy, every path, size and byte."""
    from ..ops.verify import VerifyOptions, verify_bundle
    from ..trust import load_policy

    p = load_policy(policy)
    p.check_usable()
    if parts_only:
        from .transfer_cmds import verify_parts

        verify_parts(out, bundle, p)
        return
    vb = verify_bundle(VerifyOptions(bundle=bundle, policy=p, progress=out.progress))
    m = vb.manifest

    def text() -> list[str]:
        signers = ", ".join(f"{k.name} ({k.keyid[:12]})" for k in vb.signers)
        return [f"OK: {bundle} verified", f"  signed by: {signers} (threshold {p.threshold})", *_manifest_lines(m, verbose=out.verbose)]

    out.result(
        {"verified": True, "bundle": str(bundle), "signers": [{"name": k.name, "keyid": k.keyid} for k in vb.signers],
         "threshold": p.threshold, **summary(m)},
        text,
    )


@airpack_command(cli, "inspect")
@click.argument("bundle", type=PathArg)
def inspect_cmd(out: Output, bundle: Path) -> None:
    """Show BUNDLE's manifest WITHOUT verifying it (nothing here is trusted)."""
    from ..ops.verify import read_unverified
    from ..sources import open_source

    claimed = read_unverified(open_source(bundle))  # a folder, a tar or a parts folder
    env, m = claimed.envelope, claimed.manifest
    sigs = [s.keyid for s in env.signatures]
    out.result(
        {"verified": False, "warning": "UNVERIFIED: run `airpack verify` before trusting any of this",
         "signature_keyids": sigs, "payload_type": env.payload_type, **summary(m)},
        lambda: [
            "UNVERIFIED: this is what the bundle claims; run `airpack verify --trust POLICY` before trusting it",
            f"  signatures: {len(sigs)} (key ids claimed: {', '.join(k[:12] for k in sigs)})",
            *_manifest_lines(m, verbose=out.verbose),
        ],
    )


