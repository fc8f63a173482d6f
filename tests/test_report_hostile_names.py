"""Threat: a bundle's names and texts are attacker-controlled; the report must show them as text, never as markup.

File names, licences and model config fields carry script tags, HTML
entities, a right-to-left override and 10,000-character texts. The HTML must
hold no element or attribute they made (no script, no handler, no URL), show
each one escaped and in full, and make direction-changing characters visible
so a name cannot disguise itself (``report<U+202E>fdp.json``). In a real
browser the DOM must hold them as text nodes only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import KeyPair
from report_helpers import Browser, outside_references, script_count
from threat_helpers import assert_cli_error, cli_inproc, rename_in_statement, resign, statement

from airpack.ops.pack import PackOptions, pack
from airpack.spec import load_spec

SCRIPT_NAME = "<script>alert(1)</script>.json"
ENTITY_NAME = "a&amp;b&lt;i&gt;.json"
RTL_NAME = "report\u202efdp.json"
LONG_DIR = "d" * 240
LONG_NAME = "/".join([LONG_DIR] * 3) + "/" + "n" * 200 + ".json"  # near the 1024-byte path limit
LICENCE = "<script>alert(2)</script> &amp; &#x3C;b&#x3E; \u202e" + "L" * 10_000
ARCH = "<img src=x onerror=alert(3)>"


@pytest.fixture
def hostile(tmp_path: Path, tiny_model: Path, alice: KeyPair) -> Path:
    model = tmp_path / "hostile-model"
    shutil.copytree(tiny_model, model)
    for name in (SCRIPT_NAME, ENTITY_NAME, RTL_NAME, LONG_NAME):
        p = model.joinpath(*name.split("/"))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{}\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = [ARCH]
    (model / "config.json").write_text(json.dumps(cfg))
    spec = tmp_path / "hostile.toml"
    spec.write_text(
        '[bundle]\nname = "hostile"\nchannel = "hostile"\nsequence = 1\n\n'
        f'[[models]]\nrepo_id = "acme/hostile"\npath = "hostile-model"\nlicense = {json.dumps(LICENCE)}\n'
        '\n[[targets]]\ngpu = "L4"\ncount = 1\ncontext = 512\nruntime = "vllm"\n'
    )
    out = tmp_path / "hostile-bundle"
    pack(PackOptions(spec=load_spec(spec), out=out, signer=alice.signer))
    return out


def _render(bundle: Path, policy: Path | None, out: Path) -> str:
    args: list[str | Path] = ["report", bundle, "--out", out]
    if policy is not None:
        args += ["--trust", policy]
    r = cli_inproc(*args)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return out.read_text(encoding="utf-8")


@pytest.mark.parametrize("verified", [True, False])
def test_hostile_names_and_licences_render_as_text(hostile: Path, policy: Path, tmp_path: Path, verified: bool) -> None:
    html = _render(hostile, policy if verified else None, tmp_path / "r.html")
    scripts, handlers = script_count(html)
    assert scripts == 0 and handlers == []
    assert outside_references(html) == []
    assert "<script" not in html.lower() and "<img" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.json" in html
    assert "a&amp;amp;b&amp;lt;i&amp;gt;.json" in html  # entities shown as typed, not decoded
    assert "&lt;img src=x onerror=alert(3)&gt;" in html
    assert "\u202e" not in html  # the override cannot reorder what follows it...
    assert "report&lt;U+202E&gt;fdp.json" in html  # ...and shows where it was
    assert "L" * 10_000 in html  # the long licence in full
    assert LONG_NAME in html


def test_hostile_facts_stay_exact_in_the_json(hostile: Path, policy: Path) -> None:
    r = cli_inproc("report", hostile, "--trust", policy, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    paths = {f["path"] for f in doc["files"]["files"]}
    assert {f"models/acme--hostile/{n}" for n in (SCRIPT_NAME, ENTITY_NAME, RTL_NAME, LONG_NAME)} <= paths
    assert doc["models"][0]["license"] == LICENCE


def test_a_path_beyond_the_manifest_limits_is_refused_not_rendered(hostile: Path, alice: KeyPair, tmp_path: Path) -> None:
    st = statement(hostile)
    rename_in_statement(st, f"models/acme--hostile/{SCRIPT_NAME}", "models/acme--hostile/" + "z" * 10_000 + ".json")
    resign(hostile, st, alice.signer)
    out = tmp_path / "r.html"
    assert_cli_error(cli_inproc("report", hostile, "--out", out), 3)
    assert not out.exists()


def test_hostile_names_are_text_nodes_in_a_real_browser(hostile: Path, policy: Path, tmp_path: Path, browser: Browser) -> None:
    page = tmp_path / "r.html"
    _render(hostile, policy, page)
    dom = browser.dom(page, tmp_path / "hostile.png")
    assert "<script" not in dom.lower() and "<img" not in dom.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.json" in dom
    assert "report&lt;U+202E&gt;fdp.json" in dom
    assert browser.listener.page_requests() == []



def test_targets_and_records_of_any_shape_render_without_a_crash(bundle: Path, policy: Path, alice: KeyPair,
                                                                 tmp_path: Path) -> None:
    """The manifest signs targets and model records as free objects: a report of any of them is a report, never exit 1."""
    st = statement(bundle)
    st["predicate"]["targets"] = [
        {}, {"gpu": 5, "count": "two"}, {"gpu": "L4", "count": 10**9},
        {"gpu": "L4", "context": -3, "estimate": {"verdict": "<b>fits</b>", "breakdown": "none", "per_gpu_bytes": True}},
        {"gpu": "no-such-gpu", "estimates": [7, {"model": "acme/tiny", "verdict": None, "breakdown": {"weights": "x", "kv_cache": 1}}]},
        {"gpu": "L4", "runtime": "<script>", "batch": 0},
    ]
    model = st["predicate"]["models"][0]
    model.update(parameters="many", dtypes=["F16"], config={"architectures": "not a list", "text_config": 3},
                 hub_files={"config.json": "x"}, source="hub")
    resign(bundle, st, alice.signer)
    for extra in ([], ["--trust", policy]):
        out = tmp_path / f"r{len(extra)}.html"
        r = cli_inproc("report", bundle, "--out", out, *extra)
        assert r.returncode == 0, r.stderr
        html = out.read_text()
        assert "&lt;b&gt;fits&lt;/b&gt;" in html and "<script" not in html.lower()
        doc = json.loads(cli_inproc("report", bundle, "--json", *extra).stdout)
        assert len(doc["fit"]) == 6 and all(set(f["target"]) == {"gpu", "count", "runtime", "context", "batch"} for f in doc["fit"])
