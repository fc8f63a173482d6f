"""The host's trust policy and the check that an envelope satisfies it.

The policy lives on the isolated host and is never read from a bundle. An
envelope is trusted when at least ``threshold`` *distinct* policy keys made a
valid signature over the exact payload; the key id an envelope carries only
decides which key is tried first.

The policy is the root of trust, so it is read as strictly as an envelope:
every field known and present (nothing defaults), each key entry consistent
with its public key, and a file that other users could change is refused.
It is changed only through these functions (``trust add/remove/set-threshold``),
each refusing a result that no bundle could satisfy.
"""

from __future__ import annotations

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
from .errors import EnvelopeError, KeyFileError, PolicyError, SignatureError
from .rules import check_policy_usable, check_threshold
from .signing import (
    Envelope,
    PublicKey,
    algorithm_of,
    key_id,
    load_public_pem,
    verify_sig,
)

POLICY_VERSION = 1
MAX_POLICY_BYTES = 1024 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@+-]{0,127}$")


@dataclass(frozen=True)
class TrustedKey:
    name: str
    keyid: str
    algorithm: str
    public_key: PublicKey
    pem: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "keyid": self.keyid, "algorithm": self.algorithm, "public_key": self.pem}


@dataclass(frozen=True)
class TrustPolicy:
    """Public keys allowed to sign, and how many distinct ones must have signed."""

    keys: tuple[TrustedKey, ...]
    threshold: int
    source: str = "<policy>"
    sha256: str | None = None  # of the exact file bytes load_policy read (None: built in memory); installs record it

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, int) or isinstance(self.threshold, bool) or self.threshold < 1:
            raise PolicyError(f"trust policy {self.source}: threshold must be a positive integer", path=self.source)
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

    def check_usable(self) -> None:
        """Refuse a policy that can never be satisfied (fewer keys than the threshold)."""
        check_policy_usable(threshold=self.threshold, keys=len(self.keys), source=self.source)

    def by_id(self, kid: str) -> TrustedKey | None:
        for k in self.keys:
            if k.keyid == kid:
                return k
        return None

    def to_bytes(self) -> bytes:
        return dumps_canonical(
            {"version": POLICY_VERSION, "threshold": self.threshold, "keys": [k.to_json() for k in self.keys]}
        )

    def with_key(self, name: str, public_key: PublicKey, pem: str) -> TrustPolicy:
        if not _NAME_RE.match(name):
            raise PolicyError(f"invalid key name {name!r}: letters, digits, space and ._@+- only")
        kid = key_id(public_key)
        there = self.by_id(kid)
        if there is not None:
            raise PolicyError(f"key {kid[:16]}… is already in the policy as {there.name!r}", path=self.source)
        if any(k.name == name for k in self.keys):
            raise PolicyError(f"trust policy {self.source} already has a key named {name!r} (two keys may not share a name)", path=self.source,
                              hint="Choose another --name, or remove the old key first with `airpack trust remove POLICY NAME`.")
        new = TrustedKey(name=name, keyid=kid, algorithm=algorithm_of(public_key), public_key=public_key, pem=pem)
        return TrustPolicy(keys=(*self.keys, new), threshold=self.threshold, source=self.source)

    def find(self, name_or_keyid: str) -> TrustedKey:
        """The key named so, or with this key id (in full, or a unique prefix of 12 or more hex digits, as verify shows it)."""
        for k in self.keys:
            if k.name == name_or_keyid or k.keyid == name_or_keyid:
                return k
        wanted = name_or_keyid.lower()
        if len(wanted) >= 12 and all(c in "0123456789abcdef" for c in wanted):
            hits = [k for k in self.keys if k.keyid.startswith(wanted)]
            if len(hits) == 1:
                return hits[0]
        names = ", ".join(k.name for k in self.keys) or "none"
        raise PolicyError(f"trust policy {self.source} has no key named or with key id {name_or_keyid!r} (keys: {names})",
                          path=self.source, hint="`airpack trust list POLICY` shows each key's name and key id.")

    def without_key(self, name_or_keyid: str) -> tuple[TrustPolicy, TrustedKey]:
        """The policy less one key; refused (exit 2) when the keys left could no longer meet the threshold."""
        gone = self.find(name_or_keyid)
        keys = tuple(k for k in self.keys if k is not gone)
        if len(keys) < self.threshold:
            raise PolicyError(
                f"removing {gone.name!r} would leave trust policy {self.source} with {len(keys)} key(s) for a threshold of "
                f"{self.threshold}: no bundle could verify; nothing changed",
                path=self.source,
                hint=(f"Lower the threshold first (`airpack trust set-threshold {self.source} {max(len(keys), 1)}`), "
                      "or add the replacement key with `airpack trust add` before removing this one."),
            )
        return TrustPolicy(keys=keys, threshold=self.threshold, source=self.source), gone

    def with_threshold(self, threshold: int) -> TrustPolicy:
        """The policy with another threshold; refused (exit 2) above the number of keys it lists."""
        if threshold > len(self.keys):
            raise PolicyError(
                f"trust policy {self.source} lists {len(self.keys)} key(s); a threshold of {threshold} could never be met; "
                "nothing changed",
                path=self.source,
                hint="Add the keys first with `airpack trust add POLICY PUBKEY --name NAME`, then raise the threshold.",
            )
        return TrustPolicy(keys=self.keys, threshold=threshold, source=self.source)


