"""The audit log: one hash-chained line per attempt; ``airpack log verify`` names the first broken line."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeyPair, run_cli
from registry_fixtures import audit_lines, do_install

from airpack.errors import AuditLogError, RollbackError, SignatureError
from airpack.ops.manage import RemoveOptions, remove
from airpack.registry import GENESIS, Registry


@pytest.fixture
def logged(make_bundle: Callable[..., Path], bob: KeyPair, policy: Path, tmp_path: Path) -> Path:
    """A registry with five audit lines: installed, noop, refused (untrusted signer), refused (rollback), removed."""
    reg = tmp_path / "registry"
    b1 = make_bundle(sequence=3)
    do_install(b1, reg, policy)
    do_install(b1, reg, policy)
    with pytest.raises(SignatureError):
        do_install(make_bundle(sequence=4, signer=bob), reg, policy)
    with pytest.raises(RollbackError):
        do_install(make_bundle(sequence=2), reg, policy)
    remove(RemoveOptions(registry=reg, name="acme/tiny"))
    return reg


def _lines(reg: Path) -> list[bytes]:
    return (reg / "audit.log").read_bytes().splitlines(keepends=True)


def test_every_attempt_leaves_one_line_with_its_fields(logged: Path, alice: KeyPair) -> None:
    lines = audit_lines(logged)
    assert [x["result"] for x in lines] == ["installed", "noop", "refused", "refused", "removed"]
    first = lines[0]
    for key in ("time", "user", "command", "bundle", "manifest_sha256", "signers", "result", "prev", "sha256", "txn"):
        assert key in first
    assert first["command"] == "install" and first["signers"] == [alice.signer.keyid]
    assert first["bundle"] == {"name": "tiny", "channel": "tiny", "sequence": 3}
    assert lines[2]["error"]["type"] == "SignatureError"
    assert lines[3]["error"]["type"] == "RollbackError" and lines[3]["manifest_sha256"]
    # Each line holds the SHA-256 of the line before.
    raw = _lines(logged)
    assert lines[0]["prev"] == GENESIS
    for i in range(1, len(raw)):
        assert lines[i]["prev"] == hashlib.sha256(raw[i - 1].rstrip(b"\n")).hexdigest()


def test_log_verify_ok(logged: Path) -> None:
    r = run_cli("log", "verify", "--registry", logged, "--json")
    assert r.returncode == 0, r.stdout
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["lines"] == 5
    assert doc["head_sha256"] == hashlib.sha256(_lines(logged)[-1].rstrip(b"\n")).hexdigest()


def _write(reg: Path, lines: list[bytes]) -> None:
    (reg / "audit.log").write_bytes(b"".join(lines))


def _broken_line(reg: Path) -> tuple[int, str]:
    r = run_cli("log", "verify", "--registry", reg, "--json")
    assert r.returncode == 3, r.stdout
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "AuditLogError"
    return err["line"], err["message"]


def test_edited_line_is_named(logged: Path) -> None:
    lines = _lines(logged)
    lines[2] = lines[2].replace(b'"result":"refused"', b'"result":"installed"')
    _write(logged, lines)
    line, msg = _broken_line(logged)
    assert line == 3 and "line 3 was edited" in msg


def test_edited_line_with_its_own_hash_recomputed_breaks_the_next(logged: Path) -> None:
    lines = _lines(logged)
    rec = json.loads(lines[1])
    rec["user"] = "mallory"
    rec.pop("sha256")
    body = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    rec["sha256"] = hashlib.sha256(body).hexdigest()
    lines[1] = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    _write(logged, lines)
    line, msg = _broken_line(logged)
    assert line == 3 and "does not follow line 2" in msg


@pytest.mark.parametrize("how,expected", [("delete", 3), ("swap", 2), ("truncate", 5), ("garbage", 4)])
def test_removed_reordered_or_truncated_lines_are_named(logged: Path, how: str, expected: int) -> None:
    lines = _lines(logged)
    if how == "delete":
        del lines[2]
    elif how == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    elif how == "truncate":
        lines[4] = lines[4][:40]
    else:
        lines[3] = b"not json\n"
    _write(logged, lines)
    assert _broken_line(logged)[0] == expected


def test_api_raises_with_line(logged: Path) -> None:
    lines = _lines(logged)
    lines[0] = lines[0].replace(b'"command":"install"', b'"command":"remove"')
    _write(logged, lines)
    with pytest.raises(AuditLogError) as ei:
        Registry.open(logged).verify_log()
    assert ei.value.line == 1


def test_partial_line_from_a_crash_is_dropped_and_noted(logged: Path, make_bundle: Callable[..., Path], policy: Path) -> None:
    with open(logged / "audit.log", "ab") as f:
        f.write(b'{"time":"2026-')  # a write cut short by a power loss
    do_install(make_bundle(sequence=9), logged, policy)
    last = audit_lines(logged)[-1]
    assert last["result"] == "installed" and last["dropped_partial_bytes"] == len(b'{"time":"2026-')
    assert run_cli("log", "verify", "--registry", logged).returncode == 0


def test_empty_registry_log_verifies(tmp_path: Path, bundle: Path, policy: Path) -> None:
    reg = tmp_path / "r"
    do_install(bundle, reg, policy)
    (reg / "audit.log").unlink()
    rep = Registry.open(reg).verify_log()
    assert rep.lines == 0 and rep.head == GENESIS
