"""Keys that never leave a hardware token: RFC 7512 ``pkcs11:`` URIs, key look-up, signing, key generation.

Security staff keep signing keys on YubiKeys, smart cards and network HSMs. airpack reaches them
through the vendor's PKCS#11 module and python-pkcs11; this is the ONLY module that imports the
binding (an import-linter contract holds it), and ``signing.open_signer`` imports this module only
for a ``pkcs11:`` key, so the offline side (verify, install) never loads a PKCS#11 library.

Rules kept here:

* A PIN never sits on the command line: ``pin-value`` in a URI is refused; the PIN comes from
  ``pin-source=file:...``, ``--pin-file`` or ``AIRPACK_PIN``.
* A PIN is tried once. A wrong one is a ``TokenPinError`` (exit 2) and the command stops; a
  token locks after a few failures, so a retry loop would lock the signer out.
* Every binding exception becomes a named exit-2 error with a hint (``errors.TokenError`` and
  its subclasses): a traceback or exit 1 on a token problem is a bug.
* ECDSA signs a SHA-256 digest computed here (``CKM_ECDSA``, which every token has; SoftHSM2
  has no ``CKM_ECDSA_SHA256``) and the token's raw ``r || s`` is turned into the DER form
  airpack (and every DSSE verifier using OpenSSL) expects; Ed25519 is ``CKM_EDDSA`` over the
  whole message. ``signing.TokenSigner`` checks each signature against the public key before
  it is used, so a token that returns garbage never gets it written into an envelope.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ._fs import read_capped
from ._perms import refuse_shared_write, shared_read_warning, warn_stderr
from .errors import (
    Pkcs11UriError,
    TokenError,
    TokenKeyError,
    TokenModuleError,
    TokenNotFoundError,
    TokenPinError,
    TokenRemovedError,
    UsageError,
)

SCHEME = "pkcs11:"
MODULE_ENV = "AIRPACK_PKCS11_MODULE"
PIN_ENV = "AIRPACK_PIN"
MAX_URI_CHARS = 4096
MAX_PIN_FILE_BYTES = 4096

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

# DER of the curve OIDs, as CKA_EC_PARAMS holds them (and PKCS#11 3.0's PrintableString name for Ed25519).
P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")  # 1.2.840.10045.3.1.7, prime256v1 / secp256r1
ED25519_PARAMS = bytes.fromhex("06032b6570")  # 1.3.101.112, id-Ed25519
ED25519_NAMED = b"\x13\x0cedwards25519"

# -- the URI (pure) -------------------------------------------------------------------------

# RFC 7512 section 2.3: the path attributes that select a token (with its slot and library) and an object.
TOKEN_ATTRS = ("token", "manufacturer", "serial", "model")
SLOT_ATTRS = ("slot-id", "slot-description", "slot-manufacturer")
LIBRARY_ATTRS = ("library-manufacturer", "library-description", "library-version")
OBJECT_ATTRS = ("object", "id", "type")
PATH_ATTRS = frozenset(TOKEN_ATTRS + SLOT_ATTRS + LIBRARY_ATTRS + OBJECT_ATTRS)
QUERY_ATTRS = frozenset({"module-path", "module-name", "pin-source", "pin-value"})
OBJECT_TYPES = ("private", "public", "cert", "secret-key", "data")
_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f\"<>\\^`{|}#]")


def is_pkcs11_uri(ref: object) -> bool:
    """Whether a ``--key`` value names a token key (``pkcs11:...``; the scheme is case-insensitive) rather than a file."""
    return isinstance(ref, str) and ref[: len(SCHEME)].lower() == SCHEME


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed RFC 7512 URI: which token and object, and where the module and the PIN are.

    ``text`` is the URI as given; it holds no secret (``pin-value`` is refused), so messages show it.
    """

    text: str
    attrs: dict[str, str] = field(default_factory=dict)  # path attributes other than id, percent-decoded
    id: bytes | None = None
    module_path: str | None = None
    pin_source: Path | None = None

    @property
    def token(self) -> str | None:
        return self.attrs.get("token")

    @property
    def object(self) -> str | None:
        return self.attrs.get("object")

    @property
    def type(self) -> str | None:
        return self.attrs.get("type")

    def names_object(self) -> bool:
        return self.object is not None or self.id is not None

    def describe_object(self) -> str:
        parts = []
        if self.object is not None:
            parts.append(f"label {self.object!r}")
        if self.id is not None:
            parts.append(f"id {self.id.hex()}")
        return " and ".join(parts) or "any label"


