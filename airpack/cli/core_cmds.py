"""keygen, trust, pack, sign, verify, inspect: the trust core's commands."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .._fs import oserror_to_airpack
from ..download_defaults import DEFAULT_CONNECTIONS
from ..errors import PolicyError, UsageError
from ..manifest import summary
from ..signing import ALGORITHMS
from ..units import format_bytes
from . import cli
from ._common import KEY_HELP, KEY_METAVAR, Output, airpack_command, hub_token, pin_file_option

if TYPE_CHECKING:
    from ..manifest import Manifest
    from ..ops.pack import PackResult, SignResult
    from ..ops.verify import VerifiedBundle
    from ..trust import TrustPolicy

# Each command imports the operations it runs inside its body, so that `airpack verify`
# loads the verify code and not the packer's (the Hub client, pip, the fit estimator).

PathArg = click.Path(path_type=Path)


def _signer(key: str | Path, passphrase_file: Path | None, out: Output, pin_file: Path | None = None, *, strict: bool = True) -> Any:
    """The signer of a ``--key`` value: a key file, or a ``pkcs11:`` URI (a key on a token, logged in once here).

    ``strict=False`` where several ``--key`` share one ``--pin-file`` / ``--passphrase-file``.
    """
    from ..signing import open_signer

    return open_signer(key, passphrase_file=passphrase_file, pin_file=pin_file, warn=out.warn, strict=strict)


# -- keygen ----------------------------------------------------------------------------


@airpack_command(cli, "keygen")
@click.argument("name")
@click.option("--dir", "directory", type=PathArg, default=Path("."), show_default=True, help="Where to write NAME.key and NAME.pub.")
@click.option("--algorithm", type=click.Choice(ALGORITHMS),
              help="ed25519 (the default for a key file) or ecdsa-p256 (the default on a token: every token has it).")
@click.option("--passphrase-file", type=PathArg, help="Encrypt the private key with the first line of this file (or set AIRPACK_PASSPHRASE).")
@click.option("--pkcs11", "pkcs11_uri", metavar="PKCS11_URI",
              help="Generate the key pair inside this token (object= labels it; the private key never leaves it); writes only NAME.pub.")
@pin_file_option
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def keygen_cmd(out: Output, name: str, directory: Path, algorithm: str | None, passphrase_file: Path | None,
               pkcs11_uri: str | None, pin_file: Path | None, force: bool) -> None:
    """Create a signing key pair: NAME.key (private, 0600) and NAME.pub; with --pkcs11, inside a token (only NAME.pub is written)."""
    from ..signing import generate, passphrase_from, write_keypair

    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"invalid key name {name!r}")
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    if pkcs11_uri is not None:
        if passphrase_file is not None:
            raise UsageError("--passphrase-file encrypts a key file; a token key is protected by the token's PIN (--pin-file)")
        _token_keygen(out, pkcs11_uri, pub_path, algorithm or "ecdsa-p256", pin_file, force)
        return
    if pin_file is not None:
        raise UsageError("--pin-file is for a key on a token: add --pkcs11 URI, or use --passphrase-file for a key file")
    for p in (key_path, pub_path):
        if p.exists() and not force:
            raise UsageError(f"{p} already exists; pass --force to replace it", path=str(p))
    _make_dir(directory)
    algorithm = algorithm or "ed25519"
    passphrase = passphrase_from(passphrase_file, warn=out.warn)
    kid = write_keypair(generate(algorithm), key_path, pub_path, passphrase=passphrase)
    out.result(
        {"keyid": kid, "algorithm": algorithm, "private_key": str(key_path), "public_key": str(pub_path), "encrypted": bool(passphrase)},
        [f"wrote {key_path} (private{', encrypted' if passphrase else ''}) and {pub_path}", f"key id: {kid}"],
    )


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"--dir {directory} exists and is not a folder", path=str(directory)) from None
    except OSError as e:
        raise oserror_to_airpack(e, "cannot create", str(directory)) from None


def _write_pub(pub: Any, path: Path) -> str:
    """``signing.write_public``, with a write failure as the command's error (not a traceback)."""
    from ..signing import write_public

    try:
        return write_public(pub, path)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot write", str(path)) from None


