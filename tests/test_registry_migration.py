"""A registry written by the previous airpack (schema 1) is carried forward, never refused and never emptied.

Schema 2 added what authorised each install and the digest of its kept
envelope. An old registry is migrated in one SQLite transaction (columns
added, every row kept) the first time any command opens it, reader or
writer; a schema newer than this airpack knows is refused (exit 6).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from registry_fixtures import do_install
from threat_helpers import cli_inproc

from airpack.errors import RegistryError
from airpack.ops.manage import list_installed
from airpack.registry import SCHEMA_VERSION

NEW_COLUMNS = ("policy_sha256", "policy_threshold", "policy_keyids", "envelope_sha256")


def _make_v1(reg: Path) -> None:
    """Turn a registry into exactly what schema 1 wrote: the new columns gone, the version 1."""
    conn = sqlite3.connect(reg / "registry.db")
    for col in NEW_COLUMNS:
        conn.execute(f"ALTER TABLE bundles DROP COLUMN {col}")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    conn.commit()
    conn.close()


def _schema(reg: Path) -> tuple[str, list[str]]:
    conn = sqlite3.connect(reg / "registry.db")
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
    cols = [r[1] for r in conn.execute("PRAGMA table_info(bundles)")]
    conn.close()
    return str(version), cols


@pytest.fixture
def old_registry(bundle: Path, policy: Path, tmp_path: Path) -> Path:
    reg = tmp_path / "registry"
    do_install(bundle, reg, policy)
    _make_v1(reg)
    assert _schema(reg)[0] == "1"
    return reg


def test_a_reader_migrates_an_old_registry_and_keeps_every_row(old_registry: Path) -> None:
    [x] = list_installed(old_registry).models
    assert x.repo_id == "acme/tiny" and x.policy is None
    version, cols = _schema(old_registry)
    assert version == str(SCHEMA_VERSION) and set(NEW_COLUMNS) <= set(cols)


def test_a_writer_migrates_and_records_from_then_on(old_registry: Path, make_bundle: Callable[..., Path], policy: Path) -> None:
    do_install(make_bundle(sequence=2, extra='\n[policy]\nallow_pickle = false\n'), old_registry, policy)
    rows = list_installed(old_registry).models
    assert [x.sequence for x in rows] == [1, 2]
    assert rows[0].policy is None and rows[1].policy is not None


def test_check_on_a_migrated_registry_notes_the_missing_envelope(old_registry: Path, policy: Path) -> None:
    r = cli_inproc("check", "--registry", old_registry, "--trust", policy, "--json")
    assert r.returncode == 0, r.stdout
    doc = json.loads(r.stdout)
    assert doc["trust"]["not_kept"] == ["tiny"] and doc["audit"]["ok"] is True


def test_a_newer_schema_is_refused_clearly(bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    do_install(bundle, reg, policy)
    conn = sqlite3.connect(reg / "registry.db")
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    conn.commit()
    conn.close()
    with pytest.raises(RegistryError, match="schema 99"):
        list_installed(reg)
    r = cli_inproc("check", "--registry", reg, "--json")
    assert r.returncode == 6 and json.loads(r.stdout)["error"]["type"] == "RegistryError"
