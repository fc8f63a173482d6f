"""Byte sizes: the one parser and the one formatter of the whole tool (pure: no I/O, no click).

Units, case-insensitive, with or without a space after the number:

- ``B`` and a bare number are bytes (``65536``);
- ``KB``, ``MB``, ``GB``, ``TB`` are decimal: powers of 1000 (``25GB`` = 25,000,000,000 bytes);
- ``KiB``, ``MiB``, ``GiB``, ``TiB`` are binary: powers of 1024 (``4GiB`` = 4,294,967,296 bytes);
- ``K``, ``M``, ``G``, ``T`` alone are refused: some tools read ``64M`` as 64,000,000 bytes and
  others as 64 MiB, so airpack asks for ``64MB`` or ``64MiB`` instead of guessing;
- a fraction is allowed and rounds down to whole bytes (``1.5GiB``);
- ``fat32`` is the largest file FAT32 stores (4 GiB - 1 byte), for media.

Minimums (a part of at least 4096 bytes, a push chunk of at least 1 MiB) belong to the
callers that need them, not here.
"""

from __future__ import annotations

import re

from .errors import UsageError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
}
# Media whose limit is not a round number: FAT32 refuses a file of exactly 4 GiB.
NAMED_SIZES: dict[str, int] = {"fat32": (1 << 32) - 1}
_AMBIGUOUS = {"k", "m", "g", "t", "ki", "mi", "gi", "ti"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_MAX_TEXT = 64


def parse_size(text: str, *, require_unit: bool = False) -> int:
    """Bytes of ``4GiB``, ``25GB``, ``700MB``, ``1MiB``, ``1.5GiB``, ``65536`` or ``fat32``; ``UsageError`` otherwise.

    With ``require_unit``, only a number with an explicit unit (``24GiB``, ``512B``) is a size:
    bare numbers and media names are refused.
    """
    s = text.strip()
    named = NAMED_SIZES.get(s.lower())
    if named is not None and not require_unit:
        return named
    m = _SIZE.match(s) if len(s) <= _MAX_TEXT else None
    unit_text = m.group(2).lower() if m else ""
    if m and unit_text in _AMBIGUOUS:
        n = m.group(1)
        raise UsageError(
            f"ambiguous size {text!r}: write {n}{unit_text[0].upper()}B (decimal, powers of 1000) or "
            f"{n}{unit_text[0].upper()}iB (binary, powers of 1024)"
        )
    if not m or (unit_text and unit_text not in UNITS) or (require_unit and not unit_text):
        raise UsageError(
            f"invalid size {text!r}: use a number with B, KB, MB, GB, TB (decimal) or KiB, MiB, GiB, TiB (binary)"
            + ("" if require_unit else ", a byte count, or 'fat32'")
        )
    unit = UNITS[unit_text] if unit_text else 1
    whole, _, frac = m.group(1).partition(".")
    value = int(whole) * unit
    if frac:
        value += (int(frac) * unit) // (10 ** len(frac))
    return value


def format_bytes(n: int) -> str:
    """``512 B``, ``1.50 KiB``, ``23.84 GiB``, ``2.00 TiB``: binary units, two decimals; negative sizes keep their sign."""
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024.0 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.2f} {unit}"
        v /= 1024.0
    raise AssertionError("unreachable")  # pragma: no cover
