"""Threats against who signed: untrusted keys, moved signatures, forged key ids, thresholds.

DESIGN.md: exit 4 for everything about the envelope and who signed; the key
id in a signature is only a hint; distinct trusted keys are counted.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from conftest import KeyPair, verify
from threat_helpers import (
    SHARD1,
    assert_cli_error,
    assert_cli_json_error,
    cli_inproc,
    envelope_doc,
    payload,
    refused,
    resign,
    statement,
    write_envelope_doc,
)

from airpack.errors import BundleMismatchError, EnvelopeError, IntegrityError, SignatureError
from airpack.manifest import ENVELOPE_NAME, MANIFEST_NAME
from airpack.ops.pack import add_signature
from airpack.signing import PAYLOAD_TYPE

# -- who signed ----------------------------------------------------------------------------


def test_untrusted_signer_is_refused(make_bundle: Callable[..., Path], make_key: Callable[..., KeyPair],
                                     policy: Path) -> None:
    mallory = make_key("mallory")
    b = make_bundle(signer=mallory)
    e = refused(SignatureError, lambda: verify(b, policy), code=4, match="no valid signature")
    assert ENVELOPE_NAME in (e.path or "")
    r = cli_inproc("verify", b, "--trust", policy)
    assert_cli_error(r, 4, "no valid signature", ENVELOPE_NAME)


def test_untrusted_extra_signature_does_not_count(bundle: Path, make_key: Callable[..., KeyPair],
                                                  make_policy: Callable[..., Path], alice: KeyPair,
                                                  bob: KeyPair) -> None:
    mallory = make_key("mallory")
    add_signature(bundle, mallory.signer)
    one = make_policy(alice, bob, threshold=1, name="one.json")
    vb = verify(bundle, one)
    assert vb.signer_names == ["alice"]
    two = make_policy(alice, bob, threshold=2, name="two.json")
    refused(SignatureError, lambda: verify(bundle, two), code=4, match=r"1 distinct trusted signer\(s\) \(alice\)")


def test_one_payload_byte_changed_breaks_the_signature(bundle: Path, policy: Path) -> None:
    """Change the sequence 1 -> 7 in the signed payload; copy kept in step so only the signature can catch it."""
    data = payload(bundle)
    assert data.count(b'"sequence": 1') == 1
    forged = data.replace(b'"sequence": 1', b'"sequence": 7')
    assert len(forged) == len(data) and sum(a != b for a, b in zip(data, forged, strict=True)) == 1
    env = envelope_doc(bundle)
    env["payload"] = base64.b64encode(forged).decode()
    write_envelope_doc(bundle, env)
    (bundle / MANIFEST_NAME).write_bytes(forged)
    refused(SignatureError, lambda: verify(bundle, policy), code=4)
    assert_cli_error(cli_inproc("verify", bundle, "--trust", policy), 4, ENVELOPE_NAME)


def test_envelope_of_one_bundle_with_the_files_of_another(make_bundle: Callable[..., Path], tmp_path: Path,
                                                           policy: Path) -> None:
    from factories import make_model

    other_model = make_model(tmp_path / "src" / "other", shards=2, seed=7)
    a = make_bundle()
    b = make_bundle(model_dir=other_model)
    # Envelope and manifest copy of A moved onto B's files: every weight differs, with both digests.
    shutil.copy(a / ENVELOPE_NAME, b / ENVELOPE_NAME)
    shutil.copy(a / MANIFEST_NAME, b / MANIFEST_NAME)
    e = refused(BundleMismatchError, lambda: verify(b, policy), code=3)
    assert isinstance(e, BundleMismatchError)
    changed = {c.path: c for c in e.report.changed}
    assert SHARD1 in changed
    assert changed[SHARD1].expected_sha256 != changed[SHARD1].actual_sha256
    assert changed[SHARD1].actual_sha256 and changed[SHARD1].expected_sha256
    # Only the envelope moved: B's readable copy no longer matches the signed payload.
    c = make_bundle(model_dir=other_model)
    shutil.copy(a / ENVELOPE_NAME, c / ENVELOPE_NAME)
    refused(IntegrityError, lambda: verify(c, policy), code=3, match="differs from the signed payload")


def test_valid_signature_moved_onto_other_content(make_bundle: Callable[..., Path], policy: Path) -> None:
    """Alice's real signature over bundle A's payload, placed on bundle B's (different) payload."""
    a = make_bundle(sequence=1)
    b = make_bundle(sequence=2)
    env_b = envelope_doc(b)
    env_b["signatures"] = envelope_doc(a)["signatures"]
    write_envelope_doc(b, env_b)
    refused(SignatureError, lambda: verify(b, policy), code=4, match="no valid signature")