def _token_keygen(out: Output, uri: str, pub_path: Path, algorithm: str, pin_file: Path | None, force: bool) -> None:
    from ..pkcs11_keys import generate_key

    if pub_path.exists() and not force:
        raise UsageError(f"{pub_path} already exists; pass --force to replace it", path=str(pub_path))
    _make_dir(pub_path.parent)
    key = generate_key(uri, algorithm, pin_file=pin_file, warn=out.warn)
    kid = _write_pub(key.public_key, pub_path)
    out.result(
        {"keyid": kid, "algorithm": key.algorithm, "pkcs11_uri": uri, "label": key.label, "public_key": str(pub_path),
         "private_key": None, "extractable": False},
        [f"generated {key.algorithm} key {key.label!r} inside the token (sensitive, not extractable); wrote {pub_path}",
         f"key id: {kid}", f"sign with: --key '{uri}'"],
    )


# -- key -------------------------------------------------------------------------------


@cli.group("key")
def key_group() -> None:
    """Keys on hardware tokens (PKCS#11): export the public key of a key a token holds."""


@airpack_command(key_group, "pub")
@click.argument("uri", metavar="PKCS11_URI")
@click.option("--out", "out_path", type=PathArg, required=True, help="The NAME.pub file to write (SPKI PEM, for `airpack trust add`).")
@pin_file_option
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def key_pub(out: Output, uri: str, out_path: Path, pin_file: Path | None, force: bool) -> None:
    """Write the public key of a key a token already holds (PKCS11_URI) as NAME.pub."""
    from ..pkcs11_keys import read_public

    if out_path.exists() and not force:
        raise UsageError(f"{out_path} already exists; pass --force to replace it", path=str(out_path))
    pub, algorithm = read_public(uri, pin_file=pin_file, warn=out.warn)
    kid = _write_pub(pub, out_path)
    out.result({"keyid": kid, "algorithm": algorithm, "pkcs11_uri": uri, "public_key": str(out_path)},
               [f"wrote {out_path} ({algorithm}) from {uri}", f"key id: {kid}"])


# -- trust -----------------------------------------------------------------------------


@cli.group("trust")
def trust_group() -> None:
    """Manage this host's trust policy (who may sign bundles)."""


def _policy_json(policy: TrustPolicy) -> dict[str, Any]:
    """A policy as every trust command prints it: its version, each key's state now, and the revoked keys with why."""
    from ..trust import format_time

    valid = {k.keyid for k in policy.valid_keys()}
    return {
        "policy": policy.source,
        "version": policy.version,
        "threshold": policy.threshold,
        "valid_keys": len(valid),
        "keys": [{"name": k.name, "keyid": k.keyid, "algorithm": k.algorithm,
                  "state": "valid" if k.keyid in valid else "expired",
                  "expires": format_time(k.expires) if k.expires is not None else None} for k in policy.keys],
        "revoked": [{"name": r.name, "keyid": r.keyid, "algorithm": r.algorithm, "reason": r.reason,
                     "revoked_at": format_time(r.revoked_at)} for r in policy.revoked],
    }


def _policy_line(policy: Path, p: TrustPolicy) -> str:
    valid = len(p.valid_keys())
    extra = (f", {valid} valid" if valid != len(p.keys) else "") + (f", {len(p.revoked)} revoked" if p.revoked else "")
    return f"policy {policy}: version {p.version}, {len(p.keys)} key(s){extra}, threshold {p.threshold}"


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
    out.result(_policy_json(p), [f"wrote {policy} (version 1, threshold {threshold}, no keys yet: add them with `airpack trust add`)"])


@airpack_command(trust_group, "add")
@click.argument("policy", type=PathArg)
@click.argument("pubkey", type=PathArg)
@click.option("--name", required=True, help="A human name for the key (shown in verify reports).")
@click.option("--expires", metavar="DATE", help="From this ISO date or date and time (UTC) on, the key's signatures no longer count.")
def trust_add(out: Output, policy: Path, pubkey: Path, name: str, expires: str | None) -> None:
    """Trust the public key PUBKEY (SPKI PEM) under NAME, optionally until --expires."""
    from ..signing import read_public_file
    from ..trust import format_time, load_policy, parse_expiry, save_policy

    until = parse_expiry(expires) if expires is not None else None
    p = load_policy(policy)
    pub, pem = read_public_file(pubkey)
    p = p.with_key(name, pub, pem, expires=until)
    save_policy(p, policy)
    k = p.keys[-1]
    ends = f", until {format_time(until)}" if until is not None else ""
    out.result(_policy_json(p), [f"trusted {name}: {k.algorithm} {k.keyid}{ends}", _policy_line(policy, p)])


