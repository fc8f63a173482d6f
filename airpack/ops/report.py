"""``airpack report``: the review document a security officer or a change board signs off.

The report is one facts document (``BundleReport`` or ``RegistryReport``, a
tree of frozen dataclasses whose ``to_json`` is what ``--json`` prints), and
the HTML is a rendering of exactly that JSON (``airpack.report_html``): the
document cannot say anything the facts do not. Every fact comes from the
operations that already decide it, never re-derived here:

- the bundle: ``verify_source`` with the host's policy (``--trust``; any
  failure is verify's own error and nothing is written), or, without one,
  ``read_unverified`` (the manifest as the bundle claims it, and the report
  carries the UNVERIFIED banner on every page);
- the fit pictures: ``ops.fit``'s estimator over the verified headers (or,
  unverified, a bundle folder's files as ``airpack fit BUNDLE`` reads them),
  for each GPU target the manifest names; the estimate recorded at pack time
  is shown beside it;
- the comparison: ``ops.audit.diff_manifests`` (``--against``) or
  ``diff_registry_side`` (``--registry``), and the sequence verdict of
  ``rules.classify_sequence``, the comparison install itself makes;
- the registry: ``ops.manage.list_installed``, the channels the registry
  records, and the audit log read through its own hash-chain check.

Files are listed as the manifest signs them. A delta bundle (``pack --for``)
lists every file too, each marked carried or expected on the host; with
``--trust`` and ``--registry`` the host's copies are hashed by the very
``verify_source`` call ``verify --registry`` makes (a missing or changed copy
is verify's exit 3 and no report), and ``DeltaFact`` says whether that check
ran. Without it a delta's fit is the estimate recorded at pack time: the
weights it relies on are not in the bundle to read.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import content
from .._fs import atomic_write, oserror_to_airpack
from .._json import scrub
from ..errors import AirpackError, AuditLogError, IntegrityError, ReportOutputError, UsageError
from ..gpus import parse_gpu
from ..manifest import FileEntry, Manifest, ModelEntry, format_time, now_utc
from ..progress import NULL_PROGRESS, Progress
from ..registry import Registry, RegistryCopies, hostname
from ..registry.audit_log import verify_chain
from ..rules import MAX_SEQUENCE_JUMP, ChannelHigh, Sequence, classify_sequence
from ..sbom import SBOM_NAME
from ..sources import detect, open_source
from ..trust import TrustPolicy
from ..vram import estimate
from .audit import DiffRegistryResult, DiffResult, Side, claimed_side, diff_manifests, diff_registry_side, load_side, sbom_for
from .fit import ModelSource, estimate_source, keep_for_fit, load_bundle, run_config, verified_models
from .manage import list_installed
from .verify import VerifiedBundle, verify_source

FORMS = {"dir": "folder", "tar": "tar", "parts": "parts"}
CURVE_POINTS = 24
MAX_TIMELINE = 10_000  # audit lines shown; the chain check still reads every one


def _whole(v: object) -> int | None:
    """``v`` if it is an integer, else None: the manifest signs free JSON, and JSON's ``true`` is a Python int too.

    Not ``vram._num``, which also takes whole floats: a count the bundle claims is shown only as it was written.
    """
    return v if isinstance(v, int) and not isinstance(v, bool) else None


# -- the facts ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SignerFact:
    """One signature: by its policy name when verified, else only the key id the envelope claims."""

    name: str | None
    keyid: str
    algorithm: str | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "keyid": self.keyid, "algorithm": self.algorithm}


@dataclass(frozen=True, kw_only=True)
class Verification:
    """Whether the bundle was verified here, against which policy, when and on which host."""

    verified: bool
    form: str
    location: str
    signers: tuple[SignerFact, ...]
    threshold: int | None
    policy: str | None
    policy_sha256: str | None
    policy_keys: tuple[str, ...]
    checked_at: str
    host: str

    def to_json(self) -> dict[str, Any]:
        return {
            "verified": self.verified, "form": self.form, "location": self.location,
            "signers": [s.to_json() for s in self.signers], "threshold": self.threshold, "policy": self.policy,
            "policy_sha256": self.policy_sha256, "policy_keys": list(self.policy_keys), "checked_at": self.checked_at,
            "host": self.host,
        }


@dataclass(frozen=True, kw_only=True)
class Identity:
    name: str
    channel: str
    sequence: int
    created: str
    expires: str | None
    manifest_sha256: str
    tool: str | None
    files: int
    total_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "channel": self.channel, "sequence": self.sequence, "created": self.created, "expires": self.expires,
            "manifest_sha256": self.manifest_sha256, "tool": self.tool, "files": self.files, "total_bytes": self.total_bytes,
        }


@dataclass(frozen=True, kw_only=True)
class ModelFact:
    repo_id: str
    source: str
    revision: str | None
    commit: str
    license: str | None
    parameters: int | None
    dtypes: dict[str, Any]
    architecture: str
    config: dict[str, Any]
    files: int
    bytes: int
    pickles: tuple[str, ...]
    code: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id, "source": self.source, "revision": self.revision, "commit": self.commit, "license": self.license,
            "parameters": self.parameters, "dtypes": dict(self.dtypes), "architecture": self.architecture, "config": dict(self.config),
            "files": self.files, "bytes": self.bytes, "pickles": list(self.pickles), "code": list(self.code),
        }


@dataclass(frozen=True, kw_only=True)
class ContentPolicyFact:
    """The signed content policy and the files it lets in (paths in the bundle)."""

    allow_pickle: bool
    allow_code: bool
    pickles: tuple[str, ...]
    code: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"allow_pickle": self.allow_pickle, "allow_code": self.allow_code, "pickles": list(self.pickles), "code": list(self.code)}


@dataclass(frozen=True, kw_only=True)
class FileFact:
    """One signed file; ``hub`` says how it stood against the Hub's own record at pack time.

    ``match`` (the Hub's SHA-256 and size are the signed ones), ``differs``, ``size-only`` (the Hub
    gives only a git blob id for small files, so only the size compares), ``not-listed`` (a Hub
    model's file the Hub record does not list), or ``-`` (not from the Hub: a local model, wheels, the SBOM).
    """

    path: str
    size: int
    sha256: str
    kind: str
    hub: str
    where: str | None = None  # a delta's file: ``carried`` in the bundle or ``on-host``; None (and not in the JSON) for a full bundle

    def to_json(self) -> dict[str, Any]:
        doc = {"path": self.path, "size": self.size, "sha256": self.sha256, "kind": self.kind, "hub": self.hub}
        return doc if self.where is None else {**doc, "where": self.where}


@dataclass(frozen=True, kw_only=True)
class DeltaFact:
    """A delta bundle: what it carries, what it expects on the host, and whether the host's copies were hashed here.

    ``host_checked`` is true only when ``verify_source`` hashed every expected file's
    registry copy (``--trust`` with ``--registry``); the reviewer must never read a
    delta's host files as checked when they were not.
    """

    carried_files: int
    carried_bytes: int
    on_host_files: int
    on_host_bytes: int
    host_checked: bool
    registry: str | None
    statement: str

    def to_json(self) -> dict[str, Any]:
        return {"carried": {"files": self.carried_files, "bytes": self.carried_bytes},
                "on_host": {"files": self.on_host_files, "bytes": self.on_host_bytes},
                "host_checked": self.host_checked, "registry": self.registry, "statement": self.statement}


@dataclass(frozen=True, kw_only=True)
class FilesFacts:
    files: tuple[FileFact, ...]
    total_bytes: int

    def to_json(self) -> dict[str, Any]:
        hub: dict[str, int] = {}
        for f in self.files:
            hub[f.hub] = hub.get(f.hub, 0) + 1
        return {"files": [f.to_json() for f in self.files], "count": len(self.files), "total_bytes": self.total_bytes, "hub": hub}


@dataclass(frozen=True, kw_only=True)
class WheelFact:
    name: str
    version: str
    filename: str
    sha256: str
    size: int | None
    licenses: tuple[str, ...]
    platforms: tuple[str, ...]
    python: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "filename": self.filename, "sha256": self.sha256, "size": self.size,
                "licenses": list(self.licenses), "platforms": list(self.platforms), "python": list(self.python)}


@dataclass(frozen=True, kw_only=True)
class SbomFacts:
    """The CycloneDX SBOM made from the manifest, and whether the bundle's own signed ``sbom.cdx.json`` is those bytes."""

    format: str
    components: dict[str, int]
    licenses: tuple[str, ...]
    sha256: str
    carried_sha256: str | None

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "components": dict(self.components), "licenses": list(self.licenses), "sha256": self.sha256,
                "carried_sha256": self.carried_sha256, "carried_matches": self.carried_sha256 == self.sha256}


