"""Which transport fetches each file, and the hash check around huggingface_hub's Xet path.

No Xet (CAS) server exists for tests: the Xet download itself
(``hf_hub_download``) is replaced by a stand-in that writes the bytes hf_xet
would write, so what is tested is airpack's choice and its check of the
result against the Hub's SHA-256 (exit 3, nothing kept, on a mismatch).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import verify
from hub_helpers import TOKEN, Packer
from hubserver import HubServer

import airpack.fetch.hub as hub_mod
import airpack.ops._pack_hub as pack_hub
from airpack.errors import IntegrityError
from airpack.fetch.hub import HeadInfo, HubFile, Refusal, choose_transport

pytest_plugins = ("hub_fixtures",)
SHARD = "model-00001-of-00002.safetensors"


def _head(*, size: int | None = 10, xet: bool = False) -> HeadInfo:
    return HeadInfo(location="https://cdn/x", size=size, xet=xet)


F = HubFile(path="w.safetensors", size=10, blob_id="0" * 40, sha256="1" * 64)


def test_choose_transport() -> None:
    assert choose_transport(F, _head(xet=True), True) == "xet"
    assert choose_transport(F, _head(xet=True), False) == "http"
    assert choose_transport(F, _head(xet=False), True) == "http"
    big = HubFile(path="huge.safetensors", size=80 * 10**9, blob_id="0" * 40, sha256="1" * 64)
    assert choose_transport(big, _head(size=big.size), False) == "http"  # no 50 GB limit on ranged HTTP
    refused = choose_transport(F, _head(size=None, xet=True), False)
    assert isinstance(refused, Refusal) and "hf_xet" in refused.reason
    assert isinstance(choose_transport(F, _head(size=None), True), Refusal)
    assert choose_transport(F, _head(size=None, xet=True), True) == "xet"


@pytest.fixture
def xet_hub() -> Iterator[HubServer]:
    with HubServer(token=TOKEN) as server:
        yield server


def _xet_packer(xet_hub: HubServer, tmp_path: Path, alice: Any, files: dict[str, bytes]) -> Packer:
    xet_hub.create_repo("acme/tiny", xet=True)
    xet_hub.commit("acme/tiny", files)
    return Packer(hub=xet_hub, tmp=tmp_path, signer=alice.signer)


def test_the_plan_names_the_transport(xet_hub: HubServer, tmp_path: Path, alice: Any, clean_env: dict[str, str],
                                      tiny_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    packer = _xet_packer(xet_hub, tmp_path, alice, tiny_files)
    monkeypatch.setattr(pack_hub, "xet_available", lambda: True)
    doc = packer.pack(packer.spec(), dry_run=True).to_json()
    by = {f["path"].rsplit("/", 1)[-1]: f["transport"] for f in doc["files"]}
    assert by[SHARD] == "xet" and by["config.json"] == "http"  # only LFS files are Xet-backed
    doc = packer.pack(packer.spec(), dry_run=True, xet=False).to_json()
    assert {f["transport"] for f in doc["files"]} == {"http"}


def _fake_download(payload: dict[str, bytes], calls: list[str]) -> Any:
    def fake(repo_id: str, filename: str, *, local_dir: Path, **kw: Any) -> str:
        calls.append(filename)
        p = Path(local_dir) / filename
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(payload[filename])
        return str(p)

    return fake


def test_a_xet_file_is_hashed_from_disk_and_kept_when_it_matches(
        xet_hub: HubServer, tmp_path: Path, alice: Any, clean_env: dict[str, str], tiny_files: dict[str, bytes],
        monkeypatch: pytest.MonkeyPatch, policy: Path) -> None:
    packer = _xet_packer(xet_hub, tmp_path, alice, tiny_files)
    calls: list[str] = []
    monkeypatch.setattr(pack_hub, "xet_available", lambda: True)
    monkeypatch.setattr(hub_mod, "hf_hub_download", _fake_download(tiny_files, calls))
    r = packer.pack(packer.spec())
    assert sorted(calls) == sorted(p for p in tiny_files if p.endswith(".safetensors"))
    assert not xet_hub.downloads("acme/tiny", SHARD)  # no HTTP bytes for the Xet files
    assert not list((r.out).rglob("xet-*"))
    verify(r.out, policy)


def test_a_xet_file_with_other_bytes_is_exit_3_and_not_kept(
        xet_hub: HubServer, tmp_path: Path, alice: Any, clean_env: dict[str, str], tiny_files: dict[str, bytes],
        monkeypatch: pytest.MonkeyPatch) -> None:
    packer = _xet_packer(xet_hub, tmp_path, alice, tiny_files)
    bad = dict(tiny_files)
    bad[SHARD] = bytes(len(tiny_files[SHARD]))
    monkeypatch.setattr(pack_hub, "xet_available", lambda: True)
    monkeypatch.setattr(hub_mod, "hf_hub_download", _fake_download(bad, []))
    out = packer.tmp / "out"
    with pytest.raises(IntegrityError) as ei:
        packer.pack(packer.spec(), out=out)
    assert ei.value.exit_code == 3 and SHARD in str(ei.value) and "sha256" in str(ei.value)
    assert not (out / "models" / "acme--tiny" / SHARD).exists() and not list(out.rglob("xet-*"))
