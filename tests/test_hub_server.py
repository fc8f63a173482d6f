"""The test Hub speaks the protocol of the real one, as impolitely: the real client's own calls work against it.

If these fail, the other Hub tests would be testing a server the real client
does not understand, so they are checked with the client's own functions
(``snapshot_download``, ``hf_hub_download``, ``get_hf_file_metadata``), unpatched,
and with plain httpx2 requests for what the client hides (redirects, encodings,
the CDN's refusals, injected faults). The nginx CDN tests skip where nginx is
not installed (``make cdn-bin`` installs it).
"""

from __future__ import annotations

import gzip
import hashlib
import time
from pathlib import Path

import httpx2
import pytest
from hub_helpers import OUTSIDER, TOKEN
from hubserver import Fault, HubServer
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import GatedRepoError
from nginx_cdn import NginxCDN

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
    assert plain.commit_hash == sha and plain.location == f"{hub.url}/api/resolve-cache/models/acme/tiny/{sha}/config.json"


def test_gated_download_needs_the_token(hub: HubServer, tiny_files: dict[str, bytes], tmp_path: Path) -> None:
    hub.create_repo("acme/tiny", gated="manual")
    hub.commit("acme/tiny", tiny_files)
    with pytest.raises(GatedRepoError):
        hf_hub_download("acme/tiny", "config.json", endpoint=hub.url, cache_dir=tmp_path / "c", token=False)
    p = hf_hub_download("acme/tiny", SHARD, endpoint=hub.url, cache_dir=tmp_path / "c", token=TOKEN)
    assert Path(p).read_bytes() == tiny_files[SHARD]
    assert not any(r.auth for r in hub.requests if r.origin == "cdn")


def _head(hub: HubServer, path: str, repo: str = "acme/tiny", token: str | None = None) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx2.head(hf_hub_url(repo, path, endpoint=hub.url), headers=headers)


# -- plain files: a relative 307 to the resolve cache, gzip or chunked ------------------------


def test_plain_file_redirects_relatively_to_the_resolve_cache(hub: HubServer, tiny_files: dict[str, bytes]) -> None:
    sha = hub.commit("acme/tiny", {**tiny_files, "sub dir/notes.txt": "x"})
    r = _head(hub, "config.json")
    assert r.status_code == 307 and r.headers["Location"] == f"/api/resolve-cache/models/acme/tiny/{sha}/config.json"
    assert r.headers["X-Repo-Commit"] == sha and r.headers["ETag"].strip('"') == hub.repos["acme/tiny"].commits[sha]["config.json"].git_sha1
    assert not any(k.lower().startswith("x-linked") for k in r.headers)
    r = _head(hub, "sub dir/notes.txt")
    assert r.headers["Location"].endswith(f"/{sha}/sub%20dir/notes.txt")
    cache = httpx2.head(hub.url + r.headers["Location"], headers={"Accept-Encoding": "identity"})
    assert cache.status_code == 200 and cache.headers["Content-Length"] == "1" and cache.headers["X-Repo-Commit"] == sha
    lfs_via_cache = httpx2.get(f"{hub.url}/api/resolve-cache/models/acme/tiny/{sha}/model-00001-of-00002.safetensors")
    assert lfs_via_cache.status_code == 404  # LFS files go through the CDN only


def test_text_is_gzipped_and_chunked_when_accepted_and_range_ignored(hub: HubServer, tiny_files: dict[str, bytes]) -> None:
    sha = hub.commit("acme/tiny", tiny_files)
    data = tiny_files["tokenizer.json"]
    url = f"{hub.url}/api/resolve-cache/models/acme/tiny/{sha}/tokenizer.json"
    with httpx2.stream("GET", url, headers={"Accept-Encoding": "gzip", "Range": "bytes=5-"}) as r:
        raw = b"".join(r.iter_raw())
        assert r.status_code == 200 and r.headers["Content-Encoding"] == "gzip"  # the Range was ignored, as CloudFront does
        assert "Content-Length" not in r.headers and r.headers["Transfer-Encoding"] == "chunked"
    assert gzip.decompress(raw) == data
    assert httpx2.get(url).content == data  # httpx2 accepts gzip by default and decodes it
    plain = httpx2.get(url, headers={"Accept-Encoding": "identity"})
    assert plain.content == data and "Content-Length" not in plain.headers and "Content-Encoding" not in plain.headers
    part = httpx2.get(url, headers={"Accept-Encoding": "identity", "Range": "bytes=5-9"})
    assert part.status_code == 206 and part.content == data[5:10] and part.headers["Content-Length"] == "5"


