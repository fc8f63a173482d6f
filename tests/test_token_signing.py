"""Keys that never leave a token (SoftHSM2): keygen, key pub, pack, sign, export --split; verify needs no token.

A bundle signed on the token carries ordinary DSSE signatures: a host with no token, no PKCS#11
module and no binding loaded verifies it, and so does a plain cryptography check of the PAE.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import AIRPACK, KeyPair, run_cli, write_spec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from softhsm import SoftHsm, count_logins

from airpack.signing import TokenSigner, key_id, load_public_file, open_signer, pae

pytestmark = pytest.mark.slow


def ok(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert r.returncode == 0, r.stdout + r.stderr
    doc: dict[str, Any] = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    return doc


def token_keygen(softhsm: SoftHsm, tmp_path: Path, name: str, algorithm: str = "ecdsa-p256") -> Path:
    ok(run_cli("keygen", name, "--dir", tmp_path / "keys", "--algorithm", algorithm, "--pkcs11", softhsm.uri(name), "--json"))
    return tmp_path / "keys" / f"{name}.pub"


def policy_of(tmp_path: Path, *keys: tuple[str, Path], threshold: int = 1, name: str = "policy.json") -> Path:
    path = tmp_path / name
    ok(run_cli("trust", "init", path, "--threshold", str(threshold)))
    for key_name, pub in keys:
        ok(run_cli("trust", "add", path, pub, "--name", key_name))
    return path


def clean_env() -> dict[str, str]:
    """A host with no token: no SoftHSM2 configuration, no module, no PIN."""
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "AIRPACK_PKCS11_MODULE", "AIRPACK_PIN",
                                                            "AIRPACK_TRUST", "AIRPACK_REGISTRY")}
    return env


VERIFY_WITHOUT_BINDING = """
import json, sys
from airpack.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "loaded": [m for m in ("pkcs11", "airpack.pkcs11_keys") if m in sys.modules]}), file=sys.stderr)
"""


def verify_without_token(bundle: Path, policy: Path) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", VERIFY_WITHOUT_BINDING, "verify", str(bundle), "--trust", str(policy), "--json"],
                       capture_output=True, text=True, env=clean_env(), timeout=120)
    report = json.loads(r.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "loaded": []}, r.stdout + r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def check_with_cryptography(bundle: Path, pub_path: Path) -> None:
    """Any DSSE verifier: PAE over the payload, the public key from NAME.pub, nothing of airpack's signing code."""
    env = json.loads((bundle / "envelope.dsse.json").read_bytes())
    payload = base64.b64decode(env["payload"])
    msg = pae(env["payloadType"], payload)
    pub = load_public_file(pub_path)
    kid = key_id(pub)
    sigs = [base64.b64decode(s["sig"]) for s in env["signatures"] if s["keyid"] == kid]
    assert sigs, "the token key's signature is in the envelope under its key id"
    if isinstance(pub, ed25519.Ed25519PublicKey):
        pub.verify(sigs[0], msg)
    else:
        pub.verify(sigs[0], msg, ec.ECDSA(hashes.SHA256()))  # DER-encoded, as OpenSSL and every DSSE library expect


@pytest.mark.parametrize("algorithm", ["ecdsa-p256", "ed25519"])
def test_keygen_on_the_token_writes_only_the_public_key_and_the_private_key_stays(softhsm: SoftHsm, tmp_path: Path,
                                                                                   algorithm: str) -> None:
    doc = ok(run_cli("keygen", "officer", "--dir", tmp_path / "keys", "--algorithm", algorithm, "--pkcs11", softhsm.uri("officer"),
                     "--json"))
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["officer.pub"]
    pub = load_public_file(tmp_path / "keys" / "officer.pub")
    assert doc["keyid"] == key_id(pub) and doc["algorithm"] == algorithm and doc["private_key"] is None
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    with softhsm.session() as s:
        (priv,) = s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: "officer"})
        assert priv[Attribute.SENSITIVE] and not priv[Attribute.EXTRACTABLE]
        assert priv[Attribute.ALWAYS_SENSITIVE] and priv[Attribute.NEVER_EXTRACTABLE] and priv[Attribute.SIGN]
        assert priv[Attribute.TOKEN]
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            _ = priv[Attribute.VALUE]


def test_keygen_defaults_to_ecdsa_on_a_token(softhsm: SoftHsm, tmp_path: Path) -> None:
    doc = ok(run_cli("keygen", "k", "--dir", tmp_path, "--pkcs11", softhsm.uri("k"), "--json"))
    assert doc["algorithm"] == "ecdsa-p256"


