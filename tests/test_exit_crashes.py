"""No way out is exit 1: a closed pipe, an early Ctrl-C, names that are not UTF-8, the OS refusing a write or a name.

Each case used to end in a traceback or "internal error" (exit 1); each now has its own exit code
and at most one line: 141 for a reader that closed stdout (as git or coreutils killed by SIGPIPE),
130 for Ctrl-C at any moment, 8 for a permission or a full disk, 2 for a name over the OS limit,
and names that are not UTF-8 are written as ``\\xff`` in text, in ``--json`` and in the registry.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import AIRPACK, run_cli
from registry_fixtures import audit_lines
from threat_helpers import assert_cli_error, assert_cli_json_error, cli_inproc

from airpack._json import dumps_output, printable, scrub
from airpack.cli._common import describe
from airpack.errors import (
    AccessDeniedError,
    BrokenPipe,
    DiskSpaceError,
    InternalError,
    PathTooLongError,
    ResourceError,
    as_airpack_error,
    error_record,
)
from airpack.registry import STAGING_DIR

BAD_BYTE = os.fsdecode(b"\xff")  # a lone surrogate: how Python holds a name byte that is not UTF-8


def _closed_stdout(*args: str | os.PathLike[str], cwd: Path | None = None) -> tuple[int, str]:
    """Run airpack with its stdout pipe closed before it writes a byte (``airpack ... | head -0``)."""
    p = subprocess.Popen([*AIRPACK, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()
    err = p.stderr.read().decode()
    p.stderr.close()
    return p.wait(timeout=120), err


# -- a reader that went away (| head) ------------------------------------------------------------


@pytest.mark.parametrize("args", [["inspect", "{b}"], ["inspect", "{b}", "--json"], ["verify", "{b}", "--trust", "{p}"],
                                  ["--help"], ["verify", "--help"], ["trust", "--help"], ["--version"],
                                  ["inspect", "{b}/no-such", "--json"]])
def test_a_closed_stdout_exits_141_quietly(bundle: Path, policy: Path, args: list[str]) -> None:
    code, err = _closed_stdout(*(a.format(b=bundle, p=policy) for a in args))
    assert code == BrokenPipe.exit_code == 141
    assert err == "", err  # no traceback, no "internal error", no "Exception ignored"


def test_describe_maps_a_broken_pipe_to_141_with_nothing_printed() -> None:
    f = describe(BrokenPipeError(errno.EPIPE, "Broken pipe"))
    assert (f.exit_code, f.record, f.text) == (141, None, "")
    assert as_airpack_error(BrokenPipeError(errno.EPIPE, "Broken pipe")).exit_code == 141


# -- Ctrl-C at any moment ------------------------------------------------------------------------

_INTERRUPT_WHILE_IMPORTING = """
import os, signal, sys
class Hook:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode: inside this import
        return None
sys.meta_path.insert(0, Hook())
sys.argv = ["airpack", "verify", {bundle!r}, "--trust", {policy!r}]
from airpack.cli import main
main()
"""


def _sigint_default() -> None:
    """The child starts with SIGINT at its default, as from a terminal: a shell's background job inherits it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("module", ["click", "airpack.cli.core_cmds", "airpack.ops.verify"])
def test_ctrl_c_while_modules_are_still_importing_is_exit_130_with_one_line(bundle: Path, policy: Path, module: str) -> None:
    """The first tenth of a second is imports: a SIGINT there was a KeyboardInterrupt traceback."""
    code = textwrap.dedent(_INTERRUPT_WHILE_IMPORTING).format(module=module, bundle=str(bundle), policy=str(policy))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       start_new_session=True, preexec_fn=_sigint_default)
    assert r.returncode == 130, r.stderr
    assert r.stderr == "interrupted\n", r.stderr
    assert "Traceback" not in r.stderr


