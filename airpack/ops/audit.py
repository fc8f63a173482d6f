"""For auditors: what changed between two bundles (or against a registry), and the SBOM of a bundle.

Both work on any form of a bundle (folder, tar, parts). Without a trust
policy they read the manifest as the bundle claims it and say so in every
result (``verified: false``); with one, each bundle is fully verified first.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..manifest import Manifest, format_time
from ..progress import NULL_PROGRESS, Progress
from ..registry import Registry, ref_name
from ..rules import MAX_SEQUENCE_JUMP, ChannelHigh, Sequence, classify_sequence
from ..sbom import SBOM_NAME, build_sbom
from ..sources import open_source
from ..trust import TrustPolicy
from .verify import Unverified, VerifyOptions, read_unverified, verify_bundle


@dataclass(frozen=True)
class Side:
    """One bundle as the audit sees it: its manifest and who signed (names if verified, claimed key ids if not)."""

    path: str
    manifest: Manifest
    verified: bool
    signers: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "path": self.path, "verified": self.verified, "signers": list(self.signers), "name": m.name, "channel": m.channel,
            "sequence": m.sequence, "created": format_time(m.created), "expires": format_time(m.expires) if m.expires else None,
            "manifest_sha256": m.digest,
        }


def load_side(path: Path, policy: TrustPolicy | None, *, now: dt.datetime | None = None,
              progress: Progress = NULL_PROGRESS) -> Side:
    """A bundle in any form: fully verified with a policy, else its manifest as it claims itself (labelled unverified)."""
    if policy is not None:
        vb = verify_bundle(VerifyOptions(bundle=path, policy=policy, now=now, progress=progress))
        return Side(path=str(path), manifest=vb.manifest, verified=True, signers=tuple(vb.signer_names))
    return claimed_side(path)[0]


def claimed_side(path: Path) -> tuple[Side, Unverified]:
    """The bundle as it claims itself (nothing verified), with the envelope and manifest read (the report shows both)."""
    claimed = read_unverified(open_source(path))
    return Side(path=str(path), manifest=claimed.manifest, verified=False,
                signers=tuple(f"keyid:{s.keyid}" for s in claimed.envelope.signatures)), claimed


def _changes(old: dict[str, Any], new: dict[str, Any], keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    return {k: {"old": old.get(k), "new": new.get(k)} for k in keys if old.get(k) != new.get(k)}


_MODEL_KEYS = ("source", "revision", "commit", "license", "parameters", "dtypes", "pickles", "code", "config")


def _target_key(t: dict[str, Any]) -> str:
    return f"{t.get('count', 1)}x {t.get('gpu')} {t.get('runtime')} context={t.get('context')} batch={t.get('batch')}"


@dataclass(frozen=True, kw_only=True)
class DiffResult:
    """Every difference an auditor asks about between two bundles; ``to_json`` is the ``diff --json`` document.

    The sections other than ``old``, ``new`` and ``flags`` are JSON-ready already: ``bundle`` and ``policy`` map each
    changed key to ``{"old", "new"}``; ``models``, ``files``, ``wheels`` and ``targets`` hold ``added``, ``removed``,
    ``changed`` lists (``files`` also ``unchanged``, ``old_bytes``, ``new_bytes``).
    """

    old: Side
    new: Side
    identical: bool
    bundle: dict[str, dict[str, Any]]
    signers: dict[str, list[str]]
    models: dict[str, list[dict[str, Any]]]
    files: dict[str, Any]
    wheels: dict[str, list[dict[str, Any]]]
    licenses: tuple[dict[str, Any], ...]
    policy: dict[str, dict[str, Any]]
    targets: dict[str, list[dict[str, Any]]]
    flags: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "old": self.old.to_json(),
            "new": self.new.to_json(),
            "identical": self.identical,
            "bundle": self.bundle,
            "signers": self.signers,
            "models": self.models,
            "files": self.files,
            "wheels": self.wheels,
            "licenses": list(self.licenses),
            "policy": self.policy,
            "targets": self.targets,
            "flags": list(self.flags),
        }


def diff_manifests(old: Side, new: Side) -> DiffResult:
    """Every difference an auditor asks about."""
    a, b = old.manifest, new.manifest
    af, bf = {f.path: f for f in a.files}, {f.path: f for f in b.files}
    files = {
        "added": [{"path": p, "size": bf[p].size, "sha256": bf[p].sha256} for p in sorted(set(bf) - set(af))],
        "removed": [{"path": p, "size": af[p].size, "sha256": af[p].sha256} for p in sorted(set(af) - set(bf))],
        "changed": [
            {"path": p, "old_size": af[p].size, "new_size": bf[p].size, "old_sha256": af[p].sha256, "new_sha256": bf[p].sha256}
            for p in sorted(set(af) & set(bf)) if af[p].sha256 != bf[p].sha256 or af[p].size != bf[p].size
        ],
        "unchanged": sum(1 for p in set(af) & set(bf) if af[p].sha256 == bf[p].sha256 and af[p].size == bf[p].size),
        "old_bytes": a.total_bytes,
        "new_bytes": b.total_bytes,
    }
    am, bm = {m.repo_id: m.raw for m in a.models}, {m.repo_id: m.raw for m in b.models}
    models: dict[str, list[dict[str, Any]]] = {
        "added": [{"repo_id": r, "commit": bm[r].get("commit"), "license": bm[r].get("license")} for r in sorted(set(bm) - set(am))],
        "removed": [{"repo_id": r, "commit": am[r].get("commit"), "license": am[r].get("license")} for r in sorted(set(am) - set(bm))],
        "changed": [
            {"repo_id": r, "changes": ch} for r in sorted(set(am) & set(bm)) if (ch := _changes(am[r], bm[r], _MODEL_KEYS))
        ],
    }
    aw, bw = {w.name: w for w in a.wheels}, {w.name: w for w in b.wheels}
    wheels = {
        "added": [{"name": n, "version": bw[n].version, "sha256": bw[n].sha256} for n in sorted(set(bw) - set(aw))],
        "removed": [{"name": n, "version": aw[n].version, "sha256": aw[n].sha256} for n in sorted(set(aw) - set(bw))],
        "changed": [
            {"name": n, "old_version": aw[n].version, "new_version": bw[n].version, "old_sha256": aw[n].sha256, "new_sha256": bw[n].sha256}
            for n in sorted(set(aw) & set(bw)) if (aw[n].version, aw[n].sha256) != (bw[n].version, bw[n].sha256)
        ],
    }
    licences = [
        {"repo_id": r, "old": am[r].get("license"), "new": bm[r].get("license")}
        for r in sorted(set(am) & set(bm)) if am[r].get("license") != bm[r].get("license")
    ]
    policy = _changes({"allow_pickle": a.allow_pickle, "allow_code": a.allow_code},
                      {"allow_pickle": b.allow_pickle, "allow_code": b.allow_code}, ("allow_pickle", "allow_code"))
    at, bt = {_target_key(t): t for t in a.targets}, {_target_key(t): t for t in b.targets}
    targets = {
        "added": [bt[k] for k in sorted(set(bt) - set(at))],
        "removed": [at[k] for k in sorted(set(at) - set(bt))],
        "changed": [
            {"target": k, "old_estimate": at[k].get("estimate"), "new_estimate": bt[k].get("estimate")}
            for k in sorted(set(at) & set(bt)) if at[k].get("estimate") != bt[k].get("estimate")
        ],
    }
    bundle = _changes(old.to_json(), new.to_json(), ("name", "channel", "sequence", "created", "expires", "manifest_sha256"))
    flags = []
    if not (old.verified and new.verified):
        flags.append("unverified: manifests read as the bundles claim them; pass --trust to verify")
    if a.channel == b.channel:
        # As if OLD were the channel's highest installed bundle: the rule install applies, not an approximation.
        high = ChannelHigh(sequence=a.sequence, manifest_sha256=a.digest, bundle=a.name)
        verdict = classify_sequence(high, sequence=b.sequence, manifest_sha256=b.digest)
        if verdict in (Sequence.OLDER, Sequence.CONFLICT):
            other = " with other content" if verdict is Sequence.CONFLICT else ""
            flags.append(f"new sequence {b.sequence} is not above old {a.sequence}{other}: a host that installed the old bundle "
                         "would refuse the new one as a rollback")
        elif verdict is Sequence.JUMP:
            flags.append(f"new sequence {b.sequence} jumps more than {MAX_SEQUENCE_JUMP:,} beyond old {a.sequence}: a host that "
                         "installed the old bundle would refuse the new one")
    if policy:
        flags.append("content policy changed: " + ", ".join(f"{k} {v['old']} -> {v['new']}" for k, v in policy.items()))
    if licences:
        flags.append("licence changed: " + ", ".join(f"{x['repo_id']} {x['old']} -> {x['new']}" for x in licences))
    return DiffResult(
        old=old,
        new=new,
        identical=a.digest == b.digest,
        bundle=bundle,
        signers={"old": list(old.signers), "new": list(new.signers),
                 "added": sorted(set(new.signers) - set(old.signers)), "removed": sorted(set(old.signers) - set(new.signers))},
        models=models,
        files=files,
        wheels=wheels,
        licenses=tuple(licences),
        policy=policy,
        targets=targets,
        flags=tuple(flags),
    )


@dataclass(frozen=True, kw_only=True)
class DiffOptions:
    old: Path
    new: Path
    policy: TrustPolicy | None = None
    now: dt.datetime | None = None
    progress: Progress = NULL_PROGRESS


def diff(opts: DiffOptions) -> DiffResult:
    old = load_side(opts.old, opts.policy, now=opts.now, progress=opts.progress)
    new = load_side(opts.new, opts.policy, now=opts.now, progress=opts.progress)
    return diff_manifests(old, new)


@dataclass(frozen=True, kw_only=True)
class SbomOptions:
    bundle: Path
    policy: TrustPolicy | None = None
    now: dt.datetime | None = None
    progress: Progress = NULL_PROGRESS


@dataclass(frozen=True, kw_only=True)
class SbomResult:
    """A bundle's SBOM: its exact bytes and the bundle it describes; ``to_json`` is the SBOM document itself."""

    data: bytes
    side: Side

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.data)
        return doc


