"""The registry is a transport, not a root of trust: what an attacker (or a fault) there can and cannot do.

Someone with write access to the registry can swap blobs, envelopes and
manifests, or take the registry down mid-transfer. Each case must end in a
named refusal with the design's exit code, before any untrusted model byte is
downloaded where the signatures already say no, and with nothing written: no
bundle folder, no registry change beyond the one audit line of the attempt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import KeyPair, run_cli
from factories import make_model, write_blob
from registry_fixtures import audit_lines, registry_state

from airpack.errors import FetchError
from airpack.fetch.oci import OciAccess, OciClient
from airpack.manifest import parse
from airpack.oci_artifact import EMPTY_BYTES, EMPTY_CONFIG
from airpack.oci_ref import parse_ref
from airpack.ops.install import InstallOptions, install
from airpack.ops.oci import OciInstallOptions, PullOptions, install_from_oci, pull
from airpack.trust import load_policy

if TYPE_CHECKING:
    from oci_registry import OciRegistry

pytest_plugins = ["oci_registry"]  # the real-registry fixtures: oci_registry, make_oci_registry


def _files(bundle: Path) -> dict[str, str]:
    payload = (bundle / "manifest.json").read_bytes()
    return {f.path: f.sha256 for f in parse(payload, digest=hashlib.sha256(payload).hexdigest()).files}


def _file_gets(reg: OciRegistry, bundle: Path) -> int:
    digests = set(_files(bundle).values())
    return sum(1 for _, p, _ in reg.requests("GET", "/blobs/sha256:") if p.rsplit(":", 1)[-1] in digests)


@pytest.fixture
def node(tmp_path: Path, make_bundle: Callable[..., Path], policy: Path) -> Path:
    """A GPU node's registry that already holds another model (so 'unchanged' means something)."""
    other = make_model(tmp_path / "src" / "base", seed=7)
    base = make_bundle(model_dir=other, name="base", channel="base", repo_id="acme/base")
    reg = tmp_path / "node-registry"
    install(InstallOptions(bundle=base, registry=reg, policy=load_policy(policy), ignore_fit=True))
    return reg


def _refused_and_unchanged(node: Path, before: dict, lines: int, exit_code: int) -> None:  # type: ignore[type-arg]
    assert registry_state(node) == before
    log = audit_lines(node)
    assert len(log) == lines + 1
    assert log[-1]["result"] == "refused" and log[-1]["error"]["exit_code"] == exit_code
    assert not (node / ".staging").exists() or not list((node / ".staging").iterdir())


