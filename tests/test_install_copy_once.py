"""Install copies from a user's bundle folder and never consumes it; a tar streams straight into the txn's staging."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from conftest import verify

from airpack.ops.install import InstallOptions, install
from airpack.trust import load_policy


def test_bundle_folder_inside_the_registry_is_left_whole(
    tmp_path: Path, bundle: Path, policy: Path, make_bundle: Callable[..., Path]
) -> None:
    registry = tmp_path / "registry"
    assert install(InstallOptions(bundle=bundle, registry=registry, policy=load_policy(policy))).result == "installed"
    from factories import make_model

    newer = make_bundle(model_dir=make_model(tmp_path / "src" / "v2", seed=7), sequence=2)
    inside = registry / "incoming" / "bundle"
    shutil.copytree(newer, inside)
    before = sorted(p.relative_to(inside) for p in inside.rglob("*"))
    r = install(InstallOptions(bundle=inside, registry=registry, policy=load_policy(policy)))
    assert r.result == "installed"
    assert sorted(p.relative_to(inside) for p in inside.rglob("*")) == before
    verify(inside, policy)  # still a whole, valid bundle


def test_tar_install_streams_into_staging_and_leaves_nothing_behind(
    tmp_path: Path, bundle: Path, policy: Path
) -> None:
    from airpack.ops.export import ExportOptions, export

    tar = tmp_path / "b.tar"
    export(ExportOptions(bundle=bundle, tar=tar, policy=load_policy(policy)))
    registry = tmp_path / "registry"
    r = install(InstallOptions(bundle=tar, registry=registry, policy=load_policy(policy)))
    assert r.result == "installed"
    staging = [p for p in (registry / ".staging").rglob("*")] if (registry / ".staging").exists() else []
    assert staging == []
    blobs = list((registry / "hub").glob("models--*/blobs/*"))
    assert blobs and all(b.stat().st_nlink == 1 for b in blobs)
    assert all(oct(b.stat().st_mode & 0o777) == oct(0o644) for b in blobs)
