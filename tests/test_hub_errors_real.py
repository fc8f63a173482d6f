"""The Hub's real error answers, one line and the right exit code each: gated (401/403), bad token, full disk.

The test Hub answers as huggingface.co does: 401 ``GatedRepo`` without a
token or with one it does not know, 403 ``GatedRepo`` for a valid account
that was not granted the repo. A disk that fills while a range is written is
exit 8 naming the file, and the journal still describes what is on disk.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from hub_helpers import Packer
from hubserver import OUTSIDER_TOKEN, HubServer

import airpack.fetch.segments as seg_mod
from airpack.errors import DiskSpaceError, FetchError, GatedRepoError
from airpack.fetch.journal import JOURNAL_NAME, parse
from airpack.ops.pack import STAGING_DIR

pytest_plugins = ("hub_fixtures",)
SHARD = "model-00001-of-00002.safetensors"


@pytest.mark.parametrize(("token", "words"), [(OUTSIDER_TOKEN, "gated"), ("hf_unknownTOKEN000000000000000", "token")])
def test_gated_repo_with_a_token_that_has_no_access(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes],
                                                    token: str, words: str) -> None:
    hub.create_repo("acme/tiny", gated=True)
    hub.commit("acme/tiny", tiny_files)
    with pytest.raises(FetchError) as ei:
        packer.pack(packer.spec(), token=token, retries=1, retry_base=0.001)
    e = ei.value
    assert e.exit_code == 7 and "acme/tiny" in str(e) and words in str(e).lower()
    assert token not in str(e) and token not in e.hint
    assert hub.downloads() == []  # refused at planning: no byte fetched
    if token == OUTSIDER_TOKEN:
        assert isinstance(e, GatedRepoError)


def test_disk_full_while_writing_a_range_is_exit_8_and_the_journal_stays_true(
        packer: Packer, hub: HubServer, tiny_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    hub.commit("acme/tiny", tiny_files)
    real = seg_mod.os.pwrite
    calls = [0]

    def pwrite(fd: int, data: Any, pos: int) -> int:
        calls[0] += 1
        if calls[0] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, pos)

    monkeypatch.setattr(seg_mod.os, "pwrite", pwrite)
    out = packer.tmp / "out"
    with pytest.raises(DiskSpaceError) as ei:
        packer.pack(packer.spec(), out=out, connections=1, segment_size=64 * 1024, retries=0)
    assert ei.value.exit_code == 8 and ".part" in str(ei.value) and "no space" in str(ei.value)
    staging = out / STAGING_DIR / "hub"
    entries = parse((staging / JOURNAL_NAME).read_bytes())
    assert any(e.intervals for e in entries.values())  # else the check below holds of nothing
    for cid, entry in entries.items():  # every journaled byte is really in its partial file
        part = staging / f"{cid}.part"
        if entry.intervals:
            assert part.stat().st_size >= entry.intervals[-1][1]
    monkeypatch.undo()
    r = packer.pack(packer.spec(), out=out, connections=1, segment_size=64 * 1024)
    assert r.manifest is not None and not (r.out / STAGING_DIR).exists()
    assert not list(Path(r.out).rglob("*.part"))