def test_key_pub_exports_the_key_the_token_holds(softhsm: SoftHsm, tmp_path: Path) -> None:
    pub = token_keygen(softhsm, tmp_path, "officer", "ed25519")
    doc = ok(run_cli("key", "pub", softhsm.uri("officer", pin=False), "--out", tmp_path / "again.pub", "--json"))
    assert (tmp_path / "again.pub").read_bytes() == pub.read_bytes()
    assert doc["keyid"] == key_id(load_public_file(pub)) and doc["algorithm"] == "ed25519"


def test_key_pub_of_a_key_made_by_another_tool(softhsm: SoftHsm, tmp_path: Path) -> None:
    softhsm.make_key("piv-9c")
    ok(run_cli("key", "pub", softhsm.uri("piv-9c"), "--out", tmp_path / "piv.pub"))
    ok(run_cli("key", "pub", softhsm.uri("piv-9c", extra=";type=public"), "--out", tmp_path / "piv2.pub"))
    assert (tmp_path / "piv.pub").read_bytes() == (tmp_path / "piv2.pub").read_bytes()
    policy_of(tmp_path, ("officer", tmp_path / "piv.pub"))


def test_a_piv_style_key_with_only_a_certificate_signs_and_exports(softhsm: SoftHsm, tmp_path: Path, tiny_model: Path) -> None:
    """A private key whose public half is a certificate (as PIV tokens hold them): key pub reads it, pack signs with it."""
    softhsm.make_key("Private key for Digital Signature", public=False, cert=True, key_id=b"\x02")
    uri = softhsm.uri("Private key for Digital Signature")
    ok(run_cli("key", "pub", uri, "--out", tmp_path / "piv.pub"))
    ok(run_cli("key", "pub", softhsm.uri("Private key for Digital Signature", extra=";type=cert"), "--out", tmp_path / "cert.pub"))
    assert (tmp_path / "piv.pub").read_bytes() == (tmp_path / "cert.pub").read_bytes()
    spec = write_spec(tmp_path / "spec.toml", model_dir=tiny_model)
    ok(run_cli("pack", spec, "--out", tmp_path / "bundle", "--key", softhsm.uri(None, extra=";id=%02")))
    verify_without_token(tmp_path / "bundle", policy_of(tmp_path, ("officer", tmp_path / "piv.pub")))


def test_key_pub_refuses_to_overwrite(softhsm: SoftHsm, tmp_path: Path) -> None:
    pub = token_keygen(softhsm, tmp_path, "officer")
    before = pub.read_bytes()
    r = run_cli("key", "pub", softhsm.uri("officer"), "--out", pub)
    assert r.returncode == 2 and "already exists" in r.stderr and pub.read_bytes() == before


@pytest.mark.parametrize("algorithm", ["ecdsa-p256", "ed25519"])
def test_a_bundle_packed_on_the_token_verifies_on_a_host_without_one(softhsm: SoftHsm, tmp_path: Path, tiny_model: Path,
                                                                     algorithm: str) -> None:
    pub = token_keygen(softhsm, tmp_path, "packer", algorithm)
    spec = write_spec(tmp_path / "spec.toml", model_dir=tiny_model)
    doc = ok(run_cli("pack", spec, "--out", tmp_path / "bundle", "--key", softhsm.uri("packer"), "--json"))
    assert doc["keyid"] == key_id(load_public_file(pub))
    policy = policy_of(tmp_path, ("packer", pub))
    v = verify_without_token(tmp_path / "bundle", policy)
    assert v["verified"] is True and [s["name"] for s in v["signers"]] == ["packer"]
    check_with_cryptography(tmp_path / "bundle", pub)


def test_pack_takes_the_module_and_pin_from_the_environment_or_pin_file(softhsm: SoftHsm, tmp_path: Path, tiny_model: Path) -> None:
    pub = token_keygen(softhsm, tmp_path, "packer")
    spec = write_spec(tmp_path / "spec.toml", model_dir=tiny_model)
    bare = softhsm.uri("packer", pin=False, module=False)
    ok(run_cli("pack", spec, "--out", tmp_path / "b1", "--key", bare,
               env={"AIRPACK_PKCS11_MODULE": softhsm.module, "AIRPACK_PIN": softhsm.pin}))
    ok(run_cli("pack", spec, "--out", tmp_path / "b2", "--key", bare, "--pin-file", softhsm.pin_file,
               env={"AIRPACK_PKCS11_MODULE": softhsm.module}))
    policy = policy_of(tmp_path, ("packer", pub))
    for b in ("b1", "b2"):
        verify_without_token(tmp_path / b, policy)


