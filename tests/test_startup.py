"""Start-up: ``airpack --help`` and each command import only what they need (no timing here: see benchmarks/bench_startup.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from conftest import REPO, KeyPair

HEAVY = ("huggingface_hub", "requests", "oras", "tqdm", "numpy", "cyclonedx", "httpx", "httpx2", "urllib3")
NOT_FOR_VERIFY = (*HEAVY, "airpack.fetch", "airpack.ops.pack", "airpack.ops.fit", "airpack.ops.install", "airpack.vram",
                  "airpack.spec", "airpack.sbom", "sqlite3")


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter, as the console script would start."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


_MAIN_THEN_MODULES = (
    "import contextlib, io, json, sys\n"
    "from airpack.cli import main\n"
    "out = io.StringIO()\n"
    "try:\n"
    "    with contextlib.redirect_stdout(out):\n"
    "        main(sys.argv[1:])\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    "print(json.dumps({'code': code, 'stdout': out.getvalue(), 'modules': sorted(sys.modules)}))\n"
)


@dataclass
class Run:
    code: int
    stdout: str
    modules: set[str]


def _main(*args: str) -> Run:
    """``airpack ARGS`` through ``airpack.cli.main`` in a fresh interpreter: exit code, stdout, every module it imported."""
    r = _run(_MAIN_THEN_MODULES, *args)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    return Run(doc["code"], doc["stdout"], set(doc["modules"]))


def test_help_lists_every_command_and_imports_none_of_them() -> None:
    from airpack.cli import COMMANDS

    d = _main("--help")
    assert d.code == 0
    modules = d.modules
    loaded = sorted(m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY)
    assert not loaded, f"airpack --help imported {loaded}"
    assert not [m for m in modules if m.startswith(("airpack.ops", "airpack.fetch", "airpack.cli."))], sorted(modules)
    text = d.stdout
    listed = [line.split()[0] for line in text.split("Commands:", 1)[1].splitlines() if line.strip()]
    assert listed == sorted(COMMANDS)


def test_verify_imports_only_the_verify_code(bundle: Path, policy: Path, alice: KeyPair) -> None:
    d = _main("verify", str(bundle), "--trust", str(policy), "--json")
    assert d.code == 0, d.stdout
    assert json.loads(d.stdout)["verified"] is True
    loaded = sorted(m for m in d.modules if any(m == x or m.startswith(x + ".") for x in NOT_FOR_VERIFY))
    assert not loaded, f"airpack verify imported {loaded}"


def test_the_command_table_matches_the_commands() -> None:
    """COMMANDS (what --help shows without importing) names each command's module and its own short help."""
    import airpack.cli as cli_pkg

    cli_pkg._load_commands()
    assert set(cli_pkg.cli.commands) == set(cli_pkg.COMMANDS)
    for name, cmd in cli_pkg.cli.commands.items():
        entry = cli_pkg.COMMANDS[name]
        module = cmd.callback.__module__ if cmd.callback is not None else ""
        assert module == f"airpack.cli.{entry.module}", (name, module)
        first = " ".join((cmd.help or "").partition("\n\n")[0].split())
        assert entry.help == first, f"{name}: COMMANDS says {entry.help!r}, the command says {first!r}"


def test_lazy_help_is_what_click_prints_with_every_command_loaded() -> None:
    lazy = _run("from airpack.cli import main; main(['--help'])")
    eager = _run("import airpack.cli as c; c._load_commands(); c.main(['--help'])")
    assert lazy.returncode == eager.returncode == 0
    assert lazy.stdout == eager.stdout and "Commands:" in lazy.stdout


@pytest.mark.parametrize("group", ["trust", "log"])
def test_sub_groups_still_list_their_commands(group: str) -> None:
    r = _run("from airpack.cli import main; import sys; main(sys.argv[1:])", group, "--help")
    assert r.returncode == 0, r.stderr
    assert {"trust": "init", "log": "verify"}[group] in r.stdout


def test_unknown_command_is_a_usage_error() -> None:
    r = _run("from airpack.cli import main; import sys; main(sys.argv[1:])", "frobnicate")
    assert r.returncode == 2 and "No such command 'frobnicate'" in r.stderr


def test_bench_startup_runs_and_cleans_up(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_startup.py"), "--repeat", "1", "--workdir", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr + r.stdout
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures["python_s"] > 0 and figures["help_s"] > 0 and figures["verify_s"] > 0
    assert "airpack verify (tiny bundle)" in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_the_lazy_group_is_a_click_group() -> None:
    """The lazy group is a plain click.Group: tools that walk the command tree still can."""
    import airpack.cli as cli_pkg

    assert isinstance(cli_pkg.cli, click.Group)
    ctx = click.Context(cli_pkg.cli)
    assert cli_pkg.cli.get_command(ctx, "verify") is not None
    assert cli_pkg.cli.get_command(ctx, "nope") is None