_PIN_VALUE = re.compile(r"(pin-value=)[^&]*", re.IGNORECASE)


def _bad_uri(text: str, why: str) -> Pkcs11UriError:
    """The refusal of a URI; a ``pin-value`` in it is never echoed (messages reach logs and terminals)."""
    text = _PIN_VALUE.sub(r"\1REDACTED", text)
    shown = text if len(text) <= 300 else text[:300] + "..."
    return Pkcs11UriError(f"PKCS#11 URI {shown}: {why}", path=None)


def _decode(text: str, name: str, raw: str) -> bytes:
    if _PCT.search(raw):
        raise _bad_uri(text, f"{name}: a '%' must start a %XX escape")
    if _BAD_CHARS.search(raw):
        raise _bad_uri(text, f"{name}: characters such as spaces, quotes or '#' must be %-escaped")
    return unquote_to_bytes(raw)


def _text(text: str, name: str, raw: str) -> str:
    try:
        return _decode(text, name, raw).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_uri(text, f"{name} is not UTF-8 once %-decoded") from None


def _pairs(text: str, part: str, sep: str, known: frozenset[str], where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in part.split(sep):
        if not item:
            continue
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise _bad_uri(text, f"{where} attribute {item!r} is not NAME=VALUE")
        if name not in known:
            raise _bad_uri(text, f"unknown {where} attribute {name!r} (known: {', '.join(sorted(known))})")
        if name in out:
            raise _bad_uri(text, f"{where} attribute {name!r} is given twice")
        out[name] = value
    return out


def _pin_source(text: str, raw: str) -> Path:
    value = _text(text, "pin-source", raw)
    if value.startswith("file://"):
        rest = value[len("file://"):]
        if not rest.startswith("/"):
            raise _bad_uri(text, "pin-source=file://HOST/... names another host; use file:/absolute/path")
        value = rest
    elif value.startswith("file:"):
        value = value[len("file:"):]
    elif not value.startswith("/"):
        raise _bad_uri(text, "pin-source must be file:/absolute/path (or an absolute path); no other source is read")
    if not value.startswith("/"):
        raise _bad_uri(text, "pin-source must name an absolute path")
    return Path(value)


def parse_uri(text: str) -> Pkcs11Uri:
    """Parse a ``pkcs11:`` URI strictly (RFC 7512): unknown, repeated or malformed attributes are refused.

    Strict because a misspelt attribute (``objct=``) would otherwise widen the match to some
    other key on the token. ``pin-value`` is refused outright: a PIN on the command line is
    visible to every user of the host (``ps``, shell history). ``module-name`` is refused too:
    airpack loads a module only from an absolute path it was given, never from a search path.
    """
    if not is_pkcs11_uri(text):
        raise _bad_uri(text, "does not start with pkcs11:")
    if len(text) > MAX_URI_CHARS:
        raise _bad_uri(text, f"longer than {MAX_URI_CHARS} characters")
    body = text[len(SCHEME):]
    path, _, query = body.partition("?")
    attrs = _pairs(text, path, ";", PATH_ATTRS, "path")
    q = _pairs(text, query, "&", QUERY_ATTRS, "query")
    if "pin-value" in q:
        raise _bad_uri(text, "pin-value is refused: a PIN on the command line is visible to every user of the host; "
                             "use pin-source=file:/path, --pin-file or AIRPACK_PIN")
    if "module-name" in q:
        raise _bad_uri(text, "module-name is not supported: give the module's absolute path as module-path=")
    decoded = {k: _text(text, k, v) for k, v in attrs.items() if k != "id"}
    key_id = _decode(text, "id", attrs["id"]) if "id" in attrs else None
    if key_id is not None and not key_id:
        raise _bad_uri(text, "id is empty")
    if "type" in decoded and decoded["type"] not in OBJECT_TYPES:
        raise _bad_uri(text, f"type={decoded['type']!r} is not one of {', '.join(OBJECT_TYPES)}")
    if "slot-id" in decoded and not decoded["slot-id"].isdigit():
        raise _bad_uri(text, "slot-id must be a decimal number")
    if "library-version" in decoded and not re.fullmatch(r"\d+(\.\d+)?", decoded["library-version"]):
        raise _bad_uri(text, "library-version must be MAJOR or MAJOR.MINOR")
    module = _text(text, "module-path", q["module-path"]) if "module-path" in q else None
    if module is not None and not module.startswith("/"):
        raise _bad_uri(text, "module-path must be an absolute path")
    pin_source = _pin_source(text, q["pin-source"]) if "pin-source" in q else None
    return Pkcs11Uri(text=text, attrs=decoded, id=key_id, module_path=module, pin_source=pin_source)


# -- module and PIN -------------------------------------------------------------------------


def module_path(uri: Pkcs11Uri, env: dict[str, str] | None = None) -> Path:
    """The PKCS#11 module to load: the URI's ``module-path``, else ``AIRPACK_PKCS11_MODULE``; absolute, a file, not shared-writable.

    Whoever can replace the module reads every PIN and signs in the signer's name, so a module
    that group or others can write (or swap through its folder) is refused like a private key.
    """
    environ = os.environ if env is None else env
    raw = uri.module_path or environ.get(MODULE_ENV) or None
    if raw is None:
        raise TokenModuleError(f"no PKCS#11 module for {uri.text}: add ?module-path=/path/to/module.so or set {MODULE_ENV}")
    path = Path(raw)
    if not path.is_absolute():
        raise TokenModuleError(f"PKCS#11 module {raw} is not an absolute path", path=raw)
    try:
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise TokenModuleError(f"PKCS#11 module {raw} {what}", path=raw)
        refuse_shared_write(path, what="PKCS#11 module", error=TokenModuleError, display=raw)
    except OSError as e:
        raise TokenModuleError(f"cannot read PKCS#11 module {raw}: {e.strerror or e}", path=raw) from None
    return path


def read_pin(uri: Pkcs11Uri, pin_file: Path | None, *, env: dict[str, str] | None = None,
             warn: Callable[[str], None] = warn_stderr) -> str | None:
    """The user PIN: the URI's ``pin-source`` or ``--pin-file`` (the first line of the file), else ``AIRPACK_PIN``; None if none.

    Two files at once are refused rather than one silently winning. A PIN file that group or
    others can read is ``warn``-ed about (the PIN may already be out), as a passphrase file is.
    """
    environ = os.environ if env is None else env
    if uri.pin_source is not None and pin_file is not None:
        raise UsageError(f"two PIN sources for {uri.text}: pin-source in the URI and --pin-file; give one")
    source = uri.pin_source or pin_file
    if source is None:
        pin = environ.get(PIN_ENV)
        return pin if pin else None
    shown = str(source)
    try:
        raw = read_capped(Path(source), MAX_PIN_FILE_BYTES, display=shown, what="PIN file")
    except FileNotFoundError:
        raise TokenPinError(f"PIN file {shown} not found", path=shown) from None
    except Exception as e:  # noqa: BLE001 - any refusal of the PIN file is the signer's to fix
        raise TokenPinError(f"cannot read PIN file {shown}: {e}", path=shown) from None
    lines = raw.splitlines()
    line = lines[0].rstrip(b"\r") if lines else b""
    if not line:
        raise TokenPinError(f"PIN file {shown} is empty", path=shown)
    try:
        pin = line.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenPinError(f"PIN file {shown} is not UTF-8", path=shown) from None
    leak = shared_read_warning(Path(source), what="PIN file", display=shown)
    if leak is not None:
        warn(leak)
    return pin


# -- the binding --------------------------------------------------------------------------------


def _binding() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise TokenModuleError("python-pkcs11 is not installed; `pip install airpack` brings it") from None
    return pkcs11


# The token (or the key on it) went away under an open session: pulled out, reset, or its storage removed.
_REMOVED = ("DeviceRemoved", "TokenNotPresent", "TokenNotRecognised", "SessionClosed", "SessionHandleInvalid",
            "DeviceError", "SlotIDInvalid", "ObjectHandleInvalid", "KeyHandleInvalid")
_PIN = {
    "PinIncorrect": "wrong PIN",
    "PinLocked": "the PIN is locked (too many wrong PINs); unblock it with the security officer PIN (or PUK)",
    "PinExpired": "the PIN has expired; change it with the token's own tool",
    "PinInvalid": "the PIN has characters the token does not accept",
    "PinLenRange": "the PIN is too short or too long for this token",
    "UserPinNotInitialized": "the token's user PIN was never set",
    "UserNotLoggedIn": "the token is not logged in (it was reset or re-inserted)",
}


def as_token_error(e: BaseException, where: str, doing: str) -> TokenError:
    """The one mapping of a binding exception to a named exit-2 error (``where``: the URI or token; ``doing``: the step)."""
    name = type(e).__name__
    if name in _REMOVED:
        return TokenRemovedError(f"{where}: the token was removed or stopped answering while {doing} ({name}); "
                                 "nothing was written")
    if name in _PIN:
        return TokenPinError(f"{where}: {_PIN[name]} ({name}); the PIN was tried once and is not retried")
    if name in ("MechanismInvalid", "MechanismParamInvalid", "FunctionNotSupported", "KeyTypeInconsistent",
                "KeyFunctionNotPermitted", "AttributeTypeInvalid"):
        return TokenKeyError(f"{where}: the token refused {doing} ({name})")
    detail = str(e).strip()
    return TokenError(f"{where}: the PKCS#11 module failed while {doing} ({name}{': ' + detail if detail else ''})")


@contextlib.contextmanager
def _mapped(where: str, doing: str) -> Iterator[None]:
    """Turn a binding exception raised inside the block into its named error."""
    pkcs11 = _binding()
    try:
        yield
    except pkcs11.exceptions.PKCS11Error as e:
        raise as_token_error(e, where, doing) from None


def load_module(path: Path) -> Any:
    """The module at ``path``, loaded and initialised (the binding keeps one per path); a file that is no PKCS#11 module is a ``TokenModuleError``."""
    pkcs11 = _binding()
    try:
        return pkcs11.lib(str(path))
    except pkcs11.exceptions.PKCS11Error as e:
        reason = str(e).strip() or type(e).__name__
        raise TokenModuleError(f"{path} is not a usable PKCS#11 module: {reason}", path=str(path)) from None


def _matches(uri: Pkcs11Uri, lib: Any, slot: Any, token: Any) -> bool:
    a = uri.attrs
    serial = token.serial.decode("utf-8", "replace").strip() if isinstance(token.serial, bytes) else str(token.serial)
    checks = [
        ("token", token.label), ("manufacturer", token.manufacturer_id), ("model", token.model), ("serial", serial),
        ("slot-description", slot.slot_description), ("slot-manufacturer", slot.manufacturer_id),
        ("library-manufacturer", lib.manufacturer_id), ("library-description", lib.library_description),
    ]
    if any(name in a and a[name] != str(have).strip() for name, have in checks):
        return False
    if "slot-id" in a and int(a["slot-id"]) != slot.slot_id:
        return False
    if "library-version" in a:
        major, _, minor = a["library-version"].partition(".")
        if (int(major), int(minor or 0)) != tuple(lib.library_version):
            return False
    return True


def find_token(uri: Pkcs11Uri, lib: Any) -> Any:
    """The one token the URI names; none or several is a ``TokenNotFoundError`` that lists what is there."""
    with _mapped(uri.text, "listing the tokens"):
        present = []
        for slot in lib.get_slots(token_present=True):
            try:
                present.append((slot, slot.get_token()))
            except _binding().exceptions.PKCS11Error:
                continue  # a slot whose token went away between the two calls
        found = [t for s, t in present if _matches(uri, lib, s, t)]
    labels = ", ".join(repr(t.label) for _, t in present) or "none"
    if not found:
        raise TokenNotFoundError(f"no token matches {uri.text} (tokens present: {labels})")
    if len(found) > 1:
        raise TokenNotFoundError(f"{len(found)} tokens match {uri.text} ({labels}); add serial= to the URI to pick one")
    return found[0]


# -- sessions: one login per token and process ---------------------------------------------------

_SESSIONS: dict[tuple[str, int], Any] = {}


def _login(token: Any, pin: str | None, *, rw: bool) -> Any:
    """``C_OpenSession`` + ``C_Login``, exactly once: the one place a PIN reaches the token."""
    pkcs11 = _binding()
    if pin is None:
        return token.open(rw=rw, user_pin=pkcs11.PROTECTED_AUTH)
    return token.open(rw=rw, user_pin=pin)


def open_session(lib: Any, token: Any, pin: str | None, *, where: str, rw: bool = False, login: bool = True) -> Any:
    """A session on ``token``, logged in with ``pin``; reused for every key of that token in this process.

    PKCS#11 keeps the login per application and token, so a second key on the same token (two
    ``--key`` options) reuses the session instead of logging in again. A locked PIN is refused
    without trying; a token that needs a PIN and has no PIN pad, with no PIN given, is refused
    before anything reaches it.
    """
    pkcs11 = _binding()
    key = (os.path.realpath(lib.so), int(token.slot.slot_id))
    cached = _SESSIONS.get(key)
    if cached is not None and (cached[1] or not login) and (cached[2] or not rw):
        return cached[0]
    flags = pkcs11.TokenFlag
    label = f"token {token.label!r}"
    with _mapped(where, "opening a session"):
        tflags = token.flags
        needs_pin = login and bool(tflags & flags.LOGIN_REQUIRED)
        if needs_pin and tflags & flags.USER_PIN_LOCKED:
            raise TokenPinError(f"{where}: the user PIN of {label} is locked; unblock it with the security officer PIN (or PUK)")
        if needs_pin and pin is None and not tflags & flags.PROTECTED_AUTHENTICATION_PATH:
            raise TokenPinError(f"{where}: {label} needs a PIN: give pin-source=file:/path in the URI, --pin-file or {PIN_ENV}")
        try:
            session = _login(token, pin, rw=rw) if needs_pin else token.open(rw=rw)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            session = token.open(rw=rw)  # this process is logged in already (PKCS#11 login state is per application)
        except pkcs11.exceptions.PinIncorrect:
            final = bool(token.flags & flags.USER_PIN_FINAL_TRY) if hasattr(flags, "USER_PIN_FINAL_TRY") else False
            warning = "; the token says one more wrong PIN locks it" if final else ""
            raise TokenPinError(f"{where}: wrong PIN for {label} (tried once, not retried){warning}") from None
    old = _SESSIONS.pop(key, None)
    if old is not None:
        with contextlib.suppress(Exception):
            old[0].close()
    _SESSIONS[key] = (session, needs_pin or (cached[1] if cached else False), rw)
    return session


@atexit.register
def close_sessions() -> None:
    """Close every session this process opened (logging out of the tokens)."""
    while _SESSIONS:
        _, (session, _, _) = _SESSIONS.popitem()
        with contextlib.suppress(Exception):
            session.close()


def reset() -> None:
    """Close every session and finalise every module this process loaded.

    The next use initialises the module again, so it re-reads its configuration (SoftHSM2
    reads ``SOFTHSM2_CONF`` in ``C_Initialize``): what a long-running program, or a test
    that switches tokens, needs.
    """
    close_sessions()
    try:
        import pkcs11
    except ImportError:
        return
    for lib in list(getattr(pkcs11, "_loaded", {}).values()):
        with contextlib.suppress(Exception):
            lib.finalize()


# -- keys ---------------------------------------------------------------------------------------


def _unwrap_point(data: bytes, size: int) -> bytes:
    """CKA_EC_POINT as the bare point: a DER OCTET STRING (the standard) or the bare bytes (some tokens)."""
    if len(data) == size + 2 and data[0] == 0x04 and data[1] == size:
        return data[2:]
    if len(data) == size:
        return data
    raise ValueError(f"CKA_EC_POINT of {len(data)} bytes")


def _algorithm(key_type: Any, params: bytes | None, where: str) -> str:
    pkcs11 = _binding()
    if key_type == pkcs11.KeyType.EC and params == P256_PARAMS:
        return "ecdsa-p256"
    if key_type == pkcs11.KeyType.EC_EDWARDS and params in (ED25519_PARAMS, ED25519_NAMED):
        return "ed25519"
    kind = getattr(key_type, "name", str(key_type))
    raise TokenKeyError(f"{where}: the key is {kind} {'' if params is None else params.hex()} — airpack signs with "
                        "ECDSA P-256 or Ed25519 only")


def public_from_object(obj: Any, algorithm: str | None, where: str) -> PublicKey:
    """The public key of a public-key object (CKA_EC_POINT) or a certificate (CKA_VALUE, X.509 DER).

    ``algorithm`` is what the private key is; None (a certificate found on its own) takes either.
    """
    pkcs11 = _binding()
    attr, cls = pkcs11.Attribute, pkcs11.ObjectClass
    try:
        if obj.object_class == cls.CERTIFICATE:
            pub = x509.load_der_x509_certificate(obj[attr.VALUE]).public_key()
        elif algorithm == "ed25519":
            pub = ed25519.Ed25519PublicKey.from_public_bytes(_unwrap_point(obj[attr.EC_POINT], 32))
        else:
            pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), _unwrap_point(obj[attr.EC_POINT], 65))
    except ValueError as e:
        raise TokenKeyError(f"{where}: the token's public key cannot be read ({e})") from None
    if algorithm in (None, "ed25519") and isinstance(pub, ed25519.Ed25519PublicKey):
        return pub
    if (algorithm in (None, "ecdsa-p256") and isinstance(pub, ec.EllipticCurvePublicKey)
            and isinstance(pub.curve, ec.SECP256R1)):
        return pub
    raise TokenKeyError(f"{where}: the public key (or certificate) is not {algorithm or 'ECDSA P-256 or Ed25519'}")