def test_importing_the_cli_leaves_ctrl_c_to_the_caller() -> None:
    """The start-up handler is only for the imports: afterwards SIGINT raises KeyboardInterrupt again."""
    code = ("import signal, airpack.cli; "
            "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, preexec_fn=_sigint_default)
    assert r.stdout.strip() == "True", r.stderr


# -- the OS refusing: one mapping of errno to a named error -----------------------------------------


@pytest.mark.parametrize(("exc", "code", "type_"), [
    (PermissionError(errno.EACCES, "Permission denied", "/media/out/x.tar"), 8, AccessDeniedError),
    (OSError(errno.EROFS, "Read-only file system", "/media/out/x.tar"), 8, AccessDeniedError),
    (OSError(errno.ENOSPC, "No space left on device"), 8, DiskSpaceError),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "q"), 8, DiskSpaceError),
    (OSError(errno.ENAMETOOLONG, "File name too long", "a" * 300), 2, PathTooLongError),
    (OSError(errno.EIO, "Input/output error", "disk"), 8, ResourceError),
])
def test_an_oserror_from_the_os_is_its_named_error_wherever_it_was_raised(exc: OSError, code: int, type_: type) -> None:
    err = as_airpack_error(exc)
    assert type(err) is type_ and err.exit_code == code
    rec = error_record(exc)
    assert rec["exit_code"] == code and rec["type"] == type_.__name__ and rec["hint"]
    if exc.filename:
        assert rec["path"] == exc.filename and exc.filename in rec["message"]


def test_an_oserror_without_errno_is_still_a_bug() -> None:
    assert isinstance(as_airpack_error(OSError("raised by code, not by the OS")), InternalError)


