"""`make bench` keeps working: the verify benchmark runs end to end at a tiny size and cleans up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_bench_verify_runs_and_cleans_up(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_verify.py"), "--file-mib", "1", "--small", "2",
         "--large", "3", "--repeat", "1", "--workdir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert "verify / single-thread sha256 =" in r.stdout
    assert "Peak memory" in r.stdout
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert 2 * (1 << 20) < figures["hashed_bytes"] < 2 * (1 << 20) + 1024  # two 1 MiB shards and their headers
    assert figures["sha256_mbps"] > 0 and figures["verify_api_mbps"] > 0
    assert figures["rss_small"] > 0 and figures["rss_large"] > 0
    assert list(tmp_path.iterdir()) == []  # everything it wrote is gone
