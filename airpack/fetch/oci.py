"""The OCI transport: a bundle as one OCI artifact in a registry inside the gap.

An isolated cluster already runs an OCI registry (Harbor, the CNCF
distribution registry) that every GPU node can reach. The bundle crosses the
gap once, is verified at the entry host and pushed here as ONE image manifest
whose ``artifactType`` is airpack's own; each node pulls it back and verifies
it against its OWN trust policy. The registry is a transport, never a root of
trust: nothing this module reads is believed until ``airpack.ops.oci`` has
checked it against signatures and digests.

The artifact's format (media types, descriptors, the image manifest) is
``airpack.oci_artifact`` and references are ``airpack.oci_ref``, both pure; this
module is the client that moves them.

oras-py answers the registry's authentication: Basic credentials, or the
Bearer-token dance (anonymous or with credentials) that Harbor and token-
authenticated distribution registries ask for. The rest of the distribution
protocol is a handful of requests made here on the same ``requests`` session,
because oras' own client does not fit an air-gapped cluster: its monolithic
upload reads the whole file into memory (we stream it from the file), its
requests retry for minutes with sleeps (we fail fast with a named error), it
never caps or hashes what it downloads (we cap every document and check each
blob's size and digest while it streams), and importing ``oras.provider``
pulls in jsonschema's format checkers, seconds of start-up on every command.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urljoin

import oras.auth.token
import oras.auth.utils
import oras.utils
import requests
import urllib3.exceptions

from .._fs import open_regular_nofollow
from .._json import StrictJSONError, loads_strict
from ..errors import FetchError, IntegrityError, UsageError

# The artifact format and references are pure modules (airpack.oci_artifact, airpack.oci_ref); this is the transport.
from ..oci_artifact import MAX_OCI_MANIFEST_BYTES, OCI_MANIFEST_MEDIA_TYPE, Descriptor
from ..oci_ref import OciRef

MAX_ERROR_BODY = 4096
CHUNK = 4 * 1024 * 1024  # one read of a blob stream: large enough for hashlib to drop the GIL


# -- the client ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class OciAccess:
    """How to reach the registry: scheme, credentials, CA bundle. Never where trust comes from."""

    plain_http: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    connect_timeout: float = 30.0
    read_timeout: float = 300.0

    def __post_init__(self) -> None:
        if (self.username is None) != (self.password is None):
            raise UsageError("give both --username and --password-file, or neither")
        if self.ca_file is not None and self.plain_http:
            raise UsageError("--ca-file and --plain-http contradict each other: plain HTTP has no TLS to check")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise UsageError(f"CA bundle {self.ca_file} not found", path=str(self.ca_file))


class _Session:
    """A requests session that fails fast, streams, and answers Basic or Bearer challenges (via oras)."""

    def __init__(self, ref: OciRef, access: OciAccess) -> None:
        self._ref = ref
        self._access = access
        self.prefix = "http" if access.plain_http else "https"
        self._tls_verify: bool | str = str(access.ca_file) if access.ca_file is not None else True
        self._timeout = (access.connect_timeout, access.read_timeout)
        self.session = requests.Session()
        self.session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # registries may set cookies; never send them
        self.session.verify = self._tls_verify  # also for the token requests oras makes on this session
        self.auth = oras.auth.token.TokenAuth()
        self.auth.session, self.auth.prefix, self.auth._tls_verify = self.session, self.prefix, self._tls_verify
        self._scheme: str | None = None  # "basic" or "bearer" once the registry has challenged us
        self._scopes: dict[str, set[str]] = {}  # every token scope asked for so far: "repository:NAME" -> actions
        self._token_scopes: dict[str, set[str]] = {}  # what the current token was granted for
        self._lock = threading.Lock()
        if access.username is not None and access.password is not None:
            self.auth.set_basic_auth(access.username, access.password)

    def _auth_header(self) -> str | None:
        if self._scheme == "basic":
            return f"Basic {self.auth._basic_auth}"
        if self._scheme == "bearer" and self.auth.token:
            return f"Bearer {self.auth.token}"
        return None

    def _negotiate(self, resp: requests.Response, used: str | None) -> bool:
        """Answer a 401 once: Basic with the given credentials, or a Bearer token from the realm.

        Tokens are scoped (pull, or pull and push) and shared by the upload threads, so a
        new token asks for every scope seen so far, and a thread whose token another
        thread already replaced with a covering one simply retries with it.
        """
        challenge = resp.headers.get("WWW-Authenticate", "")
        kind = challenge.split(" ", 1)[0].lower()
        has_creds = self._access.username is not None
        with self._lock:
            if kind == "basic":
                if not has_creds or self._scheme == "basic":
                    return False
                self._scheme = "basic"
                return True
            if kind != "bearer":
                return False
            h = oras.auth.utils.parse_auth_header(challenge)
            wanted = _parse_scopes(getattr(h, "scope", None))
            if self.auth.token and self.auth.token != used and _covers(self._token_scopes, wanted):
                return True  # another thread got a token for this already
            for res, actions in wanted.items():
                self._scopes.setdefault(res, set()).update(actions)
            h.scope = _format_scopes(self._scopes) or None
            self.auth.token = None
            try:
                token = self.auth.request_token(h) if has_creds else self.auth.request_anonymous_token(h)
            except requests.RequestException as e:
                raise FetchError(f"cannot get a token for {self._ref.host}: {e}", path=str(self._ref)) from None
            except Exception as e:  # noqa: BLE001 - oras raises bare errors on odd challenges
                raise FetchError(f"cannot answer the registry's token challenge {challenge[:120]!r}: {e}", path=str(self._ref)) from None
            if not token:
                return False
            self.auth.token = token
            self._token_scopes = {res: set(a) for res, a in self._scopes.items()}
            self._scheme = "bearer"
            return True

    def _send(self, method: str, url: str, data: Any, headers: dict[str, str], json: Any, stream: bool) -> requests.Response:
        try:
            resp: requests.Response = self.session.request(method, url, data=data, json=json, headers=headers, stream=stream,
                                                           verify=self._tls_verify, timeout=self._timeout)
            return resp
        except requests.exceptions.SSLError as e:
            raise FetchError(
                f"TLS with {self._ref.host} failed: {_short(e)}", path=str(self._ref),
                hint="Pass the registry's CA bundle with --ca-file (internal registries use internal CAs), "
                     "or --plain-http for a plain HTTP registry.",
            ) from None
        except requests.exceptions.Timeout:
            raise FetchError(f"registry {self._ref.host} did not answer in time ({method} {_path(url)})", path=str(self._ref)) from None
        except requests.exceptions.ConnectionError as e:
            raise FetchError(
                f"cannot reach registry {self._ref.host}: {_short(e)}", path=str(self._ref),
                hint="Check the host and port, that the registry runs, and --plain-http for a plain HTTP registry.",
            ) from None
        except requests.RequestException as e:
            raise FetchError(f"request to registry {self._ref.host} failed: {_short(e)}", path=str(self._ref)) from None

    def do_request(self, url: str, method: str = "GET", data: Any = None, headers: dict[str, str] | None = None,
                   json: Any = None, stream: bool = False) -> requests.Response:
        """One request, one auth retry, no sleeping retries: a cluster script wants a named error now."""
        hdrs = dict(headers or {})
        used = self.auth.token
        auth = self._auth_header()
        if auth:
            hdrs["Authorization"] = auth
        resp = self._send(method, url, data, hdrs, json, stream)
        if resp.status_code == 401 and self._negotiate(resp, used if auth else None):
            resp.close()
            if hasattr(data, "seek"):
                data.seek(0)
            auth = self._auth_header()
            if auth:
                hdrs["Authorization"] = auth
            resp = self._send(method, url, data, hdrs, json, stream)
        if resp.status_code == 401:
            resp.close()
            who = "refused the credentials" if self._access.username else "asks for credentials"
            raise FetchError(f"registry {self._ref.host} {who} ({method} {_path(url)})", path=str(self._ref),
                             hint="Pass --username and --password-file with an account that may read (and, to push, write) this repository.")
        if resp.status_code == 403:
            resp.close()
            raise FetchError(f"registry {self._ref.host} denied {method} {_path(url)}", path=str(self._ref),
                             hint="The account lacks permission on this repository.")
        return resp


def _parse_scopes(scope: object) -> dict[str, set[str]]:
    """``repository:acme/tiny:pull,push`` (space-separated for several) as {"repository:acme/tiny": {"pull", "push"}}."""
    out: dict[str, set[str]] = {}
    for one in (scope if isinstance(scope, str) else "").split():
        resource, _, actions = one.rpartition(":")
        if resource:
            out.setdefault(resource, set()).update(a for a in actions.split(",") if a)
    return out


def _format_scopes(scopes: dict[str, set[str]]) -> str:
    return " ".join(f"{res}:{','.join(sorted(actions))}" for res, actions in sorted(scopes.items()))


def _covers(have: dict[str, set[str]], wanted: dict[str, set[str]]) -> bool:
    return bool(wanted) and all(actions <= have.get(res, set()) for res, actions in wanted.items())


def _short(e: BaseException) -> str:
    text = str(e)
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)|(Connection refused|Connection reset by peer|certificate verify failed[^'\")]*)", text)
    if m:
        return (m.group(1) or m.group(2)).strip()
    return text[:200]


def _path(url: str) -> str:
    return "/" + url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]


def _registry_error(resp: requests.Response) -> str:
    """The registry's own words about a refusal, capped."""
    try:
        body = resp.raw.read(MAX_ERROR_BODY, decode_content=True) if resp.raw is not None else b""
    except Exception:  # noqa: BLE001 - the error text is a courtesy
        body = b""
    try:
        doc = loads_strict(body, allow_floats=True)
        errs = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errs, list) and errs and isinstance(errs[0], dict):
            return f"{errs[0].get('code', '')}: {errs[0].get('message', '')}"[:300]
    except (StrictJSONError, AttributeError):
        pass
    return f"HTTP {resp.status_code} {resp.reason}"