@airpack_command(trust_group, "remove")
@click.argument("policy", type=PathArg)
@click.argument("key", metavar="NAME|KEYID")
def trust_remove(out: Output, policy: Path, key: str) -> None:
    """Stop trusting one key (by its name or key id); refused if the keys left could not meet the threshold."""
    from ..trust import load_policy, save_policy

    p, gone = load_policy(policy).without_key(key)
    save_policy(p, policy)
    out.result({**_policy_json(p), "removed": {"name": gone.name, "keyid": gone.keyid, "algorithm": gone.algorithm}},
               [f"no longer trusted: {gone.name} ({gone.keyid})", _policy_line(policy, p)])


@airpack_command(trust_group, "revoke")
@click.argument("policy", type=PathArg)
@click.argument("key", metavar="KEYID|NAME")
@click.option("--reason", required=True, help="Why (one line): kept in the policy and named by every refusal of the key.")
def trust_revoke(out: Output, policy: Path, key: str, reason: str) -> None:
    """Revoke one key for good: its signatures never count again, and its key id can never be added back."""
    from ..trust import format_time, load_policy, save_policy

    p, gone = load_policy(policy).revoke(key, reason)
    save_policy(p, policy)
    valid = len(p.valid_keys())
    lines = [f"revoked {gone.name} ({gone.keyid}) at {format_time(gone.revoked_at)}: {gone.reason}", _policy_line(policy, p)]
    if valid < p.threshold:
        lines.append(f"note: {valid} valid key(s) for a threshold of {p.threshold}: no bundle verifies until you add keys "
                     "(`airpack trust add`) or lower the threshold")
    out.result({**_policy_json(p), "revoked_key": {"name": gone.name, "keyid": gone.keyid, "reason": gone.reason,
                                                   "revoked_at": format_time(gone.revoked_at)}}, lines)


@airpack_command(trust_group, "set-threshold")
@click.argument("policy", type=PathArg)
@click.argument("threshold", type=click.IntRange(min=1), metavar="N")
def trust_set_threshold(out: Output, policy: Path, threshold: int) -> None:
    """Require N distinct trusted signers; refused if the policy lists fewer than N valid keys."""
    from ..trust import load_policy, save_policy

    old = load_policy(policy)
    p = old.with_threshold(threshold)
    save_policy(p, policy)
    out.result({**_policy_json(p), "previous_threshold": old.threshold},
               [f"policy {policy}: threshold {old.threshold} -> {p.threshold} of {len(p.keys)} key(s) (version {p.version})"])


@airpack_command(trust_group, "list")
@click.argument("policy", type=PathArg)
def trust_list(out: Output, policy: Path) -> None:
    """Show a trust policy: its version, threshold, each key's state and expiry, and the revoked keys with their reason."""
    from ..trust import load_policy

    p = load_policy(policy)
    doc = _policy_json(p)

    def text() -> list[str]:
        valid = doc["valid_keys"]
        lines = [f"{policy}: version {p.version}, threshold {p.threshold} of {len(p.keys)} key(s)"
                 + (f" ({valid} valid)" if valid != len(p.keys) else "")]
        for k in doc["keys"]:
            when = "" if k["expires"] is None else (f"  expires {k['expires']}" if k["state"] == "valid" else f"  since {k['expires']}")
            lines.append(f"  {k['name']:<20} {k['algorithm']:<10} {k['keyid']}  {k['state']}{when}")
        for r in doc["revoked"]:
            lines.append(f"  {r['name']:<20} {r['algorithm']:<10} {r['keyid']}  revoked {r['revoked_at']}: {r['reason']}")
        return lines

    out.result(doc, text)


@airpack_command(trust_group, "sign-update")
@click.argument("source", type=PathArg, metavar="NEW_POLICY|UPDATE")
@click.option("--key", "keys", multiple=True, required=True, metavar=KEY_METAVAR,
              help=f"Sign with this key (repeat for several): {KEY_HELP}.")
