"""Signed trust policy updates: ``trust sign-update`` and ``trust apply``.

An update replaces a host's policy only when the threshold of the CURRENT
policy's valid keys and the threshold of the NEW policy's keys signed its
exact bytes, and its version is higher. Every refusal (exit 4 for signatures
and version, 2 for a malformed or unusable policy) leaves the policy file
byte for byte as it was; with ``--registry`` each attempt leaves one audit line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import KeyPair
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from registry_fixtures import audit_lines, do_install
from threat_helpers import assert_cli_error, assert_cli_json_error, cli_inproc

from airpack.policy_update import UPDATE_PAYLOAD_TYPE
from airpack.signing import envelope_bytes, load_public_file
from airpack.trust import load_policy

Policies = tuple[Path, Path]


@pytest.fixture
def carol(make_key: Callable[..., KeyPair]) -> KeyPair:
    return make_key("carol", "ecdsa-p256")


def _ok(*args: str | os.PathLike[str]) -> dict[str, Any]:
    r = cli_inproc(*args, "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def _draft(current: Path, name: str, *changes: tuple[str, ...]) -> Path:
    """The security team's next policy: a copy of the current one changed with the ordinary commands."""
    draft = current.with_name(name)
    shutil.copyfile(current, draft)
    for c in changes:
        _ok("trust", c[0], draft, *c[1:])
    return draft


@pytest.fixture
def rotation(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair, carol: KeyPair) -> Policies:
    """Current: alice and bob, 2 of 2. Next: bob rotated out for carol, still 2 of 2 (alice, carol)."""
    current = make_policy(alice, bob, threshold=2, name="current.json")
    nxt = _draft(current, "next.json", ("add", str(carol.pub), "--name", "carol"), ("remove", "bob"))
    return current, nxt


def _unchanged(policy: Path, before: bytes) -> None:
    assert policy.read_bytes() == before
    assert not [p for p in policy.parent.iterdir() if p.name.startswith(f".{policy.name}.")]  # no temp file left


# -- the happy path ---------------------------------------------------------------------------------


def test_rotation_applies_with_both_thresholds(rotation: Policies, alice: KeyPair, bob: KeyPair, carol: KeyPair,
                                               tmp_path: Path) -> None:
    current, nxt = rotation
    os.chmod(current, 0o600)
    update = tmp_path / "update.dsse.json"
    doc = _ok("trust", "sign-update", nxt, "--key", alice.key, "--out", update)
    assert doc["written"] and [a["name"] for a in doc["added"]] == ["alice"] and not doc["new_policy_threshold_met"]
    _ok("trust", "sign-update", update, "--key", bob.key)  # a later signer, elsewhere
    doc = _ok("trust", "sign-update", update, "--key", carol.key)
    assert doc["new_policy_threshold_met"] and doc["signatures"] == 3
    old_version = load_policy(current).version
    doc = _ok("trust", "apply", current, update)
    new = load_policy(current)
    assert doc["old_version"] == old_version and doc["new_version"] == new.version > old_version
    assert [s["name"] for s in doc["current_signers"]] == ["alice", "bob"]
    assert [s["name"] for s in doc["new_signers"]] == ["alice", "carol"]
    assert doc["added"] == ["carol"] and doc["removed"] == ["bob"] and doc["revoked"] == []
    assert [k.name for k in new.keys] == ["alice", "carol"]
    payload = base64.b64decode(json.loads(update.read_text())["payload"])
    assert current.read_bytes() == payload  # exactly the signed bytes
    assert doc["new_sha256"] == hashlib.sha256(payload).hexdigest() == new.sha256
    assert current.stat().st_mode & 0o777 == 0o600  # mode kept


def test_text_output_says_what_changed(rotation: Policies, alice: KeyPair, bob: KeyPair, carol: KeyPair) -> None:
    current, nxt = rotation
    r = cli_inproc("trust", "sign-update", nxt, "--key", alice.key, "--key", bob.key, "--key", carol.key)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "next.dsse.json" in r.stdout  # the default name beside the draft
    assert f"note: key {bob.signer.keyid[:16]}… is not in the new policy" in r.stdout  # bob, rotated out, vouches as a current key
    r = cli_inproc("trust", "apply", current, nxt.with_name("next.dsse.json"))
    assert r.returncode == 0, r.stderr
    assert "version" in r.stdout and "added: carol" in r.stdout and "removed: bob" in r.stdout


