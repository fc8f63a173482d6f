"""Bad links and bad bytes: retries, resuming an interrupted pack, wrong bytes, a full disk.

Resuming is judged by hash: a file already in the output folder is kept only
if it hashes to what the Hub lists; a partial download is finished with a
range request from where the resume journal says its bytes end; nothing
already whole is downloaded again. These tests use one connection (one
stream per file) so the request pattern is exact; tests/test_hub_segments.py
and tests/test_hub_journal_resume.py cover many ranges at once.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import verify
from hub_helpers import BIG, Packer, model_dir, with_big_file
from hubserver import Fault, HubServer
from hypothesis import given, settings
from hypothesis import strategies as st

from airpack.errors import DiskSpaceError, FetchError, IntegrityError
from airpack.ops.pack import STAGING_DIR

SHARD = "model-00001-of-00002.safetensors"
# Where the cuts fall in the big file (any offset works: the engine keeps every byte it wrote).
CLIENT_CHUNK = 10 * 1024 * 1024
FAST = {"connections": 1, "retries": 2, "retry_base": 0.001}

pytest_plugins = ("hub_fixtures",)


@pytest.fixture(scope="module")
def big_files(tiny_files: dict[str, bytes]) -> dict[str, bytes]:
    """The tiny model plus a 24 MiB safetensors file, so a transfer can be cut after a whole client chunk."""
    return with_big_file(tiny_files, mib=24, seed=7)


# -- wrong bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize("victim", [SHARD, "config.json"])
def test_bytes_that_differ_from_the_hub_listing_are_refused(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes],
                                                            victim: str) -> None:
    """Same size, one byte flipped: LFS files are checked by sha256, git files by blob sha1."""
    hub.commit("acme/tiny", tiny_files)
    hub.inject("acme/tiny", victim, Fault("corrupt", times=None))
    out = packer.tmp / "out"
    with pytest.raises(IntegrityError) as ei:
        packer.pack(packer.spec(), out=out)
    assert ei.value.exit_code == 3 and victim in str(ei.value)
    assert ("sha256" if victim.endswith(".safetensors") else "git sha1") in str(ei.value)
    assert not (model_dir(out) / victim).exists()  # nothing of the bad bytes is kept
    assert not list((out / STAGING_DIR).rglob("*.part"))


def test_a_cdn_serving_another_size_than_the_hub_lists_is_exit_7(packer: Packer, hub: HubServer,
                                                                 tiny_files: dict[str, bytes]) -> None:
    """The Hub lists and announces one size, its CDN serves another: a fetch error naming the file, nothing kept.

    (A HEAD that itself contradicts the listing is exit 3: tests/test_hub_errors_real.py.)"""
    hub.commit("acme/tiny", tiny_files)
    hub.serve_other_bytes("acme/tiny", SHARD, tiny_files[SHARD] + b"extra")
    out = packer.tmp / "out"
    with pytest.raises(FetchError) as ei:
        packer.pack(packer.spec(), out=out, **FAST)
    assert ei.value.exit_code == 7 and SHARD in str(ei.value) and "CDN" in str(ei.value)
    assert not (model_dir(out) / SHARD).exists()


# -- bad links --------------------------------------------------------------------------------


def test_connection_dropped_mid_file_is_retried_with_a_range(packer: Packer, hub: HubServer, big_files: dict[str, bytes],
                                                             policy: Path) -> None:
    hub.commit("acme/tiny", big_files)
    size = len(big_files[BIG])
    cut = CLIENT_CHUNK + (size - CLIENT_CHUNK) // 2
    hub.inject("acme/tiny", BIG, Fault("drop", after=cut))
    r = packer.pack(packer.spec(), **FAST)
    gets = hub.downloads("acme/tiny", BIG)
    assert len(gets) == 2 and gets[0].range is None and gets[0].sent == cut
    start = int(gets[1].range.removeprefix("bytes=").rstrip("-"))  # type: ignore[union-attr]
    assert start == cut and gets[1].sent == size - start  # resumed at the very byte where the cut fell
    assert (model_dir(r.out) / BIG).read_bytes() == big_files[BIG]
    verify(r.out, policy)


def test_interrupted_pack_resumes_without_fetching_whole_files_again(
    packer: Packer, hub: HubServer, big_files: dict[str, bytes], policy: Path
) -> None:
    hub.commit("acme/tiny", big_files)
    size = len(big_files[BIG])
    cut = CLIENT_CHUNK + (size - CLIENT_CHUNK) // 2
    # First run: the big shard drops half way, then the Hub answers 503 until the run gives up.
    hub.inject("acme/tiny", BIG, Fault("drop", after=cut), Fault("status", status=503, times=None))
    spec, out = packer.spec(), packer.tmp / "out"
    with pytest.raises(FetchError) as ei:
        packer.pack(spec, out=out, **FAST)
    assert ei.value.exit_code == 7 and BIG in str(ei.value) and "next run" in str(ei.value)
    whole = {p.relative_to(model_dir(out)).as_posix() for p in model_dir(out).rglob("*") if p.is_file()}
    assert whole and BIG not in whole
    parts = list((out / STAGING_DIR).rglob("*.part"))
    assert len(parts) == 1
    kept = parts[0].stat().st_size
    assert 0 < kept <= cut and parts[0].read_bytes() == big_files[BIG][:kept]

    # Between runs someone overwrites a finished file with other bytes of the same size:
    # its name is right, its hash is not, so it must be fetched again.
    victim = sorted(whole)[0]
    (model_dir(out) / victim).write_bytes(b"\0" * (model_dir(out) / victim).stat().st_size)

    hub.clear_faults()
    before = len(hub.requests)
    r = packer.pack(spec, out=out, **FAST)
    second = [q for q in hub.requests[before:] if q.method == "GET" and q.file]
    fetched = {q.file for q in second}
    assert victim in fetched
    assert not (whole - {victim}) & fetched  # whole files are not downloaded again
    big = [q for q in second if q.file == BIG]
    assert [q.range for q in big] == [f"bytes={kept}-"] and big[0].sent == size - kept
    for rel, data in big_files.items():
        assert (model_dir(r.out) / rel).read_bytes() == data
    assert not (r.out / STAGING_DIR).exists()
    verify(r.out, policy)


def test_a_partial_no_journal_vouches_for_is_fetched_again(packer: Packer, hub: HubServer,
                                                          big_files: dict[str, bytes], policy: Path) -> None:
    """Bytes in a partial file that no journal line records are never trusted: the file is fetched from zero."""
    sha = hub.commit("acme/tiny", big_files)
    blob = hub.repos["acme/tiny"].commits[sha][BIG]
    spec, out = packer.spec(), packer.tmp / "out"
    (out / STAGING_DIR / "hub").mkdir(parents=True)
    (out / ".airpack-partial").touch()
    (out / STAGING_DIR / "hub" / f"{blob.sha256}.part").write_bytes(b"\xff" * 1000)  # not the file's first bytes
    r = packer.pack(spec, out=out, **FAST)
    ranges = [q.range for q in hub.downloads("acme/tiny", BIG)]
    assert ranges == [None]
    assert (model_dir(r.out) / BIG).read_bytes() == big_files[BIG]
    verify(r.out, policy)


def test_leftovers_of_another_spec_are_not_signed(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes],
                                                  policy: Path) -> None:
    hub.commit("acme/tiny", {**tiny_files, "README.md": "hello"})
    out = packer.tmp / "out"
    hub.inject("acme/tiny", "tokenizer.json", Fault("status", status=500, times=None))
    with pytest.raises(FetchError):
        packer.pack(packer.spec(), out=out, **FAST)
    assert (model_dir(out) / "README.md").exists()
    hub.clear_faults()
    r = packer.pack(packer.spec(model_extra='exclude = ["README.md"]'), out=out)
    assert not (model_dir(r.out) / "README.md").exists()
    verify(r.out, policy)


# -- disk space ----------------------------------------------------------------------------------


Usage = namedtuple("Usage", "total used free")


def test_not_enough_disk_is_exit_8_before_downloading(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    hub.commit("acme/tiny", tiny_files)
    import airpack.ops._pack_hub as ph

    monkeypatch.setattr(ph.shutil, "disk_usage", lambda p: Usage(10 << 30, (10 << 30) - 4096, 4096))
    for dry in (True, False):
        with pytest.raises(DiskSpaceError) as ei:
            packer.pack(packer.spec(), out=packer.tmp / "out", dry_run=dry)
        assert ei.value.exit_code == 8 and "free" in str(ei.value)
    assert hub.downloads() == []


def test_preflight_counts_only_what_is_still_missing(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes],
                                                     monkeypatch: pytest.MonkeyPatch, policy: Path) -> None:
    """A resumed pack needs room only for the files it does not have yet."""
    import airpack.ops._pack_hub as ph

    hub.commit("acme/tiny", tiny_files)
    spec, out = packer.spec(), packer.tmp / "out"
    hub.inject("acme/tiny", "tokenizer_config.json", Fault("status", status=500, times=None))
    with pytest.raises(FetchError):
        packer.pack(spec, out=out, **FAST)
    hub.clear_faults()
    missing = sum(len(v) for k, v in tiny_files.items() if not (model_dir(out) / k).is_file())
    seen: list[int] = []
    real = shutil.disk_usage

    def fake(p: str) -> Usage:
        seen.append(1)
        return Usage(real(p).total, 0, ph.DISK_RESERVE + missing + 1)

    monkeypatch.setattr(ph.shutil, "disk_usage", fake)
    r = packer.pack(spec, out=out)
    assert seen and r.manifest is not None
    verify(r.out, policy)


# -- property: whole files are judged by their bytes ------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(data=st.binary(min_size=1, max_size=4096), lfs=st.booleans(), flip=st.integers(min_value=0))
def test_a_file_is_kept_only_if_its_bytes_hash_to_the_listing(tmp_path_factory: pytest.TempPathFactory, data: bytes,
                                                             lfs: bool, flip: int) -> None:
    from hubserver import git_sha1

    from airpack.fetch.hub import HubFile, whole_file_matches

    f = HubFile(path="x.bin", size=len(data), blob_id=git_sha1(data),
                sha256=hashlib.sha256(data).hexdigest() if lfs else None)
    p = tmp_path_factory.mktemp("prop") / "x.bin"
    p.write_bytes(data)
    assert whole_file_matches(p, f) is not None
    bad = bytearray(data)
    bad[flip % len(data)] ^= 0x01
    p.write_bytes(bytes(bad))
    assert whole_file_matches(p, f) is None
