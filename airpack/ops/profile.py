"""``airpack profile``: the offline host describes itself, so the online side packs exactly what it lacks.

The registry is only read (``Registry.reader``): writing a profile changes
nothing on the host, not even the audit log. What is collected, and nothing
more (docs/profile.md): the GPUs (``--gpu``, else NVML; none is allowed: a
host without GPUs still takes bundles), the interpreter pip installs for and
the tags it accepts (``packaging.tags.sys_tags``), every installed snapshot's
files, the blobs and wheels held, the highest sequence per channel, and,
with ``--trust``, the policy's key ids, names, version and threshold. The
database's rows are reported as recorded: the profile is a hint to the
packer, and install hashes every file a delta relies on again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.tags import sys_tags

from .._fs import atomic_write
from ..errors import GpuSpecError
from ..gpus import lookup, resolve_gpus, try_detect
from ..host_profile import (
    HostFile,
    HostGpu,
    HostKey,
    HostModel,
    HostProfile,
    HostPython,
    HostTrust,
    HostWheel,
    gpu_entry,
)
from ..registry import Database, Registry
from ..trust import TrustPolicy

MiB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class ProfileOptions:
    """Where to read from and what to add: a label, a ``--gpu`` in place of NVML, the policy in use."""

    registry: Path
    out: Path | None = None
    name: str | None = None
    gpu: str | None = None
    policy: TrustPolicy | None = None


def _gpus(spec: str | None) -> tuple[HostGpu, ...]:
    """``--gpu`` as given, else what NVML sees (named by the catalog when it knows the name, else by its size)."""
    if spec is not None:
        return (gpu_entry(spec, resolve_gpus(spec)),)
    found = try_detect()
    if found is None:
        return ()
    try:
        name = lookup(found.name).key
    except GpuSpecError:
        name = f"{found.memory_bytes // MiB}MiB"
    return (HostGpu(gpu=name, count=found.count, memory_bytes=found.memory_bytes),)


def _python() -> HostPython:
    return HostPython(version=f"{sys.version_info.major}.{sys.version_info.minor}", implementation=sys.implementation.name,
                      tags=tuple(str(t) for t in sys_tags()))


def _holdings(conn: Database) -> tuple[tuple[HostModel, ...], tuple[tuple[str, int], ...]]:
    """Each installed snapshot once (a re-install by a newer bundle is the same snapshot), and the blobs they use."""
    models: dict[tuple[str, str, str], HostModel] = {}
    blobs: dict[str, int] = {}
    for m in conn.models():
        files = tuple(HostFile(path=f.path, size=f.size, sha256=f.sha256) for f in conn.model_files(m.model_id))
        models[(m.repo_id, m.ref, m.commit)] = HostModel(repo_id=m.repo_id, revision=m.ref, commit=m.commit, files=files)
        blobs.update((f.sha256, f.size) for f in files)
    return tuple(models[k] for k in sorted(models)), tuple(sorted(blobs.items()))


def _trust(policy: TrustPolicy | None) -> HostTrust | None:
    if policy is None:
        return None
    keys = tuple(sorted((HostKey(keyid=k.keyid, name=k.name) for k in policy.keys), key=lambda k: k.keyid))
    return HostTrust(version=policy.version, threshold=policy.threshold, keys=keys)


def collect(opts: ProfileOptions) -> HostProfile:
    """The profile of this host and registry (read-only)."""
    gpus = _gpus(opts.gpu)
    reg = Registry.open(opts.registry)
    with reg.reader() as conn:
        models, blobs = _holdings(conn)
        wheels = tuple(HostWheel(filename=w.filename, name=w.name, version=w.version, sha256=w.sha256, size=w.size)
                       for w in conn.active_wheel_files())
        channels = tuple((c, h.sequence) for c, h in conn.channels())
    return HostProfile(name=opts.name, gpus=gpus, python=_python(), models=models, blobs=blobs, wheels=wheels,
                       channels=channels, trust=_trust(opts.policy))


def write_profile(opts: ProfileOptions) -> HostProfile:
    """Collect the profile and write it to ``opts.out`` atomically (nothing is written if collecting fails)."""
    profile = collect(opts)
    if opts.out is not None:
        atomic_write(opts.out, profile.encode())
    return profile
