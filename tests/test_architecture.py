"""The layering of DESIGN.md, enforced: the offline side cannot import the network code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a test dependency (setup.cfg [test] extra)"
    r = subprocess.run([exe, "--config", str(REPO / "setup.cfg")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" in r.stdout and " 0 broken" in r.stdout


def test_offline_modules_do_not_load_network_libraries() -> None:
    """Importing the offline operations in a fresh interpreter loads no HTTP or Hub client."""
    code = (
        "import sys, airpack.ops.verify, airpack.cli; airpack.cli._load_commands();"
        "bad = [m for m in ('huggingface_hub', 'httpx', 'requests', 'airpack.fetch.hub') if m in sys.modules];"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"loaded at import: {r.stdout} {r.stderr}"
