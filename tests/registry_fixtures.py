"""Helpers for the registry and install tests: a registry's exact state, installs, bundle variants.

``registry_state`` is what "the registry is exactly as before" means in the
tests: every folder, file (bytes and mode) and link under the registry, plus
the database's full SQL dump. The lock file, the staging folder and the audit
log are compared separately (the lock holds a pid; a refusal appends exactly
one audit line by design).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
from pathlib import Path
from typing import Any

from conftest import KeyPair

from airpack.manifest import FileEntry, build_statement, encode, parse
from airpack.ops.install import InstallOptions, InstallResult, install
from airpack.registry import AUDIT_NAME, DB_NAME, LOCK_NAME, STAGING_DIR, Registry
from airpack.signing import PAYLOAD_TYPE, envelope_bytes
from airpack.trust import load_policy

SKIP_TOP = {LOCK_NAME, STAGING_DIR, AUDIT_NAME, DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"}


def tree_state(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root`` (minus the lock, staging, audit log and database files), never following links."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in SKIP_TOP]
            filenames = [f for f in filenames if f not in SKIP_TOP]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), stat.S_IMODE(st.st_mode))
    return out


def db_state(root: Path) -> list[str]:
    path = root / DB_NAME
    if not path.exists():
        return []
    conn = sqlite3.connect(str(path))
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def registry_state(root: Path) -> dict[str, Any]:
    return {"tree": tree_state(root), "db": db_state(root)}


def audit_lines(root: Path) -> list[dict[str, Any]]:
    p = root / AUDIT_NAME
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines()]


def recover(root: Path) -> None:
    """What the next write command does first: finish or undo whatever a killed process left."""
    with Registry.open(root).writer():
        pass


def do_install(bundle: Path, registry: Path, policy: Path, **kw: Any) -> InstallResult:
    return install(InstallOptions(bundle=bundle, registry=registry, policy=load_policy(policy), **kw))


def variant_model(src: Path, dst: Path, *, extra: dict[str, bytes] | None = None) -> Path:
    """A copy of a model folder with extra or replaced files: most blobs shared with ``src``."""
    shutil.copytree(src, dst)
    for rel, data in (extra or {}).items():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(data)
    return dst


def resign(bundle: Path, signer: KeyPair, mutate: Any) -> None:
    """Rewrite a bundle's manifest with ``mutate(statement, files)`` and sign it again (for crafted bundles)."""
    from airpack.bundle import write_signed

    payload = (bundle / "manifest.json").read_bytes()
    m = parse(payload)
    files = list(m.files)
    st = m.statement
    pred = st["predicate"]
    new_files = mutate(pred, files)
    b = pred["bundle"]
    statement = build_statement(
        name=b["name"], channel=b["channel"], sequence=b["sequence"], created=m.created, expires=m.expires,
        files=new_files, models=pred["models"], wheels=pred.get("wheels", []),
        allow_pickle=pred["policy"]["allow_pickle"], allow_code=pred["policy"]["allow_code"], targets=pred.get("targets", []),
    )
    payload = encode(statement)
    sig = signer.signer.sign(PAYLOAD_TYPE, payload)
    write_signed(bundle, payload, envelope_bytes(PAYLOAD_TYPE, payload, [sig]))


def add_file_entry(bundle: Path, rel: str, data: bytes) -> FileEntry:
    p = bundle.joinpath(*rel.split("/"))
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return FileEntry(path=rel, size=len(data), sha256=hashlib.sha256(data).hexdigest())
