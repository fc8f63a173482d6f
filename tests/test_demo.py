"""`make demo` is the first thing a new user runs: it must keep working end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_demo_runs_the_whole_round_trip(tmp_path: Path) -> None:
    env = {**os.environ, "AIRPACK_DEMO_OUT": str(tmp_path / "demo-out")}
    env.pop("AIRPACK_TRUST", None)
    env.pop("AIRPACK_REGISTRY", None)
    r = subprocess.run([sys.executable, str(REPO / "demo" / "demo.py")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    out = r.stdout
    for expected in ("OK: bundle verified", "refused with exit code 3", "refused with exit code 5",
                     "rebuilt 1 part(s)", "installed tiny-llama", "chain intact", "DELTA", "v2 loaded offline: {{ messages }} (v2)",
                     "demo finished"):
        assert expected in out, f"missing {expected!r} in the demo's output"
    for report in ("report.html", "registry-report.html"):
        assert f"wrote {report}" in out and (tmp_path / "demo-out" / report).is_file()
    snapshot = next((tmp_path / "demo-out" / "registry" / "hub" / "models--demo--tiny-llama" / "snapshots").iterdir())
    assert (snapshot / "config.json").is_file()
