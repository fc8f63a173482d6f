"""A bundle folder's layout, and writing its signed pair (reading any form of a bundle is ``airpack.sources``).

Layout::

    BUNDLE/
      envelope.dsse.json        DSSE envelope (the signatures)
      manifest.json             byte-identical copy of the signed payload
      models/ORG--NAME/...      model files
      wheels/...                wheels and the hash-pinned requirements file
"""

from __future__ import annotations

from pathlib import Path

from ._fs import atomic_write
from .manifest import ENVELOPE_NAME, MANIFEST_NAME


def write_signed(root: Path, payload: bytes, envelope: bytes) -> None:
    """Write the manifest copy first and the envelope last: a bundle without an envelope is unfinished."""
    atomic_write(Path(root) / MANIFEST_NAME, payload)
    atomic_write(Path(root) / ENVELOPE_NAME, envelope)
