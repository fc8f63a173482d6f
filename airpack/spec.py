"""The pack spec: a reviewed TOML file that names everything a bundle holds.

Parsed into frozen dataclasses; unknown keys are refused so a typo in a
reviewed file cannot silently change what gets packed.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._fs import collision_key
from .errors import SpecError
from .manifest import model_slug, valid_name, valid_repo_id
from .rules import MAX_SEQUENCE
from .vram import RUNTIMES

MAX_SPEC_BYTES = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    repo_id: str
    revision: str | None = None
    path: Path | None = None  # a local source, resolved against the spec's folder
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    license: str | None = None
    repo_type: str = "model"

    @property
    def source(self) -> str:
        return "local" if self.path is not None else "hub"


@dataclass(frozen=True, kw_only=True)
class WheelSpec:
    requirements: tuple[str, ...] = ()
    requirements_file: Path | None = None
    python_version: str = "3.11"
    platforms: tuple[str, ...] = ("manylinux_2_28_x86_64",)
    implementation: str = "cp"
    abi: tuple[str, ...] = ()
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    no_index: bool = False  # only find_links: no package index at all
    # which of python_version, platforms, implementation, abi the spec itself names: ``pack --for`` takes the rest
    # from the host's profile, never the defaults above
    named: frozenset[str] = frozenset()


@dataclass(frozen=True, kw_only=True)
class TargetSpec:
    gpu: str
    count: int = 1
    context: int | None = None
    runtime: str = "vllm"
    batch: int = 1


@dataclass(frozen=True, kw_only=True)
class PackSpec:
    name: str
    channel: str
    sequence: int
    expires: dt.datetime | None
    models: tuple[ModelSpec, ...]
    allow_pickle: bool = False
    allow_code: bool = False
    wheels: WheelSpec | None = None
    targets: tuple[TargetSpec, ...] = ()
    source: Path = Path(".")


def _check_keys(table: dict[str, Any], allowed: set[str], where: str, src: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise SpecError(f"spec {src}: unknown key(s) in {where}: {', '.join(sorted(unknown))}", path=src)


def _str_tuple(v: Any, where: str, src: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise SpecError(f"spec {src}: {where} must be a list of strings", path=src)
    return tuple(v)


def _typed(table: dict[str, Any], key: str, typ: type, where: str, src: str, default: Any = None) -> Any:
    v = table.get(key, default)
    if v is None:
        return None
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise SpecError(f"spec {src}: {where}.{key} must be a {typ.__name__}", path=src)
    return v


def _to_utc(v: Any, src: str) -> dt.datetime | None:
    if v is None:
        return None
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            raise SpecError(f"spec {src}: bundle.expires needs a time zone (e.g. 2027-06-30T00:00:00Z)", path=src)
        return v.astimezone(dt.UTC).replace(microsecond=0)
    if isinstance(v, dt.date):
        return dt.datetime(v.year, v.month, v.day, tzinfo=dt.UTC)
    raise SpecError(f"spec {src}: bundle.expires must be a TOML date or date-time", path=src)


def load_spec(path: Path) -> PackSpec:
    """Read and validate a pack spec; local model paths are relative to the spec's folder."""
    path = Path(path)
    src = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"spec {src} not found", path=src) from None
    except OSError as e:
        raise SpecError(f"cannot read spec {src}: {e.strerror}", path=src) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"spec {src} is larger than {MAX_SPEC_BYTES} bytes", path=src)
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"spec {src} is not valid TOML: {e}", path=src) from None
    return spec_from_dict(doc, base=path.parent, src=src)


def spec_from_dict(doc: dict[str, Any], *, base: Path, src: str = "<spec>") -> PackSpec:
    """Validate a parsed spec; the tables are checked in file order, and the first problem found is the one reported."""
    _check_keys(doc, {"bundle", "models", "policy", "wheels", "targets"}, "the top level", src)
    name, channel, sequence, expires = _bundle_table(doc.get("bundle"), src)
    models = _models(doc.get("models"), base, src)
    allow_pickle, allow_code = _policy_table(doc.get("policy", {}), src)
    w = doc.get("wheels")
    wheels = _wheels_table(w, base, src) if w is not None else None
    targets = _targets(doc.get("targets", []), src)
    return PackSpec(
        name=name,
        channel=channel,
        sequence=sequence,
        expires=expires,
        models=models,
        allow_pickle=allow_pickle,
        allow_code=allow_code,
        wheels=wheels,
        targets=targets,
        source=base,
    )


