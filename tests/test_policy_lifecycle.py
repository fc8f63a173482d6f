"""The trust policy's life on an isolated host, as docs/trust.md's runbooks tell it.

Keys are rotated and revoked by signed updates that the online security team
writes with the ordinary commands and the offline host applies with
``trust apply``; nobody edits a policy by hand. Bundles signed by retired keys
stop verifying exactly when the update lands; bundles by their successors start.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeyPair
from threat_helpers import assert_cli_error, cli_inproc

from airpack.trust import load_policy


@pytest.fixture
def officer(make_key: Callable[..., KeyPair]) -> KeyPair:
    return make_key("officer", "ecdsa-p256")


@pytest.fixture
def officer2(make_key: Callable[..., KeyPair]) -> KeyPair:
    return make_key("officer2")


def _run(*args: str | Path) -> str:
    r = cli_inproc(*args)
    assert r.returncode == 0, r.stderr + r.stdout
    return r.stdout


def _cosigned(make_bundle: Callable[..., Path], packer: KeyPair, cosigner: KeyPair, sequence: int) -> Path:
    b = make_bundle(signer=packer, sequence=sequence)
    _run("sign", b, "--key", cosigner.key)
    return b


def test_rotation_runbook(tmp_path: Path, make_bundle: Callable[..., Path], alice: KeyPair, officer: KeyPair,
                          officer2: KeyPair) -> None:
    """packer (alice) + officer, 2 of 2, on the host; the officer's key is rotated to officer2 and the old one revoked."""
    host = tmp_path / "host" / "trust.json"
    host.parent.mkdir()
    _run("trust", "init", host, "--threshold", "2")
    _run("trust", "add", host, alice.pub, "--name", "packer")
    _run("trust", "add", host, officer.pub, "--name", "officer")
    old_bundle = _cosigned(make_bundle, alice, officer, 1)
    _run("verify", old_bundle, "--trust", host)

    # Online: the security team keeps its own copy of the host's policy and writes the next one.
    online = tmp_path / "online" / "trust.json"
    online.parent.mkdir()
    shutil.copyfile(host, online)
    nxt = online.with_name("trust-next.json")
    shutil.copyfile(online, nxt)
    _run("trust", "add", nxt, officer2.pub, "--name", "officer2")
    _run("trust", "revoke", nxt, "officer", "--reason", "rotated 2026-12: new token")
    update = tmp_path / "media" / "trust-update.dsse.json"
    update.parent.mkdir()
    _run("trust", "sign-update", nxt, "--key", alice.key, "--out", update)  # the packer
    _run("trust", "sign-update", update, "--key", officer.key)  # the old officer, vouching for the successor
    out = _run("trust", "sign-update", update, "--key", officer2.key)  # the new officer, accepting
    assert "(met: 2 required)" in out

    # Offline: apply, then the new officer's co-signature counts and the old one's no longer does.
    before = load_policy(host).version
    _run("trust", "apply", host, update)
    p = load_policy(host)
    assert p.version > before
    assert [k.name for k in p.keys] == ["packer", "officer2"] and [r.name for r in p.revoked] == ["officer"]
    _run("verify", _cosigned(make_bundle, alice, officer2, 2), "--trust", host)
    assert_cli_error(cli_inproc("verify", old_bundle, "--trust", host), 4, "officer", "is revoked: rotated 2026-12")
    assert_cli_error(cli_inproc("verify", _cosigned(make_bundle, alice, officer, 3), "--trust", host), 4, "is revoked")

    # The same update again, or the old officer trying to sign his way back in, changes nothing.
    raw = host.read_bytes()
    assert_cli_error(cli_inproc("trust", "apply", host, update), 4, "the same version")
    assert_cli_error(cli_inproc("trust", "add", host, officer.pub, "--name", "officer-again"), 2, "is revoked")
    assert host.read_bytes() == raw


def test_emergency_revocation_on_the_host_then_recovery(tmp_path: Path, bundle: Path, make_policy: Callable[..., Path],
                                                        alice: KeyPair, bob: KeyPair) -> None:
    """The only packer key is stolen: revoke it locally at once; nothing verifies until a new key is trusted."""
    host = make_policy(alice)
    _run("trust", "revoke", host, "alice", "--reason", "laptop stolen")
    assert_cli_error(cli_inproc("verify", bundle, "--trust", host), 2, "0 valid key(s)", "1 revoked (alice)")
    _run("trust", "add", host, bob.pub, "--name", "bob")
    assert_cli_error(cli_inproc("verify", bundle, "--trust", host), 4, "alice", "is revoked: laptop stolen")
    doc = json.loads(_run("trust", "list", host, "--json"))
    assert [k["name"] for k in doc["keys"]] == ["bob"] and doc["revoked"][0]["reason"] == "laptop stolen"


def test_threshold_raise_by_update(tmp_path: Path, make_policy: Callable[..., Path], make_bundle: Callable[..., Path],
                                   alice: KeyPair, bob: KeyPair) -> None:
    """1 of 2 becomes 2 of 2: one current key (the old threshold) and both new ones must sign."""
    host = make_policy(alice, bob, name="host.json")
    single = make_bundle(signer=alice)
    _run("verify", single, "--trust", host)
    nxt = tmp_path / "next.json"
    shutil.copyfile(host, nxt)
    _run("trust", "set-threshold", nxt, "2")
    update = tmp_path / "u.dsse.json"
    _run("trust", "sign-update", nxt, "--key", alice.key, "--out", update)
    assert_cli_error(cli_inproc("trust", "apply", host, update), 4, "of the new policy")
    _run("trust", "sign-update", update, "--key", bob.key)
    _run("trust", "apply", host, update)
    assert_cli_error(cli_inproc("verify", single, "--trust", host), 4, "the policy requires 2")