def test_the_update_is_an_ordinary_dsse_envelope(rotation: Policies, alice: KeyPair, bob: KeyPair, carol: KeyPair,
                                                  tmp_path: Path) -> None:
    """Any DSSE verifier checks it: PAE over the payload type and the exact payload, base64 signatures."""
    _, nxt = rotation
    update = tmp_path / "u.dsse.json"
    _ok("trust", "sign-update", nxt, "--key", alice.key, "--key", carol.key, "--out", update)
    doc = json.loads(update.read_text())
    assert doc["payloadType"] == UPDATE_PAYLOAD_TYPE
    payload = base64.b64decode(doc["payload"])
    t = doc["payloadType"].encode()
    pae = b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)
    for sig, kp in zip(doc["signatures"], (alice, carol), strict=True):
        pub = load_public_file(kp.pub)
        raw = base64.b64decode(sig["sig"])
        if isinstance(pub, ed25519.Ed25519PublicKey):
            pub.verify(raw, pae)
        else:
            pub.verify(raw, pae, ec.ECDSA(hashes.SHA256()))
        assert sig["keyid"] == kp.signer.keyid


# -- refusals: signatures and version (exit 4) --------------------------------------------------------


def test_too_few_current_keys_is_refused(rotation: Policies, alice: KeyPair, carol: KeyPair, tmp_path: Path) -> None:
    current, nxt = rotation
    update = tmp_path / "u.dsse.json"
    _ok("trust", "sign-update", nxt, "--key", alice.key, "--key", carol.key, "--out", update)  # the new keys only
    before = current.read_bytes()
    line = assert_cli_error(cli_inproc("trust", "apply", current, update), 4, "of the current policy", "requires 2")
    assert "alice" in line
    assert_cli_json_error(cli_inproc("trust", "apply", current, update, "--json"), 4, "PolicyUpdateError")
    _unchanged(current, before)


def test_current_keys_without_the_new_ones_is_refused(rotation: Policies, alice: KeyPair, bob: KeyPair,
                                                      tmp_path: Path) -> None:
    current, nxt = rotation
    update = tmp_path / "u.dsse.json"
    _ok("trust", "sign-update", nxt, "--key", alice.key, "--key", bob.key, "--out", update)  # carol, a new key, did not sign
    before = current.read_bytes()
    r = cli_inproc("trust", "apply", current, update)
    line = assert_cli_error(r, 4, "of the new policy", "requires 2")
    assert "carol" in r.stderr  # the hint names who still has to sign
    assert "alice" in line
    _unchanged(current, before)


def test_replay_and_lower_versions_are_refused(rotation: Policies, alice: KeyPair, bob: KeyPair, carol: KeyPair,
                                               tmp_path: Path) -> None:
    current, nxt = rotation
    update = tmp_path / "u.dsse.json"
    _ok("trust", "sign-update", nxt, "--key", alice.key, "--key", bob.key, "--key", carol.key, "--out", update)
    _ok("trust", "apply", current, update)
    before = current.read_bytes()
    assert_cli_error(cli_inproc("trust", "apply", current, update), 4, "the same version as the policy in force")
    assert_cli_json_error(cli_inproc("trust", "apply", current, update, "--json"), 4, "PolicyReplayError")
    _unchanged(current, before)


def test_an_older_update_is_refused_after_a_newer_one(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair,
                                                      carol: KeyPair, tmp_path: Path) -> None:
    current = make_policy(alice, bob, name="current.json")
    v_a = _draft(current, "a.json", ("add", str(carol.pub), "--name", "carol"))
    v_b = _draft(v_a, "b.json", ("set-threshold", "2"))
    ua, ub = tmp_path / "a.dsse.json", tmp_path / "b.dsse.json"
    _ok("trust", "sign-update", v_a, "--key", alice.key, "--key", carol.key, "--out", ua)  # enough for either policy
    _ok("trust", "sign-update", v_b, "--key", alice.key, "--key", carol.key, "--out", ub)
    _ok("trust", "apply", current, ub)  # skipping a version is fine: each update stands alone
    before = current.read_bytes()
    assert_cli_error(cli_inproc("trust", "apply", current, ua), 4, "a lower version than the policy in force")
    _unchanged(current, before)