def algorithm_of(pub: PublicKey) -> str:
    return "ed25519" if isinstance(pub, ed25519.Ed25519PublicKey) else "ecdsa-p256"


def _template(uri: Pkcs11Uri, object_class: Any) -> dict[Any, Any]:
    pkcs11 = _binding()
    t: dict[Any, Any] = {pkcs11.Attribute.CLASS: object_class}
    if uri.object is not None:
        t[pkcs11.Attribute.LABEL] = uri.object
    if uri.id is not None:
        t[pkcs11.Attribute.ID] = uri.id
    return t


def _one(session: Any, uri: Pkcs11Uri, object_class: Any, what: str) -> Any | None:
    found = list(session.get_objects(_template(uri, object_class)))
    if len(found) > 1:
        raise TokenKeyError(f"{uri.text}: {len(found)} {what}s match {uri.describe_object()}; add id= to the URI to pick one")
    return found[0] if found else None


def _companion(session: Any, priv: Any) -> Any | None:
    """The public key (else the certificate) that shares the private key's id (or, without one, its label)."""
    pkcs11 = _binding()
    attr, cls = pkcs11.Attribute, pkcs11.ObjectClass
    match = {attr.ID: priv.id} if priv.id else {attr.LABEL: priv.label}
    for object_class in (cls.PUBLIC_KEY, cls.CERTIFICATE):
        found = list(session.get_objects({attr.CLASS: object_class, **match}))
        if len(found) == 1:
            return found[0]
    return None


