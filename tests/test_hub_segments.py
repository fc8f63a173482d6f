"""The segmented engine against the test Hub: a large file as many concurrent ranges, every byte hashed once.

Small segment sizes (passed through PackOptions) make a few-MiB file take
the paths a 100 GB file takes: many ranges over a shared connection budget,
checked ``Content-Range``, an in-order hash over what was written.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from conftest import verify
from hub_helpers import BIG, SEG, Packer, with_big_file
from hubserver import HubServer

from airpack.fetch.journal import merge
from airpack.fetch.segments import EngineOptions, segment_length

pytest_plugins = ("hub_fixtures",)


@pytest.fixture(scope="module")
def big_files(tiny_files: dict[str, bytes]) -> dict[str, bytes]:
    return with_big_file(tiny_files, mib=3, seed=11)


def _ranges(hub: HubServer, file: str) -> list[tuple[int, int]]:
    out = []
    for q in hub.downloads("acme/tiny", file):
        m = re.match(r"bytes=(\d+)-(\d*)$", q.range or "")
        assert m, f"a GET without a range: {q}"
        out.append((int(m.group(1)), int(m.group(2)) + 1 if m.group(2) else -1))
    return out


def test_a_large_file_is_fetched_as_many_ranges_each_once(packer: Packer, hub: HubServer, big_files: dict[str, bytes],
                                                          policy: Path) -> None:
    sha = hub.commit("acme/tiny", big_files)
    served = hub.repos["acme/tiny"].commits[sha]
    size = len(big_files[BIG])
    r = packer.pack(packer.spec(), connections=6, segment_size=SEG)
    ranges = _ranges(hub, BIG)
    seg = segment_length(size, EngineOptions(connections=6, segment_size=SEG))
    assert len(ranges) == -(-size // seg) > 6  # more ranges than connections: the queue feeds them
    spans = [(a, size if b == -1 else b) for a, b in ranges]
    assert sum(b - a for a, b in spans) == size and merge(spans) == [(0, size)]  # every byte asked for exactly once
    assert (r.out / "models" / "acme--tiny" / BIG).read_bytes() == big_files[BIG]
    hub_doc = r.to_json()["hub"]
    assert hub_doc["connections"] == 6 and hub_doc["files"] == len(served)
    assert hub_doc["downloaded_bytes"] == hub_doc["bytes"] == sum(b.size for b in served.values())
    assert hub_doc["resumed_bytes"] == 0 and hub_doc["retries"] == 0 and hub_doc["seconds"] >= 0
    verify(r.out, policy)


def test_the_connection_budget_holds_across_files(packer: Packer, hub: HubServer, big_files: dict[str, bytes]) -> None:
    """Never more GETs of file bytes open at once than --connections, whatever the number of files or CPUs."""
    hub.commit("acme/tiny", big_files)
    open_now, peak, lock = [0], [0], threading.Lock()
    import airpack.fetch.segments as seg_mod

    real_write = seg_mod.Engine._write_body

    def counting(self: seg_mod.Engine, seg: object, resp: object, pos: int) -> int:
        with lock:
            open_now[0] += 1
            peak[0] = max(peak[0], open_now[0])
        try:
            return real_write(self, seg, resp, pos)  # type: ignore[arg-type]
        finally:
            with lock:
                open_now[0] -= 1

    mp = pytest.MonkeyPatch()
    mp.setattr(seg_mod.Engine, "_write_body", counting)
    try:
        packer.pack(packer.spec(), connections=3, segment_size=SEG)
    finally:
        mp.undo()
    assert 1 <= peak[0] <= 3


class _Recorder:
    """A Progress that remembers its tasks (label, total) and how many file bars were open at once."""

    def __init__(self) -> None:
        self.tasks: list[tuple[str, int]] = []
        self.open = 0
        self.peak = 0
        self.lock = threading.Lock()

    def task(self, label: str, total: int, *, unit: str = "B") -> _Recorder.Task:
        with self.lock:
            self.tasks.append((label, total))
            if not label.startswith("acme/"):
                self.open += 1
                self.peak = max(self.peak, self.open)
        return _Recorder.Task(self, label)

    def message(self, text: str) -> None:
        pass

    class Task:
        def __init__(self, rec: _Recorder, label: str) -> None:
            self.rec, self.label, self.n = rec, label, 0

        def advance(self, n: int) -> None:
            self.n += n

        def close(self) -> None:
            if not self.label.startswith("acme/"):
                with self.rec.lock:
                    self.rec.open -= 1


def test_one_overall_bar_and_few_file_bars(packer: Packer, hub: HubServer, big_files: dict[str, bytes]) -> None:
    sha = hub.commit("acme/tiny", big_files)
    rec = _Recorder()
    packer.pack(packer.spec(), connections=4, segment_size=SEG, progress=rec)
    overall = [t for t in rec.tasks if t[0].startswith("acme/tiny @ ")]
    assert len(overall) == 1 and overall[0][1] == sum(b.size for b in hub.repos["acme/tiny"].commits[sha].values())
    files = [t for t in rec.tasks if not t[0].startswith("acme/")]
    assert (BIG, len(big_files[BIG])) in files and rec.peak <= 4  # only files >= 1 MiB, at most 4 at once
    assert all(size >= 1 << 20 for _, size in files)


def test_ranges_through_a_real_nginx(nginx_hub: HubServer, tmp_path: Path, alice: object, clean_env: dict[str, str],
                                     big_files: dict[str, bytes], policy: Path) -> None:
    nginx_hub.commit("acme/tiny", big_files)
    packer = Packer(hub=nginx_hub, tmp=tmp_path, signer=alice.signer)  # type: ignore[attr-defined]
    r = packer.pack(packer.spec(), connections=8, segment_size=SEG)
    assert (r.out / "models" / "acme--tiny" / BIG).read_bytes() == big_files[BIG]
    verify(r.out, policy)


def test_a_server_that_ignores_ranges_gets_one_stream(packer: Packer, hub: HubServer, big_files: dict[str, bytes],
                                                      policy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CDN answering 200 (the whole file) to a range request: the file falls back to one stream from byte 0."""
    import httpx2

    hub.commit("acme/tiny", big_files)
    real = httpx2.Client.stream

    def no_ranges(self: httpx2.Client, method: str, url: str, **kw: object) -> object:
        headers = dict(kw.pop("headers", {}) or {})  # type: ignore[call-overload]
        headers.pop("range", None)
        return real(self, method, url, headers=headers, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(httpx2.Client, "stream", no_ranges)
    r = packer.pack(packer.spec(), connections=4, segment_size=SEG)
    assert (r.out / "models" / "acme--tiny" / BIG).read_bytes() == big_files[BIG]
    assert any(q.status == 200 and q.sent == len(big_files[BIG]) for q in hub.downloads("acme/tiny", BIG))
    verify(r.out, policy)
