"""``airpack fit``: will this model run on these GPUs, and at what context length?

MODEL is a model folder (config.json + safetensors), a bundle folder (every
model it carries), or the repo id of a model installed in a registry. Only
config.json and the safetensors headers are read; no tensor is loaded. GPUs
come from ``--gpu`` (catalog name or size, ``:COUNT``) or from NVML.

``estimate_bundle`` is install's gate (``check_bundle_fit`` runs it on a
``VerifiedBundle``): it estimates every model of a bundle on the given (or
detected) GPUs and raises ``FitError`` (exit 5) naming the model, the GPUs and
the numbers when one does not fit.

A refusal leads with the real reason (what the run needs against what the
GPUs give) and its hint says what would make it fit, each suggestion checked
by estimating again (``suggest``): a higher ``--gpu-memory-utilization``, more
GPUs, a shorter ``--context``. A context beyond the model's own maximum is no
fit question at all: ``ContextTooLongError`` (exit 2).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from .. import content
from .._fs import check_relpath, open_regular_nofollow
from .._json import StrictJSONError, loads_strict
from ..errors import ContextTooLongError, FitError, IntegrityError, ModelConfigError, UsageError
from ..gpus import MAX_COUNT, parse_gpu, resolve_gpus, try_detect
from ..manifest import ENVELOPE_NAME, Manifest, ModelEntry
from ..registry import Registry
from ..safetensors_check import SafetensorsInfo, TensorInfo, read_header_fd
from ..sources import DirSource, open_source
from ..trust import TrustPolicy
from ..units import format_bytes
from ..vram import (
    CUDA_CONTEXT_BYTES,
    LIBRARY_BYTES,
    FitResult,
    GpuBudget,
    ModelShape,
    RunConfig,
    Weights,
    collect_weights,
    fit,
    model_shape,
    parse_utilization,
    verdict_for,
)
from ..vram_trace import TraceResult, trace_generate
from .verify import VerifiedBundle, read_unverified, verify_source

MAX_CONFIG_BYTES = 16 << 20
MAX_INDEX_BYTES = 64 << 20
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_RUNTIME = "vllm"
GiB = 1 << 30


@dataclass(frozen=True, kw_only=True)
class FitOptions:
    """What ``airpack fit`` was asked. ``gpu`` None means the GPUs NVML sees on this host."""

    model: str
    gpu: str | None = None
    context: int | None = None
    batch: int = 1
    new_tokens: int = 256
    runtime: str = DEFAULT_RUNTIME
    kv_dtype: str = "auto"
    gpu_memory_utilization: str = "0.9"
    registry: Path | None = None
    policy: TrustPolicy | None = None  # a tar or parts folder is verified as it streams, so it needs one
    trace: bool = False  # also run transformers' generate() under the memory trace (needs torch; transformers only)


@dataclass(frozen=True)
class ModelSource:
    """A model as the estimator sees it: its config and its tensors' headers."""

    name: str
    kind: str  # "folder", "bundle", "registry" or "hub"
    location: str
    config: dict[str, Any] = field(repr=False)
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    hub: dict[str, Any] | None = None  # for a model read from the Hub: endpoint, repo, revision, commit, what was read


@dataclass(frozen=True)
class FitReport:
    """One model on one set of GPUs."""

    model: str
    location: str
    shape: ModelShape
    weights: Weights
    result: FitResult
    suggestions: tuple[str, ...] = ()  # when it does not fit: what would, each checked by estimating again
    utilization: str = "0.9"  # vLLM's share of each GPU the estimate used, as given
    trace: TracedFit | None = None  # the trace's measurement, when asked for (its verdict is the report's)
    hub: dict[str, Any] | None = None  # the source's Hub record, for a model read from the Hub before downloading

    def to_json(self) -> dict[str, Any]:
        """Integers, strings, lists and objects only: it goes into manifests and audit lines."""
        r = self.result
        est = r.estimate
        gpu: dict[str, Any] = {"name": r.gpu.name, "count": r.gpu.count, "memory_bytes": r.gpu.memory_bytes, "source": r.gpu.source}
        if r.gpu.free_bytes is not None:
            gpu["free_bytes"] = r.gpu.free_bytes
        out: dict[str, Any] = {
            "model": self.model,
            "repo_id": self.model,
            "location": self.location,
            "architecture": self.shape.describe(),
            "runtime": est.runtime,
            "verdict": r.verdict,
            "per_gpu_bytes": r.per_gpu_bytes,
            "limit_bytes": r.limit_bytes,
            "headroom_bytes": r.headroom_bytes,
            "breakdown": est.breakdown.to_json(),
            "overhead_detail": est.overhead.to_json(),
            "peak_reserved_bytes": est.peak_reserved_bytes or r.per_gpu_bytes,
            "gpu": gpu,
            "context": est.context,
            "batch": est.batch,
            "prompt_tokens": est.prompt_tokens,
            "new_tokens": est.new_tokens,
            "kv_dtype": est.kv_dtype,
            "kv_bytes_per_token": est.kv_bytes_per_token,
            "max_context": r.max_context,
            "model_max_context": r.model_max_context,
            "weights_total_bytes": self.weights.total_bytes,
            "parameters": self.weights.parameters,
            "notes": list(r.notes),
        }
        if est.runtime == "vllm":
            out["kv_pool_bytes"] = r.kv_pool_bytes
            out["kv_token_capacity"] = r.kv_token_capacity
            out["max_concurrency"] = r.max_concurrency
        if self.weights.quantization:
            out["quantization"] = self.weights.quantization
        if self.hub is not None:
            out["hub"] = dict(self.hub)
        if self.trace is not None:
            out["estimate_verdict"] = self.trace.estimate_verdict
            out["estimate_per_gpu_bytes"] = self.trace.estimate_bytes
            out["trace"] = self.trace.to_json()
        return out


