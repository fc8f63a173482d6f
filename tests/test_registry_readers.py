"""Readers see the old state or the new one, and work on a read-only registry (issue items 11 and 13).

A process killed between the database commit and the finish (refs switched,
audit line) left a registry whose database called the new revision current
while ``refs/main`` still named the old one, and no audit line until the next
write. Readers now settle such a write first (finish or undo it under the
lock, as the next writer would); where they cannot, they say so and report
what a loader would load. ``list``, ``show``, ``log verify`` and ``diff
--registry`` open SQLite read-only and work where nothing may be written.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import AIRPACK, run_cli
from registry_fixtures import audit_lines, do_install, variant_model

from airpack.errors import RegistryError
from airpack.manifest import parse
from airpack.ops.manage import ShowOptions, list_installed, show
from airpack.registry import CRASH_ENV, Registry


def _crash(step: str, *args: str | Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRPACK_")}
    env[CRASH_ENV] = step
    r = subprocess.run([*AIRPACK, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr


@pytest.fixture
def setup(make_bundle: Callable[..., Path], tiny_model: Path, policy: Path, tmp_path: Path) -> tuple[Path, Path, str, str]:
    reg = tmp_path / "registry"
    b1 = make_bundle(sequence=1)
    do_install(b1, reg, policy)
    b2 = make_bundle(sequence=2, model_dir=variant_model(tiny_model, tmp_path / "v2", extra={"extra.json": b"{}\n"}))
    c1 = parse((b1 / "manifest.json").read_bytes()).models[0].commit
    c2 = parse((b2 / "manifest.json").read_bytes()).models[0].commit
    return reg, b2, c1, c2


@pytest.mark.parametrize("step", ["committed", "refs"])
def test_list_after_a_crash_past_the_commit_finishes_the_install(setup: tuple[Path, Path, str, str], policy: Path,
                                                                  step: str) -> None:
    reg, b2, _, c2 = setup
    _crash(step, "install", b2, "--registry", reg, "--trust", policy)
    current = [x.commit for x in list_installed(reg).models if x.current]
    # What list calls current is what loads: the ref file was switched by the reader's recovery.
    assert current == [c2]
    assert (reg / "hub" / "models--acme--tiny" / "refs" / "main").read_text() == c2
    assert [x["result"] for x in audit_lines(reg)] == ["installed", "installed"]
    assert not any((reg / ".staging").iterdir())


def test_show_after_a_crash_past_the_commit_finishes_the_install(setup: tuple[Path, Path, str, str], policy: Path) -> None:
    reg, b2, _, c2 = setup
    _crash("committed", "install", b2, "--registry", reg, "--trust", policy)
    r = show(ShowOptions(registry=reg, name="acme/tiny"))
    assert r.model.commit == c2 and r.model.current and r.pending is None
    assert (reg / "hub" / "models--acme--tiny" / "refs" / "main").read_text() == c2


def test_a_reader_that_cannot_settle_says_so_and_reports_what_loads(setup: tuple[Path, Path, str, str], policy: Path) -> None:
    """With the lock held (a writer at work, or here: this test), the reader neither waits nor claims the new state."""
    reg, b2, c1, _ = setup
    _crash("committed", "install", b2, "--registry", reg, "--trust", policy)
    with Registry.open(reg).locked():
        r = list_installed(reg)
        cli = run_cli("list", "--registry", reg)
    assert r.pending is not None and "writing this registry" in r.pending
    assert [x.commit for x in r.models if x.current] == [c1]  # refs/main still names c1: that is what loads
    assert cli.returncode == 0 and "warning:" in cli.stderr
    # The next command that can take the lock finishes the install.
    assert list_installed(reg).pending is None


def _read_only_connect(real: Callable[..., Any]) -> Callable[..., Any]:
    """sqlite3.connect as it behaves on a read-only folder: a WAL database opened mode=ro cannot create its -shm."""

    def fake(database: str, *args: Any, **kw: Any) -> Any:
        if kw.get("uri") and "mode=ro" in database and "immutable=1" not in database:
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return real(database, *args, **kw)

    return fake


def test_readers_fall_back_to_an_immutable_read(bundle: Path, policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = tmp_path / "r"
    do_install(bundle, reg, policy)
    monkeypatch.setattr(sqlite3, "connect", _read_only_connect(sqlite3.connect))
    assert [x.repo_id for x in list_installed(reg).models] == ["acme/tiny"]
    assert show(ShowOptions(registry=reg, name="acme/tiny")).model.current


def test_an_unfolded_wal_on_a_read_only_registry_is_refused_not_misread(bundle: Path, policy: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    reg = tmp_path / "r"
    do_install(bundle, reg, policy)
    (reg / "registry.db-wal").write_bytes(b"\0" * 32)  # commits the main file does not hold yet
    monkeypatch.setattr(sqlite3, "connect", _read_only_connect(sqlite3.connect))
    with pytest.raises(RegistryError, match=r"registry\.db-wal") as e:
        list_installed(reg)
    assert e.value.exit_code == 6 and "writable" in (e.value.hint or "")


def _read_only_runner(reg: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the CLI where ``reg`` cannot be written: a read-only bind mount (root ignores modes), else ``chmod -R a-w``."""
    if os.geteuid() == 0:
        probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{reg}' '{reg}' && ! touch '{reg}/x'"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip("root ignores file modes and no read-only bind mount is possible here")

        def run_ro(*args: str | Path) -> subprocess.CompletedProcess[str]:
            inner = " ".join(f"'{a}'" for a in [*AIRPACK, *map(str, args)])
            return subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{reg}' '{reg}' && exec {inner}"],
                                  capture_output=True, text=True, timeout=120)

        return run_ro
    for dirpath, _dirs, files in os.walk(reg):
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o444)
    for dirpath, _dirs, _files in sorted(os.walk(reg), reverse=True):
        os.chmod(dirpath, 0o555)
    return run_cli


@pytest.mark.parametrize("crashed", [False, True])
def test_readers_work_on_a_read_only_registry(setup: tuple[Path, Path, str, str], bundle: Path, policy: Path,
                                              crashed: bool) -> None:
    reg, b2, c1, _ = setup
    if crashed:  # a write killed past its commit, on a registry that then became read-only: reported, not hidden
        _crash("committed", "install", b2, "--registry", reg, "--trust", policy)
    run_ro = _read_only_runner(reg)
    try:
        for args in (["list"], ["show", "acme/tiny"], ["log", "verify"]):
            r = run_ro(*args, "--registry", reg, "--json")
            assert r.returncode == 0, (args, r.stdout, r.stderr)
            assert ("warning:" in r.stderr) is (crashed and args[0] != "log"), r.stderr
        r = run_ro("diff", bundle, "--registry", reg, "--trust", policy, "--json")
        assert r.returncode == 0, (r.stdout, r.stderr)
        shown = run_ro("show", "acme/tiny", "--registry", reg, "--json")
        assert json.loads(shown.stdout)["commit"] == c1 if crashed else True
    finally:
        for dirpath, _dirs, _files in os.walk(reg):
            os.chmod(dirpath, 0o755)
