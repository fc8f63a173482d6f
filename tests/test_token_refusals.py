"""Every way a token key can fail: one line, exit 2, nothing written, and a PIN tried once, never twice.

Wrong PIN, no module, a file that is no PKCS#11 module, no such token, no such object, an object
that may not sign, a URI that does not parse, a PIN on the URI, and the token removed between the
login and the signature (the binding's ``DeviceRemoved`` / ``TokenNotPresent``, raised from the
session's sign). The bundle, the out folder and the key files are left exactly as they were.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import KeyPair, run_cli, write_spec
from softhsm import SoftHsm, count_logins

from airpack import pkcs11_keys
from airpack.errors import TokenKeyError, TokenPinError, TokenRemovedError, UsageError
from airpack.ops.pack import PackOptions, add_signature, pack
from airpack.signing import open_signer
from airpack.spec import load_spec

pkcs11 = pytest.importorskip("pkcs11")  # python-pkcs11, an install requirement; its exceptions are the token's answers
pytestmark = pytest.mark.slow


def refused(r: subprocess.CompletedProcess[str], error_type: str, *says: str) -> dict[str, Any]:
    """Exit 2, one JSON error of ``error_type`` whose message says each of ``says``, no traceback."""
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    err: dict[str, Any] = json.loads(r.stdout)["error"]
    assert err["type"] == error_type and err["exit_code"] == 2, err
    for s in says:
        assert s in err["message"], err
    assert err.get("hint")
    return err


def one_line(r: subprocess.CompletedProcess[str]) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.fixture
def packer(softhsm: SoftHsm, tmp_path: Path) -> Path:
    r = run_cli("keygen", "packer", "--dir", tmp_path / "keys", "--pkcs11", softhsm.uri("packer"))
    assert r.returncode == 0, r.stderr
    return tmp_path / "keys" / "packer.pub"


def pack_with(tmp_path: Path, tiny_model: Path, key: str, *extra: str | Path, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    spec = write_spec(tmp_path / "spec.toml", model_dir=tiny_model)
    return run_cli("pack", spec, "--out", tmp_path / "out", "--key", key, *extra, "--json", env=env)


def test_wrong_pin_is_tried_once_and_writes_nothing(softhsm: SoftHsm, packer: Path, tmp_path: Path, tiny_model: Path) -> None:
    bad = tmp_path / "bad-pin"
    bad.write_text("0000\n")
    bad.chmod(0o600)
    r = pack_with(tmp_path, tiny_model, softhsm.uri("packer", pin=False), "--pin-file", bad)
    refused(r, "TokenPinError", "wrong PIN", "tried once, not retried")
    assert not (tmp_path / "out").exists()
    token = pkcs11.lib(softhsm.module).get_token(token_label=softhsm.label)
    assert token.flags & pkcs11.TokenFlag.USER_PIN_COUNT_LOW  # the token saw the failed login
    pkcs11_keys.reset()


def test_wrong_pin_reaches_the_token_exactly_once(softhsm: SoftHsm, packer: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logins = count_logins(monkeypatch)
    monkeypatch.setenv("AIRPACK_PIN", "0000")
    with pytest.raises(TokenPinError, match="wrong PIN"):
        open_signer(softhsm.uri("packer", pin=False))
    assert logins == ["0000"]


def test_no_pin_at_all_is_refused_before_the_token_is_asked(softhsm: SoftHsm, packer: Path, tmp_path: Path, tiny_model: Path) -> None:
    r = pack_with(tmp_path, tiny_model, softhsm.uri("packer", pin=False))
    refused(r, "TokenPinError", "needs a PIN")


def test_missing_module_path(softhsm: SoftHsm, packer: Path, tmp_path: Path, tiny_model: Path) -> None:
    refused(pack_with(tmp_path, tiny_model, softhsm.uri("packer", module=False)), "TokenModuleError", "no PKCS#11 module")
    gone = softhsm.uri("packer", module=False) + f"&module-path={tmp_path}/nope.so"
    refused(pack_with(tmp_path, tiny_model, gone), "TokenModuleError", "does not exist")
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_pkcs11_module(softhsm: SoftHsm, packer: Path, tmp_path: Path, tiny_model: Path) -> None:
    fake = tmp_path / "fake.so"
    fake.write_text("not a shared object\n")
    refused(pack_with(tmp_path, tiny_model, softhsm.uri("packer", module=False), env={"AIRPACK_PKCS11_MODULE": str(fake)}),
            "TokenModuleError", "is not a usable PKCS#11 module")
    assert not (tmp_path / "out").exists()


def test_no_token_with_that_label(softhsm: SoftHsm, packer: Path, tmp_path: Path, tiny_model: Path) -> None:
    err = refused(pack_with(tmp_path, tiny_model, softhsm.uri("packer", token="elsewhere")), "TokenNotFoundError", "no token matches")
    assert "'airpack'" in err["message"]  # names the tokens that are there


def test_no_object_with_that_label(softhsm: SoftHsm, packer: Path, tmp_path: Path, tiny_model: Path) -> None:
    refused(pack_with(tmp_path, tiny_model, softhsm.uri("nobody")), "TokenKeyError", "holds no private key with label 'nobody'")


def test_an_object_that_may_not_sign(softhsm: SoftHsm, tmp_path: Path, tiny_model: Path) -> None:
    softhsm.make_key("decrypt-only", sign=False)
    refused(pack_with(tmp_path, tiny_model, softhsm.uri("decrypt-only")), "TokenKeyError", "may not sign", "CKA_SIGN")
    assert not (tmp_path / "out").exists()


def test_a_private_key_without_a_public_half(softhsm: SoftHsm, tmp_path: Path, tiny_model: Path) -> None:
    softhsm.make_key("lonely", public=False)
    refused(pack_with(tmp_path, tiny_model, softhsm.uri("lonely")), "TokenKeyError", "no public key or certificate")


def test_two_keys_with_one_label_are_ambiguous(softhsm: SoftHsm, tmp_path: Path, tiny_model: Path) -> None:
    softhsm.make_key("twin", key_id=b"\x01")
    softhsm.make_key("twin", key_id=b"\x02")
    refused(pack_with(tmp_path, tiny_model, softhsm.uri("twin")), "TokenKeyError", "2 private keys match", "id=")
    r = pack_with(tmp_path, tiny_model, softhsm.uri("twin", extra=";id=%02"))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("uri", ["pkcs11:token=airpack;objekt=packer", "pkcs11:token=airpack;object=pa%zzcker"])
def test_a_uri_that_does_not_parse(softhsm: SoftHsm, tmp_path: Path, tiny_model: Path, uri: str) -> None:
    refused(pack_with(tmp_path, tiny_model, uri), "Pkcs11UriError")
    one_line(run_cli("sign", tmp_path, "--key", uri))


def test_a_pin_on_the_uri_is_refused_and_never_echoed(softhsm: SoftHsm, packer: Path, tmp_path: Path, tiny_model: Path) -> None:
    uri = softhsm.uri("packer", pin=False) + "&pin-value=1234"
    err = refused(pack_with(tmp_path, tiny_model, uri), "Pkcs11UriError", "pin-value is refused")
    assert "1234" not in err["message"]


def test_keygen_refuses_a_label_the_token_already_holds(softhsm: SoftHsm, packer: Path, tmp_path: Path) -> None:
    r = run_cli("keygen", "packer", "--dir", tmp_path / "other", "--pkcs11", softhsm.uri("packer"), "--json")
    refused(r, "TokenKeyError", "already holds an object labelled 'packer'")
    assert not (tmp_path / "other" / "packer.pub").exists()


def test_keygen_refuses_an_existing_pub_before_touching_the_token(softhsm: SoftHsm, tmp_path: Path) -> None:
    (tmp_path / "k.pub").write_text("keep me")
    r = run_cli("keygen", "k", "--dir", tmp_path, "--pkcs11", softhsm.uri("k"))
    assert r.returncode == 2 and (tmp_path / "k.pub").read_text() == "keep me"
    with softhsm.session() as s:
        assert not list(s.get_objects({pkcs11.Attribute.LABEL: "k"}))


def test_flags_that_belong_to_the_other_kind_of_key(softhsm: SoftHsm, packer: Path, alice: KeyPair, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--passphrase-file is for an encrypted key file"):
        open_signer(softhsm.uri("packer"), passphrase_file=tmp_path / "pass")
    with pytest.raises(UsageError, match="--pin-file is for a key on a token"):
        open_signer(str(alice.key), pin_file=softhsm.pin_file)
    with pytest.raises(UsageError, match="two PIN sources"):
        open_signer(softhsm.uri("packer"), pin_file=softhsm.pin_file)
    one_line(run_cli("keygen", "x", "--dir", tmp_path, "--pkcs11", softhsm.uri("x"), "--passphrase-file", softhsm.pin_file))


def test_key_pub_refusals(softhsm: SoftHsm, tmp_path: Path) -> None:
    refused(run_cli("key", "pub", softhsm.uri("nothing"), "--out", tmp_path / "n.pub", "--json"), "TokenKeyError", "no public key")
    refused(run_cli("key", "pub", "keys/alice.key", "--out", tmp_path / "n.pub", "--json"), "Pkcs11UriError", "pkcs11:")
    assert not (tmp_path / "n.pub").exists()


# -- the token removed between the login and the signature ------------------------------------------


@pytest.fixture
def pulled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on the token is gone: every sign on it raises what the binding raises for a removed token."""
    calls: list[str] = []

    def removed(self: Any, data: Any, **kw: Any) -> bytes:
        calls.append("sign")
        raise (pkcs11.exceptions.DeviceRemoved() if len(calls) % 2 else pkcs11.exceptions.TokenNotPresent())

    monkeypatch.setattr(pkcs11.types.SignMixin, "sign", removed)
    return calls


