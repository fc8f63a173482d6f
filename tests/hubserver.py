"""A Hugging Face Hub-compatible HTTP server on 127.0.0.1, for the tests, the demo and the benchmark.

It speaks the part of the Hub's protocol that the real ``huggingface_hub``
client uses to resolve, list and download a model, with the same endpoints
and headers, and answers as impolitely as the real Hub does, so the client
(and airpack's downloader) talks to it unpatched over a real socket:

- ``GET /api/models/{repo}[/revision/{rev}]`` (``?blobs=true`` adds sizes, blob ids and LFS data)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (recursive, expand, paginated with a ``Link`` header)
- ``POST /api/models/{repo}/paths-info/{rev}`` and ``GET /api/models/{repo}/refs``
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag``.
  LFS files answer ``302`` to the CDN (another origin) with ``X-Linked-Etag`` and ``X-Linked-Size``;
  plain (git) files answer a *relative* ``307`` to ``/api/resolve-cache/models/{repo}/{commit}/{path}``,
  which serves them: ``gzip`` (``Content-Encoding``, chunked, no ``Content-Length``, ``Range`` ignored
  with a ``200`` as CloudFront does) when the client accepts it and the file is text, otherwise
  chunked without ``Content-Length`` (a ``Range`` there gets a ``206`` with ``Content-Length``).
- the CDN: signed URLs (``Expires=<unix time>&Signature=<HMAC-SHA256 of path and expiry>``; with
  ``url_ttl`` they really expire and the CDN answers ``403 AccessDenied`` "Request has expired", as
  S3/CloudFront do), ``Range`` requests (``206``/``Content-Range``). ``cdn="nginx"`` puts a real
  static file server (tests/nginx_cdn.py) there instead: same URLs, checked by nginx's secure_link.
- Xet repos (``create_repo(..., xet=True)``): their LFS files' resolve answers carry ``X-Xet-Hash``,
  ``X-Xet-Refresh-Route`` and ``Link: <...>; rel="xet-auth"`` and the tree lists ``xetHash``;
  ``/api/models/{repo}/xet-read-token/{rev}`` hands out a CAS URL and token. The Xet protocol itself
  is not served (the CAS URL answers 404), so only the HTTP path can fetch the bytes.
- errors as the Hub sends them: ``X-Error-Code`` ``RepoNotFound`` (401), ``RevisionNotFound``,
  ``EntryNotFound`` (404), ``GatedRepo`` (401 without a token or with one the Hub does not know,
  403 with a valid token of an account that has no access: ``outsider_tokens``, ``OUTSIDER_TOKEN``).

Repos hold several commits; branches and tags move with ``commit()``, ``tag()``
and ``move_ref()``. Faults injected per file (``inject(repo, path, Fault(...))``)
are taken by the GETs that serve the file's bytes (the CDN for LFS files, the
resolve-cache for plain ones; a range request is one GET): cut the connection
mid-body, answer an HTTP error with extra headers (429 with ``Retry-After`` and
``RateLimit``), serve other bytes of the same size, or answer as if the signed
URL had expired. Faults need the built-in CDN: nginx serves LFS bytes as they
are. ``inject_resolve()`` faults the Hub's own resolve answer instead (a 429 or a
cut on the HEAD), and ``serve_other_bytes()`` puts a CDN out of step with the Hub.
Every request is recorded (``requests``; nginx's own access log through
``cdn_log()``, both in ``downloads()``, which first waits (``settle()``) for
answers still being written) so tests can tell what was fetched again.

Run it on its own (for the demo) with::

    python -m tests.hubserver --demo              # a tiny generated model, acme/tiny-llama
    python -m tests.hubserver --serve DIR         # every DIR/ORG/NAME folder becomes a repo

It prints its URL on the first line of stdout and serves until it is stopped.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import gzip
import hashlib
import hmac
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz")
LFS_MIN_SIZE = 10 * 1024 * 1024  # larger files go to LFS whatever their name, as on the Hub
DEFAULT_TOKEN = "hf_airpackTESTtoken0123456789"
OUTSIDER_TOKEN = "hf_airpackOUTSIDERtoken01234567"  # a valid account that was granted no gated repo (403 there)
CHUNK = 1 << 20
DATE = "2025-01-15T12:00:00.000Z"
FAR_FUTURE = 4102444800  # 2100-01-01: the expiry of signed URLs when url_ttl is None
FAULT_KINDS = ("drop", "status", "corrupt", "expire", "stall")
EXPIRED_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                b"<Message>Request has expired</Message></Error>")
BAD_SIGNATURE_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SignatureDoesNotMatch</Code>'
                      b"<Message>The request signature we calculated does not match the signature you provided"
                      b"</Message></Error>")
TEXT_SNIFF = 8192  # like a CDN deciding by content type: a NUL in the first bytes means binary


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class Blob:
    """One file's bytes (in memory or on disk) and the ids the Hub lists for it."""

    size: int
    sha256: str
    git_sha1: str  # of the content for a git file, of the LFS pointer for an LFS file
    lfs: bool
    data: bytes | None = field(default=None, repr=False)
    storage: Path | None = None

    @property
    def xet_hash(self) -> str:
        """A stand-in for the Xet merkle hash (64 hex, stable per content): only the Xet client could check it."""
        return hashlib.sha256(b"xet-test\0" + bytes.fromhex(self.sha256)).hexdigest()

    def whole(self) -> bytes:
        """All the bytes (plain files are at most LFS_MIN_SIZE, so this stays small for them)."""
        return self.data if self.data is not None else b"".join(self.read(0, self.size))

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    def read(self, start: int, end: int) -> Iterable[bytes]:
        """Bytes [start, end) in chunks."""
        if self.data is not None:
            for i in range(start, end, CHUNK):
                yield self.data[i:min(end, i + CHUNK)]
            return
        assert self.storage is not None
        with open(self.storage, "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                b = f.read(min(CHUNK, left))
                if not b:
                    break
                left -= len(b)
                yield b


def make_blob(path: str, content: bytes | Path) -> Blob:
    """Hash a file once; LFS by extension or size, like a repo's .gitattributes."""
    if isinstance(content, Path):
        sha, sha1_body, size = hashlib.sha256(), [], 0
        with open(content, "rb") as f:
            while b := f.read(CHUNK):
                sha.update(b)
                size += len(b)
                if size <= LFS_MIN_SIZE:
                    sha1_body.append(b)
        lfs = path.lower().endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE
        blob = Blob(size=size, sha256=sha.hexdigest(), git_sha1="0" * 40, lfs=lfs, storage=content)
        body = b"".join(sha1_body) if not lfs else b""
    else:
        lfs = path.lower().endswith(LFS_SUFFIXES) or len(content) > LFS_MIN_SIZE
        blob = Blob(size=len(content), sha256=hashlib.sha256(content).hexdigest(), git_sha1="0" * 40, lfs=lfs, data=content)
        body = content
    gid = git_sha1(blob.pointer) if lfs else git_sha1(body)
    return Blob(size=blob.size, sha256=blob.sha256, git_sha1=gid, lfs=lfs, data=blob.data, storage=blob.storage)


@dataclass
class Fault:
    """What goes wrong on the next GET(s) of one file's bytes (a range request is one GET).

    kind: ``drop`` (send ``after`` bytes of this GET's body, then cut the connection),
    ``status`` (answer HTTP ``status`` with the extra ``headers``), ``corrupt`` (flip the
    middle byte of this GET's body, same size), ``expire`` (answer 403 AccessDenied
    "Request has expired", as the CDN does for a signed URL past its expiry), ``stall``
    (send ``after`` bytes, then nothing for ``seconds``, then the rest: a read timeout).
    ``times``: how many GETs it hits; None for every one.
    """

    kind: str
    after: int = 0
    status: int = 503
    times: int | None = 1
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 1.0  # how long a stall lasts

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {', '.join(FAULT_KINDS)}")

    @classmethod
    def rate_limited(cls, reset: int = 1, *, times: int | None = 1, retry_after: bool = True) -> Fault:
        """A 429 as the Hub sends it: ``RateLimit``/``RateLimit-Policy`` (IETF draft) and, by default, ``Retry-After``."""
        headers = {"RateLimit": f'"api";r=0;t={reset}', "RateLimit-Policy": '"fixed window";"api";q=500;w=300'}
        if retry_after:
            headers["Retry-After"] = str(reset)
        return cls("status", status=429, times=times, headers=headers)


@dataclass
class Repo:
    repo_id: str
    gated: bool | str = False
    license: str | None = "apache-2.0"
    pipeline_tag: str | None = "text-generation"
    library_name: str | None = "transformers"
    tags: tuple[str, ...] = ()
    xet: bool = False  # LFS files are Xet-backed: Xet headers on resolve, xetHash in the tree
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit
    tag_refs: dict[str, str] = field(default_factory=dict)  # tag -> commit

    def resolve(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        if rev in self.tag_refs:
            return self.tag_refs[rev]
        if rev.startswith("refs/heads/") and rev[11:] in self.refs:
            return self.refs[rev[11:]]
        if rev.startswith("refs/tags/") and rev[10:] in self.tag_refs:
            return self.tag_refs[rev[10:]]
        return rev if rev in self.commits else None


@dataclass(frozen=True)
class Request:
    """One request as the server saw it."""

    origin: str  # "hub" or "cdn"
    method: str
    path: str
    range: str | None
    auth: bool
    repo_id: str | None = None
    file: str | None = None
    status: int = 0
    sent: int = 0  # body bytes sent


class HubServer:
    """The Hub (and its CDN) on two 127.0.0.1 ports. Use as a context manager or start()/stop().

    ``url_ttl``: seconds a signed CDN URL stays valid (None: until 2100, as good as never).
    ``cdn``: ``"builtin"`` (a second port of this server: faults, request log) or ``"nginx"``
    (a real static file server over a folder of the LFS blobs, tests/nginx_cdn.py).
    ``outsider_tokens``: valid tokens of accounts that have not been granted any gated repo.
    """

    def __init__(self, *, token: str | None = DEFAULT_TOKEN, page_size: int = 1000, host: str = "127.0.0.1",
                 port: int = 0, cdn_port: int = 0, url_ttl: float | None = None, cdn: str = "builtin",
                 outsider_tokens: Iterable[str] = (OUTSIDER_TOKEN,)) -> None:
        if cdn not in ("builtin", "nginx"):
            raise ValueError(f"cdn must be 'builtin' or 'nginx', not {cdn!r}")
        self.token = token
        self.page_size = page_size
        self.url_ttl = url_ttl
        self.cdn = cdn
        self.outsider_tokens = set(outsider_tokens)
        self.secret = os.urandom(32)  # signs CDN URLs; a fresh one per server
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, Blob] = {}  # sha256 -> blob, for the CDN
        self.faults: dict[tuple[str, ...], list[Fault]] = {}  # (repo, path) for bytes, (repo, path, "resolve")
        self.requests: list[Request] = []
        self.hooks: list[Callable[[Request], None]] = []  # called after each request is recorded
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0  # byte-serving answers still being written (recorded only when they end)
        self._counter = 0
        self._host, self._port, self._cdn_port = host, port, cdn_port
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self._nginx: Any = None  # NginxCDN while started with cdn="nginx"
        self._cdn_root: Path | None = None
        self._placed: set[str] = set()

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> HubServer:
        roles = [("hub", self._port)] + ([("cdn", self._cdn_port)] if self.cdn == "builtin" else [])
        for role, port in roles:
            srv = _Server((self._host, port), _Handler)
            srv.hub = self
            srv.role = role
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                                 name=f"hubserver-{role}")
            t.start()
            self._servers.append(srv)
            self._threads.append(t)
        if self.cdn == "nginx":
            try:
                self._start_nginx()
            except BaseException:
                self.stop()
                raise
        return self

    def _start_nginx(self) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from nginx_cdn import NginxCDN

        self._cdn_root = Path(tempfile.mkdtemp(prefix="airpack-cdn-root-"))
        with self._lock:
            blobs = list(self.blobs.values())
        for b in blobs:
            self._place(b)
        if self.url_ttl is not None and not NginxCDN.has_secure_link():
            raise RuntimeError("url_ttl with cdn='nginx' needs nginx's secure_link module, which this nginx lacks")
        secret = self.secret.hex() if NginxCDN.has_secure_link() else None  # else it serves unchecked
        self._nginx = NginxCDN(self._cdn_root, secure_link_secret=secret).start()

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers.clear()
        self._threads.clear()
        if self._nginx is not None:
            self._nginx.stop()
            self._nginx = None
        if self._cdn_root is not None:
            shutil.rmtree(self._cdn_root, ignore_errors=True)
            self._cdn_root = None
            self._placed.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._servers[0].server_address[:2]
        return f"http://{host}:{port}"

    @property
    def cdn_url(self) -> str:
        if self._nginx is not None:
            return str(self._nginx.url)
        host, port = self._servers[1].server_address[:2]
        return f"http://{host}:{port}"

    @property
    def nginx(self) -> Any:
        """The NginxCDN serving the LFS blobs (cdn="nginx", while started), else None."""
        return self._nginx

    def _place(self, blob: Blob) -> None:
        """Put an LFS blob where nginx serves it, ``repos/<sha256>`` (a hard link when it can, else a copy)."""
        if self._cdn_root is None or blob.sha256 in self._placed:
            return
        dst = self._cdn_root / "repos" / blob.sha256
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{blob.sha256}.tmp")
        if blob.storage is not None:
            try:
                os.link(blob.storage, tmp)
            except OSError:
                shutil.copyfile(blob.storage, tmp)
        else:
            tmp.write_bytes(blob.data or b"")
        os.replace(tmp, dst)
        self._placed.add(blob.sha256)

    # -- signed CDN URLs -----------------------------------------------------------------

    def sign(self, path: str, expires: int) -> str:
        """The ``Signature`` of a CDN URL: HMAC-SHA256 (built-in CDN) or nginx secure_link's MD5, over path and expiry."""
        if self.cdn == "nginx":
            md5 = hashlib.md5(f"{expires}{path} {self.secret.hex()}".encode(), usedforsecurity=False).digest()
            return base64.urlsafe_b64encode(md5).decode().rstrip("=")
        return hmac.new(self.secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def cdn_location(self, blob: Blob, repo_id: str, path: str) -> str:
        """A freshly signed CDN URL for one LFS blob (valid ``url_ttl`` seconds from now)."""
        expires = FAR_FUTURE if self.url_ttl is None else math.ceil(time.time() + self.url_ttl)
        cdn_path = f"/repos/{blob.sha256}"
        q = urlencode({"repo": repo_id, "filename": path, "Expires": str(expires),
                       "Signature": self.sign(cdn_path, expires)})
        return f"{self.cdn_url}{cdn_path}?{q}"

    def check_signature(self, cdn_path: str, query: Mapping[str, list[str]]) -> bytes | None:
        """None if the URL is validly signed and not expired, else the 403 body the CDN answers."""
        try:
            expires = int(query.get("Expires", [""])[0])
        except ValueError:
            return BAD_SIGNATURE_BODY
        if not hmac.compare_digest(query.get("Signature", [""])[0], self.sign(cdn_path, expires)):
            return BAD_SIGNATURE_BODY
        return EXPIRED_BODY if time.time() > expires else None

    # -- content -------------------------------------------------------------------------

    def create_repo(self, repo_id: str, *, gated: bool | str = False, license: str | None = "apache-2.0",
                    pipeline_tag: str | None = "text-generation", library_name: str | None = "transformers",
                    tags: Iterable[str] = (), xet: bool = False) -> Repo:
        if gated is True:
            gated = "manual"
        repo = Repo(repo_id=repo_id, gated=gated, license=license, pipeline_tag=pipeline_tag,
                    library_name=library_name, tags=tuple(tags), xet=xet)
        with self._lock:
            self.repos[repo_id] = repo
        return repo

    def commit(self, repo_id: str, files: Mapping[str, bytes | str | Path], *, branch: str = "main",
               delete: Iterable[str] = (), title: str = "update", replace: bool = False) -> str:
        """Add a commit on ``branch`` (created if new) holding the branch's files plus ``files``; returns its sha."""
        repo = self.repos.get(repo_id) or self.create_repo(repo_id)
        with self._lock:
            base = {} if replace or branch not in repo.refs else dict(repo.commits[repo.refs[branch]])
        if not replace and ".gitattributes" not in base and ".gitattributes" not in files:
            files = {".gitattributes": "*.safetensors filter=lfs diff=lfs merge=lfs -text\n", **files}
        for p in delete:
            base.pop(p, None)
        for p, c in files.items():
            base[p] = make_blob(p, c.encode() if isinstance(c, str) else c)
        with self._lock:
            self._counter += 1
            h = hashlib.sha1(usedforsecurity=False)
            h.update(f"{repo_id}\0{repo.refs.get(branch, '')}\0{self._counter}\0{title}\n".encode())
            for p in sorted(base):
                h.update(f"{p}\0{base[p].sha256}\n".encode())
            sha = h.hexdigest()
            repo.commits[sha] = base
            repo.titles[sha] = title
            repo.refs[branch] = sha
            for b in base.values():
                if b.lfs:
                    self.blobs[b.sha256] = b
                    self._place(b)
        return sha

    def add_folder(self, repo_id: str, folder: Path, *, branch: str = "main", **repo_kw: Any) -> str:
        """Commit every file of a local folder (read from disk when served, not copied)."""
        if repo_id not in self.repos:
            self.create_repo(repo_id, **repo_kw)
        files: dict[str, bytes | str | Path] = {
            p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()
        }
        return self.commit(repo_id, files, branch=branch, title=f"upload {folder.name}")

    def serve_other_bytes(self, repo_id: str, path: str, data: bytes) -> None:
        """Make the CDN serve ``data`` for this LFS file (e.g. another size) while the Hub still lists and
        announces (X-Linked-Size, X-Linked-Etag) the committed blob: a CDN out of step with the Hub."""
        repo = self.repos[repo_id]
        blob = repo.commits[repo.refs["main"]].get(path)
        if blob is None or not blob.lfs:
            raise ValueError(f"{repo_id}/{path} is not an LFS file on main")
        other = make_blob(path, data)
        with self._lock:
            self.blobs[blob.sha256] = Blob(size=other.size, sha256=other.sha256, git_sha1=other.git_sha1, lfs=True,
                                           data=data)
            if self._cdn_root is not None:
                (self._cdn_root / "repos" / blob.sha256).unlink(missing_ok=True)  # a hard link: never write through
                (self._cdn_root / "repos" / blob.sha256).write_bytes(data)

    def tag(self, repo_id: str, name: str, commit: str) -> None:
        with self._lock:
            self.repos[repo_id].tag_refs[name] = commit

    def move_ref(self, repo_id: str, ref: str, commit: str) -> None:
        with self._lock:
            repo = self.repos[repo_id]
            (repo.tag_refs if ref in repo.tag_refs else repo.refs)[ref] = commit

    def inject(self, repo_id: str, path: str, *faults: Fault) -> None:
        """Faults for the GETs that serve the file's bytes (CDN or resolve-cache), in order."""
        with self._lock:
            self.faults.setdefault((repo_id, path), []).extend(faults)

    def inject_resolve(self, repo_id: str, path: str, *faults: Fault) -> None:
        """Faults for the Hub's own ``/resolve/`` answer (HEAD or GET, before any redirect): ``status``
        (e.g. ``Fault.rate_limited()``) or ``drop`` (the connection closes with no answer)."""
        for f in faults:
            if f.kind not in ("status", "drop"):
                raise ValueError(f"a resolve fault is 'status' or 'drop', not {f.kind!r}")
        with self._lock:
            self.faults.setdefault((repo_id, path, "resolve"), []).extend(faults)

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def take_fault(self, repo_id: str, path: str, *, resolve: bool = False) -> Fault | None:
        key = (repo_id, path, "resolve") if resolve else (repo_id, path)
        with self._lock:
            queue = self.faults.get(key)
            if not queue:
                return None
            f = queue[0]
            if f.times is not None:
                f.times -= 1
                if f.times <= 0:
                    queue.pop(0)
            return f

    def log(self, r: Request) -> None:
        with self._lock:
            self.requests.append(r)
            hooks = list(self.hooks)
        for h in hooks:
            h(r)

    def settle(self, timeout: float = 2.0) -> None:
        """Wait until every answer that serves bytes has been written and recorded.

        A GET is recorded after its last byte is sent, so a client can see the whole body (or the cut)
        before the record exists; call this before reading ``requests`` right after a transfer.
        ``downloads()`` calls it. Never waits inside a request handler (a hook).
        """
        if getattr(_serving, "active", False):
            return
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)

    def _begin_body(self) -> None:
        with self._lock:
            self._inflight += 1

    def _end_body(self) -> None:
        with self._idle:
            self._inflight -= 1
            if not self._inflight:
                self._idle.notify_all()

    def cdn_log(self) -> list[Request]:
        """The requests nginx answered (cdn="nginx"), from its access log; [] for the built-in CDN.

        nginx writes a line as a request ends, a moment after its last byte: read until two reads agree.
        """
        if self._nginx is None:
            return []
        seen = list(self._nginx.requests())
        for _ in range(25):
            time.sleep(0.02)
            again = list(self._nginx.requests())
            if again == seen:
                break
            seen = again
        return seen

    def downloads(self, repo_id: str | None = None, file: str | None = None) -> list[Request]:
        """GET requests that served (or tried to serve) a file's bytes: the CDN's and the resolve-cache's.

        With cdn="nginx" nginx's own log is appended (after this server's requests, so do not
        compare indexes across the two).
        """
        self.settle()
        with self._lock:
            mine = list(self.requests)
        return [
            r for r in mine + self.cdn_log()
            if r.method == "GET" and r.file is not None and (repo_id is None or r.repo_id == repo_id)
            and (file is None or r.file == file)
        ]


