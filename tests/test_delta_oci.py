"""A delta bundle through an OCI registry: push carries only its files; install from oci:// relies on the host's, hashed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from conftest import KeyPair, run_cli
from registry_fixtures import audit_lines, do_install, registry_state
from test_delta_flow import pack_for, snapshot_files, v1, v2_model  # noqa: F401 - the fixtures

from airpack.ops.profile import ProfileOptions, collect

if TYPE_CHECKING:
    from oci_registry import OciRegistry

pytest_plugins = ["oci_registry"]


def test_push_and_install_a_delta_from_oci(oci_registry: OciRegistry, tmp_path: Path, v1: Path, v2_model: Path,  # noqa: F811
                                           alice: KeyPair, policy: Path, make_bundle: Callable[..., Path]) -> None:
    delta = pack_for(tmp_path, v2_model, collect(ProfileOptions(registry=v1)), alice)
    r = run_cli("push", delta.out, oci_registry.ref(), "--trust", policy, "--plain-http", "--json")
    assert r.returncode == 0, r.stderr
    pushed = json.loads(r.stdout)
    sent = set(pushed["uploaded"]) | set(pushed["skipped"])
    assert {f.path for f in delta.manifest.carried} <= sent  # every carried file went up (or was there already)
    assert not {f.path for f in delta.manifest.expected_on_host} & sent  # and none of the host's files did
    assert pushed["bytes_uploaded"] < delta.manifest.total_bytes
    empty = tmp_path / "empty"
    r = run_cli("install", oci_registry.ref(), "--registry", empty, "--trust", policy, "--plain-http", "--ignore-fit", "--json")
    assert r.returncode == 3, r.stdout
    reference = tmp_path / "reference"
    shutil.copytree(v1, reference, symlinks=True)
    do_install(delta.out, reference, policy, ignore_fit=True)
    before = registry_state(v1)
    r = run_cli("install", oci_registry.ref(), "--registry", v1, "--trust", policy, "--plain-http", "--ignore-fit", "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    assert registry_state(v1) != before and audit_lines(v1)[-1]["result"] == "installed"
    assert json.loads(r.stdout)["result"] == "installed"
    assert snapshot_files(v1, "acme/tiny") == snapshot_files(reference, "acme/tiny")