@dataclass(frozen=True, kw_only=True)
class CurvePoint:
    context: int
    per_gpu_bytes: int

    def to_json(self) -> dict[str, int]:
        return {"context": self.context, "per_gpu_bytes": self.per_gpu_bytes}


@dataclass(frozen=True, kw_only=True)
class FitFact:
    """One model on one GPU target of the manifest: the estimate now, its memory against context, and the pack-time record.

    ``basis`` says where the numbers come from: ``verified`` (the headers the pipeline
    verified), ``unverified-files`` (a bundle folder's files as they are on disk), ``recorded``
    (only the estimate the manifest claims from pack time: a tar or parts folder without
    ``--trust`` is not read past its manifest), or ``unknown`` (``reason`` says why).
    """

    model: str
    target: dict[str, Any]  # gpu, count, runtime, context, batch: always those keys (``_target_view``)
    basis: str
    verdict: str
    reason: str | None = None
    per_gpu_bytes: int | None = None
    limit_bytes: int | None = None
    breakdown: dict[str, int] = field(default_factory=dict)
    context: int | None = None
    max_context: int | None = None
    model_max_context: int | None = None
    architecture: str | None = None
    notes: tuple[str, ...] = ()
    curve: tuple[CurvePoint, ...] = ()
    recorded: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        rec = self.recorded or {}
        verdict = rec.get("verdict")
        return {
            "model": self.model, "target": dict(self.target), "basis": self.basis, "verdict": self.verdict, "reason": self.reason,
            "per_gpu_bytes": self.per_gpu_bytes, "limit_bytes": self.limit_bytes, "breakdown": dict(self.breakdown),
            "context": self.context, "max_context": self.max_context, "model_max_context": self.model_max_context,
            "architecture": self.architecture, "notes": list(self.notes), "curve": [p.to_json() for p in self.curve],
            "recorded": self.recorded, "recorded_verdict": verdict if isinstance(verdict, str) else None,
            "recorded_per_gpu_bytes": _whole(rec.get("per_gpu_bytes")),
        }


