"""Delta bundles with serving wheels: wheels the host's wheelhouse holds stay there, resolved for the host's Python.

Uses the offline find-links folder the wheels tests build (no index, no network).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import KeyPair, write_spec
from registry_fixtures import do_install, variant_model
from test_wheels import build_wheel, isolated_pip  # noqa: F401 - the autouse fixture keeps pip off any user config

from airpack.ops._pack_delta import for_host
from airpack.ops.pack import PackOptions, pack
from airpack.ops.profile import ProfileOptions, collect
from airpack.registry import WHEELS_DIR
from airpack.spec import load_spec


def _spec(tmp_path: Path, name: str, model: Path, links: Path, sequence: int) -> Path:
    return write_spec(tmp_path / f"{name}.toml", model_dir=model, sequence=sequence,
                      extra=f'\n[wheels]\nrequirements = ["alpha"]\nfind_links = ["{links}"]\nno_index = true\n')


def test_wheels_the_host_holds_are_not_carried_and_install_like_a_full_bundle(tmp_path: Path, tiny_model: Path,
                                                                             alice: KeyPair, policy: Path) -> None:
    links = tmp_path / "links"
    build_wheel(links, "alpha", "1.0", requires=("beta>=1.0",))
    build_wheel(links, "beta", "1.0")
    v1 = pack(PackOptions(spec=load_spec(_spec(tmp_path, "v1", tiny_model, links, 1)), out=tmp_path / "v1", signer=alice.signer))
    reg = tmp_path / "reg"
    do_install(v1.out, reg, policy, ignore_fit=True)
    reference = tmp_path / "reference"
    shutil.copytree(reg, reference, symlinks=True)
    profile = collect(ProfileOptions(registry=reg))
    assert {w.name for w in profile.wheels} == {"alpha", "beta"}

    spec = load_spec(_spec(tmp_path, "v2", variant_model(tiny_model, tmp_path / "v2m", extra={"extra.json": b"{}"}), links, 2))
    adjusted, _ = for_host(spec, profile, alice.signer.keyid)
    assert adjusted.wheels is not None and adjusted.wheels.python_version == profile.python.version
    assert adjusted.wheels.platforms == profile.python.platforms()[:1]

    delta = pack(PackOptions(spec=spec, out=tmp_path / "delta", signer=alice.signer, profile=profile))
    m = delta.manifest
    assert {w.path for w in m.wheels} <= m.on_host  # no wheel crosses again
    assert not any((delta.out / w.path).exists() for w in m.wheels)
    assert m.file("wheels/requirements.txt") in m.carried
    full = pack(PackOptions(spec=spec, out=tmp_path / "full", signer=alice.signer, profile=None))
    do_install(full.out, reference, policy, ignore_fit=True)
    do_install(delta.out, reg, policy, ignore_fit=True)
    for name in sorted(p.name for p in (reference / WHEELS_DIR).iterdir()):
        assert (reg / WHEELS_DIR / name).read_bytes() == (reference / WHEELS_DIR / name).read_bytes()
    assert sorted(p.name for p in (reg / WHEELS_DIR).iterdir()) == sorted(p.name for p in (reference / WHEELS_DIR).iterdir())
    assert json.loads((delta.out / "manifest.json").read_text())["predicate"]["on_host"]
