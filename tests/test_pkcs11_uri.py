"""RFC 7512 ``pkcs11:`` URIs: what parses, what is refused (exit 2), and that a PIN never rides on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from airpack.errors import Pkcs11UriError, TokenModuleError, TokenPinError, UsageError
from airpack.pkcs11_keys import is_pkcs11_uri, module_path, parse_uri, read_pin

MOD = "/usr/lib/softhsm/libsofthsm2.so"


def test_the_issue_example_parses() -> None:
    u = parse_uri(f"pkcs11:token=airpack;object=packer?module-path={MOD}&pin-source=file:/run/pin")
    assert u.token == "airpack" and u.object == "packer" and u.id is None and u.type is None
    assert u.module_path == MOD and u.pin_source == Path("/run/pin")
    assert u.names_object()


def test_percent_escapes_decode_and_id_is_bytes() -> None:
    u = parse_uri("pkcs11:token=My%20Token;object=sign%3Bkey;id=%01%02%ff;type=private")
    assert u.token == "My Token" and u.object == "sign;key" and u.id == b"\x01\x02\xff" and u.type == "private"
    assert u.describe_object() == "label 'sign;key' and id 0102ff"


def test_pin_source_spellings() -> None:
    assert parse_uri("pkcs11:object=a?pin-source=file:///run/pin").pin_source == Path("/run/pin")
    assert parse_uri("pkcs11:object=a?pin-source=/run/pin").pin_source == Path("/run/pin")
    assert parse_uri("PKCS11:object=a").object == "a"  # the scheme is case-insensitive


def test_scheme_detection() -> None:
    assert is_pkcs11_uri("pkcs11:object=a") and is_pkcs11_uri("PKCS11:")
    assert not is_pkcs11_uri("keys/alice.key") and not is_pkcs11_uri(Path("pkcs11:x"))


@pytest.mark.parametrize(("uri", "says"), [
    ("pkcs11:object=a?pin-value=1234", "pin-value is refused"),
    ("pkcs11:object=a?module-name=softhsm2", "module-name is not supported"),
    ("pkcs11:objct=a", "unknown path attribute 'objct'"),
    ("pkcs11:object=a?x-vendor=1", "unknown query attribute"),
    ("pkcs11:object=a;object=b", "given twice"),
    ("pkcs11:object=a%zz", "%XX escape"),
    ("pkcs11:object=a b", "must be %-escaped"),
    ("pkcs11:object", "is not NAME=VALUE"),
    ("pkcs11:object=a;type=secret", "type='secret'"),
    ("pkcs11:object=a;slot-id=one", "slot-id must be a decimal"),
    ("pkcs11:object=a;library-version=x", "library-version"),
    ("pkcs11:object=a;id=", "id is empty"),
    ("pkcs11:object=%ff", "not UTF-8"),
    ("pkcs11:object=a?module-path=lib/softhsm2.so", "module-path must be an absolute path"),
    ("pkcs11:object=a?pin-source=env:PIN", "pin-source must be file:/absolute/path"),
    ("pkcs11:object=a?pin-source=file://host/run/pin", "another host"),
    ("pkcs11:object=a?pin-source=file:relative", "absolute path"),
    ("file:/keys/alice.key", "does not start with pkcs11:"),
])
def test_bad_uris_are_refused_with_exit_2(uri: str, says: str) -> None:
    with pytest.raises(Pkcs11UriError) as e:
        parse_uri(uri)
    assert says in e.value.message
    assert e.value.exit_code == 2 and e.value.hint


def test_a_refused_pin_value_is_never_echoed() -> None:
    with pytest.raises(Pkcs11UriError) as e:
        parse_uri("pkcs11:object=a?pin-value=s3cret&module-path=/x.so")
    assert "s3cret" not in e.value.message and "pin-value=REDACTED" in e.value.message


def test_overlong_uri_is_refused() -> None:
    with pytest.raises(Pkcs11UriError, match="longer than"):
        parse_uri("pkcs11:object=" + "a" * 5000)


def test_module_path_comes_from_the_uri_then_the_environment(tmp_path: Path) -> None:
    so = tmp_path / "module.so"
    so.write_bytes(b"\x7fELF")
    assert module_path(parse_uri(f"pkcs11:object=a?module-path={so}"), env={}) == so
    assert module_path(parse_uri("pkcs11:object=a"), env={"AIRPACK_PKCS11_MODULE": str(so)}) == so
    with pytest.raises(TokenModuleError, match="no PKCS#11 module"):
        module_path(parse_uri("pkcs11:object=a"), env={})
    with pytest.raises(TokenModuleError, match="does not exist"):
        module_path(parse_uri(f"pkcs11:object=a?module-path={tmp_path}/gone.so"), env={})
    with pytest.raises(TokenModuleError, match="is not a file"):
        module_path(parse_uri(f"pkcs11:object=a?module-path={tmp_path}"), env={})
    with pytest.raises(TokenModuleError, match="not an absolute path"):
        module_path(parse_uri("pkcs11:object=a"), env={"AIRPACK_PKCS11_MODULE": "libsofthsm2.so"})


def test_a_module_others_can_replace_is_refused(tmp_path: Path) -> None:
    so = tmp_path / "module.so"
    so.write_bytes(b"\x7fELF")
    so.chmod(0o666)
    with pytest.raises(TokenModuleError, match="PKCS#11 module"):
        module_path(parse_uri(f"pkcs11:object=a?module-path={so}"), env={})


def test_pin_sources(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("1234\nignored\n")
    pin.chmod(0o600)
    assert read_pin(parse_uri(f"pkcs11:object=a?pin-source=file:{pin}"), None, env={}) == "1234"
    assert read_pin(parse_uri("pkcs11:object=a"), pin, env={}) == "1234"
    assert read_pin(parse_uri("pkcs11:object=a"), None, env={"AIRPACK_PIN": "9876"}) == "9876"
    assert read_pin(parse_uri("pkcs11:object=a"), None, env={}) is None
    with pytest.raises(UsageError, match="two PIN sources"):
        read_pin(parse_uri(f"pkcs11:object=a?pin-source=file:{pin}"), pin, env={})
    with pytest.raises(TokenPinError, match="not found"):
        read_pin(parse_uri("pkcs11:object=a"), tmp_path / "nope", env={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(TokenPinError, match="is empty"):
        read_pin(parse_uri("pkcs11:object=a"), tmp_path / "empty", env={})


def test_a_pin_file_others_can_read_is_warned_about(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o644)
    warnings: list[str] = []
    assert read_pin(parse_uri("pkcs11:object=a"), pin, env={}, warn=warnings.append) == "1234"
    assert warnings and "PIN file" in warnings[0]