def sbom(opts: SbomOptions) -> SbomResult:
    """The bundle's CycloneDX 1.6 SBOM, made from its manifest (identical to the signed ``sbom.cdx.json`` it carries)."""
    return sbom_for(load_side(opts.bundle, opts.policy, now=opts.now, progress=opts.progress))


def sbom_for(side: Side) -> SbomResult:
    """The SBOM of a bundle already loaded (the report builds it from the side it verified once)."""
    m = side.manifest
    data = build_sbom(
        name=m.name, channel=m.channel, sequence=m.sequence, created=m.created,
        files=[f for f in m.files if f.path != SBOM_NAME], models=[x.raw for x in m.models], wheels=[w.raw for w in m.wheels],
    )
    return SbomResult(data=data, side=side)


@dataclass(frozen=True, kw_only=True)
class DiffRegistryOptions:
    bundle: Path
    registry: Path
    policy: TrustPolicy | None = None
    now: dt.datetime | None = None
    progress: Progress = NULL_PROGRESS


@dataclass(frozen=True, kw_only=True)
class ModelChange:
    """What installing the bundle would do to one of its models: ``action`` is install, add-ref, update, reactivate or unchanged."""

    repo_id: str
    ref: str
    action: str
    commit: str
    installed_commit: str | None
    installed_bundle: str | None
    installed_sequence: int | None
    license_old: str | None
    license_new: str | None
    files: dict[str, list[dict[str, Any]]]  # added, removed, changed: against the installed revision of the ref
    bytes_to_copy: int

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id, "ref": self.ref, "action": self.action, "commit": self.commit,
            "installed_commit": self.installed_commit, "installed_bundle": self.installed_bundle,
            "installed_sequence": self.installed_sequence, "license": {"old": self.license_old, "new": self.license_new},
            "files": self.files, "bytes_to_copy": self.bytes_to_copy,
        }


