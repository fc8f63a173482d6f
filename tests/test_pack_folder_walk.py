"""Threat: pack carries the host's files out through a local model folder, or leaves files out without a word.

A link that leaves the folder (``ln -s /etc/passwd m/passwd.txt``) would be
packed and signed as part of the model; a FIFO would hang the pack; an
unreadable subfolder would silently shrink the model. Pack refuses the first
two by name (exit 3), stops on the third (exit 8), follows links that stay
inside the folder (or, for a Hub cache snapshot, inside that repo's cache
folder), and reports every file it leaves out on its own accord.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from conftest import KeyPair, verify, write_spec
from factories import make_model
from threat_helpers import assert_cli_error, cli_inproc, refused

from airpack.errors import AccessDeniedError, IntegrityError, UnsafePathError
from airpack.ops.pack import PackOptions, PackResult, pack
from airpack.spec import load_spec

MODEL = "models/acme--tiny"
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def pack_folder(tmp_path: Path, folder: Path, signer: KeyPair, *, dry_run: bool = False, out: str = "out") -> PackResult:
    spec = load_spec(write_spec(tmp_path / "spec.toml", model_dir=folder))
    return pack(PackOptions(spec=spec, out=tmp_path / out, signer=None if dry_run else signer.signer, dry_run=dry_run))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_model(tmp_path / "src" / "tiny")


def assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()


# -- links ----------------------------------------------------------------------------------------


def test_a_link_to_a_host_file_outside_the_folder_is_refused_by_name(tmp_path: Path, folder: Path, alice: KeyPair) -> None:
    secret = tmp_path / "host" / "passwd"
    secret.parent.mkdir()
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (folder / "passwd.txt").symlink_to(secret)
    e = refused(UnsafePathError, lambda: pack_folder(tmp_path, folder, alice), code=3)
    assert "passwd.txt" in e.message and str(secret) in e.message and "outside the model folder" in e.message
    assert e.hint != IntegrityError.default_hint and "Copy the file into the model folder" in e.hint
    assert_nothing_written(tmp_path)


def test_a_relative_link_climbing_out_is_refused(tmp_path: Path, folder: Path, alice: KeyPair) -> None:
    (tmp_path / "src" / "other.json").write_text("{}")
    (folder / "extra.json").symlink_to("../other.json")
    refused(UnsafePathError, lambda: pack_folder(tmp_path, folder, alice), code=3, match="extra.json -> ../other.json")
    assert_nothing_written(tmp_path)


def test_a_link_inside_the_folder_packs_the_targets_bytes_under_its_name(tmp_path: Path, folder: Path, alice: KeyPair,
                                                                         policy: Path) -> None:
    (folder / "extras").mkdir()
    (folder / "extras" / "chat_template.jinja").write_text("{{ messages }}")
    (folder / "chat_template.jinja").symlink_to("extras/chat_template.jinja")
    r = pack_folder(tmp_path, folder, alice)
    got = tmp_path / "out" / MODEL / "chat_template.jinja"
    assert not got.is_symlink() and got.read_text() == "{{ messages }}"
    assert verify(r.out, policy).manifest.file(f"{MODEL}/chat_template.jinja") is not None


def test_a_hub_cache_snapshot_of_links_into_blobs_packs(tmp_path: Path, alice: KeyPair, policy: Path) -> None:
    """HF cache layout: snapshots/COMMIT/FILE -> ../../blobs/SHA. "Inside" is the repo's cache folder."""
    plain = make_model(tmp_path / "plain")
    repo = tmp_path / "hub" / "models--acme--tiny"
    snap = repo / "snapshots" / ("c" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(plain.iterdir())):
        blob = repo / "blobs" / f"{i:064x}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    r = pack_folder(tmp_path, snap, alice)
    m = verify(r.out, policy).manifest
    assert {f.path for f in m.files if f.path.startswith(MODEL)} == {f"{MODEL}/{f.name}" for f in plain.iterdir()}
    for f in plain.iterdir():
        assert (r.out / MODEL / f.name).read_bytes() == f.read_bytes()
    # A link of the snapshot that leaves the repo's cache folder is still refused.
    outside = tmp_path / "hub" / "elsewhere.txt"
    outside.write_text("not this repo's")
    (snap / "notes.txt").symlink_to(outside)
    refused(UnsafePathError, lambda: pack_folder(tmp_path, snap, alice, out="out2"), code=3, match="notes.txt")


def test_a_linked_folder_inside_is_followed_and_one_outside_refused(tmp_path: Path, folder: Path, alice: KeyPair,
                                                                     policy: Path) -> None:
    (folder / "real_tok").mkdir()
    (folder / "real_tok" / "vocab.txt").write_text("a\nb\n")
    (folder / "tok").symlink_to("real_tok", target_is_directory=True)
    r = pack_folder(tmp_path, folder, alice)
    assert (r.out / MODEL / "tok" / "vocab.txt").read_text() == "a\nb\n"
    verify(r.out, policy)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "id_rsa").write_text("PRIVATE")
    (folder / "ssh").symlink_to(elsewhere, target_is_directory=True)
    refused(UnsafePathError, lambda: pack_folder(tmp_path, folder, alice, out="out2"), code=3, match="ssh")
    assert not (tmp_path / "out2").exists()


def test_a_link_loop_is_refused(tmp_path: Path, folder: Path, alice: KeyPair) -> None:
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to("..", target_is_directory=True)
    refused(UnsafePathError, lambda: pack_folder(tmp_path, folder, alice), code=3, match="loops back")
    assert_nothing_written(tmp_path)


