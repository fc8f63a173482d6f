"""``airpack diff``: what changed between two bundles, and what installing one would change in a registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import KeyPair, run_cli, write_spec
from factories import make_model
from transfer_fixtures import export_to

from airpack.ops.audit import DiffOptions, diff
from airpack.ops.pack import PackOptions, pack
from airpack.spec import load_spec
from airpack.trust import load_policy


def two_versions(tmp_path: Path, make_bundle, bob: KeyPair) -> tuple[Path, Path]:
    """Sequence 1, then sequence 2 with a retrained shard, a new file, a removed file, a new licence and another signer."""
    v1 = make_model(tmp_path / "v1", shards=2)
    v2 = tmp_path / "v2"
    shutil.copytree(v1, v2)
    make_model(tmp_path / "retrained", shards=2, seed=5)
    shutil.copyfile(tmp_path / "retrained" / "model-00002-of-00002.safetensors", v2 / "model-00002-of-00002.safetensors")
    (v2 / "README.md").write_text("# tiny v2\n")
    (v2 / "generation_config.json").unlink()
    old = make_bundle(model_dir=v1, sequence=1)
    new = make_bundle(model_dir=v2, sequence=2, signer=bob, extra='[[targets]]\ngpu = "L4"\ncount = 1\ncontext = 2048\n')
    return old, new


def test_diff_reports_models_files_signers_and_flags_unverified(tmp_path: Path, make_bundle, bob: KeyPair) -> None:
    old, new = two_versions(tmp_path, make_bundle, bob)
    r = run_cli("diff", old, new, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["old"]["verified"] is False and any("unverified" in f for f in d["flags"])
    assert d["bundle"]["sequence"] == {"old": 1, "new": 2}
    files = d["files"]
    assert [x["path"] for x in files["added"]] == ["models/acme--tiny/README.md"]
    assert [x["path"] for x in files["removed"]] == ["models/acme--tiny/generation_config.json"]
    changed = {x["path"] for x in files["changed"]}
    assert "models/acme--tiny/model-00002-of-00002.safetensors" in changed
    assert "models/acme--tiny/model-00001-of-00002.safetensors" not in changed
    [m] = d["models"]["changed"]
    assert m["repo_id"] == "acme/tiny" and "commit" in m["changes"]
    assert d["signers"]["added"] and d["signers"]["removed"]  # claimed key ids differ
    assert len(d["targets"]["added"]) == 1
    text = run_cli("diff", old, new)
    assert text.returncode == 0 and "UNVERIFIED" in text.stderr and "+ models/acme--tiny/README.md" in text.stdout


def test_diff_with_trust_names_the_signers(tmp_path: Path, make_bundle, bob: KeyPair, make_policy, alice: KeyPair) -> None:
    old, new = two_versions(tmp_path, make_bundle, bob)
    pol = make_policy(alice, bob, name="both.json")
    d = diff(DiffOptions(old=old, new=new, policy=load_policy(pol)))
    assert d.old.verified and d.new.verified
    assert d.signers == {"old": ["alice"], "new": ["bob"], "added": ["bob"], "removed": ["alice"]}
    assert not any("unverified" in f for f in d.flags)
    assert run_cli("diff", old, new, "--trust", make_policy(alice, name="alice-only.json")).returncode == 4


def test_licence_and_policy_changes_are_flagged(tmp_path: Path, make_bundle, tiny_model: Path, alice: KeyPair) -> None:
    a = make_bundle(sequence=1)
    spec = write_spec(tmp_path / "mit.toml", model_dir=tiny_model, sequence=2)
    spec.write_text(spec.read_text().replace('license = "apache-2.0"', 'license = "mit"')
                    + "[policy]\nallow_code = true\n")
    pack(PackOptions(spec=load_spec(spec), out=tmp_path / "mit", signer=alice.signer))
    d = diff(DiffOptions(old=a, new=tmp_path / "mit"))
    assert d.licenses == ({"repo_id": "acme/tiny", "old": "apache-2.0", "new": "mit"},)
    assert d.policy == {"allow_code": {"old": False, "new": True}}
    assert any("licence changed" in f for f in d.flags) and any("content policy changed" in f for f in d.flags)
    # Going back in sequence is flagged as what install would refuse.
    d2 = diff(DiffOptions(old=tmp_path / "mit", new=a))
    assert any("rollback" in f for f in d2.flags)


def test_same_bundle_in_two_forms_is_identical(tmp_path: Path, bundle: Path, policy: Path) -> None:
    tar = export_to(bundle, tmp_path / "b.tar", policy).tar
    d = diff(DiffOptions(old=bundle, new=tar, policy=load_policy(policy)))
    assert d.identical is True and d.files["changed"] == [] and d.files["unchanged"] > 0
    assert "identical" in run_cli("diff", bundle, tar).stdout


def test_diff_against_a_registry_says_what_install_would_change(tmp_path: Path, make_bundle, bob: KeyPair,
                                                                make_policy, alice: KeyPair) -> None:
    old, new = two_versions(tmp_path, make_bundle, bob)
    pol = make_policy(alice, bob, name="both.json")
    reg = tmp_path / "reg"
    assert run_cli("install", old, "--registry", reg, "--trust", pol).returncode == 0
    before = sorted(p.relative_to(reg) for p in reg.rglob("*"))
    audit = (reg / "audit.log").read_bytes()
    r = run_cli("diff", new, "--registry", reg, "--trust", pol, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    [m] = d["models"]
    assert m["action"] == "update" and m["installed_sequence"] == 1
    assert [x["path"] for x in m["files"]["added"]] == ["README.md"]
    assert [x["path"] for x in m["files"]["removed"]] == ["generation_config.json"]
    assert [x["path"] for x in m["files"]["changed"]] == ["model-00002-of-00002.safetensors"]
    assert 0 < m["bytes_to_copy"] < sum(x["new_size"] for x in m["files"]["changed"]) + 10_000
    r = run_cli("diff", old, "--registry", reg, "--json")
    d = json.loads(r.stdout)
    assert d["models"][0]["action"] == "unchanged" and any("already installed" in f for f in d["flags"])
    assert sorted(p.relative_to(reg) for p in reg.rglob("*") if "-wal" not in p.name and "-shm" not in p.name) == \
        [p for p in before if "-wal" not in p.name and "-shm" not in p.name]  # read-only (SQLite may open its WAL)
    assert (reg / "audit.log").read_bytes() == audit


def test_the_same_bundle_twice_is_no_rollback(bundle: Path) -> None:
    """``diff B B``: installing B over B changes nothing, so nothing is flagged as a rollback."""
    d = diff(DiffOptions(old=bundle, new=bundle))
    assert d.identical is True
    assert not any("rollback" in f for f in d.flags), d.flags


def test_same_sequence_with_other_content_is_flagged(tmp_path: Path, make_bundle, tiny_model: Path) -> None:
    from factories import make_model

    a = make_bundle(sequence=3)
    b = make_bundle(sequence=3, model_dir=make_model(tmp_path / "other", seed=9))
    d = diff(DiffOptions(old=a, new=b))
    assert any("other content" in f and "rollback" in f for f in d.flags), d.flags