def test_wrong_payload_type_is_refused(bundle: Path, policy: Path, alice: KeyPair) -> None:
    # Signed properly, but as a different payload type.
    resign(bundle, statement(bundle), alice.signer, payload_type="application/json")
    refused(EnvelopeError, lambda: verify(bundle, policy), code=4, match="payload type 'application/json'")
    assert_cli_error(cli_inproc("verify", bundle, "--trust", policy), 4, "payload type")


def test_payload_type_relabelled_after_signing_is_refused(bundle: Path, policy: Path, alice: KeyPair) -> None:
    """A signature over PAE(json, payload) must not verify under the in-toto type (and vice versa)."""
    data = resign(bundle, statement(bundle), alice.signer, payload_type="application/json")
    env = envelope_doc(bundle)
    env["payloadType"] = PAYLOAD_TYPE
    write_envelope_doc(bundle, env)
    assert (bundle / MANIFEST_NAME).read_bytes() == data
    refused(SignatureError, lambda: verify(bundle, policy), code=4)


def test_unknown_predicate_type_is_refused(bundle: Path, policy: Path, alice: KeyPair) -> None:
    st = statement(bundle)
    st["predicateType"] = "https://airpack.dev/bundle/v2"
    resign(bundle, st, alice.signer)
    refused(EnvelopeError, lambda: verify(bundle, policy), code=4, match="unknown predicate type")
    assert_cli_error(cli_inproc("verify", bundle, "--trust", policy), 4, "predicate type")


def test_not_an_in_toto_statement_is_refused(bundle: Path, policy: Path, alice: KeyPair) -> None:
    st = statement(bundle)
    st["_type"] = "https://in-toto.io/Statement/v0.1"
    resign(bundle, st, alice.signer)
    refused(EnvelopeError, lambda: verify(bundle, policy), code=4, match="in-toto Statement v1")


# -- thresholds ------------------------------------------------------------------------------


def test_threshold_two_not_met_by_one_key_signing_twice(bundle: Path, make_policy: Callable[..., Path],
                                                        alice: KeyPair, bob: KeyPair) -> None:
    two = make_policy(alice, bob, threshold=2, name="two.json")
    st = statement(bundle)
    # Ed25519 signatures are deterministic: the same signature twice ...
    resign(bundle, st, alice.signer, alice.signer)
    assert len(envelope_doc(bundle)["signatures"]) == 2
    refused(SignatureError, lambda: verify(bundle, two), code=4, match=r"1 distinct trusted signer")
    # ... and with the second one's key id pointing at bob.
    env = envelope_doc(bundle)
    env["signatures"][1]["keyid"] = bob.signer.keyid
    write_envelope_doc(bundle, env)
    refused(SignatureError, lambda: verify(bundle, two), code=4, match=r"1 distinct trusted signer")


def test_threshold_two_not_met_by_two_different_ecdsa_signatures_of_one_key(
    bundle: Path, make_key: Callable[..., KeyPair], make_policy: Callable[..., Path], alice: KeyPair
) -> None:
    carol = make_key("carol", "ecdsa-p256")
    two = make_policy(alice, carol, threshold=2, name="two.json")
    resign(bundle, statement(bundle), carol.signer, carol.signer, carol.signer)
    sigs = [s["sig"] for s in envelope_doc(bundle)["signatures"]]
    assert len(set(sigs)) == 3  # ECDSA is randomised: three different, valid signatures
    refused(SignatureError, lambda: verify(bundle, two), code=4, match=r"1 distinct trusted signer\(s\) \(carol\)")


def test_keyid_naming_a_trusted_key_on_a_signature_by_another_key(
    make_bundle: Callable[..., Path], make_key: Callable[..., KeyPair], policy: Path, alice: KeyPair
) -> None:
    mallory = make_key("mallory")
    b = make_bundle(signer=mallory)
    env = envelope_doc(b)
    env["signatures"][0]["keyid"] = alice.signer.keyid
    write_envelope_doc(b, env)
    refused(SignatureError, lambda: verify(b, policy), code=4)
    assert_cli_error(cli_inproc("verify", b, "--trust", policy), 4, "no valid signature")