@dataclass(frozen=True, kw_only=True)
class SequenceFact:
    """Would an install be accepted on the channel, as ``rules.classify_sequence`` decides for install."""

    channel: str
    sequence: int
    against_sequence: int | None
    against_bundle: str | None
    verdict: str
    accepted: bool
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"channel": self.channel, "sequence": self.sequence, "against_sequence": self.against_sequence,
                "against_bundle": self.against_bundle, "verdict": self.verdict, "accepted": self.accepted, "message": self.message}


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """The diff against an older bundle (``kind`` bundle) or what the registry has installed (``kind`` registry)."""

    kind: str
    against: str
    verified: bool
    files: dict[str, list[dict[str, Any]]]
    flags: tuple[str, ...]
    sequence: SequenceFact
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "against": self.against, "verified": self.verified, "files": self.files,
                "flags": list(self.flags), "sequence": self.sequence.to_json(), "detail": self.detail}


@dataclass(frozen=True, kw_only=True)
class BundleReport:
    """Everything the bundle report shows; ``to_json`` is the ``--json`` document and the template's only input."""

    verification: Verification
    identity: Identity
    models: tuple[ModelFact, ...]
    policy: ContentPolicyFact
    files: FilesFacts
    wheels: tuple[WheelFact, ...]
    sbom: SbomFacts
    fit: tuple[FitFact, ...]
    comparison: Comparison | None
    generated_at: str
    tool: str
    delta: DeltaFact | None = None  # a delta bundle; a full bundle's document has no ``delta`` key, as it always was

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "kind": "bundle", "generated_at": self.generated_at, "tool": self.tool,
            "verification": self.verification.to_json(), "identity": self.identity.to_json(),
            "models": [m.to_json() for m in self.models], "policy": self.policy.to_json(), "files": self.files.to_json(),
            "wheels": [w.to_json() for w in self.wheels], "sbom": self.sbom.to_json(), "fit": [f.to_json() for f in self.fit],
            "comparison": self.comparison.to_json() if self.comparison is not None else None,
        }
        if self.delta is not None:
            doc["delta"] = self.delta.to_json()
        return scrub(doc)  # type: ignore[no-any-return]


@dataclass(frozen=True, kw_only=True)
class ChainFact:
    """The audit log's hash-chain check: ``ok``, or the first broken line and why."""

    ok: bool
    lines: int
    head_sha256: str | None
    first_time: str | None
    last_time: str | None
    error: str | None
    broken_line: int | None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "lines": self.lines, "head_sha256": self.head_sha256, "first_time": self.first_time,
                "last_time": self.last_time, "error": self.error, "broken_line": self.broken_line}


@dataclass(frozen=True, kw_only=True)
class LogEvent:
    """One audit line as the timeline shows it; ``kind`` is install, refusal, rollback, removal, trust or other."""

    line: int
    time: str | None
    kind: str
    command: str
    result: str | None
    user: str | None
    host: str | None
    summary: str
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "time": self.time, "kind": self.kind, "command": self.command, "result": self.result,
                "user": self.user, "host": self.host, "summary": self.summary, "error": self.error}


@dataclass(frozen=True, kw_only=True)
class RegistryReport:
    registry: str
    models: tuple[dict[str, Any], ...]
    channels: tuple[dict[str, Any], ...]
    timeline: tuple[LogEvent, ...]
    timeline_truncated: int
    chain: ChainFact
    pending: str | None
    generated_at: str
    host: str
    tool: str

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "kind": "registry", "generated_at": self.generated_at, "host": self.host, "tool": self.tool, "registry": self.registry,
            "models": list(self.models), "channels": list(self.channels), "timeline": [e.to_json() for e in self.timeline],
            "timeline_truncated": self.timeline_truncated, "chain": self.chain.to_json(), "pending": self.pending,
        }
        return scrub(doc)  # type: ignore[no-any-return]


# -- the bundle's facts ---------------------------------------------------------------------------