def test_an_expired_current_key_does_not_count(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair,
                                               carol: KeyPair, tmp_path: Path) -> None:
    from test_revoked_expired_keys import PAST, _set_expiry

    current = make_policy(alice, bob, name="current.json")
    nxt = _draft(current, "next.json", ("add", str(carol.pub), "--name", "carol"))
    _set_expiry(current, "alice", PAST)
    update = tmp_path / "u.dsse.json"
    _ok("trust", "sign-update", nxt, "--key", alice.key, "--out", update)
    before = current.read_bytes()
    assert_cli_error(cli_inproc("trust", "apply", current, update), 4, "of the current policy", "alice",
                     "is expired at 2020-01-01T00:00:00Z")
    _unchanged(current, before)


def test_a_revoked_current_key_does_not_count(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair,
                                              carol: KeyPair, tmp_path: Path) -> None:
    current = make_policy(alice, bob, name="current.json")
    nxt = _draft(current, "next.json", ("add", str(carol.pub), "--name", "carol"))
    _ok("trust", "revoke", current, "alice", "--reason", "stolen")
    update = tmp_path / "u.dsse.json"
    _ok("trust", "sign-update", nxt, "--key", alice.key, "--out", update)
    assert_cli_error(cli_inproc("trust", "apply", current, update), 4, "alice", "is revoked: stolen")


def test_an_update_may_not_drop_a_revocation(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair,
                                             tmp_path: Path) -> None:
    current = make_policy(alice, bob, name="current.json")
    _ok("trust", "revoke", current, "bob", "--reason", "leaked")
    doc = json.loads(current.read_text())
    doc["revoked"] = []
    doc["version"] += 1
    draft = tmp_path / "unrevoke.json"
    draft.write_text(json.dumps(doc))
    update = tmp_path / "u.dsse.json"
    _ok("trust", "sign-update", draft, "--key", alice.key, "--out", update)
    before = current.read_bytes()
    assert_cli_error(cli_inproc("trust", "apply", current, update), 4, "drops the revocation of 'bob'", "leaked")
    _unchanged(current, before)


def test_revocation_travels_by_update(make_bundle: Callable[..., Path], make_policy: Callable[..., Path], alice: KeyPair,
                                      bob: KeyPair, tmp_path: Path) -> None:
    current = make_policy(alice, bob, name="current.json")
    by_bob = make_bundle(signer=bob)
    assert cli_inproc("verify", by_bob, "--trust", current).returncode == 0
    nxt = _draft(current, "next.json", ("revoke", "bob", "--reason", "token lost"))
    update = tmp_path / "u.dsse.json"
    _ok("trust", "sign-update", nxt, "--key", alice.key, "--out", update)
    doc = _ok("trust", "apply", current, update)
    assert doc["revoked"] == ["bob"]
    assert_cli_error(cli_inproc("verify", by_bob, "--trust", current), 4, "bob", "is revoked: token lost")


# -- refusals: malformed (exit 2 policy, exit 4 envelope) -------------------------------------------------


def _signed(payload: bytes, *signers: KeyPair, payload_type: str = UPDATE_PAYLOAD_TYPE) -> bytes:
    return envelope_bytes(payload_type, payload, [s.signer.sign(payload_type, payload) for s in signers])


@pytest.mark.parametrize(("mutate", "fragment"), [
    (lambda d: d.update(threshold=3), "needs 3 signer(s) but lists 2 key(s)"),  # a threshold above its keys
    (lambda d: d.update(treshold=1), "unknown field(s): treshold"),
    (lambda d: d.pop("keys"), "lacks required field(s): keys"),
])
def test_a_signed_but_malformed_new_policy_is_exit_2(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair,
                                                     tmp_path: Path, mutate: Callable[[dict[str, Any]], object],
                                                     fragment: str) -> None:
    current = make_policy(alice, bob, name="current.json")
    doc = json.loads(current.read_text())
    doc["version"] += 1
    mutate(doc)
    update = tmp_path / "u.dsse.json"
    update.write_bytes(_signed(json.dumps(doc).encode(), alice, bob))
    before = current.read_bytes()
    assert_cli_error(cli_inproc("trust", "apply", current, update), 2, fragment)
    _unchanged(current, before)


