"""`airpack fit` on a bundle as it travels (one tar, or a folder of parts): verified while streamed, never extracted."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import KeyPair, run_cli

from airpack.ops.export import ExportOptions, export
from airpack.trust import load_policy


def _fit(*args: object) -> tuple[int, dict]:
    r = run_cli("fit", *args, "--gpu", "L4", "--context", "1024", "--json")
    return r.returncode, json.loads(r.stdout)


def test_tar_and_parts_give_the_same_estimate_as_the_folder(tmp_path: Path, bundle: Path, policy: Path, alice: KeyPair) -> None:
    tar = tmp_path / "one" / "b.tar"
    tar.parent.mkdir()
    export(ExportOptions(bundle=bundle, tar=tar, policy=load_policy(policy)))
    parts = tmp_path / "parts"
    parts.mkdir()
    export(ExportOptions(bundle=bundle, tar=parts / "b.tar", policy=load_policy(policy), split=64 * 1024, parity=1,
                         signer=alice.signer))
    rc, folder = _fit(bundle)
    assert rc == 0
    for source in (tar, parts):
        rc, doc = _fit(source, "--trust", policy)
        assert rc == 0, doc
        assert doc["per_gpu_bytes"] == folder["per_gpu_bytes"]
        assert doc["breakdown"] == folder["breakdown"]


def test_tar_needs_a_trust_policy(tmp_path: Path, bundle: Path, policy: Path) -> None:
    tar = tmp_path / "b.tar"
    export(ExportOptions(bundle=bundle, tar=tar, policy=load_policy(policy)))
    r = run_cli("fit", tar, "--gpu", "L4", "--json")
    assert r.returncode == 2
    assert "--trust" in json.loads(r.stdout)["error"]["message"]


def test_tampered_tar_is_refused_before_any_estimate(tmp_path: Path, bundle: Path, policy: Path) -> None:
    tar = tmp_path / "b.tar"
    export(ExportOptions(bundle=bundle, tar=tar, policy=load_policy(policy)))
    data = bytearray(tar.read_bytes())
    at = data.find(b'"num_hidden_layers": 2')
    assert at > 0
    data[at + len('"num_hidden_layers": ')] = ord("9")  # a config that would change the estimate
    tar.write_bytes(bytes(data))
    r = run_cli("fit", tar, "--gpu", "L4", "--trust", policy, "--json")
    assert r.returncode == 3, r.stdout
    assert "per_gpu_bytes" not in json.loads(r.stdout)
