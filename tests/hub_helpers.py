"""Helpers for the Hub tests (imported by test modules; the fixtures live in hub_fixtures.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hubserver import DEFAULT_TOKEN, OUTSIDER_TOKEN, HubServer
from safetensors.numpy import save

from airpack.ops.pack import PackOptions, PackResult, pack
from airpack.signing import Signer
from airpack.spec import load_spec

TOKEN = DEFAULT_TOKEN
OUTSIDER = OUTSIDER_TOKEN  # valid, but no gated repo granted: the Hub answers 403 GatedRepo
HF_VARS = ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_DISABLE_IMPLICIT_TOKEN")


def write_hub_spec(path: Path, *, repo_id: str = "acme/tiny", revision: str = "main", name: str = "tiny",
                   sequence: int = 1, model_extra: str = "", extra: str = "") -> Path:
    path.write_text(
        f'[bundle]\nname = "{name}"\nchannel = "{name}"\nsequence = {sequence}\n\n'
        f'[[models]]\nrepo_id = "{repo_id}"\nrevision = "{revision}"\n{model_extra}\n{extra}'
    )
    return path


@dataclass
class Packer:
    """Packs hub specs in-process against one server."""

    hub: HubServer
    tmp: Path
    signer: Signer
    n: int = 0

    def spec(self, **kw: Any) -> Path:
        self.n += 1
        return write_hub_spec(self.tmp / f"spec{self.n}.toml", **kw)

    def pack(self, spec: Path, *, out: Path | None = None, token: str | None = None, dry_run: bool = False,
             **opts: Any) -> PackResult:
        out = out or self.tmp / f"bundle{self.n}"
        return pack(PackOptions(spec=load_spec(spec), out=out, signer=None if dry_run else self.signer,
                                endpoint=self.hub.url, token=token, dry_run=dry_run, **opts))


BIG = "big.safetensors"  # the one large file the engine tests add to the tiny model
SEG = 256 * 1024  # a small segment size: a few-MiB file takes the many-range paths a 100 GB one takes


def with_big_file(tiny_files: dict[str, bytes], mib: int, seed: int) -> dict[str, bytes]:
    """The tiny model plus ``BIG``: ``mib`` MiB of random weights (each test module its own seed, so its own blob)."""
    arr = np.frombuffer(np.random.default_rng(seed).bytes(mib << 20), dtype=np.uint8)
    return {**tiny_files, BIG: save({"blob": arr}, metadata={"format": "pt"})}


def model_dir(out: Path) -> Path:
    """Where the tiny model lands in a bundle folder."""
    return out / "models" / "acme--tiny"