def _architecture(cfg: Mapping[str, Any]) -> str:
    """One line from the signed config summary: class, type, layers, width, heads, vocabulary."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    archs = cfg.get("architectures")
    parts = [str(archs[0]) if isinstance(archs, list) and archs else str(cfg.get("model_type") or "unknown architecture")]
    if cfg.get("model_type") is not None and parts[0] != str(cfg.get("model_type")):
        parts[0] += f" ({cfg.get('model_type')})"
    for key, label in (("num_hidden_layers", "layers"), ("hidden_size", "hidden"), ("num_attention_heads", "attention heads"),
                       ("num_key_value_heads", "KV heads"), ("vocab_size", "vocabulary")):
        v = text.get(key) if isinstance(text, dict) else None
        if v is not None:
            parts.append(f"{label} {v}")
    return ", ".join(parts)


def _model_fact(m: Manifest, x: ModelEntry) -> ModelFact:
    files = m.model_files(x)
    raw_cfg = x.raw.get("config")
    cfg: dict[str, Any] = raw_cfg if isinstance(raw_cfg, dict) else {}
    params = x.raw.get("parameters")
    dtypes = x.raw.get("dtypes")
    return ModelFact(
        repo_id=x.repo_id, source=x.source, revision=x.revision, commit=x.commit, license=x.license,
        parameters=_whole(params),
        dtypes=dtypes if isinstance(dtypes, dict) else {}, architecture=_architecture(cfg), config=cfg,
        files=len(files), bytes=sum(f.size for f in files), pickles=x.pickles, code=x.code,
    )


def _hub_state(f: FileEntry, model: ModelEntry | None) -> str:
    if model is None or model.source != "hub":
        return "-"
    record = model.raw.get("hub_files")
    hub = record.get(f.path[len(model.prefix) + 1:]) if isinstance(record, dict) else None
    if not isinstance(hub, dict):
        return "not-listed"
    if "sha256" in hub:
        return "match" if hub.get("sha256") == f.sha256 and hub.get("size") == f.size else "differs"
    return "size-only" if hub.get("size") == f.size else "differs"


def _file_kind(path: str, model: ModelEntry | None) -> str:
    if model is None:
        return "wheel" if path.startswith("wheels/") else ("sbom" if path == SBOM_NAME else "other")
    rel = path[len(model.prefix) + 1:]
    if rel in model.code or content.is_code(path):
        return "code"
    if rel in model.pickles or content.is_pickle(path):
        return "pickle"
    if content.is_safetensors(path):
        return "weights"
    return "config" if path.endswith(".json") else "other"


def _files(m: Manifest) -> FilesFacts:
    owners = {x.prefix + "/": x for x in m.models}

    def owner(p: str) -> ModelEntry | None:
        return next((x for pre, x in owners.items() if p.startswith(pre)), None)

    facts = []
    for f in m.files:
        x = owner(f.path)
        where = ("on-host" if f.path in m.on_host else "carried") if m.is_delta else None
        facts.append(FileFact(path=f.path, size=f.size, sha256=f.sha256, kind=_file_kind(f.path, x), hub=_hub_state(f, x),
                              where=where))
    return FilesFacts(files=tuple(facts), total_bytes=m.total_bytes)


def _str_tuple(v: object) -> tuple[str, ...]:
    return tuple(str(x) for x in v) if isinstance(v, list) else ()


def _wheels(m: Manifest) -> tuple[WheelFact, ...]:
    out = []
    for w in m.wheels:
        size = w.raw.get("size")
        out.append(WheelFact(
            name=w.name, version=w.version, filename=str(w.raw.get("filename") or w.path.rsplit("/", 1)[-1]), sha256=w.sha256,
            size=_whole(size), licenses=_str_tuple(w.raw.get("licenses")),
            platforms=_str_tuple(w.raw.get("platform_tags")), python=_str_tuple(w.raw.get("python_tags")),
        ))
    return tuple(out)


def _sbom(side: Side) -> SbomFacts:
    """The SBOM ``airpack sbom`` makes from this manifest, summarised, against the signed copy the bundle carries."""
    r = sbom_for(side)
    doc = r.to_json()
    kinds: dict[str, int] = {}
    licences: set[str] = set()
    for c in doc.get("components", []) or []:
        if not isinstance(c, dict):
            continue
        kinds[str(c.get("type"))] = kinds.get(str(c.get("type")), 0) + 1
        for lic in c.get("licenses", []) or []:
            inner = lic.get("license", {}) if isinstance(lic, dict) else {}
            name = inner.get("id") or inner.get("name") or (lic.get("expression") if isinstance(lic, dict) else None)
            if name:
                licences.add(str(name))
    carried = side.manifest.file(SBOM_NAME)
    spec = doc.get("specVersion")
    return SbomFacts(format=f"CycloneDX {spec}" if spec else "CycloneDX", components=kinds, licenses=tuple(sorted(licences)),
                     sha256=hashlib.sha256(r.data).hexdigest(), carried_sha256=carried.sha256 if carried is not None else None)


def _policy_fact(m: Manifest) -> ContentPolicyFact:
    return ContentPolicyFact(
        allow_pickle=m.allow_pickle, allow_code=m.allow_code,
        pickles=tuple(f"{x.prefix}/{p}" for x in m.models for p in x.pickles),
        code=tuple(f"{x.prefix}/{p}" for x in m.models for p in x.code),
    )


# -- the fit pictures -----------------------------------------------------------------------------


def _curve_contexts(top: int, marks: tuple[int | None, ...]) -> list[int]:
    """About ``CURVE_POINTS`` context lengths from 1 to ``top``, evenly spread, plus the marked ones."""
    top = max(top, 1)
    pts = {max(1, round(top * i / (CURVE_POINTS - 1))) for i in range(CURVE_POINTS)}
    pts.update(c for c in marks if c is not None and 1 <= c <= top)
    return sorted(pts)


def _estimate_fact(src: ModelSource, target: Mapping[str, Any], basis: str, recorded: dict[str, Any] | None) -> FitFact:
    """The estimator on one target; its memory against context from the very same model and run."""
    budget = parse_gpu(str(target["gpu"]), count=target["count"])
    run = run_config(runtime=target["runtime"] or "vllm", context=target["context"], batch=target["batch"], count=budget.count)
    rep = estimate_source(src, run, budget)
    r = rep.result
    est = r.estimate
    top = max(r.model_max_context, est.context)
    curve = tuple(CurvePoint(context=c, per_gpu_bytes=estimate(rep.shape, rep.weights, replace(run, context=c)).per_gpu_bytes)
                  for c in _curve_contexts(top, (est.context, r.max_context)))
    return FitFact(model=src.name, target=dict(target), basis=basis, verdict=r.verdict, per_gpu_bytes=r.per_gpu_bytes,
                   limit_bytes=r.limit_bytes, breakdown=est.breakdown.to_json(), context=est.context, max_context=r.max_context,
                   model_max_context=r.model_max_context, architecture=rep.shape.describe(), notes=r.notes, curve=curve,
                   recorded=recorded)


def _recorded(target: Mapping[str, Any], repo_id: str) -> dict[str, Any] | None:
    """The estimate the manifest recorded at pack time for this model on this target (as the bundle claims)."""
    per_model = target.get("estimates")
    if isinstance(per_model, list):
        for e in per_model:
            if isinstance(e, dict) and e.get("model") == repo_id:
                return e
    est = target.get("estimate")
    return est if isinstance(est, dict) and est.get("model") in (None, repo_id) else None


def _recorded_fact(model: str, target: dict[str, Any], recorded: dict[str, Any] | None, reason: str) -> FitFact:
    """Only what the bundle claims from pack time; ``basis`` recorded, or unknown when there is no record either."""
    if recorded is None or not isinstance(recorded.get("breakdown"), dict):
        return FitFact(model=model, target=target, basis="unknown", verdict="unknown", reason=reason, recorded=recorded)
    bd = {k: n for k, v in recorded["breakdown"].items() if (n := _whole(v)) is not None}
    return FitFact(model=model, target=target, basis="recorded", verdict=str(recorded.get("verdict", "unknown")), reason=reason,
                   per_gpu_bytes=_whole(recorded.get("per_gpu_bytes")), limit_bytes=_whole(recorded.get("limit_bytes")),
                   breakdown=bd, context=_whole(recorded.get("context")), max_context=_whole(recorded.get("max_context")),
                   model_max_context=_whole(recorded.get("model_max_context")), recorded=recorded)


def _target_view(t: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest target as the report shows it: always the same keys, each a string, an integer or None.

    The manifest signs targets as free objects, so nothing about their shape is assumed.
    """
    def text(k: str) -> str | None:
        v = t.get(k)
        return None if v is None else str(v)[:200]

    return {"gpu": text("gpu"), "count": _whole(t.get("count")) or 1, "runtime": text("runtime"), "context": _whole(t.get("context")),
            "batch": _whole(t.get("batch")) or 1}