@click.option("--passphrase-file", type=PathArg, help="Passphrase of an encrypted key file (or AIRPACK_PASSPHRASE).")
@pin_file_option
@click.option("--out", "out_path", type=PathArg, help="Where to write the update (default: NEW_POLICY's name with .dsse.json; "
              "the UPDATE itself when adding signatures).")
def trust_sign_update(out: Output, source: Path, keys: tuple[str, ...], passphrase_file: Path | None, pin_file: Path | None,
                      out_path: Path | None) -> None:
    """Sign NEW_POLICY as an update for hosts to apply, or add signatures to UPDATE (each signer when they can)."""
    from ..policy_update import SignUpdateOptions, sign_update

    signers = tuple(_signer(k, passphrase_file, out, pin_file, strict=len(keys) == 1) for k in keys)
    r = sign_update(SignUpdateOptions(source=source, signers=signers, out=out_path))
    doc = r.to_json()

    def text() -> list[str]:
        added = ", ".join(a["name"] or a["keyid"][:16] for a in doc["added"])
        lines = [f"wrote {r.out}: signed by {added}" if r.written else f"{r.out}: every key given had signed already; nothing changed"]
        lines += [f"  already signed: {a['name'] or a['keyid'][:16]}" for a in doc["already_signed"]]
        lines += [f"  note: key {a['keyid'][:16]}… is not in the new policy: it counts only where it is a valid key of a "
                  "host's current policy" for a in doc["added"] if a["name"] is None]
        met = "met" if doc["new_policy_threshold_met"] else "not met yet"
        names = ", ".join(k["name"] for k in doc["new_policy_signers"]) or "none"
        lines.append(f"  new policy version {r.policy.version}, sha256 {r.payload_sha256}: {len(r.signatures)} signature(s); "
                     f"its keys that signed: {names} ({met}: {r.policy.threshold} required)")
        lines.append("  a host applies it only once the threshold of ITS current policy's keys has signed too")
        return lines

    out.result(doc, text)


@airpack_command(trust_group, "apply")
@click.argument("policy", type=PathArg)
@click.argument("update", type=PathArg, metavar="UPDATE.dsse.json")
@click.option("--registry", type=PathArg, envvar="AIRPACK_REGISTRY",
              help="Record the attempt (applied or refused) in this registry's audit log (or AIRPACK_REGISTRY).")
def trust_apply(out: Output, policy: Path, update: Path, registry: Path | None) -> None:
    """Replace POLICY with a signed update: signed by the threshold of the current and of the new policy's keys, version higher."""
    from ..policy_update import ApplyOptions, apply_update

    r = apply_update(ApplyOptions(policy=policy, update=update, registry=registry))
    doc = r.to_json()

    def text() -> list[str]:
        cur = ", ".join(k["name"] for k in doc["current_signers"])
        new = ", ".join(k["name"] for k in doc["new_signers"])
        lines = [f"applied {update}: {policy} version {r.old.version} -> {r.new.version}",
                 f"  signed by current keys: {cur} (threshold {r.old.threshold}); by new keys: {new} (threshold {r.new.threshold})"]
        for what in ("added", "removed", "revoked"):
            if doc[what]:
                lines.append(f"  {what}: {', '.join(doc[what])}")
        lines.append(f"  policy sha256 {r.old_sha256} -> {r.new_sha256}" + ("; audit line written" if r.audited else ""))
        return lines

    out.result(doc, text)


# -- pack and sign ---------------------------------------------------------------------


def _target_lines(targets: list[dict[str, Any]]) -> list[str]:
    """``pack --dry-run``'s estimate per [[targets]] entry, per model (from headers only: nothing was fetched)."""
    lines = []
    for t in targets:
        where = f"{t['count']} x {t['gpu']} ({t['runtime']}" + (f", context {t['context']:,}" if "context" in t else "") + \
            f", batch {t['batch']})"
        for e in t.get("estimates") or ([t["estimate"]] if "estimate" in t else []):
            if e.get("verdict") == "unknown":
                lines.append(f"  target {where}: {e['model']}: unknown ({e.get('reason', '')})")
                continue
            verdict = {"fits": "fits", "tight": "tight", "does_not_fit": "DOES NOT FIT"}.get(e["verdict"], e["verdict"])
            lines.append(f"  target {where}: {e['model']}: {verdict}, {format_bytes(e['per_gpu_bytes'])} of "
                         f"{format_bytes(e['limit_bytes'])} per GPU at context {e['context']:,}; longest context "
                         f"{e['max_context']:,}")
    return lines