def _bundle_table(bundle: object, src: str) -> tuple[str, str, int, dt.datetime | None]:
    """[bundle]: (name, channel, sequence, expires); the channel defaults to the name."""
    if not isinstance(bundle, dict):
        raise SpecError(f"spec {src}: a [bundle] table is required", path=src)
    _check_keys(bundle, {"name", "channel", "sequence", "expires"}, "[bundle]", src)
    name = _typed(bundle, "name", str, "bundle", src)
    if not valid_name(name):
        raise SpecError(f"spec {src}: bundle.name is required: letters, digits, '.', '_' and '-' only", path=src)
    channel = _typed(bundle, "channel", str, "bundle", src, default=name)
    if not valid_name(channel):
        raise SpecError(f"spec {src}: bundle.channel: letters, digits, '.', '_' and '-' only", path=src)
    sequence = _typed(bundle, "sequence", int, "bundle", src)
    if sequence is None or sequence < 0:
        raise SpecError(f"spec {src}: bundle.sequence is required (a non-negative integer)", path=src)
    if sequence > MAX_SEQUENCE:  # verify would refuse it (exit 4): say so before anything is fetched
        raise SpecError(f"spec {src}: bundle.sequence {sequence} is above the highest airpack accepts ({MAX_SEQUENCE:,}, "
                        "2^53 - 1)", path=src)
    return name, channel, sequence, _to_utc(bundle.get("expires"), src)


def _models(models_doc: object, base: Path, src: str) -> tuple[ModelSpec, ...]:
    """[[models]]: at least one, each repo id once."""
    if not isinstance(models_doc, list) or not models_doc:
        raise SpecError(f"spec {src}: at least one [[models]] entry is required", path=src)
    models = tuple(_model(m, f"models[{i}]", base, src) for i, m in enumerate(models_doc))
    seen: dict[str, int] = {}
    for i, m in enumerate(models):
        # each model lands in a folder named after its repo id (bundle and registry): equal up to case, they collide
        j = seen.setdefault(collision_key(model_slug(m.repo_id)), i)
        if j == i:
            continue
        if models[j].repo_id == m.repo_id:
            raise SpecError(f"spec {src}: repo_id {m.repo_id!r} appears twice in [[models]] (models[{j}] and models[{i}])",
                            path=src)
        raise SpecError(
            f"spec {src}: models[{i}].repo_id {m.repo_id!r} and models[{j}].repo_id {models[j].repo_id!r} differ only in "
            "case (or Unicode form): their folders would collide on case-insensitive file systems", path=src,
            hint="Give each model a repo_id that differs by more than case; see docs/spec.md.",
        )
    return models


def _model(m: object, where: str, base: Path, src: str) -> ModelSpec:
    """One [[models]] entry: a Hub repo at a revision (default main), or a local ``path`` (which has none)."""
    if not isinstance(m, dict):
        raise SpecError(f"spec {src}: {where} must be a table", path=src)
    _check_keys(m, {"repo_id", "revision", "path", "include", "exclude", "license", "repo_type"}, where, src)
    repo_id = _typed(m, "repo_id", str, where, src)
    if not valid_repo_id(repo_id):
        raise SpecError(f"spec {src}: {where}.repo_id must look like ORG/NAME", path=src)
    local = _typed(m, "path", str, where, src)
    revision = _typed(m, "revision", str, where, src)
    repo_type = _typed(m, "repo_type", str, where, src, default="model")
    if repo_type != "model":
        raise SpecError(f"spec {src}: {where}.repo_type: only 'model' is supported", path=src)
    if local is not None and revision is not None:
        raise SpecError(f"spec {src}: {where} has both path and revision; a local source has no revision", path=src)
    return ModelSpec(
        repo_id=repo_id,
        revision=(revision or "main") if local is None else None,
        path=(base / local) if local is not None else None,
        include=_str_tuple(m.get("include"), f"{where}.include", src),
        exclude=_str_tuple(m.get("exclude"), f"{where}.exclude", src),
        license=_typed(m, "license", str, where, src),
        repo_type=repo_type,
    )


