"""Helpers for the tar, parts, diff and SBOM tests: small bundles, hand-crafted hostile tars, parts folders."""

from __future__ import annotations

import io
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

from factories import make_model

from airpack.manifest import ENVELOPE_NAME, MANIFEST_NAME, parse
from airpack.ops.export import ExportOptions, ExportResult, export
from airpack.signing import Signer
from airpack.trust import TrustPolicy, load_policy


def small_model(directory: Path, *, seed: int = 0) -> Path:
    """A one-shard Llama-shaped model of about 20 KB: parts of 4 KiB make a dozen of them."""
    return make_model(directory, shards=1, seed=seed, hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32)


def export_to(bundle: Path, tar: Path, policy: Path | TrustPolicy, *, signer: Signer | None = None,
              split: int | None = None, parity: int = 0) -> ExportResult:
    pol = load_policy(policy) if isinstance(policy, Path) else policy
    tar.parent.mkdir(parents=True, exist_ok=True)
    return export(ExportOptions(bundle=bundle, tar=tar, policy=pol, split=split, parity=parity, signer=signer))


def bundle_members(bundle: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) in the order airpack writes them: envelope, manifest copy, files sorted by path."""
    payload = (bundle / MANIFEST_NAME).read_bytes()
    m = parse(payload)
    out = [(ENVELOPE_NAME, (bundle / ENVELOPE_NAME).read_bytes()), (MANIFEST_NAME, payload)]
    out += [(f.path, (bundle / f.path).read_bytes()) for f in sorted(m.files, key=lambda f: f.path)]
    return out


def craft_tar(out: Path, members: list[tuple[str, bytes]], *, inject: Callable[[tarfile.TarFile], None] | None = None,
              inject_after: int = 2, fmt: int = tarfile.PAX_FORMAT) -> Path:
    """Write a tar with Python's tarfile (not airpack's writer), calling ``inject`` after ``inject_after`` members."""
    with tarfile.open(out, "w", format=fmt) as tf:
        for i, (name, data) in enumerate(members):
            if i == inject_after and inject is not None:
                inject(tf)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
        if inject is not None and inject_after >= len(members):
            inject(tf)
    return out


def special(name: str, kind: bytes, *, linkname: str = "", data: bytes = b"") -> Callable[[tarfile.TarFile], None]:
    """An injector adding one member of type ``kind`` (tarfile.SYMTYPE, LNKTYPE, CHRTYPE, ...)."""

    def add(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        info.mode = 0o644
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = 1, 3
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    return add


def copy_parts(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))
