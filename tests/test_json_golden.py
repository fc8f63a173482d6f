"""Golden shapes of every command's ``--json`` output: scripts depend on them.

One scenario runs every command with ``--json`` on tiny fixtures (keys, a
policy, two bundles, a tar, a split export, a registry) and records each
document's *shape*: the exact set of keys, recursively, with the JSON type of
each value (``"str"``, ``"int"``, ``"bool"``, ``"float"``, ``"null"``; a list
is the sorted set of its items' shapes). Values that change from run to run
(timestamps, paths, digests, key ids) are not compared; a key that appears,
disappears or changes type is.

The expected shapes are in ``tests/golden/<case>.json`` with the exit code.
After an intended change of an output, regenerate them with
``AIRPACK_GOLDEN_WRITE=1 .venv/bin/python -m pytest tests/test_json_golden.py``
and review the diff: it is the change scripts will see.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import write_spec
from threat_helpers import cli_inproc
from transfer_fixtures import small_model

if TYPE_CHECKING:
    from oci_registry import OciRegistry

pytest_plugins = ["oci_registry"]  # the real-registry fixture, for push and pull (skipped without docker-registry)

GOLDEN = Path(__file__).parent / "golden"
WRITE = os.environ.get("AIRPACK_GOLDEN_WRITE") == "1"
GPU = "H100-80GB"


def shape(v: Any) -> Any:
    """The shape of a JSON value: keys and value types, recursively; a list is the sorted set of its items' shapes."""
    if isinstance(v, dict):
        return {k: shape(x) for k, x in sorted(v.items())}
    if isinstance(v, list):
        items = {json.dumps(s, sort_keys=True): s for s in (shape(x) for x in v)}
        return [items[k] for k in sorted(items)]
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    raise AssertionError(f"not a JSON value: {v!r}")


@dataclass
class World:
    """Each case's (exit code, parsed --json stdout), and where the scenario wrote."""

    root: Path
    docs: dict[str, tuple[int, Any]] = field(default_factory=dict)

    def run(self, case: str | None, *args: str | os.PathLike[str], code: int = 0) -> Any:
        r = cli_inproc(*args, "--json")
        assert r.returncode == code, f"{case or args[0]}: exit {r.returncode}, expected {code}\n{r.stdout}\n{r.stderr}"
        doc = json.loads(r.stdout)
        if case is not None:
            assert case not in self.docs, case
            self.docs[case] = (r.returncode, doc)
        return doc