@dataclass
class TokenKey:
    """A private key on a token, with its public half read from the token; it signs DSSE messages.

    ``sign_message`` returns the signature in DSSE form (DER for ECDSA, 64 raw bytes for
    Ed25519); ``signing.TokenSigner`` verifies each against ``public_key`` before using it.
    """

    uri: str
    label: str
    algorithm: str
    public_key: PublicKey
    private: Any = field(repr=False)
    always_authenticate: bool = False
    pin: str | None = field(default=None, repr=False)
    prehash: bool = True  # ECDSA: CKM_ECDSA over our SHA-256 digest; False: the token's CKM_ECDSA_SHA256

    def sign_message(self, message: bytes) -> bytes:
        pkcs11 = _binding()
        mech = pkcs11.Mechanism
        kw: dict[str, Any] = {"pin": self.pin} if self.always_authenticate and self.pin is not None else {}
        with _mapped(self.uri, "signing"):
            if self.algorithm == "ed25519":
                return bytes(self.private.sign(message, mechanism=mech.EDDSA, **kw))
            if self.prehash:
                raw = bytes(self.private.sign(hashlib.sha256(message).digest(), mechanism=mech.ECDSA, **kw))
            else:
                raw = bytes(self.private.sign(message, mechanism=mech.ECDSA_SHA256, **kw))
        if len(raw) != 64:
            raise TokenError(f"{self.uri}: the token returned a {len(raw)}-byte ECDSA signature (a P-256 one is 64 bytes)")
        return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


