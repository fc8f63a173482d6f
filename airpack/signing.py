"""Keys and DSSE envelopes: Ed25519 by default, ECDSA P-256 accepted.

The envelope signs ``PAE(payloadType, payload)`` (DSSE v1), so a signature
can never be moved onto other bytes or another payload type. A key id is the
SHA-256 of the public key's SPKI DER; in an envelope it is only a hint.

A signing key is a PEM file or a key on a hardware token (``open_signer``); the token code
(``pkcs11_keys``) is imported only for a ``pkcs11:`` key, so verifying never loads it.
"""

from __future__ import annotations

import abc
import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ._fs import atomic_write, read_capped
from ._json import StrictJSONError, loads_strict
from ._perms import refuse_shared_write, shared_read_warning, warn_stderr
from .errors import EnvelopeError, KeyFileError, TokenKeyError, UsageError

if TYPE_CHECKING:
    from .pkcs11_keys import TokenKey

PAYLOAD_TYPE = "application/vnd.in-toto+json"
MAX_ENVELOPE_BYTES = 64 * 1024 * 1024
MAX_SIGNATURES = 64
MAX_KEY_FILE_BYTES = 64 * 1024
ALGORITHMS = ("ed25519", "ecdsa-p256")

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def spki_der(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_pem(public_key: PublicKey) -> str:
    """The SPKI PEM of a public key: what NAME.pub and a trust policy hold."""
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def key_id(public_key: PublicKey) -> str:
    return hashlib.sha256(spki_der(public_key)).hexdigest()


def algorithm_of(public_key: PublicKey) -> str:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    return "ecdsa-p256"


def _check_public(key: object, where: str) -> PublicKey:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise KeyFileError(f"{where}: unsupported key type (use Ed25519 or ECDSA P-256)", path=where)


class Signer(abc.ABC):
    """Anything that signs DSSE payloads: a private key file (``FileSigner``) or a key on a token (``TokenSigner``).

    ``sign`` checks every signature against ``public_key`` before it returns it: a token (or a
    corrupted key) that answers with bytes that do not verify is stopped here, before anything
    is written, instead of producing a bundle no host accepts.
    """

    keyid: str
    algorithm: str
    public_key: PublicKey
    source: str  # the key file or the PKCS#11 URI, for messages
    mismatch_error: type[UsageError] = KeyFileError

    @abc.abstractmethod
    def sign_message(self, message: bytes) -> bytes:
        """The signature over ``message`` (the PAE), in DSSE form: DER for ECDSA, 64 raw bytes for Ed25519."""

    def sign(self, payload_type: str, payload: bytes) -> dict[str, str]:
        sig = self.sign_message(pae(payload_type, payload))
        if not verify_sig(self.public_key, payload_type, payload, sig):
            raise self.mismatch_error(
                f"{self.source}: the signature just made does not verify with the key's public key; nothing was written",
                hint="The key's public half does not match its private half (a token with a mismatched public key object?); "
                     "check the key before signing with it.",
            )
        return {"keyid": self.keyid, "sig": base64.b64encode(sig).decode("ascii")}


@dataclass(frozen=True)
class FileSigner(Signer):
    """A loaded private key (a PKCS#8 PEM file) that can sign DSSE payloads."""

    private_key: PrivateKey
    keyid: str
    algorithm: str
    public_key: PublicKey
    source: str = "<key>"

    @classmethod
    def from_key(cls, private_key: PrivateKey, *, source: str = "<key>") -> FileSigner:
        pub = private_key.public_key()
        return cls(private_key=private_key, keyid=key_id(pub), algorithm=algorithm_of(pub), public_key=pub, source=source)

    def sign_message(self, message: bytes) -> bytes:
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return self.private_key.sign(message)
        return self.private_key.sign(message, ec.ECDSA(hashes.SHA256()))


class TokenSigner(Signer):
    """A key that never leaves a PKCS#11 token; each signature is made by the token (``pkcs11_keys.TokenKey``).

    Its signatures are ordinary DSSE signatures: a bundle it signed verifies with no token and
    no PKCS#11 library anywhere, with airpack or any other DSSE verifier.
    """

    mismatch_error = TokenKeyError

    def __init__(self, key: TokenKey) -> None:
        self.key = key
        self.public_key = key.public_key
        self.keyid = key_id(key.public_key)
        self.algorithm = key.algorithm
        self.source = key.uri

    def sign_message(self, message: bytes) -> bytes:
        return self.key.sign_message(message)


def open_signer(ref: str | Path, *, passphrase_file: Path | None = None, pin_file: Path | None = None,
                warn: Callable[[str], None] = warn_stderr, strict: bool = True) -> Signer:
    """The signer a ``--key`` value names: a ``pkcs11:`` URI is a key on a token, anything else a PEM key file.

    The token module is imported only here and only for a URI, so verifying and installing
    (which never sign) never load a PKCS#11 library. ``--pin-file`` belongs to a token key and
    ``--passphrase-file`` to a key file; with ``strict`` (one ``--key``), each given with the
    other kind of key is refused rather than ignored. A command taking several ``--key`` of
    both kinds passes ``strict=False``: each key then takes the flag of its own kind.
    """
    if isinstance(ref, str) and ref[:7].lower() == "pkcs11:":
        if passphrase_file is not None and strict:
            raise UsageError("--passphrase-file is for an encrypted key file; a token key takes its PIN "
                             "(pin-source in the URI, --pin-file or AIRPACK_PIN)")
        from .pkcs11_keys import open_key

        return TokenSigner(open_key(ref, pin_file=pin_file, warn=warn))
    if pin_file is not None and strict:
        raise UsageError(f"--pin-file is for a key on a token (a pkcs11: URI); {ref} is a key file "
                         "(its passphrase goes in --passphrase-file)")
    return load_signer(Path(ref), passphrase=passphrase_from(passphrase_file, warn=warn), warn=warn)


def generate(algorithm: str = "ed25519") -> PrivateKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise UsageError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")


def write_keypair(
    private_key: PrivateKey, key_path: Path, pub_path: Path, *, passphrase: bytes | None = None
) -> str:
    """Write NAME.key (PKCS#8 PEM, 0600, encrypted with a passphrase) and NAME.pub (SPKI PEM)."""
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    atomic_write(key_path, pem, mode=0o600)
    return write_public(private_key.public_key(), pub_path)


def write_public(public_key: PublicKey, path: Path) -> str:
    """NAME.pub (SPKI PEM, 0644) written atomically; returns the key id a trust policy will list for it.

    One writer for a key file's and a token key's public half, so both are the same file that
    ``airpack trust add`` reads.
    """
    atomic_write(path, public_pem(public_key).encode("ascii"), mode=0o644)
    return key_id(public_key)


def load_signer(path: Path, *, passphrase: bytes | None = None, warn: Callable[[str], None] = warn_stderr) -> FileSigner:
    """Load a PKCS#8 PEM private key; a wrong passphrase or a corrupt file is a KeyFileError.

    A key file that group or others can write (or replace) is refused: whoever
    can swap it signs in its owner's name. One they can only read is
    ``warn``-ed about (the secret may already be out) and still used.
    """
    shown = str(path)
    try:
        refuse_shared_write(Path(path), what="private key", error=KeyFileError, display=shown)
        data = read_capped(Path(path), MAX_KEY_FILE_BYTES, display=shown, what="key file")
    except FileNotFoundError:
        raise KeyFileError(f"key file {shown} not found", path=shown) from None
    except KeyFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any refusal of the key file is a key-file error
        raise KeyFileError(f"cannot read key file {shown}: {e}", path=shown) from None
    if b"-----BEGIN PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise KeyFileError(f"key file {shown} is a public key; sign with the private NAME.key file", path=shown)
    encrypted = b"ENCRYPTED" in data[:200]
    if encrypted and not passphrase:
        raise KeyFileError(
            f"key file {shown} is encrypted; give its passphrase with --passphrase-file or AIRPACK_PASSPHRASE",
            path=shown,
        )
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        reason = "wrong passphrase or corrupted key" if encrypted else f"not a valid PEM private key ({e})"
        raise KeyFileError(f"cannot load key file {shown}: {reason}", path=shown) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey) and not (
        isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    ):
        raise KeyFileError(f"key file {shown}: unsupported key type (use Ed25519 or ECDSA P-256)", path=shown)
    leak = shared_read_warning(Path(path), what="private key", display=shown)
    if leak is not None:
        warn(leak)
    return FileSigner.from_key(key, source=shown)