def test_binary_plain_file_is_never_gzipped(hub: HubServer) -> None:
    blob = bytes(range(256)) * 40
    sha = hub.commit("acme/tiny", {"weights.raw": blob})
    r = httpx2.get(f"{hub.url}/api/resolve-cache/models/acme/tiny/{sha}/weights.raw", headers={"Accept-Encoding": "gzip"})
    assert r.content == blob and "Content-Encoding" not in r.headers and "Content-Length" not in r.headers


# -- Xet-backed repos: the headers and tree fields, not the protocol ---------------------------


def test_xet_repo_announces_xet_in_headers_and_tree(hub: HubServer, tiny_files: dict[str, bytes]) -> None:
    hub.create_repo("acme/tiny", xet=True)
    sha = hub.commit("acme/tiny", tiny_files)
    blob = hub.repos["acme/tiny"].commits[sha][SHARD]
    meta = get_hf_file_metadata(hf_hub_url("acme/tiny", SHARD, endpoint=hub.url), token=False, endpoint=hub.url)
    assert meta.xet_file_data is not None and meta.xet_file_data.file_hash == blob.xet_hash
    assert meta.xet_file_data.refresh_route == f"{hub.url}/api/models/acme/tiny/xet-read-token/{sha}"
    assert meta.location.startswith(hub.cdn_url) and meta.size == blob.size  # the bytes still come over HTTP
    head = _head(hub, SHARD)
    assert head.headers["X-Xet-Refresh-Route"] == meta.xet_file_data.refresh_route
    assert 'rel="xet-auth"' in head.headers["Link"] and len(head.headers["X-Xet-Hash"]) == 64
    tree = {t.path: t for t in HfApi(endpoint=hub.url, token=False).list_repo_tree("acme/tiny", recursive=True)}
    assert tree[SHARD].xet_hash == blob.xet_hash and tree["config.json"].xet_hash is None  # type: ignore[union-attr]
    assert get_hf_file_metadata(hf_hub_url("acme/tiny", "config.json", endpoint=hub.url), token=False).xet_file_data is None
    tok = httpx2.get(meta.xet_file_data.refresh_route)
    assert tok.status_code == 200 and tok.headers["X-Xet-Cas-Url"] and int(tok.headers["X-Xet-Token-Expiration"]) > time.time()
    assert httpx2.get(tok.headers["X-Xet-Cas-Url"] + "/v1/reconstructions/" + blob.xet_hash).status_code == 404


def test_cdn_out_of_step_with_the_hub(hub: HubServer, tiny_files: dict[str, bytes], nginx_or_none: HubServer | None) -> None:
    for h in (hub, nginx_or_none):
        if h is None:
            continue
        h.commit("acme/tiny", tiny_files)
        h.serve_other_bytes("acme/tiny", SHARD, b"short")
        head = _head(h, SHARD, token=TOKEN)
        assert head.headers["X-Linked-Size"] == str(len(tiny_files[SHARD]))
        r = httpx2.get(head.headers["Location"])
        assert r.status_code == 200 and r.content == b"short"
        with pytest.raises(ValueError):
            h.serve_other_bytes("acme/tiny", "config.json", b"{}")


def test_plain_repo_has_no_xet_token_route(hub: HubServer, tiny_files: dict[str, bytes]) -> None:
    sha = hub.commit("acme/tiny", tiny_files)
    assert httpx2.get(f"{hub.url}/api/models/acme/tiny/xet-read-token/{sha}").status_code == 404


# -- signed CDN URLs that expire --------------------------------------------------------------


def test_signed_urls_expire_and_cannot_be_forged(tiny_files: dict[str, bytes]) -> None:
    with HubServer(token=TOKEN, url_ttl=0.5) as hub:
        hub.commit("acme/tiny", tiny_files)
        loc = _head(hub, SHARD).headers["Location"]
        assert "Expires=" in loc and "Signature=" in loc
        assert httpx2.get(loc).content == tiny_files[SHARD]
        forged = loc.replace("Expires=", "Expires=9").replace("&Signature=", "&Signature=0")
        r = httpx2.get(forged)
        assert r.status_code == 403 and b"SignatureDoesNotMatch" in r.content
        expires = int(loc.split("Expires=")[1].split("&")[0])
        time.sleep(max(0.0, expires - time.time()) + 0.05)
        r = httpx2.get(loc, headers={"Range": "bytes=0-9"})
        assert r.status_code == 403 and b"<Code>AccessDenied</Code><Message>Request has expired</Message>" in r.content
        fresh = _head(hub, SHARD).headers["Location"]  # a fresh HEAD against the Hub gives a new URL
        assert fresh != loc and httpx2.get(fresh, headers={"Range": "bytes=0-9"}).content == tiny_files[SHARD][:10]
        assert [q.status for q in hub.downloads("acme/tiny", SHARD)] == [200, 403, 403, 206]


