"""Packing from the Hub: a file whose name passes but whose bytes are a pickle is caught once downloaded.

Names are judged before a byte is fetched (a `*.bin` is refused with no
download); bytes can only be judged once they are in the bundle, with the same
``content.check_file`` verify uses later.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import verify
from hub_helpers import Packer
from hubserver import HubServer

from airpack.errors import ContentPolicyError

pytest_plugins = ("hub_fixtures",)

PICKLE = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94."


def test_a_hub_file_with_pickle_bytes_is_refused_after_download_unless_allowed(
    packer: Packer, hub: HubServer, tiny_files: dict[str, bytes], policy: Path
) -> None:
    hub.commit("acme/tiny", {**tiny_files, "added_tokens.json": PICKLE})
    with pytest.raises(ContentPolicyError) as ei:
        packer.pack(packer.spec())
    e = ei.value
    assert e.exit_code == 3 and e.path == "added_tokens.json" and "pickle" in str(e)
    assert "allow_pickle" in e.hint
    r = packer.pack(packer.spec(extra="[policy]\nallow_pickle = true\n"))
    assert r.manifest is not None and r.manifest.models[0].pickles == ("added_tokens.json",)
    verify(r.out, policy)
