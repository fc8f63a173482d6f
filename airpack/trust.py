"""The host's trust policy and the check that an envelope satisfies it.

The policy lives on the isolated host and is never read from a bundle. An
envelope is trusted when at least ``threshold`` *distinct* policy keys made a
valid signature over the exact payload; the key id an envelope carries only
decides which key is tried first.

The policy is the root of trust, so it is read as strictly as an envelope:
every field known and present (nothing defaults), each key entry consistent
with its public key, and a file that other users could change is refused.
It is changed only through these functions (``trust add/remove/revoke/set-threshold``),
each raising the policy's ``version`` by one, or by a signed update
(``policy_update``) that the policy in force and its successor both vouch for.

Keys have a state at each moment (``rules.key_state``): valid, expired (past
their ``expires``) or revoked (kept in ``revoked`` with the reason, so their
signatures are recognised and named, and their id can never be added back).
Only valid keys count toward the threshold.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._fs import atomic_write, read_capped
from ._json import StrictJSONError, dumps_canonical, loads_strict
from ._perms import refuse_shared_write
from .errors import EnvelopeError, KeyFileError, PolicyError, SignatureError, UsageError
from .rules import KeyState, NotCounted, check_policy_usable, check_threshold, is_expired, key_state
from .signing import (
    Envelope,
    PublicKey,
    algorithm_of,
    key_id,
    load_public_pem,
    verify_sig,
)

MAX_POLICY_VERSION = 2**53 - 1  # the version is a serial number; every JSON reader holds it exactly (see rules.MAX_SEQUENCE)
MAX_POLICY_BYTES = 1024 * 1024
MAX_REASON_CHARS = 500
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@+-]{0,127}$")
_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


def format_time(t: dt.datetime) -> str:
    """The one spelling of a time in a policy file: RFC 3339, UTC, whole seconds."""
    return t.astimezone(dt.UTC).strftime(TIME_FORMAT)


def parse_expiry(text: str) -> dt.datetime:
    """``--expires``: an ISO date (midnight UTC) or date and time; without an offset it is UTC. Bad input is exit 2."""
    try:
        t = dt.datetime.fromisoformat(text.strip())
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.UTC)
        return t.astimezone(dt.UTC).replace(microsecond=0)
    except (ValueError, OverflowError):  # OverflowError: an offset that moves 9999-12-31 past the last year
        raise UsageError(f"--expires {text[:80]!r} is not an ISO date or date and time (like 2027-06-30 or "
                         "2027-06-30T12:00:00Z)") from None


def _now(now: dt.datetime | None) -> dt.datetime:
    return now or dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class TrustedKey:
    """A key the policy trusts; ``expires`` (UTC) is when its signatures stop counting (None: never)."""

    name: str
    keyid: str
    algorithm: str
    public_key: PublicKey
    pem: str
    expires: dt.datetime | None = None

    def state(self, now: dt.datetime | None = None) -> KeyState:
        return key_state(expires=self.expires, now=now)

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "keyid": self.keyid, "algorithm": self.algorithm, "public_key": self.pem}
        if self.expires is not None:
            out["expires"] = format_time(self.expires)
        return out


@dataclass(frozen=True)
class RevokedKey:
    """A key that was revoked: kept with its public key, so its signatures are recognised and named, and never count."""

    name: str
    keyid: str
    algorithm: str
    public_key: PublicKey
    pem: str
    reason: str
    revoked_at: dt.datetime

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "keyid": self.keyid, "algorithm": self.algorithm, "public_key": self.pem,
                "reason": self.reason, "revoked_at": format_time(self.revoked_at)}

    def describe(self) -> str:
        return f"{self.name!r} ({self.keyid[:16]}…) was revoked at {format_time(self.revoked_at)}: {self.reason}"


def check_reason(reason: str) -> str:
    """A revocation reason: one printable line, so every refusal that quotes it stays one line."""
    r = reason.strip()
    if not r or len(r) > MAX_REASON_CHARS or any(not c.isprintable() for c in r):
        raise UsageError(f"--reason must be one printable line of 1 to {MAX_REASON_CHARS} characters",
                         hint="Say why, briefly: \"laptop stolen 2026-11-30\", \"officer left the team\".")
    return r


@dataclass(frozen=True)
class TrustPolicy:
    """Public keys allowed to sign, how many distinct valid ones must have signed, and the keys revoked for good.

    ``version`` is the policy's serial number: every change raises it by one,
    and a signed update (``policy_update``) applies only over a lower one.
    """

    keys: tuple[TrustedKey, ...]
    threshold: int
    source: str = "<policy>"
    sha256: str | None = None  # of the exact file bytes load_policy read (None: built in memory); installs record it
    version: int = 1
    revoked: tuple[RevokedKey, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, int) or isinstance(self.threshold, bool) or self.threshold < 1:
            raise PolicyError(f"trust policy {self.source}: threshold must be a positive integer", path=self.source)
        if not isinstance(self.version, int) or isinstance(self.version, bool) or not 1 <= self.version <= MAX_POLICY_VERSION:
            raise PolicyError(f"trust policy {self.source}: version must be an integer from 1 to {MAX_POLICY_VERSION}",
                              path=self.source)
        seen_ids: dict[str, str] = {}
        seen_names: set[str] = set()
        for k in self.keys:
            if k.keyid in seen_ids:
                raise PolicyError(f"trust policy {self.source}: key {k.keyid} is listed twice (as {seen_ids[k.keyid]!r} "
                                  f"and {k.name!r}); one key counts once", path=self.source)
            if k.name in seen_names:
                raise PolicyError(f"trust policy {self.source}: two keys share the name {k.name!r}", path=self.source)
            seen_ids[k.keyid] = k.name
            seen_names.add(k.name)
        for r in self.revoked:
            if r.keyid in seen_ids:
                raise PolicyError(f"trust policy {self.source}: key {r.keyid} is both trusted (as {seen_ids[r.keyid]!r}) and "
                                  "revoked; a revoked key never counts again", path=self.source)
            seen_ids[r.keyid] = r.name

    # -- state at a moment

    def valid_keys(self, now: dt.datetime | None = None) -> tuple[TrustedKey, ...]:
        """The keys whose signatures count at ``now``: neither expired nor revoked."""
        t = _now(now)
        return tuple(k for k in self.keys if k.state(t) is KeyState.VALID)

    def check_usable(self, now: dt.datetime | None = None) -> None:
        """Refuse a policy that can never be satisfied (fewer valid keys than the threshold), naming expired and revoked ones."""
        t = _now(now)
        expired = [f"{k.name} since {format_time(k.expires)}" for k in self.keys if k.expires is not None
                   and k.state(t) is KeyState.EXPIRED]
        check_policy_usable(threshold=self.threshold, keys=len(self.valid_keys(t)), source=self.source, expired=expired,
                            revoked=[k.name for k in self.revoked])

    def by_id(self, kid: str) -> TrustedKey | None:
        for k in self.keys:
            if k.keyid == kid:
                return k
        return None

    def revoked_by_id(self, kid: str) -> RevokedKey | None:
        for r in self.revoked:
            if r.keyid == kid:
                return r
        return None

    def to_bytes(self) -> bytes:
        """The canonical bytes of the policy: what ``save_policy`` writes and a signed update carries as its payload."""
        return dumps_canonical({"version": self.version, "threshold": self.threshold, "keys": [k.to_json() for k in self.keys],
                                "revoked": [r.to_json() for r in self.revoked]})

    # -- ordinary changes: each one raises the version by one

    def _next(self, **changes: Any) -> TrustPolicy:
        if self.version >= MAX_POLICY_VERSION:
            raise PolicyError(f"trust policy {self.source} is at the highest version ({MAX_POLICY_VERSION})", path=self.source)
        return dataclasses.replace(self, version=self.version + 1, sha256=None, **changes)

    def with_key(self, name: str, public_key: PublicKey, pem: str, *, expires: dt.datetime | None = None,
                 now: dt.datetime | None = None) -> TrustPolicy:
        """The policy with one more key (optionally until ``expires``); a revoked or already expired key is refused (exit 2)."""
        if not _NAME_RE.match(name):
            raise PolicyError(f"invalid key name {name!r}: letters, digits, space and ._@+- only")
        kid = key_id(public_key)
        gone = self.revoked_by_id(kid)
        if gone is not None:
            raise PolicyError(f"key {kid[:16]}… is revoked in trust policy {self.source}: {gone.describe()}; "
                              "a revoked key is never trusted again", path=self.source,
                              hint="Generate a new key pair (`airpack keygen`) and add its public key instead.")
        there = self.by_id(kid)
        if there is not None:
            raise PolicyError(f"key {kid[:16]}… is already in the policy as {there.name!r}", path=self.source)
        if any(k.name == name for k in self.keys):
            raise PolicyError(f"trust policy {self.source} already has a key named {name!r} (two keys may not share a name)", path=self.source,
                              hint="Choose another --name, or remove the old key first with `airpack trust remove POLICY NAME`.")
        if expires is not None and is_expired(expires, now):
            raise PolicyError(f"--expires {format_time(expires)} is already past: key {name!r} would never count; nothing changed",
                              path=self.source, hint="Give a date in the future, or leave --expires out.")
        new = TrustedKey(name=name, keyid=kid, algorithm=algorithm_of(public_key), public_key=public_key, pem=pem,
                         expires=expires)
        return self._next(keys=(*self.keys, new))

    def find(self, name_or_keyid: str) -> TrustedKey:
        """The key named so, or with this key id (in full, or a unique prefix of 12 or more hex digits, as verify shows it)."""
        for k in self.keys:
            if k.name == name_or_keyid or k.keyid == name_or_keyid:
                return k
        wanted = name_or_keyid.lower()
        hexish = len(wanted) >= 12 and all(c in "0123456789abcdef" for c in wanted)
        if hexish:
            hits = [k for k in self.keys if k.keyid.startswith(wanted)]
            if len(hits) == 1:
                return hits[0]
        gone = [r for r in self.revoked if r.keyid == wanted or r.name == name_or_keyid or (hexish and r.keyid.startswith(wanted))]
        if gone:
            raise PolicyError(f"trust policy {self.source}: {gone[-1].describe()}; it is no longer a trusted key", path=self.source,
                              hint="`airpack trust list POLICY` shows each key's state.")
        names = ", ".join(k.name for k in self.keys) or "none"
        raise PolicyError(f"trust policy {self.source} has no key named or with key id {name_or_keyid!r} (keys: {names})",
                          path=self.source, hint="`airpack trust list POLICY` shows each key's name and key id.")

    def without_key(self, name_or_keyid: str, *, now: dt.datetime | None = None) -> tuple[TrustPolicy, TrustedKey]:
        """The policy less one key; refused (exit 2) when the valid keys left could no longer meet the threshold.

        An expired key may always go: it counted for nothing.
        """
        gone = self.find(name_or_keyid)
        keys = tuple(k for k in self.keys if k is not gone)
        t = _now(now)
        valid_left = sum(1 for k in keys if k.state(t) is KeyState.VALID)
        if gone.state(t) is KeyState.VALID and valid_left < self.threshold:
            raise PolicyError(
                f"removing {gone.name!r} would leave trust policy {self.source} with {valid_left} "
                f"{'valid ' if valid_left != len(keys) else ''}key(s) for a threshold of "
                f"{self.threshold}: no bundle could verify; nothing changed",
                path=self.source,
                hint=(f"Lower the threshold first (`airpack trust set-threshold {self.source} {max(valid_left, 1)}`), "
                      "or add the replacement key with `airpack trust add` before removing this one."),
            )
        return self._next(keys=keys), gone

    def with_threshold(self, threshold: int, *, now: dt.datetime | None = None) -> TrustPolicy:
        """The policy with another threshold; refused (exit 2) above the number of valid keys it lists."""
        valid = len(self.valid_keys(now))
        if threshold > valid:
            detail = "" if valid == len(self.keys) else f" valid (and {len(self.keys) - valid} expired)"
            raise PolicyError(
                f"trust policy {self.source} lists {valid} key(s){detail}; a threshold of {threshold} could never be met; "
                "nothing changed",
                path=self.source,
                hint="Add the keys first with `airpack trust add POLICY PUBKEY --name NAME`, then raise the threshold.",
            )
        return self._next(threshold=threshold)

    def revoke(self, name_or_keyid: str, reason: str, *, now: dt.datetime | None = None) -> tuple[TrustPolicy, RevokedKey]:
        """The policy with one key moved to ``revoked`` (with why and when); it never counts again.

        Not refused when the valid keys left fall below the threshold: a
        compromised key must stop counting at once, and a policy that verifies
        nothing (exit 2 until keys are added) is the safe side of that.
        """
        why = check_reason(reason)
        k = self.find(name_or_keyid)
        gone = RevokedKey(name=k.name, keyid=k.keyid, algorithm=k.algorithm, public_key=k.public_key, pem=k.pem, reason=why,
                          revoked_at=_now(now).replace(microsecond=0))
        return self._next(keys=tuple(x for x in self.keys if x is not k), revoked=(*self.revoked, gone)), gone


def new_policy(threshold: int = 1, *, source: str = "<policy>") -> TrustPolicy:
    return TrustPolicy(keys=(), threshold=threshold, source=source)


_POLICY_FIELDS = ("version", "threshold", "keys")
_POLICY_OPTIONAL = ("revoked",)  # absent in files written before revocation existed: none revoked
_KEY_FIELDS = ("name", "keyid", "algorithm", "public_key")
_KEY_OPTIONAL = ("expires",)
_REVOKED_FIELDS = ("name", "keyid", "algorithm", "public_key", "reason", "revoked_at")


def _fields(doc: dict[str, Any], required: tuple[str, ...], *, what: str, shown: str, optional: tuple[str, ...] = ()) -> None:
    """Exactly the fields a policy format knows: an unknown one is a typo that would silently change the rule."""
    allowed = (*required, *optional)
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise PolicyError(f"trust policy {shown}: {what} has unknown field(s): {', '.join(unknown)} "
                          f"(allowed: {', '.join(allowed)})", path=shown)
    missing = [f for f in required if f not in doc]
    if missing:
        raise PolicyError(f"trust policy {shown}: {what} lacks required field(s): {', '.join(missing)}", path=shown)


def _parse_time(value: object, *, what: str, shown: str) -> dt.datetime:
    if not isinstance(value, str) or not _TIME_RE.match(value):
        raise PolicyError(f"trust policy {shown}: {what} must be a UTC time like 2027-06-30T00:00:00Z, not {str(value)[:40]!r}",
                          path=shown)
    try:
        return dt.datetime.strptime(value, TIME_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        raise PolicyError(f"trust policy {shown}: {what} {value!r} is not a valid time", path=shown) from None


def _parse_public(entry: dict[str, Any], fields: tuple[str, ...], what: str, shown: str) -> tuple[str, str, str, PublicKey]:
    """The string fields of a key entry, and its public key, checked against the key id and algorithm it claims."""
    bad = [f for f in fields if not isinstance(entry[f], str)]
    if bad:
        raise PolicyError(f"trust policy {shown}: {what}: {', '.join(bad)} must be a string", path=shown)
    name = entry["name"]
    if not _NAME_RE.match(name):
        raise PolicyError(f"trust policy {shown}: {what} has an invalid name {name!r}", path=shown)
    try:
        pub = load_public_pem(entry["public_key"].encode("ascii", "replace"), where=f"trust policy {shown}: key {name!r}")
    except KeyFileError as e:  # the same words, but a policy error: the policy file is what must be fixed
        raise PolicyError(e.message, path=shown) from None
    kid, alg = key_id(pub), algorithm_of(pub)
    if entry["keyid"] != kid:
        raise PolicyError(f"trust policy {shown}: key {name!r} has keyid {entry['keyid'][:80]!r}, which does not match "
                          f"its public key (id {kid})", path=shown)
    if entry["algorithm"] != alg:
        raise PolicyError(f"trust policy {shown}: key {name!r} says algorithm {entry['algorithm'][:40]!r}, but its "
                          f"public key is {alg}", path=shown)
    return name, kid, alg, pub


def _parse_key(entry: object, i: int, shown: str) -> TrustedKey:
    """One key entry: every field present and consistent with the public key it carries; ``expires`` optional."""
    if not isinstance(entry, dict):
        raise PolicyError(f"trust policy {shown}: key #{i + 1} is not a JSON object", path=shown)
    _fields(entry, _KEY_FIELDS, what=f"key #{i + 1}", shown=shown, optional=_KEY_OPTIONAL)
    name, kid, alg, pub = _parse_public(entry, _KEY_FIELDS, f"key #{i + 1}", shown)
    expires = _parse_time(entry["expires"], what=f"key {name!r}: expires", shown=shown) if "expires" in entry else None
    return TrustedKey(name=name, keyid=kid, algorithm=alg, public_key=pub, pem=entry["public_key"], expires=expires)


def _parse_revoked(entry: object, i: int, shown: str) -> RevokedKey:
    """One revoked entry: the key as it was trusted, why it was revoked and when."""
    if not isinstance(entry, dict):
        raise PolicyError(f"trust policy {shown}: revoked key #{i + 1} is not a JSON object", path=shown)
    what = f"revoked key #{i + 1}"
    _fields(entry, _REVOKED_FIELDS, what=what, shown=shown)
    name, kid, alg, pub = _parse_public(entry, _REVOKED_FIELDS[:-1], what, shown)
    reason = entry["reason"]
    if not reason.strip() or len(reason) > MAX_REASON_CHARS or any(not c.isprintable() for c in reason):
        raise PolicyError(f"trust policy {shown}: {what}: reason must be one printable line of 1 to {MAX_REASON_CHARS} "
                          "characters", path=shown)
    at = _parse_time(entry["revoked_at"], what=f"{what}: revoked_at", shown=shown)
    return RevokedKey(name=name, keyid=kid, algorithm=alg, public_key=pub, pem=entry["public_key"], reason=reason, revoked_at=at)


def _read_policy(path: Path, shown: str) -> bytes:
    """The policy's bytes, capped, once the check that nobody else can write it holds."""
    try:
        refuse_shared_write(Path(path), what="trust policy", error=PolicyError, display=shown)
        return read_capped(Path(path), MAX_POLICY_BYTES, display=shown, what="trust policy")
    except FileNotFoundError:
        raise PolicyError(
            f"trust policy {shown} not found", path=shown, hint="Create one with `airpack trust init POLICY`."
        ) from None
    except PolicyError:
        raise
    except Exception as e:  # noqa: BLE001 - any refusal to read the policy is a configuration error
        raise PolicyError(f"cannot read trust policy {shown}: {e}", path=shown) from None


