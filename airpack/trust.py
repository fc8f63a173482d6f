"""The host's trust policy and the check that an envelope satisfies it.

The policy lives on the isolated host and is never read from a bundle. An
envelope is trusted when at least ``threshold`` *distinct* policy keys made a
valid signature over the exact payload; the key id an envelope carries only
decides which key is tried first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._fs import atomic_write, read_capped
from ._json import StrictJSONError, dumps_canonical, loads_strict
from .errors import EnvelopeError, PolicyError
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

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, int) or isinstance(self.threshold, bool) or self.threshold < 1:
            raise PolicyError(f"trust policy {self.source}: threshold must be a positive integer", path=self.source)
        ids = [k.keyid for k in self.keys]
        if len(set(ids)) != len(ids):
            raise PolicyError(f"trust policy {self.source}: a key is listed twice", path=self.source)
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise PolicyError(f"trust policy {self.source}: two keys share a name", path=self.source)

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
        if self.by_id(kid):
            raise PolicyError(f"key {kid[:16]}… is already in the policy as {self.by_id(kid).name!r}")  # type: ignore[union-attr]
        new = TrustedKey(name=name, keyid=kid, algorithm=algorithm_of(public_key), public_key=public_key, pem=pem)
        return TrustPolicy(keys=(*self.keys, new), threshold=self.threshold, source=self.source)


def new_policy(threshold: int = 1, *, source: str = "<policy>") -> TrustPolicy:
    return TrustPolicy(keys=(), threshold=threshold, source=source)


def load_policy(path: Path) -> TrustPolicy:
    shown = str(path)
    try:
        data = read_capped(Path(path), MAX_POLICY_BYTES, display=shown, what="trust policy")
    except FileNotFoundError:
        raise PolicyError(
            f"trust policy {shown} not found", path=shown, hint="Create one with `airpack trust init POLICY`."
        ) from None
    except Exception as e:  # noqa: BLE001 - any refusal to read the policy is a configuration error
        raise PolicyError(f"cannot read trust policy {shown}: {e}", path=shown) from None
    try:
        doc = loads_strict(data, max_depth=4)
    except StrictJSONError as e:
        raise PolicyError(f"trust policy {shown} is malformed: {e}", path=shown) from None
    if not isinstance(doc, dict) or doc.get("version") != POLICY_VERSION:
        raise PolicyError(f"trust policy {shown}: unknown format (expected version {POLICY_VERSION})", path=shown)
    keys_doc = doc.get("keys")
    if not isinstance(keys_doc, list):
        raise PolicyError(f"trust policy {shown}: 'keys' must be a list", path=shown)
    keys = []
    for entry in keys_doc:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("public_key"), str):
            raise PolicyError(f"trust policy {shown}: each key needs a name and a public_key", path=shown)
        pub = load_public_pem(entry["public_key"].encode("ascii", "replace"), where=f"{shown}: key {entry['name']!r}")
        kid = key_id(pub)
        if entry.get("keyid") not in (None, kid):
            raise PolicyError(f"trust policy {shown}: key {entry['name']!r} has a keyid that does not match its public key", path=shown)
        keys.append(TrustedKey(name=entry["name"], keyid=kid, algorithm=algorithm_of(pub), public_key=pub, pem=entry["public_key"]))
    return TrustPolicy(keys=tuple(keys), threshold=doc.get("threshold", 1), source=shown)


def save_policy(policy: TrustPolicy, path: Path) -> None:
    atomic_write(Path(path), policy.to_bytes(), mode=0o644)


@dataclass(frozen=True)
class VerifiedPayload:
    """Payload bytes that enough trusted keys signed; safe to parse next."""

    payload_type: str
    payload: bytes
    signers: tuple[TrustedKey, ...]


def verify_envelope(envelope: Envelope, policy: TrustPolicy, *, expected_type: str, where: str) -> VerifiedPayload:
    """Count distinct trusted keys with a valid signature over the exact payload."""
    policy.check_usable()
    if envelope.payload_type != expected_type:
        raise EnvelopeError(
            f"envelope {where} has payload type {envelope.payload_type!r}, expected {expected_type!r}", path=where
        )
    good: dict[str, TrustedKey] = {}
    for raw in envelope.signatures:
        hinted = policy.by_id(raw.keyid)
        order = ([hinted] if hinted else []) + [k for k in policy.keys if k is not hinted]
        for k in order:
            if k.keyid in good:
                continue
            if verify_sig(k.public_key, envelope.payload_type, envelope.payload, raw.sig):
                good[k.keyid] = k
                break
    signers = tuple(k for k in policy.keys if k.keyid in good)
    check_threshold([k.name for k in signers], threshold=policy.threshold, where=where, source=policy.source)
    return VerifiedPayload(payload_type=envelope.payload_type, payload=envelope.payload, signers=signers)
