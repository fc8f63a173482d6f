"""remove and rollback: honest counts, one current row, and --dry-run (issue item 14).

``remove`` counted a blob as freed although its bytes lived on as a hard link
in another model's ``blobs/``; ``list`` showed one commit installed by three
sequences as three current rows; ``remove`` and ``rollback`` had no way to
say what they would do without doing it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from conftest import run_cli
from registry_fixtures import audit_lines, do_install, registry_state, variant_model

from airpack.manifest import parse
from airpack.ops.manage import RemoveOptions, list_installed, remove


def _commit(bundle: Path) -> str:
    return parse((bundle / "manifest.json").read_bytes()).models[0].commit


def test_remove_does_not_count_bytes_that_live_on_as_hard_links(make_bundle: Callable[..., Path], policy: Path,
                                                                 tmp_path: Path) -> None:
    reg = tmp_path / "r"
    do_install(make_bundle(), reg, policy)
    do_install(make_bundle(name="twin", channel="twin", repo_id="acme/twin"), reg, policy)  # the same bytes: hard links
    blob = next((reg / "hub" / "models--acme--twin" / "blobs").iterdir())
    assert blob.stat().st_nlink == 2
    r = remove(RemoveOptions(registry=reg, name="acme/twin"))
    assert (r.blobs_removed, r.bytes_freed) == (0, 0)
    assert r.blobs_kept_shared == len(list((reg / "hub" / "models--acme--tiny" / "blobs").iterdir()))
    # The last name of those bytes does free them.
    r = remove(RemoveOptions(registry=reg, name="acme/tiny"))
    assert r.blobs_removed > 0 and r.bytes_freed > 0 and r.blobs_kept_shared == 0


def test_one_commit_from_three_sequences_is_one_current_row(make_bundle: Callable[..., Path], policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "r"
    for seq in (1, 2, 3):
        do_install(make_bundle(sequence=seq), reg, policy)
    rows = list_installed(reg).models
    assert len({x.commit for x in rows}) == 1
    assert [(x.sequence, x.status) for x in rows] == [(1, "superseded"), (2, "superseded"), (3, "current")]
    assert [x.current for x in rows] == [False, False, True]
    text = run_cli("list", "--registry", reg).stdout.splitlines()
    assert sum(1 for line in text if line.startswith("*")) == 1
    assert sum(1 for line in text if line.startswith("=")) == 2


def _two_revisions(make_bundle: Callable[..., Path], tiny_model: Path, policy: Path, tmp_path: Path) -> tuple[Path, str, str]:
    reg = tmp_path / "r"
    b1 = make_bundle(sequence=1)
    do_install(b1, reg, policy)
    b2 = make_bundle(sequence=2, model_dir=variant_model(tiny_model, tmp_path / "v2", extra={"extra.json": b"{}\n"}))
    do_install(b2, reg, policy)
    return reg, _commit(b1), _commit(b2)


def test_remove_dry_run_changes_nothing_and_says_what_remove_would_do(make_bundle: Callable[..., Path], tiny_model: Path,
                                                                       policy: Path, tmp_path: Path) -> None:
    reg, c1, _ = _two_revisions(make_bundle, tiny_model, policy, tmp_path)
    before, log_before = registry_state(reg), audit_lines(reg)
    r = run_cli("remove", "acme/tiny", "--revision", c1, "--registry", reg, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    planned = json.loads(r.stdout)
    assert planned["dry_run"] is True and planned["txn"] is None
    assert [x["commit"] for x in planned["removed"]] == [c1]
    assert registry_state(reg) == before and audit_lines(reg) == log_before
    text = run_cli("remove", "acme/tiny", "--revision", c1, "--registry", reg, "--dry-run")
    assert "would remove" in text.stdout and "dry run" in text.stdout
    assert registry_state(reg) == before
    done = json.loads(run_cli("remove", "acme/tiny", "--revision", c1, "--registry", reg, "--json").stdout)
    assert done["dry_run"] is False
    assert {k: done[k] for k in ("removed", "blobs_removed", "blobs_kept_shared", "bytes_freed")} == \
        {k: planned[k] for k in ("removed", "blobs_removed", "blobs_kept_shared", "bytes_freed")}


def test_rollback_dry_run_changes_nothing_and_says_where_the_name_would_point(make_bundle: Callable[..., Path],
                                                                               tiny_model: Path, policy: Path,
                                                                               tmp_path: Path) -> None:
    reg, c1, c2 = _two_revisions(make_bundle, tiny_model, policy, tmp_path)
    before, log_before = registry_state(reg), audit_lines(reg)
    r = run_cli("rollback", "acme/tiny", "--registry", reg, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["dry_run"] is True and [(c["from"], c["to"]) for c in doc["changes"]] == [(c2, c1)]
    assert registry_state(reg) == before and audit_lines(reg) == log_before
    assert (reg / "hub" / "models--acme--tiny" / "refs" / "main").read_text() == c2