@dataclass(frozen=True, kw_only=True)
class WheelState:
    """One wheel of the bundle against the registry's wheelhouse: new, present (same bytes) or conflict."""

    name: str
    version: str
    filename: str
    state: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "filename": self.filename, "state": self.state}


@dataclass(frozen=True, kw_only=True)
class DiffRegistryResult:
    """What installing a bundle into a registry would change; ``to_json`` is the ``diff BUNDLE --registry --json`` document."""

    bundle: Side
    registry: str
    models: tuple[ModelChange, ...]
    wheels: tuple[WheelState, ...]
    flags: tuple[str, ...]
    channel_high: ChannelHigh | None  # the channel's highest installed bundle, as read for the sequence flag (not in the JSON)

    @property
    def bytes_to_copy(self) -> int:
        return sum(x.bytes_to_copy for x in self.models)

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle.to_json(), "registry": self.registry, "models": [x.to_json() for x in self.models],
            "wheels": [w.to_json() for w in self.wheels], "flags": list(self.flags), "bytes_to_copy": self.bytes_to_copy,
        }


def diff_registry(opts: DiffRegistryOptions) -> DiffRegistryResult:
    """What installing ``opts.bundle`` into ``opts.registry`` would change; reads the registry, never writes it."""
    return diff_registry_side(load_side(opts.bundle, opts.policy, now=opts.now, progress=opts.progress), opts.registry)