def _pack_text(r: PackResult) -> list[str]:
    lines = _pack_lines(r)
    if r.delta is not None:
        from ..ops._pack_delta import delta_text

        lines += delta_text(r.delta)
    return lines


def _pack_lines(r: PackResult) -> list[str]:
    if r.dry_run:
        lines = [f"dry run: would write {len(r.planned)} file(s), {format_bytes(r.total_bytes)} to {r.out}"]
        for m in r.details.get("models", []):
            extra = f" @ {m['commit']}" if m.get("commit") else ""
            asked = f" (asked: {m['revision']})" if m.get("revision") and m.get("revision") != m.get("commit") else ""
            gated = ", gated" if m.get("gated") else ""
            lines.append(f"  model {m['repo_id']}{extra}{asked} (licence: {m.get('license') or 'unknown'}{gated})")
        for w in r.details.get("wheels", []):
            lines.append(f"  wheel {w['name']} {w['version']} ({w['filename']})")
        lines += [f"  {p.bundle_path}  {format_bytes(p.size)}" + (f"  ({p.transport})" if p.transport else "")
                  for p in r.planned]
        lines += [f"  left out: {s.path} ({s.reason})" for s in r.skipped]
        lines += _target_lines(r.details.get("targets", []))
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
    for h in r.hub:
        lines.append(f"  fetched {h['repo_id']}: {format_bytes(h['downloaded_bytes'])} in {h['seconds']:.1f} s over "
                     f"{h['connections']} connection(s), {format_bytes(h['resumed_bytes'])} resumed, {h['retries']} retries")
    lines.append(f"  signed by key {r.keyid}")
    return lines


@airpack_command(cli, "pack")
@click.argument("spec", type=PathArg)
@click.option("--out", "out_dir", type=PathArg, required=True, help="The bundle folder to write.")
@click.option("--key", metavar=KEY_METAVAR, help=f"Key to sign with: {KEY_HELP} (not needed for --dry-run).")
@pin_file_option
@click.option("--passphrase-file", type=PathArg, help="Passphrase of an encrypted key (or AIRPACK_PASSPHRASE).")
@click.option("--format", "fmt", type=click.Choice(["dir", "tar"]), default="dir", show_default=True)
@click.option("--endpoint", envvar="HF_ENDPOINT", help="Hub endpoint (default: HF_ENDPOINT or the public Hub).")
@click.option("--token-file", type=PathArg, help="File holding a Hub token (default: the HF_TOKEN variable).")
@click.option("--dry-run", is_flag=True, help="Resolve everything, print what would be fetched, write nothing.")
@click.option("--allow-expired", is_flag=True, help="Write a bundle whose expiry is already past.")
@click.option("--connections", type=click.IntRange(1, 256), envvar="AIRPACK_CONNECTIONS", default=DEFAULT_CONNECTIONS, show_default=True,
              help="HTTP connections to the Hub's CDN at once, shared by all files (or AIRPACK_CONNECTIONS).")
@click.option("--for", "for_profile", type=PathArg, metavar="PROFILE.json",
              help="A delta bundle for the host this profile describes: carry only the files it lacks.")
