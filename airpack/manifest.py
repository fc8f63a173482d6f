"""The signed manifest: an in-toto Statement v1 with airpack's predicate.

``encode`` makes the deterministic bytes that get signed; ``parse`` turns
bytes that already passed signature verification into a ``Manifest`` that
cannot exist invalid (every path safe, every digest well formed, the subject
and the predicate's file list in exact agreement).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from ._fs import check_no_collisions, check_relpath
from ._json import StrictJSONError, dumps_canonical, loads_strict
from .errors import EnvelopeError, IntegrityError, MalformedManifestError, UnsafePathError

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://airpack.dev/bundle/v1"

# Names at the bundle root that are not subjects: the envelope and the payload's copy.
MANIFEST_NAME = "manifest.json"
ENVELOPE_NAME = "envelope.dsse.json"
RESERVED = frozenset({MANIFEST_NAME, ENVELOPE_NAME})

MAX_FILES = 1_000_000
MAX_SEQUENCE = 2**63 - 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def format_time(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: object, what: str) -> dt.datetime:
    if not isinstance(s, str) or not re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$", s):
        raise MalformedManifestError(f"manifest: {what} must be an RFC 3339 UTC time like 2027-01-31T00:00:00Z")
    try:
        return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        raise MalformedManifestError(f"manifest: {what} {s!r} is not a valid time") from None


def valid_name(s: object) -> bool:
    return isinstance(s, str) and bool(_NAME.match(s))


def valid_repo_id(s: object) -> bool:
    return isinstance(s, str) and bool(_REPO_ID.match(s)) and ".." not in s


def model_slug(repo_id: str) -> str:
    """The bundle folder of a model: ``models/ORG--NAME``."""
    return "models/" + repo_id.replace("/", "--")


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelEntry:
    """One model of the bundle; ``raw`` keeps every recorded field (Hub metadata, config summary)."""

    repo_id: str
    source: str
    prefix: str
    commit: str
    revision: str | None
    license: str | None
    pickles: tuple[str, ...]
    code: tuple[str, ...]
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class WheelEntry:
    name: str
    version: str
    path: str
    sha256: str
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest. Build it only through ``parse``."""

    name: str
    channel: str
    sequence: int
    created: dt.datetime
    expires: dt.datetime | None
    files: tuple[FileEntry, ...]
    models: tuple[ModelEntry, ...]
    wheels: tuple[WheelEntry, ...]
    allow_pickle: bool
    allow_code: bool
    targets: tuple[dict[str, Any], ...]
    statement: dict[str, Any] = field(repr=False, compare=False)
    digest: str = ""
    on_host: frozenset[str] = frozenset()  # paths a delta bundle does not carry: the host must hold their bytes

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def is_delta(self) -> bool:
        """A delta bundle (``pack --for``): the manifest describes the complete install, the bundle carries only part of it."""
        return bool(self.on_host)

    @property
    def carried(self) -> tuple[FileEntry, ...]:
        """The files the bundle itself holds (every file of a full bundle)."""
        return tuple(f for f in self.files if f.path not in self.on_host) if self.on_host else self.files

    @property
    def expected_on_host(self) -> tuple[FileEntry, ...]:
        """The files a delta relies on: not in the bundle; install hashes the registry's copy of each again."""
        return tuple(f for f in self.files if f.path in self.on_host)

    def file(self, path: str) -> FileEntry | None:
        return self._by_path.get(path)

    @property
    def _by_path(self) -> dict[str, FileEntry]:
        cache = self.__dict__.get("_cache")
        if cache is None:
            cache = {f.path: f for f in self.files}
            object.__setattr__(self, "_cache", cache)
        return cache

    @property
    def predicate(self) -> dict[str, Any]:
        pred: dict[str, Any] = self.statement["predicate"]
        return pred

    def model_files(self, model: ModelEntry) -> list[FileEntry]:
        pre = model.prefix + "/"
        return [f for f in self.files if f.path.startswith(pre)]