def _positive_int(doc: dict[str, Any], field: str, shown: str, *, upto: int) -> int:
    v = doc[field]
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= upto:
        what = "version (the policy's serial number)" if field == "version" else field
        raise PolicyError(f"trust policy {shown}: {what} must be a positive integer, not {str(v)[:40]}", path=shown)
    return v


def parse_policy(data: bytes, *, shown: str) -> TrustPolicy:
    """Parse policy bytes strictly (a file's, or a signed update's payload): every field known, every key consistent."""
    try:
        doc = loads_strict(data, max_depth=4)
    except StrictJSONError as e:
        raise PolicyError(f"trust policy {shown} is malformed: {e}", path=shown) from None
    if not isinstance(doc, dict):
        raise PolicyError(f"trust policy {shown}: not a JSON object", path=shown)
    _fields(doc, _POLICY_FIELDS, what="the policy", shown=shown, optional=_POLICY_OPTIONAL)
    version = _positive_int(doc, "version", shown, upto=MAX_POLICY_VERSION)
    threshold = _positive_int(doc, "threshold", shown, upto=2**31)
    keys_doc, revoked_doc = doc["keys"], doc.get("revoked", [])
    if not isinstance(keys_doc, list):
        raise PolicyError(f"trust policy {shown}: 'keys' must be a list", path=shown)
    if not isinstance(revoked_doc, list):
        raise PolicyError(f"trust policy {shown}: 'revoked' must be a list", path=shown)
    keys = tuple(_parse_key(entry, i, shown) for i, entry in enumerate(keys_doc))
    revoked = tuple(_parse_revoked(entry, i, shown) for i, entry in enumerate(revoked_doc))
    return TrustPolicy(keys=keys, threshold=threshold, source=shown, sha256=hashlib.sha256(data).hexdigest(), version=version,
                       revoked=revoked)