@dataclass(frozen=True)
class TracedFit:
    """The trace of one model at the estimate's batch, prompt and new tokens, and what it says about the fit.

    ``per_gpu_bytes`` is what must fit: the most the allocator holds at once in segments
    with a live block (``peak_in_use``; on a GPU with room it also keeps idle segments and
    NVML shows ``peak_reserved``, but it gives those back before failing) plus the CUDA
    context and the libraries (cuBLAS handles, kernels) that live outside the allocator.
    """

    result: TraceResult
    per_gpu_bytes: int
    limit_bytes: int
    verdict: str
    estimate_verdict: str
    estimate_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {**self.result.to_json(), "per_gpu_bytes": self.per_gpu_bytes, "limit_bytes": self.limit_bytes,
                "verdict": self.verdict, "outside_allocator_bytes": CUDA_CONTEXT_BYTES + LIBRARY_BYTES}


# -- reading a model --------------------------------------------------------------------------


def _parse_json(data: bytes, what: str, display: str) -> Any:
    try:
        return loads_strict(data, allow_floats=True, max_depth=32)
    except StrictJSONError as e:
        raise ModelConfigError(f"{display}: {what} is not valid JSON ({e})", path=display) from None


def parse_config(data: bytes, display: str) -> dict[str, Any]:
    cfg = _parse_json(data, "config.json", display)
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{display} is not a JSON object", path=display)
    return cfg


def select_weight_files(names: Iterable[str], read_index: Callable[[], bytes] | None) -> list[str]:
    """Which safetensors files a loader reads, as paths relative to the model folder.

    The index's weight map when there is one (repos like Mistral's also ship a
    ``consolidated.safetensors`` the loaders ignore), else ``model.safetensors``,
    else every top-level ``*.safetensors``.
    """
    present = sorted(n for n in names if content.is_safetensors(n))
    top = [n for n in present if "/" not in n]
    if read_index is not None:
        idx = _parse_json(read_index(), INDEX_NAME, INDEX_NAME)
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise ModelConfigError(f"{INDEX_NAME} has no weight_map of file names", path=INDEX_NAME)
        wanted = sorted(set(wm.values()))
        for w in wanted:
            check_relpath(w)
        missing = [w for w in wanted if w not in present]
        if missing:
            raise ModelConfigError(f"{INDEX_NAME} names {missing[0]}, which is not there", path=missing[0])
        return wanted
    if "model.safetensors" in top:
        return ["model.safetensors"]
    if not top:
        raise ModelConfigError("no safetensors weights found (the estimator reads safetensors headers only)")
    rest = [n for n in top if not n.startswith("consolidated")]
    return rest or top