def new_policy(threshold: int = 1, *, source: str = "<policy>") -> TrustPolicy:
    return TrustPolicy(keys=(), threshold=threshold, source=source)


_POLICY_FIELDS = ("version", "threshold", "keys")
_KEY_FIELDS = ("name", "keyid", "algorithm", "public_key")


def _fields(doc: dict[str, Any], allowed: tuple[str, ...], *, what: str, shown: str) -> None:
    """Exactly the fields a policy format knows: an unknown one is a typo that would silently change the rule."""
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise PolicyError(f"trust policy {shown}: {what} has unknown field(s): {', '.join(unknown)} "
                          f"(allowed: {', '.join(allowed)})", path=shown)
    missing = [f for f in allowed if f not in doc]
    if missing:
        raise PolicyError(f"trust policy {shown}: {what} lacks required field(s): {', '.join(missing)}", path=shown)


def _parse_key(entry: object, i: int, shown: str) -> TrustedKey:
    """One key entry: every field present and consistent with the public key it carries."""
    if not isinstance(entry, dict):
        raise PolicyError(f"trust policy {shown}: key #{i + 1} is not a JSON object", path=shown)
    _fields(entry, _KEY_FIELDS, what=f"key #{i + 1}", shown=shown)
    bad = [f for f in _KEY_FIELDS if not isinstance(entry[f], str)]
    if bad:
        raise PolicyError(f"trust policy {shown}: key #{i + 1}: {', '.join(bad)} must be a string", path=shown)
    name = entry["name"]
    if not _NAME_RE.match(name):
        raise PolicyError(f"trust policy {shown}: key #{i + 1} has an invalid name {name!r}", path=shown)
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
    return TrustedKey(name=name, keyid=kid, algorithm=alg, public_key=pub, pem=entry["public_key"])


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


def load_policy(path: Path) -> TrustPolicy:
    """Read the host's policy strictly: every field known and present, every key consistent, nothing defaulted.

    The policy is the root of trust, so a misspelt ``threshold`` must not
    quietly become 1, and a file that other users can write is refused.
    """
    shown = str(path)
    data = _read_policy(path, shown)
    try:
        doc = loads_strict(data, max_depth=4)
    except StrictJSONError as e:
        raise PolicyError(f"trust policy {shown} is malformed: {e}", path=shown) from None
    if not isinstance(doc, dict):
        raise PolicyError(f"trust policy {shown}: not a JSON object", path=shown)
    _fields(doc, _POLICY_FIELDS, what="the policy", shown=shown)
    version = doc["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version != POLICY_VERSION:
        raise PolicyError(f"trust policy {shown}: unknown format version {version!r} (expected {POLICY_VERSION})", path=shown)
    threshold = doc["threshold"]
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
        raise PolicyError(f"trust policy {shown}: threshold must be a positive integer, not {threshold!r}", path=shown)
    keys_doc = doc["keys"]
    if not isinstance(keys_doc, list):
        raise PolicyError(f"trust policy {shown}: 'keys' must be a list", path=shown)
    keys = tuple(_parse_key(entry, i, shown) for i, entry in enumerate(keys_doc))
    return TrustPolicy(keys=keys, threshold=threshold, source=shown, sha256=hashlib.sha256(data).hexdigest())


def save_policy(policy: TrustPolicy, path: Path) -> None:
    """Write the policy atomically; an existing file keeps its (stricter) mode, never anything group/others can write."""
    mode = 0o644
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH)
    except OSError:
        pass
    atomic_write(Path(path), policy.to_bytes(), mode=mode)


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


def verify_envelope(envelope: Envelope, policy: TrustPolicy, *, expected_type: str, where: str) -> VerifiedPayload:
    """Count distinct trusted keys with a valid signature over the exact payload."""
    policy.check_usable()
    _check_type(envelope, expected_type, where)
    good = {k.keyid for k in signature_keys(envelope, policy) if k is not None}
    signers = tuple(k for k in policy.keys if k.keyid in good)
    check_threshold([k.name for k in signers], threshold=policy.threshold, where=where, source=policy.source,
                    missing=[k.name for k in policy.keys if k.keyid not in good])
    return VerifiedPayload(payload_type=envelope.payload_type, payload=envelope.payload, signers=signers)


def check_every_signature(envelope: Envelope, policy: TrustPolicy, *, expected_type: str, where: str) -> tuple[TrustedKey, ...]:
    """Before a co-signature: every signature already there must be a policy key's, over the exact payload (exit 4).

    Unlike ``verify_envelope`` the threshold need not be met yet (that is what
    co-signing is for), but a signature no policy key made, or garbage, means
    someone the host does not trust signed first, or the envelope was
    altered: adding a signature would vouch for it. Returns the distinct
    policy keys that signed, in policy order.
    """
    _check_type(envelope, expected_type, where)
    found = signature_keys(envelope, policy)
    for raw, k in zip(envelope.signatures, found, strict=True):
        if k is None:
            shown = raw.keyid[:64] or "(none)"
            raise SignatureError(
                f"envelope {where}: the signature with key id {shown} does not verify under any key of the trust "
                f"policy {policy.source}; refusing to co-sign",
                path=where,
                hint=("Co-sign only a bundle whose every signature is by a key you trust: ask the packer for a fresh copy, "
                      "or add the packer's public key with `airpack trust add` if it should be trusted."),
            )
    good = {k.keyid for k in found if k is not None}
    return tuple(k for k in policy.keys if k.keyid in good)
