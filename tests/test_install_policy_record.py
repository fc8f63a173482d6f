"""Each install records which policy authorised it: the policy file's SHA-256, its threshold, the keys that counted.

An auditor must be able to tell, later, which trust policy let a bundle in.
The audit line, the database row, ``airpack show`` and ``list --json`` all
carry it; a refused install's line carries the policy it was refused under.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeyPair
from registry_fixtures import audit_lines, do_install
from threat_helpers import cli_inproc

from airpack.errors import SignatureError
from airpack.ops.manage import ShowOptions, show
from airpack.trust import load_policy, new_policy


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_load_policy_hashes_the_exact_bytes(policy: Path) -> None:
    assert load_policy(policy).sha256 == _sha(policy)
    assert new_policy().sha256 is None  # built in memory: no file to name


def test_the_audit_line_and_the_row_name_the_policy(bundle: Path, policy: Path, alice: KeyPair, tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    do_install(bundle, reg, policy)
    [line] = audit_lines(reg)
    assert line["policy"] == {"sha256": _sha(policy), "threshold": 1, "keyids": [alice.signer.keyid]}
    conn = sqlite3.connect(reg / "registry.db")
    row = conn.execute("SELECT policy_sha256, policy_threshold, policy_keyids FROM bundles").fetchone()
    conn.close()
    assert row == (_sha(policy), 1, json.dumps([alice.signer.keyid]))


def test_only_the_keys_that_counted_are_recorded(make_bundle: Callable[..., Path], make_policy: Callable[..., Path],
                                                 alice: KeyPair, bob: KeyPair, tmp_path: Path) -> None:
    pol = make_policy(alice, bob, threshold=1, name="two.json")
    reg = tmp_path / "registry"
    do_install(make_bundle(signer=bob), reg, pol)
    assert audit_lines(reg)[0]["policy"]["keyids"] == [bob.signer.keyid]
    x = show(ShowOptions(registry=reg, name="acme/tiny")).model
    assert x.policy is not None and x.policy.keyids == (bob.signer.keyid,) and x.policy.sha256 == _sha(pol)


def test_a_refused_install_names_the_policy_it_was_refused_under(make_bundle: Callable[..., Path], policy: Path,
                                                                 bob: KeyPair, tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    with pytest.raises(SignatureError):
        do_install(make_bundle(signer=bob), reg, policy)
    [line] = audit_lines(reg)
    assert line["result"] == "refused"
    assert line["policy"]["sha256"] == _sha(policy) and line["policy"]["threshold"] == 1


def test_show_prints_the_policy(bundle: Path, policy: Path, alice: KeyPair, tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    do_install(bundle, reg, policy)
    r = cli_inproc("show", "acme/tiny", "--registry", reg, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["policy"] == {"sha256": _sha(policy), "threshold": 1, "keyids": [alice.signer.keyid]}
    r = cli_inproc("list", "--registry", reg, "--json")
    assert json.loads(r.stdout)[0]["policy"]["sha256"] == _sha(policy)
    r = cli_inproc("show", "acme/tiny", "--registry", reg)
    assert f"policy:    sha256 {_sha(policy)}, threshold 1, met by {alice.signer.keyid[:12]}" in r.stdout


def test_an_install_recorded_before_this_shows_not_recorded(bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    do_install(bundle, reg, policy)
    conn = sqlite3.connect(reg / "registry.db")
    conn.execute("UPDATE bundles SET policy_sha256 = NULL, policy_threshold = NULL, policy_keyids = NULL")
    conn.commit()
    conn.close()
    r = cli_inproc("show", "acme/tiny", "--registry", reg, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["policy"] is None
    assert "policy:    not recorded" in cli_inproc("show", "acme/tiny", "--registry", reg).stdout
