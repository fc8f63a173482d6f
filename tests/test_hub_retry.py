"""Transient failures are retried per range, with a fresh HEAD, bounded; then the pack stops naming the file.

Backoffs are tiny here (``retry_base``); a server's own wait (``Retry-After``,
``RateLimit`` ``t=``) is recorded through a patched ``time.sleep`` so the
tests check that it is honoured without waiting for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import verify
from hub_helpers import BIG, SEG, TOKEN, Packer, with_big_file
from hubserver import Fault, HubServer

import airpack.fetch.segments as seg_mod
from airpack.errors import FetchError
from airpack.fetch.segments import backoff, retry_wait
from airpack.progress import NULL_PROGRESS

FAST: dict[str, Any] = {"connections": 4, "segment_size": SEG, "retries": 3, "retry_base": 0.001}
pytest_plugins = ("hub_fixtures",)


@pytest.fixture(scope="module")
def big_files(tiny_files: dict[str, bytes]) -> dict[str, bytes]:
    return with_big_file(tiny_files, mib=2, seed=5)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr(seg_mod.time, "sleep", lambda s: waits.append(s))
    return waits


def _heads(hub: HubServer, file: str) -> int:
    return sum(1 for q in hub.requests if q.method == "HEAD" and q.path.endswith("/" + file))


def test_retry_wait_reads_ratelimit_then_retry_after() -> None:
    assert retry_wait({"ratelimit": '"api";r=0;t=7', "retry-after": "3"}) == 7.0
    assert retry_wait({"retry-after": "3"}) == 3.0
    assert retry_wait({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412480.0 - 10) == 10.0
    assert retry_wait({"retry-after": "soon"}) is None and retry_wait({}) is None
    assert backoff(3, 1.0, 60.0, 500.0) == 60.0  # a server's wish is capped
    assert 2.0 <= backoff(3, 1.0, 60.0, None) <= 4.0  # exponential with jitter


@pytest.mark.parametrize("fault", [Fault("status", status=503), Fault("drop", after=1000),
                                   Fault.rate_limited(reset=2)], ids=["503", "drop", "429"])
def test_a_transient_failure_on_one_range_is_retried_after_a_fresh_head(
        packer: Packer, hub: HubServer, big_files: dict[str, bytes], policy: Path, sleeps: list[float],
        fault: Fault) -> None:
    hub.commit("acme/tiny", big_files)
    hub.inject("acme/tiny", BIG, fault)
    r = packer.pack(packer.spec(), **FAST)
    assert (r.out / "models" / "acme--tiny" / BIG).read_bytes() == big_files[BIG]
    assert r.to_json()["hub"]["retries"] == 1
    assert _heads(hub, BIG) == 2  # the plan's HEAD, then a fresh one for the retry
    if fault.status == 429:
        assert sleeps == [2.0]  # RateLimit's t= honoured
    verify(r.out, policy)


def test_an_expired_signed_url_is_refreshed(packer: Packer, hub: HubServer, big_files: dict[str, bytes],
                                           sleeps: list[float]) -> None:
    hub.commit("acme/tiny", big_files)
    hub.inject("acme/tiny", BIG, Fault("expire", times=2))
    r = packer.pack(packer.spec(), **FAST)
    assert (r.out / "models" / "acme--tiny" / BIG).read_bytes() == big_files[BIG]
    assert r.to_json()["hub"]["retries"] == 2 and _heads(hub, BIG) >= 2


@pytest.fixture
def ttl_hub() -> Iterator[HubServer]:
    with HubServer(token=TOKEN, url_ttl=1.0) as server:
        yield server


def test_urls_that_really_expire_between_plan_and_fetch(ttl_hub: HubServer, tmp_path: Path, alice: Any,
                                                        clean_env: dict[str, str], big_files: dict[str, bytes]) -> None:
    """The plan's HEADs give URLs valid for 1 s; the fetch starts later: every range gets a fresh URL and works."""
    import time

    ttl_hub.commit("acme/tiny", big_files)
    packer = Packer(hub=ttl_hub, tmp=tmp_path, signer=alice.signer)

    class Slow:
        def task(self, label: str, total: int, *, unit: str = "B") -> Any:
            if label.startswith("acme/"):
                time.sleep(2.5)  # the overall bar opens when fetching starts, after planning (Expires: whole seconds)
            return NULL_PROGRESS.task(label, total)

        def message(self, text: str) -> None:
            pass

    r = packer.pack(packer.spec(), progress=Slow(), **FAST)
    assert (r.out / "models" / "acme--tiny" / BIG).read_bytes() == big_files[BIG]
    assert [q for q in ttl_hub.requests if q.origin == "cdn" and q.status == 403], [
        (q.origin, q.method, q.status, q.file) for q in ttl_hub.requests if q.file == BIG or q.origin == "cdn"]
    assert r.to_json()["hub"]["retries"] >= 1


def test_retries_are_bounded_then_exit_7_names_the_file_and_what_is_kept(
        packer: Packer, hub: HubServer, big_files: dict[str, bytes], sleeps: list[float]) -> None:
    hub.commit("acme/tiny", big_files)
    hub.inject("acme/tiny", BIG, Fault("drop", after=SEG // 2), Fault("status", status=502, times=None))
    out = packer.tmp / "out"
    with pytest.raises(FetchError) as ei:
        packer.pack(packer.spec(), out=out, **FAST)
    msg = str(ei.value)
    assert ei.value.exit_code == 7 and "acme/tiny/big.safetensors" in msg and "HTTP 502" in msg
    assert "gave up after 3 retries" in msg and "kept for the next run" in msg
    assert len(sleeps) >= 3 and all(s < 1 for s in sleeps)  # tiny backoff: no server wait was given
    assert (out / "models" / "acme--tiny" / "config.json").is_file()  # the other files finished


@pytest.mark.parametrize("status", [404, 401])
def test_a_definite_answer_is_not_retried(packer: Packer, hub: HubServer, big_files: dict[str, bytes], status: int,
                                          sleeps: list[float]) -> None:
    hub.commit("acme/tiny", big_files)
    hub.inject("acme/tiny", BIG, Fault("status", status=status, times=None))
    with pytest.raises(FetchError) as ei:
        packer.pack(packer.spec(), connections=1, retries=3, retry_base=0.001)
    assert ei.value.exit_code == 7 and BIG in str(ei.value) and f"HTTP {status}" in str(ei.value)
    assert len(hub.downloads("acme/tiny", BIG)) == 1 and sleeps == []

