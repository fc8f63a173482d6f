"""A Hugging Face Hub-compatible HTTP server on 127.0.0.1, for the tests, the demo and the benchmark.

It speaks the part of the Hub's protocol that the real ``huggingface_hub``
client uses to resolve, list and download a model, with the same endpoints
and headers, so the client talks to it unpatched over a real socket:

- ``GET /api/models/{repo}[/revision/{rev}]`` (``?blobs=true`` adds sizes, blob ids and LFS data)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (recursive, expand, paginated with a ``Link`` header)
- ``POST /api/models/{repo}/paths-info/{rev}`` and ``GET /api/models/{repo}/refs``
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag``; LFS files answer ``302``
  to a second server on another port (the CDN) with ``X-Linked-Etag`` and ``X-Linked-Size``; the CDN
  serves ``Range`` requests (``206``/``Content-Range``). It never sends the Xet headers.
- errors as the Hub sends them: ``X-Error-Code`` ``RepoNotFound`` (401), ``RevisionNotFound``,
  ``EntryNotFound`` (404), ``GatedRepo`` (401 without a token, 403 with a wrong one).

Repos hold several commits; branches and tags move with ``commit()``, ``tag()``
and ``move_ref()``. Faults injected per file make a download drop the
connection mid-file, answer an HTTP error, or serve other bytes of the same
size. Every request is recorded (``requests``) so tests can tell what was
fetched again.

Run it on its own (for the demo) with::

    python -m tests.hubserver --demo              # a tiny generated model, acme/tiny-llama
    python -m tests.hubserver --serve DIR         # every DIR/ORG/NAME folder becomes a repo

It prints its URL on the first line of stdout and serves until it is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz")
LFS_MIN_SIZE = 10 * 1024 * 1024  # larger files go to LFS whatever their name, as on the Hub
DEFAULT_TOKEN = "hf_airpackTESTtoken0123456789"
CHUNK = 1 << 20
DATE = "2025-01-15T12:00:00.000Z"


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
    """What goes wrong on the next download(s) of one file.

    kind: ``drop`` (send ``after`` bytes of the body, then cut the connection),
    ``status`` (answer HTTP ``status``), ``corrupt`` (flip one byte, same size).
    ``times``: how many downloads it hits; None for every one.
    """

    kind: str
    after: int = 0
    status: int = 503
    times: int | None = 1


@dataclass
class Repo:
    repo_id: str
    gated: bool | str = False
    license: str | None = "apache-2.0"
    pipeline_tag: str | None = "text-generation"
    library_name: str | None = "transformers"
    tags: tuple[str, ...] = ()
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
    """The Hub (and its CDN) on two 127.0.0.1 ports. Use as a context manager or start()/stop()."""

    def __init__(self, *, token: str | None = DEFAULT_TOKEN, page_size: int = 1000, host: str = "127.0.0.1",
                 port: int = 0, cdn_port: int = 0) -> None:
        self.token = token
        self.page_size = page_size
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, Blob] = {}  # sha256 -> blob, for the CDN
        self.faults: dict[tuple[str, str], list[Fault]] = {}
        self.requests: list[Request] = []
        self.hooks: list[Callable[[Request], None]] = []  # called after each request is recorded
        self._lock = threading.Lock()
        self._counter = 0
        self._host, self._port, self._cdn_port = host, port, cdn_port
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> HubServer:
        for role, port in (("hub", self._port), ("cdn", self._cdn_port)):
            srv = _Server((self._host, port), _Handler)
            srv.hub = self
            srv.role = role
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                                 name=f"hubserver-{role}")
            t.start()
            self._servers.append(srv)
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

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
        host, port = self._servers[1].server_address[:2]
        return f"http://{host}:{port}"

    # -- content -------------------------------------------------------------------------

    def create_repo(self, repo_id: str, *, gated: bool | str = False, license: str | None = "apache-2.0",
                    pipeline_tag: str | None = "text-generation", library_name: str | None = "transformers",
                    tags: Iterable[str] = ()) -> Repo:
        if gated is True:
            gated = "manual"
        repo = Repo(repo_id=repo_id, gated=gated, license=license, pipeline_tag=pipeline_tag,
                    library_name=library_name, tags=tuple(tags))
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
        return sha

    def add_folder(self, repo_id: str, folder: Path, *, branch: str = "main", **repo_kw: Any) -> str:
        """Commit every file of a local folder (read from disk when served, not copied)."""
        if repo_id not in self.repos:
            self.create_repo(repo_id, **repo_kw)
        files: dict[str, bytes | str | Path] = {
            p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()
        }
        return self.commit(repo_id, files, branch=branch, title=f"upload {folder.name}")

    def tag(self, repo_id: str, name: str, commit: str) -> None:
        with self._lock:
            self.repos[repo_id].tag_refs[name] = commit

    def move_ref(self, repo_id: str, ref: str, commit: str) -> None:
        with self._lock:
            repo = self.repos[repo_id]
            (repo.tag_refs if ref in repo.tag_refs else repo.refs)[ref] = commit

    def inject(self, repo_id: str, path: str, *faults: Fault) -> None:
        with self._lock:
            self.faults.setdefault((repo_id, path), []).extend(faults)

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def take_fault(self, repo_id: str, path: str) -> Fault | None:
        with self._lock:
            queue = self.faults.get((repo_id, path))
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

    def downloads(self, repo_id: str | None = None, file: str | None = None) -> list[Request]:
        """GET requests that served (or tried to serve) a file's bytes."""
        with self._lock:
            return [
                r for r in self.requests
                if r.method == "GET" and r.file is not None and (repo_id is None or r.repo_id == repo_id)
                and (file is None or r.file == file) and (r.origin == "cdn" or r.status in (200, 206))
            ]


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

    def _check_token(self) -> str | None:
        """'ok', 'none' (no token sent) or 'bad' (a token this Hub does not know)."""
        auth = self._auth_header()
        if not auth:
            return "none"
        return "ok" if self.hub.token and auth == f"Bearer {self.hub.token}" else "bad"

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
        if segs[:2] == ["api", "models"]:
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
        elif self.command == "GET" and rest == ["refs"]:
            self._json({
                "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in sorted(repo.refs.items())],
                "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in sorted(repo.tag_refs.items())],
                "converts": [],
            })
        else:
            self._error(404, None, "Not Found")

    # -- API answers ---------------------------------------------------------------------

    def _entry(self, repo: Repo, sha: str, path: str, blob: Blob, expand: bool) -> dict[str, Any]:
        e: dict[str, Any] = {"type": "file", "oid": blob.git_sha1, "size": blob.size, "path": path}
        if blob.lfs:
            e["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
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

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        repo = self.hub.repos.get(repo_id)
        tok = self._check_token()
        if repo is not None and repo.gated and tok != "ok":
            self._record(401 if tok == "none" else 403, repo_id=repo_id)
            if tok == "none":
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                                              "and be authenticated to access it. Please log in.")
            else:
                self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                                              "authorized list.")
            return
        if tok == "bad" or repo is None:
            self._record(401, repo_id=repo_id)
            self._repo_or_error(repo_id)
            return
        sha = repo.resolve(rev)
        if sha is None:
            self._record(404, repo_id=repo_id)
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        blob = repo.commits[sha].get(path)
        if blob is None:
            self._record(404, repo_id=repo_id, file=None)
            self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", {"X-Repo-Commit": sha})
            return
        common = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "Vary": "Origin, Accept-Encoding"}
        if blob.lfs:
            q = urlencode({"repo": repo_id, "filename": path, "Expires": "4102444800", "Signature": "test"})
            location = f"{self.hub.cdn_url}/repos/{blob.sha256}?{q}"
            body = f"Found. Redirecting to {location}".encode()
            self._record(302, repo_id=repo_id, file=None)
            self._send(302, body, {**common, "Location": location, "ETag": f'"{blob.git_sha1}"',
                                   "X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)},
                       content_type="text/plain; charset=utf-8")
            return
        self._serve_blob(blob, repo_id, path, {**common, "ETag": f'"{blob.git_sha1}"'})

    def _cdn(self) -> None:
        segs, query = self._segments()
        blob = self.hub.blobs.get(segs[1]) if len(segs) == 2 and segs[0] == "repos" else None
        repo_id, path = query.get("repo", [None])[0], query.get("filename", [None])[0]
        if blob is None or repo_id is None or path is None:
            self._record(404)
            self._send(404, b"<Error><Code>NoSuchKey</Code></Error>", content_type="application/xml")
            return
        disp = f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}; filename=\"{path.rsplit('/', 1)[-1]}\";"
        self._serve_blob(blob, repo_id, path, {"ETag": f'"{blob.sha256}"', "Accept-Ranges": "bytes",
                                               "Content-Disposition": disp})

    def _serve_blob(self, blob: Blob, repo_id: str, path: str, headers: dict[str, str]) -> None:
        size = blob.size
        start, end, status = 0, size, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            try:
                if a == "":
                    start, end = max(0, size - int(b)), size
                else:
                    start, end = int(a), (min(size, int(b) + 1) if b else size)
                status = 206
            except ValueError:
                start, end, status = 0, size, 200
            if status == 206 and (start >= size or start >= end) and size > 0:
                self._record(416, repo_id=repo_id, file=path)
                self._send(416, b"", {"Content-Range": f"bytes */{size}"})
                return
        fault = self.hub.take_fault(repo_id, path) if self.command == "GET" else None
        if fault is not None and fault.kind == "status":
            self._record(fault.status, repo_id=repo_id, file=path)
            self._error(fault.status, None, "Service Unavailable")
            return
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{max(start, end - 1)}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            self._record(status, repo_id=repo_id, file=path)
            return
        sent = 0
        try:
            if fault is None and blob.storage is not None:
                with open(blob.storage, "rb") as f:
                    sent = self.connection.sendfile(f, start, end - start) if end > start else 0
                return
            limit = fault.after if fault is not None and fault.kind == "drop" else None
            flip = size // 2 if fault is not None and fault.kind == "corrupt" else None
            pos = start
            for chunk in blob.read(start, end):
                if flip is not None and pos <= flip < pos + len(chunk):
                    b = bytearray(chunk)
                    b[flip - pos] ^= 0xFF
                    chunk = bytes(b)
                if limit is not None and sent + len(chunk) > limit:
                    self.wfile.write(chunk[: max(0, limit - sent)])
                    sent = limit
                    self.wfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(chunk)
                sent += len(chunk)
                pos += len(chunk)
        finally:
            self._record(status, repo_id=repo_id, file=path, sent=sent)