def load_public_pem(data: bytes, *, where: str) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{where}: not a valid PEM public key ({e})", path=where) from None
    return _check_public(key, where)


def read_public_file(path: Path) -> tuple[PublicKey, str]:
    """A public key file (SPKI PEM) and its PEM text; anything wrong with it is a ``KeyFileError`` (exit 2).

    A folder, an unreadable or oversized file, a private key or garbage in
    its place is a key file the user must fix: configuration, not integrity.
    """
    shown = str(path)
    if Path(path).is_dir():
        raise KeyFileError(f"public key {shown} is a folder; give the NAME.pub file", path=shown)
    try:
        data = read_capped(Path(path), MAX_KEY_FILE_BYTES, display=shown, what="public key")
    except FileNotFoundError:
        raise KeyFileError(f"public key {shown} not found", path=shown) from None
    except Exception as e:  # noqa: BLE001 - any refusal of the key file is a key-file error
        raise KeyFileError(f"cannot read public key: {e}", path=shown) from None
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"{shown} is a private key; give the .pub file", path=shown)
    key = load_public_pem(data, where=shown)
    return key, public_pem(key)  # the canonical SPKI PEM: nothing but the key reaches the policy


def load_public_file(path: Path) -> PublicKey:
    return read_public_file(path)[0]


