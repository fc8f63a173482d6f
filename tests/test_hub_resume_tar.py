"""`pack --format tar` from the Hub resumes like a folder pack: an interrupted run keeps its work folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import verify
from hub_helpers import Packer
from hubserver import Fault, HubServer

from airpack.errors import FetchError
from airpack.ops.export import pack_as_tar
from airpack.ops.pack import PackOptions, pack
from airpack.spec import load_spec

pytest_plugins = ("hub_fixtures",)
VICTIM = "tokenizer.json"


def test_interrupted_tar_pack_resumes_in_its_work_folder(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes],
                                                         policy: Path) -> None:
    hub.commit("acme/tiny", tiny_files)
    spec = load_spec(packer.spec())
    media = packer.tmp / "media"
    media.mkdir()
    tar = media / "tiny.tar"

    def run(out: Path) -> object:
        return pack(PackOptions(spec=spec, out=out, signer=packer.signer, endpoint=hub.url,
                                connections=1, retries=1, retry_base=0.001))

    hub.inject("acme/tiny", VICTIM, Fault("status", status=503, times=None))
    with pytest.raises(FetchError):
        pack_as_tar(run, tar, packer.signer)
    work = media / ".tiny.tar.packing"
    assert work.is_dir() and not tar.exists()  # kept for the next run
    fetched_first = {q.file for q in hub.requests if q.method == "GET" and q.file and q.file != VICTIM}
    assert fetched_first

    hub.clear_faults()
    before = len(hub.requests)
    pack_as_tar(run, tar, packer.signer)
    again = {q.file for q in hub.requests[before:] if q.method == "GET" and q.file}
    assert VICTIM in again
    assert not (fetched_first & again)  # whole files were not downloaded again
    assert [p.name for p in media.iterdir()] == ["tiny.tar"]  # the work folder is gone
    assert verify(tar, policy).manifest.name == "tiny"