def _fit(m: Manifest, sources: list[ModelSource] | None, basis: str, why_not: str) -> tuple[FitFact, ...]:
    """Each target of the manifest, for each model: estimated from ``sources`` when there are some, else as recorded."""
    out: list[FitFact] = []
    by_name = {s.name: s for s in sources or []}
    for t in m.targets:
        target = _target_view(t)
        for x in m.models:
            recorded = _recorded(t, x.repo_id)
            src = by_name.get(x.repo_id)
            if src is None:
                out.append(_recorded_fact(x.repo_id, target, recorded, why_not))
                continue
            try:
                out.append(_estimate_fact(src, target, basis, recorded))
            except (UsageError, IntegrityError) as e:
                out.append(FitFact(model=x.repo_id, target=target, basis="unknown", verdict="unknown", reason=e.message[:500],
                                   recorded=recorded))
    return tuple(out)


DELTA_NOT_READ = ("a delta bundle does not carry the files it expects on the host, and they were not read from one "
                  "(--trust with --registry DIR hashes them): shown as recorded at pack time")


def _delta_fact(m: Manifest, host_checked: bool, registry: Path | None) -> DeltaFact | None:
    """What a delta carries and relies on, and in words whether the host's copies were checked here."""
    if not m.is_delta:
        return None
    carried, left = m.carried, m.expected_on_host
    if host_checked:
        statement = (f"every one of the {len(left)} file(s) expected on the host was found in registry {registry} "
                     "with its signed size and SHA-256")
    else:
        how = ("a host check needs --trust POLICY as well" if registry is not None
               else "give --trust POLICY and --registry DIR on the host to hash them")
        statement = f"the {len(left)} file(s) expected on the host were NOT checked against a host: {how}"
    return DeltaFact(carried_files=len(carried), carried_bytes=sum(f.size for f in carried), on_host_files=len(left),
                     on_host_bytes=sum(f.size for f in left), host_checked=host_checked,
                     registry=str(registry) if host_checked else None, statement=statement)