def load_policy(path: Path) -> TrustPolicy:
    """Read the host's policy strictly: every field known and present, every key consistent, nothing defaulted.

    The policy is the root of trust, so a misspelt ``threshold`` must not
    quietly become 1, and a file that other users can write is refused.
    A file without ``revoked`` (written before revocation existed) has none revoked.
    """
    shown = str(path)
    return parse_policy(_read_policy(path, shown), shown=shown)


def write_policy_bytes(data: bytes, path: Path) -> None:
    """Replace the policy file atomically; an existing file keeps its (stricter) mode, never anything group/others can write."""
    mode = 0o644
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH)
    except OSError:
        pass
    atomic_write(Path(path), data, mode=mode)


def save_policy(policy: TrustPolicy, path: Path) -> None:
    """Write the policy's canonical bytes atomically (``write_policy_bytes``)."""
    write_policy_bytes(policy.to_bytes(), path)


@dataclass(frozen=True)
class VerifiedPayload:
    """Payload bytes that enough trusted keys signed; safe to parse next."""

    payload_type: str
    payload: bytes
    signers: tuple[TrustedKey, ...]


def signature_keys(envelope: Envelope, policy: TrustPolicy) -> list[TrustedKey | None]:
    """For each signature of the envelope, the policy key that made it over the exact payload, or None.

    The key id a signature carries only decides which key is tried first;
    every policy key is tried, so a wrong or missing key id still verifies.
    """
    out: list[TrustedKey | None] = []
    for raw in envelope.signatures:
        hinted = policy.by_id(raw.keyid)
        order = ([hinted] if hinted else []) + [k for k in policy.keys if k is not hinted]
        out.append(next((k for k in order if verify_sig(k.public_key, envelope.payload_type, envelope.payload, raw.sig)), None))
    return out