def _require_object(uri: Pkcs11Uri) -> None:
    if not uri.names_object():
        raise Pkcs11UriError(f"PKCS#11 URI {uri.text} names no key: add object=LABEL (or id=%XX)")


def _open(uri: Pkcs11Uri, pin_file: Path | None, *, env: dict[str, str] | None, warn: Callable[[str], None],
          rw: bool = False, pin_optional: bool = False) -> tuple[Any, Any, str | None]:
    """``(token, session, pin)`` for ``uri``: the PIN read, the module loaded, the token found, one login.

    The one path every PIN takes on its way to a token (signing, reading a public key, keygen),
    so the "a PIN is tried once" rule has a single copy to audit. ``pin_optional``: log in only
    when a PIN was given (public objects are readable without one).
    """
    pin = read_pin(uri, pin_file, env=env, warn=warn)
    lib = load_module(module_path(uri, env))
    token = find_token(uri, lib)
    session = open_session(lib, token, pin, where=uri.text, rw=rw, login=pin is not None or not pin_optional)
    return token, session, pin


def _mechanisms(token: Any) -> set[Any]:
    return set(token.slot.get_mechanisms())


def open_key(ref: str, *, pin_file: Path | None = None, warn: Callable[[str], None] = warn_stderr,
             env: dict[str, str] | None = None) -> TokenKey:
    """The signing key a ``pkcs11:`` URI names, logged in and ready: every refusal is a named exit-2 error.

    Everything that can be checked is checked here, before the command does any work (a pack
    may download for an hour before it signs): the URI, the module, the token, the PIN (one
    login), the object (one private key, CKA_SIGN true, P-256 or Ed25519, a public half).
    """
    uri = parse_uri(ref)
    _require_object(uri)
    if uri.type not in (None, "private"):
        raise Pkcs11UriError(f"PKCS#11 URI {uri.text} has type={uri.type}: signing needs the private key (type=private, or leave type out)")
    token, session, pin = _open(uri, pin_file, env=env, warn=warn)
    pkcs11 = _binding()
    attr, cls = pkcs11.Attribute, pkcs11.ObjectClass
    with _mapped(uri.text, "finding the key"):
        priv = _one(session, uri, cls.PRIVATE_KEY, "private key")
        if priv is None:
            others = [o for o in session.get_objects(_template(uri, cls.PUBLIC_KEY))]
            others += [o for o in session.get_objects(_template(uri, cls.CERTIFICATE))]
            also = " (only a public key or certificate by that name)" if others else ""
            raise TokenKeyError(f"{uri.text}: token {token.label!r} holds no private key with {uri.describe_object()}{also}")
        if not priv[attr.SIGN]:
            raise TokenKeyError(f"{uri.text}: the key {priv.label!r} may not sign (CKA_SIGN is false on the token)")
        algorithm = _algorithm(priv.key_type, _params(priv), uri.text)
        companion = _companion(session, priv)
        if companion is None:
            raise TokenKeyError(f"{uri.text}: the token holds no public key or certificate for {priv.label!r}, so its "
                                "signatures cannot be checked; import the public key onto the token")
        public = public_from_object(companion, algorithm, uri.text)
        always = bool(_optional(priv, attr.ALWAYS_AUTHENTICATE))
        mechanisms = _mechanisms(token)
    mech = pkcs11.Mechanism
    prehash = True
    if algorithm == "ed25519" and mech.EDDSA not in mechanisms:
        raise TokenKeyError(f"{uri.text}: token {token.label!r} cannot sign with Ed25519 (no CKM_EDDSA); use an ECDSA P-256 key")
    if algorithm == "ecdsa-p256" and mech.ECDSA not in mechanisms:
        if mech.ECDSA_SHA256 not in mechanisms:
            raise TokenKeyError(f"{uri.text}: token {token.label!r} offers neither CKM_ECDSA nor CKM_ECDSA_SHA256")
        prehash = False
    return TokenKey(uri=uri.text, label=str(priv.label), algorithm=algorithm, public_key=public, private=priv,
                    always_authenticate=always, pin=pin if always else None, prehash=prehash)


