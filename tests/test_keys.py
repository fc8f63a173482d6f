"""Keys and the trust policy through the real command line: keygen, passphrases, bad key files, trust.

A bad key file or policy is a configuration error (exit 2) with one line
naming the file; nothing here may end in a traceback.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeyPair, run_cli
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from threat_helpers import assert_cli_error, assert_cli_json_error, cli_inproc

from airpack.errors import KeyFileError
from airpack.signing import key_id, load_public_file, load_signer

# -- keygen -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256"])
def test_keygen_writes_pkcs8_and_spki_with_modes_and_prints_the_key_id(tmp_path: Path, algorithm: str) -> None:
    r = run_cli("keygen", "packer", "--dir", tmp_path / "k", "--algorithm", algorithm, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    key, pub = tmp_path / "k" / "packer.key", tmp_path / "k" / "packer.pub"
    assert doc["private_key"] == str(key) and doc["public_key"] == str(pub)
    assert doc["algorithm"] == algorithm and doc["encrypted"] is False
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")  # SPKI
    # The key id is SHA-256 of the SPKI DER, computed here independently of airpack.
    loaded = serialization.load_pem_public_key(pub.read_bytes())
    der = loaded.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert doc["keyid"] == hashlib.sha256(der).hexdigest()
    priv = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert isinstance(priv, ed25519.Ed25519PrivateKey if algorithm == "ed25519" else ec.EllipticCurvePrivateKey)
    # Text mode prints the key id too.
    r = run_cli("keygen", "second", "--dir", tmp_path / "k")
    assert r.returncode == 0
    kid = key_id(load_public_file(tmp_path / "k" / "second.pub"))
    assert f"key id: {kid}" in r.stdout


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    assert cli_inproc("keygen", "a", "--dir", tmp_path).returncode == 0
    before = (tmp_path / "a.key").read_bytes()
    assert_cli_error(cli_inproc("keygen", "a", "--dir", tmp_path), 2, "already exists", "a.key")
    assert (tmp_path / "a.key").read_bytes() == before
    assert cli_inproc("keygen", "a", "--dir", tmp_path, "--force").returncode == 0
    assert (tmp_path / "a.key").read_bytes() != before


@pytest.mark.parametrize("name", ["", "../escape", ".hidden", "a/b"])
def test_keygen_refuses_bad_names(tmp_path: Path, name: str) -> None:
    assert_cli_error(cli_inproc("keygen", name, "--dir", tmp_path), 2, "invalid key name")
    assert list(tmp_path.iterdir()) == []


def test_keygen_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    assert_cli_error(cli_inproc("keygen", "a", "--dir", tmp_path / "f"), 2, "not a folder")


def test_keygen_unknown_algorithm(tmp_path: Path) -> None:
    r = cli_inproc("keygen", "a", "--dir", tmp_path, "--algorithm", "rsa")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert not (tmp_path / "a.key").exists()


# -- passphrases --------------------------------------------------------------------------------------


def test_encrypted_key_with_passphrase_file_and_env(tmp_path: Path, bundle: Path) -> None:
    pw = tmp_path / "pw.txt"
    pw.write_text("correct horse battery staple\nsecond line is ignored\n")
    r = cli_inproc("keygen", "enc", "--dir", tmp_path, "--passphrase-file", pw, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["encrypted"] is True
    key = tmp_path / "enc.key"
    assert key.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(TypeError):  # really encrypted: standard tools need the password
        serialization.load_pem_private_key(key.read_bytes(), password=None)
    serialization.load_pem_private_key(key.read_bytes(), password=b"correct horse battery staple")

    # Co-sign with it: via the file, then via AIRPACK_PASSPHRASE.
    r = cli_inproc("sign", bundle, "--key", key, "--passphrase-file", pw, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["added"] is True
    r = cli_inproc("sign", bundle, "--key", key, "--json", env={"AIRPACK_PASSPHRASE": "correct horse battery staple"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["added"] is False  # the same key, already signed


def test_keygen_encrypts_with_airpack_passphrase(tmp_path: Path) -> None:
    r = cli_inproc("keygen", "e", "--dir", tmp_path, "--json", env={"AIRPACK_PASSPHRASE": "s3cret"})
    assert r.returncode == 0 and json.loads(r.stdout)["encrypted"] is True
    signer = load_signer(tmp_path / "e.key", passphrase=b"s3cret")
    assert signer.keyid == json.loads(r.stdout)["keyid"]


def encrypted_key(tmp_path: Path) -> Path:
    pw = tmp_path / "pw.txt"
    pw.write_text("right\n")
    assert cli_inproc("keygen", "enc", "--dir", tmp_path, "--passphrase-file", pw).returncode == 0
    return tmp_path / "enc.key"


def test_wrong_passphrase_is_exit_2_with_one_line(tmp_path: Path, bundle: Path) -> None:
    key = encrypted_key(tmp_path)
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("wrong\n")
    env_before = (bundle / "envelope.dsse.json").read_bytes()
    assert_cli_error(cli_inproc("sign", bundle, "--key", key, "--passphrase-file", wrong), 2,
                     "wrong passphrase", "enc.key")
    assert_cli_error(cli_inproc("sign", bundle, "--key", key, env={"AIRPACK_PASSPHRASE": "nope"}), 2,
                     "wrong passphrase", "enc.key")
    assert_cli_json_error(cli_inproc("sign", bundle, "--key", key, "--passphrase-file", wrong, "--json"), 2,
                          "KeyFileError", "enc.key")
    assert (bundle / "envelope.dsse.json").read_bytes() == env_before


def test_encrypted_key_without_passphrase(tmp_path: Path, bundle: Path) -> None:
    key = encrypted_key(tmp_path)
    assert_cli_error(cli_inproc("sign", bundle, "--key", key), 2, "is encrypted", "enc.key")


@pytest.mark.parametrize("content", ["", "\n\nsecret\n"])
def test_empty_passphrase_file(tmp_path: Path, content: str) -> None:
    pw = tmp_path / "pw.txt"
    pw.write_text(content)
    assert_cli_error(cli_inproc("keygen", "x", "--dir", tmp_path, "--passphrase-file", pw), 2, "is empty", "pw.txt")
    assert not (tmp_path / "x.key").exists()


def test_missing_passphrase_file(tmp_path: Path) -> None:
    assert_cli_error(cli_inproc("keygen", "x", "--dir", tmp_path, "--passphrase-file", tmp_path / "none"), 2,
                     "not found", "none")


# -- bad key files ---------------------------------------------------------------------------------------


def corrupt_variants(good: bytes) -> dict[str, bytes]:
    lines = good.splitlines(keepends=True)
    body = bytearray(lines[1])
    body[5] = ord("A") if body[5] != ord("A") else ord("B")
    return {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "random": bytes(range(256)) * 4,
        "flipped-base64": lines[0] + bytes(body) + b"".join(lines[2:]),
        "no-footer": b"".join(lines[:-1]),
        "garbage-between-armor": lines[0] + b"!!!not base64!!!\n" + lines[-1],
    }


@pytest.mark.parametrize("variant", ["empty", "truncated", "random", "flipped-base64", "no-footer",
                                     "garbage-between-armor"])
def test_corrupted_key_file(alice: KeyPair, tmp_path: Path, variant: str, bundle: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_bytes(corrupt_variants(alice.key.read_bytes())[variant])
    try:
        load_signer(bad)
    except KeyFileError as e:
        assert e.exit_code == 2 and e.path == str(bad)
    else:
        # A flipped base64 byte may still decode to *a* key; it must then not be alice's.
        assert variant == "flipped-base64"
        assert load_signer(bad).keyid != alice.signer.keyid
        return
    assert_cli_error(cli_inproc("sign", bundle, "--key", bad), 2, "bad.key")
    assert_cli_json_error(cli_inproc("sign", bundle, "--key", bad, "--json"), 2, "KeyFileError", "bad.key")


def test_corrupted_encrypted_key_file(tmp_path: Path, bundle: Path) -> None:
    key = encrypted_key(tmp_path)
    data = bytearray(key.read_bytes())
    data[60] = ord("A") if data[60] != ord("A") else ord("B")
    key.write_bytes(bytes(data))
    assert_cli_error(cli_inproc("sign", bundle, "--key", key, env={"AIRPACK_PASSPHRASE": "right"}), 2, "enc.key")


def test_missing_key_file(tmp_path: Path, bundle: Path) -> None:
    assert_cli_error(cli_inproc("sign", bundle, "--key", tmp_path / "nope.key"), 2, "not found", "nope.key")


def test_public_key_given_where_a_private_key_is_expected(alice: KeyPair, bundle: Path, tmp_path: Path) -> None:
    line = assert_cli_error(cli_inproc("sign", bundle, "--key", alice.pub), 2, "public key", "alice.pub")
    assert "private" in line
    spec = tmp_path / "s.toml"
    spec.write_text('[bundle]\nname="x"\nsequence=1\n[[models]]\nrepo_id="a/b"\npath="src/tiny"\n')
    assert_cli_error(cli_inproc("pack", spec, "--out", tmp_path / "o", "--key", alice.pub), 2, "public key")
    assert not (tmp_path / "o").exists()


def test_private_key_given_to_trust_add(tmp_path: Path, alice: KeyPair) -> None:
    pol = tmp_path / "p.json"
    assert cli_inproc("trust", "init", pol).returncode == 0
    assert_cli_error(cli_inproc("trust", "add", pol, alice.key, "--name", "alice"), 2, "private key", "alice.key")
    assert json.loads(pol.read_text())["keys"] == []


def write_foreign_keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    out = {}
    for name, key in {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p384": ec.generate_private_key(ec.SECP384R1()),
    }.items():
        k, p = tmp_path / f"{name}.key", tmp_path / f"{name}.pub"
        k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        p.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo))
        out[name] = (k, p)
    return out


def test_unsupported_key_types_are_refused(tmp_path: Path, bundle: Path) -> None:
    pol = tmp_path / "p.json"
    assert cli_inproc("trust", "init", pol).returncode == 0
    for _name, (k, p) in write_foreign_keys(tmp_path).items():
        assert_cli_error(cli_inproc("sign", bundle, "--key", k), 2, "unsupported key type", k.name)
        assert_cli_error(cli_inproc("trust", "add", pol, p, "--name", "x"), 2, "unsupported key type", p.name)


# -- trust init / add / list -------------------------------------------------------------------------------


def test_trust_init_add_list(tmp_path: Path, alice: KeyPair, make_key: Callable[..., KeyPair]) -> None:
    carol = make_key("carol", "ecdsa-p256")
    pol = tmp_path / "trust.json"
    r = cli_inproc("trust", "init", pol, "--threshold", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"policy": str(pol), "version": 1, "threshold": 2, "valid_keys": 0, "keys": [], "revoked": []}
    assert cli_inproc("trust", "add", pol, alice.pub, "--name", "Alice Packer").returncode == 0
    r = cli_inproc("trust", "add", pol, carol.pub, "--name", "carol@security", "--json")
    assert r.returncode == 0, r.stderr
    r = cli_inproc("trust", "list", pol, "--json")
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert doc["threshold"] == 2
    assert doc["keys"] == [
        {"name": "Alice Packer", "keyid": alice.signer.keyid, "algorithm": "ed25519", "state": "valid", "expires": None},
        {"name": "carol@security", "keyid": carol.signer.keyid, "algorithm": "ecdsa-p256", "state": "valid", "expires": None},
    ]
    r = cli_inproc("trust", "list", pol)
    assert "threshold 2 of 2 key(s)" in r.stdout and alice.signer.keyid in r.stdout
    # The file itself: deterministic JSON that holds the PEMs.
    raw = json.loads(pol.read_text())
    assert raw["version"] == 3 and raw["keys"][0]["public_key"]  # the serial: init is 1, each add raises it.startswith("-----BEGIN PUBLIC KEY-----")


def test_trust_add_refuses_duplicates_and_bad_names(tmp_path: Path, alice: KeyPair, bob: KeyPair) -> None:
    pol = tmp_path / "trust.json"
    cli_inproc("trust", "init", pol)
    assert cli_inproc("trust", "add", pol, alice.pub, "--name", "alice").returncode == 0
    before = pol.read_bytes()
    assert_cli_error(cli_inproc("trust", "add", pol, alice.pub, "--name", "again"), 2, "already in the policy")
    assert_cli_error(cli_inproc("trust", "add", pol, bob.pub, "--name", "alice"), 2, "share a name")
    assert_cli_error(cli_inproc("trust", "add", pol, bob.pub, "--name", "bad\nname"), 2, "invalid key name")
    assert_cli_error(cli_inproc("trust", "add", pol, tmp_path / "none.pub", "--name", "x"), 2, "not found")
    assert pol.read_bytes() == before


def test_trust_init_refuses_to_overwrite(tmp_path: Path) -> None:
    pol = tmp_path / "trust.json"
    assert cli_inproc("trust", "init", pol).returncode == 0
    assert_cli_error(cli_inproc("trust", "init", pol), 2, "already exists")
    assert cli_inproc("trust", "init", pol, "--force", "--threshold", "3").returncode == 0
    assert json.loads(pol.read_text())["threshold"] == 3
    r = cli_inproc("trust", "init", tmp_path / "z.json", "--threshold", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_threshold_above_the_number_of_keys_is_refused_by_verify(tmp_path: Path, bundle: Path,
                                                                 alice: KeyPair) -> None:
    pol = tmp_path / "trust.json"
    cli_inproc("trust", "init", pol, "--threshold", "2")
    cli_inproc("trust", "add", pol, alice.pub, "--name", "alice")
    line = assert_cli_error(cli_inproc("verify", bundle, "--trust", pol), 2, "needs 2 signer(s)", "trust.json")
    assert "1 key(s)" in line
    assert_cli_json_error(cli_inproc("verify", bundle, "--trust", pol, "--json"), 2, "PolicyError", "trust.json")
    # An empty policy (no keys yet) is refused the same way.
    empty = tmp_path / "empty.json"
    cli_inproc("trust", "init", empty)
    assert_cli_error(cli_inproc("verify", bundle, "--trust", empty), 2, "lists 0 key(s)")


def test_trust_policy_from_airpack_trust(tmp_path: Path, bundle: Path, policy: Path) -> None:
    r = cli_inproc("verify", bundle, "--json", env={"AIRPACK_TRUST": str(policy)})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.update(threshold=0), "threshold"),
        (lambda d: d.update(threshold=True), "threshold"),
        (lambda d: d.update(threshold="1"), "threshold"),
        (lambda d: d.update(version=-1), "version (the policy's serial number) must be a positive integer"),
        (lambda d: d.update(version="2"), "version (the policy's serial number) must be a positive integer"),
        (lambda d: d.update(keys={}), "must be a list"),
        (lambda d: d["keys"].append(dict(d["keys"][0])), "listed twice"),
        (lambda d: d["keys"][0].update(keyid="0" * 64), "does not match"),
        (lambda d: d["keys"][0].update(public_key="-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
         "not a valid PEM public key"),
        (lambda d: d["keys"][0].pop("name"), "lacks required field(s): name"),
    ],
)
def test_malformed_trust_policy(tmp_path: Path, bundle: Path, policy: Path,
                                mutate: Callable[[dict[str, object]], object], match: str) -> None:
    doc = json.loads(policy.read_text())
    mutate(doc)
    policy.write_text(json.dumps(doc))
    assert_cli_error(cli_inproc("verify", bundle, "--trust", policy), 2, match)


def test_trust_policy_with_duplicate_json_keys(tmp_path: Path, bundle: Path, policy: Path) -> None:
    text = policy.read_text().replace('"threshold": 1', '"threshold": 1, "threshold": 1', 1)
    policy.write_text(text)
    assert_cli_error(cli_inproc("verify", bundle, "--trust", policy), 2, "duplicate key")


def test_missing_trust_policy(tmp_path: Path, bundle: Path) -> None:
    r = cli_inproc("verify", bundle, "--trust", tmp_path / "none.json")
    assert_cli_error(r, 2, "not found", "none.json")
    assert "airpack trust init" in r.stderr
