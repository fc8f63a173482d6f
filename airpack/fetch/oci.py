"""The OCI transport: a bundle as one OCI artifact in a registry inside the gap.

An isolated cluster already runs an OCI registry (Harbor, the CNCF
distribution registry) that every GPU node can reach. The bundle crosses the
gap once, is verified at the entry host and pushed here as ONE image manifest
whose ``artifactType`` is airpack's own; each node pulls it back and verifies
it against its OWN trust policy. The registry is a transport, never a root of
trust: nothing this module reads is believed until ``airpack.ops.oci`` has
checked it against signatures and digests.

The artifact::

    manifest  artifactType application/vnd.airpack.bundle.v1
      config  the OCI empty descriptor ({})
      layers  envelope.dsse.json  (application/vnd.dsse.envelope.v1+json)
              manifest.json       (application/vnd.in-toto+json, the signed payload)
              every bundle file   (application/vnd.airpack.file.v1), digest = the
                                  sha256 already in the signed manifest
      each layer annotated org.opencontainers.image.title = its bundle path

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
import ipaddress
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urljoin

import oras.auth.token
import oras.auth.utils
import oras.utils
import requests
import urllib3.exceptions

from .._fs import check_relpath, open_regular_nofollow
from .._json import StrictJSONError, dumps_canonical, loads_strict
from ..errors import FetchError, IntegrityError, UsageError

ARTIFACT_TYPE = "application/vnd.airpack.bundle.v1"
ENVELOPE_MEDIA_TYPE = "application/vnd.dsse.envelope.v1+json"
MANIFEST_COPY_MEDIA_TYPE = "application/vnd.in-toto+json"
FILE_MEDIA_TYPE = "application/vnd.airpack.file.v1"
OCI_MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BYTES = b"{}"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
TITLE = "org.opencontainers.image.title"

MAX_OCI_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_LAYERS = 1_000_002
MAX_ERROR_BODY = 4096
CHUNK = 4 * 1024 * 1024  # one read of a blob stream: large enough for hashlib to drop the GIL

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_REPO_PART = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


# -- references --------------------------------------------------------------------------


@dataclass(frozen=True)
class OciRef:
    """``oci://HOST[:PORT]/REPOSITORY[:TAG][@sha256:DIGEST]``, checked against the distribution grammar."""

    host: str  # HOST or HOST:PORT, IPv6 in brackets
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What the manifest URL names: the digest when pinned (it cannot move), else the tag."""
        ref = self.digest or self.tag
        assert ref is not None
        return ref

    def __str__(self) -> str:
        out = f"oci://{self.host}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def is_oci_ref(text: object) -> bool:
    """True for ``oci://...`` (and ``oci:/...``, what pathlib makes of it when a CLI argument is a Path)."""
    return str(text).startswith("oci:/")


def parse_ref(text: object) -> OciRef:
    """Parse an OCI reference; a bad one is a usage error (exit 2)."""
    s = str(text)
    if s.startswith("oci://"):
        rest = s[len("oci://"):]
    elif s.startswith("oci:/"):  # pathlib collapsed the double slash
        rest = s[len("oci:/"):]
    else:
        raise UsageError(f"{s!r} is not an OCI reference; write oci://HOST[:PORT]/REPOSITORY:TAG")

    def bad(why: str) -> UsageError:
        return UsageError(f"invalid OCI reference {s!r}: {why}", hint="Write oci://HOST[:PORT]/REPOSITORY:TAG or oci://HOST[:PORT]/REPOSITORY@sha256:DIGEST.")

    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in rest) or "?" in rest or "#" in rest or "\\" in rest:
        raise bad("spaces, control characters, '?', '#' and '\\' are not allowed")
    host, sep, path = rest.partition("/")
    if not sep or not path:
        raise bad("no repository after the host")
    _check_host(host, bad)
    digest = None
    if "@" in path:
        path, _, digest = path.partition("@")
        if not _DIGEST.match(digest):
            raise bad("the digest must be sha256: and 64 lowercase hex digits")
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not _TAG.match(tag):
            raise bad(f"invalid tag {tag!r} (letters, digits, '_', '.', '-'; at most 128)")
    if len(path) > 255 or not all(_REPO_PART.match(p) for p in path.split("/")):
        raise bad(f"invalid repository {path!r} (lowercase letters, digits and '._-' separators, '/' between parts)")
    if tag is None and digest is None:
        raise bad("name a tag (REPOSITORY:TAG) or a digest (REPOSITORY@sha256:...)")
    return OciRef(host=host, repository=path, tag=tag, digest=digest)


