"""OCI references: ``oci://HOST[:PORT]/REPOSITORY[:TAG][@sha256:DIGEST]`` (pure: no network imports).

The command line tells a registry reference from a path with ``is_oci_ref`` and
parses it with ``parse_ref`` without loading the OCI transport
(``airpack.fetch.oci``), so offline commands never import requests or oras.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UsageError

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_REPO_PART = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


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
        if not DIGEST.match(digest):
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
