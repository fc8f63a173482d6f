"""One entry host pushes, every GPU node installs from the registry with its own trust policy."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from conftest import KeyPair, run_cli
from registry_fixtures import audit_lines, registry_state

from airpack.fetch.oci import OciAccess
from airpack.manifest import parse
from airpack.oci_ref import parse_ref
from airpack.ops.install import InstallOptions
from airpack.ops.oci import OciInstallOptions, install_from_oci
from airpack.trust import load_policy

if TYPE_CHECKING:
    from oci_registry import OciRegistry

pytest_plugins = ["oci_registry"]  # the real-registry fixtures: oci_registry, make_oci_registry


def _listed(registry: Path) -> list[dict]:  # type: ignore[type-arg]
    r = run_cli("list", "--registry", registry, "--json")
    assert r.returncode == 0, r.stderr
    rows: list[dict] = json.loads(r.stdout)  # type: ignore[type-arg]
    return rows


def _no_stage_left(registry: Path) -> None:
    """Blobs stream straight into the install's own staging, which the txn removes whatever the outcome."""
    staging = registry / ".staging"
    assert not staging.exists() or not list(staging.iterdir())
    assert sorted(p.name for p in registry.iterdir() if p.name.startswith(".")) in ([".lock"], [".lock", ".staging"])


def test_push_once_then_install_on_two_nodes_each_with_its_own_policy(
    oci_registry: OciRegistry, bundle: Path, alice: KeyPair, make_policy: Callable[..., Path], tmp_path: Path
) -> None:
    entry_policy = make_policy(alice, name="entry.json")
    r = run_cli("push", bundle, oci_registry.ref(), "--trust", entry_policy, "--plain-http", "--json")
    assert r.returncode == 0, r.stderr
    pinned = json.loads(r.stdout)["pinned"]
    payload = (bundle / "manifest.json").read_bytes()
    signed = parse(payload, digest=hashlib.sha256(payload).hexdigest())

    for node, ref in (("node1", oci_registry.ref()), ("node2", pinned)):
        reg = tmp_path / node / "registry"
        node_policy = make_policy(alice, name=f"{node}.json")
        r = run_cli("install", ref, "--registry", reg, "--trust", node_policy, "--plain-http", "--ignore-fit", "--json")
        assert r.returncode == 0, r.stderr + r.stdout
        res = json.loads(r.stdout)
        assert res["result"] == "installed" and res["manifest_sha256"] == signed.digest
        rows = _listed(reg)
        assert [(x["repo_id"], x["bundle"], x["sequence"]) for x in rows] == [("acme/tiny", "tiny", 1)]
        snap = Path(res["models"][0]["snapshot"])  # the HF cache layout: what transformers loads offline
        model_files = [f for f in signed.files if f.path.startswith("models/acme--tiny/")]
        assert len(model_files) >= 5
        for f in model_files:
            assert (snap / f.path.split("/", 2)[2]).read_bytes() == (bundle / f.path).read_bytes()
        last = audit_lines(reg)[-1]
        assert last["result"] == "installed"
        assert last["transport"] == "oci" and last["oci_digest"] == pinned.rsplit("@", 1)[1]  # the artifact, pinned
        _no_stage_left(reg)
        assert run_cli("log", "verify", "--registry", reg).returncode == 0

    # The same artifact again is a no-op, and says so.
    r = run_cli("install", pinned, "--registry", tmp_path / "node2" / "registry", "--trust", tmp_path / "node2.json",
                "--plain-http", "--ignore-fit", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["result"] == "noop"


def test_a_replayed_older_artifact_is_refused_before_its_files_are_downloaded(
    oci_registry: OciRegistry, make_bundle: Callable[..., Path], policy: Path, tmp_path: Path
) -> None:
    b1, b2 = make_bundle(sequence=1), make_bundle(sequence=2)
    for b, tag in ((b1, "v1"), (b2, "v2")):
        assert run_cli("push", b, oci_registry.ref(tag=tag), "--trust", policy, "--plain-http").returncode == 0
    reg = tmp_path / "node" / "registry"
    r = run_cli("install", oci_registry.ref(tag="v2"), "--registry", reg, "--trust", policy, "--plain-http", "--ignore-fit")
    assert r.returncode == 0, r.stderr
    before, lines = registry_state(reg), len(audit_lines(reg))
    gets_before = len(oci_registry.requests("GET", "/blobs/"))

    r = run_cli("install", oci_registry.ref(tag="v1"), "--registry", reg, "--trust", policy, "--plain-http", "--ignore-fit", "--json")
    assert r.returncode == 4, r.stderr + r.stdout
    assert json.loads(r.stdout)["error"]["type"] == "RollbackError"
    assert len(oci_registry.requests("GET", "/blobs/")) - gets_before == 1  # the envelope, nothing more
    assert registry_state(reg) == before
    log = audit_lines(reg)
    assert len(log) == lines + 1 and log[-1]["result"] == "refused" and log[-1]["source"] == oci_registry.ref(tag="v1")
    _no_stage_left(reg)


def test_python_api_installs_and_reports_the_artifact_digest(oci_registry: OciRegistry, bundle: Path, policy: Path,
                                                             tmp_path: Path) -> None:
    r = run_cli("push", bundle, oci_registry.ref(), "--trust", policy, "--plain-http", "--json")
    assert r.returncode == 0, r.stderr
    digest = json.loads(r.stdout)["digest"]
    reg = tmp_path / "api-registry"
    opts = InstallOptions(bundle=Path("unused"), registry=reg, policy=load_policy(policy), ignore_fit=True)
    res = install_from_oci(OciInstallOptions(source=parse_ref(oci_registry.ref()), install=opts, access=OciAccess(plain_http=True)))
    assert res.digest == digest
    assert res.install.result == "installed"
    _no_stage_left(reg)


