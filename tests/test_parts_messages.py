"""What a refused parts folder says: every lost part (parity too), repair counted on intact parity, foreign parts named.

The courier decides from this message whether to run ``airpack repair`` or fetch media again,
so it must list every part that is missing or damaged, data and parity alike, count only the
parity parts that are still intact, and say "another export" when that can be shown.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import KeyPair, run_cli, verify
from transfer_fixtures import copy_parts, export_to, flip_byte, small_model

from airpack.errors import PartsError

SPLIT = 4096


@pytest.fixture
def small_bundle(tmp_path: Path, make_bundle) -> Path:
    return make_bundle(model_dir=small_model(tmp_path / "small"))


@pytest.fixture
def parts(tmp_path: Path, small_bundle: Path, policy: Path, alice: KeyPair) -> Path:
    """A parts folder with 2 parity parts."""
    export_to(small_bundle, tmp_path / "parts" / "b.tar", policy, signer=alice.signer, split=SPLIT, parity=2)
    return tmp_path / "parts"


def _refusal(folder: Path, policy: Path) -> PartsError:
    with pytest.raises(PartsError) as e:
        verify(folder, policy)
    return e.value


def test_full_verify_names_lost_parity_parts_too(parts: Path, policy: Path) -> None:
    (parts / "b.tar.part0002").unlink()
    flip_byte(parts / "b.tar.parity0001")
    e = _refusal(parts, policy)
    assert e.missing == ("b.tar.part0002",) and [n for n, _ in e.bad] == ["b.tar.parity0001"]
    assert "b.tar.part0002 (data, missing)" in e.message and "b.tar.parity0001 (parity, sha256 differs" in e.message
    # Two lost, two parity parts of which one is intact: repair still works (any k of k+N parts), and says how.
    assert e.hint == (f"Run `airpack repair {parts}`: the 1 intact parity part(s) rebuild the 1 lost data part(s), "
                      "and codes the 1 lost parity part(s) again.")
    r = run_cli("verify", parts, "--trust", policy, "--json")
    assert r.returncode == 3
    got = json.loads(r.stdout)["error"]["parts"]
    assert got["missing"] == ["b.tar.part0002"] and [b["name"] for b in got["bad"]] == ["b.tar.parity0001"]


def test_a_damaged_data_part_with_a_lost_parity_part_is_named_in_the_stream(parts: Path, policy: Path) -> None:
    """Damage found while streaming (not by the size check) also lists every lost part."""
    flip_byte(parts / "b.tar.part0003")
    (parts / "b.tar.parity0002").unlink()
    e = _refusal(parts, policy)
    assert e.missing == ("b.tar.parity0002",) and [n for n, _ in e.bad] == ["b.tar.part0003"]


def test_the_hint_counts_only_intact_parity_parts(parts: Path, policy: Path) -> None:
    (parts / "b.tar.part0001").unlink()
    (parts / "b.tar.parity0001").unlink()
    (parts / "b.tar.parity0002").unlink()
    e = _refusal(parts, policy)
    assert e.hint.startswith("Only 0 of 2 parity part(s) are intact, too few for 1 lost data part(s)")
    assert "copy the named parts again" in e.hint
    assert run_cli("repair", parts, "--trust", policy).returncode == 3


def test_only_parity_lost_refuses_nothing_and_repair_codes_it_again(parts: Path, policy: Path) -> None:
    (parts / "b.tar.parity0002").unlink()
    assert verify(parts, policy).manifest.name == "tiny"
    r = run_cli("verify", "--parts", parts, "--trust", policy, "--json")
    assert r.returncode == 3
    assert "codes the 1 lost parity part(s) again" in json.loads(r.stdout)["error"]["hint"]
    assert run_cli("repair", parts, "--trust", policy).returncode == 0


def _other_export(tmp_path: Path, make_bundle, policy: Path, alice: KeyPair, tar: str = "b.tar") -> Path:
    other = make_bundle(model_dir=small_model(tmp_path / "other", seed=7), sequence=2)
    export_to(other, tmp_path / "other-parts" / tar, policy, signer=alice.signer, split=SPLIT, parity=2)
    return tmp_path / "other-parts"


def test_a_first_part_of_another_export_says_so(tmp_path: Path, parts: Path, policy: Path, make_bundle,
                                                alice: KeyPair) -> None:
    theirs = _other_export(tmp_path, make_bundle, policy, alice)
    mixed = copy_parts(parts, tmp_path / "mixed")
    shutil.copyfile(theirs / "b.tar.part0001", mixed / "b.tar.part0001")
    e = _refusal(mixed, policy)
    ((name, why),) = e.bad
    assert name == "b.tar.part0001"
    assert why == "belongs to another export: it starts bundle tiny sequence 2, the index b.tar.index.dsse.json is for tiny sequence 1"
    r = run_cli("verify", mixed, "--trust", policy)
    assert r.returncode == 3 and "b.tar.part0001 (data, belongs to another export" in r.stderr


def test_parts_and_an_index_of_different_exports_say_so(tmp_path: Path, parts: Path, policy: Path, make_bundle,
                                                        alice: KeyPair) -> None:
    theirs = _other_export(tmp_path, make_bundle, policy, alice)
    swapped = copy_parts(parts, tmp_path / "swapped")
    shutil.copyfile(theirs / "b.tar.index.dsse.json", swapped / "b.tar.index.dsse.json")
    for args in (["verify", "--parts", swapped], ["verify", swapped]):
        r = run_cli(*args, "--trust", policy, "--json")
        assert r.returncode == 3
        err = json.loads(r.stdout)["error"]
        assert "the parts and the index belong to different exports" in err["message"], err["message"]
        assert "(bundle tiny sequence 2)" in err["message"] and "starts bundle tiny sequence 1" in err["message"]
        assert "Keep each export's parts" in err["hint"]


def test_part_files_of_another_tar_in_the_folder_are_named(tmp_path: Path, parts: Path, policy: Path, make_bundle,
                                                           alice: KeyPair) -> None:
    theirs = _other_export(tmp_path, make_bundle, policy, alice, tar="c.tar")
    (parts / "b.tar.part0003").unlink()
    shutil.copyfile(theirs / "c.tar.part0003", parts / "c.tar.part0003")
    e = _refusal(parts, policy)
    assert e.missing == ("b.tar.part0003",)
    assert f"c.tar.part0003 in {parts} belong to another export (not in the parts index b.tar.index.dsse.json)" in e.message