def test_a_self_referencing_and_a_dangling_link_are_refused(tmp_path: Path, folder: Path, alice: KeyPair) -> None:
    (folder / "self.json").symlink_to("self.json")
    refused(UnsafePathError, lambda: pack_folder(tmp_path, folder, alice), code=3, match="link loop")
    (folder / "self.json").unlink()
    (folder / "gone.json").symlink_to("nothing-here.json")
    refused(UnsafePathError, lambda: pack_folder(tmp_path, folder, alice), code=3, match="link to nothing")
    assert_nothing_written(tmp_path)


# -- files that are not files ---------------------------------------------------------------------


def test_a_fifo_is_refused_by_name_and_never_opened(tmp_path: Path, folder: Path, alice: KeyPair) -> None:
    os.mkfifo(folder / "weights.pipe")
    e = refused(UnsafePathError, lambda: pack_folder(tmp_path, folder, alice), code=3, match="FIFO")
    assert "weights.pipe" in e.message
    assert_nothing_written(tmp_path)
    # A link to the FIFO inside the folder is the same refusal.
    os.rename(folder / "weights.pipe", tmp_path / "src" / "p")
    os.mkfifo(folder / ".hidden-pipe")
    (folder / "w.bin.link").symlink_to(".hidden-pipe")
    refused(UnsafePathError, lambda: pack_folder(tmp_path, folder, alice), code=3, match="FIFO")


def test_a_socket_is_refused_by_name(tmp_path: Path, alice: KeyPair) -> None:
    short = Path("/tmp") / f"ap-sock-{os.getpid()}"  # a socket path must fit in 108 bytes
    folder = make_model(short / "m")
    try:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(folder / "agent.sock"))
        try:
            refused(UnsafePathError, lambda: pack_folder(tmp_path, folder, alice), code=3, match="agent.sock: socket")
        finally:
            s.close()
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert_nothing_written(tmp_path)


# -- unreadable -----------------------------------------------------------------------------------


@pytest.mark.skipif(ROOT, reason="root reads anything: permissions cannot make a file unreadable")
@pytest.mark.parametrize("what", ["folder", "file"])
def test_something_unreadable_stops_the_pack_with_exit_8(tmp_path: Path, folder: Path, alice: KeyPair, what: str) -> None:
    victim = folder / "optimizer"
    if what == "folder":
        victim.mkdir()
        (victim / "state.json").write_text("{}")
    else:
        victim = folder / "special_tokens_map.json"
        victim.write_text("{}")
    victim.chmod(0)
    try:
        e = refused(AccessDeniedError, lambda: pack_folder(tmp_path, folder, alice), code=8)
        assert victim.name in e.message and "fix the permissions" in e.hint
    finally:
        victim.chmod(0o755)
    assert_nothing_written(tmp_path)


# -- left out, and said so ------------------------------------------------------------------------


def test_pickles_beside_safetensors_are_left_out_and_reported(tmp_path: Path, folder: Path, alice: KeyPair) -> None:
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    dry = pack_folder(tmp_path, folder, alice, dry_run=True)
    reasons = {s.path: s.reason for s in dry.skipped}
    assert "safetensors" in reasons[f"{MODEL}/pytorch_model.bin"] and f"{MODEL}/.git/" in reasons
    assert dry.to_json()["skipped"] == [s.to_json() for s in dry.skipped]
    assert f"{MODEL}/pytorch_model.bin" not in {p.bundle_path for p in dry.planned}
    r = pack_folder(tmp_path, folder, alice)
    assert r.skipped == dry.skipped and {s["path"] for s in r.to_json()["skipped"]} == set(reasons)
    assert not (r.out / MODEL / "pytorch_model.bin").exists()


def test_the_cli_names_what_it_left_out(tmp_path: Path, folder: Path, alice: KeyPair) -> None:
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    spec = write_spec(tmp_path / "spec.toml", model_dir=folder)
    r = cli_inproc("pack", spec, "--out", tmp_path / "dry", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"left out: {MODEL}/pytorch_model.bin" in r.stdout
    assert f"note: left out {MODEL}/pytorch_model.bin" in r.stderr
    r = cli_inproc("pack", spec, "--out", tmp_path / "dry", "--dry-run", "--json")
    assert json.loads(r.stdout)["skipped"][0]["path"] == f"{MODEL}/pytorch_model.bin"
    r = cli_inproc("pack", spec, "--out", tmp_path / "b", "--key", alice.key)
    assert r.returncode == 0, r.stderr
    assert f"note: left out {MODEL}/pytorch_model.bin" in r.stderr


def test_the_cli_refusal_is_one_line_naming_link_and_target(tmp_path: Path, folder: Path, alice: KeyPair) -> None:
    (folder / "passwd.txt").symlink_to("/etc/passwd")
    spec = write_spec(tmp_path / "spec.toml", model_dir=folder)
    r = cli_inproc("pack", spec, "--out", tmp_path / "out", "--key", alice.key)
    assert_cli_error(r, 3, "passwd.txt", "/etc/passwd")
    assert_nothing_written(tmp_path)


def test_a_folder_nested_deeper_than_a_bundle_path_may_be_is_refused(tmp_path: Path, folder: Path, alice: KeyPair) -> None:
    deep = folder.joinpath(*["d"] * 40)
    deep.mkdir(parents=True)
    (deep / "x.json").write_text("{}")
    refused(UnsafePathError, lambda: pack_folder(tmp_path, folder, alice), code=3, match="deeper than")
    assert_nothing_written(tmp_path)
