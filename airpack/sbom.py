"""A CycloneDX 1.6 SBOM of a bundle, made by cyclonedx-python-lib from the manifest's records.

Each model is a ``machine-learning-model`` component (repo id, commit, licence,
parameters, dtypes, and a SHA-256 over its file list) with its files nested
as ``file`` components; a model from the Hub has its ``pkg:huggingface`` purl,
a model from a local folder none (its commit is derived from its bytes and
names nothing on the Hub; ``airpack:source`` says where it came from). Each
wheel is a ``library`` with its PyPI purl and the licence its own METADATA
declares (recorded at pack time, from the verified copy). Every file carries
its SHA-256. The document is deterministic: the serial number
is derived from the content and the timestamp is the bundle's created time,
so packing the same inputs gives the same bytes, and the SBOM written into a
bundle at pack time is covered by the signature like any other file.
"""

from __future__ import annotations

import datetime as dt
import email.parser
import hashlib
import json
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from ._fs import atomic_write
from ._json import dumps_canonical
from .manifest import FileEntry, format_time

SBOM_NAME = "sbom.cdx.json"
SPEC_VERSION = "1.6"
_NAMESPACE = uuid.UUID("6f1b7c1e-4a57-4c44-9a55-61727061636b")  # fixed: "airpack" serial numbers
MAX_METADATA_BYTES = 1 << 20  # a wheel's METADATA (long descriptions included) is far smaller
MAX_LICENSE_CHARS = 100  # a ``License:`` field longer than this (or on several lines) is the licence text, not its name


def wheel_licenses(wheel: Path) -> list[str]:
    """The licence a wheel declares in its ``*.dist-info/METADATA``: ``License-Expression``, else a short ``License``,
    else the names of its ``Classifier: License ::`` entries; ``[]`` when it declares none (or the file cannot say).

    Call it only on a wheel whose bytes were verified (pack: after the copy's
    hash matched pip's). The read is capped, and a wheel that is not a
    readable zip simply declares nothing here: install checks it fully.
    """
    try:
        with zipfile.ZipFile(wheel) as zf:
            infos = [i for i in zf.infolist() if i.filename.count("/") == 1 and i.filename.endswith(".dist-info/METADATA")]
            if len(infos) != 1 or infos[0].file_size > MAX_METADATA_BYTES:
                return []
            with zf.open(infos[0]) as f:
                raw = f.read(MAX_METADATA_BYTES + 1)
    except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError, ValueError, zlib.error):
        return []
    if len(raw) > MAX_METADATA_BYTES:
        return []
    headers = email.parser.HeaderParser().parsestr(raw.decode("utf-8", errors="replace"), headersonly=True)
    expression = str(headers.get("License-Expression") or "").strip()
    if expression:
        return [expression]
    text = str(headers.get("License") or "").strip()
    if text and "\n" not in text and len(text) <= MAX_LICENSE_CHARS and text.upper() != "UNKNOWN":
        return [text]
    names = []
    for c in headers.get_all("Classifier") or []:
        parts = [p.strip() for p in str(c).split("::")]
        if len(parts) >= 2 and parts[0] == "License" and parts[-1] and parts[-1] != "OSI Approved":
            names.append(parts[-1])
    return sorted(set(names))


