"""What install must refuse, each leaving the registry exactly as it was (plus one audit line).

By threat: a bundle that fails verify, rollback and sequence jumps, a medium
that changes bytes after verify, a full disk, a planted link, pickles the
operator did not allow, two writers at once.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import AIRPACK, KeyPair, run_cli
from registry_fixtures import add_file_entry, audit_lines, db_state, do_install, registry_state, resign, variant_model

import airpack.ops.install as install_mod
import airpack.ops.verify as verify_mod
from airpack.errors import BundleMismatchError, DiskSpaceError, LockHeldError, RollbackError
from airpack.progress import ProgressTask
from airpack.registry import Registry


@pytest.fixture
def reg(tmp_path: Path) -> Path:
    return tmp_path / "registry"


@pytest.fixture
def installed(make_bundle: Callable[..., Path], policy: Path, reg: Path) -> Path:
    """A registry that already holds sequence 1 of channel ``tiny``."""
    do_install(make_bundle(sequence=1), reg, policy)
    return reg


@pytest.fixture
def next_bundle(make_bundle: Callable[..., Path], tiny_model: Path, tmp_path: Path) -> Path:
    """Sequence 2 of the channel: one new file, the rest shared with sequence 1."""
    v2 = variant_model(tiny_model, tmp_path / "v2", extra={"extra.json": b'{"v": 2}\n' * 20000})
    return make_bundle(sequence=2, model_dir=v2)


def _refused_once(reg: Path, before_lines: int, err_type: str) -> None:
    lines = audit_lines(reg)
    assert len(lines) == before_lines + 1
    assert lines[-1]["result"] == "refused" and lines[-1]["error"]["type"] == err_type


# -- a bundle that fails verify --------------------------------------------------------------


def test_untrusted_signer_writes_nothing(installed: Path, make_bundle: Callable[..., Path], bob: KeyPair, policy: Path) -> None:
    before = registry_state(installed)
    b = make_bundle(sequence=2, signer=bob)
    r = run_cli("install", b, "--registry", installed, "--trust", policy, "--json")
    assert r.returncode == 4, r.stdout
    assert registry_state(installed) == before
    _refused_once(installed, 1, "SignatureError")


def test_tampered_weight_writes_nothing(installed: Path, next_bundle: Path, policy: Path) -> None:
    w = next_bundle / "models" / "acme--tiny" / "extra.json"
    data = bytearray(w.read_bytes())
    data[-2] ^= 0x01
    w.write_bytes(bytes(data))
    before = registry_state(installed)
    r = run_cli("install", next_bundle, "--registry", installed, "--trust", policy, "--json")
    assert r.returncode == 3, r.stdout
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "BundleMismatchError" and err["mismatch"]["changed"][0]["path"].endswith("extra.json")
    assert registry_state(installed) == before
    assert not any((installed / ".staging").iterdir())
    _refused_once(installed, 1, "BundleMismatchError")


def test_extra_file_in_bundle_writes_nothing_into_a_fresh_registry(bundle: Path, policy: Path, reg: Path) -> None:
    (bundle / "models" / "acme--tiny" / "planted.py").write_text("import os\n")
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy, "--json")
    assert r.returncode == 3
    assert not any((reg / "hub").glob("*"))  # a refused first install creates no hub/ at all
    assert not (reg / "registry.db").exists() and db_state(reg) == []  # nothing created but the audit line


def test_file_not_installed_is_still_checked(bundle: Path, policy: Path, reg: Path, alice: KeyPair) -> None:
    """A file the registry does not keep (an SBOM at the root) is hashed all the same."""
    resign(bundle, alice, lambda pred, files: [*files, add_file_entry(bundle, "sbom.json", b'{"bom": 1}')])
    (bundle / "sbom.json").write_bytes(b'{"bom": 2}')
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy, "--json")
    assert r.returncode == 3 and "sbom.json" in r.stdout
    assert not any((reg / "hub").glob("*"))  # a refused first install creates no hub/ at all


# -- rollback protection ---------------------------------------------------------------------------


def test_older_sequence_is_refused(make_bundle: Callable[..., Path], next_bundle: Path, policy: Path, reg: Path) -> None:
    old = make_bundle(sequence=1)
    do_install(old, reg, policy)
    do_install(next_bundle, reg, policy)
    before = registry_state(reg)
    # Refused even though it was installed before (and is still there): rollback is the way back.
    r = run_cli("install", old, "--registry", reg, "--trust", policy, "--json")
    assert r.returncode == 4
    assert json.loads(r.stdout)["error"]["type"] == "RollbackError"
    assert registry_state(reg) == before
    _refused_once(reg, 2, "RollbackError")


def test_equal_sequence_with_other_content_is_refused(installed: Path, make_bundle: Callable[..., Path], tiny_model: Path,
                                                      policy: Path, tmp_path: Path) -> None:
    other = make_bundle(sequence=1, model_dir=variant_model(tiny_model, tmp_path / "o", extra={"o.json": b"1"}))
    with pytest.raises(RollbackError, match="already installed with other content"):
        do_install(other, installed, policy)


def test_allow_downgrade_installs_and_is_logged(make_bundle: Callable[..., Path], next_bundle: Path, tiny_model: Path,
                                                policy: Path, reg: Path, tmp_path: Path) -> None:
    do_install(next_bundle, reg, policy)
    older = make_bundle(sequence=1, model_dir=variant_model(tiny_model, tmp_path / "old", extra={"old.json": b"1"}))
    r = run_cli("install", older, "--registry", reg, "--trust", policy, "--allow-downgrade", "--json")
    assert r.returncode == 0, r.stdout
    assert json.loads(r.stdout)["downgrade"] is True
    last = audit_lines(reg)[-1]
    assert last["result"] == "installed" and last["downgrade"] is True and last["options"]["allow_downgrade"] is True
    # The channel's high-water mark did not go down: sequence 1 without the flag is still a rollback.
    with pytest.raises(RollbackError):
        do_install(make_bundle(sequence=1, model_dir=variant_model(tiny_model, tmp_path / "o2", extra={"z": b"2"})), reg, policy)


def test_sequence_jump_over_a_million_is_refused(installed: Path, make_bundle: Callable[..., Path], tiny_model: Path,
                                                 policy: Path, tmp_path: Path) -> None:
    far = make_bundle(sequence=1_000_002, model_dir=variant_model(tiny_model, tmp_path / "far", extra={"f": b"1"}))
    r = run_cli("install", far, "--registry", installed, "--trust", policy, "--json")
    assert r.returncode == 4
    assert json.loads(r.stdout)["error"]["type"] == "SequenceJumpError"
    ok = make_bundle(sequence=1_000_001, model_dir=variant_model(tiny_model, tmp_path / "ok", extra={"f": b"2"}))
    assert do_install(ok, installed, policy).result == "installed"


# -- the medium changes once install has trusted the manifest (install reads each byte once) ---------------------------------------------------------


class _MutateOnCopy:
    """A progress sink that changes a bundle file when the file pass starts: after the envelope and manifest were trusted."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.started = False

    def task(self, label: str, total: int, *, unit: str = "B") -> ProgressTask:
        if label.startswith(("install", "verify")) and not self.started:
            self.started = True
            self.fn()
        from airpack.progress import NULL_PROGRESS

        return NULL_PROGRESS.task(label, total)

    def message(self, text: str) -> None:
        pass