def build_statement(
    *,
    name: str,
    channel: str,
    sequence: int,
    created: dt.datetime,
    expires: dt.datetime | None,
    files: list[FileEntry],
    models: list[dict[str, Any]],
    wheels: list[dict[str, Any]],
    allow_pickle: bool,
    allow_code: bool,
    targets: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
    on_host: list[str] | None = None,
) -> dict[str, Any]:
    """The in-toto Statement for a bundle (not yet encoded); ``on_host`` makes it a delta (a full bundle's bytes are unchanged)."""
    files = sorted(files, key=lambda f: f.path)
    bundle: dict[str, Any] = {"name": name, "channel": channel, "sequence": sequence, "created": format_time(created)}
    if expires is not None:
        bundle["expires"] = format_time(expires)
    predicate: dict[str, Any] = {
        "bundle": bundle,
        "tool": {"name": "airpack", "version": __version__},
        "files": [{"path": f.path, "size": f.size} for f in files],
        "models": models,
        "wheels": wheels,
        "policy": {"allow_pickle": allow_pickle, "allow_code": allow_code},
        "targets": targets,
    }
    if extra:
        predicate.update(extra)
    if on_host:
        predicate["on_host"] = sorted(on_host)
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": f.path, "digest": {"sha256": f.sha256}} for f in files],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }


def encode(statement: dict[str, Any]) -> bytes:
    return dumps_canonical(statement)


