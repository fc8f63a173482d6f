"""The test Hub speaks the protocol of the real one: the real client's own high-level calls work against it.

If these fail, the other Hub tests would be testing a server the real client
does not understand, so they are checked with the client's own functions
(``snapshot_download``, ``hf_hub_download``, ``get_hf_file_metadata``), unpatched.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx2
from hub_helpers import TOKEN
from hubserver import HubServer
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download

SHARD = "model-00001-of-00002.safetensors"

pytest_plugins = ("hub_fixtures",)


def test_snapshot_download_through_the_paginated_tree(hub: HubServer, tiny_files: dict[str, bytes], tmp_path: Path) -> None:
    hub.page_size = 3  # several pages, followed through the Link header
    sha = hub.commit("acme/tiny", {**tiny_files, "sub/dir/notes.txt": "x"})
    hub.tag("acme/tiny", "v1", sha)
    api = HfApi(endpoint=hub.url, token=False)
    tree = list(api.list_repo_tree("acme/tiny", revision="v1", recursive=True))
    assert {t.path for t in tree if hasattr(t, "blob_id")} == set(hub.repos["acme/tiny"].commits[sha])
    assert {t.path for t in tree if hasattr(t, "tree_id")} == {"sub", "sub/dir"}
    d = Path(snapshot_download("acme/tiny", revision="v1", endpoint=hub.url, cache_dir=tmp_path / "c", token=False))
    assert d.name == sha
    for rel, data in tiny_files.items():
        assert (d / rel).read_bytes() == data
    info = api.get_paths_info("acme/tiny", [SHARD, "sub"], revision=sha)
    assert info[0].lfs is not None and info[0].lfs.sha256 == hashlib.sha256(tiny_files[SHARD]).hexdigest()
    assert [b.name for b in api.list_repo_refs("acme/tiny").tags] == ["v1"]


def test_lfs_metadata_redirects_to_another_origin_and_ranges(hub: HubServer, tiny_files: dict[str, bytes]) -> None:
    sha = hub.commit("acme/tiny", tiny_files)
    url = hf_hub_url("acme/tiny", SHARD, revision="main", endpoint=hub.url)
    meta = get_hf_file_metadata(url, token=False, endpoint=hub.url)
    assert meta.commit_hash == sha and meta.size == len(tiny_files[SHARD])
    assert meta.etag == hashlib.sha256(tiny_files[SHARD]).hexdigest()
    assert meta.location.startswith(hub.cdn_url) and meta.xet_file_data is None
    r = httpx2.get(meta.location, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == tiny_files[SHARD][10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{len(tiny_files[SHARD])}"
    head = httpx2.head(url)
    assert head.status_code == 302 and not any(k.lower().startswith("x-xet") for k in head.headers)
    plain = get_hf_file_metadata(hf_hub_url("acme/tiny", "config.json", endpoint=hub.url), token=False, endpoint=hub.url)
    blob = tiny_files["config.json"]
    assert plain.etag == hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest() and plain.size == len(blob)


def test_gated_download_needs_the_token(hub: HubServer, tiny_files: dict[str, bytes], tmp_path: Path) -> None:
    hub.create_repo("acme/tiny", gated="manual")
    hub.commit("acme/tiny", tiny_files)
    import pytest
    from huggingface_hub.errors import GatedRepoError

    with pytest.raises(GatedRepoError):
        hf_hub_download("acme/tiny", "config.json", endpoint=hub.url, cache_dir=tmp_path / "c", token=False)
    p = hf_hub_download("acme/tiny", SHARD, endpoint=hub.url, cache_dir=tmp_path / "c", token=TOKEN)
    assert Path(p).read_bytes() == tiny_files[SHARD]
    assert not any(r.auth for r in hub.requests if r.origin == "cdn")
