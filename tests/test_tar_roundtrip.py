"""One tar of a bundle: deterministic bytes, readable by standard tools, verified and installed without extracting."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import KeyPair, run_cli, verify, write_spec
from factories import make_model
from transfer_fixtures import export_to

from airpack.errors import BundleMismatchError, IntegrityError, SignatureError, UsageError
from airpack.manifest import ENVELOPE_NAME, MANIFEST_NAME, parse
from airpack.tarball import TarReader, header, padding


def test_same_bundle_gives_byte_identical_tar(tmp_path: Path, bundle: Path, policy: Path) -> None:
    a = export_to(bundle, tmp_path / "a.tar", policy)
    copy = shutil.copytree(bundle, tmp_path / "copy")  # other mtimes, other inode order
    b = export_to(copy, tmp_path / "b.tar", policy)
    assert a.tar.read_bytes() == b.tar.read_bytes()
    assert a.tar_sha256 == b.tar_sha256 == hashlib.sha256(a.tar.read_bytes()).hexdigest()
    assert a.tar_size == a.tar.stat().st_size


def test_tar_layout_is_fixed_and_standard_tools_read_it(tmp_path: Path, bundle: Path, policy: Path) -> None:
    r = export_to(bundle, tmp_path / "b.tar", policy)
    m = parse((bundle / MANIFEST_NAME).read_bytes())
    with tarfile.open(r.tar) as tf:  # Python's reader, as any tar tool would
        infos = tf.getmembers()
        assert [i.name for i in infos] == [ENVELOPE_NAME, MANIFEST_NAME, *sorted(f.path for f in m.files)]
        assert all(i.isreg() and i.mode == 0o644 and i.uid == 0 and i.gid == 0 and i.uname == "" for i in infos)
        assert {i.mtime for i in infos} == {int(m.created.timestamp())}
        for f in m.files:
            data = tf.extractfile(f.path).read()  # type: ignore[union-attr]
            assert hashlib.sha256(data).hexdigest() == f.sha256
    if shutil.which("tar"):
        listing = subprocess.run(["tar", "-tf", str(r.tar)], capture_output=True, text=True, check=True).stdout.split()
        assert listing[:2] == [ENVELOPE_NAME, MANIFEST_NAME]


def test_verify_good_tar_passes(tmp_path: Path, bundle: Path, policy: Path) -> None:
    tar = export_to(bundle, tmp_path / "b.tar", policy).tar
    vb = verify(tar, policy)
    assert vb.manifest.digest == hashlib.sha256((bundle / MANIFEST_NAME).read_bytes()).hexdigest()
    assert any(p.endswith(".safetensors") for p in vb.headers)
    r = run_cli("verify", tar, "--trust", policy, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verified"] is True


def test_long_and_unicode_names_go_through_pax(tmp_path: Path, make_bundle, policy: Path) -> None:
    src = make_model(tmp_path / "named", shards=1, hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32)
    deep = src / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / "notes.txt").write_text("long path\n")
    (src / "café-ünïcode.txt").write_text("unicode\n")
    b = make_bundle(model_dir=src)
    tar = export_to(b, tmp_path / "n.tar", policy).tar
    names = [m.name for m in TarReader(open(tar, "rb", buffering=0))]  # noqa: SIM115
    assert any(n.endswith("notes.txt") and len(n.encode()) > 100 for n in names)
    assert any(n.endswith("café-ünïcode.txt") for n in names)
    with tarfile.open(tar) as tf:
        assert sorted(tf.getnames()) == sorted(names)
    assert verify(tar, policy).manifest.file(f"models/acme--tiny/{'d' * 60}/{'e' * 60}/notes.txt") is not None


def test_sizes_of_8_gib_and_more_use_a_pax_size_record() -> None:
    big = 9 << 30
    h = header("models/x/huge.safetensors", big, 0)
    assert len(h) > 512 and b"size=9663676416" in h
    r = TarReader(io.BytesIO(h + b"\0" * 100))  # the body is cut short: only the header is read
    m = r.next_member()
    assert m is not None and m.size == big
    with pytest.raises(IntegrityError, match="truncated inside member"):
        r.skip()
    assert padding(big) == 0


def test_export_does_not_launder_a_tampered_bundle(tmp_path: Path, bundle: Path, policy: Path) -> None:
    w = next(bundle.glob("models/*/model-00002-of-00002.safetensors"))
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x40
    w.write_bytes(bytes(data))
    with pytest.raises(BundleMismatchError) as e:
        export_to(bundle, tmp_path / "out" / "b.tar", policy)
    assert e.value.report.changed[0].path.endswith("model-00002-of-00002.safetensors")
    assert list((tmp_path / "out").iterdir()) == []  # no tar, no temp file left behind
    r = run_cli("export", bundle, "--tar", tmp_path / "out" / "c.tar", "--trust", policy)
    assert r.returncode == 3


def test_export_refuses_an_untrusted_bundle(tmp_path: Path, make_bundle, bob: KeyPair, policy: Path) -> None:
    theirs = make_bundle(signer=bob)
    with pytest.raises(SignatureError):
        export_to(theirs, tmp_path / "b.tar", policy)
    assert run_cli("export", theirs, "--tar", tmp_path / "c.tar", "--trust", policy).returncode == 4
    assert not (tmp_path / "b.tar").exists()


def test_export_never_overwrites(tmp_path: Path, bundle: Path, policy: Path) -> None:
    tar = export_to(bundle, tmp_path / "b.tar", policy).tar
    with pytest.raises(UsageError):
        export_to(bundle, tar, policy)


def test_pack_format_tar_writes_a_verified_tar_and_no_folder(tmp_path: Path, tiny_model: Path, alice: KeyPair, policy: Path) -> None:
    spec = write_spec(tmp_path / "spec.toml", model_dir=tiny_model)
    out = tmp_path / "media"
    out.mkdir()
    r = run_cli("pack", spec, "--out", out / "tiny.tar", "--key", alice.key, "--format", "tar", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["tar_sha256"] == hashlib.sha256((out / "tiny.tar").read_bytes()).hexdigest()
    assert [p.name for p in out.iterdir()] == ["tiny.tar"]  # the temp bundle folder is gone
    assert verify(out / "tiny.tar", policy).manifest.name == "tiny"
    assert run_cli("inspect", out / "tiny.tar").returncode == 0


def test_install_from_a_tar(tmp_path: Path, bundle: Path, policy: Path) -> None:
    tar = export_to(bundle, tmp_path / "b.tar", policy).tar
    reg = tmp_path / "reg"
    r = run_cli("install", tar, "--registry", reg, "--trust", policy, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["result"] == "installed"
    listed = json.loads(run_cli("list", "--registry", reg, "--json").stdout)
    assert [x["repo_id"] for x in listed] == ["acme/tiny"]
    assert [p.name for p in (reg / ".staging").iterdir()] == []  # the txn staging is gone


def test_install_from_a_tampered_tar_changes_nothing(tmp_path: Path, bundle: Path, policy: Path) -> None:
    tar = export_to(bundle, tmp_path / "b.tar", policy).tar
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0x01
    tar.write_bytes(bytes(data))
    reg = tmp_path / "reg"
    r = run_cli("install", tar, "--registry", reg, "--trust", policy, "--json")
    assert r.returncode == 3, r.stdout + r.stderr
    assert not list((reg / "hub").rglob("*.safetensors")) if (reg / "hub").exists() else True
    assert not any((reg / ".staging").glob("*"))  # a failed first install removes the staging it created, too


def test_push_of_a_tar_is_a_usage_error_before_any_connection(tmp_path: Path, bundle: Path, policy: Path) -> None:
    """Blobs are uploaded from a folder's files: a tar is refused by name, before the registry is reached."""
    tar = export_to(bundle, tmp_path / "b.tar", policy).tar
    r = run_cli("push", tar, "oci://127.0.0.1:9/acme/tiny:v1", "--trust", policy, "--plain-http", "--json")
    assert r.returncode == 2, r.stdout + r.stderr
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "UsageError" and "bundle folder" in err["message"]