def test_a_payload_that_is_not_json_is_exit_2(make_policy: Callable[..., Path], alice: KeyPair, tmp_path: Path) -> None:
    current = make_policy(alice, name="current.json")
    update = tmp_path / "u.dsse.json"
    update.write_bytes(_signed(b"\xff not json", alice))
    assert_cli_error(cli_inproc("trust", "apply", current, update), 2, "is malformed")


def test_an_unsigned_malformed_payload_is_refused_for_its_signatures_first(make_policy: Callable[..., Path],
                                                                            alice: KeyPair, bob: KeyPair,
                                                                            tmp_path: Path) -> None:
    """The exact signed bytes are checked before the payload is parsed: a stranger's garbage is exit 4, not 2."""
    current = make_policy(alice, name="current.json")
    update = tmp_path / "u.dsse.json"
    update.write_bytes(_signed(b"{garbage", bob))
    assert_cli_error(cli_inproc("trust", "apply", current, update), 4, "signed by 0 valid key(s) of the current policy")


@pytest.mark.parametrize("what", ["garbage", "bundle", "oversized", "no-signatures"])
def test_a_bad_envelope_is_exit_4(make_policy: Callable[..., Path], alice: KeyPair, bundle: Path, tmp_path: Path,
                                  what: str) -> None:
    current = make_policy(alice, name="current.json")
    update = tmp_path / "u.dsse.json"
    if what == "garbage":
        update.write_bytes(os.urandom(200))
    elif what == "bundle":  # a bundle's envelope, validly signed by alice, is not a policy update
        shutil.copyfile(bundle / "envelope.dsse.json", update)
    elif what == "oversized":
        update.write_bytes(b" " * (2 * 1024 * 1024 + 1))
    else:
        update.write_bytes(envelope_bytes(UPDATE_PAYLOAD_TYPE, current.read_bytes(), []))
    before = current.read_bytes()
    err = assert_cli_json_error(cli_inproc("trust", "apply", current, update, "--json"), 4, "EnvelopeError", "u.dsse.json")
    if what == "bundle":
        assert "not a trust policy update" in err["message"]
    _unchanged(current, before)


@pytest.mark.parametrize("what", ["folder", "symlink"])
def test_an_update_that_is_no_plain_file_is_exit_2(rotation: Policies, alice: KeyPair, bob: KeyPair, carol: KeyPair,
                                                   tmp_path: Path, what: str) -> None:
    current, nxt = rotation
    real = tmp_path / "real.dsse.json"
    _ok("trust", "sign-update", nxt, "--key", alice.key, "--key", bob.key, "--key", carol.key, "--out", real)
    update = tmp_path / "u.dsse.json"
    if what == "folder":
        update.mkdir()
    else:
        update.symlink_to(real)
    before = current.read_bytes()
    assert_cli_error(cli_inproc("trust", "apply", current, update), 2, "u.dsse.json", "give the file itself")
    _unchanged(current, before)


def test_a_missing_update_or_policy_is_exit_2(make_policy: Callable[..., Path], alice: KeyPair, tmp_path: Path) -> None:
    current = make_policy(alice, name="current.json")
    assert_cli_error(cli_inproc("trust", "apply", current, tmp_path / "nope.dsse.json"), 2, "not found")
    assert_cli_error(cli_inproc("trust", "apply", tmp_path / "nope.json", tmp_path / "nope.dsse.json"), 2, "not found")


# -- sign-update refusals and co-signing ------------------------------------------------------------------


