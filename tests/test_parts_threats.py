"""Split parts on the courier's media: a lost, damaged, foreign or unsigned part is named, and repair rebuilds it.

Parts of 4 KiB of a ~40 KB bundle give about a dozen parts, so every case
runs on real parts, a real signed index and real Reed-Solomon parity.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import KeyPair, run_cli, verify
from transfer_fixtures import copy_parts, export_to, flip_byte, small_model

from airpack.errors import EnvelopeError, PartsError, SignatureError, UsageError
from airpack.parts import INDEX_SUFFIX, Layout, plan_layout
from airpack.trust import load_policy
from airpack.units import parse_size

SPLIT = 4096


@pytest.fixture
def small_bundle(tmp_path: Path, make_bundle) -> Path:
    return make_bundle(model_dir=small_model(tmp_path / "small"))


@pytest.fixture
def parts(tmp_path: Path, small_bundle: Path, policy: Path, alice: KeyPair) -> Path:
    """A parts folder with 2 parity parts."""
    export_to(small_bundle, tmp_path / "parts" / "b.tar", policy, signer=alice.signer, split=SPLIT, parity=2)
    return tmp_path / "parts"


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(INDEX_SUFFIX))


# -- sizes and layouts ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [("4GiB", 4 << 30), ("25GB", 25 * 10**9), ("700MB", 700 * 10**6),
                                             ("1MiB", 1 << 20), ("1.5GiB", 3 << 29), ("fat32", (1 << 32) - 1), ("65536", 65536)])
def test_part_sizes_parse(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "4 parsecs", "-1GB", "1e9", "64M"])  # the 4096-byte minimum: test_units.py
def test_bad_part_sizes_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_layouts_respect_the_part_size_and_the_parity_limit() -> None:
    for total in (1, 4095, 4096, 10**6, 7 * 10**9 + 3):
        for size in (4096, 65536, 10**9):
            for parity in (0, 1, 3):
                if parity == 0 and total / size > 9999:
                    continue
                try:
                    lay: Layout = plan_layout(total, size, parity)
                except UsageError:
                    assert parity and total / size > 200
                    continue
                assert lay.part_size <= size and lay.total_parts == lay.data_parts + parity
                assert sum(lay.expected_size(i) for i in range(lay.data_parts)) >= total
    with pytest.raises(UsageError, match="at most 256"):
        plan_layout(10**9, 4096, 2)


# -- the happy paths ----------------------------------------------------------------------------


def test_good_parts_folder_verifies_and_each_part_checks(parts: Path, small_bundle: Path, policy: Path) -> None:
    assert names(parts) == [f"b.tar.parity000{i}" for i in (1, 2)] + [f"b.tar.part{i:04d}" for i in range(1, len(names(parts)) - 1)]
    assert all(p.stat().st_size == SPLIT for p in parts.iterdir() if not p.name.endswith(INDEX_SUFFIX))
    assert verify(parts, policy).manifest.name == "tiny"
    r = run_cli("verify", "--parts", parts, "--trust", policy, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["missing"] == [] and doc["bad"] == [] and len(doc["ok"]) == len(names(parts))
    assert run_cli("verify", parts, "--trust", policy).returncode == 0


def test_parts_without_parity_are_plain_split_output(tmp_path: Path, small_bundle: Path, policy: Path, alice: KeyPair) -> None:
    one = export_to(small_bundle, tmp_path / "one" / "b.tar", policy)
    tar = one.tar
    r = export_to(small_bundle, tmp_path / "split" / "b.tar", policy, signer=alice.signer, split=SPLIT)
    joined = b"".join((tmp_path / "split" / p.name).read_bytes() for p in r.parts)
    assert joined == tar.read_bytes() and r.tar_sha256 == one.tar_sha256
    if shutil.which("split"):  # the same bytes as coreutils' split
        ref = tmp_path / "ref"
        ref.mkdir()
        subprocess.run(["split", "-b", str(SPLIT), "-a", "4", "-d", str(tar), str(ref / "x")], check=True)
        assert [p.read_bytes() for p in sorted(ref.iterdir())] == [(tmp_path / "split" / p.name).read_bytes() for p in r.parts]
    assert verify(tmp_path / "split", policy).manifest.name == "tiny"


def test_export_split_needs_a_key(tmp_path: Path, small_bundle: Path, policy: Path) -> None:
    r = run_cli("export", small_bundle, "--tar", tmp_path / "b.tar", "--split", "4KiB", "--trust", policy)
    assert r.returncode == 2 and "--key" in r.stderr
    r = run_cli("export", small_bundle, "--tar", tmp_path / "b.tar", "--parity", "2", "--trust", policy)
    assert r.returncode == 2


# -- what the courier meets ---------------------------------------------------------------------


def test_missing_part_is_named(parts: Path, policy: Path) -> None:
    (parts / "b.tar.part0003").unlink()
    r = run_cli("verify", parts, "--trust", policy, "--json")
    assert r.returncode == 3
    err = json.loads(r.stdout)["error"]
    assert err["parts"]["missing"] == ["b.tar.part0003"] and "repair" in err["hint"]
    r = run_cli("verify", "--parts", parts, "--trust", policy, "--json")
    assert r.returncode == 3 and json.loads(r.stdout)["error"]["parts"]["missing"] == ["b.tar.part0003"]


@pytest.mark.parametrize("victim", ["b.tar.part0001", "b.tar.part0004", "b.tar.parity0002"])
def test_part_with_one_flipped_byte_is_named(parts: Path, policy: Path, victim: str) -> None:
    flip_byte(parts / victim, 1234)
    with pytest.raises(PartsError) as e:
        from airpack.ops.transfer import check_parts_folder

        check_parts_folder(parts, load_policy(policy))
    assert e.value.bad == ((victim, "sha256 differs from the parts index"),)
    if "parity" not in victim:  # the full verify reads data parts only, and names the damaged one
        with pytest.raises(PartsError) as e2:
            verify(parts, policy)
        assert [n for n, _ in e2.value.bad] == [victim]
    else:
        assert verify(parts, policy).manifest.name == "tiny"


def test_parts_from_two_bundles_mixed_are_refused(tmp_path: Path, small_bundle: Path, make_bundle, policy: Path,
                                                  alice: KeyPair, parts: Path) -> None:
    other = make_bundle(model_dir=small_model(tmp_path / "other", seed=7), sequence=2)
    export_to(other, tmp_path / "other-parts" / "b.tar", policy, signer=alice.signer, split=SPLIT, parity=2)
    # One foreign part among ours (same name, same size): named as not belonging.
    mixed = copy_parts(parts, tmp_path / "mixed")
    shutil.copyfile(tmp_path / "other-parts" / "b.tar.part0002", mixed / "b.tar.part0002")
    r = run_cli("verify", mixed, "--trust", policy, "--json")
    assert r.returncode == 3
    assert [b["name"] for b in json.loads(r.stdout)["error"]["parts"]["bad"]] == ["b.tar.part0002"]
    # Their index over our parts: every part mismatches and the bundle inside is not the one signed for.
    swapped = copy_parts(parts, tmp_path / "swapped")
    shutil.copyfile(tmp_path / "other-parts" / "b.tar.index.dsse.json", swapped / "b.tar.index.dsse.json")
    with pytest.raises(PartsError):
        verify(swapped, policy)
    assert run_cli("verify", "--parts", swapped, "--trust", policy).returncode == 3


def test_data_parts_of_another_export_with_their_index_are_refused(tmp_path: Path, small_bundle: Path, make_bundle,
                                                                  policy: Path, alice: KeyPair) -> None:
    """An index whose part digests all match, but that names another bundle than the tar inside: mixing, exit 3."""
    from airpack._json import dumps_canonical
    from airpack.parts import load_index, sign_index

    folder = tmp_path / "p"
    export_to(small_bundle, folder / "b.tar", policy, signer=alice.signer, split=SPLIT, parity=1)
    idx_path = folder / "b.tar.index.dsse.json"
    index, _ = load_index(idx_path, load_policy(policy))
    st = json.loads(dumps_canonical(index.statement))
    st["predicate"]["bundle"]["manifest_sha256"] = "0" * 64
    idx_path.write_bytes(sign_index(st, alice.signer))
    with pytest.raises(PartsError, match="mixed"):
        verify(folder, policy)


def test_parts_index_not_signed_by_a_trusted_key(tmp_path: Path, small_bundle: Path, policy: Path, bob: KeyPair) -> None:
    export_to(small_bundle, tmp_path / "p" / "b.tar", policy, signer=bob.signer, split=SPLIT, parity=1)
    for args in (("verify", tmp_path / "p"), ("verify", "--parts", tmp_path / "p"), ("repair", tmp_path / "p")):
        r = run_cli(*args, "--trust", policy, "--json")
        assert r.returncode == 4, (args, r.stdout, r.stderr)
        assert json.loads(r.stdout)["error"]["type"] == "SignatureError"
    with pytest.raises(SignatureError):
        verify(tmp_path / "p", policy)


def test_tampered_parts_index_is_a_trust_failure(parts: Path, policy: Path) -> None:
    idx = parts / "b.tar.index.dsse.json"
    doc = json.loads(idx.read_bytes())
    import base64

    payload = base64.b64decode(doc["payload"]).replace(b'"parity_parts": 2', b'"parity_parts": 3')
    doc["payload"] = base64.b64encode(payload).decode()
    idx.write_text(json.dumps(doc))
    with pytest.raises(SignatureError):
        verify(parts, policy)
    idx.write_bytes(b"{" * 10)
    with pytest.raises(EnvelopeError):
        verify(parts, policy)


def test_bundle_envelope_is_not_accepted_as_a_parts_index(parts: Path, small_bundle: Path, policy: Path) -> None:
    shutil.copyfile(small_bundle / "envelope.dsse.json", parts / "b.tar.index.dsse.json")
    with pytest.raises(EnvelopeError, match="predicate type"):
        verify(parts, policy)


# -- repair ----------------------------------------------------------------------------------------


def test_repair_rebuilds_a_missing_and_a_damaged_part(parts: Path, policy: Path) -> None:
    before = {p.name: p.read_bytes() for p in parts.iterdir()}
    (parts / "b.tar.part0002").unlink()
    flip_byte(parts / "b.tar.parity0001")
    r = run_cli("repair", parts, "--trust", policy, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(json.loads(r.stdout)["repaired"]) == ["b.tar.parity0001", "b.tar.part0002"]
    assert {p.name: p.read_bytes() for p in parts.iterdir()} == before
    assert run_cli("repair", parts, "--trust", policy).returncode == 0  # nothing left to do


def test_more_parts_lost_than_parity_can_rebuild(parts: Path, policy: Path) -> None:
    for n in ("b.tar.part0001", "b.tar.part0005"):
        (parts / n).unlink()
    flip_byte(parts / "b.tar.parity0002")
    r = run_cli("repair", parts, "--trust", policy, "--json")
    assert r.returncode == 3
    err = json.loads(r.stdout)["error"]
    assert "3 parts are lost" in err["message"] and "rebuild at most 2" in err["message"]
    for n in ("b.tar.part0001", "b.tar.part0005", "b.tar.parity0002"):
        assert n in err["message"]
    assert not (parts / "b.tar.part0001").exists()  # nothing half-written was left
    assert not [p for p in parts.iterdir() if p.name.startswith(".")]


def test_repair_without_parity_names_the_parts_to_copy_again(tmp_path: Path, small_bundle: Path, policy: Path, alice: KeyPair) -> None:
    export_to(small_bundle, tmp_path / "p" / "b.tar", policy, signer=alice.signer, split=SPLIT)
    (tmp_path / "p" / "b.tar.part0002").unlink()
    r = run_cli("repair", tmp_path / "p", "--trust", policy)
    assert r.returncode == 3 and "b.tar.part0002" in r.stderr and "no parity" in r.stderr


def test_two_indexes_in_one_folder_need_the_index_named(tmp_path: Path, small_bundle: Path, policy: Path, alice: KeyPair) -> None:
    folder = tmp_path / "media"
    export_to(small_bundle, folder / "a.tar", policy, signer=alice.signer, split=SPLIT)
    export_to(small_bundle, folder / "b.tar", policy, signer=alice.signer, split=SPLIT, parity=1)
    assert run_cli("verify", folder, "--trust", policy).returncode == 2
    assert verify(folder / "b.tar.index.dsse.json", policy).manifest.name == "tiny"


def test_install_from_parts_after_repair(parts: Path, tmp_path: Path, policy: Path) -> None:
    (parts / "b.tar.part0003").unlink()
    reg = tmp_path / "reg"
    r = run_cli("install", parts, "--registry", reg, "--trust", policy, "--json")
    assert r.returncode == 3  # a missing part: nothing installed
    assert run_cli("repair", parts, "--trust", policy).returncode == 0
    r = run_cli("install", parts, "--registry", reg, "--trust", policy, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["result"] == "installed"