_serving = threading.local()  # set while a handler thread serves bytes: settle() must not wait on itself


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: HubServer
    role: str

    def handle_error(self, request: Any, client_address: Any) -> None:  # a client that hangs up is not news
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing ------------------------------------------------------------------------

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _auth_header(self) -> str | None:
        return self.headers.get("Authorization")

    def _record(self, status: int, *, repo_id: str | None = None, file: str | None = None, sent: int = 0) -> None:
        self.hub.log(Request(origin=self.server.role, method=self.command, path=urlsplit(self.path).path,
                             range=self.headers.get("Range"), auth=self._auth_header() is not None,
                             repo_id=repo_id, file=file, status=status, sent=sent))

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None) -> None:
        h = dict(headers or {})
        if code:
            h["X-Error-Code"] = code
        h["X-Error-Message"] = message
        self._json({"error": message}, status, h)

    def _read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _check_token(self) -> str:
        """'ok', 'none' (no token sent), 'outsider' (a valid account without gated grants) or 'bad' (unknown)."""
        auth = self._auth_header()
        if not auth:
            return "none"
        if self.hub.token and auth == f"Bearer {self.hub.token}":
            return "ok"
        return "outsider" if auth.removeprefix("Bearer ") in self.hub.outsider_tokens else "bad"

    def _segments(self) -> tuple[list[str], dict[str, list[str]]]:
        parts = urlsplit(self.path)
        return [unquote(s) for s in parts.path.split("/")[1:]], parse_qs(parts.query)

    def _split_repo(self, segs: list[str]) -> tuple[str, list[str]]:
        """Repo ids have one or two parts; prefer the known one."""
        if len(segs) >= 2 and f"{segs[0]}/{segs[1]}" in self.hub.repos:
            return f"{segs[0]}/{segs[1]}", segs[2:]
        if segs and segs[0] in self.hub.repos:
            return segs[0], segs[1:]
        return "/".join(segs[:2]), segs[2:]

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError):
            super().handle()

    # -- routing -------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _route(self) -> None:
        if self.server.role == "cdn":
            self._cdn()
            return
        segs, query = self._segments()
        if segs[:3] == ["api", "resolve-cache", "models"] and self.command in ("GET", "HEAD"):
            repo_id, rest = self._split_repo(segs[3:])
            if len(rest) >= 2:
                self._resolve(repo_id, rest[0], "/".join(rest[1:]), cache=True)
                return
            self._record(404)
            self._error(404, None, "Not Found")
        elif segs[:2] == ["api", "models"]:
            repo_id, rest = self._split_repo(segs[2:])
            self._api(repo_id, rest, query)
        elif len(segs) >= 3:
            repo_id, rest = self._split_repo(segs)
            if len(rest) >= 3 and rest[0] == "resolve":
                self._resolve(repo_id, rest[1], "/".join(rest[2:]))
                return
            self._record(404)
            self._error(404, None, "Not Found")
        else:
            self._record(404)
            self._error(404, None, "Not Found")

    def _repo_or_error(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        tok = self._check_token()
        if tok == "bad":
            self._error(401, None, "Invalid credentials in Authorization header")
            return None
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        return repo

    def _api(self, repo_id: str, rest: list[str], query: dict[str, list[str]]) -> None:
        self._status = 0
        try:
            self._api_answer(repo_id, rest, query)
        finally:
            self._record(self._status, repo_id=repo_id)  # after answering: hooks see what the client saw

    def _api_answer(self, repo_id: str, rest: list[str], query: dict[str, list[str]]) -> None:
        body = self._read_body() if self.command == "POST" else b""
        repo = self._repo_or_error(repo_id)
        if repo is None:
            return
        if self.command == "GET" and (not rest or rest[0] == "revision"):
            rev = rest[1] if len(rest) >= 2 else "main"
            sha = repo.resolve(rev)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return
            self._json(self._model_info(repo, sha, blobs=query.get("blobs", ["false"])[0].lower() == "true"))
        elif self.command == "GET" and rest and rest[0] == "tree" and len(rest) >= 2:
            self._tree(repo, rest[1], "/".join(rest[2:]), query)
        elif self.command == "POST" and rest and rest[0] == "paths-info" and len(rest) >= 2:
            self._paths_info(repo, rest[1], body)
        elif self.command == "GET" and len(rest) == 2 and rest[0] == "xet-read-token" and repo.xet:
            self._xet_token()
        elif self.command == "GET" and rest == ["refs"]:
            self._json({
                "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in sorted(repo.refs.items())],
                "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in sorted(repo.tag_refs.items())],
                "converts": [],
            })
        else:
            self._error(404, None, "Not Found")

    # -- API answers ---------------------------------------------------------------------

    def _xet_token(self) -> None:
        """What the Hub hands a Xet client: a CAS URL and a short-lived token (this CAS serves nothing)."""
        exp = int(time.time()) + 3600
        cas = f"{self.hub.url}/xet-cas"
        tok = "xet_" + hmac.new(self.hub.secret, str(exp).encode(), hashlib.sha256).hexdigest()[:32]
        self._json({"casUrl": cas, "accessToken": tok, "exp": exp},
                   headers={"X-Xet-Cas-Url": cas, "X-Xet-Access-Token": tok, "X-Xet-Token-Expiration": str(exp)})

    def _entry(self, repo: Repo, sha: str, path: str, blob: Blob, expand: bool) -> dict[str, Any]:
        e: dict[str, Any] = {"type": "file", "oid": blob.git_sha1, "size": blob.size, "path": path}
        if blob.lfs:
            e["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
            if repo.xet:
                e["xetHash"] = blob.xet_hash
        if expand:
            e["lastCommit"] = {"id": sha, "title": repo.titles.get(sha, ""), "date": DATE}
            e["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False, "virusNames": None},
                                       "pickleImportScan": None}
        return e

    @staticmethod
    def _folder(sha: str, path: str) -> dict[str, Any]:
        oid = hashlib.sha1(f"tree\0{sha}\0{path}".encode(), usedforsecurity=False).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": path}

    def _model_info(self, repo: Repo, sha: str, *, blobs: bool) -> dict[str, Any]:
        files = repo.commits[sha]
        siblings = []
        for p in sorted(files):
            s: dict[str, Any] = {"rfilename": p}
            if blobs:
                b = files[p]
                s.update(size=b.size, blobId=b.git_sha1)
                if b.lfs:
                    s["lfs"] = {"size": b.size, "sha256": b.sha256, "pointerSize": len(b.pointer)}
            siblings.append(s)
        card: dict[str, Any] = {}
        tags = list(repo.tags)
        if repo.license:
            card["license"] = repo.license
            tags.append(f"license:{repo.license}")
        if repo.library_name:
            card["library_name"] = repo.library_name
            tags.insert(0, repo.library_name)
        if repo.pipeline_tag:
            card["pipeline_tag"] = repo.pipeline_tag
        org = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        return {
            "_id": hashlib.md5(repo.repo_id.encode(), usedforsecurity=False).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": org,
            "sha": sha,
            "lastModified": DATE,
            "createdAt": DATE,
            "private": False,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "library_name": repo.library_name,
            "pipeline_tag": repo.pipeline_tag,
            "tags": tags,
            "cardData": card,
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(b.size for b in files.values()),
        }

    def _tree(self, repo: Repo, rev: str, path: str, query: dict[str, list[str]]) -> None:
        sha = repo.resolve(rev)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        expand = query.get("expand", ["false"])[0].lower() == "true"
        files = repo.commits[sha]
        prefix = f"{path}/" if path else ""
        if path and not any(p.startswith(prefix) for p in files):
            self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
            return
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            tail = p[len(prefix):].split("/")
            for i in range(1, len(tail)):
                folder = prefix + "/".join(tail[:i])
                if folder not in folders and (recursive or i == 1):
                    folders.add(folder)
                    entries.append(self._folder(sha, folder))
            if recursive or len(tail) == 1:
                entries.append(self._entry(repo, sha, p, files[p], expand))
        cursor = int(query.get("cursor", ["0"])[0] or 0)
        page = entries[cursor:cursor + self.hub.page_size]
        headers = {}
        if cursor + self.hub.page_size < len(entries):
            q = {"recursive": str(recursive), "expand": str(expand), "cursor": str(cursor + self.hub.page_size)}
            rev_q = quote(rev, safe="")
            path_q = "/" + quote(path, safe="") if path else ""
            nxt = f"{self.hub.url}/api/models/{repo.repo_id}/tree/{rev_q}{path_q}?{urlencode(q)}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._json(page, headers=headers)

    def _paths_info(self, repo: Repo, rev: str, body: bytes) -> None:
        sha = repo.resolve(rev)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            doc = json.loads(body or b"{}")
            paths, expand = list(doc.get("paths", [])), bool(doc.get("expand", False))
        else:
            form = parse_qs(body.decode("utf-8"))
            paths, expand = form.get("paths", []), form.get("expand", ["False"])[0].lower() == "true"
        files = repo.commits[sha]
        out: list[dict[str, Any]] = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append(self._entry(repo, sha, p, files[p], expand))
            elif any(f.startswith(p + "/") for f in files):
                out.append(self._folder(sha, p))
        self._json(out)

    # -- downloads -----------------------------------------------------------------------

    def _gate(self, repo: Repo | None, repo_id: str) -> bool:
        """Answer a gated repo's refusal (True) as the Hub does, or let the request through (False)."""
        tok = self._check_token()
        if repo is None or not repo.gated or tok == "ok":
            return False
        if tok == "outsider":
            self._record(403, repo_id=repo_id)
            self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                                          "authorized list. Visit its page to ask for access.")
        else:  # no token, or one the Hub does not know: not authenticated
            self._record(401, repo_id=repo_id)
            self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                                          "and be authenticated to access it. Please log in.")
        return True

    def _resolve(self, repo_id: str, rev: str, path: str, *, cache: bool = False) -> None:
        """``/resolve/`` (cache=False) and ``/api/resolve-cache/`` (cache=True, where plain files are served)."""
        fault = None if cache else self.hub.take_fault(repo_id, path, resolve=True)
        if fault is not None:
            self._record(fault.status if fault.kind == "status" else 0, repo_id=repo_id)
            if fault.kind == "status":
                phrase = HTTPStatus(fault.status).phrase if fault.status in HTTPStatus._value2member_map_ else "Error"
                self._error(fault.status, None, phrase, fault.headers)
            else:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
            return
        repo = self.hub.repos.get(repo_id)
        if self._gate(repo, repo_id):
            return
        if self._check_token() == "bad" or repo is None:
            self._record(401, repo_id=repo_id)
            self._repo_or_error(repo_id)
            return
        sha = repo.resolve(rev)
        if sha is None:
            self._record(404, repo_id=repo_id)
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        blob = repo.commits[sha].get(path)
        if blob is None or (cache and blob.lfs):
            self._record(404, repo_id=repo_id, file=None)
            self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", {"X-Repo-Commit": sha})
            return
        common = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "Vary": "Origin, Accept-Encoding",
                  "ETag": f'"{blob.git_sha1}"'}
        if blob.lfs:
            location = self.hub.cdn_location(blob, repo_id, path)
            headers = {**common, "Location": location, "X-Linked-Etag": f'"{blob.sha256}"',
                       "X-Linked-Size": str(blob.size)}
            if repo.xet:
                refresh = f"{self.hub.url}/api/models/{repo_id}/xet-read-token/{sha}"
                headers["X-Xet-Hash"] = blob.xet_hash
                headers["X-Xet-Refresh-Route"] = refresh
                headers["Link"] = (f'<{refresh}>; rel="xet-auth", '
                                   f'<{self.hub.url}/xet-cas/v1/reconstructions/{blob.xet_hash}>; '
                                   'rel="xet-reconstruction-info"')
            self._record(302, repo_id=repo_id, file=None)
            self._send(302, f"Found. Redirecting to {location}".encode(), headers,
                       content_type="text/plain; charset=utf-8")
            return
        if not cache:  # the real Hub sends plain files through a relative redirect to its resolve cache
            location = f"/api/resolve-cache/models/{repo_id}/{sha}/{quote(path)}"
            self._record(307, repo_id=repo_id, file=None)
            self._send(307, f"Temporary Redirect. Redirecting to {location}".encode(), {**common, "Location": location},
                       content_type="text/plain; charset=utf-8")
            return
        name = path.rsplit("/", 1)[-1]
        disp = f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"
        self._serve_blob(blob, repo_id, path, {**common, "Content-Disposition": disp}, plain=True)

    def _cdn(self) -> None:
        segs, query = self._segments()
        blob = self.hub.blobs.get(segs[1]) if len(segs) == 2 and segs[0] == "repos" else None
        repo_id, path = query.get("repo", [None])[0], query.get("filename", [None])[0]
        if blob is None or repo_id is None or path is None:
            self._record(404)
            self._send(404, b"<Error><Code>NoSuchKey</Code></Error>", content_type="application/xml")
            return
        refusal = self.hub.check_signature(f"/repos/{segs[1]}", query)
        if refusal is not None:
            self._record(403, repo_id=repo_id, file=path)
            self._send(403, refusal, content_type="application/xml")
            return
        disp = f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}; filename=\"{path.rsplit('/', 1)[-1]}\";"
        self._serve_blob(blob, repo_id, path, {"ETag": f'"{blob.sha256}"', "Accept-Ranges": "bytes",
                                               "Content-Disposition": disp})

    def _range(self, size: int) -> tuple[int, int, int] | None:
        """(start, end, status) for the Range header (200 when absent or unparsable), None if unsatisfiable."""
        rng = self.headers.get("Range")
        if not rng or not rng.startswith("bytes="):
            return 0, size, 200
        a, _, b = rng[6:].partition("-")
        try:
            if a == "":
                start, end = max(0, size - int(b)), size
            else:
                start, end = int(a), (min(size, int(b) + 1) if b else size)
        except ValueError:
            return 0, size, 200
        if (start >= size or start >= end) and size > 0:
            return None
        return start, end, 206

    def _accepts_gzip(self) -> bool:
        for part in (self.headers.get("Accept-Encoding") or "").split(","):
            name, _, params = part.strip().partition(";")
            if name.strip().lower() in ("gzip", "*") and params.replace(" ", "").lower() not in ("q=0", "q=0.0"):
                return True
        return False

    def _serve_blob(self, blob: Blob, repo_id: str, path: str, headers: dict[str, str], *, plain: bool = False) -> None:
        """Serve a blob's bytes (a range of them); ``plain``: the resolve-cache's gzip/chunked answers.

        Counted in flight until recorded, so ``HubServer.settle()`` can wait for the record.
        """
        self.hub._begin_body()
        _serving.active = True
        try:
            self._serve_bytes(blob, repo_id, path, headers, plain=plain)
        finally:
            _serving.active = False
            self.hub._end_body()

    def _serve_bytes(self, blob: Blob, repo_id: str, path: str, headers: dict[str, str], *, plain: bool) -> None:
        size = blob.size
        text = plain and b"\0" not in blob.whole()[:TEXT_SNIFF]
        zipped = text and self.command == "GET" and self._accepts_gzip()
        span = (0, size, 200) if zipped else self._range(size)  # CloudFront ignores Range on what it compresses
        if span is None:
            self._record(416, repo_id=repo_id, file=path)
            self._send(416, b"", {"Content-Range": f"bytes */{size}"})
            return
        start, end, status = span
        fault = self.hub.take_fault(repo_id, path) if self.command == "GET" else None
        if fault is not None and fault.kind == "status":
            self._record(fault.status, repo_id=repo_id, file=path)
            phrase = HTTPStatus(fault.status).phrase if fault.status in HTTPStatus._value2member_map_ else "Error"
            self._error(fault.status, None, phrase, fault.headers)
            return
        if fault is not None and fault.kind == "expire":
            self._record(403, repo_id=repo_id, file=path)
            self._send(403, EXPIRED_BODY, content_type="application/xml")
            return
        chunked = plain and self.command == "GET" and status == 200
        ctype = ("application/json; charset=utf-8" if path.endswith(".json") else "text/plain; charset=utf-8") \
            if text else "application/octet-stream"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        if zipped:
            self.send_header("Content-Encoding", "gzip")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{max(start, end - 1)}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            self._record(status, repo_id=repo_id, file=path)
            return
        sent = 0
        try:
            if fault is None and blob.storage is not None and not chunked:
                with open(blob.storage, "rb") as f:
                    sent = self.connection.sendfile(f, start, end - start) if end > start else 0
                return
            sent = self._write_body(self._body(blob, start, end, fault, zipped), chunked, fault)
        finally:
            self._record(status, repo_id=repo_id, file=path, sent=sent)

    @staticmethod
    def _body(blob: Blob, start: int, end: int, fault: Fault | None, zipped: bool) -> Iterable[bytes]:
        """The body's chunks: bytes [start, end), the middle one flipped for ``corrupt``, gzipped whole for ``zipped``."""
        flip = start + (end - start) // 2 if fault is not None and fault.kind == "corrupt" and end > start else None
        pos = start
        chunks: list[bytes] = []
        for chunk in blob.read(start, end):
            if flip is not None and pos <= flip < pos + len(chunk):
                b = bytearray(chunk)
                b[flip - pos] ^= 0xFF
                chunk = bytes(b)
            pos += len(chunk)
            if not zipped:
                yield chunk
            else:
                chunks.append(chunk)
        if zipped:
            z = gzip.compress(b"".join(chunks), mtime=0)
            for i in range(0, len(z), 64 * 1024):
                yield z[i:i + 64 * 1024]

    def _write_body(self, chunks: Iterable[bytes], chunked: bool, fault: Fault | None) -> int:
        """Write the chunks (framed when ``chunked``): a ``drop`` cuts the connection after ``after`` body bytes,
        a ``stall`` pauses there. Returns the body bytes sent."""
        limit = fault.after if fault is not None and fault.kind == "drop" else None
        stall_at = fault.after if fault is not None and fault.kind == "stall" else None
        sent = 0
        for chunk in chunks:
            if not chunk:
                continue
            if stall_at is not None and sent + len(chunk) > stall_at:
                head, chunk = chunk[: max(0, stall_at - sent)], chunk[max(0, stall_at - sent):]
                if head:
                    self.wfile.write((f"{len(head):x}\r\n".encode() + head + b"\r\n") if chunked else head)
                    sent += len(head)
                self.wfile.flush()
                time.sleep(fault.seconds if fault is not None else 0)
                stall_at = None
            frame = f"{len(chunk):x}\r\n".encode() if chunked else b""
            if limit is not None and sent + len(chunk) > limit:
                self.wfile.write(frame + chunk[: max(0, limit - sent)])
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return limit
            self.wfile.write(frame + chunk + (b"\r\n" if chunked else b""))
            sent += len(chunk)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        return sent


