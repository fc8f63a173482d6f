"""The host profile: what an offline host holds, in a small document that crosses the gap the other way.

The online side packs blind without it: it guesses the host's Python and
platform for wheels, its GPUs for the fit check, and cannot know that the
host already holds 140 GB of weights, or that it will refuse the bundle's
sequence. ``airpack profile`` writes this document on the offline host;
``airpack pack --for`` reads it.

A profile is information, never trust. Everything in it is re-checked on the
host (install hashes every file a delta relies on again), so a false profile
can make a bundle bigger or uninstallable, never wrong. It holds nothing
private: no host name unless the operator gives a label, no user names, no
absolute paths, no file contents; docs/profile.md lists every field.

The document is deterministic JSON (``_json.dumps_canonical``), so the same
registry gives the same bytes and two profiles can be diffed. It is parsed
strictly, like every untrusted input: a size cap, no duplicate keys, the exact
``_type``, every field known and present; any refusal is ``ProfileError``
(exit 2: the input must change).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ._fs import open_regular_nofollow
from ._json import StrictJSONError, dumps_canonical, loads_strict
from .errors import AirpackError, GpuSpecError, ProfileError
from .gpus import parse_gpu, split_count
from .units import format_bytes
from .vram import GpuBudget

PROFILE_TYPE = "https://airpack.dev/host-profile/v1"
MAX_PROFILE_BYTES = 16 << 20  # a registry of a few hundred models and thousands of wheels stays far below this
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


# -- the document ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostGpu:
    """A group of identical GPUs: ``gpu`` is what ``--gpu`` accepts (a catalog name or a size), per-GPU memory in bytes."""

    gpu: str
    count: int
    memory_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "count": self.count, "memory_bytes": self.memory_bytes}


@dataclass(frozen=True)
class HostFile:
    """One file of an installed snapshot: its path inside the snapshot, size and SHA-256."""

    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class HostModel:
    """One installed (repo, revision) at one commit, with every file of its snapshot."""

    repo_id: str
    revision: str
    commit: str
    files: tuple[HostFile, ...]

    def to_json(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "files": [f.to_json() for f in self.files]}


@dataclass(frozen=True)
class HostWheel:
    """One wheel in the registry's wheelhouse."""

    filename: str
    name: str
    version: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"filename": self.filename, "name": self.name, "version": self.version, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class HostKey:
    """A key the host's trust policy accepts: its id (SHA-256 of the public key) and the policy's name for it."""

    keyid: str
    name: str

    def to_json(self) -> dict[str, Any]:
        return {"keyid": self.keyid, "name": self.name}


@dataclass(frozen=True)
class HostTrust:
    """The trust policy the host verifies with: its version, threshold and key ids (public facts only)."""

    version: int
    threshold: int
    keys: tuple[HostKey, ...]

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "threshold": self.threshold, "keys": [k.to_json() for k in self.keys]}


@dataclass(frozen=True)
class HostPython:
    """The interpreter pip would install wheels for: ``3.11``, ``cpython``, and the tags pip accepts, best first."""

    version: str
    implementation: str
    tags: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "implementation": self.implementation, "tags": list(self.tags)}

    def platforms(self) -> tuple[str, ...]:
        """The platform tags of ``tags`` (``manylinux_2_28_x86_64``, ...), in pip's order of preference, each once."""
        return tuple(dict.fromkeys(t.rsplit("-", 1)[-1] for t in self.tags if t.rsplit("-", 1)[-1] != "any"))


