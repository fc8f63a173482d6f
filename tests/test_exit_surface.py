"""One exit surface: any exception maps to one exit code, one --json error object and one text, in one place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from conftest import REPO

from airpack.cli._common import describe
from airpack.errors import (
    AirpackError,
    BundleMismatchError,
    FileMismatch,
    FitError,
    InternalError,
    Interrupted,
    MismatchReport,
    NotInstalledError,
    SignatureError,
    UsageError,
    as_airpack_error,
    error_record,
)


@pytest.mark.parametrize(
    ("exc", "code", "type_"),
    [
        (UsageError("bad flag"), 2, "UsageError"),
        (SignatureError("nobody trusted signed"), 4, "SignatureError"),
        (FitError("too big"), 5, "FitError"),
        (NotInstalledError("no such model", path="acme/x"), 6, "NotInstalledError"),
        (RuntimeError("boom"), 1, "InternalError"),
        (KeyError("k"), 1, "InternalError"),
        (KeyboardInterrupt(), 130, "Interrupted"),
    ],
)
def test_error_record_and_exit_code(exc: BaseException, code: int, type_: str) -> None:
    rec = error_record(exc)
    assert as_airpack_error(exc).exit_code == code and rec["exit_code"] == code and rec["type"] == type_
    assert {"exit_code", "type", "message", "path"} <= set(rec)
    json.dumps(rec)  # JSON by construction


def test_a_bug_keeps_its_class_name_in_the_message() -> None:
    rec = error_record(ValueError("odd"))
    assert rec == {"exit_code": 1, "type": "InternalError", "message": "internal error: ValueError('odd')", "path": None}


def test_hint_and_extras_are_part_of_the_record() -> None:
    rep = MismatchReport(changed=(FileMismatch(path="a", reason="sha256 differs", expected_sha256="0" * 64, actual_sha256="1" * 64),))
    rec = error_record(BundleMismatchError(rep))
    assert rec["hint"] and rec["path"] == "a" and rec["mismatch"]["changed"][0]["path"] == "a"


def test_describe_maps_click_errors_to_usage_errors() -> None:
    @click.command()
    @click.option("--n", type=int, required=True)
    def cmd(n: int) -> None:  # pragma: no cover - never runs
        pass

    with pytest.raises(click.UsageError) as info:
        cmd.main(["--n", "x"], standalone_mode=False)
    f = describe(info.value)
    assert f.exit_code == 2
    assert f.record == {"exit_code": 2, "type": "UsageError", "message": info.value.format_message(), "path": None}
    assert "Error: Invalid value for '--n'" in f.text and f.text.startswith("Usage:")


def test_describe_text_of_airpack_errors_and_bugs() -> None:
    f = describe(UsageError("bad", path="p", hint="do this"))
    assert (f.exit_code, f.text) == (2, "error: bad\nhint: do this")
    try:
        raise RuntimeError("boom")
    except RuntimeError as e:
        f = describe(e, verbose=1)
    assert f.exit_code == 1 and f.record is not None and f.record["type"] == "InternalError"
    assert f.text.startswith("internal error (a bug in airpack, please report it): RuntimeError('boom')")
    assert "Traceback (most recent call last)" in f.text
    assert "Traceback" not in describe(RuntimeError("boom")).text


def test_describe_interrupts_and_exits() -> None:
    assert describe(KeyboardInterrupt()).exit_code == 130
    assert describe(click.exceptions.Abort()).exit_code == 130
    f = describe(click.exceptions.Exit(0))
    assert (f.exit_code, f.record, f.text) == (0, None, "")


def test_internal_and_interrupted_are_airpack_errors() -> None:
    assert issubclass(InternalError, AirpackError) and InternalError.exit_code == 1
    assert issubclass(Interrupted, AirpackError) and Interrupted.exit_code == 130


def test_the_audit_log_record_is_the_same_mapping() -> None:
    """The registry writes the CLI's type, exit code, message and path (a bug is an InternalError there too)."""
    from airpack import registry

    assert registry.error_record(RuntimeError("x")) == {"type": "InternalError", "exit_code": 1, "message": "internal error: RuntimeError('x')",
                                                        "path": None}
    assert registry.error_record(NotInstalledError("gone", path="acme/x")) == {
        "type": "NotInstalledError", "exit_code": 6, "message": "gone", "path": "acme/x"}


def test_no_default_str_in_json_dumps() -> None:
    """Results are JSON by construction: no json.dumps(..., default=str) in the CLI."""
    for p in sorted((REPO / "airpack" / "cli").glob("*.py")):
        assert "default=str" not in p.read_text(), p


def test_a_bug_inside_a_command_is_exit_1_with_the_json_error(tmp_path: Path) -> None:
    """A command that hits a bug still leaves one JSON document and exit 1 (here: a helper patched to raise)."""
    code = (
        "import sys\n"
        "import airpack.cli.core_cmds as c\n"
        "def boom(*a, **k):\n"
        "    raise RuntimeError('boom')\n"
        "c.__dict__['_policy_json'] = boom\n"
        "from airpack.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    r = subprocess.run([sys.executable, "-c", code, "trust", "init", str(tmp_path / "p.json"), "--json"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 1, r.stderr
    err = json.loads(r.stdout)["error"]
    assert err == {"exit_code": 1, "type": "InternalError", "message": "internal error: RuntimeError('boom')", "path": None}
    r = subprocess.run([sys.executable, "-c", code, "trust", "init", str(tmp_path / "q.json")],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == "internal error (a bug in airpack, please report it): RuntimeError('boom')"
