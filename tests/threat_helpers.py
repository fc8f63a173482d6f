"""Helpers for the threat tests: craft, re-sign and tamper with real bundles.

Every crafted manifest is signed with airpack's own signing code, so a test
that expects a refusal proves the check after the signature, not the
signature itself.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import subprocess
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from airpack._json import dumps_canonical
from airpack.bundle import write_signed
from airpack.errors import AirpackError
from airpack.manifest import ENVELOPE_NAME, MANIFEST_NAME
from airpack.signing import PAYLOAD_TYPE, Signer, envelope_bytes

MODEL_DIR = "models/acme--tiny"
SHARD1 = f"{MODEL_DIR}/model-00001-of-00002.safetensors"
SHARD2 = f"{MODEL_DIR}/model-00002-of-00002.safetensors"
CONFIG_PATH = f"{MODEL_DIR}/config.json"


def statement(bundle: Path) -> dict[str, Any]:
    """The (unsigned) statement a bundle's manifest copy holds, as a dict to edit."""
    doc: dict[str, Any] = json.loads((bundle / MANIFEST_NAME).read_bytes())
    return doc


def envelope_doc(bundle: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((bundle / ENVELOPE_NAME).read_bytes())
    return doc


def write_envelope_doc(bundle: Path, doc: dict[str, Any]) -> None:
    (bundle / ENVELOPE_NAME).write_text(json.dumps(doc, indent=2))


def payload(bundle: Path) -> bytes:
    return base64.b64decode(envelope_doc(bundle)["payload"])


def resign(
    bundle: Path,
    content: dict[str, Any] | bytes,
    *signers: Signer,
    payload_type: str = PAYLOAD_TYPE,
) -> bytes:
    """Sign ``content`` (a statement or raw payload bytes) with ``signers``; write copy and envelope."""
    data = content if isinstance(content, bytes) else dumps_canonical(content)
    sigs = [s.sign(payload_type, data) for s in signers]
    write_signed(bundle, data, envelope_bytes(payload_type, data, sigs))
    return data


def add_file_to_statement(st: dict[str, Any], path: str, data: bytes) -> None:
    """List a new file (path, size, digest) in a statement, keeping both lists sorted."""
    import hashlib

    st["subject"].append({"name": path, "digest": {"sha256": hashlib.sha256(data).hexdigest()}})
    st["subject"].sort(key=lambda s: s["name"])
    st["predicate"]["files"].append({"path": path, "size": len(data)})
    st["predicate"]["files"].sort(key=lambda f: f["path"])


def rename_in_statement(st: dict[str, Any], old: str, new: str) -> None:
    for s in st["subject"]:
        if s["name"] == old:
            s["name"] = new
    for f in st["predicate"]["files"]:
        if f["path"] == old:
            f["path"] = new


def flip_byte(path: Path, offset: int = -1, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def refused(
    exc: type[AirpackError], fn: Callable[[], Any], *, code: int, match: str | None = None
) -> AirpackError:
    """Call ``fn``; it must raise ``exc`` (with that exit code); return the error for more checks."""
    with pytest.raises(exc, match=match) as info:
        fn()
    assert info.value.exit_code == code, f"{type(info.value).__name__} has exit code {info.value.exit_code}"
    return info.value


def assert_cli_error(
    r: subprocess.CompletedProcess[str], code: int, *fragments: str, error_type: str | None = None
) -> str:
    """A refusal seen from a script: the exit code, one ``error:`` line naming the cause, no traceback."""
    assert r.returncode == code, f"exit {r.returncode}, expected {code}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert "internal error" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for frag in fragments:
        assert frag in errors[0], f"{frag!r} not in {errors[0]!r}"
    return errors[0]


def assert_cli_json_error(
    r: subprocess.CompletedProcess[str], code: int, error_type: str | None = None, path_fragment: str | None = None
) -> dict[str, Any]:
    """``--json`` refusal: exactly one JSON document ``{"error": {exit_code, type, message, path}}``."""
    assert r.returncode == code, f"exit {r.returncode}, expected {code}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr
    doc = json.loads(r.stdout)
    err = doc["error"]
    assert set(err) >= {"exit_code", "type", "message", "path"}
    assert err["exit_code"] == code
    assert isinstance(err["message"], str) and "\n" not in err["message"]
    if error_type is not None:
        assert err["type"] == error_type, err
    if path_fragment is not None:
        assert err["path"] is not None and path_fragment in err["path"], err
    return dict(err)


def cli_inproc(*args: str | os.PathLike[str], env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``airpack`` command line in this process (no interpreter start-up), like ``run_cli``.

    The same ``main()`` a console script calls, with stdout/stderr captured,
    the airpack variables cleared (then ``env`` applied) and an optional cwd.
    """
    from airpack.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    saved_env = {k: os.environ.get(k) for k in ("AIRPACK_TRUST", "AIRPACK_REGISTRY", "AIRPACK_PASSPHRASE", *(env or {}))}
    saved_cwd = os.getcwd()
    code: int = 0
    try:
        for k in saved_env:
            os.environ.pop(k, None)
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # a traceback would have reached the user
                traceback.print_exc(file=err)
                code = 1
    finally:
        os.chdir(saved_cwd)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["airpack", *argv], code, out.getvalue(), err.getvalue())
