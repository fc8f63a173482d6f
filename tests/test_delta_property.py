"""The property of delta bundles: whatever the host's profile claims, install gives the full bundle's snapshot or nothing.

A profile is information, never trust. For any subset of the update's files
that a profile claims the host holds (true claims and false ones), the delta
packed for it either installs exactly the snapshot the full bundle installs,
or is refused (exit 3) with the registry unchanged but for one audit line.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from conftest import KeyPair, write_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from registry_fixtures import audit_lines, do_install, registry_state, variant_model
from test_delta_flow import snapshot_files

from airpack.errors import HostFilesError
from airpack.ops.pack import PackOptions, pack
from airpack.ops.profile import ProfileOptions, collect
from airpack.spec import load_spec

_N = itertools.count()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(claims=st.sets(st.integers(min_value=0, max_value=63)))
def test_any_claimed_subset_installs_the_full_snapshot_or_nothing(
        tmp_path: Path, tiny_model: Path, make_bundle: Callable[..., Path], alice: KeyPair, policy: Path,
        claims: set[int]) -> None:
    base = tmp_path / "base"
    if not base.exists():  # built once per test: v1 installed, the full v2 installed beside it as the reference
        v1 = base / "v1"
        do_install(make_bundle(), v1, policy, ignore_fit=True)
        v2 = variant_model(tiny_model, base / "tiny-v2", extra={"tokenizer_config.json": json.dumps({"v": 2}).encode()})
        full = pack(PackOptions(spec=load_spec(write_spec(base / "full.toml", model_dir=v2, sequence=2)), out=base / "full",
                                signer=alice.signer))
        shutil.copytree(v1, base / "reference", symlinks=True)
        do_install(full.out, base / "reference", policy, ignore_fit=True)
        (base / "files.json").write_text(json.dumps([[f.sha256, f.size] for f in full.manifest.files]))
    files = [tuple(x) for x in json.loads((base / "files.json").read_text())]
    real = collect(ProfileOptions(registry=base / "v1"))
    claimed = sorted({files[i % len(files)] for i in claims})
    profile = dataclasses.replace(real, blobs=tuple((str(s), int(n)) for s, n in claimed))  # true and false claims alike
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    reg = work / "reg"
    shutil.copytree(base / "v1", reg, symlinks=True)
    spec = write_spec(work / "v2.toml", model_dir=base / "tiny-v2", sequence=2)
    delta = pack(PackOptions(spec=load_spec(spec), out=work / f"delta{next(_N)}", signer=alice.signer, profile=profile))
    held = set(real.blobs)
    relied = {(f.sha256, f.size) for f in delta.manifest.expected_on_host}
    before, lines = registry_state(reg), len(audit_lines(reg))
    if relied <= held:
        do_install(delta.out, reg, policy, ignore_fit=True)
        assert snapshot_files(reg, "acme/tiny") == snapshot_files(base / "reference", "acme/tiny")
    else:
        try:
            do_install(delta.out, reg, policy, ignore_fit=True)
        except HostFilesError as e:
            assert e.exit_code == 3
        else:
            raise AssertionError("a delta relying on files the host lacks was installed")
        assert registry_state(reg) == before and len(audit_lines(reg)) == lines + 1
    shutil.rmtree(work)
