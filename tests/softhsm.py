"""A throwaway SoftHSM2 token per test: its own SOFTHSM2_CONF and token folder, label ``airpack``, PIN 1234.

Tests that need a token take the ``softhsm`` fixture (import it with ``from softhsm import softhsm``);
without ``softhsm2-util``, its module or python-pkcs11 they skip, saying what is missing
(``make test`` installs the Debian package softhsm2 when it is root).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
LABEL = "airpack"
PIN = "1234"
SO_PIN = "5678"


def find_module() -> str | None:
    env = os.environ.get("SOFTHSM2_MODULE")
    if env and Path(env).is_file():
        return env
    return next((m for m in MODULE_CANDIDATES if Path(m).is_file()), None)


def missing() -> str | None:
    """Why the SoftHSM2 tests cannot run here, or None when they can."""
    if shutil.which("softhsm2-util") is None:
        return "softhsm2-util is not installed (Debian package softhsm2; `make test` installs it as root)"
    if find_module() is None:
        return "the SoftHSM2 PKCS#11 module (libsofthsm2.so) is not installed"
    if importlib.util.find_spec("pkcs11") is None:
        return "python-pkcs11 is not installed"
    return None


@dataclass
class SoftHsm:
    root: Path
    conf: Path
    module: str
    label: str = LABEL
    pin: str = PIN
    pin_file: Path = field(default_factory=Path)

    @property
    def env(self) -> dict[str, str]:
        """What a subprocess needs to see this token (and nothing else that would help it)."""
        return {"SOFTHSM2_CONF": str(self.conf)}

    def uri(self, obj: str | None, *, token: str | None = None, pin: bool = True, module: bool = True, extra: str = "") -> str:
        """``pkcs11:token=airpack;object=OBJ?module-path=...&pin-source=file:...`` (``extra``: more path attributes, ``;id=%02``)."""
        path = f"token={quote(token or self.label, safe='')}" + (f";object={quote(obj, safe='')}" if obj is not None else "") + extra
        query = []
        if module:
            query.append(f"module-path={self.module}")
        if pin:
            query.append(f"pin-source=file:{self.pin_file}")
        return "pkcs11:" + path + ("?" + "&".join(query) if query else "")

    def init_token(self, label: str) -> None:
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", self.pin, "--so-pin", SO_PIN],
                       check=True, capture_output=True, env={**os.environ, **self.env}, timeout=60)

    def session(self, rw: bool = True) -> Any:
        """A session of the test's own (not airpack's), logged in: for making odd objects and reading attributes."""
        import pkcs11

        lib = pkcs11.lib(self.module)
        return lib.get_token(token_label=self.label).open(user_pin=self.pin, rw=rw)

    def make_key(self, label: str, *, algorithm: str = "ecdsa-p256", sign: bool = True, public: bool = True,
                 key_id: bytes | None = None, cert: bool = False) -> None:
        """A key pair made with the binding directly: for keys airpack's keygen would never make (CKA_SIGN false, no public half).

        ``cert`` adds an X.509 certificate for the key under the same id and label, as PIV tokens
        expose their keys (with ``public=False``: a private key and its certificate only).
        """
        from pkcs11 import Attribute, KeyType, Mechanism

        from airpack.pkcs11_keys import ED25519_PARAMS, P256_PARAMS

        ed = algorithm == "ed25519"
        with self.session() as s:
            domain = s.create_domain_parameters(KeyType.EC_EDWARDS if ed else KeyType.EC,
                                                {Attribute.EC_PARAMS: ED25519_PARAMS if ed else P256_PARAMS}, local=True)
            pub, _ = domain.generate_keypair(
                store=True, label=label, id=key_id or label.encode(),
                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN if ed else Mechanism.EC_KEY_PAIR_GEN,
                private_template={Attribute.SIGN: sign, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
            )
            if cert:
                self._import_cert(s, pub, label, key_id or label.encode(), ed)
            if not public:
                pub.destroy()

    @staticmethod
    def _import_cert(session: Any, pub: Any, label: str, key_id: bytes, ed: bool) -> None:
        import datetime as dt

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        from pkcs11 import Attribute, CertificateType, ObjectClass

        from airpack.pkcs11_keys import public_from_object

        subject_key = public_from_object(pub, "ed25519" if ed else "ecdsa-p256", "test")
        ca = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)])
        now = dt.datetime.now(dt.UTC)
        der = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(subject_key)
               .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
               .sign(ca, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
        session.create_object({Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                               Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: key_id, Attribute.VALUE: der,
                               Attribute.SUBJECT: name.public_bytes()})


def count_logins(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The PINs ``pkcs11_keys._login`` is called with from now on, in order: each one is a login the token sees.

    A plain helper taking ``monkeypatch`` (not a fixture), so test modules import it without shadowing.
    """
    from airpack import pkcs11_keys

    logins: list[str | None] = []
    real = pkcs11_keys._login

    def counting(token: Any, pin: str | None, *, rw: bool) -> Any:
        logins.append(pin)
        return real(token, pin, rw=rw)

    monkeypatch.setattr(pkcs11_keys, "_login", counting)
    return logins


@pytest.fixture
def softhsm(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[SoftHsm]:
    why = missing()
    if why is not None:
        pytest.skip(why)
    from airpack import pkcs11_keys

    pkcs11_keys.reset()  # a module this process initialised for an earlier token re-reads SOFTHSM2_CONF
    root = tmp_path_factory.mktemp("softhsm")
    root.chmod(0o700)
    tokens = root / "tokens"
    tokens.mkdir(mode=0o700)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n")
    module = find_module()
    assert module is not None
    pin_file = root / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    hsm = SoftHsm(root=root, conf=conf, module=module, pin_file=pin_file)
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    for var in ("AIRPACK_PIN", "AIRPACK_PKCS11_MODULE"):
        monkeypatch.delenv(var, raising=False)
    hsm.init_token(LABEL)
    yield hsm
    pkcs11_keys.reset()
