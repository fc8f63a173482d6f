"""`make bench` keeps working: the pack benchmark (pack vs aria2c, peak memory, SIGKILL and resume) runs end to end
at a few MiB, on 127.0.0.1 only, and cleans up. It checks the benchmark's plumbing, never a speed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c is not installed (make cdn-bin installs it)")
def test_bench_pack_quick_runs_and_cleans_up(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_pack.py"), "--quick", "--workdir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert "ratio pack / aria2" in r.stdout
    assert "peak RSS of pack" in r.stdout
    assert "resume after SIGKILL" in r.stdout or "nothing to resume" in r.stdout
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "pack" and figures["files"] == 8  # the 7 written and the .gitattributes every commit has
    assert figures["aria2_digests_match"] and figures["pack_digests_match"]
    assert figures["pack_mb_s"] > 0 and figures["aria2_mb_s"] > 0 and figures["pack_max_rss"] > 0
    if figures["resume_killed"]:  # a quick pack may finish before the kill point: then there is nothing to resume
        assert figures["resume_digests_match"]
    assert list(tmp_path.iterdir()) == []  # everything it wrote is gone