def test_token_removed_during_pack_leaves_no_bundle(softhsm: SoftHsm, packer: Path, tmp_path: Path, tiny_model: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    signer = open_signer(softhsm.uri("packer"))  # logged in while the token was there
    calls: list[str] = []

    def removed(self: Any, data: Any, **kw: Any) -> bytes:
        calls.append("sign")
        raise pkcs11.exceptions.DeviceRemoved()

    monkeypatch.setattr(pkcs11.types.SignMixin, "sign", removed)
    spec = load_spec(write_spec(tmp_path / "spec.toml", model_dir=tiny_model))
    with pytest.raises(TokenRemovedError, match="removed") as e:
        pack(PackOptions(spec=spec, out=tmp_path / "out", signer=signer))
    assert e.value.exit_code == 2 and calls == ["sign"]
    assert not (tmp_path / "out").exists()


def test_token_storage_removed_between_login_and_signature(softhsm: SoftHsm, packer: Path, make_bundle: Any) -> None:
    """No monkeypatching: SoftHSM2's token folder is deleted under the open session, as a pulled token takes its keys away."""
    import shutil

    bundle = make_bundle()
    before = (bundle / "envelope.dsse.json").read_bytes()
    signer = open_signer(softhsm.uri("packer"))
    for folder in (softhsm.root / "tokens").iterdir():
        shutil.rmtree(folder)
    with pytest.raises(TokenRemovedError, match="nothing was written") as e:
        add_signature(bundle, signer)
    assert e.value.exit_code == 2
    assert (bundle / "envelope.dsse.json").read_bytes() == before


def test_token_removed_during_sign_leaves_the_bundle_as_it_was(softhsm: SoftHsm, packer: Path, make_bundle: Any,
                                                               pulled: list[str]) -> None:
    bundle = make_bundle()
    before = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    signer = open_signer(softhsm.uri("packer"))
    with pytest.raises(TokenRemovedError) as e:
        add_signature(bundle, signer)
    assert e.value.exit_code == 2 and pulled == ["sign"]
    assert {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()} == before


def test_token_removed_during_export_split_leaves_no_parts(softhsm: SoftHsm, packer: Path, make_bundle: Any, policy: Path,
                                                          tmp_path: Path, pulled: list[str]) -> None:
    from airpack.ops.export import ExportOptions, export
    from airpack.trust import load_policy

    bundle = make_bundle()
    (tmp_path / "parts").mkdir()
    signer = open_signer(softhsm.uri("packer"))
    with pytest.raises(TokenRemovedError):
        export(ExportOptions(bundle=bundle, tar=tmp_path / "parts" / "b.tar", policy=load_policy(policy), split=64 * 1024,
                             signer=signer))
    assert pulled == ["sign"] and list((tmp_path / "parts").iterdir()) == []


def test_token_removed_is_one_line_exit_2_on_the_command_line(softhsm: SoftHsm, packer: Path, make_bundle: Any,
                                                              pulled: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from airpack.cli import main

    bundle = make_bundle()
    before = (bundle / "envelope.dsse.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["sign", str(bundle), "--key", softhsm.uri("packer"), "--json"])
    assert e.value.code == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["type"] == "TokenRemovedError" and "nothing was written" in err["message"]
    assert (bundle / "envelope.dsse.json").read_bytes() == before


def test_a_signature_that_does_not_verify_is_never_used(softhsm: SoftHsm, packer: Path, make_bundle: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A token whose answer is not a signature by the key's public half (a mismatched public object) is caught before writing."""
    bundle = make_bundle()
    before = (bundle / "envelope.dsse.json").read_bytes()
    signer = open_signer(softhsm.uri("packer"))
    monkeypatch.setattr(pkcs11.types.SignMixin, "sign", lambda self, data, **kw: b"\x01" * 64)
    with pytest.raises(TokenKeyError, match="does not verify"):
        add_signature(bundle, signer)
    assert (bundle / "envelope.dsse.json").read_bytes() == before


def test_binding_errors_map_to_named_exit_2_errors() -> None:
    e = pkcs11.exceptions
    assert isinstance(pkcs11_keys.as_token_error(e.SessionHandleInvalid(), "u", "signing"), TokenRemovedError)
    assert isinstance(pkcs11_keys.as_token_error(e.PinLocked(), "u", "logging in"), TokenPinError)
    assert isinstance(pkcs11_keys.as_token_error(e.MechanismInvalid(), "u", "signing"), TokenKeyError)
    other = pkcs11_keys.as_token_error(e.GeneralError(), "u", "signing")
    assert other.exit_code == 2 and "GeneralError" in other.message


def test_an_rsa_key_is_refused(softhsm: SoftHsm, tmp_path: Path, tiny_model: Path) -> None:
    with softhsm.session() as s:
        s.generate_keypair(pkcs11.KeyType.RSA, 2048, label="rsa", id=b"rsa", store=True)
    refused(pack_with(tmp_path, tiny_model, softhsm.uri("rsa")), "TokenKeyError", "ECDSA P-256 or Ed25519 only")


def test_ed25519_on_a_token_without_eddsa(softhsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an older YubiKey says: no CKM_EDDSA, so no Ed25519 key is made or used; P-256 still works."""
    softhsm.make_key("ed", algorithm="ed25519")
    real = pkcs11_keys._mechanisms
    monkeypatch.setattr(pkcs11_keys, "_mechanisms", lambda token: real(token) - {pkcs11.Mechanism.EDDSA})
    with pytest.raises(TokenKeyError, match="no CKM_EDDSA"):
        pkcs11_keys.generate_key(softhsm.uri("new-ed"), "ed25519")
    with pytest.raises(TokenKeyError, match="cannot sign with Ed25519"):
        open_signer(softhsm.uri("ed"))
    assert pkcs11_keys.generate_key(softhsm.uri("p256"), "ecdsa-p256").algorithm == "ecdsa-p256"
