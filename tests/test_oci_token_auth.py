"""Bearer-token auth as Harbor and other internal registries do it, against the real registry.

The distribution registry runs with ``auth: token``: it answers 401 with a
``Bearer realm=...`` challenge; a token server (here on 127.0.0.1, issuing
ES256 JWTs whose ``x5c`` certificate is in the registry's root bundle) checks
the Basic credentials and grants the asked scope. airpack must follow the
challenge, fetch a token per scope, and never send credentials to the registry.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import run_cli
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from oci_registry import OciRegistry

pytest_plugins = ["oci_registry"]

SERVICE = "airpack-test-registry"
ISSUER = "airpack-test-token-issuer"
USER, PASSWORD = "node", "s3cret token pass"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenServer:
    """Issues registry tokens for Basic credentials; records every request it got."""

    def __init__(self, root: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "airpack test token signer")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = root / "token-root.pem"
        root.mkdir(parents=True, exist_ok=True)
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.seen: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                q = parse_qs(urlsplit(self.path).query)
                auth = self.headers.get("Authorization", "")
                ok = auth == "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                server.seen.append({"path": self.path, "auth": bool(auth), "ok": ok, "scope": q.get("scope", [])})
                if not ok:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"token": server.token(q.get("scope", []))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def token(self, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            for one in scope.split(" "):
                kind, _, rest = one.partition(":")
                repo, _, actions = rest.rpartition(":")
                access.append({"type": kind, "name": repo, "actions": [a for a in actions.split(",") if a]})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": ISSUER, "sub": USER, "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def token_registry(make_oci_registry: Callable[..., OciRegistry], tmp_path: Path) -> Iterator[tuple[OciRegistry, TokenServer]]:
    tokens = TokenServer(tmp_path / "token")
    auth = (f"auth:\n  token:\n    realm: {tokens.url}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
            f"    rootcertbundle: {tokens.bundle}\n")
    try:
        yield make_oci_registry(auth_yaml=auth), tokens
    finally:
        tokens.stop()


def _pw(tmp_path: Path, text: str) -> Path:
    p = tmp_path / f"pw-{secrets.token_hex(4)}"
    p.write_text(text + "\n")
    return p


def test_bearer_token_push_pull_install(token_registry: tuple[OciRegistry, TokenServer], bundle: Path, policy: Path,
                                        tmp_path: Path) -> None:
    reg, tokens = token_registry
    ref = reg.ref()
    r = run_cli("push", bundle, ref, "--trust", policy, "--plain-http", "--username", USER, "--password-file", _pw(tmp_path, "wrong"),
                "--json")
    assert r.returncode == 7, r.stdout + r.stderr
    assert reg.stored_blobs() == []

    good = _pw(tmp_path, PASSWORD)
    r = run_cli("push", bundle, ref, "--trust", policy, "--plain-http", "--username", USER, "--password-file", good)
    assert r.returncode == 0, r.stderr
    granted = [s for s in tokens.seen if s["ok"]]
    assert granted and any("push" in sc for s in granted for sc in s["scope"]), tokens.seen

    r = run_cli("pull", ref, "--out", tmp_path / "pulled", "--trust", policy, "--plain-http", "--username", USER, "--password-file", good)
    assert r.returncode == 0, r.stderr
    r = run_cli("install", ref, "--registry", tmp_path / "node", "--trust", policy, "--plain-http", "--ignore-fit",
                env={"AIRPACK_OCI_USERNAME": USER, "AIRPACK_OCI_PASSWORD": PASSWORD})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "node" / "hub" / "models--acme--tiny").is_dir()


def test_bearer_token_without_credentials_is_a_clear_fetch_error(token_registry: tuple[OciRegistry, TokenServer], bundle: Path,
                                                                  policy: Path) -> None:
    reg, tokens = token_registry
    r = run_cli("push", bundle, reg.ref(), "--trust", policy, "--plain-http", "--json")
    assert r.returncode == 7, r.stdout + r.stderr
    err = json.loads(r.stdout)["error"]
    assert err["exit_code"] == 7 and "credentials" in err["message"] and "--username" in err["hint"]
    assert "Traceback" not in r.stderr
    assert reg.stored_blobs() == []
    assert tokens.seen and not any(s["ok"] for s in tokens.seen)
