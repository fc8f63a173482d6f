"""The Hugging Face Hub, through huggingface_hub (the only module that imports it).

The revision is resolved to a commit once and every listing and download
names that commit, so a branch that moves mid-pack changes nothing. The
client checks sizes only; airpack hashes every byte itself: SHA-256 against
the LFS oid for LFS files, the git blob SHA-1 for the others.

Only public names of huggingface_hub are used (``HfApi``,
``get_hf_file_metadata``, ``hf_hub_url``, ``hf_hub_download``, ``errors``,
``constants``; all present since 2.0, which setup.cfg declares). The bytes
themselves move through ``segments.py`` (ranged, parallel, resumable, every
byte hashed once in order); this module gives it each file's location from a
fresh HEAD (``head``, ``location``, ``locator``), decides the transport
(``choose_transport``: Xet through huggingface_hub when hf_xet is there and
the Hub says the file is Xet-backed, ranged HTTP otherwise), and words the
errors. Downloads land in a partial file named after the content id the Hub
lists, so a resumed pack never mixes bytes of two different files. The token
is sent to the Hub only (never to a CDN of another origin) and is scrubbed
from every message.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub import __version__ as hf_version
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

from .. import __version__
from .._fs import check_relpath, oserror_to_airpack
from .._urls import redact_url
from ..errors import (
    AirpackError,
    FetchError,
    GatedRepoError,
    IntegrityError,
    RevisionNotFoundError,
    UnsafePathError,
    UsageError,
)
from ..hashing import FileDigest, stream_and_hash
from .segments import Location, git_blob_sha1_header

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


def _hash_path(path: Path, f: HubFile, *, on_bytes: Callable[[int], None] | None = None) -> tuple[FileDigest, str | None]:
    """(size + SHA-256, git blob SHA-1 when the file is a plain git file) of a file on disk."""
    sha1 = None if f.lfs else hashlib.sha1(git_blob_sha1_header(f.size), usedforsecurity=False)
    with open(path, "rb", buffering=0) as fh:  # the project's one hashing loop; the git SHA-1 rides on its write hook
        digest = stream_and_hash(fh.readinto, write=sha1.update if sha1 is not None else None, on_bytes=on_bytes)
    return digest, (sha1.hexdigest() if sha1 is not None else None)


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
    if not stat.S_ISREG(st.st_mode) or st.st_size != f.size:  # lstat: a symlink is not S_ISREG
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

    def require_access(self, snap: HubSnapshot) -> None:
        """Refuse a gated repo before any file is asked for when there is no token: pack and fit word it alike."""
        if snap.gated and not self.has_token:
            raise GatedRepoError(f"{snap.repo_id} is gated: pass a token (HF_TOKEN or --token-file) from an account "
                                 "that accepted its licence")

    def scrub(self, text: str) -> str:
        """``text`` without the token, URL credentials or a signed URL's query: for a message another module words."""
        return self._scrub(text)

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

    def head(self, snap: HubSnapshot, f: HubFile) -> HeadInfo:
        """A fresh HEAD against the Hub for one file: where its bytes are now (a signed CDN URL), its size, Xet."""
        url = hf_hub_url(snap.repo_id, f.path, revision=snap.commit, endpoint=self.endpoint)
        with self._errors("cannot fetch", snap.repo_id, snap.commit, f.path):
            meta = get_hf_file_metadata(
                url, token=self._auth, headers={"user-agent": self._headers()["user-agent"]}, endpoint=self.endpoint,
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
        return HeadInfo(location=location, size=meta.size, xet=meta.xet_file_data is not None)

    def location(self, head: HeadInfo) -> Location:
        """The GET for a HEAD's location: the token goes only to the Hub's own origin, never to a CDN."""
        headers = self._headers()
        same = _origin(head.location) == _origin(self.endpoint)
        if not same:
            headers.pop("authorization", None)
        return Location(url=head.location, headers=headers, hub_origin=same)

    def locator(self, snap: HubSnapshot, f: HubFile) -> Callable[[], Location]:
        return lambda: self.location(self.head(snap, f))

    def fail(self, snap: HubSnapshot, path: str, size: int, cause: str, kept: int) -> FetchError:
        """The one-line error that stops the pack for one file: repo, file, cause, and what the next run resumes."""
        keep = (f"{kept} of {size} bytes are kept for the next run, which resumes from them" if kept
                else "run pack again to retry it")
        return FetchError(self._scrub(f"cannot fetch {snap.repo_id}/{path} @ {snap.commit[:12]}: {cause}; {keep}"),
                          path=path)

    def fetch_xet(self, snap: HubSnapshot, f: HubFile, dest: Path, work: Path,
                  on_bytes: Callable[[int], None]) -> FileDigest:
        """Fetch a Xet-backed file through huggingface_hub's own Xet path into ``work``, then hash it from disk.

        hf_xet writes the file; airpack trusts none of it until the bytes on
        disk hash to the Hub's SHA-256 (exit 3 otherwise, nothing kept).
        """
        folder = work / f"xet-{f.content_id}"
        try:
            got = self._xet_download(snap, f, folder)
            try:
                digest, sha1 = _hash_path(got, f, on_bytes=on_bytes)
            except OSError as e:
                raise oserror_to_airpack(e, "cannot read", str(got)) from None
            if not matches_hub(f, digest, sha1):
                raise IntegrityError(
                    f"{snap.repo_id}/{f.path} @ {snap.commit[:12]}: the bytes hf_xet wrote do not match the Hub's sha256 "
                    f"(expected {f.content_id}, got {digest.sha256 if f.lfs else sha1}, {digest.size} of {f.size} bytes); "
                    "nothing was kept",
                    path=f.path,
                )
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(got, 0o644)
                os.replace(got, dest)
            except OSError as e:
                raise oserror_to_airpack(e, "cannot write", str(dest)) from None
            return digest
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _xet_download(self, snap: HubSnapshot, f: HubFile, folder: Path) -> Path:
        """huggingface_hub's own download (hf_xet for a Xet-backed file) into ``folder``; any failure is exit 7."""
        try:
            with self._errors("cannot fetch", snap.repo_id, snap.commit, f.path):
                return Path(hf_hub_download(
                    snap.repo_id, f.path, revision=snap.commit, local_dir=folder, token=self._auth,
                    endpoint=self.endpoint, etag_timeout=self._etag_timeout, tqdm_class=cast(Any, _Quiet),
                    headers={"user-agent": self._headers()["user-agent"]},
                ))
        except AirpackError:
            raise
        except OSError as e:
            if e.errno is not None:
                raise oserror_to_airpack(e, "cannot write", str(folder)) from None
            raise FetchError(self._scrub(f"cannot fetch {snap.repo_id}/{f.path} through Xet: {e}"), path=f.path) from None
        except Exception as e:  # noqa: BLE001 -- hf_xet's own errors (a Rust panic surfaces as any class): named, exit 7
            raise FetchError(self._scrub(f"cannot fetch {snap.repo_id}/{f.path} through Xet: {type(e).__name__}: {e}"),
                             path=f.path) from None


def xet_available() -> bool:
    """Whether huggingface_hub can fetch Xet-backed files here (hf_xet installed, HF_HUB_DISABLE_XET unset)."""
    return importlib.util.find_spec("hf_xet") is not None and not hf_constants.HF_HUB_DISABLE_XET


@dataclass(frozen=True)
class HeadInfo:
    """What a HEAD against the Hub says about one file."""

    location: str  # where the bytes are (the CDN's signed URL for LFS files)
    size: int | None
    xet: bool


@dataclass(frozen=True)
class Refusal:
    """No transport can fetch the file: refused at planning (and in --dry-run), with the reason."""

    reason: str


Transport = Literal["http", "xet"]


def choose_transport(f: HubFile, head: HeadInfo, xet_ok: bool) -> Transport | Refusal:
    """How to fetch one file; pure, so the rule is tested on its own.

    Xet-backed (the HEAD carries Xet data) and hf_xet usable: huggingface_hub's
    Xet path. Otherwise ranged HTTP (no size limit). A file the Hub announces
    no size for, that is not fetchable through Xet, is refused: its bytes could
    not be split into ranges nor checked against the size while they arrive.
    """
    if head.xet and xet_ok:
        return "xet"
    if head.size is None and f.size > 0:
        if head.xet:
            return Refusal("it is stored in Xet only (the Hub announces no HTTP size) and hf_xet is not installed "
                           "(pip install hf_xet) or HF_HUB_DISABLE_XET is set")
        return Refusal("the Hub announces no size for it, so its transfer cannot be checked or split")
    return "http"


class _Quiet:
    """A stand-in for tqdm handed to huggingface_hub: airpack reports progress itself."""

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

def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    port = p.port or {"http": 80, "https": 443}.get(p.scheme)
    return (p.scheme, (p.hostname or "").lower(), port)
