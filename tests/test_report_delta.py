"""``airpack report`` of a delta bundle (``pack --for``): what it carries, what it relies on, and whether that was checked.

A delta's report lists every signed file marked carried or on-host. With
``--trust`` and ``--registry`` the host's copies are hashed by the same
``verify_source`` call ``verify --registry`` makes, and the report says they
were found with their digests (a changed copy is verify's exit 3 and no
report); without a registry it says they were NOT checked. The fit of a
delta whose host files were not read is the estimate recorded at pack time,
labelled so. The browser check loads the delta report in headless Chromium.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import KeyPair, write_spec
from registry_fixtures import do_install, variant_model
from report_helpers import TARGET, Browser, outside_references, page_text, report_json, script_count
from threat_helpers import cli_inproc

from airpack.ops.pack import PackOptions, pack
from airpack.ops.profile import ProfileOptions, collect
from airpack.registry import HUB_DIR
from airpack.spec import load_spec
from airpack.trust import load_policy


@pytest.fixture
def delta_world(tmp_path: Path, tiny_model: Path, make_bundle: Callable[..., Path], alice: KeyPair,
                policy: Path) -> dict[str, Path]:
    """A registry holding v1 of acme/tiny, and a delta of v2 (same weights, a changed README) packed for it."""
    reg = tmp_path / "reg"
    do_install(make_bundle(extra=TARGET), reg, policy, ignore_fit=True)
    v2 = variant_model(tiny_model, tmp_path / "src" / "tiny-v2", extra={"README.md": b"the second revision\n"})
    spec = write_spec(tmp_path / "delta.toml", model_dir=v2, sequence=2, extra=TARGET)
    profile = collect(ProfileOptions(registry=reg, policy=load_policy(policy)))
    r = pack(PackOptions(spec=load_spec(spec), out=tmp_path / "delta", signer=alice.signer, profile=profile))
    assert r.manifest is not None and r.manifest.is_delta
    return {"delta": r.out, "registry": reg, "policy": policy}


def _by_where(doc: dict[str, Any]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in doc["files"]["files"]:
        out.setdefault(f["where"], set()).add(f["path"])
    return out


def test_verified_with_the_registry_says_the_host_files_were_found_with_their_digests(delta_world: dict[str, Path],
                                                                                       tmp_path: Path) -> None:
    out = tmp_path / "delta.html"
    doc = report_json(delta_world["delta"], "--trust", delta_world["policy"], "--registry", delta_world["registry"],
                      "--out", out)
    d = doc["delta"]
    assert d["host_checked"] is True and d["registry"] == str(delta_world["registry"])
    assert "found in registry" in d["statement"] and "SHA-256" in d["statement"]
    where = _by_where(doc)
    assert any(p.endswith(".safetensors") for p in where["on-host"])  # the weights stay on the host
    assert "models/acme--tiny/README.md" in where["carried"]
    assert d["on_host"]["files"] == len(where["on-host"]) and d["carried"]["files"] == len(where["carried"])
    on_host = next(f for f in doc["files"]["files"] if f["where"] == "on-host")
    assert len(on_host["sha256"]) == 64 and on_host["size"] > 0
    # The host's hashed copies are read, so the fit is estimated now, as for a full bundle.
    assert {f["basis"] for f in doc["fit"]} == {"verified"} and doc["fit"][0]["verdict"] == "fits"
    assert doc["comparison"]["kind"] == "registry" and doc["comparison"]["sequence"]["accepted"] is True
    html = out.read_text()
    assert "host checked" in html and on_host["path"] in html and doc["identity"]["manifest_sha256"] in html


def test_verified_without_a_registry_says_the_host_files_were_not_checked(delta_world: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "delta.html"
    doc = report_json(delta_world["delta"], "--trust", delta_world["policy"], "--out", out)
    d = doc["delta"]
    assert d["host_checked"] is False and d["registry"] is None
    assert "NOT checked against a host" in d["statement"]
    fits = doc["fit"]
    assert fits and {f["basis"] for f in fits} == {"recorded"}  # the weights are not in the bundle to read
    assert all("recorded at pack time" in f["reason"] for f in fits)
    assert fits[0]["verdict"] == fits[0]["recorded_verdict"] == "fits"
    assert "NOT checked against a host" in out.read_text()


def test_unverified_delta_is_not_checked_even_with_a_registry(delta_world: dict[str, Path], tmp_path: Path) -> None:
    doc = report_json(delta_world["delta"], "--registry", delta_world["registry"])
    assert doc["verification"]["verified"] is False
    assert doc["delta"]["host_checked"] is False and "needs --trust" in doc["delta"]["statement"]
    assert {f["basis"] for f in doc["fit"]} == {"recorded"}


def test_a_changed_host_copy_is_verifys_exit_3_and_no_report(delta_world: dict[str, Path], tmp_path: Path) -> None:
    reg = delta_world["registry"]
    blob = next(p for p in (reg / HUB_DIR).rglob("blobs/*") if p.stat().st_size > 1000)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    out = tmp_path / "delta.html"
    r = cli_inproc("report", delta_world["delta"], "--trust", delta_world["policy"], "--registry", reg, "--out", out)
    assert r.returncode == 3, r.stderr
    assert "relies on" in r.stderr and not out.exists()


def test_a_full_bundle_has_no_delta_facts(make_bundle: Callable[..., Path]) -> None:
    doc = report_json(make_bundle())
    assert "delta" not in doc and all("where" not in f for f in doc["files"]["files"])


def test_delta_report_in_the_browser(delta_world: dict[str, Path], browser: Browser, tmp_path: Path) -> None:
    page = tmp_path / "delta.html"
    doc = report_json(delta_world["delta"], "--trust", delta_world["policy"], "--registry", delta_world["registry"],
                      "--out", page)
    html = page.read_text()
    assert outside_references(html) == [] and script_count(html) == (0, [])
    png = tmp_path / "delta.png"
    text = page_text(browser.dom(page, png))
    assert png.stat().st_size > 10_000
    assert browser.listener.page_requests() == [], "the report made a request"
    on_host = next(f["path"] for f in doc["files"]["files"] if f["where"] == "on-host")
    assert "delta" in text and on_host in text and doc["identity"]["manifest_sha256"] in text
    assert "host checked" in text
