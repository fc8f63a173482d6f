"""`pack --for PROFILE --dry-run` of a Hub model: what a delta will carry is known before anything is downloaded.

The Hub lists each LFS file's SHA-256 (its oid), so the dry run can tell which
weights the host already holds without fetching a byte; a plain git file
(the Hub lists only its git SHA-1) is known only once fetched and is listed apart.
"""

from __future__ import annotations

from pathlib import Path

from hub_helpers import Packer
from hubserver import HubServer
from registry_fixtures import do_install

from airpack.ops.profile import ProfileOptions, collect

pytest_plugins = ("hub_fixtures",)


def test_dry_run_for_a_host_sorts_hub_lfs_files_by_the_hubs_own_sha256(
        hub: HubServer, packer: Packer, tiny_files: dict[str, bytes], tmp_path: Path, policy: Path) -> None:
    hub.commit("acme/tiny", tiny_files)
    full = packer.pack(packer.spec(sequence=1))
    reg = tmp_path / "reg"
    do_install(full.out, reg, policy, ignore_fit=True)
    hub.commit("acme/tiny", {"tokenizer_config.json": '{"chat_template": "v2"}'})
    before = len(hub.downloads())

    r = packer.pack(packer.spec(sequence=2), dry_run=True, profile=collect(ProfileOptions(registry=reg)))

    assert r.delta is not None
    weights = sorted(p for p in tiny_files if p.endswith(".safetensors"))
    assert weights and all(f"models/acme--tiny/{w}" in r.delta["on_host"]["paths"] for w in weights)  # held: by the Hub's sha256
    assert not any(p.endswith(".safetensors") for p in r.delta["carried"]["paths"])
    assert "models/acme--tiny/tokenizer_config.json" in r.delta["not_known_until_fetched"]["paths"]  # plain git file
    assert len(hub.downloads()) == before  # the dry run fetched no file's bytes