def _unverified_sources(path: Path, form: str, m: Manifest) -> tuple[list[ModelSource] | None, str]:
    """A bundle folder's models read as ``airpack fit BUNDLE`` reads them; a stream is not read past its manifest."""
    if m.is_delta:
        return None, DELTA_NOT_READ
    if form != "folder":
        return None, "a tar or parts folder is read only as far as its manifest without --trust: shown as recorded at pack time"
    try:
        return load_bundle(path), ""
    except (UsageError, IntegrityError) as e:
        return None, e.message[:500]


# -- the comparison -------------------------------------------------------------------------------


def sequence_fact(high: ChannelHigh | None, m: Manifest) -> SequenceFact:
    """Would install accept ``m`` over ``high`` (the channel's highest installed bundle, or the older bundle compared)?"""
    verdict = classify_sequence(high, sequence=m.sequence, manifest_sha256=m.digest)
    base = high.sequence if high is not None else 0
    messages = {
        Sequence.NEW: f"no bundle of channel {m.channel} is installed: sequence {m.sequence} would be accepted",
        Sequence.NEWER: f"sequence {m.sequence} is above {base}: the install would be accepted",
        Sequence.SAME: "this exact bundle is the channel's highest: installing it again changes nothing",
        Sequence.CONFLICT: f"sequence {m.sequence} equals {base} with other content: refused as a rollback",
        Sequence.OLDER: f"sequence {m.sequence} is below {base}: refused as a rollback (unless --allow-downgrade)",
        Sequence.JUMP: f"sequence {m.sequence} jumps more than {MAX_SEQUENCE_JUMP:,} beyond {base}: refused",
    }
    return SequenceFact(channel=m.channel, sequence=m.sequence, against_sequence=high.sequence if high else None,
                        against_bundle=high.bundle if high else None, verdict=verdict.value,
                        accepted=verdict in (Sequence.NEW, Sequence.NEWER, Sequence.SAME), message=messages[verdict])


def _against_bundle(side: Side, old: Side) -> Comparison:
    d: DiffResult = diff_manifests(old, side)
    a = old.manifest
    if a.channel == side.manifest.channel:
        seq = sequence_fact(ChannelHigh(sequence=a.sequence, manifest_sha256=a.digest, bundle=a.name), side.manifest)
    else:
        seq = replace(sequence_fact(None, side.manifest),
                      message=f"the bundles are on different channels ({a.channel}, {side.manifest.channel}): no sequence rule applies")
    files = {k: d.files[k] for k in ("added", "removed", "changed")}
    return Comparison(kind="bundle", against=old.path, verified=old.verified, files=files, flags=d.flags, sequence=seq,
                      detail=d.to_json())


def _against_registry(side: Side, registry: Path) -> Comparison:
    r: DiffRegistryResult = diff_registry_side(side, registry)
    files: dict[str, list[dict[str, Any]]] = {"added": [], "removed": [], "changed": []}
    for mc in r.models:
        pre = f"{mc.repo_id}: "
        for k in files:
            files[k] += [{**x, "path": pre + str(x["path"])} for x in mc.files.get(k, [])]
    return Comparison(kind="registry", against=str(registry), verified=side.verified, files=files, flags=r.flags,
                      sequence=sequence_fact(r.channel_high, side.manifest), detail=r.to_json())


# -- the operation --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ReportOptions:
    """``airpack report``: ``bundle`` (any local form) or, with no bundle, ``registry``; ``out`` the HTML file."""

    bundle: Path | None = None
    out: Path | None = None
    policy: TrustPolicy | None = None
    against: Path | None = None
    registry: Path | None = None
    pdf: Path | None = None
    force: bool = False
    now: dt.datetime | None = None
    progress: Progress = NULL_PROGRESS


