"""Showing URLs without their secrets (pure: no I/O, no network imports).

A package index URL may carry ``user:password@``, a Hub or CDN URL a token or a
signature in its query. ``redact_url`` removes both from every URL in a text
before it reaches a message, a log line or a JSON error.
"""

from __future__ import annotations

import re

REDACTED = "***"

# user:password@ (or a bare token@) right after the scheme.
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
# A query parameter whose name says it may hold a secret: token, access_token, api_key, password,
# sig, X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, X-Goog-Signature, ... (showing
# "***" for a harmless one costs nothing; showing a live token would).
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&;][A-Za-z0-9_.-]*(?:token|auth|key|secret|pass|pwd|sig|credential|session|jwt|code)[A-Za-z0-9_.-]*=)"
    r"(?P<value>[^&;#\s'\"]*)",
    re.IGNORECASE,
)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _redact_one(url: str) -> str:
    url = _USERINFO.sub(REDACTED + "@", url, count=1)
    if "?" in url:
        head, sep, query = url.partition("?")
        url = head + sep + _SECRET_PARAM.sub(lambda m: m.group("key") + REDACTED, "?" + query)[1:]
    return url


def redact_url(text: str) -> str:
    """``text`` with every URL's userinfo and secret-looking query values replaced by ``***``."""
    return _URL.sub(lambda m: _redact_one(m.group(0)), text)
