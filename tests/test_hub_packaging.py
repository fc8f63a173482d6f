"""The huggingface_hub range setup.cfg declares is the one the code needs, and only public names are used.

The code needs 2.x names (``httpx2`` as the client, ``HfFileMetadata.xet_file_data``,
``get_hf_file_metadata(retry_on_errors=...)``), checked against huggingface_hub 2.0.0
when the range was set; this test keeps the installed version inside it and the
source free of private imports (the old engine called the private ``http_get``).
"""

from __future__ import annotations

import configparser
import re
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _requirements() -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    reqs = [Requirement(line) for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def test_installed_huggingface_hub_and_httpx2_are_inside_the_declared_range() -> None:
    reqs = _requirements()
    hub = reqs["huggingface-hub"]
    assert hub.specifier.contains(version("huggingface_hub")) and not hub.specifier.contains("1.9.0")
    assert not hub.specifier.contains("3.0.0")  # a major version the code was never checked against
    assert reqs["httpx2"].specifier.contains(version("httpx2"))


def test_fetch_uses_no_private_huggingface_hub_name() -> None:
    private = re.compile(r"(from\s+huggingface_hub(\.\w+)*\s+import\s+[^\n]*\b(_[A-Za-z]\w*|http_get)\b)"
                         r"|(from\s+huggingface_hub(\.\w+)*\._\w+)|(huggingface_hub\.file_download)|(\bhttp_get\b)")
    for py in (ROOT / "airpack").rglob("*.py"):
        text = py.read_text()
        assert not private.search(text), f"{py.relative_to(ROOT)} imports a private huggingface_hub name"
