"""Resume that costs nothing: the journal keeps finished files unread and partial files per range.

A first run is cut off (its ranges fail past the retry budget); the second
run must fetch only the bytes not yet on disk, must not read a finished file
again unless it changed on disk, and must treat a damaged journal as absent
(warned, every finished file re-verified by hash, nothing trusted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import AIRPACK, verify
from hub_helpers import BIG, SEG, Packer, model_dir, with_big_file
from hubserver import Fault, HubServer

import airpack.ops._pack_hub as pack_hub
from airpack.fetch.journal import JOURNAL_NAME, JournalDamaged, merge, missing, parse
from airpack.ops.pack import STAGING_DIR
from airpack.progress import NULL_PROGRESS

OPTS: dict[str, Any] = {"connections": 4, "segment_size": SEG, "retries": 0, "retry_base": 0.001}
pytest_plugins = ("hub_fixtures",)


@pytest.fixture(scope="module")
def big_files(tiny_files: dict[str, bytes]) -> dict[str, bytes]:
    return with_big_file(tiny_files, mib=3, seed=3)


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the finished files that were read again to be hashed."""
    seen: list[str] = []
    real = pack_hub.whole_file_matches

    def spy(path: Path, f: Any, **kw: Any) -> Any:
        seen.append(f.path)
        return real(path, f, **kw)

    monkeypatch.setattr(pack_hub, "whole_file_matches", spy)
    return seen