def _nothing_pulled(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.pull-")]


def _install(reg: OciRegistry, ref: str, node: Path, policy: Path) -> tuple[int, dict]:  # type: ignore[type-arg]
    r = run_cli("install", ref, "--registry", node, "--trust", policy, "--plain-http", "--ignore-fit", "--json")
    assert "Traceback" not in r.stderr
    return r.returncode, json.loads(r.stdout)


def test_a_blob_tampered_in_registry_storage_is_refused_and_nothing_is_written(
    oci_registry: OciRegistry, bundle: Path, policy: Path, node: Path, tmp_path: Path
) -> None:
    assert run_cli("push", bundle, oci_registry.ref(), "--trust", policy, "--plain-http").returncode == 0
    path, sha = next((p, d) for p, d in sorted(_files(bundle).items()) if p.endswith(".safetensors"))
    data = oci_registry.blob_data(f"sha256:{sha}")
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x40  # same size: only the digest can tell
    data.write_bytes(bytes(raw))

    out = tmp_path / "pulled"
    r = run_cli("pull", oci_registry.ref(), "--out", out, "--trust", policy, "--plain-http", "--json")
    assert r.returncode == 3, r.stderr + r.stdout
    err = json.loads(r.stdout)["error"]
    assert err["path"] == path and "does not match its manifest" in err["message"]
    _nothing_pulled(out)

    before, lines = registry_state(node), len(audit_lines(node))
    code, doc = _install(oci_registry, oci_registry.ref(), node, policy)
    assert code == 3, doc
    assert doc["error"]["path"] == path
    _refused_and_unchanged(node, before, lines, 3)


def test_an_envelope_swapped_for_another_bundles_is_refused_before_any_file_is_downloaded(
    oci_registry: OciRegistry, make_bundle: Callable[..., Path], policy: Path, node: Path, tmp_path: Path
) -> None:
    a = make_bundle(sequence=5)
    b = make_bundle(sequence=6, model_dir=make_model(tmp_path / "src" / "other", seed=3))  # trusted signer, other content
    ref = oci_registry.ref(tag="swapped")
    oci_registry.push_doctored(ref, envelope=(b / "envelope.dsse.json").read_bytes(),
                               manifest_copy=(a / "manifest.json").read_bytes(), files=oci_registry.bundle_files(a))
    before, lines = registry_state(node), len(audit_lines(node))

    # Exit 3 as for a folder or a tar (DESIGN: the signature holds; the manifest copy beside it is not what it signs).
    code, doc = _install(oci_registry, ref, node, policy)
    assert code == 3, doc
    assert doc["error"]["type"] == "IntegrityError" and doc["error"]["path"] == "manifest.json"
    _refused_and_unchanged(node, before, lines, 3)

    out = tmp_path / "pulled"
    r = run_cli("pull", ref, "--out", out, "--trust", policy, "--plain-http")
    assert r.returncode == 3, r.stderr
    assert "differs from the signed payload" in r.stderr
    _nothing_pulled(out)
    assert _file_gets(oci_registry, a) == 0, "model bytes were downloaded before the signatures said no"


def test_an_envelope_by_a_key_this_node_does_not_trust_is_refused_before_download(
    oci_registry: OciRegistry, make_bundle: Callable[..., Path], bob: KeyPair, policy: Path, node: Path
) -> None:
    evil = make_bundle(signer=bob)
    oci_registry.push_doctored(oci_registry.ref(), envelope=(evil / "envelope.dsse.json").read_bytes(),
                               manifest_copy=(evil / "manifest.json").read_bytes(), files=oci_registry.bundle_files(evil))
    before, lines = registry_state(node), len(audit_lines(node))
    code, doc = _install(oci_registry, oci_registry.ref(), node, policy)
    assert code == 4, doc
    assert doc["error"]["type"] == "SignatureError"
    _refused_and_unchanged(node, before, lines, 4)
    assert _file_gets(oci_registry, evil) == 0


def test_a_consistent_envelope_and_manifest_over_other_layers_is_an_integrity_failure(
    oci_registry: OciRegistry, make_bundle: Callable[..., Path], policy: Path, tmp_path: Path
) -> None:
    a = make_bundle(sequence=1)
    b = make_bundle(sequence=2, model_dir=make_model(tmp_path / "src" / "other", seed=3))
    ref = oci_registry.ref(tag="mixed")
    oci_registry.push_doctored(ref, envelope=(b / "envelope.dsse.json").read_bytes(),
                               manifest_copy=(b / "manifest.json").read_bytes(), files=oci_registry.bundle_files(a))
    out = tmp_path / "pulled"
    r = run_cli("pull", ref, "--out", out, "--trust", policy, "--plain-http", "--json")
    assert r.returncode == 3, r.stdout
    assert json.loads(r.stdout)["error"]["type"] == "BundleMismatchError"
    _nothing_pulled(out)
    assert _file_gets(oci_registry, a) == 0


def test_an_extra_layer_the_signature_does_not_cover_is_refused(oci_registry: OciRegistry, bundle: Path, policy: Path,
                                                                tmp_path: Path) -> None:
    extra = write_blob(tmp_path / "payload.sh", 1000)
    files = [*oci_registry.bundle_files(bundle), ("models/acme--tiny/run.sh", extra)]
    oci_registry.push_doctored(oci_registry.ref(), envelope=(bundle / "envelope.dsse.json").read_bytes(),
                               manifest_copy=(bundle / "manifest.json").read_bytes(), files=files)
    r = run_cli("pull", oci_registry.ref(), "--out", tmp_path / "pulled", "--trust", policy, "--plain-http", "--json")
    assert r.returncode == 3
    assert json.loads(r.stdout)["error"]["mismatch"]["extra"] == ["models/acme--tiny/run.sh"]
    _nothing_pulled(tmp_path / "pulled")


def test_something_that_is_not_an_airpack_artifact_is_refused(oci_registry: OciRegistry, tmp_path: Path) -> None:
    ref = parse_ref(oci_registry.ref(repo="other/image", tag="1"))
    with OciClient(ref, OciAccess(plain_http=True)) as c:
        c.upload_bytes(EMPTY_BYTES, EMPTY_CONFIG)
        doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "artifactType": "application/vnd.example",
               "config": EMPTY_CONFIG.to_json(), "layers": [EMPTY_CONFIG.to_json()]}
        c.put_manifest(json.dumps(doc).encode())
    r = run_cli("pull", str(ref), "--out", tmp_path / "x", "--plain-http")
    assert r.returncode == 3 and "is not an airpack bundle" in r.stderr
    r = run_cli("pull", oci_registry.ref(repo="other/image", tag="missing"), "--out", tmp_path / "x", "--plain-http")
    assert r.returncode == 7 and "not found" in r.stderr


