"""What the registry database answers: small frozen records, never ``sqlite3.Row``.

It exists so that the operations can name and type what they get from
``Database`` (``airpack.registry.database``) without reading its SQL, and so
the JSON shapes users see (``InstalledModel.to_json``, ``StoredFile.to_json``)
are defined next to the data. ``ChannelHigh`` belongs to ``airpack.rules``
(the rollback rule is decided there) and is re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..rules import ChannelHigh  # what the rollback rules decide on; the database answers it (``Database.channel_high``)


@dataclass(frozen=True)
class AuthorisingPolicy:
    """The trust policy that authorised an install: its file's SHA-256, its threshold, and the key ids that counted.

    Recorded with every install, so an auditor can tell later which policy let
    a bundle in (``sha256`` is None when the policy was built in memory, not
    read from a file).
    """

    sha256: str | None
    threshold: int
    keyids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "threshold": self.threshold, "keyids": list(self.keyids)}


@dataclass(frozen=True)
class InstalledModel:
    """One installed (repo, revision) as installed by one bundle."""

    model_id: int
    repo_id: str
    ref: str
    commit: str
    revision: str | None
    source: str
    license: str | None
    bundle_id: int
    bundle: str
    channel: str
    sequence: int
    manifest_sha256: str
    signers: tuple[dict[str, str], ...]
    installed_at: str
    installed_by: str
    current: bool
    files: int
    bytes: int
    has_wheels: bool
    policy: AuthorisingPolicy | None = None  # None: installed before airpack recorded it
    ref_commit: str | None = None  # the commit its revision name points to now (None: no ref)

    @property
    def status(self) -> str:
        """``current`` (the one row its name points to), ``superseded`` (the same commit, installed again by a
        newer bundle: one current row per revision) or ``kept`` (another commit, kept for rollback)."""
        if self.current:
            return "current"
        return "superseded" if self.ref_commit == self.commit else "kept"

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "revision": self.ref,
            "commit": self.commit,
            "current": self.current,
            "status": self.status,
            "bundle": self.bundle,
            "channel": self.channel,
            "sequence": self.sequence,
            "manifest_sha256": self.manifest_sha256,
            "signers": [dict(s) for s in self.signers],
            "installed_at": self.installed_at,
            "installed_by": self.installed_by,
            "source": self.source,
            "license": self.license,
            "files": self.files,
            "bytes": self.bytes,
            "policy": self.policy.to_json() if self.policy is not None else None,
        }


@dataclass(frozen=True)
class BundleRow:
    """An active bundle, as far as the operations need to name it."""

    id: int
    name: str
    sequence: int


@dataclass(frozen=True)
class InstalledBundle:
    """An active bundle as ``airpack check`` re-verifies it: its digests and what authorised it."""

    id: int
    name: str
    channel: str
    sequence: int
    manifest_sha256: str
    envelope_sha256: str | None  # None: installed before envelopes were kept
    policy: AuthorisingPolicy | None


@dataclass(frozen=True)
class OpRow:
    """One committed registry write (the ``ops`` table): each has its line in the audit log."""

    txn: str
    kind: str
    at: str


@dataclass(frozen=True)
class BundleModel:
    """One model row of a bundle, with the commit its ref points at now (None: no ref)."""

    model_id: int
    repo_id: str
    ref: str
    commit: str
    revision: str | None
    source: str
    license: str | None
    ref_commit: str | None


@dataclass(frozen=True)
class StoredFile:
    """One file of an installed model: its path in the snapshot, digest and size."""

    path: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class RefRow:
    """A ``refs/<ref>`` of a repo and the commit it names."""

    ref: str
    commit: str


@dataclass(frozen=True)
class WheelRow:
    """One wheel file a bundle installed into the wheelhouse."""

    filename: str
    name: str
    version: str
    sha256: str
    size: int


__all__ = [
    "AuthorisingPolicy", "BundleModel", "BundleRow", "ChannelHigh", "InstalledBundle", "InstalledModel", "OpRow", "RefRow", "StoredFile",
    "WheelRow",
]
