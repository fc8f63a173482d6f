"""Fixtures for the Hub tests: a Hub-compatible server on 127.0.0.1, tiny repos, an in-process packer.

Test modules load them with ``pytest_plugins = ("hub_fixtures",)`` and take
helpers from hub_helpers.py. Nothing here reaches the network: the real
huggingface_hub client talks to the server in tests/hubserver.py over a real
socket. ``nginx_hub`` sends LFS redirects to a real nginx (tests/nginx_cdn.py) and
skips where nginx is not installed (``make cdn-bin`` installs it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hub_helpers import HF_VARS, TOKEN, Packer
from hubserver import HubServer, tiny_model_files
from nginx_cdn import NginxCDN


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer(token=TOKEN) as server:
        yield server


@pytest.fixture
def nginx_hub() -> Iterator[HubServer]:
    """The test Hub with its LFS redirects going to a real nginx (skips where nginx is not installed)."""
    NginxCDN.skip_unless_available()
    with HubServer(token=TOKEN, cdn="nginx") as server:
        yield server


@pytest.fixture
def nginx_or_none() -> Iterator[HubServer | None]:
    """The nginx-backed Hub where nginx is installed, else None (for tests that run on both CDNs)."""
    if not NginxCDN.available():
        yield None
        return
    with HubServer(token=TOKEN, cdn="nginx") as server:
        yield server


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A tiny two-shard Llama model as {path: bytes} (generated once per session)."""
    return tiny_model_files(tmp_path_factory.mktemp("tiny") / "m", shards=2, seed=0)


@pytest.fixture(scope="session")
def tiny_files_v2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The same model with other weights (a later commit)."""
    return tiny_model_files(tmp_path_factory.mktemp("tiny2") / "m", shards=2, seed=1)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The process environment without any Hub variable (for in-process packs and CLI runs alike)."""
    for v in HF_VARS:
        monkeypatch.delenv(v, raising=False)
    return {k: v for k, v in os.environ.items() if k not in HF_VARS}


@pytest.fixture
def packer(hub: HubServer, tmp_path: Path, alice: Any, clean_env: dict[str, str]) -> Packer:
    return Packer(hub=hub, tmp=tmp_path, signer=alice.signer)
