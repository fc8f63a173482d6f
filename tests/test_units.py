"""One meaning per name: the size parser, the byte formatter and the URL redaction every module shares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import KeyPair, run_cli
from hypothesis import given
from hypothesis import strategies as st

from airpack._urls import redact_url
from airpack.errors import UsageError
from airpack.gpus import parse_gpu, size_or_none
from airpack.units import GiB, KiB, MiB, TiB, format_bytes, parse_size

# -- parse_size -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0), ("65536", 65536), ("512B", 512), ("512 b", 512),
        ("1KB", 1000), ("1kb", 1000), ("64MB", 64_000_000), ("25GB", 25 * 10**9), ("2TB", 2 * 10**12),
        ("1KiB", KiB), ("64MiB", 64 * MiB), ("64mib", 64 * MiB), ("4GiB", 4 * GiB), ("1TiB", TiB), (" 4 GiB ", 4 * GiB),
        ("1.5GiB", 3 * GiB // 2), ("0.5KB", 500), ("1.0000000001KB", 1000),
        ("fat32", (1 << 32) - 1), ("FAT32", (1 << 32) - 1),
    ],
)
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(("text", "decimal", "binary"), [("64M", "64MB", "64MiB"), ("64m", "64MB", "64MiB"), ("4G", "4GB", "4GiB"),
                                                       ("1K", "1KB", "1KiB"), ("2T", "2TB", "2TiB"), ("64Mi", "64MB", "64MiB"),
                                                       ("4gi", "4GB", "4GiB")])
def test_k_m_g_t_alone_are_refused_as_ambiguous(text: str, decimal: str, binary: str) -> None:
    with pytest.raises(UsageError, match="ambiguous size") as e:
        parse_size(text)
    assert f"write {decimal} (decimal" in e.value.message and f"or {binary} (binary" in e.value.message


@pytest.mark.parametrize("text", ["", " ", "GiB", "-1GB", "1e9", "4 parsecs", "1,5GB", "0x10", "1..5GB", "9" * 100, "fat16", "4 G i B"])
def test_not_sizes(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_a_unit_can_be_required() -> None:
    assert parse_size("24GiB", require_unit=True) == 24 * GiB
    for text in ("24", "fat32", "24G"):
        with pytest.raises(UsageError):
            parse_size(text, require_unit=True)


@given(st.integers(min_value=0, max_value=10**15), st.sampled_from(["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"]))
def test_whole_numbers_times_their_unit(n: int, unit: str) -> None:
    factor = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB}[unit]
    assert parse_size(f"{n}{unit}") == n * factor
    assert parse_size(f"{n} {unit.lower()}") == n * factor


def test_gpu_sizes_use_the_same_table() -> None:
    assert size_or_none("24GiB") == 24 * GiB and size_or_none("80GB") == 80 * 10**9 and size_or_none("64 MiB") == 64 * MiB
    assert size_or_none("H100-80GB") is None and size_or_none("24") is None and size_or_none("24G") is None
    assert parse_gpu("24GiB:2").memory_bytes == 24 * GiB


# -- format_bytes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (1536, "1.50 KiB"), (64 * MiB, "64.00 MiB"), (24 * GiB, "24.00 GiB"),
     (3 * TiB, "3.00 TiB"), (5000 * TiB, "5000.00 TiB"), (-2 * GiB, "-2.00 GiB"), (-5, "-5 B")],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


# -- redact_url -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("https://user:secret@index.example/simple/", "https://***@index.example/simple/"),
        ("pip: Looking in indexes: https://tok@idx.example/simple ok", "pip: Looking in indexes: https://***@idx.example/simple ok"),
        ("https://cdn.example/f?X-Amz-Signature=abc&X-Amz-Date=1&X-Amz-Credential=k", "https://cdn.example/f?X-Amz-Signature=***&X-Amz-Date=1&X-Amz-Credential=***"),
        ("https://hub.example/x?token=hf_abc&revision=main", "https://hub.example/x?token=***&revision=main"),
        ("https://cdn.example/x?Expires=1&Signature=s&Key-Pair-Id=k#f", "https://cdn.example/x?Expires=1&Signature=***&Key-Pair-Id=***#f"),
        ("'https://u:p@h/a?access_token=zz'", "'https://***@h/a?access_token=***'"),
        ("http://plain.example/simple/?page=2", "http://plain.example/simple/?page=2"),
        ("no url here: user:pw@host", "no url here: user:pw@host"),
    ],
)
def test_redact_url(text: str, want: str) -> None:
    assert redact_url(text) == want


def test_both_fetchers_use_the_one_redaction() -> None:
    import airpack._urls
    from airpack.fetch import hub, wheels

    assert hub.redact_url is airpack._urls.redact_url
    assert wheels.redact_url is airpack._urls.redact_url


# -- the callers keep their minimums ----------------------------------------------------------------


def test_export_split_below_the_part_minimum_is_a_usage_error(tmp_path: Path, bundle: Path, policy: Path, alice: KeyPair) -> None:
    r = run_cli("export", bundle, "--tar", tmp_path / "b.tar", "--split", "100", "--key", alice.key, "--trust", policy, "--json")
    assert r.returncode == 2, r.stderr
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "UsageError" and "4096-byte minimum" in err["message"]
    assert not (tmp_path / "b.tar").exists()


@pytest.mark.parametrize(("size", "why"), [("64M", "ambiguous size"), ("64KiB", "at least 1 MiB")])
def test_push_chunk_size_is_checked_before_anything_is_sent(tmp_path: Path, bundle: Path, policy: Path, size: str, why: str) -> None:
    r = run_cli("push", bundle, "oci://127.0.0.1:9/acme/tiny:v1", "--trust", policy, "--plain-http", "--chunk-size", size, "--json")
    assert r.returncode == 2, r.stderr
    assert why in json.loads(r.stdout)["error"]["message"]
