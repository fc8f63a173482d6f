"""Co-signing vouches for a bundle: it must never lend weight to a signature nobody trusts.

``sign --trust POLICY`` (or ``AIRPACK_TRUST``) checks that every signature
already on the bundle verifies under a key of the policy before adding one:
a packer signature of 64 zero bytes, a stranger's signature or garbage is
exit 4 naming its key id, and nothing is written. Without a policy, sign says
(stderr, and ``signatures_checked`` in ``--json``) that it did not check them.
The content is checked against the manifest either way.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeyPair
from threat_helpers import SHARD1, assert_cli_error, assert_cli_json_error, cli_inproc, envelope_doc, flip_byte, write_envelope_doc

from airpack.errors import SignatureError
from airpack.manifest import ENVELOPE_NAME
from airpack.ops.pack import add_signature
from airpack.trust import load_policy


def _zero_signature(bundle: Path) -> str:
    """Replace the packer's signature with 64 zero bytes (keeping its key id); returns that key id."""
    doc = envelope_doc(bundle)
    doc["signatures"][0]["sig"] = base64.b64encode(bytes(64)).decode("ascii")
    write_envelope_doc(bundle, doc)
    return str(doc["signatures"][0]["keyid"])


def test_sign_with_trust_refuses_a_zero_packer_signature(bundle: Path, make_policy: Callable[..., Path],
                                                         alice: KeyPair, bob: KeyPair) -> None:
    policy = make_policy(alice, bob, threshold=2)
    kid = _zero_signature(bundle)
    before = (bundle / ENVELOPE_NAME).read_bytes()
    r = cli_inproc("sign", bundle, "--key", bob.key, "--trust", policy, "--json")
    err = assert_cli_json_error(r, 4, "SignatureError", ENVELOPE_NAME)
    assert kid in err["message"] and "refusing to co-sign" in err["message"]
    assert (bundle / ENVELOPE_NAME).read_bytes() == before


def test_airpack_trust_is_the_default_policy(bundle: Path, make_policy: Callable[..., Path], alice: KeyPair,
                                             bob: KeyPair) -> None:
    policy = make_policy(alice, bob, threshold=2)
    kid = _zero_signature(bundle)
    before = (bundle / ENVELOPE_NAME).read_bytes()
    r = cli_inproc("sign", bundle, "--key", bob.key, env={"AIRPACK_TRUST": str(policy)})
    assert_cli_error(r, 4, kid[:16])
    assert (bundle / ENVELOPE_NAME).read_bytes() == before


def test_a_strangers_signature_is_refused(make_bundle: Callable[..., Path], make_policy: Callable[..., Path],
                                          make_key: Callable[..., KeyPair], alice: KeyPair, bob: KeyPair) -> None:
    mallory = make_key("mallory")
    b = make_bundle(signer=mallory)
    policy = make_policy(alice, bob)
    with pytest.raises(SignatureError, match=mallory.signer.keyid):
        add_signature(b, bob.signer, policy=load_policy(policy))


def test_a_garbage_signature_beside_a_good_one_is_refused(bundle: Path, make_policy: Callable[..., Path],
                                                          alice: KeyPair, bob: KeyPair) -> None:
    doc = envelope_doc(bundle)
    doc["signatures"].append({"keyid": "feedface" * 8, "sig": base64.b64encode(b"\x01" * 64).decode("ascii")})
    write_envelope_doc(bundle, doc)
    r = cli_inproc("sign", bundle, "--key", bob.key, "--trust", make_policy(alice, bob))
    assert_cli_error(r, 4, "feedface" * 8)


def test_without_a_policy_sign_says_it_did_not_check(bundle: Path, bob: KeyPair) -> None:
    _zero_signature(bundle)
    r = cli_inproc("sign", bundle, "--key", bob.key, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["signatures_checked"] is False and doc["added"] is True and doc["threshold"] is None
    assert "NOT checked" in r.stderr


def test_cosign_with_trust_reports_the_threshold(bundle: Path, make_policy: Callable[..., Path], alice: KeyPair,
                                                 bob: KeyPair) -> None:
    policy = make_policy(alice, bob, threshold=2)
    assert cli_inproc("verify", bundle, "--trust", policy).returncode == 4
    r = cli_inproc("sign", bundle, "--key", bob.key, "--trust", policy, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["signatures_checked"] is True and doc["added"] is True and doc["threshold"] == 2
    assert [s["name"] for s in doc["signers"]] == ["alice", "bob"]
    assert "NOT checked" not in r.stderr
    assert cli_inproc("verify", bundle, "--trust", policy).returncode == 0
    r = cli_inproc("sign", bundle, "--key", bob.key, "--trust", policy)  # again: nothing to add
    assert r.returncode == 0 and "had already signed" in r.stdout and "2 of the 2 required: met" in r.stdout


def test_sign_with_trust_still_checks_the_content(bundle: Path, make_policy: Callable[..., Path], alice: KeyPair,
                                                  bob: KeyPair) -> None:
    flip_byte(bundle / SHARD1)
    before = (bundle / ENVELOPE_NAME).read_bytes()
    r = cli_inproc("sign", bundle, "--key", bob.key, "--trust", make_policy(alice, bob), "--json")
    assert_cli_json_error(r, 3, "BundleMismatchError")
    assert (bundle / ENVELOPE_NAME).read_bytes() == before


def test_a_key_id_alone_is_not_a_signature(bundle: Path, bob: KeyPair) -> None:
    """Garbage carrying the co-signer's key id used to make sign answer "already signed"; now it adds a real one."""
    doc = envelope_doc(bundle)
    doc["signatures"].append({"keyid": bob.signer.keyid, "sig": base64.b64encode(bytes(64)).decode("ascii")})
    write_envelope_doc(bundle, doc)
    r = add_signature(bundle, bob.signer)
    assert r.added and not r.checked
    assert len(envelope_doc(bundle)["signatures"]) == 3


def test_sign_refuses_a_tar_and_says_what_to_do(tmp_path: Path, bundle: Path, policy: Path, bob: KeyPair) -> None:
    tar = tmp_path / "b.tar"
    assert cli_inproc("export", bundle, "--tar", tar, "--trust", policy).returncode == 0
    before = tar.read_bytes()
    r = cli_inproc("sign", tar, "--key", bob.key)
    assert_cli_error(r, 2, "sign takes a bundle folder")
    assert "airpack export BUNDLE --tar" in r.stderr
    assert tar.read_bytes() == before