def test_sign_update_refuses_a_draft_no_host_could_apply(make_policy: Callable[..., Path], alice: KeyPair,
                                                         tmp_path: Path) -> None:
    draft = make_policy(alice, name="draft.json")
    doc = json.loads(draft.read_text())
    doc["threshold"] = 2
    draft.write_text(json.dumps(doc))
    out = tmp_path / "u.dsse.json"
    assert_cli_error(cli_inproc("trust", "sign-update", draft, "--key", alice.key, "--out", out), 2,
                     "needs 2 signer(s) but lists 1 key(s)")
    draft.write_text('{"version": 2, "threshold": 1, "keys": [], "extra": 1}')
    assert_cli_error(cli_inproc("trust", "sign-update", draft, "--key", alice.key, "--out", out), 2, "unknown field(s): extra")
    assert_cli_error(cli_inproc("trust", "sign-update", tmp_path / "none.json", "--key", alice.key, "--out", out), 2, "not found")
    assert not out.exists()


def test_cosigning_twice_adds_nothing(rotation: Policies, alice: KeyPair, tmp_path: Path) -> None:
    _, nxt = rotation
    update = tmp_path / "u.dsse.json"
    _ok("trust", "sign-update", nxt, "--key", alice.key, "--out", update)
    before = update.read_bytes()
    doc = _ok("trust", "sign-update", update, "--key", alice.key)
    assert not doc["written"] and [a["name"] for a in doc["already_signed"]] == ["alice"]
    assert update.read_bytes() == before
    doc = _ok("trust", "sign-update", nxt, "--key", alice.key, "--key", alice.key, "--out", tmp_path / "twice.dsse.json")
    assert doc["signatures"] == 1  # the same key given twice signs once


def test_sign_update_never_overwrites_another_update(rotation: Policies, alice: KeyPair, bob: KeyPair,
                                                     tmp_path: Path) -> None:
    _, nxt = rotation
    update = tmp_path / "u.dsse.json"
    _ok("trust", "sign-update", nxt, "--key", alice.key, "--out", update)
    before = update.read_bytes()
    assert_cli_error(cli_inproc("trust", "sign-update", nxt, "--key", bob.key, "--out", update), 2, "already exists")
    assert update.read_bytes() == before


def test_cosigning_a_tampered_update_is_refused(rotation: Policies, alice: KeyPair, bob: KeyPair, tmp_path: Path) -> None:
    _, nxt = rotation
    update = tmp_path / "u.dsse.json"
    _ok("trust", "sign-update", nxt, "--key", alice.key, "--out", update)
    doc = json.loads(update.read_text())
    doc["payloadType"] = "application/vnd.in-toto+json"
    update.write_text(json.dumps(doc))
    before = update.read_bytes()
    assert_cli_error(cli_inproc("trust", "sign-update", update, "--key", bob.key), 4, "not a trust policy update")
    assert update.read_bytes() == before


def test_a_cosigned_update_with_a_swapped_payload_does_not_apply(rotation: Policies, alice: KeyPair, bob: KeyPair,
                                                                 carol: KeyPair, tmp_path: Path) -> None:
    """Signatures are over the exact payload: changing one byte of it leaves none that counts."""
    current, nxt = rotation
    update = tmp_path / "u.dsse.json"
    _ok("trust", "sign-update", nxt, "--key", alice.key, "--key", bob.key, "--key", carol.key, "--out", update)
    doc = json.loads(update.read_text())
    payload = base64.b64decode(doc["payload"]).replace(b'"threshold": 2', b'"threshold": 1')
    doc["payload"] = base64.b64encode(payload).decode()
    update.write_text(json.dumps(doc))
    before = current.read_bytes()
    assert_cli_error(cli_inproc("trust", "apply", current, update), 4, "signed by 0 valid key(s) of the current policy")
    _unchanged(current, before)


# -- the audit line ------------------------------------------------------------------------------------------