def _optional(obj: Any, attribute: Any) -> Any:
    """An attribute a token may not implement (CKA_ALWAYS_AUTHENTICATE on old tokens): None when it does not."""
    pkcs11 = _binding()
    try:
        return obj[attribute]
    except (pkcs11.exceptions.AttributeTypeInvalid, pkcs11.exceptions.AttributeSensitive):
        return None


def _params(obj: Any) -> bytes | None:
    value = _optional(obj, _binding().Attribute.EC_PARAMS)
    return bytes(value) if value is not None else None


def read_public(ref: str, *, pin_file: Path | None = None, warn: Callable[[str], None] = warn_stderr,
                env: dict[str, str] | None = None) -> tuple[PublicKey, str]:
    """The public key of a key the token already holds (its public-key object, else its certificate) and its algorithm.

    Public objects are readable without a PIN; a PIN is used (one login) only when one is given,
    for tokens that hide public objects until login.
    """
    uri = parse_uri(ref)
    _require_object(uri)
    if uri.type not in (None, "private", "public", "cert"):
        raise Pkcs11UriError(f"PKCS#11 URI {uri.text} has type={uri.type}: a key's public half is type=public, private or cert")
    token, session, _ = _open(uri, pin_file, env=env, warn=warn, pin_optional=True)
    pkcs11 = _binding()
    cls = pkcs11.ObjectClass
    classes = {"public": [cls.PUBLIC_KEY], "cert": [cls.CERTIFICATE], "private": [cls.PRIVATE_KEY]}.get(
        uri.type or "", [cls.PUBLIC_KEY, cls.CERTIFICATE, cls.PRIVATE_KEY])
    with _mapped(uri.text, "reading the public key"):
        for object_class in classes:
            obj = _one(session, uri, object_class, "object")
            if obj is None:
                continue
            if object_class == cls.CERTIFICATE:
                pub = public_from_object(obj, None, uri.text)
                return pub, algorithm_of(pub)
            alg = _algorithm(obj.key_type, _params(obj), uri.text)
            if object_class == cls.PRIVATE_KEY:
                obj = _companion(session, obj)
                if obj is None:
                    break
            return public_from_object(obj, alg, uri.text), alg
    raise TokenKeyError(f"{uri.text}: token {token.label!r} holds no public key or certificate with {uri.describe_object()}")