def _open_following(path: Path, display: str) -> int:
    """Open a file of the user's own model folder, following links (an HF cache snapshot is links)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ModelConfigError(f"{display} not found", path=display) from None
    except OSError as e:
        raise UsageError(f"cannot open {display}: {e.strerror}", path=display) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelConfigError(f"{display} is not a regular file", path=display)
    return fd


def _read_fd(fd: int, cap: int, display: str, what: str) -> bytes:
    with os.fdopen(fd, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise IntegrityError(f"{what} {display} is larger than the {cap}-byte limit", path=display)
    return data


def _header_of(fd: int, display: str) -> SafetensorsInfo:
    try:
        return read_header_fd(fd, display=display)
    finally:
        os.close(fd)


def _assemble(name: str, kind: str, location: str, files: list[str], read: Callable[[str, int], bytes],
              header: Callable[[str], SafetensorsInfo]) -> ModelSource:
    """config.json, the shard index and the chosen headers, through ``read(rel, cap)`` and ``header(rel)``."""
    if "config.json" not in files:
        raise ModelConfigError(f"{location}: no config.json (the estimator needs the model's config)", path=location)
    cfg = parse_config(read("config.json", MAX_CONFIG_BYTES), f"{location}/config.json")
    read_index = (lambda: read(INDEX_NAME, MAX_INDEX_BYTES)) if INDEX_NAME in files else None
    tensors = [t for rel in select_weight_files(files, read_index) for t in header(rel).tensors]
    return ModelSource(name=name, kind=kind, location=location, config=cfg, tensors=tuple(tensors))


def _load_with(opener: Callable[[str], int], files: list[str], name: str, kind: str, location: str) -> ModelSource:
    """A model whose files ``opener(relpath) -> fd`` opens."""
    return _assemble(name, kind, location, files,
                     read=lambda rel, cap: _read_fd(opener(rel), cap, f"{location}/{rel}", "file"),
                     header=lambda rel: _header_of(opener(rel), f"{location}/{rel}"))


def _walk_files(root: Path) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root).as_posix()
        for fn in filenames:
            out.append(fn if rel == "." else f"{rel}/{fn}")
        if len(out) > 100_000:
            raise UsageError(f"{root} holds too many files to be a model folder", path=str(root))
    return out


def load_paths(paths: Mapping[str, Path], *, name: str, location: str) -> ModelSource:
    """A model made of the files ``paths`` names (relative path -> a regular file already checked): a pack plan's files."""
    def opener(rel: str) -> int:
        return open_regular_nofollow(paths[rel], display=f"{location}/{rel}")

    return _load_with(opener, sorted(paths), name, "folder", location)


def load_folder(path: Path, *, name: str | None = None) -> ModelSource:
    """A model folder of the user's (links followed: a Hugging Face cache snapshot is links)."""
    root = Path(path)
    files = _walk_files(root)
    return _load_with(lambda rel: _open_following(root.joinpath(*rel.split("/")), f"{root}/{rel}"), files,
                      name or root.name, "folder", str(root))


def load_bundle(path: Path) -> list[ModelSource]:
    """Every model of a bundle folder, read as it is on disk (not verified: `airpack verify` proves it)."""
    b = DirSource(Path(path))
    m = read_unverified(b).manifest
    out = []
    for model in m.models:
        pre = model.prefix + "/"
        files = [f.path[len(pre):] for f in m.model_files(model)]

        def opener(rel: str, pre: str = pre) -> int:
            full = pre + rel
            try:
                return open_regular_nofollow(b.path_of(full), display=full)
            except FileNotFoundError:
                raise IntegrityError(f"bundle file {full} is missing", path=full) from None

        out.append(_load_with(opener, files, model.repo_id, "bundle", f"{b.folder}/{model.prefix}"))
    return out


def _registry_snapshot(registry: Path, repo_id: str) -> tuple[Path, Path]:
    """(snapshot folder, repo folder) of an installed model, from the Hugging Face cache layout."""
    Registry.open(registry)  # refuses a folder that is not a registry, with its own named error
    repo_dir = registry / "hub" / ("models--" + repo_id.replace("/", "--"))
    if not repo_dir.is_dir() or repo_dir.is_symlink():
        raise UsageError(f"{repo_id} is not a folder, a bundle, or a model installed in {registry}", path=repo_id,
                         hint="`airpack list --registry DIR` shows what is installed.")
    commit = None
    ref = repo_dir / "refs" / "main"
    if ref.is_file() and not ref.is_symlink():
        commit = _read_fd(open_regular_nofollow(ref, display=str(ref)), 256, str(ref), "ref").decode("ascii", "replace").strip()
    snaps = repo_dir / "snapshots"
    if commit is None:
        found = sorted(p.name for p in snaps.iterdir()) if snaps.is_dir() else []
        if len(found) != 1:
            raise UsageError(f"{repo_id} in {registry}: no refs/main and {len(found)} snapshots; cannot tell which to use", path=str(repo_dir))
        commit = found[0]
    snap = snaps / commit
    if not commit.isalnum() or not snap.is_dir() or snap.is_symlink():
        raise UsageError(f"{repo_id} in {registry}: snapshot {commit} is missing", path=str(snap))
    return snap, repo_dir


