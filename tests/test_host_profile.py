"""The offline host's profile: what it holds, written read-only, deterministic, and parsed strictly.

The profile leaves the isolated network, so it must hold exactly the facts
docs/profile.md lists and nothing private, and a profile that is not the
document airpack writes is refused with exit 2 before anything uses it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeyPair, run_cli
from registry_fixtures import do_install, registry_state

from airpack.errors import ProfileError
from airpack.host_profile import MAX_PROFILE_BYTES, PROFILE_TYPE, load_profile, parse_profile
from airpack.ops.profile import ProfileOptions, collect, write_profile
from airpack.trust import load_policy


@pytest.fixture
def installed(tmp_path: Path, bundle: Path, policy: Path) -> Path:
    reg = tmp_path / "reg"
    do_install(bundle, reg, policy, ignore_fit=True)
    return reg


def test_profile_lists_what_the_registry_holds_and_nothing_private(installed: Path, tmp_path: Path, policy: Path,
                                                                    alice: KeyPair) -> None:
    before = registry_state(installed)
    out = tmp_path / "host.json"
    p = write_profile(ProfileOptions(registry=installed, out=out, gpu="H100-80GB:2", policy=load_policy(policy)))
    assert registry_state(installed) == before  # read-only: not even an audit line
    doc = json.loads(out.read_bytes())
    assert doc["_type"] == PROFILE_TYPE
    assert doc["name"] is None
    assert doc["gpus"] == [{"gpu": "H100-80GB", "count": 2, "memory_bytes": p.gpus[0].memory_bytes}]
    assert doc["python"]["tags"] and doc["python"]["implementation"]
    (model,) = doc["models"]
    assert model["repo_id"] == "acme/tiny" and len(model["commit"]) == 40
    assert {f["sha256"] for f in model["files"]} == {b["sha256"] for b in doc["blobs"]}
    assert doc["channels"] == [{"channel": "tiny", "sequence": 1}]
    assert doc["trust"]["threshold"] == 1
    assert doc["trust"]["keys"] == [{"keyid": alice.signer.keyid, "name": "alice"}]
    text = out.read_text()
    assert str(tmp_path) not in text and "/" + installed.name not in text  # no absolute paths
    assert load_profile(out) == p


def test_profile_is_deterministic_and_gpus_may_be_none(installed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("airpack.ops.profile.try_detect", lambda: None)
    a = collect(ProfileOptions(registry=installed, name="lab-7"))
    b = collect(ProfileOptions(registry=installed, name="lab-7"))
    assert a.encode() == b.encode()
    assert a.gpus == () and a.name == "lab-7" and a.trust is None
    assert parse_profile(a.encode()) == a


def test_profile_cli_writes_and_shows(installed: Path, tmp_path: Path, policy: Path) -> None:
    out = tmp_path / "p.json"
    r = run_cli("profile", "--registry", installed, "--out", out, "--gpu", "24GiB:1", "--trust", policy, "--name", "lab")
    assert r.returncode == 0, r.stderr
    r = run_cli("profile", "--show", out)
    assert r.returncode == 0, r.stderr
    assert "acme/tiny" in r.stdout and "tiny at 1" in r.stdout and "alice" in r.stdout and "24GiB" in r.stdout
    r = run_cli("profile", "--show", out, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["_type"] == PROFILE_TYPE
    r = run_cli("profile", "--out", out)
    assert r.returncode == 2


def _doc(installed: Path) -> dict[str, object]:
    return json.loads(collect(ProfileOptions(registry=installed, gpu="H100-80GB")).encode())


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.update(_type="https://airpack.dev/host-profile/v2"), "_type"),
    (lambda d: d.update(extra=1), "unknown field"),
    (lambda d: d.pop("blobs"), "missing field"),
    (lambda d: d.update(gpus=[{"gpu": "Quantum-9000", "count": 1, "memory_bytes": 1}]), "unknown GPU"),
    (lambda d: d.update(channels=[{"channel": "c", "sequence": -1}]), "sequence"),
    (lambda d: d["blobs"].append(dict(d["blobs"][0])), "twice"),  # type: ignore[index,attr-defined]
])
def test_a_profile_that_is_not_ours_is_exit_2(installed: Path, mutate: Callable[[dict[str, object]], object],
                                              words: str) -> None:
    d = _doc(installed)
    mutate(d)
    with pytest.raises(ProfileError, match=words) as e:
        parse_profile(json.dumps(d).encode())
    assert e.value.exit_code == 2


def test_not_json_duplicate_keys_and_oversize_are_exit_2(tmp_path: Path, installed: Path) -> None:
    for data in (b"not json", b'{"_type": "a", "_type": "b"}', b" " * (MAX_PROFILE_BYTES + 1)):
        p = tmp_path / "bad.json"
        p.write_bytes(data)
        r = run_cli("profile", "--show", p, "--json")
        assert r.returncode == 2, r.stdout
        assert json.loads(r.stdout)["error"]["exit_code"] == 2
