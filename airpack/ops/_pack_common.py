"""What every source of a pack shares: its options, the planned files, copying into the bundle, the model record.

``ops/pack`` (local folders), ``_pack_hub`` (the Hugging Face Hub) and
``_pack_wheels`` (pip) all build on this module; it imports none of them.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import content
from .._fs import oserror_to_airpack
from .._json import StrictJSONError, loads_strict
from ..download_defaults import (
    DEFAULT_CONNECTIONS,
    DEFAULT_RETRIES,
    DEFAULT_RETRY_BASE,
    DEFAULT_SEGMENT,
    DEFAULT_TIMEOUT,
    MAX_WAIT,
)
from ..errors import (
    AirpackError,
    IntegrityError,
    MalformedSafetensorsError,
    MalformedWeightsError,
    UnsafePathError,
    UsageError,
)
from ..formats import SNIFF_BYTES, Risk
from ..hashing import copy_and_hash
from ..host_profile import HostProfile
from ..manifest import FileEntry
from ..progress import NULL_PROGRESS, Progress
from ..safetensors_check import read_header, summarize
from ..signing import Signer
from ..spec import PackSpec

STAGING_DIR = ".airpack-staging"  # partial downloads of an unfinished pack; removed before signing
PICKLE_DUPLICATE = "pickled weights left out: the model has safetensors weights"
CONFIG_SUMMARY_KEYS = (
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
    "torch_dtype", "dtype", "tie_word_embeddings", "sliding_window", "num_experts", "num_local_experts",
    "n_routed_experts", "num_experts_per_tok", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
    "qk_nope_head_dim", "v_head_dim",
)


@dataclass(frozen=True, kw_only=True)
class PackOptions:
    spec: PackSpec
    out: Path
    signer: Signer | None
    dry_run: bool = False
    allow_expired: bool = False
    endpoint: str | None = None
    token: str | None = None
    now: dt.datetime | None = None
    workers: int | None = None  # local copying and hashing threads (None: by CPU count)
    # The Hub: one budget of HTTP connections shared by every file of a model, whatever the CPUs
    # (``pack --connections``, ``AIRPACK_CONNECTIONS``); ranges of at most ``segment_size`` bytes;
    # ``retries`` per range with exponential backoff from ``retry_base`` seconds, a server's
    # Retry-After/RateLimit wait capped at ``max_retry_wait``; ``timeout`` per connect/read.
    # The defaults are the engine's own (download_defaults.py), so the two cannot drift apart.
    connections: int = DEFAULT_CONNECTIONS
    segment_size: int = DEFAULT_SEGMENT
    retries: int = DEFAULT_RETRIES
    retry_base: float = DEFAULT_RETRY_BASE
    max_retry_wait: float = MAX_WAIT
    timeout: float = DEFAULT_TIMEOUT
    xet: bool = True  # Xet-backed files through huggingface_hub's Xet path when hf_xet is installed
    progress: Progress = NULL_PROGRESS
    profile: HostProfile | None = None  # ``pack --for``: a delta for this host (carry only what it lacks)

    def __post_init__(self) -> None:
        if not 1 <= self.connections <= 256:
            raise UsageError(f"connections must be between 1 and 256, not {self.connections}")
        if self.segment_size < 64 * 1024 or self.retries < 0 or self.retry_base < 0 or self.timeout <= 0:
            raise UsageError("segment_size must be at least 64 KiB, retries and retry_base non-negative, timeout positive")


@dataclass(frozen=True)
class PlannedFile:
    """One file a pack will write: where it comes from and where it lands in the bundle."""

    bundle_path: str
    size: int
    source: str
    transport: str | None = None  # for a Hub file: "http" (ranged) or "xet"
    sha256: str | None = None  # for a Hub LFS file: the SHA-256 the Hub lists (its LFS oid), known before any byte is fetched


@dataclass(frozen=True)
class Skipped:
    """A source file the pack leaves out although the spec did not exclude it, and why: reported, never silent."""

    path: str  # where it would have landed in the bundle
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class ModelPlan:
    """One model, decided before anything is written: its record so far, the files it brings, what it leaves out.

    ``fetch`` writes the files into the bundle folder and completes the record;
    it is called only once every model of the spec has been planned, so a spec
    that cannot be packed is refused before the output folder exists.
    """

    record: dict[str, Any]
    planned: list[PlannedFile]
    fetch: Callable[[], list[FileEntry]]
    skipped: list[Skipped] = field(default_factory=list)
    hints: dict[type[AirpackError], str] = field(default_factory=dict)
    hub_stats: dict[str, Any] | None = None  # filled by a Hub model's fetch: files, bytes, seconds, resumed, retries


@contextmanager
def packer_hints(hints: dict[type[AirpackError], str]) -> Iterator[None]:
    """Give a pack-time error a hint for the packer instead of its class's receiver-side default.

    The integrity classes are shared with verify and install, whose default
    hint ("get a fresh copy from the packer") is wrong advice to the packer
    himself. A raise site that chose its own hint keeps it; otherwise the first
    class in ``hints`` the error is an instance of gives the hint.
    """
    try:
        yield
    except AirpackError as e:
        if e.hint == type(e).default_hint:
            for cls, hint in hints.items():
                if isinstance(e, cls):
                    e.hint = hint
                    break
        raise


def source_hints(source: str) -> dict[type[AirpackError], str]:
    """The packer's hints for a problem found in ``source`` (a model folder, or a repo on the Hub)."""
    return {
        MalformedSafetensorsError: f"{source} has a safetensors file that is not well formed; save it again, or exclude it "
                                   "in the spec's include/exclude.",
        UnsafePathError: f"{source} has a file whose name or kind cannot go into a bundle; rename or remove it there, or "
                         "exclude it in the spec's include/exclude.",
        IntegrityError: f"{source} has a file airpack cannot pack as it is; fix it there, or exclude it in the spec's "
                        "include/exclude, then run pack again.",
    }