def load_registry(registry: Path, repo_id: str) -> ModelSource:
    """An installed model: snapshot links are resolved and must land in the repo's own blobs."""
    snap, repo_dir = _registry_snapshot(registry, repo_id)
    blobs = (repo_dir / "blobs").resolve()

    def opener(rel: str) -> int:
        p = snap.joinpath(*rel.split("/"))
        real = p.resolve()
        if real != p and blobs not in real.parents:
            raise IntegrityError(f"{repo_id}: {rel} links outside the repo's blobs", path=str(p))
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise IntegrityError(f"{repo_id}: cannot open {rel}: {e.strerror}", path=str(p)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise IntegrityError(f"{repo_id}: {rel} is not a regular file", path=str(p))
        return fd

    files = _walk_files(snap)
    return _load_with(opener, files, repo_id, "registry", f"{repo_id} ({snap})")


def load_models(model: str, registry: Path | None, policy: TrustPolicy | None = None) -> list[ModelSource]:
    """MODEL as a bundle (folder, tar or parts folder), a model folder, or an installed repo id."""
    p = Path(model)
    if p.is_dir():
        if (p / ENVELOPE_NAME).exists():
            return load_bundle(p)
        if any(p.glob("*.index.dsse.json")):
            return load_stream(p, policy)
        return [load_folder(p)]
    if p.is_file():
        return load_stream(p, policy)
    if p.exists():
        raise UsageError(f"{model} is not a folder or a tar (give a model folder, a bundle, or an installed repo id)", path=model)
    reg = registry or (Path(os.environ["AIRPACK_REGISTRY"]) if os.environ.get("AIRPACK_REGISTRY") else None)
    if reg is None:
        raise UsageError(f"{model} is not a folder; to fit an installed model pass --registry DIR (or set AIRPACK_REGISTRY)", path=model)
    return [load_registry(reg, model)]


# A Hub repo id as `airpack fit` takes it: ORG/NAME, then an optional @REVISION (a branch, tag or commit).
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9_.-]{1,96})(?:@(?P<rev>[^\s@]{1,255}))?$")


def hub_id(model: str) -> tuple[str, str] | None:
    """(repo id, revision) when MODEL is written as a Hub repo id (``ORG/NAME[@REVISION]``, revision ``main`` by default)."""
    m = HUB_ID.match(model)
    if m is None or m.group("repo").endswith((".", "/")) or ".." in m.group("repo"):
        return None
    return m.group("repo"), m.group("rev") or "main"


def model_kind(model: str, *, registry: Path | None, hub: bool) -> str:
    """Where MODEL is: ``"path"`` (on disk), ``"registry"`` (installed) or ``"hub"`` (read there before downloading).

    The rule, in order, so an offline host never reaches the network by accident:

    1. a path that exists is a path (``hub``, an explicit ``--endpoint`` or ``--token-file``, with one is exit 2:
       the words name both a local folder and a Hub repo);
    2. with ``hub`` asked for, an ``ORG/NAME[@REVISION]`` is a Hub id (``--registry`` too is exit 2);
    3. with a registry (``--registry`` or ``AIRPACK_REGISTRY``), an installed repo id (an ``@REVISION`` is exit 2:
       the registry holds the installed commit);
    4. otherwise an ``ORG/NAME[@REVISION]`` is a Hub id on the default endpoint (``HF_ENDPOINT`` or the public Hub);
       anything else is exit 2.
    """
    p = Path(model)
    ident = hub_id(model)
    if p.exists() or p.is_symlink():
        if hub:
            raise UsageError(
                f"{model} is a local path, but --endpoint/--token-file ask for the Hub: which one is meant is ambiguous",
                path=model, hint=f"Drop --endpoint/--token-file to fit the local {model}, or run from a folder that holds "
                                 "no such path to fit the Hub's repo.")
        return "path"
    if hub:
        if ident is None:
            raise UsageError(f"{model} is not a local path nor a Hub repo id (ORG/NAME[@REVISION])", path=model)
        if registry is not None:
            raise UsageError(f"{model}: --registry names an installed model and --endpoint/--token-file the Hub; give one",
                             path=model, hint="Drop --registry to read the Hub's repo, or drop --endpoint/--token-file.")
        return "hub"
    if registry is not None:
        if ident is not None and "@" in model:
            raise UsageError(f"{model}: an installed model has no @REVISION (the registry holds the commit it installed)",
                             path=model, hint="Drop @REVISION, or pass --endpoint URL to read that revision from the Hub.")
        return "registry"
    if ident is not None:
        return "hub"
    raise UsageError(f"{model} is not a folder or a Hub repo id (ORG/NAME[@REVISION]); to fit an installed model pass "
                     "--registry DIR (or set AIRPACK_REGISTRY)", path=model)


class RemoteModel(Protocol):
    """A model whose files something else reads (``fetch.hub_meta.HubModelReader``): ops.fit never reaches the network."""

    @property
    def repo_id(self) -> str: ...

    @property
    def location(self) -> str: ...

    @property
    def files(self) -> list[str]: ...

    def read(self, rel: str, cap: int) -> bytes: ...

    def header(self, rel: str) -> SafetensorsInfo: ...


