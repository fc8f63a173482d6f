"""Keys that no longer count: revoked for good, or past their expiry.

A revoked key moves to the policy's ``revoked`` list with its reason and never
counts again (adding it back is refused); an expired key stays listed but its
signatures stop counting from the second of ``expires`` on. A bundle whose only
trusted signatures come from such keys is refused (exit 4) with a message that
names each key, its state and the reason or date; a policy left with too few
valid keys is a configuration error (exit 2) that says how many are expired or
revoked. Every refusal leaves the policy file as it was.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeyPair
from threat_helpers import assert_cli_error, assert_cli_json_error, cli_inproc

from airpack.errors import KeyNotValidError, PolicyError, SignatureError
from airpack.manifest import ENVELOPE_NAME
from airpack.rules import KeyState, NotCounted, check_threshold, key_state
from airpack.signing import load_public_file, parse_envelope
from airpack.trust import TrustedKey, load_policy, save_policy, verify_envelope

PAST = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
FUTURE = dt.datetime(2099, 1, 1, tzinfo=dt.UTC)


def _set_expiry(policy: Path, name: str, when: dt.datetime) -> None:
    """Give a key an expiry in the file (as a policy written with --expires long ago would hold it)."""
    p = load_policy(policy)
    keys = tuple(TrustedKey(k.name, k.keyid, k.algorithm, k.public_key, k.pem, expires=when) if k.name == name else k
                 for k in p.keys)
    save_policy(type(p)(keys=keys, threshold=p.threshold, source=p.source, version=p.version, revoked=p.revoked), policy)


# -- the pure rules --------------------------------------------------------------------------------


def test_key_state_at_a_moment() -> None:
    t = dt.datetime(2027, 6, 30, tzinfo=dt.UTC)
    assert key_state(expires=None) is KeyState.VALID
    assert key_state(expires=t, now=t - dt.timedelta(seconds=1)) is KeyState.VALID
    assert key_state(expires=t, now=t) is KeyState.EXPIRED  # from the very second on
    assert key_state(expires=None, revoked=True) is KeyState.REVOKED
    assert key_state(expires=t, revoked=True, now=t) is KeyState.REVOKED  # revoked wins


def test_threshold_refusal_names_keys_that_do_not_count() -> None:
    gone = [NotCounted("alice", "a" * 64, KeyState.REVOKED, "laptop stolen"),
            NotCounted("bob", "b" * 64, KeyState.EXPIRED, "2026-01-01T00:00:00Z")]
    with pytest.raises(KeyNotValidError) as info:
        check_threshold([], threshold=1, where="b/envelope.dsse.json", source="p.json", missing=["carol"], not_counted=gone)
    msg = info.value.message
    assert info.value.exit_code == 4 and isinstance(info.value, SignatureError)
    assert "alice (aaaaaaaaaaaa) is revoked: laptop stolen" in msg
    assert "bob (bbbbbbbbbbbb) is expired at 2026-01-01T00:00:00Z" in msg
    assert "carol" in info.value.hint


# -- revoke ----------------------------------------------------------------------------------------


def test_revoked_signer_is_refused_naming_key_state_and_reason(bundle: Path, make_policy: Callable[..., Path],
                                                               alice: KeyPair, bob: KeyPair) -> None:
    policy = make_policy(alice, bob)
    assert cli_inproc("verify", bundle, "--trust", policy).returncode == 0
    r = cli_inproc("trust", "revoke", policy, "alice", "--reason", "laptop stolen 2026-11-30")
    assert r.returncode == 0, r.stderr
    line = assert_cli_error(cli_inproc("verify", bundle, "--trust", policy), 4, "alice", "is revoked: laptop stolen 2026-11-30")
    assert alice.signer.keyid[:12] in line
    err = assert_cli_json_error(cli_inproc("verify", bundle, "--trust", policy, "--json"), 4, "KeyNotValidError")
    assert "revoked" in err["message"]


def test_revoke_by_keyid_keeps_the_key_with_reason_and_time(make_policy: Callable[..., Path], alice: KeyPair,
                                                            bob: KeyPair) -> None:
    policy = make_policy(alice, bob)
    r = cli_inproc("trust", "revoke", policy, bob.signer.keyid, "--reason", "left the team", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["revoked_key"]["name"] == "bob" and doc["revoked_key"]["reason"] == "left the team"
    p = load_policy(policy)
    assert [k.name for k in p.keys] == ["alice"]
    [gone] = p.revoked
    assert gone.keyid == bob.signer.keyid and gone.reason == "left the team"
    assert abs((dt.datetime.now(dt.UTC) - gone.revoked_at).total_seconds()) < 60
    raw = json.loads(policy.read_text())["revoked"][0]
    assert set(raw) == {"name", "keyid", "algorithm", "public_key", "reason", "revoked_at"}


def test_adding_a_revoked_key_back_is_refused(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair) -> None:
    policy = make_policy(alice, bob)
    assert cli_inproc("trust", "revoke", policy, "bob", "--reason", "key leaked").returncode == 0
    before = policy.read_bytes()
    assert_cli_error(cli_inproc("trust", "add", policy, bob.pub, "--name", "bob-again"), 2, "is revoked", "key leaked")
    assert policy.read_bytes() == before


@pytest.mark.parametrize(("key", "reason", "fragment"), [
    ("bob", "again", "was revoked at"),  # revoked twice
    ("mallory", "x", "no key named or with key id 'mallory'"),
    ("alice", "", "--reason must be one printable line"),
    ("alice", "two\nlines", "--reason must be one printable line"),
    ("alice", "x" * 501, "--reason must be one printable line"),
])
def test_revoke_refusals_change_nothing(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair, key: str,
                                        reason: str, fragment: str) -> None:
    policy = make_policy(alice, bob)
    assert cli_inproc("trust", "revoke", policy, "bob", "--reason", "first").returncode == 0
    before = policy.read_bytes()
    assert_cli_error(cli_inproc("trust", "revoke", policy, key, "--reason", reason), 2, fragment)
    assert policy.read_bytes() == before


def test_revoking_below_the_threshold_is_allowed_and_verify_then_refuses(bundle: Path, make_policy: Callable[..., Path],
                                                                         alice: KeyPair) -> None:
    """A compromised key must stop counting at once, even if nothing verifies until a replacement is added."""
    policy = make_policy(alice)
    r = cli_inproc("trust", "revoke", policy, "alice", "--reason", "compromised")
    assert r.returncode == 0, r.stderr
    assert "no bundle verifies until you add keys" in r.stdout
    assert_cli_error(cli_inproc("verify", bundle, "--trust", policy), 2, "lists 0 valid key(s)", "1 revoked (alice)")


def test_cosigning_over_a_revoked_signature_is_refused(bundle: Path, make_policy: Callable[..., Path], alice: KeyPair,
                                                       bob: KeyPair) -> None:
    policy = make_policy(alice, bob)
    assert cli_inproc("trust", "revoke", policy, "alice", "--reason", "stolen").returncode == 0
    before = (bundle / ENVELOPE_NAME).read_bytes()
    assert_cli_error(cli_inproc("sign", bundle, "--key", bob.key, "--trust", policy), 4, "was made by a revoked key", "stolen")
    assert (bundle / ENVELOPE_NAME).read_bytes() == before


def test_a_valid_cosigner_still_carries_a_bundle_a_revoked_key_signed(bundle: Path, make_policy: Callable[..., Path],
                                                                       alice: KeyPair, bob: KeyPair) -> None:
    policy = make_policy(alice, bob)
    assert cli_inproc("sign", bundle, "--key", bob.key).returncode == 0
    assert cli_inproc("trust", "revoke", policy, "alice", "--reason", "stolen").returncode == 0
    r = cli_inproc("verify", bundle, "--trust", policy, "--json")
    assert r.returncode == 0, r.stderr
    assert [s["name"] for s in json.loads(r.stdout)["signers"]] == ["bob"]  # alice's signature does not count


# -- expiry ----------------------------------------------------------------------------------------


def test_expired_signer_is_refused_naming_the_date(bundle: Path, make_policy: Callable[..., Path], alice: KeyPair,
                                                   bob: KeyPair) -> None:
    policy = make_policy(alice, bob)
    _set_expiry(policy, "alice", PAST)
    line = assert_cli_error(cli_inproc("verify", bundle, "--trust", policy), 4, "alice", "is expired at 2020-01-01T00:00:00Z")
    assert "1 valid key" not in line
    assert_cli_json_error(cli_inproc("verify", bundle, "--trust", policy, "--json"), 4, "KeyNotValidError")


def test_a_key_counts_until_its_expiry(bundle: Path, make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair) -> None:
    policy = make_policy(alice, bob)
    t = dt.datetime(2030, 6, 1, tzinfo=dt.UTC)
    _set_expiry(policy, "alice", t)
    p = load_policy(policy)
    env = parse_envelope((bundle / ENVELOPE_NAME).read_bytes(), where="e")
    from airpack.signing import PAYLOAD_TYPE

    assert [k.name for k in verify_envelope(env, p, expected_type=PAYLOAD_TYPE, where="e", now=t - dt.timedelta(seconds=1)).signers] == ["alice"]
    with pytest.raises(KeyNotValidError, match="expired at 2030-06-01T00:00:00Z"):
        verify_envelope(env, p, expected_type=PAYLOAD_TYPE, where="e", now=t)


def test_only_key_expired_is_an_unusable_policy(bundle: Path, make_policy: Callable[..., Path], alice: KeyPair) -> None:
    policy = make_policy(alice)
    _set_expiry(policy, "alice", PAST)
    assert_cli_error(cli_inproc("verify", bundle, "--trust", policy), 2, "lists 0 valid key(s)",
                     "1 expired (alice since 2020-01-01T00:00:00Z)")


def test_trust_add_with_expires(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair) -> None:
    policy = make_policy(alice)
    r = cli_inproc("trust", "add", policy, bob.pub, "--name", "bob", "--expires", "2099-06-30", "--json")
    assert r.returncode == 0, r.stderr
    bob_doc = next(k for k in json.loads(r.stdout)["keys"] if k["name"] == "bob")
    assert bob_doc == {"name": "bob", "keyid": bob.signer.keyid, "algorithm": "ed25519", "state": "valid",
                       "expires": "2099-06-30T00:00:00Z"}
    assert load_policy(policy).keys[1].expires == dt.datetime(2099, 6, 30, tzinfo=dt.UTC)


@pytest.mark.parametrize(("value", "stored"), [
    ("2099-06-30T12:30:00Z", "2099-06-30T12:30:00Z"),
    ("2099-06-30T12:30:00+02:00", "2099-06-30T10:30:00Z"),
    ("2099-06-30T12:30", "2099-06-30T12:30:00Z"),  # no offset: UTC
])
def test_expires_forms_are_stored_in_utc(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair, value: str,
                                         stored: str) -> None:
    policy = make_policy(alice)
    assert cli_inproc("trust", "add", policy, bob.pub, "--name", "bob", "--expires", value).returncode == 0
    assert json.loads(policy.read_text())["keys"][1]["expires"] == stored


@pytest.mark.parametrize(("value", "fragment"), [("2020-01-01", "is already past"), ("next tuesday", "is not an ISO date"),
                                                 ("2099-13-01", "is not an ISO date"),
                                                 ("9999-12-31T23:00:00-05:00", "is not an ISO date")])
def test_trust_add_bad_expires_changes_nothing(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair, value: str,
                                               fragment: str) -> None:
    policy = make_policy(alice)
    before = policy.read_bytes()
    assert_cli_error(cli_inproc("trust", "add", policy, bob.pub, "--name", "bob", "--expires", value), 2, fragment)
    assert policy.read_bytes() == before


def test_threshold_and_remove_count_valid_keys(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair,
                                               make_key: Callable[..., KeyPair]) -> None:
    carol = make_key("carol")
    policy = make_policy(alice, bob, carol)
    _set_expiry(policy, "carol", PAST)
    before = policy.read_bytes()
    assert_cli_error(cli_inproc("trust", "set-threshold", policy, "3"), 2, "lists 2 key(s) valid (and 1 expired)")
    assert policy.read_bytes() == before
    assert cli_inproc("trust", "set-threshold", policy, "2").returncode == 0
    assert_cli_error(cli_inproc("trust", "remove", policy, "bob"), 2, "1 valid key(s) for a threshold of 2")
    r = cli_inproc("trust", "remove", policy, "carol")  # an expired key may always go: it counted for nothing
    assert r.returncode == 0, r.stderr


def test_trust_list_shows_state_expiry_and_reason(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair,
                                                  make_key: Callable[..., KeyPair]) -> None:
    carol = make_key("carol")
    policy = make_policy(alice, bob, carol)
    _set_expiry(policy, "alice", PAST)
    _set_expiry(policy, "bob", FUTURE)
    assert cli_inproc("trust", "revoke", policy, "carol", "--reason", "token lost").returncode == 0
    r = cli_inproc("trust", "list", policy)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "threshold 1 of 2 key(s) (1 valid)" in out
    assert "expired  since 2020-01-01T00:00:00Z" in out
    assert "valid  expires 2099-01-01T00:00:00Z" in out
    assert "revoked" in out and "token lost" in out
    doc = json.loads(cli_inproc("trust", "list", policy, "--json").stdout)
    assert {k["name"]: k["state"] for k in doc["keys"]} == {"alice": "expired", "bob": "valid"}
    assert doc["revoked"][0]["name"] == "carol" and doc["revoked"][0]["reason"] == "token lost"
    assert doc["valid_keys"] == 1


# -- the format ------------------------------------------------------------------------------------


def test_every_change_raises_the_version(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair) -> None:
    policy = make_policy()
    versions = [load_policy(policy).version]
    for args in (("add", policy, alice.pub, "--name", "alice"), ("add", policy, bob.pub, "--name", "bob"),
                 ("set-threshold", policy, "2"), ("set-threshold", policy, "1"), ("revoke", policy, "bob", "--reason", "x")):
        r = cli_inproc("trust", *args)
        assert r.returncode == 0, r.stderr
        versions.append(load_policy(policy).version)
    assert versions == [1, 2, 3, 4, 5, 6]


def test_a_policy_written_before_revocation_existed_still_reads(tmp_path: Path, alice: KeyPair, bundle: Path) -> None:
    """Today's files: version 1, no ``revoked``, no ``expires``."""
    policy = tmp_path / "old.json"
    pem = alice.pub.read_text()
    policy.write_text(json.dumps({"version": 1, "threshold": 1, "keys": [
        {"name": "alice", "keyid": alice.signer.keyid, "algorithm": "ed25519", "public_key": pem}]}))
    p = load_policy(policy)
    assert p.version == 1 and p.revoked == () and p.keys[0].expires is None
    assert cli_inproc("verify", bundle, "--trust", policy).returncode == 0
    assert p.keys[0].public_key.public_bytes_raw() == load_public_file(alice.pub).public_bytes_raw()  # type: ignore[union-attr]


def test_a_key_both_trusted_and_revoked_is_malformed(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair) -> None:
    policy = make_policy(alice, bob)
    doc = json.loads(policy.read_text())
    k = doc["keys"][1]
    doc["revoked"] = [dict(k, reason="x", revoked_at="2026-01-01T00:00:00Z")]
    policy.write_text(json.dumps(doc))
    with pytest.raises(PolicyError, match=r"both trusted .* and revoked"):
        load_policy(policy)
