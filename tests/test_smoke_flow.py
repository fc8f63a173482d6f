"""The packer → verifier flow end to end through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import KeyPair, run_cli


def test_keygen_trust_pack_verify(tmp_path: Path, tiny_model: Path) -> None:
    keys = tmp_path / "k"
    r = run_cli("keygen", "packer", "--dir", keys, "--json")
    assert r.returncode == 0, r.stderr
    kid = json.loads(r.stdout)["keyid"]
    assert len(kid) == 64
    assert (keys / "packer.key").stat().st_mode & 0o777 == 0o600
    pol = tmp_path / "trust.json"
    assert run_cli("trust", "init", pol).returncode == 0
    assert run_cli("trust", "add", pol, keys / "packer.pub", "--name", "packer").returncode == 0
    spec = tmp_path / "spec.toml"
    spec.write_text(f'[bundle]\nname="t"\nchannel="t"\nsequence=1\n[[models]]\nrepo_id="acme/tiny"\npath="{tiny_model.relative_to(tmp_path)}"\n')
    r = run_cli("pack", spec, "--out", tmp_path / "b", "--key", keys / "packer.key")
    assert r.returncode == 0, r.stderr
    r = run_cli("verify", tmp_path / "b", "--trust", pol, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["verified"] is True
    assert doc["signers"] == [{"name": "packer", "keyid": kid}]


def test_verify_refuses_tampered_weight(bundle: Path, policy: Path, alice: KeyPair) -> None:
    w = next(bundle.glob("models/*/model-00001-of-00002.safetensors"))
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    r = run_cli("verify", bundle, "--trust", policy, "--json")
    assert r.returncode == 3
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "BundleMismatchError"
    assert err["mismatch"]["changed"][0]["path"].endswith("model-00001-of-00002.safetensors")
