"""The install plan: which bytes of a verified bundle to read, which to share, which links to make.

It exists to keep "what must change in the registry" apart from "copying
it" (``ops.install.stage_files``) and "recording it" (the database). The plan
reads each distinct content once, reuses blobs the registry already holds
(same SHA-256), stages the snapshot links, and names the refs and the
hash-pinned requirements file to write after the commit.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._fs import check_relpath, oserror_to_airpack
from ..errors import ConflictError, IntegrityError, MalformedManifestError
from ..manifest import FileEntry, Manifest, ModelEntry
from ..registry import HUB_DIR, WHEELS_DIR, Txn, WheelRow, Writer, kept_ref, link_target, ref_name, repo_folder, requirements_name

_WHEEL_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,200}[A-Za-z0-9])?$")
_WHEEL_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]{0,100}$")


@dataclass
class Read:
    """One distinct content: where to read it on the medium and the staged names that receive it."""

    source: FileEntry
    dests: list[str] = field(default_factory=list)
    live: Path | None = None  # bytes the registry already holds (hard-link instead of reading)


@dataclass
class Plan:
    leaves: list[str] = field(default_factory=list)
    reads: dict[str, Read] = field(default_factory=dict)
    hash_only: list[FileEntry] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    wheels: list[WheelRow] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    shared_bytes: int = 0


def wheel_filename(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    check_relpath(name)
    if name.startswith("."):
        raise IntegrityError(f"wheel file name {name!r} starts with a dot", path=path)
    return name


def requirements_text(bundle: str, sequence: int, wheels: list[tuple[str, str, str]]) -> str:
    """Hash-pinned requirements for ``pip install --no-index --require-hashes``: one line per name==version."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, version, sha in wheels:
        if not _WHEEL_NAME.match(name) or not _WHEEL_VERSION.match(version):
            raise MalformedManifestError(f"manifest: wheel {name!r} {version!r} is not a valid name and version")
        key = (re.sub(r"[-_.]+", "-", name).lower(), version)
        groups.setdefault(key, [])
        if sha not in groups[key]:
            groups[key].append(sha)
    lines = [
        f"# Hash-pinned requirements of bundle {bundle} (sequence {sequence}), written by airpack.",
        "# pip install --no-index --find-links REGISTRY/wheels --require-hashes -r REGISTRY/wheels/" + requirements_name(bundle),
    ]
    for (name, version), shas in sorted(groups.items()):
        hashes = " \\\n".join(f"    --hash=sha256:{s}" for s in sorted(shas))
        lines.append(f"{name}=={version} \\\n{hashes}")
    return "\n".join(lines) + "\n"


def make_plan(w: Writer, txn: Txn, manifest: Manifest) -> Plan:
    """Which bytes to read, which blobs to share, which links to make; links are staged here."""
    planner = _Planner(w, txn, manifest)
    for model in manifest.models:
        planner.add_model(model)
    planner.add_wheels()
    return planner.finish()