@dataclass(frozen=True, kw_only=True)
class ReportResult:
    """The facts, and the files written (``pdf`` None when no PDF was asked for)."""

    facts: BundleReport | RegistryReport
    html: Path | None
    pdf: Path | None

    def to_json(self) -> dict[str, Any]:
        return {**self.facts.to_json(), "written": {"html": str(self.html) if self.html else None,
                                                    "pdf": str(self.pdf) if self.pdf else None}}


def _verified_side(path: Path, policy: TrustPolicy, *, now: dt.datetime | None, progress: Progress,
                   host: Path | None = None) -> tuple[Side, VerifiedBundle]:
    """verify's own check; with ``host`` (a registry) a delta's files expected there are hashed as ``verify --registry`` does."""
    source = open_source(path, policy=policy)  # refuses a policy that can never be met first, before the registry is opened
    if host is None:
        vb = verify_source(source, policy, now=now, keep=keep_for_fit, progress=progress)
    else:
        reg = Registry.open(host)
        with reg.reader() as conn:
            vb = verify_source(source, policy, now=now, keep=keep_for_fit, progress=progress, host=RegistryCopies(reg, conn))
    return Side(path=str(path), manifest=vb.manifest, verified=True, signers=tuple(vb.signer_names)), vb


def bundle_facts(opts: ReportOptions) -> BundleReport:
    """The bundle report's facts: verified with ``opts.policy`` (verify's errors stop it), else as the bundle claims."""
    if opts.bundle is None:
        raise UsageError("report needs a BUNDLE, or --registry DIR alone for the registry report")
    path = opts.bundle
    form = FORMS[detect(path)[0]]
    now = now_utc()
    pol = opts.policy
    if pol is not None:
        side, vb = _verified_side(path, pol, now=opts.now, progress=opts.progress, host=opts.registry)
        signers = tuple(SignerFact(name=k.name, keyid=k.keyid, algorithm=k.algorithm) for k in vb.signers)
        host_checked = vb.host_checked
        read_all = host_checked or not vb.manifest.is_delta  # a delta's weights are read only from the host's hashed copies
        sources: list[ModelSource] | None = verified_models(vb) if read_all else None
        basis, why_not = "verified", "" if read_all else DELTA_NOT_READ
    else:
        side, claimed = claimed_side(path)
        signers = tuple(SignerFact(name=None, keyid=s.keyid, algorithm=None) for s in claimed.envelope.signatures)
        sources, why_not = _unverified_sources(path, form, claimed.manifest)
        basis, host_checked = "unverified-files", False
    m = side.manifest
    verification = Verification(
        verified=pol is not None, form=form, location=str(path), signers=signers, threshold=pol.threshold if pol else None,
        policy=pol.source if pol else None, policy_sha256=pol.sha256 if pol else None,
        policy_keys=tuple(k.name for k in pol.keys) if pol else (), checked_at=format_time(now), host=hostname(),
    )
    tool = m.predicate.get("tool")
    identity = Identity(
        name=m.name, channel=m.channel, sequence=m.sequence, created=format_time(m.created),
        expires=format_time(m.expires) if m.expires else None, manifest_sha256=m.digest,
        tool=f"{tool.get('name')} {tool.get('version')}" if isinstance(tool, dict) else None, files=len(m.files),
        total_bytes=m.total_bytes,
    )
    comparison = None
    if opts.against is not None:
        comparison = _against_bundle(side, load_side(opts.against, pol, now=opts.now, progress=opts.progress))
    elif opts.registry is not None:
        comparison = _against_registry(side, opts.registry)
    from .. import __version__

    return BundleReport(
        verification=verification, identity=identity, models=tuple(_model_fact(m, x) for x in m.models), policy=_policy_fact(m),
        files=_files(m), wheels=_wheels(m), sbom=_sbom(side), fit=_fit(m, sources, basis, why_not), comparison=comparison,
        generated_at=format_time(now), tool=f"airpack {__version__}", delta=_delta_fact(m, host_checked, opts.registry),
    )


# -- the registry's facts -------------------------------------------------------------------------


_KINDS = {"install": "install", "rollback": "rollback", "remove": "removal"}


def _event(n: int, rec: Mapping[str, Any]) -> LogEvent:
    """One audit line for the timeline: what happened, to what, and the refusal's reason."""
    command = str(rec.get("command", "?"))
    result = rec.get("result")
    err = rec.get("error")
    message = str(err.get("message")) if isinstance(err, dict) else None
    refused = result in ("refused", "failed") or message is not None
    kind = "refusal" if refused else ("trust" if command.startswith("trust") else _KINDS.get(command, "other"))
    bundle = rec.get("bundle")
    parts = []
    if isinstance(bundle, dict):
        parts.append(f"{bundle.get('name')} (channel {bundle.get('channel')}, sequence {bundle.get('sequence')})")
    for key in ("target", "revision", "source", "note"):
        if rec.get(key) is not None:
            parts.append(f"{key} {rec.get(key)}")
    models = rec.get("models")
    if isinstance(models, list):
        parts += [f"{x.get('repo_id')}@{str(x.get('commit', ''))[:12]}" for x in models if isinstance(x, dict)]
    signers = rec.get("signer_names")
    if isinstance(signers, list) and signers:
        parts.append("signed by " + ", ".join(map(str, signers)))
    user, host = rec.get("user"), rec.get("host")
    return LogEvent(line=n, time=str(rec["time"]) if rec.get("time") is not None else None, kind=kind, command=command,
                    result=str(result) if result is not None else None, user=str(user) if user is not None else None,
                    host=str(host) if host is not None else None, summary="; ".join(parts), error=message)


