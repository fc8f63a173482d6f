"""OCI references and the artifact manifest format: parsing untrusted text, no registry needed."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airpack._json import dumps_canonical
from airpack.errors import IntegrityError, UnsafePathError, UsageError
from airpack.fetch.oci import OciAccess
from airpack.oci_artifact import (
    ARTIFACT_TYPE,
    EMPTY_DIGEST,
    ENVELOPE_MEDIA_TYPE,
    FILE_MEDIA_TYPE,
    MANIFEST_COPY_MEDIA_TYPE,
    blob_descriptor,
    build_manifest,
    file_descriptor,
    parse_artifact,
)
from airpack.oci_ref import OciRef, parse_ref

HEX = "ab" * 32


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("oci://registry.local/acme/tiny:v1", OciRef("registry.local", "acme/tiny", "v1", None)),
        ("oci://127.0.0.1:5000/tiny:latest", OciRef("127.0.0.1:5000", "tiny", "latest", None)),
        (f"oci://r:443/a/b/c@sha256:{HEX}", OciRef("r:443", "a/b/c", None, f"sha256:{HEX}")),
        (f"oci://[::1]:5000/m/x:1.0@sha256:{HEX}", OciRef("[::1]:5000", "m/x", "1.0", f"sha256:{HEX}")),
        ("oci:/h.example/x_y/z-w:T_1", OciRef("h.example", "x_y/z-w", "T_1", None)),  # what pathlib leaves of oci://
    ],
)
def test_valid_references_parse(text: str, want: OciRef) -> None:
    assert parse_ref(text) == want


@pytest.mark.parametrize(
    "text",
    [
        "https://h/x:1",  # not oci://
        "oci://h",  # no repository
        "oci://h/x",  # neither tag nor digest
        "oci://h/X:1",  # repositories are lowercase
        "oci://h/a//b:1",
        "oci://h/../b:1",
        "oci://h/a:b:c",
        "oci://h/a:-bad",
        "oci://h:99999/a:1",
        "oci://h:port/a:1",
        "oci://::1/a:1",  # IPv6 needs brackets
        "oci://[::g]/a:1",
        "oci://h/a@sha256:short",
        f"oci://h/a@md5:{HEX}",
        "oci://h/a:1?x=y",
        "oci://h/a:1#frag",
        "oci://h/a :1",
        "oci://h/a\n:1",
        "oci://-h/a:1",
        "oci://h/" + "a" * 256 + ":1",
    ],
)
def test_bad_references_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_ref(text)


_part = st.from_regex(r"[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,2}", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(
    host=st.sampled_from(["h", "reg.example.org", "10.0.0.1:5000", "[::1]:443", "localhost:1"]),
    parts=st.lists(_part, min_size=1, max_size=4),
    tag=st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)),
    digest=st.one_of(st.none(), st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True)),
)
def test_reference_round_trips(host: str, parts: list[str], tag: str | None, digest: str | None) -> None:
    if tag is None and digest is None:
        tag = "v1"
    ref = OciRef(host, "/".join(parts), tag, digest)
    assert parse_ref(str(ref)) == ref


def test_access_needs_both_credentials_and_no_ca_with_plain_http(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError):
        OciAccess(username="u")
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(UsageError):
        OciAccess(plain_http=True, ca_file=ca)
    with pytest.raises(UsageError):
        OciAccess(ca_file=tmp_path / "missing.pem")


# -- the artifact manifest ----------------------------------------------------------------


def _artifact(**over: object) -> dict:  # type: ignore[type-arg]
    env = blob_descriptor(ENVELOPE_MEDIA_TYPE, b"{}", "envelope.dsse.json")
    copy = blob_descriptor(MANIFEST_COPY_MEDIA_TYPE, b"[]", "manifest.json")
    files = [file_descriptor("models/a--b/config.json", HEX, 10)]
    doc = json.loads(build_manifest(envelope=env, manifest_copy=copy, files=files, annotations={"k": "v"}))
    doc.update(over)
    return doc


def _parse(doc: object) -> object:
    data = json.dumps(doc).encode()
    return parse_artifact(data, where="oci://h/x:1", digest="sha256:" + "0" * 64)


def test_build_manifest_is_deterministic_and_parses_back() -> None:
    env = blob_descriptor(ENVELOPE_MEDIA_TYPE, b"E", "envelope.dsse.json")
    copy = blob_descriptor(MANIFEST_COPY_MEDIA_TYPE, b"M", "manifest.json")
    files = [file_descriptor("models/a--b/w.safetensors", HEX, 123)]
    one = build_manifest(envelope=env, manifest_copy=copy, files=files, annotations={"a": "1"})
    assert one == build_manifest(envelope=env, manifest_copy=copy, files=files, annotations={"a": "1"})
    art = parse_artifact(one, where="x", digest="sha256:" + "0" * 64)
    assert art.envelope == env and art.manifest_copy == copy and art.files == tuple(files)
    doc = json.loads(one)
    assert doc["artifactType"] == ARTIFACT_TYPE
    assert doc["config"]["digest"] == EMPTY_DIGEST
    assert doc["layers"][2] == {"mediaType": FILE_MEDIA_TYPE, "digest": f"sha256:{HEX}", "size": 123,
                                "annotations": {"org.opencontainers.image.title": "models/a--b/w.safetensors"}}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(artifactType="application/vnd.other"),
        lambda d: d.pop("artifactType"),
        lambda d: d.update(schemaVersion=1),
        lambda d: d.update(mediaType="application/vnd.oci.image.index.v1+json"),
        lambda d: d.update(layers=[]),
        lambda d: d["layers"].pop(0),  # no envelope
        lambda d: d["layers"].append(d["layers"][0]),  # two envelopes
        lambda d: d["layers"].pop(1),  # no manifest copy
        lambda d: d["layers"][2].update(digest="sha512:" + "a" * 128),
        lambda d: d["layers"][2].update(size=-1),
        lambda d: d["layers"][2].update(size=True),
        lambda d: d["layers"][2].pop("annotations"),
        lambda d: d["layers"][2].update(mediaType="application/vnd.oci.image.layer.v1.tar"),
        lambda d: d.update(annotations={"k": 1}),
    ],
)
def test_malformed_artifacts_are_integrity_errors(mutate) -> None:  # type: ignore[no-untyped-def]
    doc = _artifact()
    mutate(doc)
    with pytest.raises(IntegrityError):
        _parse(doc)


@pytest.mark.parametrize("title", ["../evil", "/etc/passwd", "a/../../b", "models/x\x00y", "C:/x", "a\\b"])
def test_unsafe_layer_titles_are_refused(title: str) -> None:
    doc = _artifact()
    doc["layers"][2]["annotations"]["org.opencontainers.image.title"] = title
    with pytest.raises(UnsafePathError):
        _parse(doc)


def test_duplicate_keys_and_floats_in_the_manifest_are_refused() -> None:
    good = dumps_canonical(_artifact()).decode()
    dup = good.replace('"schemaVersion": 2', '"schemaVersion": 2, "schemaVersion": 2')
    with pytest.raises(IntegrityError):
        parse_artifact(dup.encode(), where="x", digest="")
    with pytest.raises(IntegrityError):
        parse_artifact(good.replace('"schemaVersion": 2', '"schemaVersion": 2.0').encode(), where="x", digest="")
    with pytest.raises(IntegrityError):
        parse_artifact(b"\xff\xfe", where="x", digest="")


def test_the_offline_side_never_loads_the_oci_transport() -> None:
    """Loading every CLI command and the file install loads neither oras, requests nor airpack.fetch.oci."""
    import subprocess
    import sys

    code = (
        "import sys, airpack.cli, airpack.ops.install, airpack.registry; airpack.cli._load_commands();"
        "bad = [m for m in ('oras', 'requests', 'airpack.fetch.oci', 'airpack.ops.oci') if m in sys.modules];"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"loaded at import: {r.stdout} {r.stderr}"
