"""The CycloneDX 1.6 SBOM: schema-valid, complete, deterministic, and signed inside the bundle."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from conftest import KeyPair, run_cli, verify, write_spec
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from airpack.errors import BundleMismatchError
from airpack.manifest import FileEntry, parse
from airpack.ops.pack import PackOptions, pack
from airpack.sbom import SBOM_NAME, build_sbom
from airpack.spec import load_spec


def validate(doc: str) -> None:
    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(doc)
    assert errors is None, errors


def test_sbom_command_writes_a_valid_cyclonedx_1_6_document(tmp_path: Path, bundle: Path, policy: Path) -> None:
    out = tmp_path / "sbom.json"
    r = run_cli("sbom", bundle, "--format", "cyclonedx", "--out", out, "--trust", policy, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verified"] is True
    text = out.read_text()
    validate(text)
    doc = json.loads(text)
    assert doc["specVersion"] == "1.6" and doc["bomFormat"] == "CycloneDX"
    m = parse((bundle / "manifest.json").read_bytes())
    [model] = [c for c in doc["components"] if c["type"] == "machine-learning-model"]
    assert model["name"] == "acme/tiny" and model["version"] == m.models[0].commit
    assert model["licenses"] == [{"license": {"id": "Apache-2.0"}}]
    assert model["hashes"][0]["alg"] == "SHA-256" and len(model["hashes"][0]["content"]) == 64
    assert "purl" not in model  # a local folder: its commit is derived, nothing on the Hub has that identity
    assert {"name": "airpack:source", "value": "local"} in model["properties"]
    listed = {c["name"]: c["hashes"][0]["content"] for c in model["components"]}
    assert listed == {f.path: f.sha256 for f in m.files if f.path != SBOM_NAME}
    assert doc["metadata"]["timestamp"].startswith(f"{m.created:%Y-%m-%dT%H:%M:%S}")


def test_sbom_is_written_into_the_bundle_and_covered_by_the_signature(tmp_path: Path, bundle: Path, policy: Path) -> None:
    m = verify(bundle, policy).manifest
    entry = m.file(SBOM_NAME)
    assert entry is not None  # listed in the signed manifest with its digest
    r = run_cli("sbom", bundle)  # unverified: made from the manifest, and labelled so on stderr
    assert r.returncode == 0 and "UNVERIFIED" in r.stderr
    assert r.stdout.encode() == (bundle / SBOM_NAME).read_bytes()
    validate((bundle / SBOM_NAME).read_text())
    (bundle / SBOM_NAME).write_text((bundle / SBOM_NAME).read_text().replace("Apache-2.0", "MIT"))
    with pytest.raises(BundleMismatchError) as e:
        verify(bundle, policy)
    assert e.value.report.changed[0].path == SBOM_NAME


def test_same_inputs_give_the_same_sbom_bytes(tmp_path: Path, tiny_model: Path, alice: KeyPair) -> None:
    now = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    spec = load_spec(write_spec(tmp_path / "s.toml", model_dir=tiny_model))
    a = pack(PackOptions(spec=spec, out=tmp_path / "a", signer=alice.signer, now=now))
    b = pack(PackOptions(spec=spec, out=tmp_path / "b", signer=alice.signer, now=now))
    assert (tmp_path / "a" / SBOM_NAME).read_bytes() == (tmp_path / "b" / SBOM_NAME).read_bytes()
    assert a.manifest is not None and b.manifest is not None and a.manifest.digest == b.manifest.digest
    serial = json.loads((tmp_path / "a" / SBOM_NAME).read_bytes())["serialNumber"]
    assert serial.startswith("urn:uuid:")


def test_wheels_and_loose_files_are_components_with_hashes() -> None:
    files = [FileEntry("models/acme--m/model.safetensors", 10, "a" * 64), FileEntry("wheels/torch-2.5.0-cp311-none-any.whl", 5, "b" * 64),
             FileEntry("wheels/requirements.txt", 3, "c" * 64)]
    models = [{"repo_id": "acme/m", "path": "models/acme--m", "commit": "1" * 40, "source": "hub", "license": "llama3.1",
               "parameters": 7, "dtypes": {"BF16": 7}, "pickles": [], "code": []}]
    wheels = [{"name": "torch", "version": "2.5.0", "path": "wheels/torch-2.5.0-cp311-none-any.whl", "sha256": "b" * 64}]
    data = build_sbom(name="b", channel="c", sequence=3, created=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), files=files,
                      models=models, wheels=wheels)
    validate(data.decode())
    doc = json.loads(data)
    by_ref = {c["bom-ref"]: c for c in doc["components"]}
    wheel = by_ref["wheel:wheels/torch-2.5.0-cp311-none-any.whl"]
    assert wheel["purl"] == "pkg:pypi/torch@2.5.0" and wheel["hashes"][0]["content"] == "b" * 64
    assert by_ref["file:wheels/requirements.txt"]["hashes"][0]["content"] == "c" * 64
    assert by_ref["model:acme/m"]["licenses"] == [{"license": {"name": "llama3.1"}}]  # not an SPDX id: kept as a name
