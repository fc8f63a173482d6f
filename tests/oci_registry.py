"""pytest plugin: a real CNCF distribution registry on 127.0.0.1 for each test that asks for one.

The Debian package ``docker-registry`` ships the binary (``make test`` installs
it when it runs as root). Each registry gets a free port, a throwaway YAML
config and a storage folder under the test's tmp_path, optional TLS (a
throwaway CA) and htpasswd (bcrypt) auth, and its access log in a file the
tests read to count what was sent. Tests skip, saying why, only where the
binary is missing or cannot start.
"""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REGISTRY_BIN = os.environ.get("AIRPACK_TEST_REGISTRY_BIN") or shutil.which("docker-registry") or "/usr/bin/docker-registry"
_ACCESS = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3}) ')


@dataclass
class OciRegistry:
    """One running registry: where it listens, where it stores, what it was asked."""

    host: str
    root: Path
    storage: Path
    log: Path
    proc: subprocess.Popen[bytes]
    ca_file: Path | None = None
    users: dict[str, str] = field(default_factory=dict)

    def ref(self, repo: str = "acme/tiny", tag: str = "v1") -> str:
        return f"oci://{self.host}/{repo}:{tag}"

    @property
    def flags(self) -> list[str]:
        """The CLI flags that reach this registry (no credentials)."""
        return ["--ca-file", str(self.ca_file)] if self.ca_file else ["--plain-http"]

    def requests(self, method: str | None = None, contains: str = "") -> list[tuple[str, str, int]]:
        """(method, path, status) of every request in the access log, filtered."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            m = _ACCESS.search(line)
            if m and (method is None or m.group(1) == method) and contains in m.group(2):
                out.append((m.group(1), m.group(2), int(m.group(3))))
        return out

    def uploads(self) -> int:
        """Blob upload requests (POST to start, PATCH, PUT to finish) the registry received."""
        return sum(1 for m, p, _ in self.requests() if m in ("POST", "PATCH", "PUT") and "/blobs/uploads/" in p)

    def blob_data(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[-1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def stored_blobs(self) -> list[Path]:
        base = self.storage / "docker/registry/v2/blobs"
        return sorted(base.rglob("data")) if base.exists() else []

    def kill(self) -> None:
        """Stop it hard, as a crashed or unplugged registry would."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()

    # -- doctored artifacts: what an attacker with write access to the registry could push --

    @staticmethod
    def bundle_files(bundle: Path) -> list[tuple[str, Path]]:
        """(bundle path, file) of every file of a bundle folder but the envelope and manifest copy, sorted."""
        skip = {"envelope.dsse.json", "manifest.json"}
        out = [(p.relative_to(bundle).as_posix(), p) for p in bundle.rglob("*") if p.is_file()]
        return sorted((rel, p) for rel, p in out if rel not in skip)

    def _access(self) -> Any:
        from airpack.fetch.oci import OciAccess

        return OciAccess(plain_http=self.ca_file is None, ca_file=self.ca_file)

    def push_doctored(self, ref: str, *, envelope: bytes, manifest_copy: bytes, files: list[tuple[str, Path]],
                      annotations: dict[str, str] | None = None) -> str:
        """Push an airpack-shaped artifact from arbitrary parts, bypassing verify; returns its manifest digest."""
        import hashlib

        from airpack.fetch.oci import OciClient
        from airpack.oci_artifact import (
            EMPTY_BYTES,
            EMPTY_CONFIG,
            ENVELOPE_MEDIA_TYPE,
            MANIFEST_COPY_MEDIA_TYPE,
            blob_descriptor,
            build_manifest,
            file_descriptor,
        )
        from airpack.oci_ref import parse_ref

        env = blob_descriptor(ENVELOPE_MEDIA_TYPE, envelope, "envelope.dsse.json")
        copy = blob_descriptor(MANIFEST_COPY_MEDIA_TYPE, manifest_copy, "manifest.json")
        descs = [file_descriptor(rel, hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size) for rel, p in files]
        with OciClient(parse_ref(ref), self._access()) as client:
            for d, data in ((EMPTY_CONFIG, EMPTY_BYTES), (env, envelope), (copy, manifest_copy)):
                if not client.blob_exists(d):
                    client.upload_bytes(data, d)
            for d, (_, p) in zip(descs, files, strict=True):
                if not client.blob_exists(d):
                    client.upload_file(p, d)
            return client.put_manifest(build_manifest(envelope=env, manifest_copy=copy, files=descs, annotations=annotations or {}))

    def get_manifest(self, ref: str) -> dict[str, Any]:
        import json

        from airpack.fetch.oci import OciClient
        from airpack.oci_ref import parse_ref

        with OciClient(parse_ref(ref), self._access()) as client:
            data, _ = client.get_manifest()
        doc: dict[str, Any] = json.loads(data)
        return doc


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_tls(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "airpack test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = d / "ca.pem", d / "server.pem", d / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


def _htpasswd(path: Path, users: dict[str, str]) -> None:
    bcrypt = pytest.importorskip("bcrypt", reason="bcrypt (the test extra) is needed to write an htpasswd file")
    lines = [f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}" for u, p in users.items()]
    path.write_text("\n".join(lines) + "\n")


def _answers(host: str, ca: Path | None) -> bool:
    """True once GET /v2/ gets any HTTP answer (200, or 401 behind auth)."""
    name, port = host.rsplit(":", 1)
    try:
        if ca is not None:
            ctx = ssl.create_default_context(cafile=str(ca))
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(name, int(port), timeout=1, context=ctx)
        else:
            conn = http.client.HTTPConnection(name, int(port), timeout=1)
        conn.request("GET", "/v2/")
        status = conn.getresponse().status
        conn.close()
        return status in (200, 401)
    except (OSError, http.client.HTTPException):
        return False


def start_registry(root: Path, *, tls: bool = False, users: dict[str, str] | None = None, auth_yaml: str | None = None) -> OciRegistry:
    if not os.access(REGISTRY_BIN, os.X_OK):
        pytest.skip(f"the CNCF distribution registry ({REGISTRY_BIN}) is not installed: apt-get install docker-registry "
                    "(make test does this when run as root)")
    root.mkdir(parents=True, exist_ok=True)
    storage = root / "storage"
    storage.mkdir(exist_ok=True)
    ca = cert = key = None
    if tls:
        ca, cert, key = make_tls(root / "tls")
    auth = ""
    if users:
        _htpasswd(root / "htpasswd", users)
        auth = f"auth:\n  htpasswd:\n    realm: airpack-test\n    path: {root / 'htpasswd'}\n"
    if auth_yaml is not None:  # e.g. the token auth of Harbor-like setups (tests/test_oci_token_auth.py)
        auth = auth_yaml
    last = ""
    for _ in range(3):
        port = _free_port()
        host = f"127.0.0.1:{port}"
        tls_cfg = f"  tls:\n    certificate: {cert}\n    key: {key}\n" if tls else ""
        config = root / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n  formatter: text\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
            "  maintenance:\n    uploadpurging:\n      enabled: false\n"
            f"http:\n  addr: {host}\n  secret: {secrets.token_hex(16)}\n{tls_cfg}"
            "health:\n  storagedriver:\n    enabled: false\n"
            f"{auth}"
        )
        log = root / "registry.log"
        with open(log, "ab") as lf:
            proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=lf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        reg = OciRegistry(host=host, root=root, storage=storage, log=log, proc=proc, ca_file=ca, users=dict(users or {}))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(host, ca):
                return reg
            time.sleep(0.05)
        reg.stop()
        last = log.read_text(errors="replace")[-600:]
    pytest.skip(f"the CNCF distribution registry would not start on 127.0.0.1: {last.strip() or 'no output'}")


@pytest.fixture
def make_oci_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., OciRegistry]]:
    """Start registries (``tls=True``, ``users={"name": "password"}``); all are stopped after the test."""
    started: list[OciRegistry] = []
    for var in ("NO_PROXY", "no_proxy"):  # a proxy set for the machine must not capture loopback
        monkeypatch.setenv(var, ",".join(filter(None, [os.environ.get(var), "127.0.0.1", "localhost"])))

    def _make(*, tls: bool = False, users: dict[str, str] | None = None, name: str | None = None,
              auth_yaml: str | None = None) -> OciRegistry:
        reg = start_registry(tmp_path / (name or f"oci-registry{len(started) + 1}"), tls=tls, users=users, auth_yaml=auth_yaml)
        started.append(reg)
        return reg

    yield _make
    for reg in started:
        reg.stop()


@pytest.fixture
def oci_registry(make_oci_registry: Callable[..., OciRegistry]) -> OciRegistry:
    """A plain-HTTP registry without auth on 127.0.0.1."""
    return make_oci_registry()