def test_pack_to_a_tar_with_a_token_key(softhsm: SoftHsm, tmp_path: Path, tiny_model: Path) -> None:
    pub = token_keygen(softhsm, tmp_path, "packer")
    spec = write_spec(tmp_path / "spec.toml", model_dir=tiny_model)
    ok(run_cli("pack", spec, "--out", tmp_path / "b.tar", "--format", "tar", "--key", softhsm.uri("packer")))
    verify_without_token(tmp_path / "b.tar", policy_of(tmp_path, ("packer", pub)))


def test_the_packers_file_key_and_the_officers_token_key_co_sign(softhsm: SoftHsm, tmp_path: Path, make_bundle: Any,
                                                                 alice: KeyPair) -> None:
    bundle = make_bundle()  # signed with alice's key file
    officer = token_keygen(softhsm, tmp_path, "officer")
    first = policy_of(tmp_path, ("alice", alice.pub), name="alice.json")
    doc = ok(run_cli("sign", bundle, "--key", softhsm.uri("officer"), "--trust", first, "--json"))
    assert doc["added"] is True
    both = policy_of(tmp_path, ("alice", alice.pub), ("officer", officer), threshold=2, name="both.json")
    v = verify_without_token(bundle, both)
    assert sorted(s["name"] for s in v["signers"]) == ["alice", "officer"]
    check_with_cryptography(bundle, officer)
    again = ok(run_cli("sign", bundle, "--key", softhsm.uri("officer"), "--json"))
    assert again["added"] is False  # the token key's signature is already there (ECDSA signatures differ each time)


def test_export_split_signs_the_parts_index_on_the_token(softhsm: SoftHsm, tmp_path: Path, make_bundle: Any, alice: KeyPair) -> None:
    bundle = make_bundle()
    officer = token_keygen(softhsm, tmp_path, "officer")
    policy = policy_of(tmp_path, ("alice", alice.pub), ("officer", officer))
    (tmp_path / "parts").mkdir()
    ok(run_cli("export", bundle, "--tar", tmp_path / "parts" / "b.tar", "--split", "64KiB", "--trust", policy,
               "--key", softhsm.uri("officer")))
    r = subprocess.run([*AIRPACK, "verify", str(tmp_path / "parts"), "--parts", "--trust", str(policy), "--json"],
                       capture_output=True, text=True, env=clean_env(), timeout=120)
    doc = ok(r)
    assert "officer" in json.dumps(doc)


def test_two_keys_on_one_token_log_in_once(softhsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_keygen(softhsm, tmp_path, "one")
    token_keygen(softhsm, tmp_path, "two", "ed25519")
    logins = count_logins(monkeypatch)
    a, b = open_signer(softhsm.uri("one")), open_signer(softhsm.uri("two"))
    assert isinstance(a, TokenSigner) and isinstance(b, TokenSigner)
    assert logins == [softhsm.pin]
    for s in (a, b):
        sig = s.sign("application/vnd.in-toto+json", b"{}")
        assert sig["keyid"] == s.keyid
    assert (a.algorithm, b.algorithm) == ("ecdsa-p256", "ed25519")


def test_no_command_module_imports_the_binding() -> None:
    """Loading every command (and verify, install) leaves the PKCS#11 binding unloaded: only a pkcs11: key loads it."""
    code = ("import sys, airpack.cli, airpack.ops.verify, airpack.ops.install, airpack.sources, airpack.trust;"
            "airpack.cli._load_commands();"
            "bad = [m for m in ('pkcs11', 'airpack.pkcs11_keys') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_policy_update_co_signed_by_a_key_file_and_a_token_key(softhsm: SoftHsm, tmp_path: Path, alice: KeyPair, bob: KeyPair) -> None:
    """`trust sign-update` with a file key and a token key in one run (one --pin-file for the token), then `trust apply`."""
    officer = token_keygen(softhsm, tmp_path, "officer")
    current = policy_of(tmp_path, ("alice", alice.pub), ("officer", officer), threshold=2, name="current.json")
    new = tmp_path / "new.json"
    new.write_bytes(current.read_bytes())
    ok(run_cli("trust", "add", new, bob.pub, "--name", "bob"))
    ok(run_cli("trust", "sign-update", new, "--key", alice.key, "--key", softhsm.uri("officer", pin=False),
               "--pin-file", softhsm.pin_file, "--out", tmp_path / "update.dsse.json"))
    r = subprocess.run([*AIRPACK, "trust", "apply", str(current), str(tmp_path / "update.dsse.json"), "--json"],
                       capture_output=True, text=True, env=clean_env(), timeout=120)
    ok(r)
    names = [k["name"] for k in json.loads(current.read_text())["keys"]]
    assert names == ["alice", "officer", "bob"]
