"""README's "A first bundle" runs as written on a fresh clone.

The fenced commands are taken from README.md itself and run one by one in a
temporary folder that holds what a clone brings (``manifests/``, ``demo/``);
the only substitution is ``airpack`` → this virtualenv's entry point. So a
README edit that breaks the first thing a new user types fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENTRY = Path(sys.executable).parent / "airpack"


def first_bundle_commands() -> list[list[str]]:
    """The commands of the ``sh`` block under "## A first bundle", comments dropped."""
    text = (REPO / "README.md").read_text("utf-8")
    section = text.split("## A first bundle", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "README's first-bundle section has no ```sh block"
    return [argv for line in block.group(1).splitlines() if (argv := shlex.split(line, comments=True))]


def test_the_first_bundle_section_is_the_commands_a_user_types() -> None:
    cmds = first_bundle_commands()
    assert [c[:2] for c in cmds if c[0] == "airpack"] == [
        ["airpack", "keygen"], ["airpack", "trust"], ["airpack", "trust"], ["airpack", "pack"], ["airpack", "verify"]]
    assert all(c[0] in ("airpack", "python3") for c in cmds)


@pytest.mark.skipif(not ENTRY.exists() or shutil.which("python3") is None, reason="needs the venv's airpack and python3")
def test_readme_first_bundle_runs_as_written(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    clone.mkdir()
    for part in ("manifests", "demo"):
        shutil.copytree(REPO / part, clone / part, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRPACK_", "HF_"))}
    for argv in first_bundle_commands():
        run = [str(ENTRY), *argv[1:]] if argv[0] == "airpack" else argv
        r = subprocess.run(run, cwd=clone, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"$ {shlex.join(argv)}\n{r.stdout}{r.stderr}"
    r = subprocess.run([str(ENTRY), "verify", "bundle", "--trust", "trust.json", "--json"], cwd=clone, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["verified"] is True and "acme/example-tiny" in r.stdout