class _Planner:
    """Builds one ``Plan``: each content is read once (``need``), whatever names receive it."""

    def __init__(self, w: Writer, txn: Txn, m: Manifest) -> None:
        self.w = w
        self.reg = w.reg
        self.txn = txn
        self.m = m
        self.plan = Plan()
        self.first_of: dict[str, FileEntry] = {}
        for f in m.files:
            self.first_of.setdefault(f.sha256, f)
        self.covered: set[str] = set()  # contents some registry name keeps; the rest is only hashed

    def need(self, sha: str, rel: str) -> None:
        r = self.plan.reads.get(sha)
        if r is None:
            r = self.plan.reads[sha] = Read(source=self.first_of[sha])
        r.dests.append(rel)
        self.plan.leaves.append(rel)

    def add_model(self, model: ModelEntry) -> None:
        """The model's blobs (shared where the repo has them), its snapshot links, its ref."""
        base = f"{HUB_DIR}/{repo_folder(model.repo_id)}"
        ref = ref_name(model.revision)
        files = [(f.path[len(model.prefix) + 1:], f) for f in self.m.model_files(model)]
        for sha in sorted({f.sha256 for _, f in files}):
            self.covered.add(sha)
            if self.w.repo_has_blob(model.repo_id, sha):
                self.plan.shared_bytes += self.first_of[sha].size
                continue
            self.need(sha, f"{base}/blobs/{sha}")
        snap = f"{base}/snapshots/{model.commit}"
        self._stage_links(snap, files)
        self.plan.refs[f"{base}/refs/{ref}"] = model.commit
        # One ref per installed commit keeps it safe from `hf cache prune` (layout.kept_ref); older installs get theirs too.
        for commit in sorted({model.commit, *(x.commit for x in self.w.conn.models(repo_id=model.repo_id))}):
            self.plan.refs[f"{base}/refs/{kept_ref(commit)}"] = commit
        self.plan.models.append({
            "repo_id": model.repo_id, "ref": ref, "commit": model.commit, "revision": model.revision, "source": model.source,
            "license": model.license, "files": [(rel, f.sha256, f.size) for rel, f in files],
            "snapshot": str(self.reg.path(snap)), "bytes": sum(f.size for _, f in files),
        })

    def _stage_links(self, snap: str, files: list[tuple[str, FileEntry]]) -> None:
        """Stage a link per file; in a snapshot already there, only the links it lacks (a different one is a conflict)."""
        snap_exists = self.reg.lstat(snap) is not None
        if snap_exists:
            self.reg.safe_dir(snap, create=False)
        for rel, f in files:
            link_rel = f"{snap}/{rel}"
            target = link_target(rel, f.sha256)
            if snap_exists and self._has_link(link_rel, target, f):
                continue
            try:
                os.symlink(target, self.txn.staged(link_rel))
            except OSError as e:
                raise oserror_to_airpack(e, "cannot stage", link_rel) from None
            self.plan.leaves.append(link_rel)

    def _has_link(self, link_rel: str, target: str, f: FileEntry) -> bool:
        """True if the live snapshot holds exactly this link; False if nothing is there; anything else is a conflict."""
        reg = self.reg
        st = reg.lstat(link_rel) if reg.safe_dir(link_rel.rsplit("/", 1)[0], create=False) is not None else None
        if st is None:
            return False
        if os.path.islink(reg.path(link_rel)) and os.readlink(reg.path(link_rel)) == target:
            return True
        raise ConflictError(f"registry path {link_rel} exists and is not the link to {f.sha256[:12]} this bundle needs", path=link_rel)

    def add_wheels(self) -> None:
        """Each wheel into the wheelhouse (shared if the same file is there), and the requirements file."""
        m = self.m
        seen_wheels: dict[str, str] = {}
        req = requirements_name(m.name)
        for wh in m.wheels:
            fn = wheel_filename(wh.path)
            if fn == req or fn in seen_wheels:
                raise ConflictError(f"bundle {m.name} carries two wheel files named {fn}", path=wh.path)
            seen_wheels[fn] = wh.sha256
            entry = m.file(wh.path)
            assert entry is not None
            self.plan.wheels.append(WheelRow(filename=fn, name=wh.name, version=wh.version, sha256=wh.sha256, size=entry.size))
            self.covered.add(wh.sha256)
            live_rel = f"{WHEELS_DIR}/{fn}"
            have = self.w.conn.wheel_sha(fn)
            if have == wh.sha256 and self.reg.check_plain_file(live_rel):
                self.plan.shared_bytes += entry.size
                continue
            if have is not None or self.reg.check_plain_file(live_rel):
                raise ConflictError(f"registry file {live_rel} already holds other content than bundle {m.name}'s wheel", path=live_rel)
            self.need(wh.sha256, live_rel)
        if m.wheels:
            self.plan.texts[f"{WHEELS_DIR}/{req}"] = requirements_text(m.name, m.sequence, [(x.name, x.version, x.sha256) for x in m.wheels])

    def finish(self) -> Plan:
        """Bytes the registry already holds are linked, not read; bytes nobody keeps are still hashed."""
        plan = self.plan
        for sha, r in plan.reads.items():
            r.live = self.w.live_blob(sha)
            if r.live is not None:
                plan.shared_bytes += r.source.size
        plan.hash_only = [f for sha, f in self.first_of.items() if sha not in self.covered]
        return plan