# -- tiny models and the command line -------------------------------------------------------


def tiny_model_files(folder: Path, *, seed: int = 0, shards: int = 1, **cfg: Any) -> dict[str, bytes]:
    """The files of a tiny Llama-shaped model from tests/factories.py, as {path: bytes}."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from factories import make_model

    d = make_model(folder, shards=shards, seed=seed, **cfg)
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def serve(repos: Mapping[str, Path] | None = None, *, demo: bool = False, port: int = 0,
          token: str | None = DEFAULT_TOKEN, gated: Iterable[str] = (), cdn: str = "builtin",
          url_ttl: float | None = None, xet: bool = False) -> HubServer:
    """Start a server holding ``repos`` ({repo_id: folder}) and, with ``demo``, a tiny generated model."""
    hub = HubServer(port=port, token=token, cdn=cdn, url_ttl=url_ttl)
    gated = set(gated)
    for repo_id, folder in (repos or {}).items():
        sha = hub.add_folder(repo_id, Path(folder), gated=repo_id in gated, xet=xet)
        hub.tag(repo_id, "v1.0", sha)
    if demo:
        with tempfile.TemporaryDirectory(prefix="airpack-hub-demo-") as tmp:
            files = tiny_model_files(Path(tmp) / "m", shards=2)  # read into memory; the folder goes away
        hub.create_repo("acme/tiny-llama", license="apache-2.0", xet=xet)
        sha = hub.commit("acme/tiny-llama", files, title="initial upload")
        hub.tag("acme/tiny-llama", "v1.0", sha)
    return hub.start()


def _folders(root: Path) -> dict[str, Path]:
    """ROOT/ORG/NAME folders holding files, as {ORG/NAME: folder}."""
    out: dict[str, Path] = {}
    for org in sorted(p for p in root.iterdir() if p.is_dir()):
        for name in sorted(p for p in org.iterdir() if p.is_dir()):
            out[f"{org.name}/{name.name}"] = name
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.hubserver", description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", type=Path, help="folder of ORG/NAME model folders to serve as repos")
    ap.add_argument("--repo", action="append", default=[], metavar="ORG/NAME=DIR", help="serve DIR as repo ORG/NAME")
    ap.add_argument("--demo", action="store_true", help="also serve a tiny generated model as acme/tiny-llama")
    ap.add_argument("--port", type=int, default=0, help="port of the Hub (0: any free port)")
    ap.add_argument("--gated", action="append", default=[], metavar="ORG/NAME", help="make this repo gated")
    ap.add_argument("--token", default=DEFAULT_TOKEN, help="the one token this Hub accepts")
    ap.add_argument("--cdn", choices=("builtin", "nginx"), default="builtin",
                    help="where LFS redirects go: this server's second port, or a real nginx (needs nginx installed)")
    ap.add_argument("--url-ttl", type=float, default=None, metavar="SECONDS",
                    help="signed CDN URLs expire this many seconds after the redirect (default: never)")
    ap.add_argument("--xet", action="store_true", help="serve the repos as Xet-backed (headers only)")
    ap.add_argument("--log", type=Path, metavar="FILE",
                    help="append one JSON line per request this server answers (not nginx's: see cdn-access-log)")
    args = ap.parse_args(argv)
    repos: dict[str, Path] = _folders(args.serve) if args.serve else {}
    for spec in args.repo:
        rid, _, d = spec.partition("=")
        repos[rid] = Path(d)
    if not repos and not args.demo:
        ap.error("nothing to serve: give --serve DIR, --repo ORG/NAME=DIR or --demo")
    if args.cdn == "nginx":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from nginx_cdn import NginxCDN

        if not NginxCDN.available():
            ap.error("--cdn nginx: nginx is not installed (make cdn-bin installs it)")
    hub = serve(repos, demo=args.demo, port=args.port, token=args.token, gated=args.gated, cdn=args.cdn,
                url_ttl=args.url_ttl, xet=args.xet)
    log = open(args.log, "a", encoding="utf-8") if args.log else None  # noqa: SIM115 (open for the server's life)
    if log is not None:
        log_lock = threading.Lock()

        def write_line(r: Request) -> None:
            with log_lock:
                log.write(json.dumps(dataclasses.asdict(r)) + "\n")
                log.flush()

        hub.hooks.append(write_line)
    print(hub.url, flush=True)
    print(f"  cdn {hub.cdn_url}", file=sys.stderr, flush=True)
    if hub.nginx is not None:
        print(f"  cdn-access-log: {hub.nginx.access_log}", file=sys.stderr, flush=True)
    for rid, repo in sorted(hub.repos.items()):
        print(f"  {rid} main={repo.refs['main']}", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    hub.stop()
    if log is not None:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
