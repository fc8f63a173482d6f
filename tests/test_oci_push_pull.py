"""The entry host pushes a verified bundle to a real OCI registry; a node pulls it back.

Every test runs the CNCF distribution registry on 127.0.0.1 (tests/oci_registry.py)
and reads its access log to see what was really sent.
"""

from __future__ import annotations

import filecmp
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from conftest import KeyPair, run_cli
from factories import write_blob

from airpack.fetch.oci import OciAccess
from airpack.manifest import parse
from airpack.oci_artifact import ARTIFACT_TYPE, ENVELOPE_MEDIA_TYPE, FILE_MEDIA_TYPE, MANIFEST_COPY_MEDIA_TYPE
from airpack.oci_ref import parse_ref
from airpack.ops.oci import PullOptions, pull
from airpack.trust import load_policy

if TYPE_CHECKING:
    from oci_registry import OciRegistry

pytest_plugins = ["oci_registry"]  # the real-registry fixtures: oci_registry, make_oci_registry


def _same_tree(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


def test_push_then_pull_recreates_the_verified_bundle(oci_registry: OciRegistry, bundle: Path, policy: Path, tmp_path: Path) -> None:
    ref = oci_registry.ref()
    r = run_cli("push", bundle, ref, "--trust", policy, "--plain-http", "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    pushed = json.loads(r.stdout)
    signed = parse((bundle / "manifest.json").read_bytes())
    assert pushed["pinned"] == f"oci://{oci_registry.host}/acme/tiny@{pushed['digest']}"
    assert pushed["signers"][0]["name"] == "alice"
    assert pushed["bytes_uploaded"] == signed.total_bytes + (bundle / "manifest.json").stat().st_size \
        + (bundle / "envelope.dsse.json").stat().st_size + 2

    # One artifact of airpack's type; each file a layer under the digest the signed manifest already gives it.
    doc = oci_registry.get_manifest(ref)
    assert doc["artifactType"] == ARTIFACT_TYPE
    titles = {layer["annotations"]["org.opencontainers.image.title"]: layer for layer in doc["layers"]}
    assert titles["envelope.dsse.json"]["mediaType"] == ENVELOPE_MEDIA_TYPE
    assert titles["manifest.json"]["mediaType"] == MANIFEST_COPY_MEDIA_TYPE
    for f in signed.files:
        assert titles[f.path] == {"mediaType": FILE_MEDIA_TYPE, "digest": f"sha256:{f.sha256}", "size": f.size,
                                  "annotations": {"org.opencontainers.image.title": f.path}}
    assert len(doc["layers"]) == len(signed.files) + 2

    out = tmp_path / "node1" / "bundle"
    r = run_cli("pull", ref, "--out", out, "--trust", policy, "--plain-http", "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    assert json.loads(r.stdout)["verified"] is True
    _same_tree(bundle, out)
    r = run_cli("verify", out, "--trust", policy)
    assert r.returncode == 0, r.stderr


def test_second_push_sends_no_layer_again(oci_registry: OciRegistry, make_bundle: Callable[..., Path], policy: Path) -> None:
    b1 = make_bundle(sequence=1)
    assert run_cli("push", b1, oci_registry.ref(tag="v1"), "--trust", policy, "--plain-http").returncode == 0
    first = oci_registry.uploads()
    assert first > 0

    r = run_cli("push", b1, oci_registry.ref(tag="v1"), "--trust", policy, "--plain-http", "--json")
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["uploaded"] == [] and again["bytes_uploaded"] == 0
    assert oci_registry.uploads() == first, "a blob the registry holds was sent again"
    assert len(oci_registry.requests("HEAD", "/blobs/sha256:")) >= 2 * len(again["skipped"])

    # The next bundle of the channel shares the model files: only what differs (envelope, manifest, SBOM) travels.
    b2 = make_bundle(sequence=2)
    r = run_cli("push", b2, oci_registry.ref(tag="v2"), "--trust", policy, "--plain-http", "--json")
    assert r.returncode == 0, r.stderr
    sent = json.loads(r.stdout)["uploaded"]
    assert {"envelope.dsse.json", "manifest.json"} <= set(sent)
    assert not [p for p in sent if p.startswith("models/")]


def test_a_bundle_that_fails_verify_is_refused_before_anything_is_sent(oci_registry: OciRegistry, bundle: Path, policy: Path,
                                                                       make_policy: Callable[..., Path], bob: KeyPair) -> None:
    victim = next(p for p in sorted(bundle.rglob("*.safetensors")))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    r = run_cli("push", bundle, oci_registry.ref(), "--trust", policy, "--plain-http")
    assert r.returncode == 3, r.stderr
    assert victim.name in r.stderr

    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    r = run_cli("push", bundle, oci_registry.ref(), "--trust", make_policy(bob, name="bob.json"), "--plain-http")
    assert r.returncode == 4, r.stderr

    assert oci_registry.requests(contains="/acme/") == [], "push talked to the registry before verify passed"
    assert oci_registry.stored_blobs() == []


def test_chunked_upload_streams_in_bounded_pieces(oci_registry: OciRegistry, make_bundle: Callable[..., Path], tiny_model: Path,
                                                  policy: Path, tmp_path: Path) -> None:
    write_blob(tiny_model / "extra.dat", 3 * 1024 * 1024 + 17, seed=3)
    b = make_bundle()
    r = run_cli("push", b, oci_registry.ref(), "--trust", policy, "--plain-http", "--chunk-size", "1MiB")
    assert r.returncode == 0, r.stderr
    assert len(oci_registry.requests("PATCH", "/blobs/uploads/")) >= 4
    res = pull(PullOptions(source=parse_ref(oci_registry.ref()), out=tmp_path / "got", policy=load_policy(policy),
                           access=OciAccess(plain_http=True)))
    assert res.verified
    _same_tree(b, tmp_path / "got")


def test_a_pinned_digest_pulls_that_artifact_even_after_the_tag_moves(oci_registry: OciRegistry, make_bundle: Callable[..., Path],
                                                                      policy: Path, tmp_path: Path) -> None:
    b1, b2 = make_bundle(sequence=1), make_bundle(sequence=2)
    r1 = run_cli("push", b1, oci_registry.ref(tag="stable"), "--trust", policy, "--plain-http", "--json")
    r2 = run_cli("push", b2, oci_registry.ref(tag="stable"), "--trust", policy, "--plain-http", "--json")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    pinned = json.loads(r1.stdout)["pinned"]
    access = OciAccess(plain_http=True)
    old = pull(PullOptions(source=parse_ref(pinned), out=tmp_path / "old", policy=load_policy(policy), access=access))
    new = pull(PullOptions(source=parse_ref(oci_registry.ref(tag="stable")), out=tmp_path / "new", policy=load_policy(policy), access=access))
    assert (old.manifest.sequence, new.manifest.sequence) == (1, 2)


def test_pull_without_trust_says_unverified_and_never_overwrites(oci_registry: OciRegistry, bundle: Path, policy: Path,
                                                                 tmp_path: Path) -> None:
    assert run_cli("push", bundle, oci_registry.ref(), "--trust", policy, "--plain-http").returncode == 0
    out = tmp_path / "plain"
    r = run_cli("pull", oci_registry.ref(), "--out", out, "--plain-http")
    assert r.returncode == 0, r.stderr
    assert "NOT verified" in r.stdout
    assert run_cli("verify", out, "--trust", policy).returncode == 0
    r = run_cli("pull", oci_registry.ref(), "--out", out, "--plain-http", "--json")
    assert r.returncode == 2
    assert json.loads(r.stdout)["error"]["type"] == "UsageError"


def test_usage_errors_name_the_problem(oci_registry: OciRegistry, bundle: Path, policy: Path, tmp_path: Path) -> None:
    cases = [
        ("push", bundle, f"oci://{oci_registry.host}/acme/tiny", "--trust", policy, "--plain-http"),  # no tag
        ("push", bundle, f"oci://{oci_registry.host}/acme/tiny@sha256:{'a' * 64}", "--trust", policy, "--plain-http"),
        ("push", bundle, oci_registry.ref(), "--trust", policy, "--plain-http", "--username", "u"),  # no password
        ("push", bundle, oci_registry.ref(), "--trust", policy, "--plain-http", "--chunk-size", "12 parsecs"),
        ("pull", "https://example/x:1", "--out", tmp_path / "x"),
    ]
    for args in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert oci_registry.requests(contains="/acme/") == []
