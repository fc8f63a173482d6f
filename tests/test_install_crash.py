"""SIGKILL at every step of a registry write: the registry is exactly as before (or exactly after), never between.

A real subprocess runs the real CLI with ``AIRPACK_TEST_CRASH_AT=<step>``,
which makes it SIGKILL itself at that step (``airpack.registry.crash_point``).
Before the commit point the registry must come back exactly as it was, with
one "interrupted" audit line; from the commit on, the write must be finished
by the next command. Either way the next install succeeds and the hash chain
holds. The kernel releases the killed process's flock, so no stale lock
blocks anyone.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import AIRPACK
from registry_fixtures import audit_lines, db_state, do_install, recover, registry_state, variant_model

from airpack.manifest import parse
from airpack.ops.manage import list_installed
from airpack.registry import CRASH_ENV, Registry

BEFORE_COMMIT = ["verified", "copy", "staged", "journal", "blobs", "snapshots"]
AFTER_COMMIT = ["committed", "refs", "audit"]


def _crash(step: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRPACK_")}
    env[CRASH_ENV] = step
    r = subprocess.run([*AIRPACK, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == -signal.SIGKILL, f"{step}: expected SIGKILL, got {r.returncode}: {r.stdout} {r.stderr}"
    return r


@pytest.fixture
def setup(make_bundle: Callable[..., Path], tiny_model: Path, policy: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """A registry holding sequence 1, and sequence 2 (two new files in a sub-folder, the rest shared) ready to install."""
    reg = tmp_path / "registry"
    do_install(make_bundle(sequence=1), reg, policy)
    v2 = variant_model(tiny_model, tmp_path / "v2", extra={"extra.json": b'{"v": 2}\n', "sub/more.json": b"[2]\n"})
    b2 = make_bundle(sequence=2, model_dir=v2)
    commit2 = parse((b2 / "manifest.json").read_bytes()).models[0].commit
    return reg, b2, commit2


@pytest.mark.parametrize("step", BEFORE_COMMIT)
def test_kill_before_commit_leaves_registry_as_before(setup: tuple[Path, Path, str], policy: Path, step: str) -> None:
    reg, b2, commit2 = setup
    before = registry_state(reg)
    ref = reg / "hub" / "models--acme--tiny" / "refs" / "main"
    ref_before = ref.read_text()
    lines_before = (reg / "audit.log").read_text()

    _crash(step, "install", b2, "--registry", reg, "--trust", policy)
    # Even before anyone cleans up, what a loader resolves by name and what the database says are unchanged.
    assert ref.read_text() == ref_before
    assert db_state(reg) == before["db"]

    recover(reg)
    assert registry_state(reg) == before
    assert not any((reg / ".staging").iterdir())
    text = (reg / "audit.log").read_text()
    assert text.startswith(lines_before)
    new = audit_lines(reg)[len(lines_before.splitlines()):]
    # An attempt that got as far as staging is logged as interrupted; one killed earlier left no trace to log.
    assert [x["result"] for x in new] == ([] if step == "verified" else ["interrupted"])
    assert Registry.open(reg).verify_log().lines == len(audit_lines(reg))

    assert do_install(b2, reg, policy).result == "installed"
    assert ref.read_text() == commit2


@pytest.mark.parametrize("step", AFTER_COMMIT)
def test_kill_after_commit_is_finished_by_the_next_run(setup: tuple[Path, Path, str], policy: Path, step: str) -> None:
    reg, b2, commit2 = setup
    _crash(step, "install", b2, "--registry", reg, "--trust", policy)
    # The next write command finishes the committed install: ref switched, exactly one audit line for it.
    assert do_install(b2, reg, policy).result == "noop"
    assert (reg / "hub" / "models--acme--tiny" / "refs" / "main").read_text() == commit2
    assert [x.commit for x in list_installed(reg).models if x.current] == [commit2]
    results = [x["result"] for x in audit_lines(reg)]
    assert results == ["installed", "installed", "noop"]
    assert not any((reg / ".staging").iterdir())
    assert Registry.open(reg).verify_log().lines == 3
    snap = reg / "hub" / "models--acme--tiny" / "snapshots" / commit2
    assert (snap / "sub" / "more.json").read_bytes() == b"[2]\n"


def test_kill_into_a_fresh_registry_leaves_no_model(bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "fresh"
    _crash("snapshots", "install", bundle, "--registry", reg, "--trust", policy)
    recover(reg)
    assert list((reg / "hub").iterdir()) == []
    assert do_install(bundle, reg, policy).result == "installed"


@pytest.mark.parametrize("step", ["journal", "committed", "refs"])
def test_kill_during_remove(setup: tuple[Path, Path, str], policy: Path, step: str) -> None:
    reg, b2, commit2 = setup
    do_install(b2, reg, policy)
    before = registry_state(reg)
    _crash(step, "remove", "acme/tiny", "--revision", commit2, "--registry", reg)
    recover(reg)
    if step == "journal":
        assert registry_state(reg) == before
        assert audit_lines(reg)[-1]["result"] == "interrupted"
    else:
        assert not (reg / "hub" / "models--acme--tiny" / "snapshots" / commit2).exists()
        assert [x.commit for x in list_installed(reg).models] != [] and commit2 not in [x.commit for x in list_installed(reg).models]
        assert audit_lines(reg)[-1]["result"] == "removed"
    Registry.open(reg).verify_log()


@pytest.mark.parametrize("step", ["journal", "committed"])
def test_kill_during_rollback(setup: tuple[Path, Path, str], policy: Path, step: str) -> None:
    reg, b2, commit2 = setup
    do_install(b2, reg, policy)
    ref = reg / "hub" / "models--acme--tiny" / "refs" / "main"
    _crash(step, "rollback", "acme/tiny", "--registry", reg)
    recover(reg)
    if step == "journal":
        assert ref.read_text() == commit2
    else:
        assert ref.read_text() != commit2
        assert [x.commit for x in list_installed(reg).models if x.current] == [ref.read_text()]