# -- faults on range requests -----------------------------------------------------------------


def test_faults_hit_single_range_gets(hub: HubServer, tiny_files: dict[str, bytes]) -> None:
    hub.commit("acme/tiny", tiny_files)
    data = tiny_files[SHARD]
    loc = _head(hub, SHARD).headers["Location"]
    rng = {"Range": "bytes=1000-1999"}
    hub.inject("acme/tiny", SHARD, Fault.rate_limited(reset=2), Fault("expire"), Fault("corrupt"), Fault("drop", after=300))
    r = httpx2.get(loc, headers=rng)
    assert r.status_code == 429 and r.headers["Retry-After"] == "2" and r.headers["RateLimit"] == '"api";r=0;t=2'
    assert "RateLimit-Policy" in r.headers
    r = httpx2.get(loc, headers=rng)
    assert r.status_code == 403 and b"Request has expired" in r.content
    r = httpx2.get(loc, headers=rng)
    want = bytearray(data[1000:2000])
    want[500] ^= 0xFF  # the middle byte of this GET's body
    assert r.status_code == 206 and r.content == bytes(want)
    with pytest.raises(httpx2.RemoteProtocolError):
        httpx2.get(loc, headers=rng)
    assert hub.downloads("acme/tiny", SHARD)[-1].sent == 300
    assert httpx2.get(loc, headers=rng).content == data[1000:2000]  # each fault hit once
    hub.inject("acme/tiny", SHARD, Fault("status", status=502, times=2, headers={"X-Cache": "Error from cloudfront"}))
    assert [httpx2.get(loc).status_code for _ in range(3)] == [502, 502, 200]
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("teapot")


def test_a_stall_makes_a_read_timeout_then_serves_the_rest(hub: HubServer, tiny_files: dict[str, bytes]) -> None:
    hub.commit("acme/tiny", tiny_files)
    loc = _head(hub, SHARD).headers["Location"]
    hub.inject("acme/tiny", SHARD, Fault("stall", after=100, seconds=0.6), Fault("stall", after=10, seconds=0.3))
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.get(loc, timeout=httpx2.Timeout(5, read=0.2))
    r = httpx2.get(loc, headers={"Range": "bytes=0-99"}, timeout=5)  # a patient client gets everything
    assert r.status_code == 206 and r.content == tiny_files[SHARD][:100]


def test_faults_hit_plain_files_on_the_resolve_cache(hub: HubServer, tiny_files: dict[str, bytes]) -> None:
    hub.commit("acme/tiny", tiny_files)
    url = hf_hub_url("acme/tiny", "tokenizer.json", endpoint=hub.url)
    hub.inject("acme/tiny", "tokenizer.json", Fault("status", status=503))
    assert httpx2.head(url, follow_redirects=True).status_code == 200  # a HEAD takes no fault
    assert httpx2.get(url, follow_redirects=True).status_code == 503
    assert httpx2.get(url, follow_redirects=True).content == tiny_files["tokenizer.json"]
    assert [(q.origin, q.status) for q in hub.downloads("acme/tiny", "tokenizer.json")] == [("hub", 503), ("hub", 200)]


def test_resolve_faults_hit_the_hubs_own_answer(hub: HubServer, tiny_files: dict[str, bytes]) -> None:
    hub.commit("acme/tiny", tiny_files)
    hub.inject_resolve("acme/tiny", SHARD, Fault.rate_limited(reset=3), Fault("drop"))
    r = _head(hub, SHARD)
    assert r.status_code == 429 and r.headers["Retry-After"] == "3"
    with pytest.raises(httpx2.RemoteProtocolError):
        _head(hub, SHARD)
    assert _head(hub, SHARD).status_code == 302 and not hub.downloads("acme/tiny", SHARD)
    with pytest.raises(ValueError, match="resolve fault"):
        hub.inject_resolve("acme/tiny", SHARD, Fault("corrupt"))


# -- gated repos: 401 for no or an unknown token, 403 for an account without access -----------