def load_remote(remote: RemoteModel, *, files: list[str] | None = None,
                prefetch: Callable[[list[str]], object] | None = None) -> ModelSource:
    """A model from a remote reader: config.json, the shard index and the chosen headers, as a folder's are chosen.

    ``files`` narrows the repo's files (a pack's include/exclude); ``prefetch(weight files)`` may read
    the headers ahead (a few at once) before they are taken one by one.
    """
    files = remote.files if files is None else files
    if prefetch is not None and "config.json" in files:
        read_index = (lambda: remote.read(INDEX_NAME, MAX_INDEX_BYTES)) if INDEX_NAME in files else None
        prefetch(select_weight_files(files, read_index))
    return _assemble(remote.repo_id, "hub", remote.location, files, read=remote.read, header=remote.header)


# -- estimating -------------------------------------------------------------------------------------


def check_traceable(run: RunConfig, gpu: GpuBudget) -> None:
    """The trace runs transformers' generate() in one process on one GPU: anything else is refused (exit 2)."""
    if run.runtime != "transformers":
        raise UsageError("--trace runs transformers' generate(); vLLM cannot be traced this way",
                         hint="Pass --runtime transformers with --trace, or fit vLLM without --trace (its figures follow vLLM's own accounting).")
    if gpu.count != 1:
        raise UsageError(f"--trace measures one GPU; {gpu.count} GPUs under tensor parallelism are estimated, not traced",
                         hint="Trace with one GPU (--gpu NAME:1), or fit without --trace.")


def trace_fit(src: ModelSource, report: FitReport, gpu: GpuBudget) -> FitReport:
    """Run the trace at the report's batch, prompt and new tokens; its verdict becomes the report's."""
    est = report.result.estimate
    res = trace_generate(src.config, batch=est.batch, prompt=est.prompt_tokens, new_tokens=est.new_tokens)
    total = res.peak_in_use + CUDA_CONTEXT_BYTES + LIBRARY_BYTES  # what must fit (cached idle segments are given back)
    limit = report.result.limit_bytes
    verdict = verdict_for(total, limit)
    traced = TracedFit(result=res, per_gpu_bytes=total, limit_bytes=limit, verdict=verdict,
                       estimate_verdict=report.result.verdict, estimate_bytes=report.result.per_gpu_bytes)
    note = (f"traced with torch {res.torch_version}, transformers {res.transformers_version}: peak allocated "
            f"{format_bytes(res.peak_allocated)}, reserved {format_bytes(res.peak_reserved)} (in use at most "
            f"{format_bytes(res.peak_in_use)}), footprint {format_bytes(total)} "
            f"(the verdict is the trace's; the longest context is the estimate's)")
    result = replace(report.result, verdict=verdict, notes=(*report.result.notes, note))
    return replace(report, result=result, trace=traced)


def model_of(src: ModelSource, context: int | None) -> tuple[ModelShape, Weights]:
    """The shape and weights of a model read from its config and headers; refused when its files hold no tensors or
    ``context`` is beyond its maximum (the estimate and the plan both start here)."""
    probe = collect_weights(src.tensors)
    shape = model_shape(src.config, weights_dtype=probe.float_dtype)
    weights = collect_weights(src.tensors, shape=shape)
    if not weights.tensors:
        raise ModelConfigError(f"{src.location}: the safetensors files hold no tensors", path=src.location)
    check_context(src, shape, context)
    return shape, weights


def estimate_source(src: ModelSource, run: RunConfig, gpu: GpuBudget, *, trace: bool = False) -> FitReport:
    """The estimate and verdict for one model on ``gpu``; a context beyond the model's maximum is refused first.

    With ``trace`` the trace's verdict is the report's, and what would fit is suggested for that verdict."""
    shape, weights = model_of(src, run.context)
    run = replace(run, tensor_parallel=gpu.count)
    report = FitReport(model=src.name, location=src.location, shape=shape, weights=weights, result=fit(shape, weights, run, gpu),
                       suggestions=(), utilization=str(parse_utilization(run.gpu_memory_utilization)), hub=src.hub)
    if trace:
        report = trace_fit(src, report, gpu)
    if report.result.verdict != "does_not_fit":
        return report
    return replace(report, suggestions=suggest(shape, weights, run, gpu, report.result))


_ASSUMED_MAX = "config.json gives no max_position_embeddings"  # the start of vram.model_shape's note when it guesses
_SCALED_ROPE = ("linear", "dynamic", "yarn")  # rope scaling types that stretch max_position_embeddings by their factor


def context_limit(config: Mapping[str, Any], shape: ModelShape) -> int | None:
    """The longest context the model itself allows, or None when config.json does not say (the estimator assumed one).

    ``max_position_embeddings``, times the factor of a ``rope_scaling`` that stretches it (linear,
    dynamic, YaRN), as vLLM derives its ``max_model_len``.
    """
    if any(n.startswith(_ASSUMED_MAX) for n in shape.notes):
        return None
    limit = shape.max_context
    rs = config.get("rope_scaling")
    if isinstance(rs, dict):
        kind, factor = rs.get("rope_type", rs.get("type")), rs.get("factor")
        if kind in _SCALED_ROPE and isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 1:
            limit = int(limit * factor)
    return limit