class _CountingReader:
    """A file body for a streamed PUT: reads at most ``size`` bytes, reports progress, can rewind for an auth retry."""

    def __init__(self, f: BinaryIO, size: int, on_bytes: Callable[[int], None] | None) -> None:
        self._f = f
        self._size = size
        self._sent = 0
        self._on_bytes = on_bytes

    def __len__(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        want = self._size - self._sent
        if n is not None and n >= 0:
            want = min(want, max(n, 1 << 20))
        data = self._f.read(want) if want > 0 else b""
        self._sent += len(data)
        if data and self._on_bytes is not None:
            self._on_bytes(len(data))
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self._f.seek(pos, whence)
        self._sent = self._f.tell()
        return self._sent


class OciClient:
    """What airpack asks of a registry: HEAD, upload and download blobs, put and get the manifest."""

    def __init__(self, ref: OciRef, access: OciAccess) -> None:
        self.ref = ref
        self.access = access
        self._s = _Session(ref, access)
        self._base = f"{self._s.prefix}://{ref.host}/v2/"
        self._repo = f"{self._base}{ref.repository}"

    def close(self) -> None:
        self._s.session.close()

    def __enter__(self) -> OciClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _blob_url(self, digest: str) -> str:
        return f"{self._repo}/blobs/{digest}"

    def _manifest_url(self, reference: str) -> str:
        return f"{self._repo}/manifests/{reference}"

    def _location(self, resp: requests.Response, url: str) -> str:
        """Where the upload goes on: the Location header, made absolute against the request's URL."""
        location = resp.headers.get("Location", "")
        resp.close()
        if not location:
            raise FetchError(f"registry {self.ref.host} answered an upload step without a Location", path=str(self.ref))
        return urljoin(url, location)

    # -- push side --

    def ping(self) -> None:
        """GET /v2/: reach the registry and settle authentication before sending any body."""
        resp = self._s.do_request(self._base, "GET")
        resp.close()
        if resp.status_code != 200:
            raise FetchError(f"{self.ref.host} does not speak the OCI distribution API (GET /v2/ answered {resp.status_code})", path=str(self.ref))

    def blob_exists(self, desc: Descriptor) -> bool:
        """HEAD the blob in this repository: a blob the registry already holds is never sent again."""
        resp = self._s.do_request(self._blob_url(desc.digest), "HEAD")
        resp.close()
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise FetchError(f"registry {self.ref.host} answered HEAD {desc.digest[:19]}… with HTTP {resp.status_code}", path=str(self.ref))

    def _start_upload(self) -> str:
        url = f"{self._repo}/blobs/uploads/"
        resp = self._s.do_request(url, "POST", headers={"Content-Length": "0"})
        if resp.status_code != 202:
            raise FetchError(f"registry {self.ref.host} refused to start an upload: {_registry_error(resp)}", path=str(self.ref))
        return self._location(resp, url)

    def _finish(self, resp: requests.Response, desc: Descriptor, what: str) -> None:
        if resp.status_code == 201:
            resp.close()
            return
        msg = _registry_error(resp)
        resp.close()
        if "DIGEST_INVALID" in msg or "SIZE_INVALID" in msg:
            raise IntegrityError(
                f"registry {self.ref.host} refused {what}: its bytes do not match sha256 {desc.sha256} from the signed manifest ({msg})",
                path=desc.title, hint="The file changed after verify; verify the bundle again before pushing.",
            )
        raise FetchError(f"registry {self.ref.host} refused {what}: {msg}", path=desc.title)

    def upload_bytes(self, data: bytes, desc: Descriptor) -> None:
        """A small blob (envelope, manifest copy, config) in one POST + PUT."""
        location = self._start_upload()
        url = oras.utils.append_url_params(location, {"digest": desc.digest})
        resp = self._s.do_request(url, "PUT", data=data, headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
        self._finish(resp, desc, desc.title or desc.digest)

    def upload_file(self, path: Path, desc: Descriptor, *, chunk_size: int | None = None,
                    on_bytes: Callable[[int], None] | None = None) -> None:
        """Stream a bundle file into the registry under the digest the signed manifest gives it.

        Monolithic by default: one PUT whose body is read from the file as it is
        sent. With ``chunk_size``, a chunked upload (one PATCH per chunk, for
        proxies that cap request bodies); memory is bounded by one chunk. The
        registry recomputes the digest, so a file changed since verify is refused.
        """
        shown = desc.title or str(path)
        location = self._start_upload()
        fd = open_regular_nofollow(path, display=shown)  # refuse a link swapped in since verify
        with os.fdopen(fd, "rb", buffering=0) as f:
            if chunk_size:
                location = self._patch_chunks(location, f, desc, chunk_size, on_bytes)
                url = oras.utils.append_url_params(location, {"digest": desc.digest})
                resp = self._s.do_request(url, "PUT", headers={"Content-Length": "0"})
            else:
                url = oras.utils.append_url_params(location, {"digest": desc.digest})
                body = _CountingReader(f, desc.size, on_bytes)
                resp = self._s.do_request(url, "PUT", data=body,
                                          headers={"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)})
        self._finish(resp, desc, shown)

    def _patch_chunks(self, location: str, f: BinaryIO, desc: Descriptor, chunk_size: int,
                      on_bytes: Callable[[int], None] | None) -> str:
        shown = desc.title or desc.digest
        start = 0
        while start < desc.size:
            chunk = f.read(min(chunk_size, desc.size - start))
            if not chunk:
                raise IntegrityError(f"{shown} shrank after verify; verify the bundle again before pushing", path=shown)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(chunk)),
                       "Content-Range": f"{start}-{start + len(chunk) - 1}"}
            resp = self._s.do_request(location, "PATCH", data=chunk, headers=headers)
            if resp.status_code != 202:
                raise FetchError(f"registry {self.ref.host} refused a chunk of {shown}: {_registry_error(resp)}", path=shown)
            location = self._location(resp, location)
            start += len(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
        return location

    def put_manifest(self, data: bytes) -> str:
        """PUT the artifact manifest under the tag; returns its digest (pin nodes to it with @sha256:...)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert self.ref.tag is not None
        resp = self._s.do_request(self._manifest_url(self.ref.tag), "PUT", data=data,
                                  headers={"Content-Type": OCI_MANIFEST_MEDIA_TYPE})
        if resp.status_code != 201:
            msg = _registry_error(resp)
            resp.close()
            raise FetchError(f"registry {self.ref.host} refused the manifest for {self.ref}: {msg}", path=str(self.ref))
        said = resp.headers.get("Docker-Content-Digest")
        resp.close()
        if said and said != digest:
            raise FetchError(f"registry {self.ref.host} stored the manifest under {said}, not {digest}", path=str(self.ref))
        return digest

    # -- pull side --

    def get_manifest(self) -> tuple[bytes, str]:
        """The artifact manifest's bytes (capped) and digest; a pinned digest must match."""
        resp = self._s.do_request(self._manifest_url(self.ref.reference), "GET", stream=True,
                                  headers={"Accept": OCI_MANIFEST_MEDIA_TYPE})
        with _closing(resp):
            if resp.status_code == 404:
                raise FetchError(f"{self.ref} not found in the registry", path=str(self.ref),
                                 hint="Check the repository and tag; `airpack push` prints the digest to pin.")
            if resp.status_code != 200:
                raise FetchError(f"registry {self.ref.host} refused the manifest of {self.ref}: {_registry_error(resp)}", path=str(self.ref))
            data = self._read_capped(resp, MAX_OCI_MANIFEST_BYTES, f"OCI manifest of {self.ref}")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self.ref.digest and digest != self.ref.digest:
            raise IntegrityError(f"registry {self.ref.host} served a manifest with digest {digest}, not the pinned {self.ref.digest}",
                                 path=str(self.ref))
        return data, digest

    @contextmanager
    def _blob(self, desc: Descriptor) -> Iterator[requests.Response]:
        resp = self._s.do_request(self._blob_url(desc.digest), "GET", stream=True,
                                  headers={"Accept-Encoding": "identity"})
        with _closing(resp):
            shown = desc.title or desc.digest
            if resp.status_code == 404:
                raise FetchError(f"registry {self.ref.host} has no blob {desc.digest} for {shown}", path=shown,
                                 hint="The artifact is incomplete in the registry; push the bundle again from the entry host.")
            if resp.status_code != 200:
                raise FetchError(f"registry {self.ref.host} refused blob {desc.digest[:19]}… ({shown}): {_registry_error(resp)}", path=shown)
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) != desc.size:
                raise IntegrityError(f"blob for {shown} is {length} bytes in the registry, the manifest says {desc.size}", path=shown)
            yield resp

    def _read_capped(self, resp: requests.Response, cap: int, what: str) -> bytes:
        out = bytearray()
        try:
            while True:
                chunk = resp.raw.read(min(CHUNK, cap + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
                if len(out) > cap:
                    raise IntegrityError(f"{what} is larger than the {cap}-byte limit", path=str(self.ref))
        except (urllib3.exceptions.HTTPError, OSError, requests.RequestException) as e:
            raise FetchError(f"connection to registry {self.ref.host} broke while reading {what}: {_short(e)}", path=str(self.ref)) from None
        return bytes(out)

    def get_blob_bytes(self, desc: Descriptor, cap: int) -> bytes:
        """A small blob (envelope, manifest copy) into memory, size-capped and digest-checked."""
        shown = desc.title or desc.digest
        if desc.size > cap:
            raise IntegrityError(f"{shown} is {desc.size} bytes, over the {cap}-byte limit", path=shown)
        with self._blob(desc) as resp:
            data = self._read_capped(resp, desc.size, shown)
        if len(data) != desc.size or hashlib.sha256(data).hexdigest() != desc.sha256:
            raise IntegrityError(f"{shown} from the registry does not match its digest {desc.digest}", path=shown)
        return data

    @contextmanager
    def open_blob(self, desc: Descriptor) -> Iterator[BlobReader]:
        """A blob's body as a stream (``readinto``); the caller hashes it. Never a byte past the expected size."""
        with self._blob(desc) as resp:
            yield BlobReader(resp, desc, self.ref.host)


class BlobReader:
    """The body of one blob response: transport failures become ``FetchError``, a longer body ``IntegrityError``."""

    def __init__(self, resp: requests.Response, desc: Descriptor, host: str) -> None:
        self._resp = resp
        self._desc = desc
        self._host = host
        self._got = 0

    def readinto(self, view: memoryview) -> int:
        shown = self._desc.title or self._desc.digest
        try:
            n: int = self._resp.raw.readinto(view)
        except (urllib3.exceptions.HTTPError, requests.RequestException, ConnectionError, TimeoutError) as e:
            raise FetchError(f"connection to registry {self._host} broke while fetching {shown}: {_short(e)}", path=shown,
                             hint="Nothing was installed; run the command again once the registry is back.") from None
        self._got += n
        if self._got > self._desc.size:
            raise IntegrityError(f"blob for {shown} is longer than the {self._desc.size} bytes the manifest says", path=shown)
        return n


@contextmanager
def _closing(resp: requests.Response) -> Iterator[requests.Response]:
    try:
        yield resp
    finally:
        resp.close()