# -- the registry goes away ---------------------------------------------------------------------


class _KillRegistry:
    """A progress sink that kills the registry at a chosen moment of the transfer."""

    def __init__(self, reg: OciRegistry, *, at: str) -> None:
        self.reg, self.at, self.fired = reg, at, False

    def _fire(self) -> None:
        if not self.fired:
            self.fired = True
            self.reg.kill()

    def task(self, label: str, total: int, *, unit: str = "B") -> _KillRegistry:
        if self.at == "start" and label.startswith(("pull ", "verify ")):
            self._fire()
        return self

    def advance(self, n: int) -> None:
        if self.at == "mid-blob":
            self._fire()

    def close(self) -> None:
        pass

    def message(self, text: str) -> None:
        pass


def test_registry_down_is_a_clean_fetch_error(oci_registry: OciRegistry, bundle: Path, policy: Path, node: Path, tmp_path: Path) -> None:
    assert run_cli("push", bundle, oci_registry.ref(), "--trust", policy, "--plain-http").returncode == 0
    oci_registry.stop()
    out = tmp_path / "pulled"
    r = run_cli("pull", oci_registry.ref(), "--out", out, "--trust", policy, "--plain-http")
    assert r.returncode == 7 and "cannot reach registry" in r.stderr, r.stderr
    _nothing_pulled(out)
    before, lines = registry_state(node), len(audit_lines(node))
    code, doc = _install(oci_registry, oci_registry.ref(), node, policy)
    assert code == 7, doc
    _refused_and_unchanged(node, before, lines, 7)


def test_registry_gone_between_manifest_and_blobs_leaves_nothing(oci_registry: OciRegistry, bundle: Path, policy: Path,
                                                                 tmp_path: Path) -> None:
    assert run_cli("push", bundle, oci_registry.ref(), "--trust", policy, "--plain-http").returncode == 0
    out = tmp_path / "pulled"
    kill = _KillRegistry(oci_registry, at="start")
    with pytest.raises(FetchError) as e:
        pull(PullOptions(source=parse_ref(oci_registry.ref()), out=out, policy=load_policy(policy), access=OciAccess(plain_http=True),
                         progress=kill))
    assert kill.fired and e.value.exit_code == 7
    _nothing_pulled(out)


def test_registry_killed_mid_blob_leaves_the_node_registry_unchanged(oci_registry: OciRegistry, make_bundle: Callable[..., Path],
                                                                     tiny_model: Path, policy: Path, node: Path) -> None:
    write_blob(tiny_model / "big.dat", 48 << 20, seed=5)  # larger than the socket buffers: the kill lands mid-stream
    b = make_bundle(sequence=9)
    assert run_cli("push", b, oci_registry.ref(), "--trust", policy, "--plain-http").returncode == 0
    before, lines = registry_state(node), len(audit_lines(node))
    kill = _KillRegistry(oci_registry, at="mid-blob")
    opts = InstallOptions(bundle=Path("unused"), registry=node, policy=load_policy(policy), ignore_fit=True, progress=kill)
    with pytest.raises(FetchError) as e:
        install_from_oci(OciInstallOptions(source=parse_ref(oci_registry.ref()), install=opts, access=OciAccess(plain_http=True)))
    assert kill.fired and e.value.exit_code == 7
    assert "broke while fetching" in e.value.message or "cannot reach" in e.value.message
    _refused_and_unchanged(node, before, lines, 7)
