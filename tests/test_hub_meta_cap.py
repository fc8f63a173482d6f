"""The Hub reader's size cap is the caller's: a file ``ops.fit`` accepts from a folder is accepted from the Hub too."""

from __future__ import annotations

import json

import pytest
from hub_helpers import TOKEN
from hubserver import HubServer

from airpack.errors import ModelConfigError
from airpack.fetch.hub_meta import open_reader
from airpack.ops.fit import MAX_CONFIG_BYTES

pytest_plugins = ("hub_fixtures",)


def test_read_caps_with_the_callers_limit_only(hub: HubServer, tiny_files: dict[str, bytes]) -> None:
    cfg = json.loads(tiny_files["config.json"])
    cfg["padding"] = "x" * (3 << 20 >> 1)  # 1.5 MiB: over the reader's old 1 MiB cap, under ops.fit's 16 MiB
    big_config = json.dumps(cfg).encode()
    assert len(big_config) < MAX_CONFIG_BYTES
    hub.commit("acme/tiny", {**tiny_files, "config.json": big_config})
    with open_reader("acme/tiny", "main", endpoint=hub.url, token=TOKEN) as reader:
        assert reader.read("config.json", MAX_CONFIG_BYTES) == big_config
        with pytest.raises(ModelConfigError, match="over the 1024-byte limit"):  # the caller's cap still holds
            reader.read("config.json", 1024)