def diff_registry_side(side: Side, registry: Path) -> DiffRegistryResult:
    """``diff_registry`` for a bundle already loaded (the report verifies it once for every section)."""
    m = side.manifest
    reg = Registry.open(registry)
    flags: list[str] = []
    if not side.verified:
        flags.append("unverified: the manifest is read as the bundle claims it; pass --trust to verify")
    models: list[ModelChange] = []
    with reg.reader() as conn:
        same = conn.active_bundle_with_digest(m.digest)
        if same is not None:
            flags.append("this exact bundle is already installed: install would change nothing (or re-point refs after a rollback)")
        ch = conn.channel_high(m.channel)
        verdict = classify_sequence(ch, sequence=m.sequence, manifest_sha256=m.digest)  # the rule install applies
        if ch is not None and verdict in (Sequence.OLDER, Sequence.CONFLICT):
            flags.append(f"sequence {m.sequence} is not above {ch.sequence} ({ch.bundle}) on channel {m.channel}: install would be "
                         "refused as a rollback (unless --allow-downgrade)")
        elif verdict is Sequence.JUMP:  # a channel's first bundle counts from 0
            flags.append(f"sequence {m.sequence} jumps more than {MAX_SEQUENCE_JUMP:,} beyond {ch.sequence if ch else 0}: install "
                         "would be refused")
        for x in m.models:
            ref = ref_name(x.revision)
            rows = conn.models(repo_id=x.repo_id)
            cur = next((r for r in rows if r.ref == ref and r.current), None)
            have_commit = [r for r in rows if r.commit == x.commit]
            new_files = {f.path[len(x.prefix) + 1:]: f for f in m.model_files(x)}
            if cur is None:
                action = "install" if not rows else "add-ref"
            elif cur.commit == x.commit:
                action = "unchanged"
            else:
                action = "reactivate" if have_commit else "update"
            old_files = {f.path: f.to_json() for f in conn.model_files(cur.model_id)} if cur is not None else {}
            to_copy = sum(
                f.size for f in new_files.values()
                if not conn.has_file(f.sha256)
            )
            models.append(ModelChange(
                repo_id=x.repo_id, ref=ref, action=action, commit=x.commit,
                installed_commit=cur.commit if cur else None, installed_bundle=cur.bundle if cur else None,
                installed_sequence=cur.sequence if cur else None,
                license_old=cur.license if cur else None, license_new=x.license,
                files={
                    "added": [{"path": p, "size": f.size, "sha256": f.sha256} for p, f in sorted(new_files.items()) if p not in old_files],
                    "removed": [{"path": p, "size": f["size"], "sha256": f["sha256"]} for p, f in sorted(old_files.items()) if p not in new_files],
                    "changed": [{"path": p, "old_sha256": old_files[p]["sha256"], "new_sha256": f.sha256, "old_size": old_files[p]["size"],
                                 "new_size": f.size} for p, f in sorted(new_files.items())
                                if p in old_files and old_files[p]["sha256"] != f.sha256],
                },
                bytes_to_copy=to_copy,
            ))
            if cur is not None and cur.license != x.license:
                flags.append(f"licence of {x.repo_id} changes: {cur.license} -> {x.license}")
        have_wheels = conn.active_wheels()
    wheels: list[WheelState] = []
    for w in m.wheels:
        fn = w.path.rsplit("/", 1)[-1]
        state = "present" if have_wheels.get(fn) == w.sha256 else ("conflict" if fn in have_wheels else "new")
        wheels.append(WheelState(name=w.name, version=w.version, filename=fn, state=state))
        if state == "conflict":
            flags.append(f"wheel {fn} is installed with other content: install would be refused")
    return DiffRegistryResult(bundle=side, registry=str(reg.root), models=tuple(models), wheels=tuple(wheels), flags=tuple(flags),
                              channel_high=ch)
