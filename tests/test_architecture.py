"""The layering of DESIGN.md, enforced: the offline side cannot import the network code."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Iterable
from itertools import pairwise
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


_SQL_AT_START = re.compile(r"\s*(SELECT\b[\s\S]*\bFROM\b|INSERT\s+(OR\s+[A-Z]+\s+)?INTO\b|UPDATE\s+\w+\s+SET\b|DELETE\s+FROM\b)")
_DB_CALLS = ("conn.execute", "executemany", "executescript")


def sql_in_source(text: str) -> list[str]:
    """What in a module's source is SQL or runs it: database calls, and string constants that start with a statement."""
    found = [call for call in _DB_CALLS if call in text]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _SQL_AT_START.match(node.value):
            found.append(f"line {node.lineno}: {node.value.strip()[:60]!r}")
    return found


def test_sql_lives_only_in_the_registry_database() -> None:
    """No operation holds SQL or calls the connection itself: every query is a typed method of airpack.registry.database."""
    assert sql_in_source('rows = conn.execute("SELECT id FROM bundles WHERE name = ?", (n,))')  # the check itself works
    assert sql_in_source('q = f"DELETE FROM models WHERE id IN ({marks})"')
    assert not sql_in_source('"""Select which files from the bundle to read; update the plan, then set it."""')
    offenders = {
        str(p.relative_to(REPO)): hits
        for p in sorted((REPO / "airpack" / "ops").rglob("*.py"))
        if (hits := sql_in_source(p.read_text(encoding="utf-8")))
    }
    assert not offenders, f"SQL outside airpack/registry/database.py: {offenders}"


# -- no import cycles ------------------------------------------------------------------------


def airpack_modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (source file, is a package) of every module of airpack."""
    modules: dict[str, tuple[Path, bool]] = {}
    for path in sorted((REPO / "airpack").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def imported_modules(name: str, path: Path, is_package: bool, modules: Iterable[str]) -> dict[str, int]:
    """The airpack modules ``name`` imports (-> the first line that does), wherever the import statement sits:
    at module level, inside a function, under ``if TYPE_CHECKING``. ``from . import x`` names the module ``x``
    when there is one; the parent packages Python loads on the way are not counted."""
    known = set(modules)
    here = name.split(".") if is_package else name.split(".")[:-1]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = here[: len(here) - (node.level - 1)]
                base = ".".join([*package, *([node.module] if node.module else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            if t in known and t != name:
                found.setdefault(t, node.lineno)
    return found


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The shortest cycle through each module that is on one, each cycle once (whichever module it starts at)."""
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for start in sorted(graph):
        came_from: dict[str, str] = {}
        queue = deque([start])
        while queue and start not in came_from:
            here = queue.popleft()
            for nxt in sorted(graph[here]):
                if nxt not in came_from:
                    came_from[nxt] = here
                    queue.append(nxt)
        if start not in came_from:
            continue
        path = [start]
        while (prev := came_from[path[-1]]) != start:
            path.append(prev)
        cycle = [start, *reversed(path[1:]), start]
        if frozenset(cycle) not in seen:
            seen.add(frozenset(cycle))
            cycles.append(cycle)
    return cycles


def test_import_cycle_finder_works() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles_between_airpack_modules() -> None:
    """No airpack module imports one that imports it back, directly or through others, not even inside a function:
    a cycle hidden behind a function-level import still ties the two modules into one."""
    modules = airpack_modules()
    graph = {name: imported_modules(name, path, pkg, modules) for name, (path, pkg) in modules.items()}
    assert "airpack.manifest" in graph["airpack.ops.pack"] and "airpack.errors" in graph["airpack.manifest"]  # the parser sees imports
    cycles = import_cycles(graph)
    shown = [" -> ".join(f"{m}:{graph[m][n]}" for m, n in pairwise(c)) + f" -> {c[-1]}" for c in cycles]
    assert not cycles, "import cycles between airpack modules (each step: module:line of the import):\n  " + "\n  ".join(shown)
