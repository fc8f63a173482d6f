"""What every source of a pack shares: its options, the planned files, copying into the bundle, the model record.

``ops/pack`` (local folders), ``_pack_hub`` (the Hugging Face Hub) and
``_pack_wheels`` (pip) all build on this module; it imports none of them.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import content
from .._fs import oserror_to_airpack
from .._json import StrictJSONError, loads_strict
from ..errors import ContentPolicyError, IntegrityError
from ..hashing import copy_and_hash
from ..manifest import FileEntry
from ..progress import NULL_PROGRESS, Progress
from ..safetensors_check import read_header, summarize
from ..signing import Signer
from ..spec import PackSpec

STAGING_DIR = ".airpack-staging"  # partial downloads of an unfinished pack; removed before signing
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
    workers: int | None = None
    progress: Progress = NULL_PROGRESS


@dataclass(frozen=True)
class PlannedFile:
    """One file a pack will write: where it comes from and where it lands in the bundle."""

    bundle_path: str
    size: int
    source: str


def apply_content_policy(repo_id: str, rels: list[str], *, allow_pickle: bool, allow_code: bool) -> tuple[list[str], list[str]]:
    """Return (pickles, code) among ``rels``, refusing them when the spec does not allow them."""
    pickles = sorted(r for r in rels if content.is_pickle(r))
    code = sorted(r for r in rels if content.is_code(r))
    if pickles and not allow_pickle:
        raise ContentPolicyError(
            f"{repo_id}: pickled weights are not allowed by the spec: {', '.join(pickles[:5])}", path=pickles[0]
        )
    if code and not allow_code:
        raise ContentPolicyError(f"{repo_id}: code files are not allowed by the spec: {', '.join(code[:5])}", path=code[0])
    return pickles, code


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
        sfd = os.open(src, os.O_RDONLY)
        try:
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


def finish_model_record(record: dict[str, Any], entries: list[FileEntry], out: Path, prefix: str) -> None:
    """Validate safetensors headers on the copies; record parameters, dtypes and the config summary."""
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