def check_context(src: ModelSource, shape: ModelShape, context: int | None) -> None:
    """Refuse (exit 2) a context the model cannot run at, whatever the GPUs: it is never "fits"."""
    limit = context_limit(src.config, shape)
    if context is None or limit is None or context <= limit:
        return
    raise ContextTooLongError(
        f"{src.name}: context {context:,} tokens is beyond the model's maximum of {limit:,} "
        "(max_position_embeddings in its config.json)", path=src.location,
        hint=f"Ask for --context {limit} or less, or leave --context out to fit the model's maximum.")


_MORE_GPUS = (2, 4, 8, 16, 32, 64)
_UTILIZATIONS = tuple(Decimal(n) / 100 for n in range(5, 101, 5))  # 0.05 .. 1: the smallest change that fits is suggested


def _gpu_flag(gpu: GpuBudget, count: int) -> str:
    """How to ask for ``count`` of these GPUs on the command line."""
    if gpu.source == "catalog":
        return f"{count} x {gpu.name} (--gpu {gpu.name}:{count})"
    if gpu.source == "size":
        return f"{count} x {gpu.name} (--gpu {gpu.name.removesuffix(' GPU')}:{count})"
    return f"{count} such GPUs"


def suggest(shape: ModelShape, weights: Weights, run: RunConfig, gpu: GpuBudget, result: FitResult) -> tuple[str, ...]:
    """What would make a run that does not fit fit, each one estimated again (a pure computation, no guess).

    A higher ``--gpu-memory-utilization`` (vLLM), the fewest more GPUs of the same kind, a
    shorter ``--context`` (the longest that fits), ``--batch 1``.
    """
    def fits(r: RunConfig, g: GpuBudget) -> bool:
        return fit(shape, weights, r, g).verdict != "does_not_fit"

    tips: list[str] = []
    if run.runtime == "vllm":
        # Higher first (more room for the KV cache); lower when vLLM could not start (the budget is not free).
        util = parse_utilization(run.gpu_memory_utilization)
        tries = [u for u in _UTILIZATIONS if u > util] + [u for u in reversed(_UTILIZATIONS) if u < util]
        other = next((u for u in tries if fits(replace(run, gpu_memory_utilization=str(u)), gpu)), None)
        if other is not None:
            tips.append(f"--gpu-memory-utilization {other}")
    n = next((n for n in _MORE_GPUS if gpu.count < n <= MAX_COUNT and (run.runtime != "vllm" or shape.num_heads % n == 0)
              and fits(replace(run, tensor_parallel=n), replace(gpu, count=n))), None)
    if n is not None:
        tips.append(_gpu_flag(gpu, n))
    if result.max_context:
        tips.append(f"--context {result.max_context} or shorter")
    if run.batch > 1 and fits(replace(run, batch=1), gpu):
        tips.append("--batch 1")
    return tuple(tips)


def run_config(*, runtime: str | None, context: int | None, batch: int = 1, new_tokens: int = 256, kv_dtype: str = "auto",
               gpu_memory_utilization: str = "0.9", count: int = 1) -> RunConfig:
    return RunConfig(runtime=runtime or DEFAULT_RUNTIME, context=context, batch=batch, new_tokens=new_tokens, kv_dtype=kv_dtype,
                     gpu_memory_utilization=gpu_memory_utilization, tensor_parallel=count)


def fit_model(opts: FitOptions, sources: list[ModelSource] | None = None) -> list[FitReport]:
    """``airpack fit``: one report per model (a bundle may carry several); ``sources`` already read (from the Hub)."""
    gpu = resolve_gpus(opts.gpu)
    run = run_config(runtime=opts.runtime, context=opts.context, batch=opts.batch, new_tokens=opts.new_tokens,
                     kv_dtype=opts.kv_dtype, gpu_memory_utilization=opts.gpu_memory_utilization, count=gpu.count)
    if opts.trace:
        check_traceable(run, gpu)
    if sources is None:
        sources = load_models(opts.model, opts.registry, opts.policy)
    return [estimate_source(src, run, gpu, trace=opts.trace) for src in sources]


_STARTUP = "vLLM refuses to start"  # the start of vram.fit's note when vLLM's budget is not free on the GPUs


