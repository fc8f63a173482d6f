"""A model's config and safetensors headers straight from the Hub, without its weights.

``airpack fit ORG/NAME[@REVISION]`` and ``pack --dry-run`` answer the sizing
question before anything big is fetched. The revision is resolved to one
commit (``HubClient.resolve``, which lists every file with its size); the
small JSON files (config.json, the shard index) are read whole, under a cap
checked against the listed size before the GET and again on the bytes that
arrive; each chosen ``*.safetensors`` gives only its framing: one range
request for the 8-byte header length, one for the header itself, as
huggingface_hub's ``get_safetensors_metadata`` does (that function is not
used: it reads the index through ``hf_hub_download``, which writes to the
local Hugging Face cache, and follows redirects with the token attached).
The header is capped at ``safetensors_check.MAX_HEADER_BYTES`` before a byte
of it is asked for, and validated by the same ``HeaderCollector`` the
verification pipeline uses, against the size the Hub lists.

Each file's location comes from a fresh HEAD (``HubClient.head``: its commit
must be the resolved one), and the GET carries the token only when that
location is on the Hub's own origin (``HubClient.location``); redirects are
followed without it. A server that ignores ``Range`` and answers 200 is read
only as far as the bytes wanted, then the connection is closed: a whole
weights file is never downloaded. Every failure is a named exit-7 error,
token-free.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import httpx2

from ..errors import FetchError, GatedRepoError, IntegrityError, ModelConfigError, RevisionNotFoundError
from ..hashing import parallel_map
from ..safetensors_check import MAX_HEADER_BYTES, HeaderCollector, SafetensorsInfo
from .hub import HubClient, HubFile, HubSnapshot
from .segments import Location, range_answered

HEADER_WORKERS = 8  # shards whose headers are read at once


@dataclass
class ReadStats:
    """What was asked of the Hub's file servers: for the report, and for the tests that prove nothing big moved."""

    requests: int = 0
    bytes: int = 0


