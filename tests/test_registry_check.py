"""``airpack check``: what is installed is re-verified later, and every damage is named.

Install verifies a bundle once; these tests change the registry's disk behind
its back (a blob overwritten, a link moved, a ref edited, a file planted, the
audit log deleted or cut short, a kept envelope swapped) and expect check to
fail with exit 3 naming each bad path, and ``check --trust`` to name the
bundles today's policy no longer trusts (exit 4). A check changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import AIRPACK, KeyPair
from registry_fixtures import add_file_entry, audit_lines, do_install, recover, registry_state, resign
from threat_helpers import cli_inproc, flip_byte

from airpack.errors import NoLongerTrustedError, RegistryDamageError
from airpack.manifest import ENVELOPE_NAME
from airpack.ops.check import CheckOptions, check
from airpack.registry import CRASH_ENV, link_target
from airpack.trust import load_policy

REPO_DIR = "hub/models--acme--tiny"


@pytest.fixture
def installed(bundle: Path, policy: Path, tmp_path: Path) -> Path:
    reg = tmp_path / "registry"
    do_install(bundle, reg, policy)
    return reg


def _check_cli(reg: Path, *extra: str | Path) -> tuple[int, dict[str, Any], str]:
    r = cli_inproc("check", "--registry", reg, *extra, "--json")
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout), r.stderr


def _commit(reg: Path) -> str:
    return (reg / REPO_DIR / "refs" / "main").read_text()


def _a_blob(reg: Path) -> Path:
    """The largest blob (a safetensors shard)."""
    return max((reg / REPO_DIR / "blobs").iterdir(), key=lambda p: p.stat().st_size)


def _rel(reg: Path, p: Path) -> str:
    return p.relative_to(reg).as_posix()


# -- a healthy registry -------------------------------------------------------------------------------


def test_a_fresh_install_checks_clean_and_the_check_changes_nothing(installed: Path) -> None:
    before, lines = registry_state(installed), audit_lines(installed)
    code, doc, _ = _check_cli(installed)
    assert code == 0, doc
    assert doc["ok"] is True and doc["missing"] == [] and doc["extra"] == [] and doc["changed"] == []
    assert doc["checked"]["models"] == 1 and doc["checked"]["files"] >= 3 and doc["checked"]["bytes"] > 0
    assert doc["audit"] == {**doc["audit"], "ok": True, "lines": 1, "operations": 1, "unlogged_txns": []}
    assert doc["trust"] is None
    assert registry_state(installed) == before and audit_lines(installed) == lines


def test_text_output_says_ok(installed: Path) -> None:
    r = cli_inproc("check", "--registry", installed)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK: ") and "audit log: 1 line(s), chain intact" in r.stdout


def test_registry_from_the_environment(installed: Path) -> None:
    r = cli_inproc("check", "--json", env={"AIRPACK_REGISTRY": str(installed)})
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_registry_is_a_registry_error(tmp_path: Path) -> None:
    code, doc, _ = _check_cli(tmp_path / "nothing")
    assert code == 6 and doc["error"]["type"] == "NotInstalledError"


# -- the installed bytes --------------------------------------------------------------------------------


def test_an_overwritten_blob_is_named_with_both_digests(installed: Path) -> None:
    blob = _a_blob(installed)
    flip_byte(blob, 100)
    code, doc, _ = _check_cli(installed)
    assert code == 3 and doc["error"]["type"] == "RegistryDamageError" and doc["ok"] is False
    [c] = doc["changed"]
    assert c["path"] == _rel(installed, blob) and c["reason"] == "digest differs"
    assert c["expected_sha256"] == blob.name and c["actual_sha256"] == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert doc["error"]["mismatch"]["changed"][0]["path"] == c["path"]


def test_text_report_names_every_bad_file(installed: Path) -> None:
    blob = _a_blob(installed)
    flip_byte(blob, 0)
    (installed / REPO_DIR / "blobs" / ("0" * 64)).write_bytes(b"planted")
    r = cli_inproc("check", "--registry", installed)
    assert r.returncode == 3
    assert r.stdout.startswith("FAILED: ")
    assert f"changed: {_rel(installed, blob)}" in r.stdout and f"extra:   {REPO_DIR}/blobs/{'0' * 64}" in r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 entries" in errors[0], r.stderr


def test_a_resized_blob_and_a_deleted_blob(installed: Path) -> None:
    blobs = sorted((installed / REPO_DIR / "blobs").iterdir(), key=lambda p: p.stat().st_size)
    with open(blobs[-1], "ab") as f:
        f.write(b"more")
    blobs[0].unlink()
    code, doc, _ = _check_cli(installed)
    assert code == 3
    assert doc["missing"] == [_rel(installed, blobs[0])]
    assert [(c["path"], c["reason"]) for c in doc["changed"]] == [(_rel(installed, blobs[-1]), "size differs")]


def test_planted_files_folders_and_repos_are_extra(installed: Path) -> None:
    commit = _commit(installed)
    snap = installed / REPO_DIR / "snapshots" / commit
    os.symlink("../../blobs/" + _a_blob(installed).name, snap / "planted.safetensors")
    (installed / REPO_DIR / "snapshots" / ("f" * 40)).mkdir()
    (installed / "hub" / "models--evil--repo").mkdir()
    (installed / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"PK")
    (installed / "bundles" / "x").write_text("?")
    code, doc, _ = _check_cli(installed)
    assert code == 3
    assert doc["extra"] == sorted([f"{REPO_DIR}/snapshots/{commit}/planted.safetensors", f"{REPO_DIR}/snapshots/{'f' * 40}/",
                                   "hub/models--evil--repo/", "wheels/evil-1.0-py3-none-any.whl", "bundles/x"])


def test_huggingface_hub_bookkeeping_is_not_extra(installed: Path) -> None:
    (installed / "hub" / ".locks" / "models--acme--tiny").mkdir(parents=True)
    (installed / "hub" / "version.txt").write_text("1")
    (installed / REPO_DIR / ".no_exist" / _commit(installed)).mkdir(parents=True)
    code, doc, _ = _check_cli(installed)
    assert code == 0, doc


def test_a_snapshot_link_moved_or_replaced_by_a_file(installed: Path, bundle: Path) -> None:
    commit = _commit(installed)
    snap = installed / REPO_DIR / "snapshots" / commit
    links = sorted(p for p in snap.rglob("*") if p.is_symlink())
    a, b = links[0], links[1]
    a_target = os.readlink(a)
    a.unlink()
    os.symlink(os.readlink(b), a)  # points at another file's blob
    b_bytes = b.read_bytes()
    b.unlink()
    b.write_bytes(b_bytes)  # the same bytes, but a plain file: the blob is no longer what loads
    code, doc, _ = _check_cli(installed)
    assert code == 3
    reasons = {c["path"]: c["reason"] for c in doc["changed"]}
    assert reasons[_rel(installed, a)] == f"the link points to {os.readlink(a)}, expected {a_target}"
    assert "a plain file where the link to" in reasons[_rel(installed, b)]


def test_a_snapshot_link_deleted(installed: Path) -> None:
    snap = installed / REPO_DIR / "snapshots" / _commit(installed)
    gone = sorted(p for p in snap.rglob("*") if p.is_symlink())[0]
    gone.unlink()
    code, doc, _ = _check_cli(installed)
    assert code == 3 and doc["missing"] == [_rel(installed, gone)]


def test_a_blob_replaced_by_a_symlink(installed: Path, tmp_path: Path) -> None:
    blob = _a_blob(installed)
    outside = tmp_path / "outside"
    outside.write_bytes(blob.read_bytes())
    blob.unlink()
    os.symlink(outside, blob)
    code, doc, _ = _check_cli(installed)
    assert code == 3
    assert [(c["path"], c["reason"]) for c in doc["changed"]] == [(_rel(installed, blob), "a symbolic link where a plain file belongs")]


# -- refs -----------------------------------------------------------------------------------------------


def test_a_ref_edited_or_deleted(installed: Path) -> None:
    ref = installed / REPO_DIR / "refs" / "main"
    ref.write_text("e" * 40)
    code, doc, _ = _check_cli(installed)
    assert code == 3
    [c] = doc["changed"]
    assert c["path"] == f"{REPO_DIR}/refs/main" and "e" * 40 in c["reason"]
    ref.unlink()
    code, doc, _ = _check_cli(installed)
    assert code == 3 and doc["missing"] == [f"{REPO_DIR}/refs/main"]


def test_a_ref_the_database_points_at_an_uninstalled_commit(installed: Path) -> None:
    import sqlite3

    conn = sqlite3.connect(installed / "registry.db")
    conn.execute("UPDATE refs SET commit_sha = ?", ("d" * 40,))
    conn.commit()
    conn.close()
    code, doc, _ = _check_cli(installed)
    assert code == 3
    reasons = [c["reason"] for c in doc["changed"] if c["path"] == f"{REPO_DIR}/refs/main"]
    assert any("no installed model holds" in r for r in reasons) and any("d" * 40 in r for r in reasons)


# -- wheels ---------------------------------------------------------------------------------------------


@pytest.fixture
def wheel_bundle(bundle: Path, alice: KeyPair) -> Path:
    """The tiny bundle plus one wheel, signed again."""

    def mutate(pred: dict[str, Any], files: list[Any]) -> list[Any]:
        entry = add_file_entry(bundle, "wheels/demo-1.0-py3-none-any.whl", b"PK\x03\x04 not really a wheel")
        pred["wheels"] = [{"name": "demo", "version": "1.0", "path": entry.path, "sha256": entry.sha256}]
        return [*files, entry]

    resign(bundle, alice, mutate)
    return bundle


def test_a_tampered_wheel_and_requirements_file(wheel_bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    do_install(wheel_bundle, reg, policy)
    assert _check_cli(reg)[0] == 0
    flip_byte(reg / "wheels" / "demo-1.0-py3-none-any.whl", 0)
    with open(reg / "wheels" / "tiny.txt", "a") as f:
        f.write("evil==6.6.6\n")
    code, doc, _ = _check_cli(reg)
    assert code == 3
    assert sorted(c["path"] for c in doc["changed"]) == ["wheels/demo-1.0-py3-none-any.whl", "wheels/tiny.txt"]


# -- the audit log --------------------------------------------------------------------------------------


def test_a_deleted_audit_log_is_a_failure_not_zero_lines(installed: Path) -> None:
    (installed / "audit.log").unlink()
    assert cli_inproc("log", "verify", "--registry", installed).returncode == 0  # the chain alone cannot tell
    code, doc, _ = _check_cli(installed)
    assert code == 3 and doc["missing"] == ["audit.log"]
    assert doc["audit"]["ok"] is False and doc["audit"]["operations"] == 1 and len(doc["audit"]["unlogged_txns"]) == 1


def test_a_truncated_audit_log_is_a_failure(installed: Path, bundle: Path, policy: Path, make_bundle: Callable[..., Path]) -> None:
    do_install(make_bundle(sequence=2, extra='\n[policy]\nallow_pickle = false\n'), installed, policy)
    raw = (installed / "audit.log").read_bytes().splitlines(keepends=True)
    assert len(raw) == 2
    (installed / "audit.log").write_bytes(raw[0])  # the newest line removed: the chain still holds
    code, doc, _ = _check_cli(installed)
    assert code == 3
    [c] = doc["changed"]
    assert c["path"] == "audit.log" and "2 committed operation(s)" in c["reason"] and "1 of them have no line" in c["reason"]
    assert doc["audit"]["unlogged_txns"] == [audit_lines_txn(installed, raw[1])]


def audit_lines_txn(reg: Path, line: bytes) -> str:
    return str(json.loads(line)["txn"])


def test_an_edited_audit_line_is_named(installed: Path) -> None:
    p = installed / "audit.log"
    p.write_bytes(p.read_bytes().replace(b'"result":"installed"', b'"result":"refused"'))
    code, doc, _ = _check_cli(installed)
    assert code == 3
    [c] = doc["changed"]
    assert c["path"] == "audit.log" and "line 1 was edited" in c["reason"]
    assert doc["audit"]["error"]["type"] == "AuditLogError"


def test_refusals_and_noops_need_no_operation(installed: Path, bundle: Path, policy: Path, bob: KeyPair,
                                              make_bundle: Callable[..., Path]) -> None:
    do_install(bundle, installed, policy)  # a no-op: a line, no operation
    with pytest.raises(Exception):  # noqa: B017 - any refusal: a line, no operation
        do_install(make_bundle(sequence=5, signer=bob), installed, policy)
    code, doc, _ = _check_cli(installed)
    assert code == 0, doc
    assert doc["audit"]["lines"] == 3 and doc["audit"]["operations"] == 1


# -- kept envelopes and trust ---------------------------------------------------------------------------


def test_install_keeps_the_exact_signed_bytes(installed: Path, bundle: Path) -> None:
    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    kept = installed / "bundles" / digest
    assert (kept / "envelope.json").read_bytes() == (bundle / ENVELOPE_NAME).read_bytes()
    assert (kept / "manifest.json").read_bytes() == (bundle / "manifest.json").read_bytes()
    assert oct((kept / "envelope.json").stat().st_mode & 0o777) == "0o644"


def test_a_swapped_kept_envelope_is_integrity(installed: Path, bundle: Path) -> None:
    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    env = installed / "bundles" / digest / "envelope.json"
    env.write_bytes(env.read_bytes().replace(b"{", b"{ ", 1))
    code, doc, _ = _check_cli(installed)
    assert code == 3 and [c["path"] for c in doc["changed"]] == [f"bundles/{digest}/envelope.json"]
    (installed / "bundles" / digest / "manifest.json").unlink()
    code, doc, _ = _check_cli(installed)
    assert code == 3 and doc["missing"] == [f"bundles/{digest}/manifest.json"]


def test_check_trust_with_the_same_policy_is_ok(installed: Path, policy: Path) -> None:
    code, doc, _ = _check_cli(installed, "--trust", policy)
    assert code == 0, doc
    assert doc["trust"]["checked"] == ["tiny"] and doc["trust"]["untrusted"] == []
    assert doc["trust"]["policy_sha256"] == hashlib.sha256(policy.read_bytes()).hexdigest()


def test_a_bundle_no_longer_trusted_is_exit_4(installed: Path, make_policy: Callable[..., Path], bob: KeyPair) -> None:
    today = make_policy(bob, name="today.json")  # alice, who signed the installed bundle, is gone from the policy
    code, doc, _ = _check_cli(installed, "--trust", today)
    assert code == 4 and doc["error"]["type"] == "NoLongerTrustedError"
    [u] = doc["trust"]["untrusted"]
    assert u["bundle"] == "tiny" and u["sequence"] == 1 and u["type"] == "SignatureError"
    r = cli_inproc("check", "--registry", installed, "--trust", today)
    assert r.returncode == 4 and "NOT TRUSTED: tiny" in r.stdout


def test_the_policy_from_the_environment(installed: Path, make_policy: Callable[..., Path], bob: KeyPair) -> None:
    r = cli_inproc("check", "--registry", installed, "--json", env={"AIRPACK_TRUST": str(make_policy(bob, name="today.json"))})
    assert r.returncode == 4 and json.loads(r.stdout)["trust"]["untrusted"]


def test_integrity_comes_before_trust(installed: Path, make_policy: Callable[..., Path], bob: KeyPair) -> None:
    flip_byte(_a_blob(installed), 0)
    code, doc, _ = _check_cli(installed, "--trust", make_policy(bob, name="today.json"))
    assert code == 3 and doc["trust"]["untrusted"]


def test_the_python_api_returns_the_failure(installed: Path, policy: Path, make_policy: Callable[..., Path], bob: KeyPair) -> None:
    assert check(CheckOptions(registry=installed, policy=load_policy(policy))).failure() is None
    r = check(CheckOptions(registry=installed, policy=load_policy(make_policy(bob, name="today.json"))))
    assert isinstance(r.failure(), NoLongerTrustedError) and r.failure().exit_code == 4  # type: ignore[union-attr]
    flip_byte(_a_blob(installed), 0)
    r = check(CheckOptions(registry=installed))
    assert isinstance(r.failure(), RegistryDamageError) and r.failure().exit_code == 3  # type: ignore[union-attr]


def test_a_bundle_installed_before_envelopes_were_kept_is_a_note(installed: Path, bundle: Path, policy: Path) -> None:
    import shutil
    import sqlite3

    conn = sqlite3.connect(installed / "registry.db")
    conn.execute("UPDATE bundles SET envelope_sha256 = NULL, policy_sha256 = NULL, policy_threshold = NULL, policy_keyids = NULL")
    conn.commit()
    conn.close()
    shutil.rmtree(installed / "bundles")
    code, doc, _ = _check_cli(installed, "--trust", policy)
    assert code == 0, doc
    assert doc["trust"]["not_kept"] == ["tiny"] and any("before airpack kept envelopes" in n for n in doc["notes"])


def test_a_removed_bundle_keeps_its_envelope_and_is_not_extra(installed: Path, bundle: Path) -> None:
    from airpack.ops.manage import RemoveOptions, remove

    remove(RemoveOptions(registry=installed, name="acme/tiny"))
    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert (installed / "bundles" / digest / "envelope.json").is_file()
    code, doc, _ = _check_cli(installed)
    assert code == 0, doc
    assert doc["audit"]["operations"] == 2


def test_a_reinstall_after_remove_checks_clean(installed: Path, bundle: Path, policy: Path) -> None:
    from airpack.ops.manage import RemoveOptions, remove

    remove(RemoveOptions(registry=installed, name="acme/tiny"))
    do_install(bundle, installed, policy)
    code, doc, _ = _check_cli(installed, "--trust", policy)
    assert code == 0, doc


# -- crashes: after recovery the registry checks clean ----------------------------------------------------


@pytest.mark.parametrize("step", ["blobs", "snapshots", "committed", "refs"])
def test_after_a_crash_and_recovery_the_registry_checks_clean(installed: Path, make_bundle: Callable[..., Path],
                                                              tiny_model: Path, tmp_path: Path, policy: Path, step: str) -> None:
    from registry_fixtures import variant_model

    v2 = variant_model(tiny_model, tmp_path / "v2", extra={"extra.json": b'{"v": 2}\n'})
    b2 = make_bundle(sequence=2, model_dir=v2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRPACK_")}
    env[CRASH_ENV] = step
    r = subprocess.run([*AIRPACK, "install", str(b2), "--registry", str(installed), "--trust", str(policy)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    recover(installed)
    code, doc, _ = _check_cli(installed, "--trust", policy)
    assert code == 0, doc
    digest2 = hashlib.sha256((b2 / "manifest.json").read_bytes()).hexdigest()
    assert (installed / "bundles" / digest2).exists() == (step in ("committed", "refs"))


def test_links_are_relative_to_the_blob() -> None:
    assert link_target("a/b.json", "0" * 64) == "../../../blobs/" + "0" * 64


class _Recorder:
    """A Progress that remembers each task's total and how far it advanced (from any thread)."""

    def __init__(self) -> None:
        self.tasks: list[list[Any]] = []

    def task(self, label: str, total: int, *, unit: str = "B") -> Any:
        rec: list[Any] = [label, total, 0]
        self.tasks.append(rec)
        import threading

        lock = threading.Lock()

        class _T:
            def advance(self, n: int) -> None:
                with lock:
                    rec[2] += n

            def close(self) -> None:
                pass

        return _T()

    def message(self, text: str) -> None:
        pass


def test_the_rehash_reports_progress_over_every_byte(installed: Path) -> None:
    rec = _Recorder()
    r = check(CheckOptions(registry=installed, progress=rec, workers=4))
    [(label, total, done)] = rec.tasks
    assert label.startswith("check ") and total == r.bytes and done == total > 0


def test_an_unusable_policy_is_a_usage_error(installed: Path, make_policy: Callable[..., Path], alice: KeyPair) -> None:
    before = registry_state(installed)
    code, doc, _ = _check_cli(installed, "--trust", make_policy(alice, threshold=2, name="two.json"))
    assert code == 2 and doc["error"]["exit_code"] == 2
    assert registry_state(installed) == before
