"""`make bench` keeps working: the delta benchmark runs end to end at a tiny size, meets its goal and cleans up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_bench_delta_runs_and_cleans_up(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_delta.py"), "--files", "2", "--file-mib", "2", "--changed-mb", "1",
         "--repeat", "1", "--workdir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures["goal_met"] and figures["delta_bytes"] < figures["full_bytes"]
    assert figures["relied_bytes"] > 4 * (1 << 20)
    assert list(tmp_path.iterdir()) == []