@pytest.mark.parametrize("change", ["flip", "grow"])
def test_medium_changing_after_verify_is_caught(installed: Path, next_bundle: Path, policy: Path, change: str) -> None:
    target = next_bundle / "models" / "acme--tiny" / "extra.json"

    def mutate() -> None:
        data = bytearray(target.read_bytes())
        if change == "flip":
            data[100] ^= 0x20
        else:
            data += b"more"
        target.write_bytes(bytes(data))

    before = registry_state(installed)
    prog = _MutateOnCopy(mutate)
    with pytest.raises(BundleMismatchError) as ei:
        do_install(next_bundle, installed, policy, progress=prog)
    assert prog.started
    assert ei.value.report.changed[0].path.endswith("extra.json")
    assert registry_state(installed) == before
    assert not any((installed / ".staging").iterdir())
    _refused_once(installed, 1, "BundleMismatchError")


# -- disk full -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["copy", "kernel-copy"])
def test_disk_full_mid_copy_is_a_clean_error(installed: Path, next_bundle: Path, policy: Path, monkeypatch: pytest.MonkeyPatch,
                                             where: str) -> None:
    def full(*a: Any, **kw: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "copy":

        def partial(src: int, dst: int, **kw: Any) -> Any:
            os.write(dst, b"partial")
            full()

        monkeypatch.setattr(verify_mod, "copy_then_hash", partial)
    else:
        monkeypatch.setattr(install_mod.os, "copy_file_range", full)  # the real copy loop meets the full disk
    before = registry_state(installed)
    with pytest.raises(DiskSpaceError, match="no space left"):
        do_install(next_bundle, installed, policy)
    assert registry_state(installed) == before
    assert not any((installed / ".staging").iterdir())
    _refused_once(installed, 1, "DiskSpaceError")
    monkeypatch.undo()
    assert do_install(next_bundle, installed, policy).result == "installed"


@pytest.mark.parametrize("fallback", ["sendfile", "read"])
def test_copy_without_kernel_copy_still_hashes_the_copy(installed: Path, next_bundle: Path, policy: Path,
                                                         monkeypatch: pytest.MonkeyPatch, fallback: str) -> None:
    """Where copy_file_range (or sendfile too) is refused, e.g. across filesystems, the plain paths give the same result."""
    def exdev(*a: Any, **kw: Any) -> Any:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(install_mod.os, "copy_file_range", exdev)
    if fallback == "read":
        monkeypatch.setattr(install_mod.os, "sendfile", exdev)
    r = do_install(next_bundle, installed, policy)
    assert r.result == "installed" and r.bytes_copied > 100_000
    snap = Path(r.models[0]["snapshot"])
    assert (snap / "extra.json").read_bytes() == (next_bundle / "models" / "acme--tiny" / "extra.json").read_bytes()


def test_not_enough_space_is_refused_before_copying(installed: Path, next_bundle: Path, policy: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install_mod, "_free_bytes", lambda p: 1000)
    before = registry_state(installed)
    with pytest.raises(DiskSpaceError, match="bytes free"):
        do_install(next_bundle, installed, policy)
    assert registry_state(installed) == before


def test_file_size_limit_in_a_real_process_exits_8(installed: Path, next_bundle: Path, policy: Path) -> None:
    """A real write failure (RLIMIT_FSIZE: the kernel refuses to grow a file past the limit) in the real CLI."""
    before = registry_state(installed)
    limit = 150_000  # below the 180 kB new file, above the database and audit log

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRPACK_")}
    r = subprocess.run([*AIRPACK, "install", str(next_bundle), "--registry", str(installed), "--trust", str(policy), "--json"],
                       capture_output=True, text=True, env=env, preexec_fn=cap, timeout=120)
    assert r.returncode == 8, r.stdout + r.stderr
    assert json.loads(r.stdout)["error"]["exit_code"] == 8
    assert registry_state(installed) == before
    assert audit_lines(installed)[-1]["result"] == "refused"


# -- a hostile link planted in the registry ------------------------------------------------------------------


def _plant(reg: Path, rel: str, outside: Path) -> None:
    p = reg / rel
    if p.is_dir() and not p.is_symlink():
        shutil.copytree(p, outside, symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(p)
    elif p.exists():
        outside.write_bytes(p.read_bytes())
        p.unlink()
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
        outside.mkdir(exist_ok=True)
    p.symlink_to(outside)


@pytest.mark.parametrize("rel", [
    "hub",
    "wheels",
    ".staging",
    "hub/models--acme--tiny",
    "hub/models--acme--tiny/blobs",
    "hub/models--acme--tiny/snapshots",
    "hub/models--acme--tiny/refs",
    "audit.log",
    "registry.db",
])
def test_planted_symlink_is_refused(installed: Path, next_bundle: Path, policy: Path, tmp_path: Path, rel: str) -> None:
    outside = tmp_path / "outside"
    _plant(installed, rel, outside)
    snap_outside = sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) if outside.is_dir() else outside.read_bytes()
    r = run_cli("install", next_bundle, "--registry", installed, "--trust", policy, "--json")
    assert r.returncode == 6, r.stdout + r.stderr
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "UnsafeRegistryError" and "symbolic link" in err["message"]
    after = sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) if outside.is_dir() else outside.read_bytes()
    assert after == snap_outside  # nothing was written through the link