def model_digest(files: Sequence[FileEntry], prefix: str) -> str:
    """SHA-256 over ``relative path NUL sha256 LF`` of a model's files, sorted: one hash for the whole model."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path[len(prefix) + 1:]}\0{f.sha256}\n".encode())
    return h.hexdigest()


def serial_number(*, name: str, channel: str, sequence: int, created: dt.datetime, files: Sequence[FileEntry],
                  models: Sequence[dict[str, Any]], wheels: Sequence[dict[str, Any]]) -> uuid.UUID:
    """A UUID fixed by the content, so the same bundle always gets the same serial number."""
    h = hashlib.sha256()
    h.update(dumps_canonical({"name": name, "channel": channel, "sequence": sequence, "created": format_time(created)}))
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.size}\0{f.sha256}\n".encode())
    h.update(dumps_canonical([{k: m.get(k) for k in ("repo_id", "commit", "license")} for m in models]))
    h.update(dumps_canonical([{k: w.get(k) for k in ("name", "version", "sha256")} for w in wheels]))
    return uuid.uuid5(_NAMESPACE, h.hexdigest())


def build_sbom(*, name: str, channel: str, sequence: int, created: dt.datetime, files: Sequence[FileEntry],
               models: Sequence[dict[str, Any]], wheels: Sequence[dict[str, Any]]) -> bytes:
    """The CycloneDX 1.6 JSON document (canonical JSON bytes) for a bundle's files, model and wheel records."""
    # cyclonedx-python-lib is slow to import (about as long as the whole CLI): loaded only when an SBOM is built
    try:
        from cyclonedx.contrib.license.factories import LicenseFactory
    except ImportError:  # cyclonedx-python-lib before 11
        from cyclonedx.factory.license import LicenseFactory  # type: ignore[no-redef,unused-ignore]
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    files = [f for f in files if f.path != SBOM_NAME]
    by_path = {f.path: f for f in files}
    licenses = LicenseFactory()

    def sha(value: str) -> list[HashType]:
        return [HashType(alg=HashAlgorithm.SHA_256, content=value)]

    def file_component(f: FileEntry) -> Component:
        return Component(name=f.path, type=ComponentType.FILE, bom_ref=f"file:{f.path}", hashes=sha(f.sha256),
                         properties=[Property(name="airpack:size", value=str(f.size))])

    used: set[str] = set()
    top: list[Component] = []
    for m in models:
        prefix = str(m.get("path", ""))
        mfiles = sorted((f for f in files if f.path.startswith(prefix + "/")), key=lambda f: f.path)
        used.update(f.path for f in mfiles)
        repo_id = str(m.get("repo_id", ""))
        org, _, short = repo_id.rpartition("/")
        props = [Property(name="airpack:source", value=str(m.get("source", "")))]
        for key in ("revision", "parameters"):
            if m.get(key) is not None:
                props.append(Property(name=f"airpack:{key}", value=str(m[key])))
        if m.get("dtypes"):
            props.append(Property(name="airpack:dtypes", value=json.dumps(m["dtypes"], sort_keys=True)))
        if m.get("pickles"):
            props.append(Property(name="airpack:pickles", value=", ".join(m["pickles"])))
        if m.get("code"):
            props.append(Property(name="airpack:code", value=", ".join(m["code"])))
        lic = m.get("license")
        # only the Hub gives a repo id and commit an identity a purl can name; a local folder's commit is derived
        hub = m.get("source") == "hub"
        top.append(Component(
            name=repo_id,
            type=ComponentType.MACHINE_LEARNING_MODEL,
            bom_ref=f"model:{repo_id}",
            version=str(m.get("commit", "")) or None,
            group=org or None,
            hashes=sha(model_digest(mfiles, prefix)),
            licenses=[licenses.make_from_string(lic)] if isinstance(lic, str) and lic else None,
            purl=PackageURL(type="huggingface", namespace=org or None, name=short, version=m.get("commit") or None)
            if hub else None,
            properties=props,
            components=[file_component(f) for f in mfiles],
        ))
    for w in wheels:
        path = str(w.get("path", ""))
        used.add(path)
        wf = by_path.get(path)
        top.append(Component(
            name=str(w.get("name", "")),
            version=str(w.get("version", "")) or None,
            type=ComponentType.LIBRARY,
            bom_ref=f"wheel:{path}",
            hashes=sha(str(w.get("sha256", ""))),
            licenses=_licenses(licenses, w.get("licenses")),
            purl=PackageURL(type="pypi", name=str(w.get("name", "")).lower(), version=str(w.get("version", "")) or None),
            properties=[Property(name="airpack:file", value=path)],
            components=[file_component(wf)] if wf is not None else None,
        ))
    top += [file_component(f) for f in sorted(files, key=lambda f: f.path) if f.path not in used]

    root = Component(name=name, type=ComponentType.DATA, bom_ref=f"bundle:{name}", version=str(sequence),
                     properties=[Property(name="airpack:channel", value=channel)])
    bom = Bom(
        components=top,
        serial_number=serial_number(name=name, channel=channel, sequence=sequence, created=created, files=files,
                                    models=models, wheels=wheels),
        metadata=BomMetaData(timestamp=created.astimezone(dt.UTC), component=root),
    )
    tool = Component(name="airpack", version=__version__, type=ComponentType.APPLICATION, bom_ref="tool:airpack")
    bom.metadata.tools.components.add(tool)
    bom.register_dependency(root, [c for c in top if c.type != ComponentType.FILE])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = JsonV1Dot6(bom).output_as_string()
    # Canonical JSON on top of the library's output: the bytes depend only on the content.
    return dumps_canonical(json.loads(text))


def _licenses(factory: Any, declared: object) -> list[Any] | None:
    """CycloneDX ``licenses`` for a wheel's declared licences: one expression, or one licence (SPDX id or name) each."""
    if not isinstance(declared, list) or not declared or not all(isinstance(x, str) and x for x in declared):
        return None
    if len(declared) == 1:
        return [factory.make_from_string(declared[0])]
    from cyclonedx.model.license import LicenseExpression

    # several names (classifiers): CycloneDX takes a list of licences, but an expression only on its own
    made = [factory.make_from_string(x) for x in declared]
    return [factory.make_with_name(x) if isinstance(m, LicenseExpression) else m for x, m in zip(declared, made, strict=True)]


def write_sbom(out: Path, *, name: str, channel: str, sequence: int, created: dt.datetime, files: Sequence[FileEntry],
               models: Sequence[dict[str, Any]], wheels: Sequence[dict[str, Any]]) -> FileEntry:
    """Write ``sbom.cdx.json`` into a bundle being packed; returns its entry for the manifest."""
    data = build_sbom(name=name, channel=channel, sequence=sequence, created=created, files=files, models=models, wheels=wheels)
    atomic_write(Path(out) / SBOM_NAME, data)
    return FileEntry(path=SBOM_NAME, size=len(data), sha256=hashlib.sha256(data).hexdigest())
