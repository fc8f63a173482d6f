"""Threat: a leaked key parks a channel at the end of the sequence space, so no later bundle can ever update it.

Two bounds (``airpack.rules``): no sequence above ``MAX_SEQUENCE`` (2^53 - 1)
anywhere (pack: spec error, exit 2; verify and install: exit 4), and a
channel's first install counts from 0, so its first sequence may be at most
``MAX_SEQUENCE_JUMP`` (exit 4 beyond), the same jump limit as every later one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeyPair, run_cli, verify, write_spec
from registry_fixtures import audit_lines, variant_model
from threat_helpers import refused, resign, statement

from airpack import rules
from airpack.errors import SequenceJumpError, SpecError
from airpack.ops.install import InstallOptions, install
from airpack.rules import MAX_SEQUENCE, MAX_SEQUENCE_JUMP, ChannelHigh, Sequence
from airpack.spec import load_spec
from airpack.trust import load_policy


def test_max_sequence_is_the_largest_exact_json_integer() -> None:
    assert MAX_SEQUENCE == 2**53 - 1 == 9_007_199_254_740_991
    assert float(MAX_SEQUENCE) == MAX_SEQUENCE and float(MAX_SEQUENCE + 2) != MAX_SEQUENCE + 2


@pytest.mark.parametrize("sequence", [2**53, 2**63 - 1, 2**63])
def test_pack_refuses_a_spec_sequence_above_the_maximum(tmp_path: Path, tiny_model: Path, alice: KeyPair, sequence: int) -> None:
    spec = write_spec(tmp_path / "spec.toml", model_dir=tiny_model, sequence=sequence)
    refused(SpecError, lambda: load_spec(spec), code=2, match="above the highest")
    r = run_cli("pack", spec, "--out", tmp_path / "out", "--key", alice.key, "--json")
    assert r.returncode == 2, r.stdout
    assert json.loads(r.stdout)["error"]["type"] == "SpecError"
    assert not (tmp_path / "out").exists()


def test_the_maximum_itself_is_a_valid_spec(tmp_path: Path, tiny_model: Path) -> None:
    spec = write_spec(tmp_path / "spec.toml", model_dir=tiny_model, sequence=MAX_SEQUENCE)
    assert load_spec(spec).sequence == MAX_SEQUENCE


def test_a_signed_sequence_above_the_maximum_is_refused_at_verify_and_install(bundle: Path, policy: Path, alice: KeyPair,
                                                                             tmp_path: Path) -> None:
    st = statement(bundle)
    st["predicate"]["bundle"]["sequence"] = 2**53
    resign(bundle, st, alice.signer)
    refused(SequenceJumpError, lambda: verify(bundle, policy), code=4, match="above the highest")
    reg = tmp_path / "registry"
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy, "--ignore-fit", "--allow-downgrade", "--json")
    assert r.returncode == 4, r.stdout
    assert json.loads(r.stdout)["error"]["type"] == "SequenceJumpError"
    assert audit_lines(reg)[-1]["result"] == "refused"


def test_a_channels_first_sequence_counts_from_zero(make_bundle: Callable[..., Path], tiny_model: Path, policy: Path,
                                                    tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    pol = load_policy(policy)
    far = make_bundle(sequence=MAX_SEQUENCE_JUMP + 1)
    assert verify(far, policy).manifest.sequence == MAX_SEQUENCE_JUMP + 1  # verify alone knows no channel: fine
    r = run_cli("install", far, "--registry", reg, "--trust", policy, "--ignore-fit", "--json")
    assert r.returncode == 4, r.stdout
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "SequenceJumpError" and "first of channel tiny" in err["message"]
    # --allow-downgrade is no way around a jump
    with pytest.raises(SequenceJumpError):
        install(InstallOptions(bundle=far, registry=reg, policy=pol, ignore_fit=True, allow_downgrade=True))
    edge = make_bundle(sequence=MAX_SEQUENCE_JUMP, model_dir=variant_model(tiny_model, tmp_path / "edge", extra={"e": b"1"}))
    assert install(InstallOptions(bundle=edge, registry=reg, policy=pol, ignore_fit=True)).result == "installed"


def test_rules_first_install_verdicts() -> None:
    assert rules.classify_sequence(None, sequence=MAX_SEQUENCE_JUMP, manifest_sha256="a") is Sequence.NEW
    assert rules.classify_sequence(None, sequence=MAX_SEQUENCE_JUMP + 1, manifest_sha256="a") is Sequence.JUMP
    high = ChannelHigh(sequence=5, manifest_sha256="a", bundle="b")
    assert rules.classify_sequence(high, sequence=5 + MAX_SEQUENCE_JUMP, manifest_sha256="x") is Sequence.NEWER
    with pytest.raises(SequenceJumpError, match="first of channel c"):
        rules.check_sequence(None, name="n", channel="c", sequence=2 * MAX_SEQUENCE_JUMP, manifest_sha256="a",
                             allow_downgrade=True)
    rules.check_sequence_range(name="n", sequence=MAX_SEQUENCE)
    with pytest.raises(SequenceJumpError):
        rules.check_sequence_range(name="n", sequence=MAX_SEQUENCE + 1)


def test_diff_registry_previews_the_first_install_jump(make_bundle: Callable[..., Path], policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    base = make_bundle(name="base", channel="base", repo_id="acme/base")
    assert run_cli("install", base, "--registry", reg, "--trust", policy, "--ignore-fit").returncode == 0
    far = make_bundle(sequence=MAX_SEQUENCE_JUMP + 1)
    r = run_cli("diff", "--registry", reg, far, "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    assert any("install would be refused" in f for f in json.loads(r.stdout)["flags"])
