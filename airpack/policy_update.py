"""Signed trust policy updates: how trust changes on an isolated host without anyone editing a file by hand.

On the connected side the security team writes the next policy with the
ordinary commands (``trust add/remove/revoke/set-threshold`` on a copy, each
raising its ``version``), and ``sign_update`` wraps its canonical bytes in a
DSSE envelope of payload type ``UPDATE_PAYLOAD_TYPE``; each signer adds a
signature to the same envelope, when and where they can. On each isolated host
``apply_update`` replaces the policy in force only when, as python-tuf rotates
its root metadata:

1. the envelope (capped, parsed strictly) carries the update payload type;
2. the threshold of the *current* policy's keys valid now signed the exact
   payload bytes (checked before the payload is even parsed);
3. the payload parses strictly as a usable policy;
4. its version is above the current one (a replayed or already applied update
   is refused);
5. the threshold of the *new* policy's valid keys signed it too, and it
   un-revokes nothing.

Only then is the policy file replaced, atomically, with exactly the signed
bytes (its mode kept). The decisions are the pure functions of ``rules``; a
refusal writes nothing but, with a registry, its audit line.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._fs import atomic_write, read_capped
from ._json import StrictJSONError, loads_strict
from .errors import (
    AirpackError,
    EnvelopeError,
    IntegrityError,
    PolicyError,
    PolicyUpdateError,
    UnsafePathError,
    UsageError,
)
from .registry import Registry, audit_base, error_record
from .rules import check_update_signers, check_update_version
from .signing import MAX_SIGNATURES, Envelope, RawSignature, Signer, parse_envelope, verify_sig
from .trust import MAX_POLICY_BYTES, SignatureCount, TrustPolicy, count_signatures, load_policy, parse_policy, write_policy_bytes

UPDATE_PAYLOAD_TYPE = "application/vnd.airpack.trust-policy+json"
# A policy is at most MAX_POLICY_BYTES; base64 adds a third, and the signatures a few KiB.
MAX_UPDATE_BYTES = 2 * MAX_POLICY_BYTES
AUDIT_COMMAND = "trust-apply"


# -- reading ----------------------------------------------------------------------------------


def _read(path: Path, *, what: str, missing: type[AirpackError]) -> bytes:
    """An update or draft policy's bytes, capped; a missing file is ``missing`` (exit 2), an oversized one an envelope error."""
    shown = str(path)
    try:
        return read_capped(Path(path), MAX_UPDATE_BYTES, display=shown, what=what)
    except FileNotFoundError:
        raise missing(f"{what} {shown} not found", path=shown) from None
    except UnsafePathError as e:  # a link, a folder, a device: name the file the user gave, never follow it
        raise UsageError(f"{what} {shown}: {e.message.split(': ', 1)[-1]}; give the file itself", path=shown) from None
    except IntegrityError:
        raise EnvelopeError(f"{what} {shown} is larger than the {MAX_UPDATE_BYTES:,}-byte limit", path=shown,
                            hint="A trust policy update holds one policy and a few signatures; this file is not one.") from None
    except AirpackError:
        raise
    except OSError as e:
        raise UsageError(f"cannot read {what} {shown}: {e.strerror or e}", path=shown) from None


def read_update(path: Path) -> Envelope:
    """The update envelope, capped and parsed strictly, with the update payload type (else exit 4)."""
    return _update_from(_read(path, what="trust policy update", missing=UsageError), str(path))


def _update_from(data: bytes, shown: str) -> Envelope:
    env = parse_envelope(data, where=shown)
    if env.payload_type != UPDATE_PAYLOAD_TYPE:
        raise EnvelopeError(f"envelope {shown} has payload type {env.payload_type!r}, expected {UPDATE_PAYLOAD_TYPE!r}: "
                            "it is not a trust policy update", path=shown,
                            hint="Give the UPDATE.dsse.json that `airpack trust sign-update` wrote (a bundle's envelope is not one).")
    return env


def _payload_policy(env: Envelope, where: str, now: dt.datetime | None) -> TrustPolicy:
    """The policy an update carries, parsed strictly and usable (its valid keys meet its threshold), else exit 2."""
    new = parse_policy(env.payload, shown=f"{where} (the new policy it carries)")
    new.check_usable(now)
    return new


def _is_envelope(data: bytes) -> bool:
    """Whether a file handed to sign-update is an update envelope (co-sign) rather than a draft policy (start one)."""
    try:
        doc = loads_strict(data, max_depth=4)
    except StrictJSONError:
        return False
    return isinstance(doc, dict) and "payloadType" in doc