def pack_cmd(
    out: Output, spec: Path, out_dir: Path, key: str | None, passphrase_file: Path | None, pin_file: Path | None, fmt: str,
    endpoint: str | None, token_file: Path | None, dry_run: bool, allow_expired: bool, connections: int,
    for_profile: Path | None = None,
) -> None:
    """Pack the models (and wheels) a SPEC names into a signed bundle."""
    from ..ops.pack import PackOptions, pack
    from ..spec import load_spec

    s = load_spec(spec)
    profile = None
    if for_profile is not None:
        from ..host_profile import load_profile

        profile = load_profile(for_profile)
    if not dry_run and key is None:
        raise UsageError("pack needs --key KEY to sign the bundle (or --dry-run)")
    signer = _signer(key, passphrase_file, out, pin_file) if key is not None and not dry_run else None
    token = hub_token(token_file)

    def run(dest: Path) -> PackResult:
        return pack(PackOptions(spec=s, out=dest, signer=signer, dry_run=dry_run, allow_expired=allow_expired,
                                endpoint=endpoint, token=token, connections=connections, progress=out.progress, profile=profile))

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
    for warning in r.warnings:
        out.warn(warning)


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
@click.option("--key", metavar=KEY_METAVAR, required=True, help=f"Key of the co-signer: {KEY_HELP}.")
@pin_file_option
@click.option("--passphrase-file", type=PathArg, help="Passphrase of an encrypted key (or AIRPACK_PASSPHRASE).")
@click.option("--trust", "policy", type=PathArg, envvar="AIRPACK_TRUST",
              help="Check first that every signature already there is by a key of this policy (or AIRPACK_TRUST).")
def sign_cmd(out: Output, bundle: Path, key: str, passphrase_file: Path | None, pin_file: Path | None,
             policy: Path | None) -> None:
    """Add a signature to BUNDLE (co-signing) after checking every file against its manifest."""
    from ..ops.pack import add_signature
    from ..trust import load_policy

    p = load_policy(policy) if policy is not None else None
    signer = _signer(key, passphrase_file, out, pin_file)
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
@click.option("--registry", type=PathArg, help="For a delta bundle: also hash every file it expects on the host in this registry.")
def verify_cmd(out: Output, bundle: Path, policy: Path, parts_only: bool = False, registry: Path | None = None) -> None:
    """Check BUNDLE (a folder, a tar, or a folder of parts) against the trust policy, every path, size and byte."""
    from ..trust import load_policy

    p = load_policy(policy)
    p.check_usable()
    if parts_only:
        from .transfer_cmds import verify_parts

        verify_parts(out, bundle, p)
        return
    vb = _verify_with_host(bundle, p, registry, out)
    m = vb.manifest

    def text() -> list[str]:
        signers = ", ".join(f"{k.name} ({k.keyid[:12]})" for k in vb.signers)
        return [f"OK: {bundle} verified", f"  signed by: {signers} (threshold {p.threshold})", *_manifest_lines(m, verbose=out.verbose),
                *_delta_lines(m, registry if vb.host_checked else None)]

    delta = {"host_checked": vb.host_checked, "registry": str(registry) if vb.host_checked else None} if m.is_delta else {}
    out.result(
        {"verified": True, "bundle": str(bundle), "signers": [{"name": k.name, "keyid": k.keyid} for k in vb.signers],
         "threshold": p.threshold, **summary(m), **({"delta": {**summary(m)["delta"], **delta}} if m.is_delta else {})},
        text,
    )


def _verify_with_host(bundle: Path, policy: TrustPolicy, registry: Path | None, out: Output) -> VerifiedBundle:
    """verify_bundle, with the registry's copies of a delta's host files when --registry names one (read-only)."""
    from ..ops.verify import VerifyOptions, verify_bundle

    if registry is None:
        return verify_bundle(VerifyOptions(bundle=bundle, policy=policy, progress=out.progress))
    from ..registry import Registry, RegistryCopies

    reg = Registry.open(registry)
    with reg.reader() as conn:
        return verify_bundle(VerifyOptions(bundle=bundle, policy=policy, progress=out.progress, host=RegistryCopies(reg, conn)))


def _delta_lines(m: Manifest, registry: Path | None) -> list[str]:
    """A delta says so, and lists every file it expects on the host (never skipped silently)."""
    if not m.is_delta:
        return []
    left = m.expected_on_host
    carried = m.carried
    state = (f"each one hashed in registry {registry}: intact" if registry is not None
             else "NOT checked here: give --registry DIR on the host to hash them")
    return [f"  DELTA:    carries {len(carried)} file(s), {format_bytes(sum(f.size for f in carried))}; "
            f"expects {len(left)} file(s), {format_bytes(sum(f.size for f in left))} on the host ({state})",
            *(f"    on host: {f.path}  {f.size}  sha256 {f.sha256[:16]}" for f in left)]


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
            *_delta_lines(m, None),
        ],
    )


