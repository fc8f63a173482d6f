"""A bundle on disk: the folder layout, reading its parts safely, writing the signed pair.

Layout::

    BUNDLE/
      envelope.dsse.json        DSSE envelope (the signatures)
      manifest.json             byte-identical copy of the signed payload
      models/ORG--NAME/...      model files
      wheels/...                wheels and the hash-pinned requirements file
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ._fs import atomic_write, describe_mode, walk_bundle
from .errors import UsageError
from .manifest import ENVELOPE_NAME, MANIFEST_NAME, RESERVED
from .signing import Envelope, read_envelope


@dataclass(frozen=True)
class DirEntry:
    path: str
    size: int
    problem: str | None  # why it is not a plain single-link file, if it is not


@dataclass(frozen=True)
class BundleDir:
    """A bundle directory. Nothing read from it is trusted until verify says so."""

    root: Path

    @classmethod
    def open(cls, path: Path) -> BundleDir:
        # The root is the operator's own argument (a mount point or a link to one is fine);
        # links *inside* the bundle are refused by verify.
        p = Path(path)
        if not p.exists():
            raise UsageError(f"bundle {p} does not exist", path=str(p))
        if not p.is_dir():
            raise UsageError(f"bundle {p} is not a folder", path=str(p))
        return cls(root=p)

    @property
    def envelope_path(self) -> Path:
        return self.root / ENVELOPE_NAME

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def envelope(self) -> Envelope:
        return read_envelope(self.envelope_path, where=f"{self.root}/{ENVELOPE_NAME}")

    def entries(self) -> list[DirEntry]:
        """Every non-folder entry except the envelope and manifest copy, links included."""
        out = []
        for rel, st in walk_bundle(self.root):
            if rel in RESERVED:
                continue
            out.append(DirEntry(path=rel, size=st.st_size, problem=describe_mode(st)))
        return out

    def path_of(self, rel: str) -> Path:
        return self.root.joinpath(*rel.split("/"))


def write_signed(root: Path, payload: bytes, envelope: bytes) -> None:
    """Write the manifest copy first and the envelope last: a bundle without an envelope is unfinished."""
    atomic_write(Path(root) / MANIFEST_NAME, payload)
    atomic_write(Path(root) / ENVELOPE_NAME, envelope)