def _policy_table(policy: object, src: str) -> tuple[bool, bool]:
    """[policy]: (allow_pickle, allow_code), both false unless set."""
    if not isinstance(policy, dict):
        raise SpecError(f"spec {src}: [policy] must be a table", path=src)
    _check_keys(policy, {"allow_pickle", "allow_code"}, "[policy]", src)
    allow_pickle = _typed(policy, "allow_pickle", bool, "policy", src, default=False)
    allow_code = _typed(policy, "allow_code", bool, "policy", src, default=False)
    return allow_pickle, allow_code


def _wheels_table(w: object, base: Path, src: str) -> WheelSpec:
    """[wheels]: requirements (inline or a file beside the spec) and the target platform."""
    if not isinstance(w, dict):
        raise SpecError(f"spec {src}: [wheels] must be a table", path=src)
    _check_keys(
        w,
        {"requirements", "requirements_file", "python_version", "platforms", "implementation", "abi",
         "index_url", "extra_index_urls", "find_links", "no_index"},
        "[wheels]",
        src,
    )
    reqs = _str_tuple(w.get("requirements"), "wheels.requirements", src)
    rfile = _typed(w, "requirements_file", str, "wheels", src)
    if not reqs and rfile is None:
        raise SpecError(f"spec {src}: [wheels] needs requirements or requirements_file", path=src)
    find_links = tuple(
        fl if "://" in fl else str(base / fl) for fl in _str_tuple(w.get("find_links"), "wheels.find_links", src)
    )
    return WheelSpec(
        requirements=reqs,
        requirements_file=(base / rfile) if rfile else None,
        python_version=_typed(w, "python_version", str, "wheels", src, default="3.11"),
        platforms=_str_tuple(w.get("platforms"), "wheels.platforms", src) or ("manylinux_2_28_x86_64",),
        implementation=_typed(w, "implementation", str, "wheels", src, default="cp"),
        abi=_str_tuple(w.get("abi"), "wheels.abi", src),
        index_url=_typed(w, "index_url", str, "wheels", src),
        extra_index_urls=_str_tuple(w.get("extra_index_urls"), "wheels.extra_index_urls", src),
        find_links=find_links,
        no_index=_typed(w, "no_index", bool, "wheels", src, default=False),
        named=frozenset(k for k in ("python_version", "platforms", "implementation", "abi") if k in w),
    )


def _targets(tdoc: object, src: str) -> tuple[TargetSpec, ...]:
    if not isinstance(tdoc, list):
        raise SpecError(f"spec {src}: [[targets]] must be an array of tables", path=src)
    return tuple(_target(t, f"targets[{i}]", src) for i, t in enumerate(tdoc))


def _target(t: object, where: str, src: str) -> TargetSpec:
    """One [[targets]] entry: a GPU name, how many, and the run to check the fit for."""
    if not isinstance(t, dict):
        raise SpecError(f"spec {src}: {where} must be a table", path=src)
    _check_keys(t, {"gpu", "count", "context", "runtime", "batch"}, where, src)
    gpu = _typed(t, "gpu", str, where, src)
    if not gpu:
        raise SpecError(f"spec {src}: {where}.gpu is required", path=src)
    count = _typed(t, "count", int, where, src, default=1)
    batch = _typed(t, "batch", int, where, src, default=1)
    context = _typed(t, "context", int, where, src)
    runtime = _typed(t, "runtime", str, where, src, default="vllm")
    if count < 1 or batch < 1 or (context is not None and context < 1):
        raise SpecError(f"spec {src}: {where}: count, batch and context must be positive", path=src)
    if runtime not in RUNTIMES:  # the runtimes the fit estimate models (as ``airpack fit --runtime``); not llama.cpp yet
        raise SpecError(f"spec {src}: {where}.runtime must be one of {', '.join(RUNTIMES)} (got {runtime!r})", path=src)
    return TargetSpec(gpu=gpu, count=count, context=context, runtime=runtime, batch=batch)
