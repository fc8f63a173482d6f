"""A refused or failed first install leaves nothing but its audit line (issue item 12).

An install refused on an empty folder used to create ``hub/``, ``wheels/``,
``registry.db`` and ``.staging``; ``install /nonexistent`` created a whole
registry; a first install that failed later left a half registry. Now nothing
is created until the first thing must be written, and a first install that
fails before its commit removes what it created. The audit line stays: every
install attempt leaves one (DESIGN), so a registry folder that did not exist
holds only ``audit.log`` afterwards, and the next install accepts it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeyPair, run_cli
from registry_fixtures import audit_lines, do_install

import airpack.ops.install as install_mod
from airpack.errors import DiskSpaceError


def _left(reg: Path) -> list[str]:
    return sorted(os.listdir(reg))


def test_refused_install_into_an_empty_folder_writes_only_the_audit_line(make_bundle: Callable[..., Path], bob: KeyPair,
                                                                          policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "r"
    reg.mkdir()
    r = run_cli("install", make_bundle(signer=bob), "--registry", reg, "--trust", policy)  # signed by a key the policy lacks
    assert r.returncode == 4
    assert _left(reg) == ["audit.log"]
    assert [x["result"] for x in audit_lines(reg)] == ["refused"]


def test_install_of_a_missing_bundle_creates_no_registry_beyond_its_audit_line(bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "new" / "registry"
    r = run_cli("install", tmp_path / "nonexistent", "--registry", reg, "--trust", policy)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert _left(reg) == ["audit.log"]
    # That folder is still a place to install into.
    assert do_install(bundle, reg, policy).result == "installed"
    assert [x["result"] for x in audit_lines(reg)] == ["refused", "installed"]


def test_first_install_failing_after_staging_removes_what_it_created(bundle: Path, policy: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    reg = tmp_path / "r"
    monkeypatch.setattr(install_mod, "_free_bytes", lambda path: 0)  # the space check runs once staging exists
    with pytest.raises(DiskSpaceError):
        do_install(bundle, reg, policy)
    assert _left(reg) == ["audit.log"]
    monkeypatch.undo()
    assert do_install(bundle, reg, policy).result == "installed"


def test_a_database_that_is_a_folder_is_refused_and_nothing_else_created(bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "r"
    (reg / "registry.db").mkdir(parents=True)
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy, "--json")
    assert r.returncode == 6 and "registry.db" in r.stdout
    assert _left(reg) == ["audit.log", "registry.db"]


def test_a_failed_first_install_does_not_block_the_next(make_bundle: Callable[..., Path], bob: KeyPair, bundle: Path,
                                                         policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "r"
    assert run_cli("install", make_bundle(signer=bob), "--registry", reg, "--trust", policy).returncode == 4
    assert do_install(bundle, reg, policy).result == "installed"
    assert {"audit.log", "hub", "registry.db", "wheels"} <= set(_left(reg))


def test_a_half_registry_an_older_airpack_left_is_accepted(bundle: Path, policy: Path, tmp_path: Path) -> None:
    """Empty hub/ and wheels/ (what a refused first install used to leave) do not block the next install."""
    reg = tmp_path / "r"
    for d in ("hub", "wheels", ".staging"):
        (reg / d).mkdir(parents=True)
    (reg / "audit.log").write_bytes(b"")
    assert do_install(bundle, reg, policy).result == "installed"


def test_a_folder_holding_other_things_is_still_refused(bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "r"
    (reg / "hub").mkdir(parents=True)
    (reg / "hub" / "someone-elses").write_text("x")
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy)
    assert r.returncode == 2 and "not empty" in r.stderr
    assert sorted(os.listdir(reg)) == ["hub"]
