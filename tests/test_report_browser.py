"""The reports in a real browser: headless Chromium loads each file with every request sent to a socket the test holds.

For a verified bundle, an unverified one, a diff against an older bundle, a
diff against the installed version and a registry: the DOM holds the key
facts (signers, manifest digest, the UNVERIFIED banner when unverified, the
fit verdict), the document references nothing outside itself, the page made
no request, and a screenshot is saved in the test's temp folder. A page that
does load an image shows the check would see it. Skipped without Chromium.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeyPair
from registry_fixtures import do_install
from report_helpers import TARGET, Browser, outside_references, page_text, report_json, script_count
from threat_helpers import cli_inproc

from airpack.ops.pack import add_signature


def _load(browser: Browser, page: Path, tmp_path: Path) -> str:
    html = page.read_text()
    assert outside_references(html) == []
    assert script_count(html) == (0, [])
    png = tmp_path / (page.stem + ".png")
    dom = browser.dom(page, png)
    assert png.stat().st_size > 10_000  # something was drawn
    assert browser.listener.page_requests() == [], "the report made a request"
    return page_text(dom)


@pytest.fixture
def world(make_bundle: Callable[..., Path], tiny_model: Path, bob: KeyPair, make_policy: Callable[..., Path], alice: KeyPair,
          tmp_path: Path) -> dict[str, Path]:
    one = make_bundle(sequence=1, extra=TARGET)
    add_signature(one, bob.signer)
    (tiny_model / "README.md").write_text("the second revision\n")
    two = make_bundle(sequence=2, extra=TARGET)
    add_signature(two, bob.signer)
    policy = make_policy(alice, bob, threshold=2, name="two.json")
    reg = tmp_path / "registry"
    do_install(one, reg, policy, gpu="L4")
    return {"one": one, "two": two, "policy": policy, "registry": reg}


def test_verified_and_unverified_bundle_reports(world: dict[str, Path], browser: Browser, tmp_path: Path) -> None:
    verified = tmp_path / "verified.html"
    doc = report_json(world["two"], "--trust", world["policy"], "--out", verified)
    text = _load(browser, verified, tmp_path)
    digest = doc["identity"]["manifest_sha256"]
    assert digest in text
    assert "VERIFIED — signed by alice, bob (threshold 2)" in text
    assert "UNVERIFIED" not in text
    assert "fits" in text and doc["fit"][0]["verdict"] == "fits"

    unverified = tmp_path / "unverified.html"
    report_json(world["two"], "--out", unverified)
    text = _load(browser, unverified, tmp_path)
    assert "UNVERIFIED — what the bundle claims" in text
    assert digest in text
    assert "unknown (unverified)" in text  # signers named by nothing but the key ids they claim
    assert "fits" in text


def test_diff_reports_against_an_older_bundle_and_the_installed_version(world: dict[str, Path], browser: Browser,
                                                                        tmp_path: Path) -> None:
    against = tmp_path / "against.html"
    report_json(world["two"], "--trust", world["policy"], "--against", world["one"], "--out", against)
    text = _load(browser, against, tmp_path)
    assert "install accepted" in text and "models/acme--tiny/README.md" in text

    installed = tmp_path / "installed.html"
    doc = report_json(world["two"], "--trust", world["policy"], "--registry", world["registry"], "--out", installed)
    text = _load(browser, installed, tmp_path)
    assert "Changes against the installed version" in text and "acme/tiny: README.md" in text
    assert doc["comparison"]["sequence"]["accepted"] is True and "install accepted" in text


def test_registryreport_json(world: dict[str, Path], browser: Browser, tmp_path: Path) -> None:
    page = tmp_path / "registry.html"
    doc = report_json("--registry", world["registry"], "--out", page)
    text = _load(browser, page, tmp_path)
    assert "audit chain intact" in text and doc["chain"]["head_sha256"] in text
    assert "acme/tiny" in text and "install: installed" in text


def test_a_page_that_loads_something_is_seen(browser: Browser, tmp_path: Path) -> None:
    """The positive control: the proxy socket does receive what a page requests."""
    page = tmp_path / "leak.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://report-test.invalid/pixel.png"></body></html>')
    assert outside_references(page.read_text()) == ["http://report-test.invalid/pixel.png"]
    browser.dom(page)
    assert any("report-test.invalid" in line for line in browser.listener.page_requests())


def test_print_rules_carry_banner_and_digest_and_the_pdf_is_multi_page(world: dict[str, Path], browser: Browser,
                                                                        tmp_path: Path) -> None:
    """The print rules put both in the page margin boxes, which Chromium repeats on every printed page.

    Only the rules and the page count are checked: reading the PDF's text would need a PDF library the project lacks.
    """
    html, pdf = tmp_path / "r.html", tmp_path / "r.pdf"
    r = cli_inproc("report", world["two"], "--out", html, "--pdf", pdf, env={"AIRPACK_CHROMIUM": browser.exe})
    assert r.returncode == 0, r.stderr
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-")
    assert len(re.findall(rb"/Type\s*/Page\b(?!s)", data)) >= 5  # A4 pages, a page break before each section
    page_css = html.read_text()
    assert re.search(r"@top-left \{ content: \"UNVERIFIED — what the bundle claims", page_css)
    assert re.search(r"@bottom-left \{ content: \"manifest sha256 [0-9a-f]{64}\"", page_css)
