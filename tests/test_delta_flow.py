"""Delta bundles (``pack --for PROFILE``): carry only what the host lacks, install exactly the full bundle's snapshot.

The round trips: a model update whose weights did not change, and a second
model sharing every blob with the first. A delta's signed manifest still
describes the complete install, so its snapshot must be indistinguishable
from one installed from the full bundle; every file it relies on is hashed
again on the host, and a registry that lacks one (or holds other bytes, or a
link) refuses it with exit 3 and nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import KeyPair, run_cli, verify, write_spec
from registry_fixtures import audit_lines, do_install, registry_state, variant_model
from threat_helpers import resign, statement

from airpack.errors import AirpackError, HostFilesError, RollbackError, SequenceJumpError
from airpack.host_profile import HostProfile
from airpack.manifest import parse
from airpack.ops.pack import PackOptions, pack
from airpack.ops.profile import ProfileOptions, collect, write_profile
from airpack.registry import HUB_DIR, repo_folder
from airpack.spec import load_spec
from airpack.trust import load_policy

TOKENIZER_CONFIG = "tokenizer_config.json"


def snapshot_files(reg: Path, repo_id: str) -> dict[str, tuple[str, bytes]]:
    """Every entry of every snapshot of ``repo_id``: its link target and the bytes it loads."""
    base = reg / HUB_DIR / repo_folder(repo_id) / "snapshots"
    out: dict[str, tuple[str, bytes]] = {}
    for p in sorted(base.rglob("*")):
        if p.is_symlink():
            out[p.relative_to(base).as_posix()] = (os.readlink(p), p.read_bytes())
    return out


@pytest.fixture
def v1(tmp_path: Path, tiny_model: Path, make_bundle: Callable[..., Path], policy: Path) -> Path:
    """A registry holding v1 of acme/tiny (sequence 1)."""
    reg = tmp_path / "reg"
    do_install(make_bundle(), reg, policy, ignore_fit=True)
    return reg


@pytest.fixture
def v2_model(tmp_path: Path, tiny_model: Path) -> Path:
    """v2: the same weights, a changed tokenizer config."""
    cfg = json.loads((tiny_model / TOKENIZER_CONFIG).read_text()) if (tiny_model / TOKENIZER_CONFIG).exists() else {}
    cfg["chat_template"] = "{{ messages }} v2"
    return variant_model(tiny_model, tmp_path / "src" / "tiny-v2", extra={TOKENIZER_CONFIG: json.dumps(cfg).encode()})


def pack_for(tmp_path: Path, model: Path, profile: HostProfile | None, alice: KeyPair, *, sequence: int = 2,
             repo_id: str = "acme/tiny", channel: str = "tiny", out: str = "delta", dry_run: bool = False) -> Any:
    spec = write_spec(tmp_path / f"{out}.toml", model_dir=model, sequence=sequence, repo_id=repo_id, channel=channel)
    return pack(PackOptions(spec=load_spec(spec), out=tmp_path / out, signer=alice.signer, profile=profile, dry_run=dry_run))


def test_update_round_trip_carries_only_the_change_and_installs_the_full_snapshot(
        tmp_path: Path, v1: Path, v2_model: Path, alice: KeyPair, policy: Path) -> None:
    reference = tmp_path / "reference"
    shutil.copytree(v1, reference, symlinks=True)
    profile = collect(ProfileOptions(registry=v1, policy=load_policy(policy)))
    r = pack_for(tmp_path, v2_model, profile, alice)
    m = r.manifest
    assert m.is_delta
    carried = {f.path for f in m.carried}
    assert f"models/acme--tiny/{TOKENIZER_CONFIG}" in carried
    assert not any(p.endswith(".safetensors") for p in carried)  # the weights stay on the host
    assert all(not (r.out / p).exists() for p in m.on_host)
    assert r.delta["on_host"]["files"] == len(m.on_host) and not r.warnings

    vb = verify(r.out, policy)  # the bundle alone: what it carries; it says it is a delta
    assert vb.expected == m.expected_on_host and not vb.host_checked
    res = run_cli("verify", r.out, "--trust", policy, "--registry", v1)
    assert res.returncode == 0, res.stderr
    assert "DELTA" in res.stdout and "hashed in registry" in res.stdout

    full = pack_for(tmp_path, v2_model, None, alice, out="full")
    assert not full.manifest.is_delta
    def model_files(x: Any) -> list[Any]:  # the SBOM records its creation second: the model files are what must agree
        return [f for f in x.files if f.path.startswith("models/")]

    assert model_files(full.manifest) == model_files(m)  # the same complete install is signed
    do_install(full.out, reference, policy, ignore_fit=True)
    got = do_install(r.out, v1, policy, ignore_fit=True)
    assert got.result == "installed"
    assert snapshot_files(v1, "acme/tiny") == snapshot_files(reference, "acme/tiny")
    res = run_cli("check", "--registry", v1)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_second_model_sharing_every_blob_carries_no_weights(tmp_path: Path, v1: Path, tiny_model: Path, alice: KeyPair,
                                                                policy: Path) -> None:
    profile = collect(ProfileOptions(registry=v1))
    r = pack_for(tmp_path, tiny_model, profile, alice, repo_id="acme/other", channel="other", sequence=1)
    assert not [f.path for f in r.manifest.carried if f.path.startswith("models/")]  # every weight and config is on the host
    do_install(r.out, v1, policy, ignore_fit=True)
    mine = {k.split("/", 1)[1]: v[1] for k, v in snapshot_files(v1, "acme/other").items()}
    theirs = {k.split("/", 1)[1]: v[1] for k, v in snapshot_files(v1, "acme/tiny").items()}
    assert mine == theirs


def _refused_cleanly(bundle: Path, reg: Path, policy: Path) -> AirpackError:
    before, lines = registry_state(reg), len(audit_lines(reg))
    with pytest.raises(AirpackError) as e:
        do_install(bundle, reg, policy, ignore_fit=True)
    assert registry_state(reg) == before
    assert len(audit_lines(reg)) == lines + 1
    return e.value


def _weight_blob(reg: Path, m: Any) -> Path:
    f = next(f for f in m.expected_on_host if f.path.endswith(".safetensors"))
    return reg / HUB_DIR / repo_folder("acme/tiny") / "blobs" / f.sha256


@pytest.mark.parametrize("damage", ["missing", "changed", "symlink"])
def test_a_registry_without_intact_host_files_refuses_the_delta(tmp_path: Path, v1: Path, v2_model: Path, alice: KeyPair,
                                                               policy: Path, damage: str) -> None:
    r = pack_for(tmp_path, v2_model, collect(ProfileOptions(registry=v1)), alice)
    blob = _weight_blob(v1, r.manifest)
    if damage == "missing":
        blob.unlink()
    elif damage == "changed":
        data = bytearray(blob.read_bytes())
        data[-1] ^= 1
        blob.chmod(0o644)
        blob.write_bytes(bytes(data))
    else:
        outside = tmp_path / "outside.bin"
        shutil.copyfile(blob, outside)
        blob.unlink()
        blob.symlink_to(outside)
    err = _refused_cleanly(r.out, v1, policy)
    assert isinstance(err, HostFilesError) and err.exit_code == 3
    assert err.path is not None and err.path.endswith(".safetensors")
    res = run_cli("verify", r.out, "--trust", policy, "--registry", v1)
    assert res.returncode == 3, res.stdout


def test_a_delta_into_an_empty_registry_is_exit_3_and_creates_nothing(tmp_path: Path, v1: Path, v2_model: Path,
                                                                      alice: KeyPair, policy: Path) -> None:
    r = pack_for(tmp_path, v2_model, collect(ProfileOptions(registry=v1)), alice)
    fresh = tmp_path / "fresh"
    with pytest.raises(HostFilesError):
        do_install(r.out, fresh, policy, ignore_fit=True)
    assert not (fresh / "hub").exists() and not (fresh / "registry.db").exists()


def test_pack_for_a_host_ahead_of_the_sequence_is_exit_4_before_anything(tmp_path: Path, v1: Path, v2_model: Path,
                                                                       alice: KeyPair) -> None:
    with pytest.raises(RollbackError) as e:
        pack_for(tmp_path, v2_model, collect(ProfileOptions(registry=v1)), alice, sequence=1)
    assert e.value.exit_code == 4
    assert not (tmp_path / "delta").exists()


def test_pack_for_a_channel_the_host_lacks_refuses_a_first_bundle_above_the_jump(tmp_path: Path, v1: Path,
                                                                               v2_model: Path, alice: KeyPair) -> None:
    """The host counts a channel's first bundle from 0 (``rules.classify_sequence``), so pack --for must too."""
    profile = collect(ProfileOptions(registry=v1))
    assert profile.channel_sequence("other") is None
    with pytest.raises(SequenceJumpError) as e:
        pack_for(tmp_path, v2_model, profile, alice, repo_id="acme/other", channel="other", sequence=2_000_000)
    assert e.value.exit_code == 4 and "first bundle" in e.value.message
    assert not (tmp_path / "delta").exists()