def registry_facts(opts: ReportOptions) -> RegistryReport:
    """The registry report's facts: what is installed and current, channels, and the audit log's timeline and chain."""
    if opts.registry is None:
        raise UsageError("report needs a BUNDLE, or --registry DIR alone for the registry report")
    from .. import __version__

    installed = list_installed(opts.registry)
    reg = Registry.open(opts.registry)
    with reg.reader() as conn:
        channels = tuple({"channel": c, "sequence": h.sequence, "bundle": h.bundle, "manifest_sha256": h.manifest_sha256}
                         for c, h in conn.channels())
    events: list[LogEvent] = []
    seen = [0]

    def visit(rec: dict[str, Any]) -> None:
        seen[0] += 1
        if len(events) < MAX_TIMELINE:
            events.append(_event(seen[0], rec))

    try:
        rep = verify_chain(reg, visit=visit)
        chain = ChainFact(ok=True, lines=rep.lines, head_sha256=rep.head, first_time=rep.first, last_time=rep.last, error=None,
                          broken_line=None)
    except AuditLogError as e:  # a fact the reviewer must see, not a reason to withhold the report
        chain = ChainFact(ok=False, lines=seen[0], head_sha256=None, first_time=events[0].time if events else None,
                          last_time=events[-1].time if events else None, error=e.message, broken_line=e.line)
    return RegistryReport(
        registry=str(opts.registry), models=tuple(x.to_json() for x in installed.models), channels=channels,
        timeline=tuple(events), timeline_truncated=max(0, seen[0] - len(events)), chain=chain, pending=installed.pending,
        generated_at=format_time(now_utc()), host=hostname(), tool=f"airpack {__version__}",
    )


def _check_out(path: Path, force: bool, flag: str) -> None:
    """Refuse (exit 2) an output that exists (unless ``force``), is a folder, or sits in a folder that is not there."""
    if os.path.lexists(path) and (not force or path.is_dir() or path.is_symlink()):
        what = "is a folder" if path.is_dir() else "already exists"
        raise ReportOutputError(f"{path} {what}; choose another {flag} path" + ("" if path.is_dir() else " or pass --force"),
                                path=str(path))
    parent = path.parent
    if not parent.is_dir():
        raise ReportOutputError(f"cannot write {path}: the folder {parent} does not exist", path=str(path))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ReportOutputError(f"cannot write {path}: the folder {parent} is not writable", path=str(path))


def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write(path, data)
    except AirpackError as e:
        raise ReportOutputError(e.message, path=str(path)) from None
    except OSError as e:  # pragma: no cover - atomic_write maps these; kept for a platform that does not
        raise oserror_to_airpack(e, "cannot write", str(path)) from None


def report(opts: ReportOptions) -> ReportResult:
    """Build the facts, then write the HTML rendering of them (and a PDF of it) when ``opts.out`` is given.

    Outputs are checked before anything is read, so a refusal costs nothing; the HTML is written
    before the PDF is printed, so a missing browser still leaves the HTML (and says so).
    """
    for p, flag in ((opts.out, "--out"), (opts.pdf, "--pdf")):
        if p is not None:
            _check_out(p, opts.force, flag)
    if opts.pdf is not None and opts.out is None:
        raise UsageError("--pdf prints the HTML report: give --out REPORT.html as well")
    if opts.pdf is not None and opts.out is not None and os.path.abspath(opts.pdf) == os.path.abspath(opts.out):
        raise ReportOutputError(f"--out and --pdf are both {opts.out}: give the PDF its own name", path=str(opts.pdf))
    facts: BundleReport | RegistryReport = bundle_facts(opts) if opts.bundle is not None else registry_facts(opts)
    if opts.out is None:
        return ReportResult(facts=facts, html=None, pdf=None)
    from .. import report_html

    html = report_html.render(facts.to_json())
    _write(opts.out, html.encode("utf-8"))
    if opts.pdf is not None:
        report_html.print_pdf(opts.out, opts.pdf)
    return ReportResult(facts=facts, html=opts.out, pdf=opts.pdf)


__all__ = [
    "BundleReport",
    "DeltaFact",
    "RegistryReport",
    "ReportOptions",
    "ReportResult",
    "bundle_facts",
    "registry_facts",
    "report",
    "sequence_fact",
]
