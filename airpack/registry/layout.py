"""The registry folder's layout and the rules for touching it safely.

Layout::

    REGISTRY/
      hub/models--ORG--NAME/blobs/<sha256>             file bytes, stored once (hard links across repos)
      hub/models--ORG--NAME/snapshots/<commit>/<path>  relative links to ../../blobs/<sha256>
      hub/models--ORG--NAME/refs/<revision or main>    the commit a revision name points to
      hub/models--ORG--NAME/refs/airpack/kept-<commit> one per installed commit, so HF's cache tools keep it
      wheels/<file>.whl, wheels/<bundle>.txt           wheelhouse and hash-pinned requirements
      bundles/<manifest sha256>/envelope.json         each installed bundle's envelope (the exact signed bytes)
      bundles/<manifest sha256>/manifest.json         ... and its manifest, so `airpack check --trust` can re-verify
      registry.db                                      SQLite (WAL): bundles, models, files, refs, channels
      audit.log                                        JSON lines, each holding the SHA-256 of the line before
      .lock                                            one writer at a time (flock: a killed holder releases it)
      .staging/<txn>/                                  a write in progress: a mirror of the live tree + journal

It exists so that every name airpack gives a file in the registry, and every
check that a path is a real folder or plain file (never a link someone
planted), is written once. The database, the audit log and the transactions
all reach the folder through ``Layout``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
from pathlib import Path

from .._fs import check_relpath, oserror_to_airpack
from ..errors import IntegrityError, UnsafeRegistryError

HUB_DIR = "hub"
WHEELS_DIR = "wheels"
BUNDLES_DIR = "bundles"
KEPT_ENVELOPE = "envelope.json"
KEPT_MANIFEST = "manifest.json"
DB_NAME = "registry.db"
AUDIT_NAME = "audit.log"
LOCK_NAME = ".lock"
STAGING_DIR = ".staging"
DIR_MODE = 0o755
FILE_MODE = 0o644

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
KEPT_REF_DIR = "airpack"  # refs/airpack/kept-<commit>: see ``kept_ref``
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")


def now_text() -> str:
    """The one timestamp format the registry writes (database rows, audit lines): UTC, microseconds."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def repo_folder(repo_id: str) -> str:
    """The Hugging Face cache folder of a model repo: ``models--ORG--NAME``."""
    return "models--" + "--".join(repo_id.split("/"))


def ref_name(revision: str | None) -> str:
    """The ``refs/`` file a model's revision is recorded under: its branch or tag, else ``main``."""
    if revision is None or COMMIT_RE.match(revision):
        return "main"
    if not _REF.match(revision) or revision.endswith(("/", ".lock")) or "//" in revision or revision.startswith(KEPT_REF_DIR + "/"):
        raise IntegrityError(f"model revision {revision!r} is not a usable ref name (refs/{KEPT_REF_DIR}/ is airpack's own)")
    check_relpath(revision)
    return revision


def kept_ref(commit: str) -> str:
    """The ``refs/`` name that keeps an installed commit alive for Hugging Face's cache tools: ``airpack/kept-<commit>``.

    ``huggingface_hub``'s cache scan reads every file under ``refs/`` (nested
    names included, like the Hub's own ``refs/pr/1``) and calls a snapshot
    no ref names "detached": ``hf cache prune`` deletes those. The revisions
    airpack keeps for ``rollback`` have no branch name pointing at them, so
    each installed commit gets its own ref, written and removed with the
    install and remove that add or drop the commit's last model row.
    """
    if not COMMIT_RE.match(commit):
        raise IntegrityError(f"commit {commit!r} is not a 40-character hex commit")
    return f"{KEPT_REF_DIR}/kept-{commit}"


def link_target(rel: str, sha256: str) -> str:
    """The relative link from ``snapshots/<commit>/<rel>`` to ``blobs/<sha256>`` (what huggingface_hub writes)."""
    return "../" * (rel.count("/") + 2) + "blobs/" + sha256


def requirements_name(bundle_name: str) -> str:
    return f"{bundle_name}.txt"


def kept_bundle_dir(manifest_sha256: str) -> str:
    """Where an installed bundle's envelope and manifest are kept: ``bundles/<manifest sha256>``."""
    if not re.fullmatch(r"[0-9a-f]{64}", manifest_sha256):
        raise IntegrityError(f"manifest digest {manifest_sha256!r} is not a sha256")
    return f"{BUNDLES_DIR}/{manifest_sha256}"


class Layout:
    """A registry folder's paths, with every component checked before anything is written through it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, rel: str) -> Path:
        return self.root.joinpath(*rel.split("/")) if rel else self.root

    def rel(self, p: Path) -> str:
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:
            return str(p)

    def safe_dir(self, rel: str, *, create: bool) -> Path | None:
        """``root/rel`` after checking each component is a real folder (never a link); create missing ones (0755).

        Returns None when a component is missing and ``create`` is False.
        """
        cur = self.root
        for part in rel.split("/") if rel else []:
            cur = cur / part
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                if not create:
                    return None
                try:
                    os.mkdir(cur, DIR_MODE)
                    os.chmod(cur, DIR_MODE)
                except OSError as e:
                    raise oserror_to_airpack(e, "cannot create", str(cur)) from None
                continue
            except OSError as e:
                raise oserror_to_airpack(e, "cannot read", str(cur)) from None
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeRegistryError(
                    f"registry path {self.rel(cur)} is a symbolic link; refusing to write through it", path=str(cur)
                )
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeRegistryError(f"registry path {self.rel(cur)} is not a folder", path=str(cur))
        return cur

    def lstat(self, rel: str) -> os.stat_result | None:
        try:
            return os.lstat(self.path(rel))
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            raise UnsafeRegistryError(f"registry path {rel}: a parent is not a folder", path=rel) from None

    def check_plain_file(self, rel: str) -> bool:
        """True if ``rel`` is a plain file, False if absent; refuse links and anything else."""
        st = self.lstat(rel)
        if st is None:
            return False
        if not stat.S_ISREG(st.st_mode):
            what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a plain file"
            raise UnsafeRegistryError(f"registry path {rel} is {what}", path=str(self.path(rel)))
        return True

    def check_layout(self) -> None:
        """The fixed top-level entries must be real folders and plain files, never links (nothing is created here)."""
        for d in (HUB_DIR, WHEELS_DIR, STAGING_DIR):
            self.safe_dir(d, create=False)
        for f in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", AUDIT_NAME, LOCK_NAME):
            self.check_plain_file(f)

    def read_ref(self, rel: str) -> str | None:
        """The bytes of a ``refs/`` file as ``huggingface_hub`` would read them (capped; never through a link); None if absent."""
        try:
            if not self.plain_file_under(rel):
                return None
            fd = os.open(self.path(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (OSError, UnsafeRegistryError):
            return None
        try:
            return os.read(fd, 256).decode("ascii", "replace")
        except OSError:
            return None
        finally:
            os.close(fd)

    def plain_file_under(self, rel: str) -> bool:
        """True if ``rel`` is a plain file whose parent folders are all real folders; False if any is missing."""
        return self.safe_dir(rel.rsplit("/", 1)[0], create=False) is not None and self.check_plain_file(rel)