class HubModelReader:
    """One repo at one commit, read file by file through ranged GETs; ``read``/``header`` as ``ops.fit`` expects them."""

    def __init__(self, client: HubClient, repo_id: str, revision: str) -> None:
        self.client = client
        self.snap: HubSnapshot = client.resolve(repo_id, revision)
        self._by_path = {f.path: f for f in self.snap.files}
        self.stats = ReadStats()
        self._lock = threading.Lock()
        self._headers: dict[str, SafetensorsInfo] = {}  # read once: ``headers`` prefetches, ``header`` then finds them
        self._small: dict[str, bytes] = {}  # small files read once (the index is read to choose shards, then again)
        self._http = httpx2.Client(timeout=httpx2.Timeout(60.0, connect=30.0), follow_redirects=True)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HubModelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def repo_id(self) -> str:
        return self.snap.repo_id

    @property
    def commit(self) -> str:
        return self.snap.commit

    @property
    def files(self) -> list[str]:
        return [f.path for f in self.snap.files]

    @property
    def location(self) -> str:
        return f"{self.snap.repo_id}@{self.snap.commit[:12]}"

    def _file(self, rel: str) -> HubFile:
        f = self._by_path.get(rel)
        if f is None:
            raise RevisionNotFoundError(f"{self.location}: the Hub lists no {rel}", path=rel)
        return f

    def _fail(self, rel: str, why: str) -> FetchError:
        return FetchError(self.client.scrub(f"cannot read {self.snap.repo_id}/{rel} @ {self.snap.commit[:12]}: {why}"),
                          path=rel)

    def _get(self, f: HubFile, start: int, end: int | None, cap: int, loc: Location | None = None) -> bytes:
        """Bytes [start, end) of ``f`` (``end`` None: the whole file, at most ``cap`` bytes), from ``loc`` or a fresh one."""
        loc = loc or self.client.locator(self.snap, f)()
        headers = dict(loc.headers)
        if end is not None:
            headers["range"] = f"bytes={start}-{end - 1}"
            headers["accept-encoding"] = "identity"
        want = (end - start) if end is not None else cap
        out = bytearray()
        try:
            with self._http.stream("GET", loc.url, headers=headers) as resp:
                self._check_status(f, resp, start, end)
                skip = start if (end is not None and resp.status_code == 200) else 0  # Range ignored: the whole file comes
                # iter_bytes decodes a gzip answer chunk by chunk, so the cap holds on the decoded bytes too
                for chunk in (resp.iter_raw() if end is not None else resp.iter_bytes()):
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    out += chunk
                    if len(out) > want:
                        break
        except httpx2.HTTPError as e:
            raise self._fail(f.path, f"{type(e).__name__}: {e}") from None
        finally:
            with self._lock:
                self.stats.requests += 1
                self.stats.bytes += len(out)
        if end is None:
            if len(out) > cap:
                raise IntegrityError(f"{self.location}/{f.path} is larger than the {cap}-byte limit", path=f.path)
            if len(out) != f.size:
                raise self._fail(f.path, f"the Hub lists {f.size} bytes but sent {len(out)}")
            return bytes(out)
        if len(out) < want:
            raise self._fail(f.path, f"asked for bytes {start}-{end - 1}, got {len(out)} of them")
        return bytes(out[:want])

    def _check_status(self, f: HubFile, resp: httpx2.Response, start: int, end: int | None) -> None:
        st = resp.status_code
        if st in (401, 403):
            raise self._fail(f.path, f"HTTP {st}: the server refused access (gated or private; check the token)")
        if st == 404:
            raise self._fail(f.path, "HTTP 404: the file is not there at this commit")
        if st not in (200, 206) or (st == 206 and end is None):
            raise self._fail(f.path, f"unexpected HTTP {st}")
        if st == 206 and end is not None and not range_answered(resp.headers.get("content-range", ""), start, end, f.size):
            raise self._fail(f.path, f"asked for bytes={start}-{end - 1} of a {f.size}-byte file, the server answered "
                                     f"range {resp.headers.get('content-range')!r}")

    def read(self, rel: str, cap: int) -> bytes:
        """A small file whole (config.json, the shard index): refused before the GET when the Hub lists it over the cap.

        The cap is the caller's alone (``ops.fit`` passes the same limits to a
        local folder), so a file that fits from disk also fits from the Hub.
        """
        f = self._file(rel)
        if f.size > cap:
            raise ModelConfigError(f"{self.location}/{rel} is {f.size} bytes, over the {cap}-byte limit for it", path=rel)
        if rel not in self._small:
            self._small[rel] = self._get(f, 0, None, cap)
        return self._small[rel]

    def header(self, rel: str) -> SafetensorsInfo:
        """A safetensors file's header, from two range requests: its 8-byte length, then exactly that many bytes."""
        known = self._headers.get(rel)
        if known is not None:
            return known
        f = self._file(rel)
        display = f"{self.location}/{rel}"
        c = HeaderCollector()
        if f.size >= 8:
            loc = self.client.locator(self.snap, f)()  # one HEAD for both ranges (a signed CDN URL outlives two requests)
            c.feed(self._get(f, 0, 8, 8, loc))
            (length,) = struct.unpack("<Q", bytes(c.buf[:8]))
            if 0 < length <= MAX_HEADER_BYTES and 8 + length <= f.size:  # else ``info`` names what is wrong
                c.feed(self._get(f, 8, 8 + length, length, loc))
        info = c.info(f.size, display=display)
        with self._lock:
            self._headers[rel] = info
        return info

    def headers(self, rels: list[str]) -> dict[str, SafetensorsInfo]:
        """Every shard's header, a few at once (a 163-shard model is 326 small requests)."""
        infos = parallel_map(self.header, rels, workers=max(1, min(HEADER_WORKERS, len(rels))))
        return dict(zip(rels, infos, strict=True))


def open_reader(repo_id: str, revision: str, *, endpoint: str | None, token: str | None,
                timeout: float = 30) -> HubModelReader:
    """A reader on ``repo_id`` at ``revision`` resolved to its commit; a gated repo without a token is refused first."""
    client = HubClient(endpoint=endpoint, token=token, etag_timeout=timeout)
    reader = HubModelReader(client, repo_id, revision)
    try:
        client.require_access(reader.snap)
    except GatedRepoError:
        reader.close()
        raise
    return reader

