"""A threshold that is not met says who still has to sign, and how.

The refusal (exit 4) names the policy keys that signed and those that did
not, and the hint names ``airpack sign``; the decision is the pure
``rules.check_threshold``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeyPair
from threat_helpers import cli_inproc

from airpack.errors import SignatureError
from airpack.rules import check_threshold


def test_rules_names_the_missing_signers() -> None:
    with pytest.raises(SignatureError) as info:
        check_threshold(["alice"], threshold=2, where="b/envelope.dsse.json", source="p.json", missing=["bob", "carol"])
    hint = info.value.hint
    assert "2 of 3 keys must sign; signed by: alice; not signed by: bob, carol" in hint
    assert "`airpack sign BUNDLE --key KEY`" in hint


def test_rules_with_no_trusted_signer_lists_the_policy_keys() -> None:
    with pytest.raises(SignatureError) as info:
        check_threshold([], threshold=1, where="b/envelope.dsse.json", source="p.json", missing=["alice", "bob"])
    assert "no valid signature" in info.value.message
    assert "alice, bob" in info.value.hint


def test_met_threshold_passes() -> None:
    check_threshold(["alice", "bob"], threshold=2, where="w", source="s", missing=[])


def test_verify_hint_names_who_did_not_sign(bundle: Path, make_policy: Callable[..., Path],
                                            make_key: Callable[..., KeyPair], alice: KeyPair, bob: KeyPair) -> None:
    carol = make_key("carol")
    policy = make_policy(alice, bob, carol, threshold=2)
    r = cli_inproc("verify", bundle, "--trust", policy, "--json")
    assert r.returncode == 4
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "SignatureError"
    assert "signed by: alice; not signed by: bob, carol" in err["hint"]
    assert "airpack sign" in err["hint"]
    r = cli_inproc("verify", bundle, "--trust", policy)
    assert "hint: 2 of 3 keys must sign; signed by: alice; not signed by: bob, carol." in r.stderr