def generate_key(ref: str, algorithm: str, *, pin_file: Path | None = None, warn: Callable[[str], None] = warn_stderr,
                 env: dict[str, str] | None = None) -> TokenKey:
    """Generate a key pair inside the token: the private half sensitive, never extractable, signing only.

    The URI's ``object=`` labels both halves (and ``id=`` is theirs, or a random 16-byte id);
    a token that already holds an object with that label or id is refused, so a keygen never
    shadows a key that other hosts already trust. The token's answer is read back: a private
    key that came out extractable or not sensitive is destroyed and refused.
    """
    uri = parse_uri(ref)
    if uri.object is None:
        raise Pkcs11UriError(f"PKCS#11 URI {uri.text}: keygen needs object=LABEL to name the new key")
    if uri.type not in (None, "private"):
        raise Pkcs11UriError(f"PKCS#11 URI {uri.text} has type={uri.type}: keygen makes a private key (leave type out)")
    pkcs11 = _binding()
    attr, mech, kt = pkcs11.Attribute, pkcs11.Mechanism, pkcs11.KeyType
    if algorithm not in ("ecdsa-p256", "ed25519"):
        raise UsageError(f"unknown algorithm {algorithm!r} for a token key; choose ecdsa-p256 or ed25519")
    token, session, _ = _open(uri, pin_file, env=env, warn=warn, rw=True)
    key_id = uri.id if uri.id is not None else secrets.token_bytes(16)
    with _mapped(uri.text, "generating the key"):
        if list(session.get_objects({attr.LABEL: uri.object})):
            clash = f"an object labelled {uri.object!r}"
        elif list(session.get_objects({attr.ID: key_id})):
            clash = f"an object with id {key_id.hex()}"
        else:
            clash = ""
        if clash:
            raise TokenKeyError(f"{uri.text}: token {token.label!r} already holds {clash}; airpack never replaces a key on a token",
                                hint="Choose another object= (and id=) for the new key, or export the existing one's public "
                                     "key with `airpack key pub URI --out NAME.pub`.")
        mechanisms = _mechanisms(token)
        if algorithm == "ed25519":
            if mech.EC_EDWARDS_KEY_PAIR_GEN not in mechanisms or mech.EDDSA not in mechanisms:
                raise TokenKeyError(f"{uri.text}: token {token.label!r} cannot make Ed25519 keys (no CKM_EDDSA); "
                                    "use --algorithm ecdsa-p256")
            key_type, params, gen = kt.EC_EDWARDS, ED25519_PARAMS, mech.EC_EDWARDS_KEY_PAIR_GEN
        else:
            if mech.EC_KEY_PAIR_GEN not in mechanisms:
                raise TokenKeyError(f"{uri.text}: token {token.label!r} cannot make EC keys (no CKM_EC_KEY_PAIR_GEN)")
            key_type, params, gen = kt.EC, P256_PARAMS, mech.EC_KEY_PAIR_GEN
        private_template = {attr.SENSITIVE: True, attr.EXTRACTABLE: False, attr.SIGN: True, attr.PRIVATE: True,
                            attr.TOKEN: True, attr.DECRYPT: False, attr.UNWRAP: False, attr.DERIVE: False}
        public_template = {attr.VERIFY: True, attr.TOKEN: True, attr.PRIVATE: False, attr.ENCRYPT: False,
                           attr.WRAP: False, attr.DERIVE: False}
        domain = session.create_domain_parameters(key_type, {attr.EC_PARAMS: params}, local=True)
        pub, priv = domain.generate_keypair(store=True, label=uri.object, id=key_id, mechanism=gen,
                                            private_template=private_template, public_template=public_template)
        if not priv[attr.SENSITIVE] or priv[attr.EXTRACTABLE]:
            with contextlib.suppress(Exception):
                priv.destroy()
                pub.destroy()
            raise TokenKeyError(f"{uri.text}: token {token.label!r} made the key extractable or not sensitive; it was deleted")
        public = public_from_object(pub, algorithm, uri.text)
    return TokenKey(uri=uri.text, label=uri.object, algorithm=algorithm, public_key=public, private=priv)