@dataclass(frozen=True)
class HostProfile:
    """A parsed (or freshly collected) host profile."""

    name: str | None
    gpus: tuple[HostGpu, ...]
    python: HostPython
    models: tuple[HostModel, ...]
    blobs: tuple[tuple[str, int], ...]  # (sha256, size) of every content-addressed blob under hub/, sorted
    wheels: tuple[HostWheel, ...]
    channels: tuple[tuple[str, int], ...]  # (channel, highest installed sequence), sorted
    trust: HostTrust | None

    def to_json(self) -> dict[str, Any]:
        return {
            "_type": PROFILE_TYPE,
            "name": self.name,
            "gpus": [g.to_json() for g in self.gpus],
            "python": self.python.to_json(),
            "models": [m.to_json() for m in self.models],
            "blobs": [{"sha256": s, "size": n} for s, n in self.blobs],
            "wheels": [w.to_json() for w in self.wheels],
            "channels": [{"channel": c, "sequence": n} for c, n in self.channels],
            "trust": self.trust.to_json() if self.trust is not None else None,
        }

    def encode(self) -> bytes:
        """The bytes written to PROFILE.json: canonical, so one registry always gives one document."""
        return dumps_canonical(self.to_json())

    def holds(self, sha256: str, size: int) -> bool:
        """Whether the host says it holds these bytes (a blob or a wheel); install checks again by hashing."""
        return (sha256, size) in self._held

    @cached_property
    def _held(self) -> frozenset[tuple[str, int]]:
        # Built once per profile: pack --for asks once per manifest file, against thousands of blobs and wheels.
        return frozenset(self.blobs) | frozenset((w.sha256, w.size) for w in self.wheels)

    def channel_sequence(self, channel: str) -> int | None:
        return dict(self.channels).get(channel)

    def trusts(self, keyid: str) -> bool:
        return self.trust is not None and any(k.keyid == keyid for k in self.trust.keys)

    def summary(self) -> list[str]:
        """What ``airpack profile --show`` prints: enough for a security officer to see what leaves the host."""
        blob_bytes = sum(n for _, n in self.blobs)
        wheel_bytes = sum(w.size for w in self.wheels)
        lines = [
            f"host profile {self.name!r}" if self.name else "host profile (no label)",
            "  gpus: " + (", ".join(f"{g.gpu} x{g.count} ({format_bytes(g.memory_bytes)} each)" for g in self.gpus) or "none"),
            f"  python: {self.python.implementation} {self.python.version}, {len(self.python.tags)} tag(s), "
            f"platforms: {', '.join(self.python.platforms()[:3]) or 'any'}",
            f"  models: {len(self.models)}",
        ]
        lines += [f"    {m.repo_id} @ {m.revision} ({m.commit[:12]}): {len(m.files)} file(s)" for m in self.models]
        lines += [
            f"  blobs: {len(self.blobs)} ({format_bytes(blob_bytes)})",
            f"  wheels: {len(self.wheels)} ({format_bytes(wheel_bytes)})",
            "  channels: " + (", ".join(f"{c} at {n}" for c, n in self.channels) or "none"),
        ]
        if self.trust is None:
            lines.append("  trust: not given")
        else:
            keys = ", ".join(f"{k.name} ({k.keyid[:12]})" for k in self.trust.keys)
            lines.append(f"  trust: version {self.trust.version}, threshold {self.trust.threshold}, keys: {keys or 'none'}")
        lines.append("  holds no host name (unless labelled), user names, absolute paths or file contents")
        return lines


# -- strict parsing ------------------------------------------------------------------------------------