def test_apply_with_a_registry_writes_one_audit_line_each(rotation: Policies, alice: KeyPair, bob: KeyPair, carol: KeyPair,
                                                          bundle: Path, tmp_path: Path,
                                                          make_policy: Callable[..., Path]) -> None:
    current, nxt = rotation
    reg = tmp_path / "registry"
    do_install(bundle, reg, make_policy(alice, name="install-policy.json"))
    n = len(audit_lines(reg))
    update = tmp_path / "u.dsse.json"
    _ok("trust", "sign-update", nxt, "--key", alice.key, "--out", update)
    old = load_policy(current)
    assert cli_inproc("trust", "apply", current, update, "--registry", reg).returncode == 4
    _ok("trust", "sign-update", update, "--key", bob.key, "--key", carol.key)
    doc = _ok("trust", "apply", current, update, "--registry", reg)
    assert doc["audited"]
    lines = audit_lines(reg)[n:]
    assert [x["command"] for x in lines] == ["trust-apply", "trust-apply"]
    refused, applied = lines
    assert refused["result"] == "refused" and refused["error"]["type"] == "PolicyUpdateError"
    assert refused["error"]["exit_code"] == 4
    assert applied["result"] == "applied"
    assert applied["old_version"] == old.version and applied["new_version"] == load_policy(current).version
    assert applied["old_policy_sha256"] == old.sha256 and applied["new_policy_sha256"] == load_policy(current).sha256
    assert applied["current_signers"] == [alice.signer.keyid, bob.signer.keyid]
    assert applied["new_signers"] == [alice.signer.keyid, carol.signer.keyid]
    assert cli_inproc("log", "verify", "--registry", reg).returncode == 0


def test_apply_with_a_missing_registry_changes_nothing(rotation: Policies, alice: KeyPair, bob: KeyPair, carol: KeyPair,
                                                       tmp_path: Path) -> None:
    current, nxt = rotation
    update = tmp_path / "u.dsse.json"
    _ok("trust", "sign-update", nxt, "--key", alice.key, "--key", bob.key, "--key", carol.key, "--out", update)
    before = current.read_bytes()
    assert_cli_error(cli_inproc("trust", "apply", current, update, "--registry", tmp_path / "no-registry"), 6, "no registry")
    _unchanged(current, before)
    assert not (tmp_path / "no-registry").exists()


# -- a token key signs updates like a key file -----------------------------------------------------------------


def test_a_token_key_signs_an_update(softhsm: Any, make_policy: Callable[..., Path], alice: KeyPair, carol: KeyPair,
                                     tmp_path: Path) -> None:
    """The officer's key never leaves the token; its signature on the update is an ordinary DSSE one."""
    uri = softhsm.uri("officer")
    _ok("keygen", "officer", "--dir", tmp_path / "keys", "--pkcs11", uri)
    officer_pub = tmp_path / "keys" / "officer.pub"
    current = make_policy(alice, name="current.json")
    _ok("trust", "add", current, officer_pub, "--name", "officer")
    _ok("trust", "set-threshold", current, "2")
    nxt = _draft(current, "next.json", ("add", str(carol.pub), "--name", "carol"))
    update = tmp_path / "u.dsse.json"
    _ok("trust", "sign-update", nxt, "--key", alice.key, "--out", update)
    doc = _ok("trust", "sign-update", update, "--key", uri)
    assert [a["name"] for a in doc["added"]] == ["officer"] and doc["new_policy_threshold_met"]
    doc = _ok("trust", "apply", current, update)
    assert [s["name"] for s in doc["current_signers"]] == ["alice", "officer"]
    assert [k.name for k in load_policy(current).keys] == ["alice", "officer", "carol"]


def test_apply_never_loads_the_token_binding(rotation: Policies, alice: KeyPair, bob: KeyPair, carol: KeyPair,
                                             tmp_path: Path) -> None:
    """The isolated host applies updates with no PKCS#11 library: ``trust apply`` never imports the binding."""
    import subprocess
    import sys

    current, nxt = rotation
    update = tmp_path / "u.dsse.json"
    _ok("trust", "sign-update", nxt, "--key", alice.key, "--key", bob.key, "--key", carol.key, "--out", update)
    code = ("import sys\nfrom airpack.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "assert 'pkcs11' not in sys.modules and 'airpack.pkcs11_keys' not in sys.modules, 'token code loaded'\n")
    r = subprocess.run([sys.executable, "-c", code, "trust", "apply", str(current), str(update), "-q"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert load_policy(current).version > 1
