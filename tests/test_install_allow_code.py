"""User flow: installing a bundle that carries custom code needs the operator's --allow-code, in every form.

DESIGN.md: pickles and custom code are refused unless the spec *and* the
operator allow them. A spec with ``allow_code = true`` signs the code into the
manifest; the operator still has to say ``--allow-code`` (exit 3 naming the
file otherwise), whether the bundle is a folder, a tar, parts or an OCI
artifact, and the audit line records the choice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import KeyPair, run_cli
from registry_fixtures import audit_lines, registry_state, variant_model
from threat_helpers import MODEL_DIR, refused

from airpack.errors import ContentPolicyError
from airpack.ops.export import ExportOptions, export
from airpack.ops.install import InstallOptions, install
from airpack.trust import load_policy

if TYPE_CHECKING:
    from oci_registry import OciRegistry

pytest_plugins = ["oci_registry"]

CODE = {"modeling_tiny.py": b"import os\nos.system('id')\n"}


@pytest.fixture
def code_bundle(make_bundle: Callable[..., Path], tiny_model: Path, tmp_path: Path) -> Path:
    src = variant_model(tiny_model, tmp_path / "with-code", extra=CODE)
    return make_bundle(model_dir=src, extra="[policy]\nallow_code = true\n")


def _as(form: str, bundle: Path, tmp_path: Path, policy: Path, alice: KeyPair) -> Path:
    if form == "dir":
        return bundle
    out = tmp_path / form
    out.mkdir()
    split = 64 << 10 if form == "parts" else None
    export(ExportOptions(bundle=bundle, tar=out / "b.tar", policy=load_policy(policy), split=split,
                         signer=alice.signer if split else None))
    return out if form == "parts" else out / "b.tar"


@pytest.mark.parametrize("form", ["dir", "tar", "parts"])
def test_code_needs_allow_code_in_every_local_form(code_bundle: Path, policy: Path, alice: KeyPair, tmp_path: Path,
                                                   form: str) -> None:
    path = _as(form, code_bundle, tmp_path, policy, alice)
    reg = tmp_path / "registry"
    pol = load_policy(policy)
    e = refused(ContentPolicyError, lambda: install(InstallOptions(bundle=path, registry=reg, policy=pol, ignore_fit=True)),
                code=3, match="--allow-code")
    assert e.path == f"{MODEL_DIR}/modeling_tiny.py"
    assert "trust_remote_code" in e.hint
    log = audit_lines(reg)
    assert log[-1]["result"] == "refused" and log[-1]["options"]["allow_code"] is False
    before = registry_state(reg)
    # --allow-pickle is not consent to code
    refused(ContentPolicyError, lambda: install(InstallOptions(bundle=path, registry=reg, policy=pol, ignore_fit=True,
                                                               allow_pickle=True)), code=3, match="--allow-code")
    assert registry_state(reg) == before

    res = install(InstallOptions(bundle=path, registry=reg, policy=pol, ignore_fit=True, allow_code=True))
    assert res.result == "installed"
    assert audit_lines(reg)[-1]["options"]["allow_code"] is True
    snap = Path(res.to_json()["models"][0]["snapshot"])
    assert (snap / "modeling_tiny.py").read_bytes() == CODE["modeling_tiny.py"]


def test_cli_install_flag(code_bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    r = run_cli("install", code_bundle, "--registry", reg, "--trust", policy, "--ignore-fit", "--json")
    assert r.returncode == 3, r.stdout
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "ContentPolicyError" and err["path"] == f"{MODEL_DIR}/modeling_tiny.py"
    assert "--allow-code" in err["message"] and "modeling_tiny.py" in err["message"]
    r = run_cli("install", code_bundle, "--registry", reg, "--trust", policy, "--ignore-fit", "--allow-code", "--json")
    assert r.returncode == 0, r.stdout
    assert "--allow-code" in run_cli("install", "--help").stdout


def test_a_bundle_without_code_needs_no_flag(bundle: Path, policy: Path, tmp_path: Path) -> None:
    res = install(InstallOptions(bundle=bundle, registry=tmp_path / "registry", policy=load_policy(policy), ignore_fit=True))
    assert res.result == "installed"


def test_code_from_an_oci_artifact_needs_allow_code(oci_registry: OciRegistry, code_bundle: Path, policy: Path,
                                                     tmp_path: Path) -> None:
    r = run_cli("push", code_bundle, oci_registry.ref(), "--trust", policy, "--plain-http", "--json")
    assert r.returncode == 0, r.stderr
    reg = tmp_path / "registry"
    base = ["install", oci_registry.ref(), "--registry", reg, "--trust", policy, "--plain-http", "--ignore-fit", "--json"]
    r = run_cli(*base)
    assert r.returncode == 3, r.stdout
    assert "--allow-code" in json.loads(r.stdout)["error"]["message"]
    r = run_cli(*base, "--allow-code")
    assert r.returncode == 0, r.stdout
    assert audit_lines(reg)[-1]["options"]["allow_code"] is True