def fit_error(report: FitReport, *, install: bool = False) -> FitError:
    """The one-line refusal, leading with the reason; the hint says what would fit (``--ignore-fit`` only for install).

    The reason is what the run needs per GPU against what the GPUs give (at vLLM's
    ``--gpu-memory-utilization``), or, when vLLM could not even start, that; then the longest
    context that fits and the breakdown.
    """
    r = report.result
    est = r.estimate
    b = est.breakdown
    startup = next((n for n in r.notes if n.startswith(_STARTUP)), None)
    if est.runtime == "vllm":
        given = f"with --gpu-memory-utilization {report.utilization} {format_bytes(r.limit_bytes)} is usable per GPU"
    else:
        free = f" ({format_bytes(r.gpu.free_bytes)} free now)" if r.gpu.free_bytes is not None else ""
        given = f"{format_bytes(r.limit_bytes)} is usable per GPU{free}"
    needs = r.per_gpu_bytes if report.trace is None else report.trace.per_gpu_bytes
    how = "" if report.trace is None else " (traced)"
    reason = (startup if startup is not None else
              f"it needs {format_bytes(needs)} per GPU{how} at context {est.context} x batch {est.batch}, but {given}")
    ctx = (f"; the longest context that fits is {r.max_context} tokens" if r.max_context
           else "; it does not fit at any context length")
    tips = list(report.suggestions)
    hint = ("Try " + ", or ".join(tips) + "." if tips else
            "Use larger GPUs, or a smaller (quantized) model: no count of these GPUs or shorter context fits.")
    if install:
        hint += " Or pass --ignore-fit if you know better."
    return FitError(
        f"{report.model} does not fit {r.gpu.count} x {r.gpu.name} ({est.runtime}): {reason}{ctx} "
        f"(weights {format_bytes(b.weights)}, KV cache {format_bytes(b.kv_cache)}, activations {format_bytes(b.activations)}, "
        f"overhead {format_bytes(b.overhead)})",
        path=report.location, hint=hint,
    )



# -- install's gate and pack's record ----------------------------------------------------------------


def keep_for_fit(path: str) -> bool:
    """The small files the estimator reads besides the headers: a bundle streamed past keeps them in memory."""
    return path.rsplit("/", 1)[-1] in ("config.json", INDEX_NAME)


def bundle_reader(root: Path | None, kept: Mapping[str, bytes]) -> Callable[[str, int], bytes]:
    """``read(path, cap)`` over a bundle's verified small files: kept in memory, else read from its folder."""

    def read(path: str, cap: int) -> bytes:
        if path in kept:
            data = kept[path]
            if len(data) > cap:
                raise ModelConfigError(f"{path} is larger than {cap} bytes", path=path)
            return data
        if root is None:
            raise ModelConfigError(f"{path} was not kept while the bundle streamed past", path=path)
        return _read_fd(open_regular_nofollow(root.joinpath(*path.split("/")), display=path), cap, path, "file")

    return read


def _bundle_model(manifest: Manifest, model: ModelEntry, *, headers: Mapping[str, SafetensorsInfo],
                  read: Callable[[str, int], bytes], location: str) -> ModelSource:
    """A verified bundle's model: small files through ``read(path, cap)``, headers as the pipeline parsed them."""
    pre = model.prefix + "/"

    def header(rel: str) -> SafetensorsInfo:
        info = headers.get(pre + rel)
        if info is None:
            raise ModelConfigError(f"no verified safetensors header for {pre + rel}", path=pre + rel)
        return info

    files = [f.path[len(pre):] for f in manifest.model_files(model)]
    return _assemble(model.repo_id, "bundle", f"{location}/{model.prefix}", files, read=lambda rel, cap: read(pre + rel, cap),
                     header=header)


def verified_models(verified: VerifiedBundle) -> list[ModelSource]:
    """Every model of a verified bundle, from the headers and small files the pipeline verified (the report's fit pictures).

    A stream keeps its small files only when it was verified with ``keep=keep_for_fit``.
    """
    read = bundle_reader(verified.source.root, verified.kept)
    return [_bundle_model(verified.manifest, m, headers=verified.headers, read=read, location=verified.source.label)
            for m in verified.manifest.models]


def load_stream(path: Path, policy: TrustPolicy | None) -> list[ModelSource]:
    """Every model of a bundle tar or parts folder, verified in one streaming pass (nothing is extracted to disk)."""
    if policy is None:
        raise UsageError(f"{path} is a tar or parts folder: it is verified as it streams, so fit needs --trust POLICY",
                         path=str(path), hint="Pass --trust POLICY (or set AIRPACK_TRUST), or fit the bundle folder instead.")
    vb = verify_source(open_source(path, policy=policy), policy, keep=keep_for_fit)
    read = bundle_reader(None, vb.kept)
    return [_bundle_model(vb.manifest, m, headers=vb.headers, read=read, location=str(path)) for m in vb.manifest.models]


def _unknown(model: str, why: str) -> dict[str, Any]:
    return {"model": model, "repo_id": model, "verdict": "unknown", "reason": why[:500]}


def check_bundle_fit(verified: VerifiedBundle, *, gpu: str | None, context: int | None, runtime: str | None,
                     ignore: bool, trace: bool = False) -> list[dict[str, Any]]:
    """Install's gate on a verified bundle: ``estimate_bundle`` over the headers and small files the pipeline verified."""
    return estimate_bundle(verified.manifest, headers=verified.headers, read=bundle_reader(verified.source.root, verified.kept),
                           location=verified.source.label, gpu=gpu, context=context, runtime=runtime, ignore=ignore,
                           trace=trace)


