"""The operator's flow on the isolated host: install, list, show, reinstall, upgrade, roll back, remove."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeyPair, run_cli
from registry_fixtures import audit_lines, do_install, registry_state, variant_model

from airpack.ops.manage import RemoveOptions, RollbackOptions, ShowOptions, list_installed, remove, rollback, show
from airpack.registry import repo_folder


@pytest.fixture
def reg(tmp_path: Path) -> Path:
    return tmp_path / "registry"


def _ref(reg: Path, repo: str = "acme/tiny", ref: str = "main") -> str:
    return (reg / "hub" / repo_folder(repo) / "refs" / ref).read_text()


def test_install_lays_out_the_hub_cache(bundle: Path, policy: Path, reg: Path, tiny_model: Path) -> None:
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["result"] == "installed"
    commit = doc["models"][0]["commit"]
    repo = reg / "hub" / "models--acme--tiny"
    assert (repo / "refs" / "main").read_text() == commit  # no newline: huggingface_hub reads it verbatim
    snap = repo / "snapshots" / commit
    names = sorted(p.name for p in tiny_model.iterdir())
    assert sorted(p.name for p in snap.iterdir()) == names
    for name in names:
        link = snap / name
        assert link.is_symlink()
        target = os.readlink(link)
        assert not os.path.isabs(target) and target.startswith("../../blobs/")
        assert link.read_bytes() == (tiny_model / name).read_bytes()
    assert not (repo / "trees").exists()
    assert not any((reg / ".staging").iterdir())


def test_modes_are_0644_and_0755_and_nothing_setuid(bundle: Path, policy: Path, reg: Path) -> None:
    """Whatever modes the medium shows and whatever the umask, the registry gets 0644 files and 0755 folders."""
    for p in (bundle / "models" / "acme--tiny").iterdir():
        os.chmod(p, 0o4777 if p.suffix == ".json" else 0o600)
    old = os.umask(0o077)
    try:
        do_install(bundle, reg, policy)
    finally:
        os.umask(old)
    for dirpath, dirnames, filenames in os.walk(reg):
        for name in dirnames + filenames:
            st = os.lstat(Path(dirpath) / name)
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            if name == ".staging" or Path(dirpath).name == ".staging":
                continue
            assert mode == (0o755 if stat.S_ISDIR(st.st_mode) else 0o644), (name, oct(mode))


def test_list_json_fields(bundle: Path, policy: Path, reg: Path, alice: KeyPair) -> None:
    do_install(bundle, reg, policy)
    r = run_cli("list", "--registry", reg, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 1
    row = rows[0]
    for key in ("repo_id", "revision", "commit", "bundle", "channel", "sequence", "signers", "installed_at"):
        assert key in row
    assert (row["repo_id"], row["revision"], row["bundle"], row["channel"], row["sequence"]) == ("acme/tiny", "main", "tiny", "tiny", 1)
    assert row["signers"] == [{"name": "alice", "keyid": alice.signer.keyid}]
    assert row["current"] is True


def test_registry_and_trust_from_environment(bundle: Path, policy: Path, reg: Path) -> None:
    env = {"AIRPACK_REGISTRY": str(reg), "AIRPACK_TRUST": str(policy)}
    assert run_cli("install", bundle, env=env).returncode == 0
    r = run_cli("list", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)[0]["repo_id"] == "acme/tiny"


def test_show_prints_offline_environment_and_python(bundle: Path, policy: Path, reg: Path) -> None:
    do_install(bundle, reg, policy)
    r = run_cli("show", "acme/tiny", "--registry", reg)
    assert r.returncode == 0, r.stderr
    hub = str((reg / "hub").resolve())
    assert f"export HF_HUB_CACHE={hub} HF_HUB_OFFLINE=1" in r.stdout
    assert 'snapshot_download("acme/tiny", revision="main")' in r.stdout
    assert 'AutoModelForCausalLM.from_pretrained("acme/tiny", revision="main", local_files_only=True)' in r.stdout
    doc = json.loads(run_cli("show", "tiny", "--registry", reg, "--json").stdout)  # by bundle name too
    assert doc["load"]["env"] == {"HF_HUB_CACHE": hub, "HF_HUB_OFFLINE": "1"}
    assert doc["load"]["pip"] is None
    assert len(doc["files_list"]) == doc["files"]


def test_same_bundle_again_is_a_noop_that_says_so(bundle: Path, policy: Path, reg: Path) -> None:
    do_install(bundle, reg, policy)
    before = registry_state(reg)
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy)
    assert r.returncode == 0, r.stderr
    assert "already installed" in r.stdout and "nothing changed" in r.stdout
    assert registry_state(reg) == before
    assert [x["result"] for x in audit_lines(reg)] == ["installed", "noop"]


def test_upgrade_shares_blobs_and_moves_the_ref(make_bundle: Callable[..., Path], tiny_model: Path, policy: Path, reg: Path,
                                                tmp_path: Path) -> None:
    b1 = make_bundle(sequence=1)
    v2 = variant_model(tiny_model, tmp_path / "v2", extra={"extra.json": b'{"v": 2}\n'})
    b2 = make_bundle(sequence=2, model_dir=v2)
    r1 = do_install(b1, reg, policy)
    r2 = do_install(b2, reg, policy)
    assert r2.bytes_copied == len(b'{"v": 2}\n')  # every other blob was already there
    c1, c2 = r1.models[0]["commit"], r2.models[0]["commit"]
    assert c1 != c2 and _ref(reg) == c2
    rows = list_installed(reg).models
    assert [(x.commit, x.current) for x in rows] == [(c1, False), (c2, True)]
    blobs = list((reg / "hub" / "models--acme--tiny" / "blobs").iterdir())
    assert len(blobs) == len(list(tiny_model.iterdir())) + 1


def test_rollback_then_reinstall_rolls_forward(make_bundle: Callable[..., Path], tiny_model: Path, policy: Path, reg: Path,
                                                tmp_path: Path) -> None:
    b1 = make_bundle(sequence=1)
    b2 = make_bundle(sequence=2, model_dir=variant_model(tiny_model, tmp_path / "v2", extra={"extra.json": b"{}"}))
    c1 = do_install(b1, reg, policy).models[0]["commit"]
    c2 = do_install(b2, reg, policy).models[0]["commit"]
    r = run_cli("rollback", "acme/tiny", "--registry", reg, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["changes"][0]["to"] == c1
    assert _ref(reg) == c1
    # Nothing earlier than the first revision: a clear refusal, exit 6.
    r = run_cli("rollback", "acme/tiny", "--registry", reg, "--json")
    assert r.returncode == 6 and json.loads(r.stdout)["error"]["type"] == "NotInstalledError"
    # The newest bundle again points the name back at it (it is still installed).
    assert do_install(b2, reg, policy).result == "reactivated"
    assert _ref(reg) == c2
    assert do_install(b2, reg, policy).result == "noop"


def test_remove_one_revision_keeps_shared_blobs(make_bundle: Callable[..., Path], tiny_model: Path, policy: Path, reg: Path,
                                                 tmp_path: Path) -> None:
    b1 = make_bundle(sequence=1)
    b2 = make_bundle(sequence=2, model_dir=variant_model(tiny_model, tmp_path / "v2", extra={"extra.json": b"{}"}))
    c1 = do_install(b1, reg, policy).models[0]["commit"]
    c2 = do_install(b2, reg, policy).models[0]["commit"]
    out = remove(RemoveOptions(registry=reg, name="acme/tiny", revision=c2[:10]))
    assert out.blobs_removed == 1 and out.blobs_kept_shared == len(list(tiny_model.iterdir()))
    repo = reg / "hub" / "models--acme--tiny"
    assert not (repo / "snapshots" / c2).exists()
    assert _ref(reg) == c1  # the name falls back to what is left
    for f in tiny_model.iterdir():
        assert (repo / "snapshots" / c1 / f.name).read_bytes() == f.read_bytes()
    remove(RemoveOptions(registry=reg, name="acme/tiny"))
    assert not repo.exists()
    assert list_installed(reg).models == ()


def test_two_models_with_identical_files_store_them_once(make_bundle: Callable[..., Path], tiny_model: Path, policy: Path,
                                                           reg: Path) -> None:
    b1 = make_bundle(sequence=1, repo_id="acme/tiny")
    b2 = make_bundle(sequence=1, repo_id="other/tiny-copy", name="copy", channel="copy")
    do_install(b1, reg, policy)
    r2 = do_install(b2, reg, policy)
    assert r2.bytes_copied == 0
    a = reg / "hub" / "models--acme--tiny" / "blobs"
    b = reg / "hub" / "models--other--tiny-copy" / "blobs"
    for blob in a.iterdir():
        assert os.stat(blob).st_ino == os.stat(b / blob.name).st_ino  # one inode, two names
    # Removing one model leaves the other's bytes whole.
    remove(RemoveOptions(registry=reg, name="acme/tiny"))
    d = show(ShowOptions(registry=reg, name="other/tiny-copy"))
    for f in tiny_model.iterdir():
        assert (Path(d.snapshot) / f.name).read_bytes() == f.read_bytes()


def test_remove_by_bundle_name_and_unknown_names(bundle: Path, policy: Path, reg: Path) -> None:
    do_install(bundle, reg, policy)
    r = run_cli("remove", "nothing/here", "--registry", reg, "--json")
    assert r.returncode == 6 and json.loads(r.stdout)["error"]["type"] == "NotInstalledError"
    r = run_cli("remove", "tiny", "--registry", reg, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert list_installed(reg).models == ()
    assert [x["result"] for x in audit_lines(reg)] == ["installed", "refused", "removed"]


def test_rollback_api_names_the_change(make_bundle: Callable[..., Path], tiny_model: Path, policy: Path, reg: Path,
                                        tmp_path: Path) -> None:
    do_install(make_bundle(sequence=5), reg, policy)
    do_install(make_bundle(sequence=6, model_dir=variant_model(tiny_model, tmp_path / "v6", extra={"x.json": b"6"})), reg, policy)
    out = rollback(RollbackOptions(registry=reg, name="tiny"))  # a bundle name works too
    assert [(c.repo_id, c.sequence) for c in out.changes] == [("acme/tiny", 5)]


def test_list_on_a_missing_registry_is_a_clean_error(tmp_path: Path) -> None:
    r = run_cli("list", "--registry", tmp_path / "nope", "--json")
    assert r.returncode == 6
    assert json.loads(r.stdout)["error"]["type"] == "NotInstalledError"
    assert not (tmp_path / "nope").exists()


def test_install_refuses_a_non_empty_folder_that_is_not_a_registry(bundle: Path, policy: Path, tmp_path: Path) -> None:
    d = tmp_path / "home"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    r = run_cli("install", bundle, "--registry", d, "--trust", policy)
    assert r.returncode == 2
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]


def test_same_files_from_two_bundles_share_one_snapshot(make_bundle: Callable[..., Path], policy: Path, reg: Path) -> None:
    """Two bundles with the same model files (so the same commit): one snapshot, kept until the last one goes."""
    r1 = do_install(make_bundle(sequence=1, name="tiny", channel="a"), reg, policy)
    r2 = do_install(make_bundle(sequence=1, name="tiny-again", channel="b"), reg, policy)
    commit = r1.models[0]["commit"]
    assert r2.models[0]["commit"] == commit and r2.bytes_copied == 0
    assert [x.bundle for x in list_installed(reg).models] == ["tiny", "tiny-again"]
    snap = reg / "hub" / "models--acme--tiny" / "snapshots" / commit
    remove(RemoveOptions(registry=reg, name="tiny"))
    assert snap.is_dir() and _ref(reg) == commit
    assert (snap / "config.json").read_bytes()
    remove(RemoveOptions(registry=reg, name="tiny-again"))
    assert not (reg / "hub" / "models--acme--tiny").exists()
