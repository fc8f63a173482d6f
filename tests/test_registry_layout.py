"""The registry's layout matches what huggingface_hub's offline loader expects, and its own rules hold."""

from __future__ import annotations

import os
import posixpath
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import KeyPair
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_fixtures import do_install, registry_state, resign

from airpack.errors import IntegrityError, NotInstalledError, RegistryError, UnsafeRegistryError
from airpack.manifest import FileEntry
from airpack.registry import Registry, link_target, ref_name, repo_folder, requirements_name

_part = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@settings(max_examples=60, deadline=None)
@given(st.lists(_part, min_size=1, max_size=6), st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))
def test_snapshot_links_resolve_to_the_blob(parts: list[str], sha: str) -> None:
    rel = "/".join(parts)
    link_dir = posixpath.dirname(f"snapshots/{'c' * 40}/{rel}")
    assert posixpath.normpath(posixpath.join(link_dir, link_target(rel, sha))) == f"blobs/{sha}"


@pytest.mark.parametrize("repo_id", ["acme/tiny", "Qwen/Qwen2.5-7B-Instruct", "gpt2"])
def test_repo_folder_is_huggingface_hubs(repo_id: str) -> None:
    from huggingface_hub.file_download import repo_folder_name

    assert repo_folder(repo_id) == repo_folder_name(repo_id=repo_id, repo_type="model")


def test_ref_names() -> None:
    assert ref_name(None) == "main"
    assert ref_name("a" * 40) == "main"  # pinned to a commit: recorded under main
    assert ref_name("v1.0") == "v1.0"
    assert ref_name("refs/pr/1") == "refs/pr/1"
    for bad in ("../x", "a//b", "x/", "-x", "a\nb", ".hidden", "x.lock"):
        with pytest.raises(IntegrityError):
            ref_name(bad)
    assert requirements_name("tiny") == "tiny.txt"


def test_huggingface_hub_sees_a_clean_cache(bundle: Path, policy: Path, tmp_path: Path) -> None:
    from huggingface_hub import scan_cache_dir

    reg = tmp_path / "r"
    do_install(bundle, reg, policy)
    info = scan_cache_dir(reg / "hub")
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.repo_id == "acme/tiny"
    (rev,) = repo.revisions
    assert rev.refs == frozenset({"main", f"airpack/kept-{rev.commit_hash}"})  # the kept ref: see test_hf_cache_prune.py
    assert rev.nb_files == len(list((bundle / "models" / "acme--tiny").iterdir()))


def test_revision_name_from_the_manifest_becomes_its_ref(make_bundle: Callable[..., Path], policy: Path, tmp_path: Path,
                                                          alice: KeyPair) -> None:
    b = make_bundle()

    def tag(pred: dict[str, Any], files: list[FileEntry]) -> list[FileEntry]:
        pred["models"][0]["revision"] = "v1.0"
        return files

    resign(b, alice, tag)
    reg = tmp_path / "r"
    r = do_install(b, reg, policy)
    assert (reg / "hub" / "models--acme--tiny" / "refs" / "v1.0").read_text() == r.models[0]["commit"]
    assert not (reg / "hub" / "models--acme--tiny" / "refs" / "main").exists()


def test_stale_staging_is_cleaned(bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "r"
    do_install(bundle, reg, policy)
    before = registry_state(reg)
    junk = reg / ".staging" / "20200101T000000-deadbeef"
    (junk / "tree" / "hub").mkdir(parents=True)
    (junk / "tree" / "hub" / "x").write_bytes(b"half")
    (reg / ".staging" / "stray-file").write_bytes(b"x")
    with Registry.open(reg).writer():
        pass
    assert list((reg / ".staging").iterdir()) == []
    assert registry_state(reg) == before


def test_journal_naming_paths_outside_the_registry_is_refused(bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "r"
    do_install(bundle, reg, policy)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    junk = reg / ".staging" / "20200101T000000-0badf00d"
    junk.mkdir()
    (junk / "journal.json").write_text('{"creates": [{"path": "../victim.txt", "kind": "leaf"}]}')
    with pytest.raises(UnsafeRegistryError, match="staging journal"), Registry.open(reg).writer():
        pass
    assert victim.read_text() == "keep"


def test_unknown_schema_is_refused(bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "r"
    do_install(bundle, reg, policy)
    conn = sqlite3.connect(str(reg / "registry.db"))
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    conn.commit()
    conn.close()
    with pytest.raises(RegistryError, match="schema 99"):
        do_install(bundle, reg, policy)


def test_database_uses_wal_and_foreign_keys(bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "r"
    do_install(bundle, reg, policy)
    reg_obj = Registry.open(reg)
    conn = reg_obj.connect(write=True)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO files(model_id, path, sha256, size) VALUES (999, 'x', 'y', 1)")
    finally:
        conn.close()


def test_opening_for_reading_creates_nothing(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(NotInstalledError):
        Registry.open(d)
    assert list(d.iterdir()) == []
    assert not os.path.exists(tmp_path / "missing")