def _scenario(root: Path) -> World:
    w = World(root)
    keys, pol = root / "keys", root / "policy.json"
    w.run("keygen", "keygen", "alice", "--dir", keys)
    w.run(None, "keygen", "bob", "--dir", keys)
    w.run("trust_init", "trust", "init", pol)
    w.run("trust_add", "trust", "add", pol, keys / "alice.pub", "--name", "alice")
    w.run("trust_list", "trust", "list", pol)
    w.run(None, "trust", "add", pol, keys / "bob.pub", "--name", "bob")
    w.run("trust_set_threshold", "trust", "set-threshold", pol, "1")
    w.run("trust_remove", "trust", "remove", pol, "bob")
    host, nxt, upd = root / "host-policy.json", root / "next-policy.json", root / "next-policy.dsse.json"
    shutil.copyfile(pol, host)
    shutil.copyfile(pol, nxt)
    w.run(None, "trust", "add", nxt, keys / "bob.pub", "--name", "bob", "--expires", "2099-01-01")
    w.run("trust_revoke", "trust", "revoke", nxt, "bob", "--reason", "token lost")
    w.run("trust_sign_update", "trust", "sign-update", nxt, "--key", keys / "alice.key")
    w.run("trust_apply", "trust", "apply", host, upd)
    key = keys / "alice.key"

    model = small_model(root / "src" / "tiny")
    target = f'\n[[targets]]\ngpu = "{GPU}"\ncount = 1\ncontext = 512\nruntime = "vllm"\n'
    spec1 = write_spec(root / "spec1.toml", model_dir=model, sequence=1, extra=target)
    b1 = root / "b1"
    w.run("pack", "pack", spec1, "--out", b1, "--key", key)
    w.run("pack_dry_run", "pack", spec1, "--out", root / "dry", "--dry-run")
    w.run("pack_tar", "pack", spec1, "--out", root / "packed.tar", "--key", key, "--format", "tar")
    w.run("sign", "sign", b1, "--key", keys / "bob.key")
    w.run("verify", "verify", b1, "--trust", pol)
    w.run("inspect", "inspect", b1)

    model2 = root / "src" / "tiny2"
    shutil.copytree(model, model2)
    (model2 / "README.md").write_text("a second revision\n")
    spec2 = write_spec(root / "spec2.toml", model_dir=model2, sequence=2)
    b2 = root / "b2"
    time.sleep(1.05 - time.time() % 1)  # a later second than b1's, as for any real second bundle: the diff's shape holds `created`
    w.run(None, "pack", spec2, "--out", b2, "--key", key)
    w.run("diff", "diff", b1, b2, "--trust", pol)
    w.run("sbom", "sbom", b1, "--trust", pol)
    w.run("sbom_out", "sbom", b1, "--out", root / "sbom.cdx.json", "--trust", pol)

    for d in ("tar", "parts"):
        (root / d).mkdir()
    w.run("export_tar", "export", b1, "--tar", root / "tar" / "b1.tar", "--trust", pol)
    w.run("verify_tar", "verify", root / "tar" / "b1.tar", "--trust", pol)
    parts = root / "parts"
    w.run("export_split", "export", b1, "--tar", parts / "b1.tar", "--split", "4KiB", "--parity", "1", "--key", key, "--trust", pol)
    w.run("verify_parts", "verify", parts, "--parts", "--trust", pol)
    next(p for p in sorted(parts.iterdir()) if ".part" in p.name).unlink()
    w.run("repair", "repair", parts, "--trust", pol)

    reg = root / "registry"
    w.run("install", "install", b1, "--registry", reg, "--trust", pol, "--gpu", GPU)
    w.run("report", "report", b1, "--registry", reg, "--trust", pol, "--out", root / "report.html")
    w.run("diff_registry", "diff", b2, "--registry", reg, "--trust", pol)
    w.run(None, "install", b2, "--registry", reg, "--trust", pol, "--gpu", GPU)
    w.run("list", "list", "--registry", reg)
    w.run("show", "show", "acme/tiny", "--registry", reg)
    w.run("rollback", "rollback", "acme/tiny", "--registry", reg)
    w.run("log_verify", "log", "verify", "--registry", reg)
    w.run("check", "check", "--registry", reg, "--trust", pol)
    w.run("remove", "remove", "acme/tiny", "--registry", reg)
    w.run("report_registry", "report", "--registry", reg, "--out", root / "registry-report.html")

    w.run("fit", "fit", model, "--gpu", GPU, "--context", "512")
    w.run("fit_does_not_fit", "fit", model, "--gpu", "700MiB", "--context", "512", code=5)

    bad = root / "tampered"
    shutil.copytree(b1, bad)
    shard = next(bad.glob("models/*/*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    w.run("error_integrity", "verify", bad, "--trust", pol, code=3)
    w.run("error_usage", "verify", b1, code=2)  # --trust missing: click's usage error
    w.run("error_registry", "show", "acme/nothing", "--registry", reg, code=6)
    w.run("error_trust", "verify", b1, "--trust", _stranger_policy(root), code=4)
    return w


def _stranger_policy(root: Path) -> Path:
    """A policy that trusts only carol, who signed nothing."""
    other = root / "carol-policy.json"
    r = cli_inproc("keygen", "carol", "--dir", root / "keys")
    assert r.returncode == 0, r.stderr
    for args in (("trust", "init", other), ("trust", "add", other, root / "keys" / "carol.pub", "--name", "carol")):
        r = cli_inproc(*args)
        assert r.returncode == 0, r.stderr
    return other


CASES = [
    "keygen", "trust_init", "trust_add", "trust_list", "trust_set_threshold", "trust_remove",
    "trust_revoke", "trust_sign_update", "trust_apply",
    "pack", "pack_dry_run", "pack_tar", "sign", "verify", "inspect",
    "diff", "sbom", "sbom_out", "export_tar", "verify_tar", "export_split", "verify_parts", "repair",
    "install", "report", "report_registry", "diff_registry", "list", "show", "rollback", "log_verify", "check", "remove", "fit", "fit_does_not_fit",
    "error_integrity", "error_usage", "error_registry", "error_trust",
]
OCI_CASES = ["push", "pull"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return _scenario(tmp_path_factory.mktemp("golden"))


def check(case: str, code: int, doc: Any) -> None:
    path = GOLDEN / f"{case}.json"
    got = {"exit_code": code, "shape": shape(doc)}
    if WRITE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
        return
    assert path.exists(), f"no golden shape for {case}: run with AIRPACK_GOLDEN_WRITE=1 to record it, then review it"
    want = json.loads(path.read_text())
    assert got["exit_code"] == want["exit_code"], f"{case}: exit code changed"
    assert got["shape"] == want["shape"], f"{case}: the --json shape changed:\n{_diff(want['shape'], got['shape'])}"


def _diff(want: Any, got: Any, where: str = "$") -> str:
    """The first places where two shapes differ, for the assertion message."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}.{k}: missing" for k in sorted(set(want) - set(got))]
        out += [f"{where}.{k}: new key ({json.dumps(got[k])[:120]})" for k in sorted(set(got) - set(want))]
        out += [_diff(want[k], got[k], f"{where}.{k}") for k in sorted(set(want) & set(got)) if want[k] != got[k]]
        return "\n".join(x for x in out if x)
    if want != got:
        return f"{where}: expected {json.dumps(want)[:200]}, got {json.dumps(got)[:200]}"
    return ""


@pytest.mark.parametrize("case", CASES)
def test_json_shape(world: World, case: str) -> None:
    code, doc = world.docs[case]
    check(case, code, doc)


def test_every_golden_file_is_a_case() -> None:
    files = {p.stem for p in GOLDEN.glob("*.json")}
    assert files <= set(CASES) | set(OCI_CASES), f"golden files without a case: {sorted(files - set(CASES) - set(OCI_CASES))}"


@pytest.mark.parametrize("case", ["error_integrity", "error_usage", "error_registry", "error_trust"])
def test_error_documents_hold_the_contract(world: World, case: str) -> None:
    """DESIGN.md: {"error": {"exit_code": N, "type": "...", "message": "...", "path": ...}} and the same exit code."""
    code, doc = world.docs[case]
    assert set(doc) == {"error"}
    err = doc["error"]
    assert {"exit_code", "type", "message", "path"} <= set(err)
    assert err["exit_code"] == code and isinstance(err["type"], str) and err["message"]


def test_fit_that_does_not_fit_is_the_report_and_the_error(world: World) -> None:
    code, doc = world.docs["fit_does_not_fit"]
    assert code == 5 and doc["error"]["type"] == "FitError" and doc["error"]["exit_code"] == 5
    assert set(doc) - {"error"} == set(world.docs["fit"][1])


def _oci_run(args: Sequence[str | os.PathLike[str]]) -> tuple[int, Any]:
    r = cli_inproc(*args, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return r.returncode, json.loads(r.stdout)


def test_push_and_pull_shapes(oci_registry: OciRegistry, world: World, tmp_path: Path) -> None:
    b1, pol = world.root / "b1", world.root / "policy.json"
    code, doc = _oci_run(["push", b1, oci_registry.ref(), "--trust", pol, *oci_registry.flags])
    check("push", code, doc)
    code, doc = _oci_run(["pull", oci_registry.ref(), "--out", tmp_path / "pulled", "--trust", pol, *oci_registry.flags])
    check("pull", code, doc)
