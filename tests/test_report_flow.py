"""``airpack report``: the review document, from the facts verify, diff, sbom, fit and the audit log already decide.

Each flow runs the real command line and reads its ``--json`` facts (the
document the HTML renders): a verified bundle in every form, an unverified
one, a diff against an older bundle and against what a registry has
installed, the registry itself, and every refusal the issue names.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeyPair
from registry_fixtures import audit_lines, do_install
from report_helpers import TARGET, report_json
from threat_helpers import assert_cli_error, assert_cli_json_error, cli_inproc, flip_byte
from transfer_fixtures import export_to

from airpack.ops.pack import add_signature
from airpack.trust import load_policy

TIGHT = '\n[[targets]]\ngpu = "600MiB"\ncount = 1\ncontext = 2048\nruntime = "transformers"\n'


@pytest.fixture
def cosigned(make_bundle: Callable[..., Path], bob: KeyPair) -> Path:
    b = make_bundle(extra=TARGET + TIGHT)
    add_signature(b, bob.signer)
    return b


@pytest.fixture
def two_of_two(make_policy: Callable[..., Path], alice: KeyPair, bob: KeyPair) -> Path:
    return make_policy(alice, bob, threshold=2, name="two.json")


def test_verified_report_names_the_signers_threshold_host_and_digest(cosigned: Path, two_of_two: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    doc = report_json(cosigned, "--trust", two_of_two, "--out", out)
    v, ident = doc["verification"], doc["identity"]
    assert v["verified"] is True and v["threshold"] == 2 and v["form"] == "folder"
    assert [s["name"] for s in v["signers"]] == ["alice", "bob"]
    assert v["host"] and v["checked_at"].endswith("Z")
    digest = ident["manifest_sha256"]
    assert len(digest) == 64
    html = out.read_text()
    assert digest in html and "alice" in html and "bob" in html
    assert "UNVERIFIED" not in html
    assert doc["written"]["html"] == str(out)
    # Every section's facts are there, from the signed manifest.
    assert doc["models"][0]["repo_id"] == "acme/tiny" and doc["models"][0]["license"] == "apache-2.0"
    assert doc["models"][0]["parameters"] > 0 and doc["models"][0]["dtypes"]
    assert {f["path"] for f in doc["files"]["files"]} >= {"models/acme--tiny/config.json", "sbom.cdx.json"}
    assert doc["sbom"]["carried_matches"] is True
    assert doc["policy"] == {"allow_pickle": False, "allow_code": False, "pickles": [], "code": []}


def test_fit_pictures_come_from_the_verified_headers_for_each_target(cosigned: Path, two_of_two: Path, tmp_path: Path) -> None:
    doc = report_json(cosigned, "--trust", two_of_two, "--out", tmp_path / "r.html")
    fits = {f["target"]["gpu"]: f for f in doc["fit"]}
    assert set(fits) == {"L4", "600MiB"}
    l4 = fits["L4"]
    assert l4["basis"] == "verified" and l4["verdict"] == "fits"
    assert set(l4["breakdown"]) == {"weights", "kv_cache", "activations", "overhead"}
    assert sum(l4["breakdown"].values()) == l4["per_gpu_bytes"] <= l4["limit_bytes"]
    curve = l4["curve"]
    assert len(curve) >= 10 and curve == sorted(curve, key=lambda p: p["context"])
    assert [p["per_gpu_bytes"] for p in curve] == sorted(p["per_gpu_bytes"] for p in curve)  # more context never needs less
    assert any(p["context"] == 1024 for p in curve)  # the target's own context is a point of the curve
    small = fits["600MiB"]
    assert small["verdict"] == "does_not_fit" and small["per_gpu_bytes"] > small["limit_bytes"]
    assert small["recorded"]["verdict"] == "does_not_fit"  # what pack recorded agrees with the estimate now
    html = (tmp_path / "r.html").read_text()
    assert "longest context that fits" in html and "does not fit" in html and "<polyline" in html


def test_every_form_gives_the_same_facts(cosigned: Path, two_of_two: Path, tmp_path: Path, alice: KeyPair) -> None:
    tar = tmp_path / "media" / "b.tar"
    export_to(cosigned, tar, two_of_two)
    parts = tmp_path / "parts" / "b.tar"
    export_to(cosigned, parts, two_of_two, signer=alice.signer, split=16 << 10, parity=1)
    docs = {form: report_json(src, "--trust", two_of_two, "--out", tmp_path / f"{form}.html")
            for form, src in (("folder", cosigned), ("tar", tar), ("parts", parts.parent))}
    for form, doc in docs.items():
        assert doc["verification"]["form"] == form
    same = ("identity", "models", "files", "wheels", "sbom", "policy", "fit")
    for key in same:
        assert docs["tar"][key] == docs["folder"][key] == docs["parts"][key], key


def test_unverified_report_carries_the_banner_and_claimed_key_ids(cosigned: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    r = cli_inproc("report", cosigned, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "UNVERIFIED" in r.stderr
    html = out.read_text()
    assert html.count("UNVERIFIED — what the bundle claims") >= 2  # the screen banner and every printed page's margin box
    assert "@top-left" in html
    doc = report_json(cosigned, "--out", tmp_path / "r2.html")
    v = doc["verification"]
    assert v["verified"] is False and v["threshold"] is None
    assert all(s["name"] is None and len(s["keyid"]) == 64 for s in v["signers"]) and len(v["signers"]) == 2
    assert {f["basis"] for f in doc["fit"]} == {"unverified-files"}


def test_unverified_tar_shows_the_fit_recorded_at_pack_time(cosigned: Path, two_of_two: Path, tmp_path: Path) -> None:
    tar = tmp_path / "b.tar"
    export_to(cosigned, tar, two_of_two)
    doc = report_json(tar, "--out", tmp_path / "r.html")
    assert doc["verification"]["form"] == "tar"
    assert {f["basis"] for f in doc["fit"]} == {"recorded"}
    assert {f["verdict"] for f in doc["fit"]} == {"fits", "does_not_fit"}


def test_against_an_older_bundle_lists_changes_and_the_sequence_verdict(make_bundle: Callable[..., Path], tiny_model: Path,
                                                                        policy: Path, tmp_path: Path) -> None:
    old = make_bundle(sequence=1)
    (tiny_model / "README.md").write_text("second revision\n")
    new = make_bundle(sequence=2)
    doc = report_json(new, "--trust", policy, "--against", old, "--out", tmp_path / "r.html")
    c = doc["comparison"]
    assert c["kind"] == "bundle" and c["sequence"]["accepted"] is True and c["sequence"]["verdict"] == "newer"
    assert [x["path"] for x in c["files"]["added"]] == ["models/acme--tiny/README.md"]
    assert [x["path"] for x in c["files"]["changed"]] == ["sbom.cdx.json"]
    back = report_json(old, "--trust", policy, "--against", new, "--out", tmp_path / "back.html")
    assert back["comparison"]["sequence"]["accepted"] is False and back["comparison"]["sequence"]["verdict"] == "older"
    assert "install refused" in (tmp_path / "back.html").read_text()


def test_against_the_registry_shows_what_install_would_do(make_bundle: Callable[..., Path], tiny_model: Path, policy: Path,
                                                          tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    first = make_bundle(sequence=1)
    do_install(first, reg, policy)
    (tiny_model / "extra.json").write_text("{}\n")
    second = make_bundle(sequence=2)
    doc = report_json(second, "--trust", policy, "--registry", reg, "--out", tmp_path / "r.html")
    c = doc["comparison"]
    assert c["kind"] == "registry" and c["sequence"]["accepted"] is True
    assert c["sequence"]["against_sequence"] == 1
    assert [x["path"] for x in c["files"]["added"]] == ["acme/tiny: extra.json"]
    same = report_json(first, "--trust", policy, "--registry", reg, "--out", tmp_path / "same.html")
    assert same["comparison"]["sequence"]["verdict"] == "same"


def test_registry_report_shows_installs_refusals_rollbacks_and_the_chain(make_bundle: Callable[..., Path], tiny_model: Path,
                                                                         policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    one = make_bundle(sequence=1)
    do_install(one, reg, policy)
    (tiny_model / "README.md").write_text("two\n")
    two = make_bundle(sequence=2)
    do_install(two, reg, policy)
    r = cli_inproc("install", one, "--registry", reg, "--trust", policy)  # a rollback: refused, and logged
    assert r.returncode == 4, r.stderr
    assert cli_inproc("rollback", "acme/tiny", "--registry", reg).returncode == 0
    out = tmp_path / "reg.html"
    doc = report_json("--registry", reg, "--out", out)
    assert doc["kind"] == "registry" and doc["chain"]["ok"] is True and doc["chain"]["lines"] == len(audit_lines(reg))
    kinds = [e["kind"] for e in doc["timeline"]]
    assert kinds == ["install", "install", "refusal", "rollback"]
    refusal = doc["timeline"][2]
    assert refusal["error"] and "rollback" in refusal["error"].lower()
    assert [c["channel"] for c in doc["channels"]] == ["tiny"] and doc["channels"][0]["sequence"] == 2
    assert sum(1 for m in doc["models"] if m["current"]) == 1
    html = out.read_text()
    assert "audit chain intact" in html and doc["chain"]["head_sha256"] in html


def test_a_broken_audit_chain_is_reported_not_hidden(bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    do_install(bundle, reg, policy)
    log = reg / "audit.log"
    lines = log.read_text().splitlines(keepends=True)
    rec = json.loads(lines[0])
    rec["user"] = "mallory"
    log.write_text(json.dumps(rec, separators=(",", ":"), sort_keys=True) + "\n" + "".join(lines[1:]))
    out = tmp_path / "reg.html"
    doc = report_json("--registry", reg, "--out", out)
    assert doc["chain"]["ok"] is False and doc["chain"]["broken_line"] == 1 and "edited" in doc["chain"]["error"]
    assert "BROKEN" in out.read_text()


# -- refusals -----------------------------------------------------------------------------------


def test_a_bad_bundle_with_trust_gets_verifys_error_and_no_report(bundle: Path, policy: Path, tmp_path: Path) -> None:
    flip_byte(next(bundle.glob("models/*/*.safetensors")))
    out = tmp_path / "r.html"
    assert_cli_error(cli_inproc("report", bundle, "--trust", policy, "--out", out), 3)
    assert not out.exists()
    assert_cli_json_error(cli_inproc("report", bundle, "--trust", policy, "--out", out, "--json"), 3)


def test_an_untrusted_signer_is_exit_4_and_no_report(bundle: Path, make_policy: Callable[..., Path], bob: KeyPair,
                                                     tmp_path: Path) -> None:
    other = make_policy(bob, name="bob-only.json")
    out = tmp_path / "r.html"
    assert_cli_error(cli_inproc("report", bundle, "--trust", other, "--out", out), 4)
    assert not out.exists()


def test_an_existing_output_is_exit_2_unless_force(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    out.write_text("keep me")
    assert_cli_error(cli_inproc("report", bundle, "--out", out), 2, "already exists", "--force")
    assert out.read_text() == "keep me"
    r = cli_inproc("report", bundle, "--out", out, "--force")
    assert r.returncode == 0, r.stderr
    assert "<!DOCTYPE html>" in out.read_text()


@pytest.mark.parametrize("where", ["missing-folder", "is-a-folder", "read-only"])
def test_an_output_that_cannot_be_written_is_exit_2(bundle: Path, tmp_path: Path, where: str) -> None:
    if where == "missing-folder":
        out = tmp_path / "nowhere" / "r.html"
    elif where == "is-a-folder":
        out = tmp_path / "dir.html"
        out.mkdir()
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "r.html"
        import os

        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
    assert_cli_error(cli_inproc("report", bundle, "--out", out, "--force"), 2)


def test_pdf_without_a_browser_is_exit_2_and_the_html_is_written(bundle: Path, tmp_path: Path) -> None:
    out, pdf = tmp_path / "r.html", tmp_path / "r.pdf"
    r = cli_inproc("report", bundle, "--out", out, "--pdf", pdf, env={"AIRPACK_CHROMIUM": str(tmp_path / "no-such-browser")})
    line = assert_cli_error(r, 2, "no PDF", "AIRPACK_CHROMIUM names")
    assert str(out) in line
    assert out.is_file() and not pdf.exists()
    out.unlink()
    r = cli_inproc("report", bundle, "--out", out, "--pdf", pdf, env={"PATH": str(tmp_path), "AIRPACK_CHROMIUM": ""})
    assert_cli_error(r, 2, "no PDF", "no Chromium found")
    assert out.is_file() and not pdf.exists()


def test_usage_errors(bundle: Path, tmp_path: Path) -> None:
    assert_cli_error(cli_inproc("report"), 2)
    assert_cli_error(cli_inproc("report", bundle), 2, "--out")
    assert_cli_error(cli_inproc("report", "--registry", tmp_path / "r", "--against", bundle, "--out", tmp_path / "x.html"), 2)
    assert_cli_error(cli_inproc("report", tmp_path / "not-there", "--out", tmp_path / "x.html"), 2)


def test_json_alone_prints_the_facts_and_writes_nothing(bundle: Path, policy: Path, tmp_path: Path) -> None:
    doc = report_json(bundle, "--trust", policy)
    assert doc["verification"]["verified"] is True and doc["written"] == {"html": None, "pdf": None}
    assert list(tmp_path.glob("*.html")) == []
    assert load_policy(policy).threshold == doc["verification"]["threshold"]
