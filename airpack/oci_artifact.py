"""The airpack OCI artifact: media types, descriptors, and the image manifest (pure: no network imports).

The artifact::

    manifest  artifactType application/vnd.airpack.bundle.v1
      config  the OCI empty descriptor ({})
      layers  envelope.dsse.json  (application/vnd.dsse.envelope.v1+json)
              manifest.json       (application/vnd.in-toto+json, the signed payload)
              every bundle file   (application/vnd.airpack.file.v1), digest = the
                                  sha256 already in the signed manifest
      each layer annotated org.opencontainers.image.title = its bundle path

``build_manifest`` writes it deterministically; ``parse_artifact`` checks the
structure of one read from a registry. Nothing parsed here is trusted until
``airpack.ops.oci`` has checked it against signatures and digests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._fs import check_relpath
from ._json import StrictJSONError, dumps_canonical, loads_strict
from .errors import IntegrityError
from .oci_ref import DIGEST

ARTIFACT_TYPE = "application/vnd.airpack.bundle.v1"
ENVELOPE_MEDIA_TYPE = "application/vnd.dsse.envelope.v1+json"
MANIFEST_COPY_MEDIA_TYPE = "application/vnd.in-toto+json"
FILE_MEDIA_TYPE = "application/vnd.airpack.file.v1"
OCI_MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BYTES = b"{}"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
TITLE = "org.opencontainers.image.title"

MAX_OCI_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_LAYERS = 1_000_002


@dataclass(frozen=True)
class Descriptor:
    """One OCI content descriptor: what a blob is, how big, and (for layers) which bundle path it holds."""

    media_type: str
    digest: str
    size: int
    title: str | None = None

    @property
    def sha256(self) -> str:
        return self.digest.split(":", 1)[1]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.title is not None:
            out["annotations"] = {TITLE: self.title}
        return out


EMPTY_CONFIG = Descriptor(media_type=EMPTY_MEDIA_TYPE, digest=EMPTY_DIGEST, size=len(EMPTY_BYTES))


def blob_descriptor(media_type: str, data: bytes, title: str) -> Descriptor:
    return Descriptor(media_type=media_type, digest="sha256:" + hashlib.sha256(data).hexdigest(), size=len(data), title=title)


def file_descriptor(path: str, sha256: str, size: int) -> Descriptor:
    """A bundle file's layer: the digest is the one the signed manifest already holds (no re-hashing)."""
    return Descriptor(media_type=FILE_MEDIA_TYPE, digest=f"sha256:{sha256}", size=size, title=path)


@dataclass(frozen=True)
class Artifact:
    """A parsed airpack OCI manifest. Structurally valid; nothing in it is trusted yet."""

    envelope: Descriptor
    manifest_copy: Descriptor
    files: tuple[Descriptor, ...]
    annotations: Mapping[str, str]
    raw: bytes = field(repr=False)
    digest: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(d.size for d in self.files)


def build_manifest(*, envelope: Descriptor, manifest_copy: Descriptor, files: Sequence[Descriptor],
                   annotations: Mapping[str, str]) -> bytes:
    """Deterministic bytes: the same bundle always gives the same OCI manifest digest."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": EMPTY_CONFIG.to_json(),
        "layers": [envelope.to_json(), manifest_copy.to_json(), *(f.to_json() for f in files)],
        "annotations": dict(annotations),
    }
    return dumps_canonical(doc)


def _descriptor(obj: object, where: str, i: int) -> Descriptor:
    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"OCI manifest {where}: layer {i} {why}", path=where)

    if not isinstance(obj, dict):
        raise bad("is not an object")
    mt, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(mt, str) or len(mt) > 255:
        raise bad("has no valid mediaType")
    if not isinstance(digest, str) or not DIGEST.match(digest):
        raise bad(f"has digest {str(digest)[:80]!r}; only sha256 digests are accepted")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > 2**53:
        raise bad("has no valid size")
    ann = obj.get("annotations", {})
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise bad("has malformed annotations")
    title = ann.get(TITLE)
    if title is None:
        raise bad(f"has no {TITLE} annotation naming its bundle path")
    return Descriptor(media_type=mt, digest=digest, size=size, title=title)


def parse_artifact(data: bytes, *, where: str, digest: str) -> Artifact:
    """Check an OCI manifest is an airpack bundle with exactly one envelope, one manifest copy and safe paths."""
    try:
        doc = loads_strict(data, max_depth=8)
    except StrictJSONError as e:
        raise IntegrityError(f"OCI manifest {where} is malformed: {e}", path=where) from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise IntegrityError(f"OCI manifest {where} is not an OCI image manifest (schemaVersion 2)", path=where)
    if doc.get("artifactType") != ARTIFACT_TYPE:
        raise IntegrityError(
            f"{where} is not an airpack bundle (artifactType {str(doc.get('artifactType'))[:80]!r}, expected {ARTIFACT_TYPE})",
            path=where, hint="Push bundles with `airpack push`; pull other artifacts with their own tools.",
        )
    if doc.get("mediaType", OCI_MANIFEST_MEDIA_TYPE) != OCI_MANIFEST_MEDIA_TYPE:
        raise IntegrityError(f"OCI manifest {where} has media type {str(doc.get('mediaType'))[:80]!r}", path=where)
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise IntegrityError(f"OCI manifest {where} has no layers", path=where)
    if len(layers) > MAX_LAYERS:
        raise IntegrityError(f"OCI manifest {where} has more than {MAX_LAYERS} layers", path=where)
    ann = doc.get("annotations", {})
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise IntegrityError(f"OCI manifest {where} has malformed annotations", path=where)
    descs = [_descriptor(obj, where, i) for i, obj in enumerate(layers)]
    envelopes = [d for d in descs if d.media_type == ENVELOPE_MEDIA_TYPE]
    copies = [d for d in descs if d.media_type == MANIFEST_COPY_MEDIA_TYPE]
    files = [d for d in descs if d.media_type == FILE_MEDIA_TYPE]
    if len(envelopes) != 1:
        raise IntegrityError(f"OCI manifest {where} has {len(envelopes)} envelope layers; exactly one is required", path=where)
    if len(copies) != 1:
        raise IntegrityError(f"OCI manifest {where} has {len(copies)} manifest layers; exactly one is required", path=where)
    other = [d for d in descs if d.media_type not in (ENVELOPE_MEDIA_TYPE, MANIFEST_COPY_MEDIA_TYPE, FILE_MEDIA_TYPE)]
    if other:
        raise IntegrityError(f"OCI manifest {where} has a layer of unknown media type {other[0].media_type!r}", path=where)
    for d in files:
        check_relpath(d.title)
    return Artifact(envelope=envelopes[0], manifest_copy=copies[0], files=tuple(files), annotations=ann, raw=data, digest=digest)