def test_pack_for_warns_about_an_untrusted_key_and_lists_in_dry_run(tmp_path: Path, v1: Path, v2_model: Path,
                                                                  make_key: Callable[..., KeyPair], policy: Path) -> None:
    out = tmp_path / "p.json"
    write_profile(ProfileOptions(registry=v1, out=out, policy=load_policy(policy), gpu="24GiB"))
    mallory = make_key("mallory")
    spec = write_spec(tmp_path / "v2.toml", model_dir=v2_model, sequence=2)
    res = run_cli("pack", spec, "--out", tmp_path / "d", "--key", mallory.key, "--for", out, "--json")
    assert res.returncode == 0, res.stderr
    assert "not in the host's trust policy" in res.stderr
    doc = json.loads(res.stdout)
    assert doc["delta"]["on_host"]["files"] >= 1 and doc["targets"][0]["gpu"] == "24GiB"
    res = run_cli("pack", spec, "--out", tmp_path / "dry", "--dry-run", "--for", out, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["delta"]["on_host"]["files"] >= 1 and doc["delta"]["carried"]["files"] >= 1
    assert not (tmp_path / "dry").exists()


def test_manifest_marks_checked_strictly(tmp_path: Path, v1: Path, v2_model: Path, alice: KeyPair, policy: Path) -> None:
    r = pack_for(tmp_path, v2_model, collect(ProfileOptions(registry=v1)), alice)
    st = statement(r.out)
    wheel = dict(st)
    wheel["predicate"] = {**st["predicate"], "on_host": sorted([*st["predicate"]["on_host"], "wheels/x-1-py3-none-any.whl"])}
    with pytest.raises(AirpackError) as e:
        parse(json.dumps(wheel).encode())
    assert e.value.exit_code == 3
    dup = dict(st)
    dup["predicate"] = {**st["predicate"], "on_host": [*st["predicate"]["on_host"], st["predicate"]["on_host"][0]]}
    with pytest.raises(AirpackError) as e:
        parse(json.dumps(dup).encode())
    assert e.value.exit_code == 3
    # a file marked as on the host that the bundle also carries
    f = next(f for f in parse((r.out / "manifest.json").read_bytes()).expected_on_host)
    src = v2_model / f.path.split("/", 2)[2]
    dst = r.out / f.path
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    res = run_cli("verify", r.out, "--trust", policy)
    assert res.returncode == 3 and "also carries" in res.stderr
    dst.unlink()
    resign(r.out, st, alice.signer)


def test_a_delta_exports_to_tar_and_parts_and_installs_from_them(tmp_path: Path, v1: Path, v2_model: Path, alice: KeyPair,
                                                                 policy: Path) -> None:
    r = pack_for(tmp_path, v2_model, collect(ProfileOptions(registry=v1)), alice)
    tar = tmp_path / "delta.tar"
    res = run_cli("export", r.out, "--tar", tar, "--trust", policy)
    assert res.returncode == 0, res.stderr
    parts = tmp_path / "parts"
    parts.mkdir()
    res = run_cli("export", r.out, "--tar", parts / "delta.tar", "--split", "64KiB", "--trust", policy, "--key", alice.key)
    assert res.returncode == 0, res.stderr
    for form in (tar, parts):
        res = run_cli("verify", form, "--trust", policy, "--registry", v1, "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["delta"]["host_checked"] is True
    empty = tmp_path / "empty"
    with pytest.raises(HostFilesError):
        do_install(tar, empty, policy, ignore_fit=True)
    reference = tmp_path / "reference"
    shutil.copytree(v1, reference, symlinks=True)
    do_install(r.out, reference, policy, ignore_fit=True)
    got = do_install(tar, v1, policy, gpu="24GiB")  # the fit check reads the weights' headers from the host's copies
    assert got.result == "installed" and got.fit and got.fit[0]["verdict"] == "fits"
    assert snapshot_files(v1, "acme/tiny") == snapshot_files(reference, "acme/tiny")


def test_pack_for_says_when_the_spec_targets_differ_from_the_host_gpus(tmp_path: Path, v1: Path, v2_model: Path,
                                                                      alice: KeyPair) -> None:
    from airpack.ops._pack_delta import for_host

    profile = collect(ProfileOptions(registry=v1, gpu="H100-80GB:2"))
    spec = load_spec(write_spec(tmp_path / "t.toml", model_dir=v2_model, sequence=2,
                                extra='\n[[targets]]\ngpu = "L4"\ncount = 1\n'))
    adjusted, warnings = for_host(spec, profile, alice.signer.keyid)
    assert adjusted.targets == spec.targets  # the spec's targets win
    assert any("differ from the host's GPUs (H100-80GB:2)" in w for w in warnings)
    assert any("records no trust policy" in w for w in warnings)
    bare = load_spec(write_spec(tmp_path / "b.toml", model_dir=v2_model, sequence=2))
    adjusted, _ = for_host(bare, profile, alice.signer.keyid)
    assert [(t.gpu, t.count) for t in adjusted.targets] == [("H100-80GB", 2)]
