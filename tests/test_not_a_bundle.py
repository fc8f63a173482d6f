"""Pointing a command at something that is no bundle is a usage error (exit 2) that says what the thing is.

A model folder, an unfinished pack, parts without their index, an empty folder, a plain file: none
of them was ever signed, so "no signature envelope… check signers" (exit 4) sent the operator after
the wrong problem. ``sources.detect`` tells the forms apart, so it is the one place that refuses
them, for every command that reads a bundle. A bundle whose envelope is present but damaged, or
gone from an otherwise complete bundle folder, is still a trust failure (exit 4).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeyPair
from threat_helpers import assert_cli_error, assert_cli_json_error, cli_inproc
from transfer_fixtures import export_to

from airpack.errors import NotABundleError
from airpack.manifest import ENVELOPE_NAME, MANIFEST_NAME
from airpack.ops.pack import PARTIAL_MARKER
from airpack.sources import UNFINISHED_MARKER, detect


def _model_folder(tmp_path: Path, tiny_model: Path, bundle: Path, policy: Path, alice: KeyPair) -> tuple[Path, str]:
    return tiny_model, "is a model folder (config.json, *.safetensors), not a bundle"


def _unfinished(tmp_path: Path, tiny_model: Path, bundle: Path, policy: Path, alice: KeyPair) -> tuple[Path, str]:
    d = tmp_path / "half"
    shutil.copytree(bundle, d)
    (d / ENVELOPE_NAME).unlink()
    (d / PARTIAL_MARKER).touch()
    return d, "looks like an unfinished pack"


def _parts_without_index(tmp_path: Path, tiny_model: Path, bundle: Path, policy: Path, alice: KeyPair) -> tuple[Path, str]:
    d = tmp_path / "parts"
    export_to(bundle, d / "b.tar", policy, signer=alice.signer, split=64 * 1024, parity=1)
    next(d.glob("*.index.dsse.json")).unlink()
    return d, "holds parts (b.tar.parity0001, b.tar.part0001"


def _empty_folder(tmp_path: Path, tiny_model: Path, bundle: Path, policy: Path, alice: KeyPair) -> tuple[Path, str]:
    d = tmp_path / "empty"
    d.mkdir()
    return d, "is an empty folder, not a bundle"


def _other_folder(tmp_path: Path, tiny_model: Path, bundle: Path, policy: Path, alice: KeyPair) -> tuple[Path, str]:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "notes.txt").write_text("hello\n")
    return d, "is a folder without envelope.dsse.json (notes.txt), not a bundle"


def _plain_file(tmp_path: Path, tiny_model: Path, bundle: Path, policy: Path, alice: KeyPair) -> tuple[Path, str]:
    f = tmp_path / "notes.txt"
    f.write_text("hello, this is not a tar\n" * 40)
    return f, "is a plain file (not a tar, and not a folder), not a bundle"


def _empty_file(tmp_path: Path, tiny_model: Path, bundle: Path, policy: Path, alice: KeyPair) -> tuple[Path, str]:
    f = tmp_path / "empty.tar"
    f.touch()
    return f, "is an empty file, not a bundle"


def _envelope_itself(tmp_path: Path, tiny_model: Path, bundle: Path, policy: Path, alice: KeyPair) -> tuple[Path, str]:
    return bundle / ENVELOPE_NAME, "is a bundle's envelope, not the bundle"


def _one_part(tmp_path: Path, tiny_model: Path, bundle: Path, policy: Path, alice: KeyPair) -> tuple[Path, str]:
    d = tmp_path / "parts"
    export_to(bundle, d / "b.tar", policy, signer=alice.signer, split=64 * 1024)
    return d / "b.tar.part0001", "is one part of a split export"


NOT_BUNDLES: dict[str, Callable[..., tuple[Path, str]]] = {
    "model folder": _model_folder, "unfinished pack": _unfinished, "parts without index": _parts_without_index,
    "empty folder": _empty_folder, "other folder": _other_folder, "plain file": _plain_file, "empty file": _empty_file,
    "the envelope file": _envelope_itself, "one part": _one_part,
}


@pytest.fixture(params=sorted(NOT_BUNDLES))
def not_a_bundle(request: pytest.FixtureRequest, tmp_path: Path, tiny_model: Path, bundle: Path, policy: Path,
                 alice: KeyPair) -> tuple[Path, str]:
    return NOT_BUNDLES[request.param](tmp_path, tiny_model, bundle, policy, alice)


def test_detect_names_what_it_is(not_a_bundle: tuple[Path, str]) -> None:
    path, what = not_a_bundle
    with pytest.raises(NotABundleError) as e:
        detect(path)
    assert e.value.exit_code == 2 and what in e.value.message and e.value.hint


@pytest.mark.parametrize("command", ["verify", "inspect", "diff", "sbom", "install", "export"])
def test_every_command_that_reads_a_bundle_says_not_a_bundle(tmp_path: Path, bundle: Path, policy: Path,
                                                              not_a_bundle: tuple[Path, str], command: str) -> None:
    path, what = not_a_bundle
    args: list[str | Path] = {
        "verify": ["verify", path, "--trust", policy],
        "inspect": ["inspect", path],
        "diff": ["diff", bundle, path],
        "sbom": ["sbom", path],
        "install": ["install", path, "--registry", tmp_path / "reg", "--trust", policy],
        "export": ["export", path, "--tar", tmp_path / "out.tar", "--trust", policy],
    }[command]
    r = cli_inproc(*args)
    assert_cli_error(r, 2, what)
    rj = cli_inproc(*args, "--json")
    err = assert_cli_json_error(rj, 2, "NotABundleError")
    assert err["path"] == str(path) and err["hint"]
    assert not (tmp_path / "out.tar").exists()


def test_the_model_folder_hint_says_to_pack_it(tiny_model: Path, policy: Path) -> None:
    r = cli_inproc("verify", tiny_model, "--trust", policy)
    assert "airpack pack SPEC" in r.stderr


def test_the_unfinished_marker_is_the_one_pack_writes() -> None:
    assert UNFINISHED_MARKER == PARTIAL_MARKER


def test_a_bundle_folder_that_lost_its_envelope_is_still_a_trust_failure(tmp_path: Path, bundle: Path, policy: Path) -> None:
    d = tmp_path / "lost"
    shutil.copytree(bundle, d)
    (d / ENVELOPE_NAME).unlink()
    assert (d / MANIFEST_NAME).exists()
    assert_cli_error(cli_inproc("verify", d, "--trust", policy), 4, "no signature envelope")


def test_a_damaged_envelope_is_still_a_trust_failure(tmp_path: Path, bundle: Path, policy: Path) -> None:
    d = tmp_path / "damaged"
    shutil.copytree(bundle, d)
    (d / ENVELOPE_NAME).write_bytes(b"{not json")
    r = cli_inproc("verify", d, "--trust", policy, "--json")
    assert_cli_json_error(r, 4, "EnvelopeError")


def test_a_damaged_tar_is_still_an_integrity_failure(tmp_path: Path, bundle: Path, policy: Path) -> None:
    """Named .tar, or carrying the ustar magic: the tar reader's own verdict (exit 3), not 'not a bundle'."""
    export_to(bundle, tmp_path / "b.tar", policy)
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[:700])  # cut inside the envelope
    assert cli_inproc("verify", tmp_path / "b.tar", "--trust", policy).returncode == 3
    odd = tmp_path / "b.bundle"  # not named .tar, but a tar by its magic
    odd.write_bytes(data)
    assert cli_inproc("verify", odd, "--trust", policy).returncode == 0
