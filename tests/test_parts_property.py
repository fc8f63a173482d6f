"""With parity N, ANY N lost or damaged parts are rebuilt (hypothesis picks which, and how they are lost)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import write_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transfer_fixtures import export_to, flip_byte, small_model

from airpack.errors import PartsError
from airpack.ops.pack import PackOptions, pack
from airpack.ops.transfer import check_parts_folder, repair_parts
from airpack.ops.verify import VerifyOptions, verify_bundle
from airpack.parts import INDEX_SUFFIX
from airpack.signing import generate, load_public_file, load_signer, write_keypair
from airpack.spec import load_spec
from airpack.trust import TrustPolicy, new_policy

PARITY = 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrustPolicy, list[str]]:
    root = tmp_path_factory.mktemp("parity")
    write_keypair(generate(), root / "k.key", root / "k.pub")
    signer = load_signer(root / "k.key")
    policy = new_policy(1).with_key("packer", load_public_file(root / "k.pub"), (root / "k.pub").read_text())
    spec = write_spec(root / "spec.toml", model_dir=small_model(root / "m"))
    pack(PackOptions(spec=load_spec(spec), out=root / "b", signer=signer))
    export_to(root / "b", root / "parts" / "b.tar", policy, signer=signer, split=4096, parity=PARITY)
    part_names = sorted(p.name for p in (root / "parts").iterdir() if not p.name.endswith(INDEX_SUFFIX))
    return root / "parts", policy, part_names


def damage(folder: Path, name: str, how: str) -> None:
    p = folder / name
    if how == "delete":
        p.unlink()
    elif how == "flip":
        flip_byte(p)
    elif how == "truncate":
        p.write_bytes(p.read_bytes()[:100])
    else:  # a bad sector's worth of garbage
        data = bytearray(p.read_bytes())
        data[:512] = b"\xaa" * 512
        p.write_bytes(bytes(data))


HOW = st.sampled_from(["delete", "flip", "truncate", "sector"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_n_lost_parts_are_rebuilt_and_verify(exported: tuple[Path, TrustPolicy, list[str]], data: st.DataObject) -> None:
    src, policy, part_names = exported
    lost = data.draw(st.lists(st.sampled_from(part_names), min_size=1, max_size=PARITY, unique=True), label="lost")
    hows = data.draw(st.lists(HOW, min_size=len(lost), max_size=len(lost)), label="how")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(src, Path(tmp) / "parts"))
        originals = {n: (folder / n).read_bytes() for n in part_names}
        for n, how in zip(lost, hows, strict=True):
            damage(folder, n, how)
        result = repair_parts(folder, policy)
        assert sorted(result.repaired) == sorted(lost)
        assert {n: (folder / n).read_bytes() for n in part_names} == originals
        assert not check_parts_folder(folder, policy).report
        assert verify_bundle(VerifyOptions(bundle=folder, policy=policy)).manifest.name == "tiny"


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_more_lost_than_parity_is_refused_naming_each(exported: tuple[Path, TrustPolicy, list[str]], data: st.DataObject) -> None:
    src, policy, part_names = exported
    lost = data.draw(st.lists(st.sampled_from(part_names), min_size=PARITY + 1, max_size=PARITY + 3, unique=True))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(src, Path(tmp) / "parts"))
        for n in lost:
            damage(folder, n, "flip")
        with pytest.raises(PartsError) as e:
            repair_parts(folder, policy)
        assert sorted(n for n, _ in e.value.bad) == sorted(lost)
        assert all(n in e.value.message for n in lost)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 9), n=st.integers(1, 4), size=st.sampled_from([1, 4096, 65536, 65537, 200_000]),
       seed=st.integers(0, 2**32 - 1), data=st.data())
def test_stripe_coding_rebuilds_from_any_k_blocks(k: int, n: int, size: int, seed: int, data: st.DataObject) -> None:
    """Column-by-column coding (blocks over 64 KiB) gives the same stripes back from any k of the k+n blocks, in any order."""
    import random

    import zfec

    from airpack.parts import decode_stripe, encode_stripe

    rng = random.Random(seed)
    blocks = [rng.randbytes(size) for _ in range(k)]
    parity = encode_stripe(zfec.Encoder(k, k + n), blocks, tuple(range(k, k + n)), size)
    assert [len(p) for p in parity] == [size] * n
    everything = blocks + parity
    keep = data.draw(st.permutations(range(k + n)))[:k]
    got = decode_stripe(zfec.Decoder(k, k + n), [everything[i] for i in keep], tuple(keep), k, size)
    assert [bytes(x) for x in got] == blocks