def test_planted_snapshot_folder_link_is_refused(installed: Path, next_bundle: Path, policy: Path, tmp_path: Path) -> None:
    from airpack.manifest import parse

    commit = parse((next_bundle / "manifest.json").read_bytes()).models[0].commit
    outside = tmp_path / "evil"
    outside.mkdir()
    (installed / "hub" / "models--acme--tiny" / "snapshots" / commit).symlink_to(outside)
    r = run_cli("install", next_bundle, "--registry", installed, "--trust", policy, "--json")
    assert r.returncode == 6, r.stdout
    assert list(outside.iterdir()) == []


def test_planted_link_inside_a_snapshot_is_a_conflict(installed: Path, make_bundle: Callable[..., Path], policy: Path,
                                                      tmp_path: Path) -> None:
    """The same commit from a second bundle: an existing entry pointing elsewhere is never trusted or overwritten."""
    snap = next((installed / "hub" / "models--acme--tiny" / "snapshots").iterdir())
    (snap / "config.json").unlink()
    (snap / "config.json").symlink_to("/etc/hostname")
    b = make_bundle(sequence=2, name="tiny2")  # same files, so the same local commit
    r = run_cli("install", b, "--registry", installed, "--trust", policy, "--json")
    assert r.returncode == 6, r.stdout
    assert json.loads(r.stdout)["error"]["type"] == "ConflictError"