class _Doc:
    """Field access that refuses unknown, missing and mistyped fields, each naming where it is."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, message: str) -> ProfileError:
        return ProfileError(f"host profile {self.source}: {message}", path=self.source)

    def obj(self, v: object, where: str, keys: set[str]) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(f"{where} must be an object")
        if set(v) != keys:
            extra, missing = sorted(set(v) - keys), sorted(keys - set(v))
            raise self.fail(f"{where}: " + "; ".join(
                ([f"unknown field(s) {', '.join(extra)}"] if extra else []) + ([f"missing field(s) {', '.join(missing)}"] if missing else [])))
        return v

    def seq(self, v: object, where: str) -> list[Any]:
        if not isinstance(v, list):
            raise self.fail(f"{where} must be a list")
        return v

    def text(self, v: object, where: str, pattern: re.Pattern[str] | None = None) -> str:
        if not isinstance(v, str) or not v or (pattern is not None and not pattern.fullmatch(v)):
            raise self.fail(f"{where} must be a {'well-formed ' if pattern else 'non-empty '}string")
        return v

    def num(self, v: object, where: str, *, least: int = 0) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise self.fail(f"{where} must be an integer >= {least}")
        return v

    def items(self, v: object, where: str, keys: set[str], make: Callable[[dict[str, Any], str], Any]) -> tuple[Any, ...]:
        return tuple(make(self.obj(x, f"{where}[{i}]", keys), f"{where}[{i}]") for i, x in enumerate(self.seq(v, where)))


def _gpu(d: _Doc, o: dict[str, Any], w: str) -> HostGpu:
    g = HostGpu(gpu=d.text(o["gpu"], f"{w}.gpu"), count=d.num(o["count"], f"{w}.count", least=1),
                memory_bytes=d.num(o["memory_bytes"], f"{w}.memory_bytes", least=1))
    try:
        parse_gpu(g.gpu, count=g.count)  # the name must be one ``--gpu`` accepts; the memory figure is the host's own
    except GpuSpecError as e:
        raise d.fail(f"{w}.gpu: {e.message}") from None
    return g


def _file(d: _Doc, o: dict[str, Any], w: str) -> HostFile:
    return HostFile(path=d.text(o["path"], f"{w}.path"), size=d.num(o["size"], f"{w}.size"),
                    sha256=d.text(o["sha256"], f"{w}.sha256", _SHA256))


def _model(d: _Doc, o: dict[str, Any], w: str) -> HostModel:
    return HostModel(repo_id=d.text(o["repo_id"], f"{w}.repo_id"), revision=d.text(o["revision"], f"{w}.revision"),
                     commit=d.text(o["commit"], f"{w}.commit", _COMMIT),
                     files=d.items(o["files"], f"{w}.files", {"path", "size", "sha256"}, lambda x, ww: _file(d, x, ww)))


def _wheel(d: _Doc, o: dict[str, Any], w: str) -> HostWheel:
    return HostWheel(filename=d.text(o["filename"], f"{w}.filename"), name=d.text(o["name"], f"{w}.name"),
                     version=d.text(o["version"], f"{w}.version"), sha256=d.text(o["sha256"], f"{w}.sha256", _SHA256),
                     size=d.num(o["size"], f"{w}.size"))


def _trust(d: _Doc, v: object) -> HostTrust | None:
    if v is None:
        return None
    o = d.obj(v, "trust", {"version", "threshold", "keys"})
    keys = d.items(o["keys"], "trust.keys", {"keyid", "name"},
                   lambda x, w: HostKey(keyid=d.text(x["keyid"], f"{w}.keyid", _SHA256), name=d.text(x["name"], f"{w}.name")))
    return HostTrust(version=d.num(o["version"], "trust.version", least=1), threshold=d.num(o["threshold"], "trust.threshold", least=1),
                     keys=keys)


def _unique(d: _Doc, values: list[Any], where: str) -> None:
    if len(set(values)) != len(values):
        raise d.fail(f"{where} lists an entry twice")


_TOP = {"_type", "name", "gpus", "python", "models", "blobs", "wheels", "channels", "trust"}


def parse_profile(data: bytes, *, source: str = "<profile>") -> HostProfile:
    """A host profile from untrusted bytes, or ``ProfileError`` naming the first thing wrong."""
    d = _Doc(source)
    if len(data) > MAX_PROFILE_BYTES:
        raise d.fail(f"larger than the {MAX_PROFILE_BYTES}-byte limit")
    try:
        raw = loads_strict(data)
    except StrictJSONError as e:
        raise d.fail(str(e)) from None
    if not isinstance(raw, dict):
        raise d.fail("must be a JSON object")
    if raw.get("_type") != PROFILE_TYPE:
        raise d.fail(f"_type must be {PROFILE_TYPE!r}, not {raw.get('_type')!r}")
    o = d.obj(raw, "the document", _TOP)
    py = d.obj(o["python"], "python", {"version", "implementation", "tags"})
    python = HostPython(version=d.text(py["version"], "python.version", re.compile(r"[0-9]+\.[0-9]+")),
                        implementation=d.text(py["implementation"], "python.implementation"),
                        tags=tuple(d.text(t, f"python.tags[{i}]") for i, t in enumerate(d.seq(py["tags"], "python.tags"))))
    blobs = d.items(o["blobs"], "blobs", {"sha256", "size"},
                    lambda x, w: (d.text(x["sha256"], f"{w}.sha256", _SHA256), d.num(x["size"], f"{w}.size")))
    channels = d.items(o["channels"], "channels", {"channel", "sequence"},
                       lambda x, w: (d.text(x["channel"], f"{w}.channel"), d.num(x["sequence"], f"{w}.sequence")))
    _unique(d, [s for s, _ in blobs], "blobs")
    _unique(d, [c for c, _ in channels], "channels")
    name = o["name"]
    if name is not None:
        name = d.text(name, "name")
    return HostProfile(
        name=name,
        gpus=d.items(o["gpus"], "gpus", {"gpu", "count", "memory_bytes"}, lambda x, w: _gpu(d, x, w)),
        python=python,
        models=d.items(o["models"], "models", {"repo_id", "revision", "commit", "files"}, lambda x, w: _model(d, x, w)),
        blobs=blobs,
        wheels=d.items(o["wheels"], "wheels", {"filename", "name", "version", "sha256", "size"}, lambda x, w: _wheel(d, x, w)),
        channels=channels,
        trust=_trust(d, o["trust"]),
    )


def load_profile(path: Path) -> HostProfile:
    """Read PROFILE.json (a plain file, never a link), capped before it is parsed."""
    shown = str(path)
    try:
        fd = open_regular_nofollow(path, display=shown)
    except FileNotFoundError:
        raise ProfileError(f"host profile {shown}: no such file", path=shown) from None
    except AirpackError as e:
        raise ProfileError(f"host profile {shown}: {e.message}", path=shown) from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_PROFILE_BYTES + 1)
    return parse_profile(data, source=shown)


def gpu_entry(spec: str, budget: GpuBudget) -> HostGpu:
    """The profile's entry for a ``--gpu SPEC`` (its name part, as given) or a detected group (``spec`` its name)."""
    name, _ = split_count(spec)
    return HostGpu(gpu=name.strip(), count=budget.count, memory_bytes=budget.memory_bytes)
