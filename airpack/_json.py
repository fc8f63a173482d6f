"""Strict JSON for untrusted input, canonical JSON for what we sign, valid Unicode for what we print.

Untrusted documents are refused when they repeat a key, nest too deep, or
(for signed manifests) hold floats or NaN; the caller picks the error class so
a bad envelope is a trust failure and a bad payload an integrity failure.

A file name that is not UTF-8 (a folder named with byte 0xff) reaches Python as
a string with lone surrogates (``os.fsdecode``'s surrogateescape), which no
UTF-8 writer, JSON parser or SQLite accepts. ``printable`` is the one place
such a name becomes text: each undecodable byte is written as a backslash
escape, ``\\xff`` (four characters), and every valid character is left alone.
``--json`` output, the text a command prints and what the registry records all
pass through it (docs/index.md, "Names that are not UTF-8").
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32


class StrictJSONError(ValueError):
    """Why a document was refused; callers wrap it in the right airpack error."""


def _no_floats(s: str) -> Any:
    raise StrictJSONError(f"floating-point number {s!r} is not allowed")


def _no_constants(s: str) -> Any:
    raise StrictJSONError(f"non-standard constant {s!r} is not allowed")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise StrictJSONError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _depth_ok(obj: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            if d > limit:
                return False
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            if d > limit:
                return False
            stack.extend((v, d + 1) for v in o)
    return True


def loads_strict(data: bytes, *, allow_floats: bool = False, max_depth: int = MAX_DEPTH) -> Any:
    """Parse UTF-8 JSON, refusing duplicate keys, deep nesting, NaN and (by default) floats."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StrictJSONError(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_float=None if allow_floats else _no_floats,
            parse_constant=_no_constants,
        )
    except StrictJSONError:
        raise
    except RecursionError:
        raise StrictJSONError(f"nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as e:
        raise StrictJSONError(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not _depth_ok(obj, max_depth):
        raise StrictJSONError(f"nested deeper than {max_depth} levels")
    return obj


def _reject_floats(obj: Any) -> None:
    if isinstance(obj, float):
        raise TypeError("floats are not allowed in canonical JSON; use integers or strings")
    if isinstance(obj, dict):
        for v in obj.values():
            _reject_floats(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _reject_floats(v)


def printable(text: str) -> str:
    """``text`` with each undecodable byte (a lone surrogate from surrogateescape) as ``\\xNN``; valid text unchanged.

    A surrogate that did not come from surrogateescape (``\\ud800``, from a JSON escape) is
    escaped as ``\\ud800``. The result always encodes as UTF-8.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape" if _only_escaped(text) else "backslashreplace").decode(
            "utf-8", "backslashreplace")
    return text


def _only_escaped(text: str) -> bool:
    """True when every surrogate in ``text`` stands for one byte (U+DC80..U+DCFF), as surrogateescape writes them."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def scrub(obj: Any) -> Any:
    """A JSON-ready value with every string (keys too) passed through ``printable``; other values as they are."""
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, dict):
        return {printable(k) if isinstance(k, str) else k: scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    return obj


def dumps_output(doc: Any) -> str:
    """The one ``--json`` document a command prints: sorted keys, 2-space indent, never invalid Unicode."""
    return json.dumps(scrub(doc), indent=2, sort_keys=True)


def dumps_canonical(obj: Any) -> bytes:
    """Deterministic, human-readable JSON: sorted keys, 2-space indent, UTF-8, no floats, final newline."""
    _reject_floats(obj)
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