def verify_sig(public_key: PublicKey, payload_type: str, payload: bytes, sig: bytes) -> bool:
    msg = pae(payload_type, payload)
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(sig, msg)
        else:
            public_key.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


# -- the envelope ------------------------------------------------------------------


@dataclass(frozen=True)
class RawSignature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    """A structurally valid DSSE envelope; nothing in it is trusted yet."""

    payload_type: str
    payload: bytes
    signatures: tuple[RawSignature, ...]

    def to_bytes(self) -> bytes:
        return envelope_bytes(self.payload_type, self.payload, [
            {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")} for s in self.signatures
        ])


def envelope_bytes(payload_type: str, payload: bytes, signatures: list[dict[str, str]]) -> bytes:
    doc = {
        "payload": base64.b64encode(payload).decode("ascii"),
        "payloadType": payload_type,
        "signatures": signatures,
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("ascii")


def _b64(value: Any, what: str, where: str) -> bytes:
    if not isinstance(value, str):
        raise EnvelopeError(f"envelope {where}: {what} is not a string", path=where)
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise EnvelopeError(f"envelope {where}: {what} is not valid base64", path=where) from None
    # One spelling per byte string: non-zero padding bits would let different envelopes carry the same bytes.
    if base64.b64encode(raw).decode("ascii") != value:
        raise EnvelopeError(f"envelope {where}: {what} is not valid base64 (non-canonical encoding)", path=where)
    return raw


def oversized_envelope(where: str, size: int | None) -> EnvelopeError:
    """The refusal of an envelope over the cap: it says so, with its size, and names the file once."""
    got = f"{size:,} bytes, " if size is not None else ""
    return EnvelopeError(
        f"envelope {where} is too large: {got}larger than the {MAX_ENVELOPE_BYTES:,}-byte limit",
        path=where,
        hint="An airpack envelope holds one manifest and a few signatures; this file is not one. Get a fresh copy from the packer.",
    )


def parse_envelope(data: bytes, *, where: str) -> Envelope:
    """Parse envelope bytes strictly; the size cap is applied by the caller's read."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise oversized_envelope(where, len(data))
    try:
        doc = loads_strict(data, allow_floats=False, max_depth=4)
    except StrictJSONError as e:
        raise EnvelopeError(f"envelope {where} is malformed: {e}", path=where) from None
    if not isinstance(doc, dict):
        raise EnvelopeError(f"envelope {where} is not a JSON object", path=where)
    unknown = set(doc) - {"payload", "payloadType", "signatures"}
    if unknown:
        raise EnvelopeError(f"envelope {where} has unknown fields: {', '.join(sorted(unknown))}", path=where)
    ptype = doc.get("payloadType")
    if not isinstance(ptype, str):
        raise EnvelopeError(f"envelope {where} has no payloadType", path=where)
    payload = _b64(doc.get("payload"), "payload", where)
    sigs = doc.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        raise EnvelopeError(f"envelope {where} has no signatures", path=where)
    if len(sigs) > MAX_SIGNATURES:
        raise EnvelopeError(f"envelope {where} has more than {MAX_SIGNATURES} signatures", path=where)
    out = []
    for s in sigs:
        if not isinstance(s, dict) or "sig" not in s or set(s) - {"keyid", "sig"}:
            raise EnvelopeError(f"envelope {where} has a malformed signature entry", path=where)
        kid = s.get("keyid", "")
        if not isinstance(kid, str) or len(kid) > 256:
            raise EnvelopeError(f"envelope {where} has a malformed keyid", path=where)
        sig = _b64(s["sig"], "signature", where)
        if len(sig) > 1024:
            raise EnvelopeError(f"envelope {where} has an oversized signature", path=where)
        out.append(RawSignature(keyid=kid, sig=sig))
    return Envelope(payload_type=ptype, payload=payload, signatures=tuple(out))


def passphrase_from(file: Path | None, *, warn: Callable[[str], None] = warn_stderr) -> bytes | None:
    """The passphrase from a file (first line) or AIRPACK_PASSPHRASE; None when neither is set.

    A passphrase file that group or others can read is ``warn``-ed about.
    """
    if file is not None:
        try:
            raw = read_capped(Path(file), 4096, what="passphrase file")
        except FileNotFoundError:
            raise KeyFileError(f"passphrase file {file} not found", path=str(file)) from None
        except Exception as e:  # noqa: BLE001
            raise KeyFileError(f"cannot read passphrase file {file}: {e}", path=str(file)) from None
        line = raw.splitlines()[0] if raw.splitlines() else b""
        if not line:
            raise KeyFileError(f"passphrase file {file} is empty", path=str(file))
        leak = shared_read_warning(Path(file), what="passphrase file")
        if leak is not None:
            warn(leak)
        return line
    env = os.environ.get("AIRPACK_PASSPHRASE")
    return env.encode("utf-8") if env else None
