"""``pack --for PROFILE``: a delta bundle for one host, decided from its profile.

The signed manifest still describes the complete install (every file of
every model and every wheel, with size and SHA-256); the files whose bytes
the host already holds are marked ``on_host`` and left out of the bundle. The
profile is information, never trust: it decides only what is carried, and the
host re-hashes every file a delta relies on before it installs anything. A
false profile therefore makes a bundle bigger or uninstallable, never wrong.

Before anything is fetched the profile also says what the host would refuse
(a sequence not above its channel's, ``rules.check_sequence_for_host``: exit
4), what it would not trust (a signing key outside its policy: a warning, the
policy may change before the courier arrives), which Python and platform its
wheels are for, and which GPUs the fit estimate should be made against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import rules
from ..hashing import hash_file
from ..host_profile import HostProfile
from ..manifest import FileEntry
from ..spec import PackSpec, TargetSpec, WheelSpec
from ..units import format_bytes
from ._pack_common import PlannedFile

_IMPLEMENTATIONS = {"cpython": "cp", "pypy": "pp", "ironpython": "ip", "jython": "jy"}


def _wheels_for(w: WheelSpec, profile: HostProfile) -> WheelSpec:
    """The spec's wheel target, with what it does not name taken from the host (its Python, implementation, platform)."""
    py = profile.python
    changes: dict[str, Any] = {}
    if "python_version" not in w.named:
        changes["python_version"] = py.version
    if "implementation" not in w.named and py.implementation in _IMPLEMENTATIONS:
        changes["implementation"] = _IMPLEMENTATIONS[py.implementation]
    platforms = py.platforms()
    if "platforms" not in w.named and platforms:
        changes["platforms"] = platforms[:1]  # the host's most specific tag; fetch.wheels adds the older ones it implies
    return dataclasses.replace(w, **changes)


def _targets_text(targets: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{g}:{n}" for g, n in targets) or "none"


def for_host(spec: PackSpec, profile: HostProfile, keyid: str | None) -> tuple[PackSpec, list[str]]:
    """The spec as packed for this host, and the warnings to print; exit 4 if the host would refuse the sequence."""
    rules.check_sequence_for_host(profile.channel_sequence(spec.channel), name=spec.name, channel=spec.channel,
                                  sequence=spec.sequence)
    warnings: list[str] = []
    if keyid is not None and profile.trust is not None and not profile.trusts(keyid):
        warnings.append(f"the signing key {keyid[:16]} is not in the host's trust policy (version {profile.trust.version}): "
                        "the host will refuse this bundle unless its policy adds the key")
    elif keyid is not None and profile.trust is None:
        warnings.append("the profile records no trust policy (profile --trust): whether the host trusts this key is unknown")
    host = [(g.gpu, g.count) for g in profile.gpus]
    changes: dict[str, Any] = {}
    if not spec.targets and profile.gpus:
        changes["targets"] = tuple(TargetSpec(gpu=g.gpu, count=g.count) for g in profile.gpus)
    elif spec.targets and sorted((t.gpu, t.count) for t in spec.targets) != sorted(host):
        warnings.append(f"the spec's targets ({_targets_text((t.gpu, t.count) for t in spec.targets)}) differ from the host's "
                        f"GPUs ({_targets_text(host)}); the fit estimate is made for the spec's")
    if spec.wheels is not None:
        changes["wheels"] = _wheels_for(spec.wheels, profile)
    return (dataclasses.replace(spec, **changes) if changes else spec), warnings


def on_host_paths(entries: list[FileEntry], models: list[dict[str, Any]], wheels: list[dict[str, Any]],
                  profile: HostProfile) -> list[str]:
    """Model files and wheels whose exact bytes (SHA-256 and size) the host holds; the rest (SBOM, requirements) is carried."""
    prefixes = tuple(f"{m['path']}/" for m in models)
    wheel_paths = {w["path"] for w in wheels}
    return sorted(e.path for e in entries
                  if (e.path.startswith(prefixes) or e.path in wheel_paths) and profile.holds(e.sha256, e.size))


def delta_listing(carried: list[tuple[str, int]], on_host: list[tuple[str, int]], unknown: list[tuple[str, int]]) -> dict[str, Any]:
    """What a delta carries and leaves on the host (files and bytes), for ``pack`` and its dry run."""
    def side(files: list[tuple[str, int]]) -> dict[str, Any]:
        return {"files": len(files), "bytes": sum(n for _, n in files), "paths": [p for p, _ in files]}

    return {"carried": side(carried), "on_host": side(on_host), "not_known_until_fetched": side(unknown)}


def dry_run_delta(planned: list[PlannedFile], wheel_records: list[dict[str, Any]], profile: HostProfile) -> dict[str, Any]:
    """The dry run's answer: local files are hashed where they are, wheels by the index's digest, Hub LFS files by the
    SHA-256 the Hub lists; a plain Hub file (the Hub lists only its git SHA-1) is known only once fetched (the dry run
    downloads nothing), so those are listed apart."""
    wheel_sha = {r["path"]: r.get("sha256") for r in wheel_records}
    carried: list[tuple[str, int]] = []
    left: list[tuple[str, int]] = []
    unknown: list[tuple[str, int]] = []
    for p in planned:
        sha: str | None = wheel_sha.get(p.bundle_path) or p.sha256
        if sha is None and p.bundle_path not in wheel_sha and p.transport is None:
            sha = hash_file(Path(p.source)).sha256  # a local model file
        if sha is None:
            unknown.append((p.bundle_path, p.size))
        else:
            (left if profile.holds(sha, p.size) else carried).append((p.bundle_path, p.size))
    return delta_listing(carried, left, unknown)


def delta_text(listing: dict[str, Any]) -> list[str]:
    """``pack``'s lines for a delta: what is carried, what is left on the host."""
    c, h, u = listing["carried"], listing["on_host"], listing["not_known_until_fetched"]
    lines = [f"  delta:    carries {c['files']} file(s), {format_bytes(c['bytes'])}; leaves {h['files']} file(s), "
             f"{format_bytes(h['bytes'])} on the host"]
    if u["files"]:
        lines.append(f"            {u['files']} Hub file(s), {format_bytes(u['bytes'])}, known only once fetched")
    lines += [f"    on host: {p}" for p in h["paths"]]
    return lines