# -- pickles need the operator too ----------------------------------------------------------------------------


def test_pickles_need_allow_pickle_at_install(make_bundle: Callable[..., Path], tiny_model: Path, policy: Path, reg: Path,
                                              tmp_path: Path) -> None:
    src = variant_model(tiny_model, tmp_path / "pk", extra={"training_args.bin": b"\x80\x04pickle"})
    b = make_bundle(model_dir=src, extra="[policy]\nallow_pickle = true\n")
    r = run_cli("install", b, "--registry", reg, "--trust", policy, "--json")
    assert r.returncode == 3
    assert "--allow-pickle" in json.loads(r.stdout)["error"]["message"]
    r = run_cli("install", b, "--registry", reg, "--trust", policy, "--allow-pickle", "--json")
    assert r.returncode == 0, r.stdout


# -- one writer at a time -----------------------------------------------------------------------------------


def test_lock_held_is_exit_6_and_logged(installed: Path, next_bundle: Path, policy: Path) -> None:
    before = registry_state(installed)
    with Registry.open(installed).locked():
        r = run_cli("install", next_bundle, "--registry", installed, "--trust", policy, "--json")
    assert r.returncode == 6
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "LockHeldError" and f"pid {os.getpid()}" in err["message"]
    assert registry_state(installed) == before
    _refused_once(installed, 1, "LockHeldError")


def test_lock_in_process_raises_lock_held(installed: Path, next_bundle: Path, policy: Path) -> None:
    with Registry.open(installed).locked(), pytest.raises(LockHeldError):
        do_install(next_bundle, installed, policy)


def test_concurrent_installs_never_corrupt(installed: Path, next_bundle: Path, policy: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRPACK_")}
    procs = [subprocess.Popen([*AIRPACK, "install", str(next_bundle), "--registry", str(installed), "--trust", str(policy), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    outs = [(p.wait(timeout=120), p.stdout.read() if p.stdout else "") for p in procs]
    codes = sorted(c for c, _ in outs)
    assert set(codes) <= {0, 6} and 0 in codes, outs
    results = [json.loads(o).get("result") for c, o in outs if c == 0]
    assert results.count("installed") == 1 and set(results) <= {"installed", "noop"}
    import sqlite3

    conn = sqlite3.connect(str(installed / "registry.db"))
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT COUNT(*) FROM bundles WHERE state = 'active'").fetchone()[0] == 2
    conn.close()
    lines = audit_lines(installed)
    assert len(lines) == 1 + 4  # one line per attempt, refused ones too
    assert run_cli("log", "verify", "--registry", installed).returncode == 0
