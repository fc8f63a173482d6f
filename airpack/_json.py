"""Strict JSON for untrusted input, canonical JSON for what we sign.

Untrusted documents are refused when they repeat a key, nest too deep, or
(for signed manifests) hold floats or NaN; the caller picks the error class so
a bad envelope is a trust failure and a bad payload an integrity failure.
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


def dumps_canonical(obj: Any) -> bytes:
    """Deterministic, human-readable JSON: sorted keys, 2-space indent, UTF-8, no floats, final newline."""
    _reject_floats(obj)
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