def _check_host(host: str, bad: Callable[[str], UsageError]) -> None:
    name, port = host, None
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise bad("unclosed '[' in an IPv6 host")
        try:
            ipaddress.IPv6Address(host[1:end])
        except ValueError:
            raise bad(f"invalid IPv6 address {host[1:end]!r}") from None
        name, rest = host[: end + 1], host[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise bad(f"unexpected {rest!r} after the IPv6 host")
            port = rest[1:]
    else:
        if host.count(":") > 1:
            raise bad("write an IPv6 host in brackets, like [::1]:5000")
        name, _, port_s = host.partition(":")
        port = port_s if ":" in host else None
        if not _HOST.match(name):
            raise bad(f"invalid host {name!r}")
    if port is not None and (not port.isdigit() or not 0 < int(port) < 65536):
        raise bad(f"invalid port {port!r}")


# -- descriptors and the artifact manifest ---------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    """One OCI content descriptor: what a blob is, how big, and (for layers) which bundle path it holds."""

    media_type: str
    digest: str
    size: int
    title: str | None = None

    @property
    def sha256(self) -> str:
        return self.digest.split(":", 1)[1]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.title is not None:
            out["annotations"] = {TITLE: self.title}
        return out


EMPTY_CONFIG = Descriptor(media_type=EMPTY_MEDIA_TYPE, digest=EMPTY_DIGEST, size=len(EMPTY_BYTES))


def blob_descriptor(media_type: str, data: bytes, title: str) -> Descriptor:
    return Descriptor(media_type=media_type, digest="sha256:" + hashlib.sha256(data).hexdigest(), size=len(data), title=title)


def file_descriptor(path: str, sha256: str, size: int) -> Descriptor:
    """A bundle file's layer: the digest is the one the signed manifest already holds (no re-hashing)."""
    return Descriptor(media_type=FILE_MEDIA_TYPE, digest=f"sha256:{sha256}", size=size, title=path)


@dataclass(frozen=True)
class Artifact:
    """A parsed airpack OCI manifest. Structurally valid; nothing in it is trusted yet."""

    envelope: Descriptor
    manifest_copy: Descriptor
    files: tuple[Descriptor, ...]
    annotations: Mapping[str, str]
    raw: bytes = field(repr=False)
    digest: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(d.size for d in self.files)


def build_manifest(*, envelope: Descriptor, manifest_copy: Descriptor, files: Sequence[Descriptor],
                   annotations: Mapping[str, str]) -> bytes:
    """Deterministic bytes: the same bundle always gives the same OCI manifest digest."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": EMPTY_CONFIG.to_json(),
        "layers": [envelope.to_json(), manifest_copy.to_json(), *(f.to_json() for f in files)],
        "annotations": dict(annotations),
    }
    return dumps_canonical(doc)


def _descriptor(obj: object, where: str, i: int) -> Descriptor:
    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"OCI manifest {where}: layer {i} {why}", path=where)

    if not isinstance(obj, dict):
        raise bad("is not an object")
    mt, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(mt, str) or len(mt) > 255:
        raise bad("has no valid mediaType")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise bad(f"has digest {str(digest)[:80]!r}; only sha256 digests are accepted")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > 2**53:
        raise bad("has no valid size")
    ann = obj.get("annotations", {})
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise bad("has malformed annotations")
    title = ann.get(TITLE)
    if title is None:
        raise bad(f"has no {TITLE} annotation naming its bundle path")
    return Descriptor(media_type=mt, digest=digest, size=size, title=title)


def parse_artifact(data: bytes, *, where: str, digest: str) -> Artifact:
    """Check an OCI manifest is an airpack bundle with exactly one envelope, one manifest copy and safe paths."""
    try:
        doc = loads_strict(data, max_depth=8)
    except StrictJSONError as e:
        raise IntegrityError(f"OCI manifest {where} is malformed: {e}", path=where) from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise IntegrityError(f"OCI manifest {where} is not an OCI image manifest (schemaVersion 2)", path=where)
    if doc.get("artifactType") != ARTIFACT_TYPE:
        raise IntegrityError(
            f"{where} is not an airpack bundle (artifactType {str(doc.get('artifactType'))[:80]!r}, expected {ARTIFACT_TYPE})",
            path=where, hint="Push bundles with `airpack push`; pull other artifacts with their own tools.",
        )
    if doc.get("mediaType", OCI_MANIFEST_MEDIA_TYPE) != OCI_MANIFEST_MEDIA_TYPE:
        raise IntegrityError(f"OCI manifest {where} has media type {str(doc.get('mediaType'))[:80]!r}", path=where)
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise IntegrityError(f"OCI manifest {where} has no layers", path=where)
    if len(layers) > MAX_LAYERS:
        raise IntegrityError(f"OCI manifest {where} has more than {MAX_LAYERS} layers", path=where)
    ann = doc.get("annotations", {})
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise IntegrityError(f"OCI manifest {where} has malformed annotations", path=where)
    descs = [_descriptor(obj, where, i) for i, obj in enumerate(layers)]
    envelopes = [d for d in descs if d.media_type == ENVELOPE_MEDIA_TYPE]
    copies = [d for d in descs if d.media_type == MANIFEST_COPY_MEDIA_TYPE]
    files = [d for d in descs if d.media_type == FILE_MEDIA_TYPE]
    if len(envelopes) != 1:
        raise IntegrityError(f"OCI manifest {where} has {len(envelopes)} envelope layers; exactly one is required", path=where)
    if len(copies) != 1:
        raise IntegrityError(f"OCI manifest {where} has {len(copies)} manifest layers; exactly one is required", path=where)
    other = [d for d in descs if d.media_type not in (ENVELOPE_MEDIA_TYPE, MANIFEST_COPY_MEDIA_TYPE, FILE_MEDIA_TYPE)]
    if other:
        raise IntegrityError(f"OCI manifest {where} has a layer of unknown media type {other[0].media_type!r}", path=where)
    for d in files:
        check_relpath(d.title)
    return Artifact(envelope=envelopes[0], manifest_copy=copies[0], files=tuple(files), annotations=ann, raw=data, digest=digest)


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

    def download_blob(self, desc: Descriptor, fd: int, *, on_bytes: Callable[[int], None] | None = None) -> None:
        """Stream a blob into ``fd``, hashing as it comes; never accept a byte past the expected size."""
        shown = desc.title or desc.digest
        h = hashlib.sha256()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        got = 0
        with self._blob(desc) as resp:
            try:
                while True:
                    n = resp.raw.readinto(view)
                    if not n:
                        break
                    got += n
                    if got > desc.size:
                        raise IntegrityError(f"blob for {shown} is longer than the {desc.size} bytes the manifest says", path=shown)
                    chunk = view[:n]
                    h.update(chunk)
                    written = 0
                    while written < n:
                        written += os.write(fd, chunk[written:])
                    if on_bytes is not None:
                        on_bytes(n)
            except (urllib3.exceptions.HTTPError, requests.RequestException, ConnectionError, TimeoutError) as e:
                raise FetchError(f"connection to registry {self.ref.host} broke while fetching {shown}: {_short(e)}", path=shown,
                                 hint="Nothing was installed; run the command again once the registry is back.") from None
        if got != desc.size:
            raise IntegrityError(f"blob for {shown} is {got} bytes, the manifest says {desc.size}", path=shown)
        if h.hexdigest() != desc.sha256:
            raise IntegrityError(
                f"blob for {shown} from registry {self.ref.host} does not match its digest: expected sha256 {desc.sha256}, got {h.hexdigest()}",
                path=shown, hint="The registry's copy is damaged or was tampered with; push the bundle again from the entry host.",
            )


@contextmanager
def _closing(resp: requests.Response) -> Iterator[requests.Response]:
    try:
        yield resp
    finally:
        resp.close()
