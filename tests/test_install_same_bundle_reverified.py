"""The same bundle again is a no-op only once its medium proved whole (issue item 6).

Installing a bundle that is already installed used to stop before a file was
read, so a medium with flipped bytes got exit 0 and an audit line "noop". Every
byte is hashed now (nothing is written), in every form, before the answer.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

from conftest import run_cli
from registry_fixtures import audit_lines, do_install, registry_state
from threat_helpers import assert_cli_json_error, flip_byte

from airpack.manifest import parse


def _weights(bundle: Path) -> Path:
    return sorted((bundle / "models" / "acme--tiny").glob("*.safetensors"))[0]


def test_tampered_folder_of_an_installed_bundle_is_refused(bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "r"
    do_install(bundle, reg, policy)
    before = registry_state(reg)
    flip_byte(_weights(bundle), offset=-3)
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy, "--json")
    assert_cli_json_error(r, 3, "BundleMismatchError")
    assert audit_lines(reg)[-1]["result"] == "refused"
    assert registry_state(reg) == before


def test_tampered_tar_of_an_installed_bundle_is_refused(bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "r"
    do_install(bundle, reg, policy)
    tar = tmp_path / "b.tar"
    assert run_cli("export", bundle, "--tar", tar, "--trust", policy).returncode == 0
    name = "models/acme--tiny/" + _weights(bundle).name
    with tarfile.open(tar) as t:
        m = t.getmember(name)
        offset = m.offset_data + m.size - 3
    data = bytearray(tar.read_bytes())
    data[offset] ^= 0x01
    tar.write_bytes(bytes(data))
    before = registry_state(reg)
    r = run_cli("install", tar, "--registry", reg, "--trust", policy, "--json")
    assert_cli_json_error(r, 3)
    assert audit_lines(reg)[-1]["result"] == "refused"
    assert registry_state(reg) == before


def test_whole_medium_of_an_installed_bundle_is_still_a_noop(bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "r"
    do_install(bundle, reg, policy)
    before = registry_state(reg)
    assert do_install(bundle, reg, policy).result == "noop"
    assert registry_state(reg) == before
    assert [x["result"] for x in audit_lines(reg)] == ["installed", "noop"]


def test_noop_refuses_when_the_snapshot_is_gone(bundle: Path, policy: Path, tmp_path: Path) -> None:
    """The no-op says "installed": not when the snapshot was deleted behind airpack's back (exit 6, how to fix)."""
    reg = tmp_path / "r"
    do_install(bundle, reg, policy)
    commit = parse((bundle / "manifest.json").read_bytes()).models[0].commit
    shutil.rmtree(reg / "hub" / "models--acme--tiny" / "snapshots" / commit)
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy, "--json")
    err = assert_cli_json_error(r, 6, "SnapshotMissingError")
    assert commit[:12] in err["message"]
    assert "airpack remove acme/tiny --revision" in r.stdout
    assert audit_lines(reg)[-1]["result"] == "refused"
    # The fix the hint gives works: remove the revision, install the bundle again.
    assert run_cli("remove", "acme/tiny", "--revision", commit, "--registry", reg).returncode == 0
    assert do_install(bundle, reg, policy).result == "installed"
