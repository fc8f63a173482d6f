"""The trust policy is the root of trust: it is parsed strictly, and changed only through airpack.

A misspelt or missing field must never quietly become a default (a
``"treshold": 2`` verifying with threshold 1), a key entry must be exactly
what its public key says, and ``trust remove`` / ``trust set-threshold`` change
a policy atomically, refusing (exit 2, nothing changed) a result no bundle
could ever satisfy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import KeyPair
from threat_helpers import assert_cli_error, assert_cli_json_error, cli_inproc

from airpack.errors import PolicyError
from airpack.trust import load_policy


def _edit(policy: Path, mutate: Callable[[dict[str, Any]], object]) -> None:
    doc = json.loads(policy.read_text())
    mutate(doc)
    policy.write_text(json.dumps(doc))


def _rename(doc: dict[str, Any], old: str, new: str) -> None:
    doc[new] = doc.pop(old)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: _rename(d, "threshold", "treshold"), "unknown field(s): treshold"),
        (lambda d: d.pop("threshold"), "lacks required field(s): threshold"),
        (lambda d: d.pop("version"), "lacks required field(s): version"),
        (lambda d: d.pop("keys"), "lacks required field(s): keys"),
        (lambda d: d.update(expires="2030-01-01"), "unknown field(s): expires"),
        (lambda d: d["keys"][0].update(comment="hi"), "unknown field(s): comment"),
        (lambda d: d["keys"][0].pop("keyid"), "lacks required field(s): keyid"),
        (lambda d: d["keys"][0].pop("algorithm"), "lacks required field(s): algorithm"),
        (lambda d: d["keys"][0].update(algorithm="ecdsa-p256"), "says algorithm 'ecdsa-p256', but its public key is ed25519"),
        (lambda d: d["keys"][0].update(algorithm=1), "must be a string"),
        (lambda d: d["keys"][0].update(keyid="ab" * 32), "does not match its public key"),
        (lambda d: d["keys"][0].update(name="../evil"), "invalid name"),
        (lambda d: d.update(version=True), "version (the policy's serial number) must be a positive integer"),
        (lambda d: d.update(version=0), "version (the policy's serial number) must be a positive integer"),
        (lambda d: d["keys"][0].update(expires="2030-01-01"), "expires must be a UTC time like"),
        (lambda d: d["keys"][0].update(expires=1), "expires must be a UTC time like"),
        (lambda d: d.update(revoked={}), "'revoked' must be a list"),
        (lambda d: d.update(revoked=[{"keyid": "x"}]), "revoked key #1 lacks required field(s)"),
        (lambda d: d["keys"].append("alice"), "key #3 is not a JSON object"),
    ],
)
def test_policy_field_errors_are_usage_errors(tmp_path: Path, bundle: Path, make_policy: Callable[..., Path],
                                              alice: KeyPair, bob: KeyPair, mutate: Callable[[dict[str, Any]], object],
                                              fragment: str) -> None:
    policy = make_policy(alice, bob, threshold=2)
    _edit(policy, mutate)
    with pytest.raises(PolicyError) as info:
        load_policy(policy)
    assert fragment in info.value.message
    assert info.value.exit_code == 2
    assert_cli_error(cli_inproc("verify", bundle, "--trust", policy), 2, fragment)


def test_misspelt_threshold_is_not_threshold_one(bundle: Path, make_policy: Callable[..., Path], alice: KeyPair,
                                                  bob: KeyPair) -> None:
    """The reported bug: alice alone signed; a policy meaning "2 of 2" with a typo verified with threshold 1."""
    policy = make_policy(alice, bob, threshold=2)
    _edit(policy, lambda d: _rename(d, "threshold", "treshold"))
    r = cli_inproc("verify", bundle, "--trust", policy, "--json")
    assert_cli_json_error(r, 2, "PolicyError", str(policy))


def test_trust_add_does_not_rewrite_a_policy_without_threshold(make_policy: Callable[..., Path], alice: KeyPair,
                                                                bob: KeyPair) -> None:
    policy = make_policy(alice)
    _edit(policy, lambda d: d.pop("threshold"))
    before = policy.read_bytes()
    assert_cli_error(cli_inproc("trust", "add", policy, bob.pub, "--name", "bob"), 2, "threshold")
    assert policy.read_bytes() == before


def test_duplicate_names_and_keys_are_refused(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair) -> None:
    policy = make_policy(alice, bob)
    _edit(policy, lambda d: d["keys"][1].update(name="alice"))
    assert_cli_error(cli_inproc("trust", "list", policy), 2, "share the name 'alice'")
    policy = make_policy(alice, bob, name="p2.json")
    _edit(policy, lambda d: d["keys"].append(dict(d["keys"][0], name="alice2")))
    assert_cli_error(cli_inproc("trust", "list", policy), 2, "listed twice")


def test_a_policy_airpack_writes_reads_back(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair) -> None:
    p = load_policy(make_policy(alice, bob, threshold=2))
    assert [k.name for k in p.keys] == ["alice", "bob"] and p.threshold == 2


# -- trust remove ------------------------------------------------------------------------------


def test_trust_remove_by_name_and_by_keyid(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair,
                                           make_key: Callable[..., KeyPair]) -> None:
    carol = make_key("carol")
    policy = make_policy(alice, bob, carol)
    r = cli_inproc("trust", "remove", policy, "bob", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["removed"]["name"] == "bob" and [k["name"] for k in doc["keys"]] == ["alice", "carol"]
    assert [k.name for k in load_policy(policy).keys] == ["alice", "carol"]
    r = cli_inproc("trust", "remove", policy, carol.signer.keyid)
    assert r.returncode == 0, r.stderr
    assert "no longer trusted: carol" in r.stdout
    assert [k.name for k in load_policy(policy).keys] == ["alice"]


def test_trust_remove_by_a_keyid_prefix(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair) -> None:
    policy = make_policy(alice, bob)
    r = cli_inproc("trust", "remove", policy, bob.signer.keyid[:12])
    assert r.returncode == 0, r.stderr
    assert [k.name for k in load_policy(policy).keys] == ["alice"]


def test_trust_remove_below_the_threshold_changes_nothing(make_policy: Callable[..., Path], alice: KeyPair,
                                                          bob: KeyPair) -> None:
    policy = make_policy(alice, bob, threshold=2)
    before = policy.read_bytes()
    line = assert_cli_error(cli_inproc("trust", "remove", policy, "bob"), 2, "1 key(s) for a threshold of 2")
    assert "nothing changed" in line
    r = cli_inproc("trust", "remove", policy, "bob")
    assert "set-threshold" in r.stderr  # the hint says what to do first
    assert policy.read_bytes() == before


def test_trust_remove_of_an_unknown_key(make_policy: Callable[..., Path], alice: KeyPair) -> None:
    policy = make_policy(alice)
    before = policy.read_bytes()
    assert_cli_error(cli_inproc("trust", "remove", policy, "mallory"), 2, "no key named or with key id 'mallory'")
    assert policy.read_bytes() == before


# -- trust set-threshold ---------------------------------------------------------------------------


def test_set_threshold_up_and_down(bundle: Path, make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair) -> None:
    policy = make_policy(alice, bob)
    r = cli_inproc("trust", "set-threshold", policy, "2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["threshold"] == 2 and doc["previous_threshold"] == 1
    assert load_policy(policy).threshold == 2
    assert cli_inproc("verify", bundle, "--trust", policy).returncode == 4  # only alice signed
    assert cli_inproc("trust", "set-threshold", policy, "1").returncode == 0
    assert cli_inproc("verify", bundle, "--trust", policy).returncode == 0


def test_set_threshold_above_the_keys_changes_nothing(make_policy: Callable[..., Path], alice: KeyPair) -> None:
    policy = make_policy(alice)
    before = policy.read_bytes()
    assert_cli_error(cli_inproc("trust", "set-threshold", policy, "2"), 2, "lists 1 key(s); a threshold of 2")
    assert cli_inproc("trust", "set-threshold", policy, "0").returncode == 2  # click's range check
    assert policy.read_bytes() == before


def test_policy_writes_keep_a_stricter_mode(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair) -> None:
    policy = make_policy(alice, bob)
    os.chmod(policy, 0o600)
    assert cli_inproc("trust", "set-threshold", policy, "2").returncode == 0
    assert policy.stat().st_mode & 0o777 == 0o600
    assert not [p for p in policy.parent.iterdir() if p.name.startswith(f".{policy.name}.")]  # no temp file left


# -- trust add: a bad key file is configuration (exit 2) -----------------------------------------------


@pytest.mark.parametrize("what", ["folder", "garbage", "private", "oversized", "empty"])
def test_trust_add_bad_key_file_is_exit_2(tmp_path: Path, make_policy: Callable[..., Path], alice: KeyPair,
                                          what: str) -> None:
    policy = make_policy()
    bad = tmp_path / f"bad-{what}"
    if what == "folder":
        bad.mkdir()
    elif what == "garbage":
        bad.write_bytes(os.urandom(300))
    elif what == "private":
        bad.write_bytes(alice.key.read_bytes())
    elif what == "oversized":
        bad.write_bytes(b"-----BEGIN PUBLIC KEY-----\n" + b"A" * 70_000)
    else:
        bad.write_bytes(b"")
    before = policy.read_bytes()
    r = cli_inproc("trust", "add", policy, bad, "--name", "x", "--json")
    assert_cli_json_error(r, 2, "KeyFileError", str(bad))
    assert policy.read_bytes() == before


def test_trust_add_unreadable_key_file_is_exit_2(tmp_path: Path, make_policy: Callable[..., Path], alice: KeyPair,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission denied on the .pub file (simulated: the tests may run as root, who reads anything)."""
    import airpack.signing

    policy = make_policy()

    def denied(path: Path, cap: int, **kw: object) -> bytes:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(airpack.signing, "read_capped", denied)
    r = cli_inproc("trust", "add", policy, alice.pub, "--name", "alice", "--json")
    assert_cli_json_error(r, 2, "KeyFileError", str(alice.pub))
