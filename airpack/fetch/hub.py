"""The Hugging Face Hub, through huggingface_hub (the only module that imports it).

The revision is resolved to a commit once and every listing and download
names that commit, so a branch that moves mid-pack changes nothing. The
client checks sizes only; airpack hashes every byte itself: SHA-256 against
the LFS oid for LFS files, the git blob SHA-1 for the others.

Downloads land in a partial file named after the content id the Hub lists,
so an interrupted pack resumes with an HTTP range request on the next run
and never mixes bytes of two different files. The token is sent to the Hub
only (never to a CDN of another origin) and is scrubbed from every message.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub import __version__ as hf_version
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import http_get

from .. import __version__
from .._fs import check_relpath, oserror_to_airpack
from .._urls import redact_url
from ..errors import (
    FetchError,
    GatedRepoError,
    IntegrityError,
    RevisionNotFoundError,
    UnsafePathError,
    UsageError,
)
from ..hashing import CHUNK, FileDigest

MAX_FILES = 100_000
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class HubFile:
    """One file of a repo at a commit, as the Hub lists it."""

    path: str
    size: int
    blob_id: str  # git object id (for an LFS file: the id of its pointer)
    sha256: str | None  # the LFS oid; None for a plain git file

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def content_id(self) -> str:
        """What the bytes must hash to: the LFS SHA-256, or the git blob SHA-1."""
        return self.sha256 if self.sha256 is not None else self.blob_id

    def hub_record(self) -> dict[str, Any]:
        if self.sha256 is not None:
            return {"size": self.size, "sha256": self.sha256}
        return {"size": self.size, "git_sha1": self.blob_id}


@dataclass(frozen=True)
class HubSnapshot:
    """A repo resolved to one commit: its files and what the Hub says about it."""

    repo_id: str
    revision: str
    commit: str
    files: tuple[HubFile, ...]
    license: str | None
    gated: bool
    pipeline_tag: str | None
    library_name: str | None


def git_blob_sha1_header(size: int) -> bytes:
    return b"blob %d\0" % size


def normalize_endpoint(endpoint: str | None) -> str:
    """The endpoint as given, or the public Hub; only http(s) URLs without a path query."""
    ep = (endpoint or DEFAULT_ENDPOINT).strip().rstrip("/")
    parts = urlsplit(ep)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise UsageError(f"invalid Hub endpoint {redact_url(ep)!r}: expected http(s)://HOST[:PORT]")
    if "@" in parts.netloc:
        raise UsageError(f"Hub endpoint {redact_url(ep)!r} carries credentials; give the token in HF_TOKEN or --token-file")
    return ep


class _Scrubber:
    """Removes the token (and URL credentials) from any text that leaves this module."""

    def __init__(self, token: str | None) -> None:
        self._token = token

    def __call__(self, text: str) -> str:
        if self._token:
            text = text.replace(self._token, "***")
        # A signed CDN URL's query grants access to the file for a while: keep it out of messages too.
        text = re.sub(r"(https?://[^\s?'\"]+)\?[^\s'\"]*", r"\1?...", text)
        return redact_url(text)


class _Quiet:
    """A stand-in for tqdm: airpack reports progress itself, through the file it hands the client."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: float | None = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _HashingSink:
    """The file the client writes into: hashes and reports bytes as they land.

    The client may rewind and truncate (a server that ignores a range request);
    the running digest is then dropped and the file is hashed again from disk.
    """

    def __init__(self, f: IO[bytes], hashers: list[Any], on_bytes: Callable[[int], None]) -> None:
        self._f = f
        self._hashers = hashers
        self._on_bytes = on_bytes
        self.valid = True
        self.reported = 0

    def write(self, b: bytes) -> int:
        n = self._f.write(b)
        if self.valid:
            for h in self._hashers:
                h.update(b)
        self._on_bytes(len(b))
        self.reported += len(b)
        return n

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        self.valid = False
        return self._f.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        self.valid = False
        self._f.flush()
        end = os.fstat(self._f.fileno()).st_size
        new = self._f.truncate(size)
        self._on_bytes(-(end - new))  # the bars go back with the bytes dropped
        return new

    def flush(self) -> None:
        self._f.flush()