def _check_type(envelope: Envelope, expected_type: str, where: str) -> None:
    if envelope.payload_type != expected_type:
        raise EnvelopeError(
            f"envelope {where} has payload type {envelope.payload_type!r}, expected {expected_type!r}", path=where
        )


@dataclass(frozen=True)
class SignatureCount:
    """Who signed a payload, as one policy sees it at one moment.

    ``valid``: the distinct valid keys whose signature verified (policy order);
    ``missing``: the valid keys that did not sign; ``not_counted``: revoked or
    expired keys whose signature verified, each with why it does not count.
    """

    valid: tuple[TrustedKey, ...]
    missing: tuple[TrustedKey, ...]
    not_counted: tuple[NotCounted, ...]


def _revoked_signer(policy: TrustPolicy, envelope: Envelope, sig: bytes) -> RevokedKey | None:
    return next((r for r in policy.revoked if verify_sig(r.public_key, envelope.payload_type, envelope.payload, sig)), None)


def count_signatures(envelope: Envelope, policy: TrustPolicy, *, now: dt.datetime | None = None) -> SignatureCount:
    """Match every signature to the policy key that made it over the exact payload, and split them by key state at ``now``.

    Only valid keys count (``rules.key_state``); a signature that no trusted
    key made is tried against the revoked keys too, so a refusal can name them.
    """
    t = _now(now)
    found = signature_keys(envelope, policy)
    good = {k.keyid for k in found if k is not None}
    signed = [k for k in policy.keys if k.keyid in good]
    not_counted = [NotCounted(name=k.name, keyid=k.keyid, state=KeyState.EXPIRED, detail=format_time(k.expires))
                   for k in signed if k.expires is not None and k.state(t) is KeyState.EXPIRED]
    if policy.revoked:
        seen: set[str] = set()
        for raw, k in zip(envelope.signatures, found, strict=True):
            r = _revoked_signer(policy, envelope, raw.sig) if k is None else None
            if r is not None and r.keyid not in seen:
                seen.add(r.keyid)
                not_counted.append(NotCounted(name=r.name, keyid=r.keyid, state=KeyState.REVOKED, detail=r.reason))
    valid_ids = {k.keyid for k in policy.valid_keys(t)}
    return SignatureCount(valid=tuple(k for k in signed if k.keyid in valid_ids),
                          missing=tuple(k for k in policy.keys if k.keyid in valid_ids and k.keyid not in good),
                          not_counted=tuple(not_counted))