# -- tiny models and the command line -------------------------------------------------------


def tiny_model_files(folder: Path, *, seed: int = 0, shards: int = 1, **cfg: Any) -> dict[str, bytes]:
    """The files of a tiny Llama-shaped model from tests/factories.py, as {path: bytes}."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from factories import make_model

    d = make_model(folder, shards=shards, seed=seed, **cfg)
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def serve(repos: Mapping[str, Path] | None = None, *, demo: bool = False, port: int = 0,
          token: str | None = DEFAULT_TOKEN, gated: Iterable[str] = ()) -> HubServer:
    """Start a server holding ``repos`` ({repo_id: folder}) and, with ``demo``, a tiny generated model."""
    hub = HubServer(port=port, token=token)
    gated = set(gated)
    for repo_id, folder in (repos or {}).items():
        sha = hub.add_folder(repo_id, Path(folder), gated=repo_id in gated)
        hub.tag(repo_id, "v1.0", sha)
    if demo:
        with tempfile.TemporaryDirectory(prefix="airpack-hub-demo-") as tmp:
            files = tiny_model_files(Path(tmp) / "m", shards=2)  # read into memory; the folder goes away
        hub.create_repo("acme/tiny-llama", license="apache-2.0")
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
    args = ap.parse_args(argv)
    repos: dict[str, Path] = _folders(args.serve) if args.serve else {}
    for spec in args.repo:
        rid, _, d = spec.partition("=")
        repos[rid] = Path(d)
    if not repos and not args.demo:
        ap.error("nothing to serve: give --serve DIR, --repo ORG/NAME=DIR or --demo")
    hub = serve(repos, demo=args.demo, port=args.port, token=args.token, gated=args.gated)
    print(hub.url, flush=True)
    for rid, repo in sorted(hub.repos.items()):
        print(f"  {rid} main={repo.refs['main']}", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
