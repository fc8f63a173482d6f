"""Internal registries ask for credentials and use internal CAs: htpasswd auth and --ca-file TLS, for real."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from conftest import run_cli

if TYPE_CHECKING:
    from oci_registry import OciRegistry

pytest_plugins = ["oci_registry"]  # the real-registry fixtures: oci_registry, make_oci_registry


def _password_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / f"pw-{abs(hash(text))}.txt"
    p.write_text(text + "\n")
    return p


def test_basic_auth_push_and_install(make_oci_registry: Callable[..., OciRegistry], bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = make_oci_registry(users={"pusher": "correct horse"})
    ref = reg.ref()
    r = run_cli("push", bundle, ref, "--trust", policy, "--plain-http", "--json")
    assert r.returncode == 7, r.stdout
    assert "asks for credentials" in json.loads(r.stdout)["error"]["message"]

    r = run_cli("push", bundle, ref, "--trust", policy, "--plain-http", "--username", "pusher",
                "--password-file", _password_file(tmp_path, "wrong"))
    assert r.returncode == 7 and "refused the credentials" in r.stderr, r.stderr
    assert reg.stored_blobs() == []

    good = _password_file(tmp_path, "correct horse")
    r = run_cli("push", bundle, ref, "--trust", policy, "--plain-http", "--username", "pusher", "--password-file", good)
    assert r.returncode == 0, r.stderr
    # Credentials are sent up front once the registry has asked: no body is sent twice.
    assert len(reg.requests("PUT", "/blobs/uploads/")) == len([p for p in reg.requests("PUT", "/blobs/uploads/") if p[2] == 201])

    r = run_cli("install", ref, "--registry", tmp_path / "node", "--trust", policy, "--plain-http", "--ignore-fit",
                env={"AIRPACK_OCI_USERNAME": "pusher", "AIRPACK_OCI_PASSWORD": "correct horse"})
    assert r.returncode == 0, r.stderr


def test_tls_with_an_internal_ca(make_oci_registry: Callable[..., OciRegistry], bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = make_oci_registry(tls=True)
    assert reg.ca_file is not None
    ref = reg.ref()
    r = run_cli("push", bundle, ref, "--trust", policy, "--json")  # the system CAs do not know this one
    assert r.returncode == 7
    err = json.loads(r.stdout)["error"]
    assert "TLS" in err["message"] and "--ca-file" in err["hint"]

    r = run_cli("push", bundle, ref, "--trust", policy, "--ca-file", reg.ca_file)
    assert r.returncode == 0, r.stderr
    r = run_cli("pull", ref, "--out", tmp_path / "pulled", "--trust", policy, "--ca-file", reg.ca_file)
    assert r.returncode == 0, r.stderr
    r = run_cli("install", ref, "--registry", tmp_path / "node", "--trust", policy, "--ignore-fit", env={"AIRPACK_OCI_CA_FILE": str(reg.ca_file)})
    assert r.returncode == 0, r.stderr

    r = run_cli("pull", ref, "--out", tmp_path / "plain", "--plain-http")  # HTTP to a TLS port
    assert r.returncode == 7, r.stderr
    assert not (tmp_path / "plain").exists()
