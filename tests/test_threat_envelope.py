"""Threats against the envelope and the payload's shape: size, nesting, duplicates, encoding.

The envelope is untrusted input read before any signature check, so it is
capped and parsed strictly (exit 4). A payload that trusted keys signed but
that is not a well-formed manifest is an integrity failure (exit 3).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from conftest import KeyPair, verify
from threat_helpers import (
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

from airpack import signing
from airpack.errors import (
    BundleMismatchError,
    EnvelopeError,
    IntegrityError,
    MalformedManifestError,
    SignatureError,
)
from airpack.manifest import ENVELOPE_NAME, MANIFEST_NAME
from airpack.signing import PAYLOAD_TYPE, envelope_bytes

# -- duplicate keys ---------------------------------------------------------------------------


def test_duplicate_key_in_envelope_is_refused(bundle: Path, policy: Path) -> None:
    env = envelope_doc(bundle)
    text = (bundle / ENVELOPE_NAME).read_text()
    # A second "payload" after the first: a lax parser would take the last one.
    other = base64.b64encode(b'{"evil": true}').decode()
    forged = text.replace('"payloadType"', f'"payload": "{other}",\n  "payloadType"', 1)
    assert forged.count('"payload"') == 2
    (bundle / ENVELOPE_NAME).write_text(forged)
    refused(EnvelopeError, lambda: verify(bundle, policy), code=4, match="duplicate key 'payload'")
    assert_cli_error(cli_inproc("verify", bundle, "--trust", policy), 4, "duplicate key", ENVELOPE_NAME)
    # The same inside a signature entry.
    sig = env["signatures"][0]
    (bundle / ENVELOPE_NAME).write_text(
        f'{{"payload": "{env["payload"]}", "payloadType": "{PAYLOAD_TYPE}", '
        f'"signatures": [{{"keyid": "a", "keyid": "b", "sig": "{sig["sig"]}"}}]}}'
    )
    refused(EnvelopeError, lambda: verify(bundle, policy), code=4, match="duplicate key 'keyid'")


def test_duplicate_key_in_signed_payload_is_refused(bundle: Path, policy: Path, alice: KeyPair) -> None:
    """Signed by a trusted key, yet ambiguous: two "sequence" values. Integrity failure, exit 3."""
    data = payload(bundle)
    forged = data.replace(b'"sequence": 1', b'"sequence": 1,\n      "sequence": 99', 1)
    assert forged != data
    resign(bundle, forged, alice.signer)
    refused(MalformedManifestError, lambda: verify(bundle, policy), code=3, match="duplicate key 'sequence'")
    assert_cli_error(cli_inproc("verify", bundle, "--trust", policy), 3, "duplicate key")


def test_duplicate_subject_in_signed_payload_is_refused(bundle: Path, policy: Path, alice: KeyPair) -> None:
    st = statement(bundle)
    st["subject"].append(dict(st["subject"][0]))
    resign(bundle, st, alice.signer)
    refused(IntegrityError, lambda: verify(bundle, policy), code=3, match="twice")


# -- size and depth ------------------------------------------------------------------------------


def test_envelope_over_the_size_cap_is_refused(bundle: Path, policy: Path) -> None:
    """A sparse file one byte over the cap: refused by size, before any parsing."""
    env = bundle / ENVELOPE_NAME
    with open(env, "r+b") as f:
        f.truncate(signing.MAX_ENVELOPE_BYTES + 1)
    assert env.stat().st_size == signing.MAX_ENVELOPE_BYTES + 1
    refused(EnvelopeError, lambda: verify(bundle, policy), code=4, match="larger than")
    r = cli_inproc("verify", bundle, "--trust", policy, "--json")
    assert_cli_json_error(r, 4, "EnvelopeError", ENVELOPE_NAME)


def test_envelope_at_the_cap_is_parsed(bundle: Path, policy: Path) -> None:
    """Exactly at the cap is not refused for size (whitespace padding keeps it valid)."""
    data = (bundle / ENVELOPE_NAME).read_bytes()
    with open(bundle / ENVELOPE_NAME, "wb") as f:
        f.write(data)
        f.write(b" " * (signing.MAX_ENVELOPE_BYTES - len(data)))
    assert verify(bundle, policy).signer_names == ["alice"]


@pytest.mark.parametrize("depth", [5, 1000, 100_000])
def test_deeply_nested_envelope_is_refused(bundle: Path, policy: Path, depth: int) -> None:
    env = envelope_doc(bundle)
    nested = "[" * depth + "]" * depth
    text = json.dumps(env)[:-1] + f', "x": {nested}' + "}"
    (bundle / ENVELOPE_NAME).write_text(text)
    refused(EnvelopeError, lambda: verify(bundle, policy), code=4)


def test_deeply_nested_signed_payload_is_refused(bundle: Path, policy: Path, alice: KeyPair) -> None:
    data = payload(bundle)
    deep = b"[" * 1000 + b"]" * 1000
    forged = data.replace(b'"targets": []', b'"targets": ' + deep, 1)
    assert forged != data
    resign(bundle, forged, alice.signer)
    refused(MalformedManifestError, lambda: verify(bundle, policy), code=3, match="nested deeper")
    assert_cli_error(cli_inproc("verify", bundle, "--trust", policy), 3, "nested deeper")


def test_float_in_signed_payload_is_refused(bundle: Path, policy: Path, alice: KeyPair) -> None:
    data = payload(bundle)
    forged = data.replace(b'"sequence": 1', b'"sequence": 1.0', 1)
    resign(bundle, forged, alice.signer)
    refused(MalformedManifestError, lambda: verify(bundle, policy), code=3, match="floating-point")


# -- encoding and structure ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("payload", "not base64!", "payload is not valid base64"),
        ("payload", "ewogICJf\nZ", "payload is not valid base64"),
        ("payload", 12, "payload is not a string"),
        ("sig", "%%%%", "signature is not valid base64"),
        ("sig", "QUJD", None),  # valid base64, wrong signature bytes: a signature failure
    ],
)
def test_malformed_base64_is_refused(bundle: Path, policy: Path, field: str, value: object, match: str | None) -> None:
    env = envelope_doc(bundle)
    if field == "payload":
        env["payload"] = value
    else:
        env["signatures"][0]["sig"] = value
    write_envelope_doc(bundle, env)
    refused(EnvelopeError if match else SignatureError, lambda: verify(bundle, policy), code=4, match=match)


def test_non_canonical_base64_is_refused(bundle: Path, policy: Path) -> None:
    """Base64 with non-zero padding bits decodes to the same bytes; only one spelling is accepted."""
    env = envelope_doc(bundle)
    sig = env["signatures"][0]["sig"]
    assert sig.endswith("==")  # 64-byte Ed25519 signature: the last data character has 4 unused bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(sig[-3])
    twin = sig[:-3] + alphabet[last | 1] + "=="
    assert twin != sig and base64.b64decode(twin) == base64.b64decode(sig)
    env["signatures"][0]["sig"] = twin
    write_envelope_doc(bundle, env)
    refused(EnvelopeError, lambda: verify(bundle, policy), code=4, match="not valid base64")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"", "malformed"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[]", "not a JSON object"),
        (b'{"payload": "", "payloadType": "x", "signatures": [], "extra": 1}', "unknown fields"),
        (b'{"payload": "", "payloadType": "x", "signatures": []}', "no signatures"),
        (b'{"payload": "", "signatures": [{"sig": ""}]}', "no payloadType"),
        (b'{"payload": "", "payloadType": "x", "signatures": ["abc"]}', "malformed signature entry"),
        (b'{"payload": "", "payloadType": "x", "signatures": [{"sig": "", "role": "x"}]}', "malformed signature"),
        (b'{"payload": "", "payloadType": "x", "signatures": [{"sig": "", "keyid": 5}]}', "malformed keyid"),
        (b'{"payload": "", "payloadType": "x", "signatures": [{"sig": "", "keyid": 1.5}]}', "floating-point"),
        (b'{"payload": NaN}', "NaN"),
    ],
)
def test_malformed_envelope_is_refused(bundle: Path, policy: Path, text: bytes, match: str) -> None:
    (bundle / ENVELOPE_NAME).write_bytes(text)
    refused(EnvelopeError, lambda: verify(bundle, policy), code=4, match=match)


def test_too_many_signatures_are_refused(bundle: Path, policy: Path) -> None:
    env = envelope_doc(bundle)
    env["signatures"] = env["signatures"] * (signing.MAX_SIGNATURES + 1)
    write_envelope_doc(bundle, env)
    refused(EnvelopeError, lambda: verify(bundle, policy), code=4, match="more than")


def test_oversized_signature_is_refused(bundle: Path, policy: Path) -> None:
    env = envelope_doc(bundle)
    env["signatures"][0]["sig"] = base64.b64encode(b"x" * 4096).decode()
    write_envelope_doc(bundle, env)
    refused(EnvelopeError, lambda: verify(bundle, policy), code=4, match="oversized signature")


# -- missing or replaced files -----------------------------------------------------------------------


def test_missing_envelope_is_refused(bundle: Path, policy: Path) -> None:
    (bundle / ENVELOPE_NAME).unlink()
    refused(EnvelopeError, lambda: verify(bundle, policy), code=4, match="no signature envelope")
    r = cli_inproc("verify", bundle, "--trust", policy)
    assert_cli_error(r, 4, "no signature envelope", ENVELOPE_NAME)


def test_envelope_that_is_a_symlink_or_folder_is_refused(bundle: Path, policy: Path, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.json"
    os.replace(bundle / ENVELOPE_NAME, real)
    (bundle / ENVELOPE_NAME).symlink_to(real)
    refused(EnvelopeError, lambda: verify(bundle, policy), code=4, match="symbolic link")
    (bundle / ENVELOPE_NAME).unlink()
    (bundle / ENVELOPE_NAME).mkdir()
    refused(EnvelopeError, lambda: verify(bundle, policy), code=4, match="not a regular file")


def test_manifest_copy_differing_from_the_payload_is_refused(bundle: Path, policy: Path) -> None:
    copy = bundle / MANIFEST_NAME
    # Even a whitespace-only change: the copy must be byte-identical to what was signed.
    copy.write_bytes(copy.read_bytes() + b"\n")
    refused(IntegrityError, lambda: verify(bundle, policy), code=3, match="differs from the signed payload")
    r = cli_inproc("verify", bundle, "--trust", policy, "--json")
    assert_cli_json_error(r, 3, "IntegrityError", MANIFEST_NAME)


def test_manifest_copy_missing_or_linked_is_refused(bundle: Path, policy: Path, tmp_path: Path) -> None:
    copy = bundle / MANIFEST_NAME
    data = copy.read_bytes()
    copy.unlink()
    e = refused(BundleMismatchError, lambda: verify(bundle, policy), code=3)
    assert MANIFEST_NAME in e.message
    outside = tmp_path / "copy.json"
    outside.write_bytes(data)
    copy.symlink_to(outside)
    refused(IntegrityError, lambda: verify(bundle, policy), code=3, match="symbolic link")


def test_envelope_bytes_round_trip(bundle: Path) -> None:
    """The envelope writer and parser agree (what pack writes is what verify reads)."""
    raw = (bundle / ENVELOPE_NAME).read_bytes()
    env = signing.parse_envelope(raw, where="x")
    assert env.to_bytes() == raw
    assert envelope_bytes(env.payload_type, env.payload, [
        {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()} for s in env.signatures
    ]) == raw


# -- type confusion in the payload ---------------------------------------------------------------------

_VALUES: list[object] = [5, -1, 2**70, "x", None, True, [], [5], {}, {"a": 1}]


def _paths(obj: object, pre: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    out = [pre] if pre else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*pre, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*pre, i))
    return out


def test_any_field_of_any_type_never_crashes_the_parser(bundle: Path) -> None:
    """Every field of a real manifest replaced by every JSON type (or removed): a named refusal or a parse.

    ``inspect`` parses payloads nobody has verified, so this is untrusted input too.
    """
    from airpack.errors import AirpackError
    from airpack.manifest import parse

    st = statement(bundle)
    tried = 0
    for path in _paths(st):
        for value in [*_VALUES, "DELETE"]:
            doc = json.loads(json.dumps(st))
            here = doc
            for k in path[:-1]:
                here = here[k]
            if value == "DELETE":
                del here[path[-1]]
            else:
                here[path[-1]] = value
            try:
                parse(json.dumps(doc).encode())
            except AirpackError as e:
                assert e.exit_code in (3, 4), (path, value, e)
            tried += 1
    assert tried > 500


def test_inspect_of_a_payload_with_wheels_of_the_wrong_type(bundle: Path) -> None:
    env = envelope_doc(bundle)
    st = statement(bundle)
    st["predicate"]["wheels"] = 5
    env["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    write_envelope_doc(bundle, env)
    r = cli_inproc("inspect", bundle)
    assert_cli_error(r, 3, "predicate.wheels must be a list")
