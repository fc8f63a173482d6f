"""Threats against the content once the signature holds: bytes, files, paths, freshness, pickles.

Exit 3 for everything about the files (DESIGN.md), with a report naming every
missing, extra and changed file and both digests; exit 4 for expiry.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import stat
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeyPair, verify
from factories import make_model
from threat_helpers import (
    MODEL_DIR,
    SHARD1,
    SHARD2,
    add_file_to_statement,
    assert_cli_error,
    assert_cli_json_error,
    cli_inproc,
    refused,
    rename_in_statement,
    resign,
    statement,
)

from airpack.errors import (
    BundleMismatchError,
    ContentPolicyError,
    ExpiredError,
    MalformedSafetensorsError,
    UnsafePathError,
)
from airpack.manifest import MANIFEST_NAME

TOKENIZER = f"{MODEL_DIR}/tokenizer.json"
CONFIG = f"{MODEL_DIR}/config.json"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- changed bytes and files ---------------------------------------------------------------------


def test_flipped_byte_in_a_weight_file(bundle: Path, policy: Path) -> None:
    w = bundle / SHARD2
    before = w.read_bytes()
    data = bytearray(before)
    data[len(data) // 2] ^= 0x80  # a weight byte, not the header: only the digest can catch it
    w.write_bytes(bytes(data))
    e = refused(BundleMismatchError, lambda: verify(bundle, policy), code=3)
    assert isinstance(e, BundleMismatchError)
    (c,) = e.report.changed
    assert (c.path, c.reason) == (SHARD2, "digest differs")
    assert (c.expected_sha256, c.actual_sha256) == (sha(before), sha(bytes(data)))
    assert not e.report.missing and not e.report.extra


def test_truncated_file(bundle: Path, policy: Path) -> None:
    w = bundle / SHARD1
    before = w.read_bytes()
    w.write_bytes(before[:-4096])
    e = refused(BundleMismatchError, lambda: verify(bundle, policy), code=3)
    assert isinstance(e, BundleMismatchError)
    (c,) = e.report.changed
    assert c.path == SHARD1
    assert (c.expected_size, c.actual_size) == (len(before), len(before) - 4096)
    assert (c.expected_sha256, c.actual_sha256) == (sha(before), sha(before[:-4096]))


def test_truncated_to_empty_file(bundle: Path, policy: Path) -> None:
    (bundle / CONFIG).write_bytes(b"")
    e = refused(BundleMismatchError, lambda: verify(bundle, policy), code=3)
    assert isinstance(e, BundleMismatchError)
    assert e.report.changed[0].actual_sha256 == sha(b"")


def test_missing_file(bundle: Path, policy: Path) -> None:
    (bundle / TOKENIZER).unlink()
    e = refused(BundleMismatchError, lambda: verify(bundle, policy), code=3, match="1 missing")
    assert isinstance(e, BundleMismatchError)
    assert e.report.missing == (TOKENIZER,)
    assert e.path == TOKENIZER


def test_whole_model_folder_missing(bundle: Path, policy: Path) -> None:
    shutil.rmtree(bundle / "models")
    e = refused(BundleMismatchError, lambda: verify(bundle, policy), code=3, match="8 missing")
    assert isinstance(e, BundleMismatchError)
    assert len(e.report.missing) == 8


@pytest.mark.parametrize("name", ["evil.py", "x.pth", f"{MODEL_DIR}/evil.py", f"{MODEL_DIR}/x.pth",
                                  "models/other--model/config.json", ".hidden"])
def test_extra_file(bundle: Path, policy: Path, name: str) -> None:
    p = bundle / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"import os; os.system('id')\n")
    e = refused(BundleMismatchError, lambda: verify(bundle, policy), code=3, match="1 extra")
    assert isinstance(e, BundleMismatchError)
    assert e.report.extra == (name,)


def test_empty_extra_folder_is_tolerated(bundle: Path, policy: Path) -> None:
    """Folders carry no bytes; an empty one is not a file the manifest could list."""
    (bundle / "models" / "empty").mkdir()
    assert verify(bundle, policy).signer_names == ["alice"]


def test_report_lists_every_missing_extra_and_changed_file_with_both_digests(bundle: Path, policy: Path) -> None:
    s1, s2 = bundle / SHARD1, bundle / SHARD2
    d1, d2 = s1.read_bytes(), s2.read_bytes()
    s1.write_bytes(d1[:-1] + bytes([d1[-1] ^ 1]))
    s2.write_bytes(d2 + b"appended")
    (bundle / TOKENIZER).unlink()
    (bundle / CONFIG).unlink()
    (bundle / "evil.py").write_text("print('hi')\n")
    (bundle / MODEL_DIR / "x.pth").write_bytes(b"\x80\x04K\x01.")

    e = refused(BundleMismatchError, lambda: verify(bundle, policy), code=3,
                match="2 missing, 2 extra, 2 changed")
    assert isinstance(e, BundleMismatchError)
    assert e.report.missing == (CONFIG, TOKENIZER)
    assert e.report.extra == ("evil.py", f"{MODEL_DIR}/x.pth")
    by = {c.path: c for c in e.report.changed}
    assert by[SHARD1].expected_sha256 == sha(d1) and by[SHARD1].actual_sha256 == sha(s1.read_bytes())
    assert by[SHARD2].expected_sha256 == sha(d2) and by[SHARD2].actual_sha256 == sha(d2 + b"appended")

    r = cli_inproc("verify", bundle, "--trust", policy)
    assert_cli_error(r, 3, "does not match its manifest")
    for p in (CONFIG, TOKENIZER):
        assert f"missing: {p}" in r.stderr
    assert "extra:   evil.py" in r.stderr and f"extra:   {MODEL_DIR}/x.pth" in r.stderr
    assert f"expected sha256 {sha(d1)}, got {sha(s1.read_bytes())}" in r.stderr
    assert f"expected sha256 {sha(d2)}, got {sha(d2 + b'appended')}" in r.stderr

    r = cli_inproc("verify", bundle, "--trust", policy, "--json")
    err = assert_cli_json_error(r, 3, "BundleMismatchError")
    mm = err["mismatch"]
    assert mm["missing"] == [CONFIG, TOKENIZER]
    assert mm["extra"] == ["evil.py", f"{MODEL_DIR}/x.pth"]
    assert {c["path"]: (c["expected_sha256"], c["actual_sha256"]) for c in mm["changed"]} == {
        SHARD1: (sha(d1), sha(s1.read_bytes())),
        SHARD2: (sha(d2), sha(d2 + b"appended")),
    }


def test_swapped_files(bundle: Path, policy: Path) -> None:
    """Two shards swapped: same set of names, both digests wrong (sizes differ too)."""
    a, b = bundle / SHARD1, bundle / SHARD2
    tmp = bundle / "swap.tmp"
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)
    e = refused(BundleMismatchError, lambda: verify(bundle, policy), code=3, match="2 changed")
    assert isinstance(e, BundleMismatchError)
    assert {c.path for c in e.report.changed} == {SHARD1, SHARD2}


# -- unsafe paths in the signed manifest ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../outside.json", "'..'"),
        (f"{MODEL_DIR}/../../../outside.json", "'..'"),
        ("models/./x.json", "'.'"),
        ("models//x.json", "empty"),
        ("/ABSOLUTE", "absolute"),
        ("C:/x.json", "absolute"),
        ("models\\x.json", "backslash"),
        ("models/x\n.json", "control character"),
        ("models/x\x00.json", "control character"),
        ("models/x.json/", "empty"),
    ],
)
def test_unsafe_path_in_signed_manifest(bundle: Path, policy: Path, alice: KeyPair, tmp_path: Path,
                                        name: str, why: str) -> None:
    """Crafted and signed with the real signing code; even a correct digest for a real file is refused."""
    data = (bundle / CONFIG).read_bytes()
    if name == "/ABSOLUTE":
        target = tmp_path / "abs.json"
        target.write_bytes(data)
        name = str(target)
    elif name.startswith(".."):
        (bundle.parent / "outside.json").write_bytes(data)  # exactly where ../ would point
    st = statement(bundle)
    rename_in_statement(st, CONFIG, name)
    resign(bundle, st, alice.signer)
    e = refused(UnsafePathError, lambda: verify(bundle, policy), code=3, match="unsafe path")
    assert why in e.message
    r = cli_inproc("verify", bundle, "--trust", policy, "--json")
    assert_cli_json_error(r, 3, "UnsafePathError")


def test_reserved_name_in_signed_manifest(bundle: Path, policy: Path, alice: KeyPair) -> None:
    st = statement(bundle)
    add_file_to_statement(st, MANIFEST_NAME, b"{}")
    resign(bundle, st, alice.signer)
    refused(UnsafePathError, lambda: verify(bundle, policy), code=3, match="reserved")


def test_reserved_name_in_another_case_in_signed_manifest(bundle: Path, policy: Path, alice: KeyPair) -> None:
    """On a case-insensitive medium (exFAT, FAT32) MANIFEST.JSON would overwrite the manifest copy."""
    st = statement(bundle)
    add_file_to_statement(st, "MANIFEST.JSON", b"{}")
    (bundle / "MANIFEST.JSON").write_bytes(b"{}")
    resign(bundle, st, alice.signer)
    refused(UnsafePathError, lambda: verify(bundle, policy), code=3, match="collides")


def test_file_and_folder_of_the_same_name_in_signed_manifest(bundle: Path, policy: Path, alice: KeyPair) -> None:
    st = statement(bundle)
    add_file_to_statement(st, MODEL_DIR, b"x")
    resign(bundle, st, alice.signer)
    refused(UnsafePathError, lambda: verify(bundle, policy), code=3, match="both a file and a folder")


# -- links, devices and other entries on disk ----------------------------------------------------------


def test_symlink_to_a_file_with_the_right_bytes(bundle: Path, policy: Path, tmp_path: Path) -> None:
    target = tmp_path / "outside-tokenizer.json"
    shutil.copy(bundle / TOKENIZER, target)
    (bundle / TOKENIZER).unlink()
    (bundle / TOKENIZER).symlink_to(target)
    e = refused(UnsafePathError, lambda: verify(bundle, policy), code=3, match="symbolic link")
    assert e.path == TOKENIZER
    assert_cli_error(cli_inproc("verify", bundle, "--trust", policy), 3, "symbolic link", TOKENIZER)


def test_symlinked_folder(bundle: Path, policy: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved-model"
    shutil.move(str(bundle / MODEL_DIR), moved)
    (bundle / MODEL_DIR).symlink_to(moved, target_is_directory=True)
    refused(UnsafePathError, lambda: verify(bundle, policy), code=3, match="symbolic link")


def test_dangling_symlink_as_extra_entry(bundle: Path, policy: Path) -> None:
    (bundle / MODEL_DIR / "pointer").symlink_to("/nonexistent/target")
    refused(UnsafePathError, lambda: verify(bundle, policy), code=3, match="symbolic link")


def test_hardlink(bundle: Path, policy: Path, tmp_path: Path) -> None:
    """A hard link lets someone outside the bundle change its bytes after verify; refused by link count."""
    os.link(bundle / SHARD1, tmp_path / "outside-link")
    e = refused(UnsafePathError, lambda: verify(bundle, policy), code=3, match="hard link")
    assert e.path == SHARD1


def test_fifo_in_place_of_a_listed_file_does_not_hang(bundle: Path, policy: Path) -> None:
    (bundle / CONFIG).unlink()
    os.mkfifo(bundle / CONFIG)
    refused(UnsafePathError, lambda: verify(bundle, policy), code=3, match="FIFO")


def test_fifo_as_extra_entry(bundle: Path, policy: Path) -> None:
    os.mkfifo(bundle / "pipe")
    refused(UnsafePathError, lambda: verify(bundle, policy), code=3, match="FIFO")


def test_device_entry(bundle: Path, policy: Path) -> None:
    try:
        os.mknod(bundle / MODEL_DIR / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot create a device node here: {e}")
    refused(UnsafePathError, lambda: verify(bundle, policy), code=3, match="device")


def test_socket_entry(bundle: Path, policy: Path) -> None:
    path = bundle / "s"
    if len(str(path)) > 100:
        pytest.skip("path too long for a unix socket")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(path))
        refused(UnsafePathError, lambda: verify(bundle, policy), code=3, match="socket")
    finally:
        s.close()


# -- case and Unicode collisions ---------------------------------------------------------------------------


def nfd(s: str) -> str:
    return unicodedata.normalize("NFD", s)


@pytest.mark.parametrize(
    ("first", "second", "match"),
    [
        ("Config.json", "config.json", "case or Unicode"),  # the second is the real config.json
        ("CONFIG.JSON", "config.json", "case or Unicode"),
        ("\ufb01le.txt", "file.txt", "case or Unicode"),  # ligature fi vs f + i (NFKC)
        ("stra\u00dfe.txt", "strasse.txt", "case or Unicode"),  # sharp s casefolds to ss
        ("caf\u00e9.txt", nfd("caf\u00e9.txt"), "NFC"),  # NFC vs NFD: the NFD spelling is refused outright
    ],
)
def test_colliding_names_in_signed_manifest(bundle: Path, policy: Path, alice: KeyPair,
                                            first: str, second: str, match: str) -> None:
    st = statement(bundle)
    for name in (first, second):
        full = f"{MODEL_DIR}/{name}"
        if full != CONFIG:
            add_file_to_statement(st, full, b"same bytes\n")
    resign(bundle, st, alice.signer)
    refused(UnsafePathError, lambda: verify(bundle, policy), code=3, match=match)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("Config.json", "case or Unicode"),
        ("CONFIG.json", "case or Unicode"),
        (nfd("caf\u00e9.txt"), "NFC"),
    ],
)
def test_colliding_names_on_disk(bundle: Path, policy: Path, name: str, match: str) -> None:
    """A name equal to a listed one up to case or normalisation is an unsafe alias, not just an extra file."""
    (bundle / MODEL_DIR / name).write_bytes((bundle / CONFIG).read_bytes())
    refused(UnsafePathError, lambda: verify(bundle, policy), code=3, match=match)


def test_nfd_spelling_on_disk_of_a_signed_nfc_name(bundle: Path, policy: Path, alice: KeyPair) -> None:
    """Signed as NFC 'café.txt'; the medium (e.g. a macOS copy) turned it into NFD: refused, named."""
    name = "caf\u00e9.txt"
    st = statement(bundle)
    add_file_to_statement(st, f"{MODEL_DIR}/{name}", b"data\n")
    resign(bundle, st, alice.signer)
    (bundle / MODEL_DIR / nfd(name)).write_bytes(b"data\n")
    refused(UnsafePathError, lambda: verify(bundle, policy), code=3, match="NFC")
    # The NFC spelling verifies.
    (bundle / MODEL_DIR / nfd(name)).unlink()
    (bundle / MODEL_DIR / name).write_bytes(b"data\n")
    assert verify(bundle, policy).signer_names == ["alice"]


def test_colliding_names_in_the_source_are_refused_at_pack(tmp_path: Path, make_bundle: Callable[..., Path]) -> None:
    src = make_model(tmp_path / "src" / "collide")
    (src / "Tokenizer.json").write_text("{}")
    out = tmp_path / "bundle1"
    refused(UnsafePathError, lambda: make_bundle(model_dir=src), code=3, match="case or Unicode")
    # Refused before any file was copied.
    assert not any(p.is_file() and p.name != ".airpack-partial" for p in out.rglob("*"))


# -- freshness ---------------------------------------------------------------------------------------------


def write_expiring_spec(path: Path, model_dir: Path, expires: str, extra: str = "") -> Path:
    rel = os.path.relpath(model_dir, path.parent)
    path.write_text(
        f'[bundle]\nname = "tiny"\nchannel = "tiny"\nsequence = 1\nexpires = {expires}\n\n'
        f'[[models]]\nrepo_id = "acme/tiny"\npath = "{rel}"\n{extra}'
    )
    return path


def test_expired_bundle_is_refused_with_exit_4(tmp_path: Path, tiny_model: Path, alice: KeyPair,
                                               policy: Path) -> None:
    spec = write_expiring_spec(tmp_path / "old.toml", tiny_model, "2020-01-01T00:00:00Z")
    out = tmp_path / "expired"
    r = cli_inproc("pack", spec, "--out", out, "--key", alice.key, "--allow-expired")
    assert r.returncode == 0, r.stderr
    e = refused(ExpiredError, lambda: verify(out, policy), code=4, match="expired at 2020-01-01T00:00:00Z")
    assert "tiny" in e.message
    assert_cli_error(cli_inproc("verify", out, "--trust", policy), 4, "expired")
    # Before the expiry it was fine; at the very second it is not.
    before = dt.datetime(2019, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
    assert verify(out, policy, now=before).signer_names == ["alice"]
    refused(ExpiredError, lambda: verify(out, policy, now=before + dt.timedelta(seconds=1)), code=4)


def test_expired_check_comes_before_the_content(bundle: Path, policy: Path, alice: KeyPair) -> None:
    """An expired bundle is refused as expired even when its files are also damaged."""
    st = statement(bundle)
    st["predicate"]["bundle"]["expires"] = "2021-06-30T00:00:00Z"
    resign(bundle, st, alice.signer)
    (bundle / SHARD1).write_bytes(b"garbage")
    refused(ExpiredError, lambda: verify(bundle, policy), code=4)


def test_pack_refuses_an_expired_spec_unless_allowed(tmp_path: Path, tiny_model: Path, alice: KeyPair) -> None:
    spec = write_expiring_spec(tmp_path / "old.toml", tiny_model, "2020-01-01T00:00:00Z")
    out = tmp_path / "never"
    r = cli_inproc("pack", spec, "--out", out, "--key", alice.key)
    assert_cli_error(r, 4, "already past")
    assert "--allow-expired" in r.stderr
    assert not out.exists()
    r = cli_inproc("pack", spec, "--out", out, "--key", alice.key, "--allow-expired", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["expires"] == "2020-01-01T00:00:00Z"


# -- pickles and code ------------------------------------------------------------------------------------------


def pickle_only_model(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "pytorch_model.bin").write_bytes(b"\x80\x04\x95PK fake pickle")
    return root


@pytest.mark.parametrize(
    ("files", "policy_line", "match"),
    [
        ({"pytorch_model.bin": b"\x80\x04"}, "allow_pickle = true", "pickled weights"),
        ({"optimizer.pkl": b"\x80\x04"}, "allow_pickle = true", "pickled weights"),
        ({"modeling_evil.py": b"import os\n"}, "allow_code = true", "code files"),
        ({"sub/tokenization_x.py": b"import os\n"}, "allow_code = true", "code files"),
    ],
)
def test_pack_refuses_pickles_and_code_unless_the_spec_allows_them(
    tmp_path: Path, tiny_model: Path, make_bundle: Callable[..., Path], policy: Path,
    files: dict[str, bytes], policy_line: str, match: str,
) -> None:
    src = tmp_path / "src" / "mixed"
    shutil.copytree(tiny_model, src)
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    if "pytorch_model.bin" in files:  # the Hub's usual duplicate is dropped when safetensors exist; keep only it
        for st_file in src.glob("*.safetensors*"):
            st_file.unlink()
    e = refused(ContentPolicyError, lambda: make_bundle(model_dir=src), code=3, match=match)
    assert e.path in files

    b = make_bundle(model_dir=src, extra=f"\n[policy]\n{policy_line}\n")
    vb = verify(b, policy)
    m = vb.manifest
    flagged = m.models[0].pickles + m.models[0].code
    assert sorted(flagged) == sorted(files)
    assert m.allow_pickle is ("allow_pickle" in policy_line)
    assert m.allow_code is ("allow_code" in policy_line)
    # The CLI shows them flagged.
    r = cli_inproc("verify", b, "--trust", policy)
    assert r.returncode == 0, r.stderr
    assert "allowed by policy" in r.stdout


def test_pickled_duplicate_of_safetensors_weights_is_dropped_not_packed(
    tmp_path: Path, tiny_model: Path, make_bundle: Callable[..., Path], policy: Path
) -> None:
    src = tmp_path / "src" / "dup"
    shutil.copytree(tiny_model, src)
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04")
    m = verify(make_bundle(model_dir=src), policy).manifest
    assert not any(f.path.endswith(".bin") for f in m.files)


@pytest.mark.parametrize(
    ("name", "allow", "flag"),
    [
        ("pytorch_model.bin", False, True),  # listed on the model but the signed policy forbids pickles
        ("pytorch_model.bin", True, False),  # policy allows pickles but this file is not flagged
        ("x.pth", False, False),
        ("modeling_x.py", False, True),
        ("modeling_x.py", True, False),
    ],
)
def test_signed_manifest_with_unflagged_or_disallowed_pickle_or_code(
    bundle: Path, policy: Path, alice: KeyPair, name: str, allow: bool, flag: bool
) -> None:
    data = b"\x80\x04payload"
    (bundle / MODEL_DIR / name).write_bytes(data)
    st = statement(bundle)
    add_file_to_statement(st, f"{MODEL_DIR}/{name}", data)
    kind = "code" if name.endswith(".py") else "pickles"
    st["predicate"]["policy"]["allow_code" if kind == "code" else "allow_pickle"] = allow
    if flag:
        st["predicate"]["models"][0][kind] = [name]
    resign(bundle, st, alice.signer)
    e = refused(ContentPolicyError, lambda: verify(bundle, policy), code=3, match="not allowed")
    assert e.path == f"{MODEL_DIR}/{name}"
    assert_cli_error(cli_inproc("verify", bundle, "--trust", policy), 3, "not allowed", name)


# -- malformed safetensors inside a signed bundle ---------------------------------------------------------------


def test_signed_but_malformed_safetensors_is_refused_at_verify(bundle: Path, policy: Path, alice: KeyPair) -> None:
    """The packer signed a bad file (e.g. an older airpack): the digest holds, the header check does not."""
    bad = (8).to_bytes(8, "little") + b'{"a": 1}'
    (bundle / SHARD2).write_bytes(bad)
    st = statement(bundle)
    for s in st["subject"]:
        if s["name"] == SHARD2:
            s["digest"]["sha256"] = sha(bad)
    for f in st["predicate"]["files"]:
        if f["path"] == SHARD2:
            f["size"] = len(bad)
    resign(bundle, st, alice.signer)
    e = refused(MalformedSafetensorsError, lambda: verify(bundle, policy), code=3)
    assert e.path == SHARD2


def test_malformed_safetensors_in_the_source_is_refused_at_pack(tmp_path: Path, tiny_model: Path,
                                                                make_bundle: Callable[..., Path]) -> None:
    src = tmp_path / "src" / "bad"
    shutil.copytree(tiny_model, src)
    shard = next(src.glob("model-00002*.safetensors"))
    shard.write_bytes(shard.read_bytes() + b"trailing")
    refused(MalformedSafetensorsError, lambda: make_bundle(model_dir=src), code=3, match="trailing bytes")


# -- a damaged medium -----------------------------------------------------------------------------------


def test_unreadable_sector_is_an_integrity_failure_naming_the_file(bundle: Path, policy: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error while hashing (a bad sector on a USB disk) is a damaged bundle (exit 3), not a crash."""
    import errno

    from airpack import hashing
    from airpack.errors import IntegrityError

    real_readv = os.readv
    shard = os.path.realpath(bundle / SHARD2)

    def readv(fd: int, buffers: list[memoryview]) -> int:
        if os.path.realpath(f"/proc/self/fd/{fd}") == shard:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_readv(fd, buffers)

    monkeypatch.setattr(hashing.os, "readv", readv)
    e = refused(IntegrityError, lambda: verify(bundle, policy), code=3, match="Input/output error")
    assert e.path == SHARD2
