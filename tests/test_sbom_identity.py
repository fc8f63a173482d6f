"""Audit flow: the SBOM names each component as it really is.

A local model gets no ``pkg:huggingface`` purl (its commit is derived from
its bytes; no such repo revision exists on the Hub) and says where it came
from; a Hub model keeps its purl. A wheel carries the licence its own
METADATA declares, read at pack time from the verified copy, capped.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import zipfile
from pathlib import Path

import pytest
from conftest import KeyPair, verify, write_spec
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from test_wheels import build_wheel

from airpack.manifest import FileEntry
from airpack.ops.pack import PackOptions, pack
from airpack.sbom import MAX_METADATA_BYTES, SBOM_NAME, build_sbom, wheel_licenses
from airpack.spec import load_spec

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
BSD_TEXT = "Copyright (c) 2005-2024, NumPy Developers.\nAll rights reserved.\n\nRedistribution and use ..."


def model_record(source: str) -> dict[str, object]:
    return {"repo_id": "acme/m", "path": "models/acme--m", "commit": "1" * 40, "source": source, "license": "mit",
            "parameters": 7, "dtypes": {"BF16": 7}, "pickles": [], "code": []}


def sbom_doc(models: list[dict[str, object]], wheels: list[dict[str, object]] | None = None) -> dict[str, object]:
    files = [FileEntry("models/acme--m/model.safetensors", 10, "a" * 64)]
    files += [FileEntry(str(w["path"]), 5, str(w["sha256"])) for w in wheels or []]
    data = build_sbom(name="b", channel="c", sequence=1, created=NOW, files=files, models=models, wheels=wheels or [])
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(data.decode()) is None
    doc: dict[str, object] = json.loads(data)
    return doc


def components(doc: dict[str, object], kind: str) -> list[dict[str, object]]:
    comps = doc["components"]
    assert isinstance(comps, list)
    return [c for c in comps if c["type"] == kind]


def test_a_local_model_has_no_huggingface_purl() -> None:
    [model] = components(sbom_doc([model_record("local")]), "machine-learning-model")
    assert "purl" not in model
    assert {"name": "airpack:source", "value": "local"} in model["properties"]  # type: ignore[operator]


def test_a_hub_model_keeps_its_huggingface_purl() -> None:
    [model] = components(sbom_doc([model_record("hub")]), "machine-learning-model")
    assert model["purl"] == "pkg:huggingface/acme/m@" + "1" * 40


# -- wheel licences -----------------------------------------------------------------------------------


def wheel_with_metadata(folder: Path, name: str, extra: str) -> Path:
    """A wheel whose METADATA carries ``extra`` header lines (and a body after the blank line)."""
    path = build_wheel(folder, name, "1.0")
    info = f"{name}-1.0.dist-info/METADATA"
    with zipfile.ZipFile(path) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    meta = entries[info].decode()
    entries[info] = (meta + extra + "\nA long description.\nLicense: not a header, the body\n").encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for p, d in entries.items():
            z.writestr(zipfile.ZipInfo(p, date_time=(2024, 1, 1, 0, 0, 0)), d)
    return path


@pytest.mark.parametrize(("extra", "expected"), [
    ("License-Expression: Apache-2.0 OR MIT\nLicense: ignored\n", ["Apache-2.0 OR MIT"]),
    ("License: MIT\nClassifier: License :: OSI Approved :: BSD License\n", ["MIT"]),
    ("License: " + BSD_TEXT.replace("\n", "\n        ") + "\nClassifier: License :: OSI Approved :: BSD License\n",
     ["BSD License"]),
    ("Classifier: License :: OSI Approved :: MIT License\nClassifier: License :: OSI Approved :: Apache Software License\n"
     "Classifier: Programming Language :: Python\n", ["Apache Software License", "MIT License"]),
    ("License: UNKNOWN\n", []),
    ("", []),
])
def test_wheel_licence_comes_from_its_metadata(tmp_path: Path, extra: str, expected: list[str]) -> None:
    assert wheel_licenses(wheel_with_metadata(tmp_path, "alpha", extra)) == expected


def test_an_oversized_or_broken_metadata_declares_nothing(tmp_path: Path) -> None:
    big = wheel_with_metadata(tmp_path / "a", "alpha", "License: MIT\n" + "X-Pad: " + "x" * MAX_METADATA_BYTES + "\n")
    assert wheel_licenses(big) == []
    broken = tmp_path / "broken-1.0-py3-none-any.whl"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    assert wheel_licenses(broken) == []


def test_pack_records_wheel_licences_and_the_sbom_lists_them(tmp_path: Path, tiny_model: Path, alice: KeyPair,
                                                             policy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    for v in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(v, raising=False)
    links = tmp_path / "links"
    wheel_with_metadata(links, "alpha", "License-Expression: Apache-2.0\n")
    wheel_with_metadata(links, "beta", "Classifier: License :: OSI Approved :: MIT License\n"
                                       "Classifier: License :: OSI Approved :: BSD License\n")
    spec = write_spec(tmp_path / "w.toml", model_dir=tiny_model, extra=(
        f'\n[wheels]\nrequirements = ["alpha", "beta"]\npython_version = "3.11"\nfind_links = ["{links}"]\n'
        "no_index = true\n"))
    r = pack(PackOptions(spec=load_spec(spec), out=tmp_path / "b", signer=alice.signer))
    m = verify(r.out, policy).manifest
    assert {w.name: w.raw.get("licenses") for w in m.wheels} == {"alpha": ["Apache-2.0"],
                                                                 "beta": ["BSD License", "MIT License"]}
    doc = json.loads((r.out / SBOM_NAME).read_bytes())
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(doc)) is None
    libs = {c["name"]: c.get("licenses") for c in components(doc, "library")}
    assert libs["alpha"] == [{"license": {"id": "Apache-2.0"}}]
    assert sorted(x["license"]["name"] for x in libs["beta"]) == ["BSD License", "MIT License"]