def _hash_path(path: Path, f: HubFile, *, on_bytes: Callable[[int], None] | None = None) -> tuple[FileDigest, str | None]:
    """(size + SHA-256, git blob SHA-1 when the file is a plain git file) of a file on disk."""
    sha = hashlib.sha256()
    sha1 = None if f.lfs else hashlib.sha1(git_blob_sha1_header(f.size), usedforsecurity=False)
    size = 0
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            sha.update(view[:n])
            if sha1 is not None:
                sha1.update(view[:n])
            size += n
            if on_bytes is not None:
                on_bytes(n)
    return FileDigest(size=size, sha256=sha.hexdigest()), (sha1.hexdigest() if sha1 is not None else None)


def matches_hub(f: HubFile, digest: FileDigest, git_sha1: str | None) -> bool:
    if digest.size != f.size:
        return False
    if f.sha256 is not None:
        return digest.sha256 == f.sha256
    return git_sha1 == f.blob_id


def whole_file_matches(path: Path, f: HubFile, *, on_bytes: Callable[[int], None] | None = None) -> FileDigest | None:
    """The digest of ``path`` if it already holds exactly the bytes the Hub lists (by hash, never by name)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise oserror_to_airpack(e, "cannot read", str(path)) from None
    if not path.is_file() or path.is_symlink() or st.st_size != f.size:
        return None
    try:
        digest, sha1 = _hash_path(path, f, on_bytes=on_bytes)
    except OSError as e:
        raise oserror_to_airpack(e, "cannot read", str(path)) from None
    return digest if matches_hub(f, digest, sha1) else None


class HubClient:
    """Resolve and download from one Hub endpoint with one (optional) token."""

    def __init__(self, *, endpoint: str | None, token: str | None, etag_timeout: float = 30) -> None:
        self.endpoint = normalize_endpoint(endpoint)
        self._token = token or None
        self._scrub = _Scrubber(self._token)
        self._api = HfApi(endpoint=self.endpoint, token=self._auth)
        self._etag_timeout = etag_timeout

    @property
    def _auth(self) -> str | bool:
        # False, not None: never fall back to a token saved on this machine that the packer did not hand us.
        return self._token if self._token else False

    def _headers(self) -> dict[str, str]:
        h = {"user-agent": f"airpack/{__version__}; hf_hub/{hf_version}"}
        if self._token:
            h["authorization"] = f"Bearer {self._token}"
        return h

    @property
    def has_token(self) -> bool:
        return self._token is not None

    # -- errors ------------------------------------------------------------------------

    def _translate(self, e: BaseException, what: str, repo_id: str, revision: str, path: str | None) -> Exception | None:
        """airpack's named error for one of the client's exceptions (token-free), or None if it is not one."""
        s = self._scrub
        where = f"{repo_id}/{path}" if path else repo_id
        if isinstance(e, hf_errors.GatedRepoError):
            msg = (
                f"{repo_id} is gated and this token has no access to it"
                if self._token
                else f"{repo_id} is gated: it needs a token from an account that accepted its licence"
            )
            return GatedRepoError(msg, path=path)
        if isinstance(e, hf_errors.RevisionNotFoundError):
            return RevisionNotFoundError(f"{repo_id}: revision {revision!r} not found on {self.endpoint}", path=path)
        if isinstance(e, hf_errors.RemoteEntryNotFoundError):
            return RevisionNotFoundError(f"{repo_id}@{revision}: file {path!r} not found on {self.endpoint}", path=path)
        if isinstance(e, hf_errors.RepositoryNotFoundError):
            why = "this token has no access" if self._token else "no token was given"
            return RevisionNotFoundError(f"{repo_id}: repository not found on {self.endpoint} (or private and {why})", path=path)
        if isinstance(e, hf_errors.HfHubHTTPError):
            resp = getattr(e, "response", None)
            status = resp.status_code if resp is not None else "?"
            if status == 401 and self._token:
                return FetchError(
                    f"{what} {where}: {self.endpoint} rejected the token (HTTP 401)", path=path,
                    hint="Check the token in HF_TOKEN or --token-file (it is never printed).",
                )
            return FetchError(s(f"{what} {where}: HTTP {status} from {self.endpoint}"), path=path)
        if isinstance(e, hf_errors.OfflineModeIsEnabled):
            return FetchError(f"{what} {where}: HF_HUB_OFFLINE is set; unset it to pack from the Hub", path=path)
        if isinstance(e, httpx2.HTTPError):
            return FetchError(s(f"{what} {where}: {type(e).__name__}: {e}"), path=path)
        if isinstance(e, (KeyError, TypeError, ValueError, AttributeError)):
            return FetchError(s(f"{what} {where}: malformed answer from {self.endpoint}: {type(e).__name__}: {e}"), path=path)
        return None

    @contextlib.contextmanager
    def _errors(self, what: str, repo_id: str, revision: str, path: str | None = None) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            mapped = self._translate(e, what, repo_id, revision, path)
            if mapped is None:
                raise
            raise mapped from None

    # -- resolve -----------------------------------------------------------------------

    def resolve(self, repo_id: str, revision: str) -> HubSnapshot:
        """Resolve ``revision`` to a commit, then list every file with its size and hashes at that commit."""
        with self._errors("cannot resolve", repo_id, revision):
            info = self._api.model_info(repo_id, revision=revision, token=self._auth, timeout=self._etag_timeout)
        commit = info.sha
        if not isinstance(commit, str) or not _HEX40.match(commit):
            raise FetchError(f"{repo_id}@{revision}: the Hub answered without a valid commit sha")
        if _HEX40.match(revision) and revision != commit:
            raise FetchError(f"{repo_id}: asked for commit {revision} but the Hub answered with {commit}")
        files: list[HubFile] = []
        seen: set[str] = set()
        with self._errors("cannot list", repo_id, revision):
            for entry in self._api.list_repo_tree(repo_id, revision=commit, recursive=True, token=self._auth):
                if not hasattr(entry, "blob_id"):  # a folder
                    continue
                files.append(self._hub_file(repo_id, entry))
                if files[-1].path in seen:
                    raise IntegrityError(f"{repo_id}@{commit}: the Hub lists {files[-1].path!r} twice", path=files[-1].path)
                seen.add(files[-1].path)
                if len(files) > MAX_FILES:
                    raise FetchError(f"{repo_id}@{commit}: more than {MAX_FILES} files; narrow it with include patterns")
        card = info.card_data
        lic = getattr(card, "license", None) if card is not None else None
        if not isinstance(lic, str):
            lic = next((t.split(":", 1)[1] for t in (info.tags or []) if isinstance(t, str) and t.startswith("license:")), None)
        return HubSnapshot(
            repo_id=repo_id,
            revision=revision,
            commit=commit,
            files=tuple(sorted(files, key=lambda f: f.path)),
            license=lic if isinstance(lic, str) else None,
            gated=bool(info.gated),
            pipeline_tag=info.pipeline_tag if isinstance(info.pipeline_tag, str) else None,
            library_name=info.library_name if isinstance(info.library_name, str) else None,
        )

    @staticmethod
    def _hub_file(repo_id: str, entry: Any) -> HubFile:
        path = entry.path
        try:
            check_relpath(path)
        except UnsafePathError as e:
            raise UnsafePathError(f"{repo_id}: the Hub lists an unsafe path: {e}", path=str(path)) from None
        size, blob_id, lfs = entry.size, entry.blob_id, entry.lfs
        if not isinstance(blob_id, str) or not _HEX40.match(blob_id):
            raise FetchError(f"{repo_id}: the Hub lists {path!r} without a valid git object id", path=path)
        sha256 = None
        if lfs is not None:
            sha256, size = lfs.get("sha256"), lfs.get("size")
            if not isinstance(sha256, str) or not _HEX64.match(sha256):
                raise FetchError(f"{repo_id}: the Hub lists LFS file {path!r} without a valid sha256", path=path)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FetchError(f"{repo_id}: the Hub lists {path!r} without a valid size", path=path)
        return HubFile(path=path, size=size, blob_id=blob_id, sha256=sha256)

    # -- download ----------------------------------------------------------------------

    def download(
        self,
        snap: HubSnapshot,
        f: HubFile,
        dest: Path,
        *,
        partial: Path,
        on_bytes: Callable[[int], None],
    ) -> FileDigest:
        """Fetch one file at the snapshot's commit into ``dest``, resuming ``partial`` if it is there.

        Raises IntegrityError when the bytes do not hash to what the Hub lists
        (the partial file is dropped), FetchError when the transfer fails (the
        partial file is kept for the next run).
        """
        url = hf_hub_url(snap.repo_id, f.path, revision=snap.commit, endpoint=self.endpoint)
        headers = self._headers()
        with self._errors("cannot fetch", snap.repo_id, snap.commit, f.path):
            meta = get_hf_file_metadata(
                url, token=self._auth, headers=dict(headers), endpoint=self.endpoint,
                timeout=self._etag_timeout, retry_on_errors=True,
            )
        if meta.commit_hash is None:
            raise FetchError(
                f"{snap.repo_id}/{f.path}: {self.endpoint} answered without X-Repo-Commit; "
                "it does not look like a Hugging Face Hub endpoint",
                path=f.path,
            )
        if meta.commit_hash != snap.commit:
            raise FetchError(
                f"{snap.repo_id}/{f.path}: the Hub served commit {meta.commit_hash} instead of {snap.commit}", path=f.path
            )
        if meta.size is not None and meta.size != f.size:
            raise IntegrityError(
                f"{snap.repo_id}/{f.path}: the Hub lists {f.size} bytes but serves {meta.size}", path=f.path
            )
        location = meta.location or url
        if _origin(location) != _origin(url):
            headers.pop("authorization", None)  # a CDN of another origin never sees the token
        for attempt in (1, 2):
            digest, sha1, resumed = self._fetch_into(location, headers, f, partial, on_bytes, snap)
            if matches_hub(f, digest, sha1):
                break
            _unlink(partial)
            if not resumed or attempt == 2:
                got = digest.sha256 if f.lfs else sha1
                kind = "sha256" if f.lfs else "git sha1"
                raise IntegrityError(
                    f"{snap.repo_id}/{f.path} @ {snap.commit[:12]}: downloaded bytes do not match the Hub's {kind} "
                    f"(expected {f.content_id}, got {got}, {digest.size} of {f.size} bytes)",
                    path=f.path,
                    hint="The Hub or something between it and you served other bytes; nothing was kept. "
                    "Try again later or from another network.",
                )
            # A partial file left by an earlier run did not add up: start this file over, once.
            on_bytes(-digest.size)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(partial, 0o644)
            os.replace(partial, dest)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(dest)) from None
        return digest

    def _fetch_into(
        self,
        url: str,
        headers: dict[str, str],
        f: HubFile,
        partial: Path,
        on_bytes: Callable[[int], None],
        snap: HubSnapshot,
    ) -> tuple[FileDigest, str | None, bool]:
        """Download (or finish downloading) ``partial``; return its digest and whether it resumed."""
        sha = hashlib.sha256()
        sha1 = None if f.lfs else hashlib.sha1(git_blob_sha1_header(f.size), usedforsecurity=False)
        hashers: list[Any] = [sha] if sha1 is None else [sha, sha1]
        try:
            partial.parent.mkdir(parents=True, exist_ok=True)
            have = partial.stat().st_size if partial.exists() else 0
            if have > f.size:
                _unlink(partial)
                have = 0
            if have:
                with open(partial, "rb", buffering=0) as fh:
                    while chunk := fh.read(CHUNK):
                        for h in hashers:
                            h.update(chunk)
                on_bytes(have)
            with open(partial, "ab") as out:
                sink = _HashingSink(out, hashers, on_bytes)
                try:
                    http_get(
                        url, cast(Any, sink), resume_size=have, headers=dict(headers), expected_size=f.size,
                        displayed_filename=f.path, tqdm_class=cast(Any, _Quiet),
                    )
                except OSError as e:
                    if isinstance(e, hf_errors.HfHubHTTPError) or e.errno is not None:
                        raise
                    # The client's own size check ("Consistency check failed"): judged below by size.
                except ValueError as e:  # e.g. a file larger than the client downloads over plain HTTP
                    raise FetchError(self._scrub(f"cannot fetch {snap.repo_id}/{f.path}: {e}"), path=f.path) from None
                out.flush()
                os.fsync(out.fileno())
                size = out.tell()
        except (hf_errors.HfHubHTTPError, httpx2.HTTPError) as e:
            mapped = self._translate(e, "cannot fetch", snap.repo_id, snap.commit, f.path)
            assert mapped is not None
            if isinstance(mapped, FetchError) and not isinstance(mapped, (GatedRepoError, RevisionNotFoundError)):
                kept = _size_of(partial)
                mapped = FetchError(f"{mapped.message}; {kept} of {f.size} bytes kept for the next run", path=f.path)
            raise mapped from None
        except OSError as e:
            raise oserror_to_airpack(e, "cannot write", str(partial)) from None
        if size < f.size:
            raise FetchError(
                f"cannot fetch {snap.repo_id}/{f.path}: transfer ended after {size} of {f.size} bytes "
                "(kept for the next run)",
                path=f.path,
            )
        if sink.valid and size == f.size:
            return FileDigest(size=size, sha256=sha.hexdigest()), (sha1.hexdigest() if sha1 is not None else None), have > 0
        try:
            digest, git1 = _hash_path(partial, f)
        except OSError as e:
            raise oserror_to_airpack(e, "cannot read", str(partial)) from None
        return digest, git1, have > 0


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    port = p.port or {"http": 80, "https": 443}.get(p.scheme)
    return (p.scheme, (p.hostname or "").lower(), port)


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