def test_keyid_swap_between_two_trusted_signers_still_counts_each_once(
    bundle: Path, make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair
) -> None:
    two = make_policy(alice, bob, threshold=2, name="two.json")
    resign(bundle, statement(bundle), alice.signer, bob.signer)
    env = envelope_doc(bundle)
    a, b = env["signatures"]
    a["keyid"], b["keyid"] = b["keyid"], a["keyid"]
    write_envelope_doc(bundle, env)
    assert verify(bundle, two).signer_names == ["alice", "bob"]


def test_key_id_change_alone_still_verifies(bundle: Path, policy: Path, bob: KeyPair) -> None:
    """DESIGN: the key id is only a hint; bytes that change no signed byte and no signature may verify."""
    for kid in ("", "0" * 64, bob.signer.keyid, "not-even-hex"):
        env = envelope_doc(bundle)
        env["signatures"][0]["keyid"] = kid
        write_envelope_doc(bundle, env)
        assert verify(bundle, policy).signer_names == ["alice"]
    env = envelope_doc(bundle)
    del env["signatures"][0]["keyid"]
    write_envelope_doc(bundle, env)
    assert verify(bundle, policy).signer_names == ["alice"]


def test_envelope_whitespace_change_still_verifies(bundle: Path, policy: Path) -> None:
    env = envelope_doc(bundle)
    (bundle / ENVELOPE_NAME).write_text(json.dumps(env, separators=(",", ":")))
    assert verify(bundle, policy).signer_names == ["alice"]


def test_ecdsa_p256_keys_are_accepted(make_bundle: Callable[..., Path], make_key: Callable[..., KeyPair],
                                      make_policy: Callable[..., Path], alice: KeyPair) -> None:
    carol = make_key("carol", "ecdsa-p256")
    b = make_bundle(signer=carol)
    pol = make_policy(carol, name="carol.json")
    assert verify(b, pol).signer_names == ["carol"]
    # Mixed algorithms meet a threshold of two.
    add_signature(b, alice.signer)
    two = make_policy(alice, carol, threshold=2, name="two.json")
    vb = verify(b, two)
    assert vb.signer_names == ["alice", "carol"]
    assert {k.algorithm for k in vb.signers} == {"ed25519", "ecdsa-p256"}


def test_cosigning_with_airpack_sign_meets_threshold_two(bundle: Path, make_policy: Callable[..., Path],
                                                         alice: KeyPair, bob: KeyPair) -> None:
    two = make_policy(alice, bob, threshold=2, name="two.json")
    r = cli_inproc("verify", bundle, "--trust", two, "--json")
    err = assert_cli_json_error(r, 4, "SignatureError")
    assert "requires 2" in err["message"]
    before_payload = payload(bundle)
    before_copy = (bundle / MANIFEST_NAME).read_bytes()

    r = cli_inproc("sign", bundle, "--key", bob.key, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["added"] is True
    assert payload(bundle) == before_payload  # the payload is never changed by co-signing
    assert (bundle / MANIFEST_NAME).read_bytes() == before_copy

    r = cli_inproc("verify", bundle, "--trust", two, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [s["name"] for s in doc["signers"]] == ["alice", "bob"]
    assert doc["threshold"] == 2

    # Signing again with the same key adds nothing.
    env_before = (bundle / ENVELOPE_NAME).read_bytes()
    r = cli_inproc("sign", bundle, "--key", bob.key, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["added"] is False
    assert (bundle / ENVELOPE_NAME).read_bytes() == env_before


def test_cosigner_refuses_to_sign_tampered_content(bundle: Path, bob: KeyPair) -> None:
    """The co-signer vouches for the bytes: sign hashes every file first and leaves the envelope alone."""
    env_before = (bundle / ENVELOPE_NAME).read_bytes()
    w = bundle / SHARD1
    data = bytearray(w.read_bytes())
    data[100] ^= 0x40
    w.write_bytes(bytes(data))
    r = cli_inproc("sign", bundle, "--key", bob.key)
    assert_cli_error(r, 3, "does not match its manifest")
    assert (bundle / ENVELOPE_NAME).read_bytes() == env_before