# -- sign-update ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SignUpdateOptions:
    source: Path  # a draft policy (start an update) or an UPDATE.dsse.json (add signatures)
    signers: tuple[Signer, ...]  # a key file's or a token's; Signer.sign checks each signature it makes
    out: Path | None = None  # default: beside a draft policy as NAME.dsse.json; the envelope itself when co-signing
    now: dt.datetime | None = None


@dataclass(frozen=True)
class SignUpdateResult:
    out: Path
    policy: TrustPolicy  # the new policy the update carries
    payload_sha256: str
    signatures: tuple[str, ...]  # key id hints of every signature, in envelope order
    added: tuple[str, ...]  # key ids signed now
    already: tuple[str, ...]  # key ids whose signature was there already (nothing added for them)
    new_count: SignatureCount  # how the new policy sees the signatures
    written: bool

    def to_json(self) -> dict[str, Any]:
        p = self.policy
        names = {k.keyid: k.name for k in p.keys}
        return {
            "update": str(self.out), "written": self.written, "version": p.version, "threshold": p.threshold,
            "policy_sha256": self.payload_sha256, "payload_type": UPDATE_PAYLOAD_TYPE,
            "signatures": len(self.signatures),
            "added": [{"keyid": k, "name": names.get(k)} for k in self.added],
            "already_signed": [{"keyid": k, "name": names.get(k)} for k in self.already],
            "new_policy_signers": [{"name": k.name, "keyid": k.keyid} for k in self.new_count.valid],
            "new_policy_threshold_met": len(self.new_count.valid) >= p.threshold,
        }


def _default_out(source: Path) -> Path:
    stem = source.name[:-5] if source.name.endswith(".json") else source.name
    return source.with_name(f"{stem}.dsse.json")


def sign_update(opts: SignUpdateOptions) -> SignUpdateResult:
    """Start an update from a draft policy, or add signatures to one; refuse (nothing written) what could never apply.

    A draft that does not parse strictly, or whose valid keys cannot meet its
    threshold, is exit 2: no host could apply it. A key whose signature is
    already there adds nothing (a no-op, as ``airpack sign`` does).
    """
    if not opts.signers:
        raise UsageError("trust sign-update needs at least one --key KEY")
    shown = str(opts.source)
    data = _read(opts.source, what="trust policy or update", missing=PolicyError)
    cosign = _is_envelope(data)
    if cosign:
        env = _update_from(data, shown)
        new = _payload_policy(env, shown, opts.now)
        payload, sigs = env.payload, list(env.signatures)
    else:
        new = parse_policy(data, shown=shown)
        new.check_usable(opts.now)
        payload, sigs = new.to_bytes(), []
    out = opts.out if opts.out is not None else (opts.source if cosign else _default_out(opts.source))
    if out.exists() and not (cosign and out.resolve() == opts.source.resolve()):
        raise UsageError(f"{out} already exists; refusing to replace it (its signatures would be lost)", path=str(out),
                         hint="Add signatures to it with `airpack trust sign-update UPDATE.dsse.json --key KEY`, or pass another --out.")
    added: list[str] = []
    already: list[str] = []
    for s in opts.signers:
        if any(verify_sig(s.public_key, UPDATE_PAYLOAD_TYPE, payload, raw.sig) for raw in sigs):
            already.append(s.keyid)
            continue
        made = s.sign(UPDATE_PAYLOAD_TYPE, payload)  # checked against s.public_key before it returns
        sigs.append(RawSignature(keyid=s.keyid, sig=base64.b64decode(made["sig"])))
        added.append(s.keyid)
    if len(sigs) > MAX_SIGNATURES:
        raise UsageError(f"an update may carry at most {MAX_SIGNATURES} signatures", path=str(out))
    env = Envelope(payload_type=UPDATE_PAYLOAD_TYPE, payload=payload, signatures=tuple(sigs))
    if added:
        atomic_write(out, env.to_bytes(), mode=0o644)
    return SignUpdateResult(out=out, policy=new, payload_sha256=hashlib.sha256(payload).hexdigest(),
                            signatures=tuple(r.keyid for r in sigs), added=tuple(added), already=tuple(already),
                            new_count=count_signatures(env, new, now=opts.now), written=bool(added))


# -- apply -------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ApplyOptions:
    policy: Path  # the policy in force on this host
    update: Path  # UPDATE.dsse.json
    registry: Path | None = None  # write the audit line (applied or refused) into this registry's log
    now: dt.datetime | None = None