def estimate_bundle(manifest: Manifest, *, headers: Mapping[str, SafetensorsInfo], read: Callable[[str, int], bytes],
                    location: str, gpu: str | None, context: int | None, runtime: str | None, ignore: bool,
                    trace: bool = False) -> list[dict[str, Any]]:
    """Estimate every model of a bundle on ``gpu`` (or the GPUs NVML finds).

    Returns one JSON-able report per model (integers and strings only), or []
    when no GPU is given and none is detected. Raises ``FitError`` (exit 5)
    for the first model that does not fit, unless ``ignore``. A model the
    estimator cannot read (no config.json, no safetensors) is reported with
    verdict ``unknown`` and never blocks an install.
    """
    budget = try_detect() if gpu is None or gpu.strip().lower() in ("", "auto") else resolve_gpus(gpu)
    if budget is None:
        return []
    run = run_config(runtime=runtime or ("transformers" if trace else None), context=context, count=budget.count)
    if trace:
        check_traceable(run, budget)
    reports: list[dict[str, Any]] = []
    refusal: FitError | None = None
    for model in manifest.models:
        try:
            rep = estimate_source(_bundle_model(manifest, model, headers=headers, read=read, location=location), run, budget,
                                  trace=trace)
        except (ModelConfigError, IntegrityError) as e:
            reports.append(_unknown(model.repo_id, e.message))
            continue
        reports.append(rep.to_json())
        if rep.result.verdict == "does_not_fit" and refusal is None:
            refusal = fit_error(rep, install=True)
    if refusal is not None and not ignore:
        raise refusal
    return reports


def estimate_target(out: Path, prefix: str, repo_id: str, *, gpu: str, count: int, context: int | None, runtime: str,
                    batch: int, files: Iterable[str] | None = None) -> dict[str, Any]:
    """The estimate pack records for one spec target and one packed model (integers and strings only).

    ``files`` are the bundle paths pack wrote (so leftovers of an interrupted
    pack are never counted); a model the estimator cannot read, or a runtime
    it does not model, is recorded with verdict ``unknown`` and the reason.
    """
    root = Path(out).joinpath(*prefix.split("/"))
    pre = prefix + "/"
    rels = [f[len(pre):] for f in files if f.startswith(pre)] if files is not None else _walk_files(root)

    def opener(rel: str) -> int:
        return open_regular_nofollow(root.joinpath(*rel.split("/")), display=pre + rel)

    return estimate_target_source(lambda: _load_with(opener, rels, repo_id, "bundle", prefix), repo_id, gpu=gpu, count=count,
                                  context=context, runtime=runtime, batch=batch)


def estimate_target_source(load: Callable[[], ModelSource], repo_id: str, *, gpu: str, count: int, context: int | None,
                           runtime: str, batch: int) -> dict[str, Any]:
    """One spec target's estimate for the model ``load()`` reads: pack's record, and ``pack --dry-run``'s answer.

    A model the estimator cannot read, or a runtime it does not model, gets verdict
    ``unknown`` and the reason (never "fits" on a guess); a fetch error propagates.
    """
    budget = parse_gpu(gpu, count=count)
    try:
        run = run_config(runtime=runtime, context=context, batch=batch, count=budget.count)
    except UsageError as e:
        return _unknown(repo_id, e.message)
    try:
        rep = estimate_source(load(), run, budget)
    except (ModelConfigError, IntegrityError) as e:
        return _unknown(repo_id, e.message)
    j = rep.to_json()
    keep = ("model", "verdict", "per_gpu_bytes", "limit_bytes", "breakdown", "max_context", "context", "batch", "runtime",
            "kv_bytes_per_token", "kv_pool_bytes", "kv_token_capacity", "model_max_context")
    est = {k: j[k] for k in keep if k in j}
    est["gpu"] = {"name": budget.name, "count": budget.count, "memory_bytes": budget.memory_bytes}
    return est


def worst_estimate(estimates: list[dict[str, Any]]) -> dict[str, Any]:
    """The estimate that decides a target: does not fit, then tight, then the largest."""
    order = {"does_not_fit": 0, "tight": 1, "unknown": 2, "fits": 3}
    return min(estimates, key=lambda d: (order.get(str(d.get("verdict")), 4), -int(d.get("per_gpu_bytes", 0))))


def report_json(reports: list[FitReport]) -> dict[str, Any]:
    """``airpack fit --json``: the model's report; with several models, the worst at the top and all under ``models``."""
    docs = [r.to_json() for r in reports]
    out = dict(worst_estimate(docs))
    if len(docs) > 1:
        out["models"] = docs
    return out