def test_gated_answers_401_or_403_as_the_hub_does(tiny_files: dict[str, bytes], tmp_path: Path) -> None:
    outsider = "hf_airpackOUTSIDERtoken000000000"
    with HubServer(token=TOKEN, outsider_tokens=[outsider, OUTSIDER]) as hub:
        hub.create_repo("acme/tiny", gated="auto")
        hub.commit("acme/tiny", tiny_files)
        for token, status in ((None, 401), ("hf_unknown_token_0000", 401), (outsider, 403)):
            r = _head(hub, SHARD, token=token)
            assert r.status_code == status and r.headers["X-Error-Code"] == "GatedRepo"
            with pytest.raises(GatedRepoError) as ei:
                hf_hub_download("acme/tiny", "config.json", endpoint=hub.url, cache_dir=tmp_path / "c",
                                token=token or False)
            assert ei.value.response.status_code == status
        assert _head(hub, SHARD, token=TOKEN).status_code == 302
        hub.commit("acme/open", {"config.json": "{}"})
        assert _head(hub, "config.json", repo="acme/open", token=outsider).status_code == 307  # a real account
        assert _head(hub, "config.json", repo="acme/open", token="hf_unknown_token_0000").status_code == 401


# -- the nginx CDN ----------------------------------------------------------------------------


def test_nginx_cdn_serves_the_blobs_with_ranges_and_logs(nginx_hub: HubServer, tiny_files: dict[str, bytes],
                                                        tmp_path: Path) -> None:
    hub = nginx_hub
    hub.commit("acme/tiny", tiny_files)
    assert hub.nginx is not None and hub.cdn_url == hub.nginx.url
    meta = get_hf_file_metadata(hf_hub_url("acme/tiny", SHARD, endpoint=hub.url), token=TOKEN, endpoint=hub.url)
    assert meta.location.startswith(hub.nginx.url + "/repos/")
    with httpx2.Client() as c:  # one keep-alive connection, several ranges
        parts = [c.get(meta.location, headers={"Range": f"bytes={a}-{a + 999}"}) for a in (0, 1000, 2000)]
    assert all(p.status_code == 206 for p in parts) and b"".join(p.content for p in parts) == tiny_files[SHARD][:3000]
    assert parts[0].headers["Content-Range"] == f"bytes 0-999/{len(tiny_files[SHARD])}"
    p = hf_hub_download("acme/tiny", SHARD, endpoint=hub.url, cache_dir=tmp_path / "c", token=TOKEN)
    assert Path(p).read_bytes() == tiny_files[SHARD]
    gets = hub.downloads("acme/tiny", SHARD)
    assert [g.range for g in gets] == ["bytes=0-999", "bytes=1000-1999", "bytes=2000-2999", None]
    assert gets[-1].sent == len(tiny_files[SHARD]) and not any(g.auth for g in hub.cdn_log())
    later = hub.commit("acme/tiny", {"extra.safetensors": b"x" * 100})  # blobs committed while running are placed too
    loc = _head(hub, "extra.safetensors", token=TOKEN).headers["Location"]
    assert later and httpx2.get(loc).content == b"x" * 100


def test_nginx_cdn_checks_signatures_and_expiry(tiny_files: dict[str, bytes]) -> None:
    NginxCDN.skip_unless_available()
    if not NginxCDN.has_secure_link():
        pytest.skip("this nginx has no secure_link module")
    with HubServer(token=TOKEN, cdn="nginx", url_ttl=60) as hub:
        hub.commit("acme/tiny", tiny_files)
        loc = _head(hub, SHARD, token=TOKEN).headers["Location"]
        assert httpx2.get(loc, headers={"Range": "bytes=0-9"}).content == tiny_files[SHARD][:10]
        r = httpx2.get(loc.replace("&Signature=", "&Signature=A"))
        assert r.status_code == 403 and b"SignatureDoesNotMatch" in r.content
        hub.url_ttl = -5  # the next redirect hands out a URL already past its expiry
        r = httpx2.get(_head(hub, SHARD, token=TOKEN).headers["Location"])
        assert r.status_code == 403 and b"Request has expired" in r.content


def test_nginx_cdn_alone_starts_in_a_temp_dir_and_stops(tmp_path: Path) -> None:
    NginxCDN.skip_unless_available()
    (tmp_path / "f.bin").write_bytes(b"0123456789")
    cdn = NginxCDN(tmp_path).start()
    tmp = cdn._tmp
    try:
        assert tmp is not None and (tmp / "nginx.conf").is_file()
        r = httpx2.get(cdn.url + "/f.bin", headers={"Range": "bytes=-3"})
        assert r.status_code == 206 and r.content == b"789"
        assert httpx2.get(cdn.url + "/missing").status_code == 404
    finally:
        cdn.stop()
    assert not tmp.exists() and cdn.port == 0
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(r.url, timeout=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # nothing written into the served folder
