"""Hugging Face's own cache tools must not destroy rollback (issue item 8).

``hf cache prune`` deletes every "detached" snapshot: one that no file under
``refs/`` names. The revisions airpack keeps for ``rollback`` had no ref, so a
prune deleted them and ``rollback`` then pointed ``refs/main`` at nothing.
Each installed commit now has ``refs/airpack/kept-<commit>``; these tests
run the real ``huggingface_hub`` scan and delete API that the CLI's prune uses.
Where a snapshot is gone anyway (deleted by hand), rollback, reactivation,
``show`` and the no-op refuse with exit 6 and say how to fix it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import AIRPACK, run_cli
from huggingface_hub import scan_cache_dir
from registry_fixtures import audit_lines, do_install, recover, registry_state, variant_model
from threat_helpers import assert_cli_json_error

from airpack.errors import IntegrityError, SnapshotMissingError
from airpack.manifest import parse
from airpack.ops.manage import RemoveOptions, RollbackOptions, ShowOptions, remove, rollback, show
from airpack.registry import CRASH_ENV, kept_ref, ref_name

REPO = "models--acme--tiny"


def _commit(bundle: Path) -> str:
    return parse((bundle / "manifest.json").read_bytes()).models[0].commit


@pytest.fixture
def two(make_bundle: Callable[..., Path], tiny_model: Path, policy: Path, tmp_path: Path) -> tuple[Path, str, str, Path]:
    """A registry with sequence 1 (kept for rollback) and sequence 2 (current) of acme/tiny."""
    reg = tmp_path / "registry"
    b1 = make_bundle(sequence=1)
    do_install(b1, reg, policy)
    b2 = make_bundle(sequence=2, model_dir=variant_model(tiny_model, tmp_path / "v2", extra={"extra.json": b'{"v": 2}\n'}))
    do_install(b2, reg, policy)
    return reg, _commit(b1), _commit(b2), b2


def _prune(hub: Path) -> list[str]:
    """What `hf cache prune` does: delete every detached revision (no ref names it); returns their commits."""
    info = scan_cache_dir(hub)
    assert info.warnings == []
    detached = [rev.commit_hash for repo in info.repos for rev in repo.revisions if not rev.refs]
    if detached:
        info.delete_revisions(*detached).execute()
    return detached


def test_every_kept_revision_has_a_ref_that_hf_tools_respect(two: tuple[Path, str, str, Path]) -> None:
    reg, c1, c2, _ = two
    (repo,) = scan_cache_dir(reg / "hub").repos
    refs = {rev.commit_hash: rev.refs for rev in repo.revisions}
    assert refs == {c1: frozenset({f"airpack/kept-{c1}"}), c2: frozenset({"main", f"airpack/kept-{c2}"})}
    assert (reg / "hub" / REPO / "refs" / "airpack" / f"kept-{c1}").read_text() == c1  # the bare commit, as HF writes refs


def test_prune_keeps_the_rollback_revision(two: tuple[Path, str, str, Path]) -> None:
    reg, c1, c2, _ = two
    assert _prune(reg / "hub") == []
    assert (reg / "hub" / REPO / "snapshots" / c1).is_dir()
    r = rollback(RollbackOptions(registry=reg, name="acme/tiny"))
    assert [(c.from_commit, c.to_commit) for c in r.changes] == [(c2, c1)]
    assert (reg / "hub" / REPO / "refs" / "main").read_text() == c1
    assert show(ShowOptions(registry=reg, name="acme/tiny")).model.commit == c1


def test_remove_takes_the_kept_ref_with_the_revision(two: tuple[Path, str, str, Path]) -> None:
    reg, c1, c2, _ = two
    remove(RemoveOptions(registry=reg, name="acme/tiny", revision=c1))
    assert not (reg / "hub" / REPO / "refs" / "airpack" / f"kept-{c1}").exists()
    info = scan_cache_dir(reg / "hub")
    assert info.warnings == []  # no ref names a commit that is gone
    ((rev,),) = [tuple(repo.revisions) for repo in info.repos]
    assert rev.commit_hash == c2 and rev.refs == frozenset({"main", f"airpack/kept-{c2}"})


def test_rollback_to_a_deleted_snapshot_is_refused(two: tuple[Path, str, str, Path]) -> None:
    reg, c1, c2, _ = two
    shutil.rmtree(reg / "hub" / REPO / "snapshots" / c1)
    (reg / "hub" / REPO / "refs" / "airpack" / f"kept-{c1}").unlink()  # what `hf cache rm` of that revision leaves
    before = registry_state(reg)
    r = run_cli("rollback", "acme/tiny", "--registry", reg, "--json")
    err = assert_cli_json_error(r, 6, "SnapshotMissingError", path_fragment=c1)
    assert "install its bundle again" in r.stdout
    assert registry_state(reg) == before
    assert (reg / "hub" / REPO / "refs" / "main").read_text() == c2
    assert audit_lines(reg)[-1]["result"] == "refused" and err["type"] == "SnapshotMissingError"


def test_show_of_a_deleted_snapshot_is_refused(two: tuple[Path, str, str, Path]) -> None:
    reg, c1, _, _ = two
    shutil.rmtree(reg / "hub" / REPO / "snapshots" / c1)
    with pytest.raises(SnapshotMissingError) as e:
        show(ShowOptions(registry=reg, name="acme/tiny", revision=c1))
    assert e.value.exit_code == 6


def test_reactivation_of_a_deleted_snapshot_is_refused(two: tuple[Path, str, str, Path], policy: Path) -> None:
    reg, c1, c2, b2 = two
    rollback(RollbackOptions(registry=reg, name="acme/tiny"))
    shutil.rmtree(reg / "hub" / REPO / "snapshots" / c2)
    r = run_cli("install", b2, "--registry", reg, "--trust", policy, "--json")
    assert_cli_json_error(r, 6, "SnapshotMissingError")
    assert (reg / "hub" / REPO / "refs" / "main").read_text() == c1


@pytest.mark.parametrize("step", ["journal", "committed", "refs"])
def test_kept_refs_follow_a_remove_killed_at_any_step(two: tuple[Path, str, str, Path], step: str) -> None:
    """The kept ref goes with its revision's remove transaction: before the commit both stay, after it both go."""
    reg, c1, _, _ = two
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRPACK_")} | {CRASH_ENV: step}
    r = subprocess.run([*AIRPACK, "remove", "acme/tiny", "--revision", c1, "--registry", str(reg)], env=env, capture_output=True,
                       timeout=120)
    assert r.returncode == -signal.SIGKILL
    recover(reg)
    kept = (reg / "hub" / REPO / "refs" / "airpack" / f"kept-{c1}").exists()
    snapshot = (reg / "hub" / REPO / "snapshots" / c1).exists()
    assert kept == snapshot == (step == "journal")
    assert scan_cache_dir(reg / "hub").warnings == []


def test_a_revision_name_under_airpack_is_refused() -> None:
    """No bundle may name its revision like airpack's own refs (it would collide with a kept ref)."""
    commit = "a" * 40
    with pytest.raises(IntegrityError):
        ref_name(kept_ref(commit))
    assert ref_name("pr/1") == "pr/1" and ref_name(commit) == "main"