def _interrupted(packer: Packer, hub: HubServer, out: Path) -> None:
    """A first run whose big file loses a connection mid-range and then gets 503s: exit 7, the rest finished."""
    hub.inject("acme/tiny", BIG, Fault("drop", after=SEG // 3), Fault("status", status=503, times=None))
    with pytest.raises(Exception) as ei:
        packer.pack(packer.spec(), out=out, **OPTS)
    assert getattr(ei.value, "exit_code", None) == 7
    hub.clear_faults()


def test_resume_fetches_only_missing_bytes_and_reads_no_finished_file(
        packer: Packer, hub: HubServer, big_files: dict[str, bytes], policy: Path, hashed: list[str]) -> None:
    hub.commit("acme/tiny", big_files)
    out = packer.tmp / "out"
    _interrupted(packer, hub, out)
    size = len(big_files[BIG])
    journal = out / STAGING_DIR / "hub" / JOURNAL_NAME
    # What the first run holds of the big file: the bytes it received before the cut (a reset may lose some in flight).
    first = sum(b - a for a, b in parse(journal.read_bytes()).get(hub_sha(hub, BIG), _NoEntry()).intervals)
    assert 0 <= first <= sum(q.sent for q in hub.downloads("acme/tiny", BIG)) < size
    before = len(hub.requests)
    r = packer.pack(packer.spec(), out=out, **OPTS)
    again = [q for q in hub.requests[before:] if q.method == "GET" and q.file]
    assert {q.file for q in again} == {BIG}  # finished files: not fetched again
    assert hashed == []  # ... and not even read again: the journal vouches for them
    assert sum(q.sent for q in again) == size - first  # only what the first run did not get
    doc = r.to_json()["hub"]
    assert doc["resumed_bytes"] == doc["bytes"] - (size - first) and doc["downloaded_bytes"] == size - first
    assert (model_dir(r.out) / BIG).read_bytes() == big_files[BIG]
    verify(r.out, policy)


def test_a_finished_file_changed_on_disk_is_verified_again(packer: Packer, hub: HubServer, big_files: dict[str, bytes],
                                                          policy: Path, hashed: list[str]) -> None:
    hub.commit("acme/tiny", big_files)
    out = packer.tmp / "out"
    _interrupted(packer, hub, out)
    victim = model_dir(out) / "config.json"
    victim.write_bytes(victim.read_bytes().replace(b"llama", b"LLAMA"))  # same size, other bytes, new mtime
    before = len(hub.requests)
    r = packer.pack(packer.spec(), out=out, **OPTS)
    assert hashed == ["config.json"]
    assert "config.json" in {q.file for q in hub.requests[before:] if q.method == "GET"}
    assert (model_dir(r.out) / "config.json").read_bytes() == big_files["config.json"]
    verify(r.out, policy)


def test_a_damaged_journal_is_ignored_with_a_warning(packer: Packer, hub: HubServer, big_files: dict[str, bytes],
                                                    policy: Path, hashed: list[str]) -> None:
    sha = hub.commit("acme/tiny", big_files)
    out = packer.tmp / "out"
    _interrupted(packer, hub, out)
    journal = out / STAGING_DIR / "hub" / JOURNAL_NAME
    journal.write_bytes(journal.read_bytes() + b'{"v": 1, "id": "zz", "evil": true}\n')
    messages: list[str] = []

    class Rec:
        def task(self, label: str, total: int, *, unit: str = "B") -> Any:
            return NULL_PROGRESS.task(label, total)

        def message(self, text: str) -> None:
            messages.append(text)

    r = packer.pack(packer.spec(), out=out, progress=Rec(), **OPTS)
    assert any("ignoring the resume journal" in m for m in messages)
    done = set(hub.repos["acme/tiny"].commits[sha]) - {BIG}
    assert set(hashed) == done  # every finished file re-verified by hash, none taken on the journal's word
    assert (model_dir(r.out) / BIG).read_bytes() == big_files[BIG]
    verify(r.out, policy)


def test_journal_parsing_is_strict_but_forgives_a_cut_last_line() -> None:
    cid = "a" * 64
    ok = b'{"v":1,"id":"%s","size":10,"seg":[0,4]}\n{"v":1,"id":"%s","size":10,"seg":[4,6]}\n' % (cid.encode(), cid.encode())
    assert parse(ok + b'{"v":1,"id":"')[cid].intervals == [(0, 6)]
    for bad in (b'{"v":1,"id":"%s","size":10,"seg":[0,11]}\n' % cid.encode(),  # past the end
                b'{"v":2,"id":"%s","size":10,"seg":[0,1]}\n' % cid.encode(),  # unknown version
                b'{"v":1,"id":"../x","size":10,"seg":[0,1]}\n',  # not a content id
                b"not json\n", b"x" * 5000 + b"\n"):
        with pytest.raises(JournalDamaged):
            parse(bad)
    assert merge([(5, 8), (0, 2), (2, 5)]) == [(0, 8)]
    assert missing(10, [(2, 4), (6, 7)]) == [(0, 2), (4, 6), (7, 10)]


def test_a_dry_run_leaves_the_journal_untouched(packer: Packer, hub: HubServer, big_files: dict[str, bytes]) -> None:
    hub.commit("acme/tiny", big_files)
    out = packer.tmp / "out"
    _interrupted(packer, hub, out)
    journal = out / STAGING_DIR / "hub" / JOURNAL_NAME
    before = journal.read_bytes()
    packer.pack(packer.spec(), out=out, dry_run=True)
    assert journal.read_bytes() == before


def test_resume_after_sigkill_mid_file(packer: Packer, hub: HubServer, big_files: dict[str, bytes], alice: Any,
                                       clean_env: dict[str, str], policy: Path) -> None:
    """A pack killed with SIGKILL mid-file: the rerun fetches only what the journal does not hold."""
    import os
    import signal
    import subprocess
    import time

    hub.commit("acme/tiny", big_files)
    size = len(big_files[BIG])
    hub.inject("acme/tiny", BIG, Fault("stall", after=size // 2, seconds=60, times=None))
    out = packer.tmp / "out"
    spec = packer.spec()
    err = packer.tmp / "stderr.txt"
    with open(err, "wb") as errf:
        proc = subprocess.Popen([*AIRPACK, "pack", str(spec), "--out", str(out), "--key", str(alice.key),
                                 "--endpoint", hub.url, "-q", "--connections", "4"],
                                env=clean_env, stdout=subprocess.DEVNULL, stderr=errf)
    journal = out / STAGING_DIR / "hub" / JOURNAL_NAME
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if journal.is_file() and b"seg" in journal.read_bytes() and (model_dir(out) / "config.json").is_file():
                sent = sum(q.sent for q in hub.downloads("acme/tiny", BIG)) if hub.downloads("acme/tiny", BIG) else 0
                if journal.read_bytes().count(b'"seg"') >= 2 or sent:
                    break
            time.sleep(0.05)
        time.sleep(0.3)  # let the stalled range settle its last checkpoint
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    hub.clear_faults()
    assert journal.is_file(), err.read_text()
    kept = sum(b - a for a, b in parse(journal.read_bytes()).get(hub_sha(hub, BIG), _NoEntry()).intervals)
    assert kept >= 1 << 20  # at least one checkpoint of the stalled range survived the kill
    before = len(hub.requests)
    r = packer.pack(spec, out=out, **OPTS)
    again = [q for q in hub.requests[before:] if q.method == "GET" and q.file == BIG]
    assert sum(q.sent for q in again) == size - kept
    assert (model_dir(r.out) / BIG).read_bytes() == big_files[BIG]
    verify(r.out, policy)


class _NoEntry:
    intervals: tuple[tuple[int, int], ...] = ()


def hub_sha(hub: HubServer, path: str) -> str:
    repo = hub.repos["acme/tiny"]
    return repo.commits[repo.refs["main"]][path].sha256