def apply_content_policy(repo_id: str, rels: list[str], *, allow_pickle: bool, allow_code: bool) -> tuple[list[str], list[str]]:
    """Return (pickles, code) among ``rels`` by their names, refusing them when the spec does not allow them.

    This runs before a byte is fetched; ``check_copied_content`` judges the
    same files again by their first bytes once they are in the bundle.
    """
    policy = content.Policy.spec(allow_pickle=allow_pickle, allow_code=allow_code, label=repo_id)
    found: dict[Risk, list[str]] = {Risk.PICKLE: [], Risk.CODE: []}
    for rel in sorted(rels):
        risk = content.check_file(policy, rel, None, 0).risk
        if risk is not None:
            found[risk].append(rel)
    return found[Risk.PICKLE], found[Risk.CODE]


def check_copied_content(record: dict[str, Any], entries: list[FileEntry], out: Path, prefix: str, spec: PackSpec) -> None:
    """The content policy over the first bytes of every file copied into the bundle (a pickle named config.json, a GGUF header).

    What the bytes reveal and the spec allows is added to the model's
    ``pickles`` / ``code`` lists, so the signed manifest flags it and verify,
    which judges the same bytes with the same ``content.check_file``, agrees.
    """
    policy = content.Policy.spec(allow_pickle=spec.allow_pickle, allow_code=spec.allow_code, label=record["repo_id"])
    found = {Risk.PICKLE: set(record["pickles"]), Risk.CODE: set(record["code"])}
    for e in entries:
        rel = e.path[len(prefix) + 1:]
        path = out.joinpath(*e.path.split("/"))
        try:
            with open(path, "rb") as f:
                head = f.read(SNIFF_BYTES)
        except OSError as err:
            raise oserror_to_airpack(err, "cannot read", str(path)) from None
        try:
            risk = content.check_file(policy, rel, head, e.size).risk
        except MalformedWeightsError as err:  # the packer's own file: the receiver's "get a fresh copy" is no advice here
            err.hint = f"{rel} is not a well-formed GGUF file; convert it again, or exclude it in the spec's include/exclude."
            raise
        if risk is not None:
            found[risk].add(rel)
    record["pickles"], record["code"] = sorted(found[Risk.PICKLE]), sorted(found[Risk.CODE])


def config_summary(config_bytes: bytes | None) -> dict[str, Any]:
    """The config fields an auditor and the fit estimator care about (integers, strings, booleans only)."""
    if config_bytes is None:
        return {}
    try:
        cfg = loads_strict(config_bytes, allow_floats=True, max_depth=16)
    except StrictJSONError as e:
        raise IntegrityError(f"config.json is not valid JSON: {e}", path="config.json") from None
    if not isinstance(cfg, dict):
        raise IntegrityError("config.json is not a JSON object", path="config.json")

    def pick(d: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in CONFIG_SUMMARY_KEYS:
            v = d.get(k)
            if isinstance(v, (bool, int, str)) or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                out[k] = v
        return out

    summary = pick(cfg)
    if isinstance(cfg.get("text_config"), dict):
        summary["text_config"] = pick(cfg["text_config"])
    return summary


def copy_into(src: Path, out: Path, bundle_path: str, on_bytes: Callable[[int], None]) -> FileEntry:
    """Copy one file into the bundle through a temp file, hashing exactly what was written."""
    dest = out.joinpath(*bundle_path.split("/"))
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        sfd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            if not stat.S_ISREG(os.fstat(sfd).st_mode):  # swapped for a FIFO or device since it was listed
                raise UnsafePathError(f"{src} is no longer a regular file", path=str(src))
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
            try:
                d = copy_and_hash(sfd, fd, on_bytes=on_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            os.close(sfd)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        tmp = None
    except OSError as e:
        raise oserror_to_airpack(e, "cannot copy", f"{src} -> {dest}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return FileEntry(path=bundle_path, size=d.size, sha256=d.sha256)


def finish_model_record(record: dict[str, Any], entries: list[FileEntry], out: Path, prefix: str, *, spec: PackSpec) -> None:
    """Validate safetensors headers on the copies; record parameters, dtypes and the config summary."""
    check_copied_content(record, entries, out, prefix, spec)
    infos = []
    for e in entries:
        if content.is_safetensors(e.path):
            infos.append(read_header(out.joinpath(*e.path.split("/")), display=e.path))
    summary = summarize(infos)
    record["parameters"] = summary["parameters"]
    record["dtypes"] = summary["dtypes"]
    cfg_path = out.joinpath(*prefix.split("/"), "config.json")
    cfg = cfg_path.read_bytes() if cfg_path.is_file() else None
    record["config"] = config_summary(cfg)