def _req(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    v = d.get(key)
    if not isinstance(v, typ) or (isinstance(v, bool) and typ is int):
        raise MalformedManifestError(f"manifest: {where}.{key} is missing or of the wrong type")
    return v


def _opt_str(d: dict[str, Any], key: str, where: str) -> str | None:
    v = d.get(key)
    if v is not None and not isinstance(v, str):
        raise MalformedManifestError(f"manifest: {where}.{key} must be a string")
    return v


def _str_list(v: object, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise MalformedManifestError(f"manifest: {where} must be a list of strings")
    return tuple(v)


def parse(payload: bytes, *, digest: str = "") -> Manifest:
    """Parse trusted payload bytes. Unknown statement/predicate types are trust failures (exit 4)."""
    st = _load_statement(payload)
    subjects = _req(st, "subject", list, "statement")
    pred = _req(st, "predicate", dict, "statement")
    if len(subjects) > MAX_FILES:
        raise MalformedManifestError(f"manifest lists more than {MAX_FILES} files")
    digests = _parse_subjects(subjects)
    bundle = _parse_bundle(_req(pred, "bundle", dict, "predicate"))
    files = _parse_files(_req(pred, "files", list, "predicate"), digests)
    allow_pickle, allow_code = _parse_policy(pred.get("policy", {}))
    models = _parse_models(_req(pred, "models", list, "predicate"))
    wheels = _parse_wheels(pred.get("wheels", []) or [], digests)
    targets = _parse_targets(pred.get("targets", []) or [])
    on_host = _parse_on_host(pred.get("on_host", []), digests, wheels)
    return Manifest(
        name=bundle.name,
        channel=bundle.channel,
        sequence=bundle.sequence,
        created=bundle.created,
        expires=bundle.expires,
        files=tuple(files),
        models=tuple(models),
        wheels=tuple(wheels),
        allow_pickle=allow_pickle,
        allow_code=allow_code,
        targets=tuple(targets),
        statement=st,
        digest=digest,
        on_host=on_host,
    )


# -- the steps of ``parse``, in the order it runs them (the first failure is the one reported) --


def _load_statement(payload: bytes) -> dict[str, Any]:
    """The payload as a JSON object that is an in-toto Statement with airpack's predicate type."""
    try:
        st = loads_strict(payload, allow_floats=False)
    except StrictJSONError as e:
        raise MalformedManifestError(f"manifest payload is malformed: {e}") from None
    if not isinstance(st, dict):
        raise MalformedManifestError("manifest payload is not a JSON object")
    if st.get("_type") != STATEMENT_TYPE:
        raise EnvelopeError(f"payload is not an in-toto Statement v1 (_type {st.get('_type')!r})")
    if st.get("predicateType") != PREDICATE_TYPE:
        raise EnvelopeError(f"unknown predicate type {st.get('predicateType')!r}; expected {PREDICATE_TYPE}")
    return st


def _parse_subjects(subjects: list[Any]) -> dict[str, str]:
    """Path -> sha256 of every subject, in the statement's order; paths safe, unique, not reserved, not colliding."""
    digests: dict[str, str] = {}
    for s in subjects:
        if not isinstance(s, dict) or not isinstance(s.get("digest"), dict):
            raise MalformedManifestError("manifest: a subject entry is malformed")
        name = check_relpath(s.get("name"))
        sha = s["digest"].get("sha256")
        if not isinstance(sha, str) or not _HEX64.match(sha):
            raise MalformedManifestError(f"manifest: subject {name!r} has no valid sha256 digest", path=name)
        if name in digests:
            raise IntegrityError(f"manifest lists {name!r} twice", path=name)
        if name in RESERVED:
            raise UnsafePathError(f"manifest lists the reserved name {name!r}", path=name)
        digests[name] = sha
    # The envelope and manifest copy take part: MANIFEST.JSON would overwrite manifest.json on FAT/exFAT media.
    check_no_collisions([*sorted(RESERVED), *digests])
    return digests


@dataclass(frozen=True)
class _BundleFields:
    name: str
    channel: str
    sequence: int
    created: dt.datetime
    expires: dt.datetime | None


def _parse_bundle(bundle: dict[str, Any]) -> _BundleFields:
    name = _req(bundle, "name", str, "bundle")
    channel = _req(bundle, "channel", str, "bundle")
    if not valid_name(name) or not valid_name(channel):
        raise MalformedManifestError("manifest: bundle name and channel must be short names ([A-Za-z0-9._-])")
    sequence = _req(bundle, "sequence", int, "bundle")
    if not 0 <= sequence <= MAX_SEQUENCE:
        raise MalformedManifestError("manifest: bundle.sequence out of range")
    created = parse_time(bundle.get("created"), "bundle.created")
    expires = parse_time(bundle["expires"], "bundle.expires") if bundle.get("expires") is not None else None
    return _BundleFields(name=name, channel=channel, sequence=sequence, created=created, expires=expires)


def _parse_files(files_doc: list[Any], digests: dict[str, str]) -> list[FileEntry]:
    """predicate.files: one size per subject, no more, no fewer."""
    files: list[FileEntry] = []
    seen: set[str] = set()
    for f in files_doc:
        if not isinstance(f, dict):
            raise MalformedManifestError("manifest: a files entry is malformed")
        p = _req(f, "path", str, "files[]")
        size = _req(f, "size", int, "files[]")
        if size < 0:
            raise MalformedManifestError(f"manifest: negative size for {p!r}", path=p)
        if p in seen:
            raise IntegrityError(f"manifest lists {p!r} twice in predicate.files", path=p)
        if p not in digests:
            raise MalformedManifestError(f"manifest: {p!r} has a size but no subject digest", path=p)
        seen.add(p)
        files.append(FileEntry(path=p, size=size, sha256=digests[p]))
    missing = set(digests) - seen
    if missing:
        p = sorted(missing)[0]
        raise MalformedManifestError(f"manifest: subject {p!r} has no size in predicate.files", path=p)
    return files


def _parse_policy(policy: object) -> tuple[bool, bool]:
    """(allow_pickle, allow_code) of predicate.policy; both default to false."""
    if not isinstance(policy, dict):
        raise MalformedManifestError("manifest: predicate.policy must be an object")
    allow_pickle = policy.get("allow_pickle", False)
    allow_code = policy.get("allow_code", False)
    if not isinstance(allow_pickle, bool) or not isinstance(allow_code, bool):
        raise MalformedManifestError("manifest: policy flags must be booleans")
    return allow_pickle, allow_code


def _parse_models(models_doc: list[Any]) -> list[ModelEntry]:
    models: list[ModelEntry] = []
    prefixes: set[str] = set()
    for m in models_doc:
        model = _parse_model(m, prefixes)
        prefixes.add(model.prefix)
        models.append(model)
    return models


def _parse_model(m: object, prefixes: set[str]) -> ModelEntry:
    """One predicate.models entry; its path must be its repo id's slug and not one ``prefixes`` already holds."""
    if not isinstance(m, dict):
        raise MalformedManifestError("manifest: a models entry is malformed")
    repo_id = _req(m, "repo_id", str, "models[]")
    if not valid_repo_id(repo_id):
        raise MalformedManifestError(f"manifest: invalid repo id {repo_id!r}")
    prefix = _req(m, "path", str, "models[]")
    if prefix != model_slug(repo_id) or prefix in prefixes:
        raise MalformedManifestError(f"manifest: model {repo_id!r} has an unexpected path {prefix!r}")
    commit = _req(m, "commit", str, "models[]")
    if not re.match(r"^[0-9a-f]{40}$", commit):
        raise MalformedManifestError(f"manifest: model {repo_id!r} has an invalid commit {commit!r}")
    source = _req(m, "source", str, "models[]")
    if source not in ("local", "hub"):
        raise MalformedManifestError(f"manifest: model {repo_id!r} has an unknown source {source!r}")
    return ModelEntry(
        repo_id=repo_id,
        source=source,
        prefix=prefix,
        commit=commit,
        revision=_opt_str(m, "revision", "models[]"),
        license=_opt_str(m, "license", "models[]"),
        pickles=_str_list(m.get("pickles"), "models[].pickles"),
        code=_str_list(m.get("code"), "models[].code"),
        raw=m,
    )


def _parse_wheels(wheels_doc: object, digests: dict[str, str]) -> list[WheelEntry]:
    """predicate.wheels: each wheel is a subject and records that subject's digest."""
    if not isinstance(wheels_doc, list):
        raise MalformedManifestError("manifest: predicate.wheels must be a list")
    wheels: list[WheelEntry] = []
    for w in wheels_doc:
        if not isinstance(w, dict):
            raise MalformedManifestError("manifest: a wheels entry is malformed")
        wp = _req(w, "path", str, "wheels[]")
        if wp not in digests:
            raise MalformedManifestError(f"manifest: wheel {wp!r} is not a subject", path=wp)
        sha = _req(w, "sha256", str, "wheels[]")
        if sha != digests[wp]:
            raise IntegrityError(f"manifest: wheel {wp!r} digest disagrees with its subject", path=wp)
        wheels.append(
            WheelEntry(name=_req(w, "name", str, "wheels[]"), version=_req(w, "version", str, "wheels[]"), path=wp, sha256=sha, raw=w)
        )
    return wheels


def _parse_on_host(doc: object, digests: dict[str, str], wheels: list[WheelEntry]) -> frozenset[str]:
    """predicate.on_host (a delta): each path a subject, listed once; a wheel there must be one predicate.wheels lists."""
    if not isinstance(doc, list) or not all(isinstance(p, str) for p in doc):
        raise MalformedManifestError("manifest: predicate.on_host must be a list of paths")
    wheel_paths = {w.path for w in wheels}
    seen: set[str] = set()
    for p in doc:
        if p in seen:
            raise IntegrityError(f"manifest lists {p!r} twice in predicate.on_host", path=p)
        seen.add(p)
        if p not in digests:
            raise MalformedManifestError(f"manifest marks {p!r} as expected on the host but does not list it", path=p)
        if p.startswith("wheels/") and p not in wheel_paths:
            raise MalformedManifestError(f"manifest marks wheel {p!r} as expected on the host but lists no such wheel", path=p)
    return frozenset(seen)


def _parse_targets(targets: object) -> list[dict[str, Any]]:
    if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
        raise MalformedManifestError("manifest: predicate.targets must be a list of objects")
    return targets


def summary(m: Manifest) -> dict[str, Any]:
    """The manifest as the ``--json`` documents of pack, verify and inspect show it."""
    return {
        "name": m.name,
        "channel": m.channel,
        "sequence": m.sequence,
        "created": format_time(m.created),
        "expires": format_time(m.expires) if m.expires else None,
        "manifest_sha256": m.digest,
        "models": [
            {
                "repo_id": x.repo_id,
                "source": x.source,
                "revision": x.revision,
                "commit": x.commit,
                "license": x.license,
                "parameters": x.raw.get("parameters"),
                "dtypes": x.raw.get("dtypes"),
                "files": len(m.model_files(x)),
                "bytes": sum(f.size for f in m.model_files(x)),
                "pickles": list(x.pickles),
                "code": list(x.code),
            }
            for x in m.models
        ],
        "wheels": [{"name": w.name, "version": w.version, "path": w.path, "sha256": w.sha256} for w in m.wheels],
        "policy": {"allow_pickle": m.allow_pickle, "allow_code": m.allow_code},
        "targets": list(m.targets),
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in m.files],
        "total_bytes": m.total_bytes,
        **({"delta": delta_summary(m)} if m.is_delta else {}),  # a full bundle's summary is as it always was
    }


def delta_summary(m: Manifest) -> dict[str, Any]:
    """What a delta carries and what it leaves on the host, in files and bytes (pack, verify and inspect print it)."""
    carried, left = m.carried, m.expected_on_host
    return {"carried": {"files": len(carried), "bytes": sum(f.size for f in carried)},
            "on_host": {"files": len(left), "bytes": sum(f.size for f in left), "paths": [f.path for f in left]}}