def verify_envelope(envelope: Envelope, policy: TrustPolicy, *, expected_type: str, where: str,
                    now: dt.datetime | None = None) -> VerifiedPayload:
    """Count distinct valid trusted keys with a valid signature over the exact payload (revoked and expired keys do not count)."""
    policy.check_usable(now)
    _check_type(envelope, expected_type, where)
    c = count_signatures(envelope, policy, now=now)
    check_threshold([k.name for k in c.valid], threshold=policy.threshold, where=where, source=policy.source,
                    missing=[k.name for k in c.missing], not_counted=c.not_counted)
    return VerifiedPayload(payload_type=envelope.payload_type, payload=envelope.payload, signers=c.valid)


def check_every_signature(envelope: Envelope, policy: TrustPolicy, *, expected_type: str, where: str) -> tuple[TrustedKey, ...]:
    """Before a co-signature: every signature already there must be a policy key's, over the exact payload (exit 4).

    Unlike ``verify_envelope`` the threshold need not be met yet (that is what
    co-signing is for), but a signature no policy key made, or garbage, means
    someone the host does not trust signed first, or the envelope was
    altered: adding a signature would vouch for it. A revoked key's signature
    is named as such. Returns the distinct policy keys that signed, in policy order.
    """
    _check_type(envelope, expected_type, where)
    found = signature_keys(envelope, policy)
    for raw, k in zip(envelope.signatures, found, strict=True):
        if k is None:
            shown = raw.keyid[:64] or "(none)"
            r = _revoked_signer(policy, envelope, raw.sig)
            why = (f"was made by a revoked key: {r.describe()}" if r is not None
                   else f"does not verify under any key of the trust policy {policy.source}")
            raise SignatureError(
                f"envelope {where}: the signature with key id {shown} {why}; refusing to co-sign",
                path=where,
                hint=("Co-sign only a bundle whose every signature is by a key you trust: ask the packer for a fresh copy, "
                      "or add the packer's public key with `airpack trust add` if it should be trusted."),
            )
    good = {k.keyid for k in found if k is not None}
    return tuple(k for k in policy.keys if k.keyid in good)