@dataclass(frozen=True)
class ApplyResult:
    policy: Path
    old: TrustPolicy
    new: TrustPolicy
    old_sha256: str
    new_sha256: str
    current_signers: SignatureCount
    new_signers: SignatureCount
    audited: bool

    def changes(self) -> dict[str, list[str]]:
        """What the update changes, by key name: what an operator reads before and after applying."""
        old_ids = {k.keyid for k in self.old.keys}
        new_ids = {k.keyid for k in self.new.keys}
        was_revoked = {r.keyid for r in self.old.revoked}
        return {
            "added": [k.name for k in self.new.keys if k.keyid not in old_ids],
            "removed": [k.name for k in self.old.keys if k.keyid not in new_ids and self.new.revoked_by_id(k.keyid) is None],
            "revoked": [r.name for r in self.new.revoked if r.keyid not in was_revoked],
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "applied": True, "policy": str(self.policy),
            "old_version": self.old.version, "new_version": self.new.version,
            "old_sha256": self.old_sha256, "new_sha256": self.new_sha256,
            "old_threshold": self.old.threshold, "new_threshold": self.new.threshold,
            "current_signers": [{"name": k.name, "keyid": k.keyid} for k in self.current_signers.valid],
            "new_signers": [{"name": k.name, "keyid": k.keyid} for k in self.new_signers.valid],
            **self.changes(), "audited": self.audited,
        }


def _check_keeps_revocations(old: TrustPolicy, new: TrustPolicy, where: str) -> None:
    """A revoked key never counts again: an update may not drop a revocation, even signed by every key."""
    for r in old.revoked:
        if new.revoked_by_id(r.keyid) is None:
            raise PolicyUpdateError(
                f"trust policy update {where} drops the revocation of {r.describe()}; a revoked key never counts again",
                path=where, hint="Ask the security team to rebuild the update from the current policy (revocations stay); nothing was changed.")


def _apply(opts: ApplyOptions, facts: dict[str, Any]) -> ApplyResult:
    where = str(opts.update)
    current = load_policy(opts.policy)
    facts.update(old_version=current.version, old_policy_sha256=current.sha256)
    env = read_update(opts.update)
    # The exact signed bytes first: the policy in force must vouch for them before they are even parsed.
    now = opts.now or dt.datetime.now(dt.UTC)
    have = count_signatures(env, current, now=now)
    facts["current_signers"] = [k.keyid for k in have.valid]
    check_update_signers("current", [k.name for k in have.valid], threshold=current.threshold, version=current.version,
                         where=where, missing=[k.name for k in have.missing], not_counted=have.not_counted)
    new = _payload_policy(env, where, now)
    new_sha = hashlib.sha256(env.payload).hexdigest()
    facts.update(new_version=new.version, new_policy_sha256=new_sha)
    check_update_version(current=current.version, new=new.version, source=str(opts.policy), where=where)
    got = count_signatures(env, new, now=now)
    facts["new_signers"] = [k.keyid for k in got.valid]
    check_update_signers("new", [k.name for k in got.valid], threshold=new.threshold, version=new.version, where=where,
                         missing=[k.name for k in got.missing], not_counted=got.not_counted)
    _check_keeps_revocations(current, new, where)
    write_policy_bytes(env.payload, opts.policy)
    return ApplyResult(policy=opts.policy, old=current, new=new, old_sha256=str(current.sha256), new_sha256=new_sha,
                       current_signers=have, new_signers=got, audited=False)


def apply_update(opts: ApplyOptions) -> ApplyResult:
    """Replace the host's policy with a signed update, or refuse (exit 4 signatures/version, 2 malformed) changing nothing.

    With a registry, one audit line records the attempt, applied or refused,
    with the old and new versions, both policies' sha256 and the signers' key ids.
    """
    reg = Registry.open(opts.registry) if opts.registry is not None else None
    base = audit_base(AUDIT_COMMAND, policy=str(opts.policy), update=str(opts.update))
    facts: dict[str, Any] = {}
    try:
        r = _apply(opts, facts)
    except BaseException as e:
        if reg is not None:
            _audit_refusal(reg, {**base, **facts, "result": "refused" if isinstance(e, AirpackError) else "failed",
                                 "error": error_record(e)}, e)
        raise
    if reg is None:
        return r
    try:
        reg.audit_append({**base, **facts, "result": "applied"})
    except AirpackError as e:
        e.message = (f"the trust policy {opts.policy} was updated to version {r.new.version}, but the audit line could not "
                     f"be written: {e.message}")
        raise
    return dataclasses.replace(r, audited=True)


def _audit_refusal(reg: Registry, record: dict[str, Any], e: BaseException) -> None:
    try:
        reg.audit_append(record)
    except AirpackError as log_err:
        if isinstance(e, AirpackError):
            e.message = f"{e.message} (and the audit line could not be written: {log_err.message})"


__all__ = ["UPDATE_PAYLOAD_TYPE", "ApplyOptions", "ApplyResult", "SignUpdateOptions", "SignUpdateResult",
           "apply_update", "read_update", "sign_update"]
