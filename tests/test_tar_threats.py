"""Hostile tars: verify streams them and refuses links, devices, traversal, duplicates and truncation by name.

Each tar is crafted with Python's own ``tarfile`` around a genuinely signed
envelope and manifest, so a refusal proves the member check, not the signature.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from conftest import run_cli, verify
from transfer_fixtures import bundle_members, craft_tar, export_to, special

from airpack.errors import (
    BundleMismatchError,
    EnvelopeError,
    IntegrityError,
    MalformedSafetensorsError,
    SignatureError,
    UnsafePathError,
)
from airpack.manifest import ENVELOPE_NAME, MANIFEST_NAME
from airpack.tarball import BLOCK, TarReader, header

SHARD = "models/acme--tiny/model-00001-of-00002.safetensors"
CONFIG = "models/acme--tiny/config.json"


@pytest.mark.parametrize(
    ("injector", "name", "why"),
    [
        (special(f"{CONFIG}.lnk", tarfile.SYMTYPE, linkname="/etc/passwd"), f"{CONFIG}.lnk", "symbolic link"),
        (special("models/acme--tiny/hard", tarfile.LNKTYPE, linkname=CONFIG), "models/acme--tiny/hard", "hard link"),
        (special("models/acme--tiny/null", tarfile.CHRTYPE), "models/acme--tiny/null", "character device"),
        (special("models/acme--tiny/disk", tarfile.BLKTYPE), "models/acme--tiny/disk", "block device"),
        (special("models/acme--tiny/pipe", tarfile.FIFOTYPE), "models/acme--tiny/pipe", "FIFO"),
        (special("models/acme--tiny/sub", tarfile.DIRTYPE), "models/acme--tiny/sub", "directory"),
    ],
    ids=["symlink", "hardlink", "chardev", "blockdev", "fifo", "directory"],
)
def test_non_regular_members_are_refused_by_name(tmp_path: Path, bundle: Path, policy: Path, injector, name: str, why: str) -> None:
    tar = craft_tar(tmp_path / "evil.tar", bundle_members(bundle), inject=injector)
    with pytest.raises(UnsafePathError) as e:
        verify(tar, policy)
    assert (e.value.path or "").rstrip("/") == name  # tarfile writes a folder's name with a slash
    assert why in e.value.message


@pytest.mark.parametrize("name", ["../evil.py", "models/../../evil", "/etc/cron.d/evil", "./models/x", "models//x"],
                         ids=["dotdot", "nested-dotdot", "absolute", "dot", "empty-component"])
def test_traversal_and_absolute_members_are_refused(tmp_path: Path, bundle: Path, policy: Path, name: str) -> None:
    tar = craft_tar(tmp_path / "evil.tar", bundle_members(bundle), inject=special(name, tarfile.REGTYPE, data=b"x"))
    with pytest.raises(UnsafePathError) as e:
        verify(tar, policy)
    assert "unsafe" in e.value.message


def test_duplicated_member_is_refused(tmp_path: Path, bundle: Path, policy: Path) -> None:
    members = bundle_members(bundle)
    config = next(m for m in members if m[0] == CONFIG)
    # The second copy carries other bytes: a reader keeping the last one would install them.
    tar = craft_tar(tmp_path / "dup.tar", [*members, (CONFIG, config[1] + b" ")])
    with pytest.raises(UnsafePathError) as e:
        verify(tar, policy)
    assert e.value.path == CONFIG and "duplicate" in e.value.message


@pytest.mark.parametrize(("name", "why"), [
    ("models/acme--tiny/CONFIG.json", "collides"),            # case: one file on FAT, exFAT, NTFS, APFS
    ("models/acme--tiny/con\ufb01g.json", "collides"),        # the "fi" ligature: equal after NFKC
    ("models/acme--tiny/cafe\u0301.txt", "NFC"),             # decomposed Unicode is refused outright
], ids=["case", "nfkc", "nfd"])
def test_case_and_unicode_colliding_members_are_refused(tmp_path: Path, bundle: Path, policy: Path, name: str, why: str) -> None:
    tar = craft_tar(tmp_path / "case.tar", bundle_members(bundle), inject=special(name, tarfile.REGTYPE, data=b"{}"), inject_after=99)
    with pytest.raises(UnsafePathError) as e:
        verify(tar, policy)
    assert why in e.value.message


def test_duplicate_envelope_member_is_refused(tmp_path: Path, bundle: Path, policy: Path) -> None:
    members = bundle_members(bundle)
    tar = craft_tar(tmp_path / "env2.tar", [*members, (ENVELOPE_NAME, members[0][1])])
    with pytest.raises(UnsafePathError):
        verify(tar, policy)


def test_tar_truncated_mid_member_names_the_member(tmp_path: Path, bundle: Path, policy: Path) -> None:
    good = export_to(bundle, tmp_path / "good.tar", policy).tar
    data = good.read_bytes()
    # Find where the shard's body starts by reading headers with airpack's own reader.
    with open(good, "rb", buffering=0) as f:
        r = TarReader(f)
        for m in r:
            if m.name == SHARD:
                start = r.offset
                break
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: start + 1000])
    with pytest.raises(IntegrityError) as e:
        verify(cut, policy)
    assert e.value.path == SHARD
    assert "truncated inside member" in e.value.message
    r2 = run_cli("verify", cut, "--trust", policy, "--json")
    assert r2.returncode == 3
    assert json.loads(r2.stdout)["error"]["path"] == SHARD


def test_tar_cut_at_a_member_boundary_is_refused(tmp_path: Path, bundle: Path, policy: Path) -> None:
    data = export_to(bundle, tmp_path / "good.tar", policy).tar.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:-1024])  # the end-of-archive marker is gone
    with pytest.raises(IntegrityError) as e:
        verify(cut, policy)
    assert "end-of-archive" in e.value.message


def test_member_larger_than_the_manifest_says(tmp_path: Path, bundle: Path, policy: Path) -> None:
    members = [(n, d + b"\0" * 600 if n == CONFIG else d) for n, d in bundle_members(bundle)]
    with pytest.raises(BundleMismatchError) as e:
        verify(craft_tar(tmp_path / "big.tar", members), policy)
    changed = e.value.report.changed
    assert [c.path for c in changed] == [CONFIG] and changed[0].actual_size == changed[0].expected_size + 600


def test_extra_missing_and_changed_members_are_all_reported(tmp_path: Path, bundle: Path, policy: Path) -> None:
    members = bundle_members(bundle)
    kept = [(n, bytes(len(d)) if n == SHARD else d) for n, d in members if n != CONFIG]
    tar = craft_tar(tmp_path / "mixed.tar", [*kept, ("models/acme--tiny/evil.json", b"{}")])
    with pytest.raises(BundleMismatchError) as e:
        verify(tar, policy)
    rep = e.value.report
    assert rep.missing == (CONFIG,) and rep.extra == ("models/acme--tiny/evil.json",) and rep.changed[0].path == SHARD


def test_envelope_must_come_first(tmp_path: Path, bundle: Path, policy: Path) -> None:
    members = bundle_members(bundle)
    tar = craft_tar(tmp_path / "order.tar", [members[1], members[0], *members[2:]])
    with pytest.raises(EnvelopeError):
        verify(tar, policy)
    assert run_cli("verify", tar, "--trust", policy).returncode == 4


def test_tar_signed_by_untrusted_key_is_refused_before_any_file(tmp_path: Path, make_bundle, bob, policy: Path) -> None:
    theirs = make_bundle(signer=bob)
    members = bundle_members(theirs)
    # A device after the envelope: an untrusted envelope must be refused before members are even looked at.
    tar = craft_tar(tmp_path / "bob.tar", members, inject=special("dev", tarfile.CHRTYPE))
    with pytest.raises(SignatureError):
        verify(tar, policy)


def test_altered_manifest_copy_in_tar(tmp_path: Path, bundle: Path, policy: Path) -> None:
    members = bundle_members(bundle)
    members[1] = (MANIFEST_NAME, members[1][1].replace(b'"tiny"', b'"tinY"', 1))
    with pytest.raises(IntegrityError) as e:
        verify(craft_tar(tmp_path / "copy.tar", members), policy)
    assert e.value.path == MANIFEST_NAME


def test_data_after_the_end_marker_is_refused(tmp_path: Path, bundle: Path, policy: Path) -> None:
    good = export_to(bundle, tmp_path / "good.tar", policy).tar
    bad = tmp_path / "tail.tar"
    bad.write_bytes(good.read_bytes() + b"\0" * 512 + b"hidden payload" + b"\0" * 498)
    with pytest.raises(IntegrityError) as e:
        verify(bad, policy)
    assert "after its end-of-archive" in e.value.message
    padded = tmp_path / "padded.tar"
    padded.write_bytes(good.read_bytes() + b"\0" * 8192)  # zero padding (as tar's records add) is fine
    assert verify(padded, policy).manifest.name == "tiny"


def test_oversized_pax_header_is_refused_without_reading_it(tmp_path: Path, bundle: Path, policy: Path) -> None:
    env = bundle_members(bundle)[0]
    block = bytearray(header("x", 0, 0)[:BLOCK])
    # Turn a plain header into a pax header that claims 1 GiB of records (no body follows).
    block[156:157] = b"x"
    block[124:136] = b"%011o\0" % (1 << 30)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    stream = io.BytesIO(header(ENVELOPE_NAME, len(env[1]), 0) + env[1] + bytes(-len(env[1]) % 512) + bytes(block))
    r = TarReader(stream)
    assert r.next_member() is not None
    r.skip()
    with pytest.raises(IntegrityError, match="over the 65536-byte limit"):
        r.next_member()


def test_bad_header_checksum_is_refused(tmp_path: Path, bundle: Path, policy: Path) -> None:
    good = export_to(bundle, tmp_path / "good.tar", policy).tar
    data = bytearray(good.read_bytes())
    data[10] ^= 0x20  # a byte of the first member's name: the checksum no longer matches
    bad = tmp_path / "chk.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="checksum"):
        verify(bad, policy)


def test_streamed_safetensors_header_is_capped_and_checked() -> None:
    """The header of a safetensors member is taken from the stream, capped, whatever the chunking."""
    from airpack.safetensors_check import HeaderCollector

    g = HeaderCollector()
    g.feed(memoryview((10**12).to_bytes(8, "little") + b"{}"))
    with pytest.raises(MalformedSafetensorsError):
        g.info(10, display=SHARD)
    g2 = HeaderCollector()
    for byte in (4).to_bytes(8, "little") + b'{"a"':  # arrives one byte at a time (a stripe boundary)
        g2.feed(memoryview(bytes([byte])))
    with pytest.raises(MalformedSafetensorsError):
        g2.info(12, display=SHARD)