def _fail_writes(monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    import airpack.ops.export as export_mod

    def refuse(fd: int, data: object) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(export_mod, "write_all", refuse)


@pytest.mark.parametrize(("err", "code", "type_"), [(errno.ENOSPC, 8, "DiskSpaceError"), (errno.EACCES, 8, "AccessDeniedError")])
def test_export_tar_that_cannot_be_written_is_exit_8_named_and_leaves_nothing(
        tmp_path: Path, bundle: Path, policy: Path, monkeypatch: pytest.MonkeyPatch, err: int, code: int, type_: str) -> None:
    """The tar is written on a thread of its own; its write error used to surface as a bare OSError (exit 1)."""
    out = tmp_path / "media"
    out.mkdir()
    _fail_writes(monkeypatch, err)
    r = cli_inproc("export", bundle, "--tar", out / "x.tar", "--trust", policy, "--json")
    e = assert_cli_json_error(r, code, type_, "x.tar")
    assert "cannot write" in e["message"]
    assert list(out.iterdir()) == []


def test_paths_over_the_os_limit_are_exit_2_named(tmp_path: Path, bundle: Path, policy: Path) -> None:
    long = "a" * 300  # one name longer than any filesystem's 255
    spec = next(tmp_path.glob("spec*.toml"))
    for args in (["pack", spec, "--out", tmp_path / long, "--key", tmp_path / "keys" / "alice.key"],
                 ["verify", tmp_path / long, "--trust", policy],
                 ["export", bundle, "--tar", tmp_path / f"{long}.tar", "--trust", policy],
                 ["install", bundle, "--registry", tmp_path / long, "--trust", policy]):
        r = cli_inproc(*args)
        assert_cli_error(r, 2, "longer than the operating system allows")
        assert "Choose a shorter path" in r.stderr


# -- names that are not UTF-8 ---------------------------------------------------------------------


def test_printable_escapes_undecodable_bytes_and_leaves_text_alone() -> None:
    assert printable(f"bad{BAD_BYTE}/x") == "bad\\xff/x"
    assert printable("café ✓") == "café ✓"
    assert printable("\ud800") == "\\ud800"  # a surrogate that stands for no byte
    assert scrub({f"k{BAD_BYTE}": [f"v{BAD_BYTE}", 1, None]}) == {"k\\xff": ["v\\xff", 1, None]}
    doc = dumps_output({"path": f"bad{BAD_BYTE}"})
    doc.encode("utf-8")  # valid Unicode: no lone surrogate, not even as a \udcff escape
    assert "\\udcff" not in doc and json.loads(doc) == {"path": "bad\\xff"}


@pytest.fixture
def odd_bundle(tmp_path: Path, bundle: Path) -> Path:
    """The bundle again, in a folder whose name holds the byte 0xff (not UTF-8)."""
    import shutil

    odd = tmp_path / f"bundle{BAD_BYTE}"
    shutil.copytree(bundle, odd)
    return odd


def _utf8_json(stdout: bytes) -> object:
    return json.loads(stdout.decode("utf-8"))  # strict: a surrogate would not even encode


def test_verify_and_inspect_of_a_folder_not_named_in_utf8(odd_bundle: Path, policy: Path) -> None:
    for args in (["verify", odd_bundle, "--trust", policy, "--json"], ["inspect", odd_bundle, "--json"]):
        r = subprocess.run([*AIRPACK, *map(os.fsencode, args)], capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr
        _utf8_json(r.stdout)
        assert b"\\udcff" not in r.stdout
    r = subprocess.run([*AIRPACK, b"verify", os.fsencode(odd_bundle), b"--trust", os.fsencode(policy)], capture_output=True,
                       timeout=120)
    assert r.returncode == 0 and b"bundle\\xff verified" in r.stdout.splitlines()[0], r.stdout


def test_install_from_and_into_folders_not_named_in_utf8(tmp_path: Path, odd_bundle: Path, bundle: Path, policy: Path) -> None:
    """The install's audit line and database row hold the name escaped; nothing is left in staging."""
    reg = tmp_path / "reg"
    r = subprocess.run([*AIRPACK, b"install", os.fsencode(odd_bundle), b"--registry", os.fsencode(reg), b"--trust",
                        os.fsencode(policy), b"--json"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    _utf8_json(r.stdout)
    (line,) = audit_lines(reg)
    assert line["result"] == "installed" and line["source"].endswith("bundle\\xff")
    assert not any((reg / STAGING_DIR).iterdir()) if (reg / STAGING_DIR).exists() else True
    assert run_cli("log", "verify", "--registry", reg).returncode == 0

    odd_reg = tmp_path / f"reg{BAD_BYTE}"
    for args in (["install", bundle, "--registry", odd_reg, "--trust", policy, "--json"],
                 ["list", "--registry", odd_reg, "--json"], ["show", "acme/tiny", "--registry", odd_reg, "--json"],
                 ["log", "verify", "--registry", odd_reg, "--json"]):
        r = subprocess.run([*AIRPACK, *map(os.fsencode, args)], capture_output=True, timeout=120)
        assert r.returncode == 0, (args, r.stderr)
        if args[0] != "show":  # show's Python lines spell the path as Python does ("\udcff"), which is right there
            assert b"\\udcff" not in r.stdout
        _utf8_json(r.stdout)
    r = subprocess.run([*AIRPACK, b"list", b"--registry", os.fsencode(odd_reg)], capture_output=True, timeout=120)
    assert r.returncode == 0 and b"acme/tiny" in r.stdout


def test_a_split_export_refuses_a_tar_name_its_index_cannot_hold_before_writing(tmp_path: Path, bundle: Path,
                                                                                policy: Path) -> None:
    out = tmp_path / "media"
    out.mkdir()
    r = subprocess.run([*AIRPACK, b"export", os.fsencode(bundle), b"--tar", os.fsencode(out / f"x{BAD_BYTE}.tar"),
                        b"--split", b"64KiB", b"--key", os.fsencode(tmp_path / "keys" / "alice.key"), b"--trust",
                        os.fsencode(policy), b"--json"], capture_output=True, timeout=120)
    assert r.returncode == 2, r.stderr
    doc = _utf8_json(r.stdout)
    assert isinstance(doc, dict) and doc["error"]["type"] == "UsageError" and "split export" in doc["error"]["message"]
    assert list(out.iterdir()) == []


def test_error_text_with_an_undecodable_name_prints(tmp_path: Path, policy: Path) -> None:
    missing = tmp_path / f"gone{BAD_BYTE}"
    r = subprocess.run([*AIRPACK, b"verify", os.fsencode(missing), b"--trust", os.fsencode(policy)], capture_output=True,
                       timeout=120)
    assert r.returncode == 2 and b"gone\\xff" in r.stderr and b"Traceback" not in r.stderr
