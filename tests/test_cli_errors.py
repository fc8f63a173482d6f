"""Every refusal as a script sees it: exit code, one ``error:`` line, the ``--json`` error object.

Each case builds a real bad input, runs the real ``airpack`` command in a
subprocess, once as text and once with ``--json``, and checks: the exit code
from DESIGN.md, exactly one ``error:`` line on stderr naming the cause and the
file, a JSON error object ``{"error": {exit_code, type, message, path}}``,
and never a traceback. Failed packs must write nothing outside their output
folder.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import KeyPair, run_cli, write_spec
from threat_helpers import (
    CONFIG_PATH,
    SHARD1,
    assert_cli_error,
    assert_cli_json_error,
    cli_inproc,
    envelope_doc,
    rename_in_statement,
    resign,
    statement,
    write_envelope_doc,
)

from airpack import signing
from airpack.manifest import ENVELOPE_NAME, MANIFEST_NAME


@dataclass
class Ctx:
    tmp: Path
    bundle: Path
    policy: Path
    alice: KeyPair
    mallory: KeyPair
    model: Path
    make_bundle: Callable[..., Path]


@pytest.fixture
def ctx(tmp_path: Path, bundle: Path, policy: Path, alice: KeyPair, make_key: Callable[..., KeyPair],
        tiny_model: Path, make_bundle: Callable[..., Path]) -> Ctx:
    return Ctx(tmp_path, bundle, policy, alice, make_key("mallory"), tiny_model, make_bundle)


def verify_args(c: Ctx, bundle: Path | None = None) -> list[str | os.PathLike[str]]:
    return ["verify", bundle or c.bundle, "--trust", c.policy]


# -- verify and inspect ----------------------------------------------------------------------------
# Each setup returns the argv; the tuple is (setup, exit code, error type, fragment of the error line,
# fragment of the JSON path or None).

Setup = Callable[[Ctx], list[str | os.PathLike[str]]]


def untrusted(c: Ctx) -> list[str | os.PathLike[str]]:
    return verify_args(c, c.make_bundle(signer=c.mallory))


def wrong_payload_type(c: Ctx) -> list[str | os.PathLike[str]]:
    resign(c.bundle, statement(c.bundle), c.alice.signer, payload_type="text/plain")
    return verify_args(c)


def unknown_predicate(c: Ctx) -> list[str | os.PathLike[str]]:
    st = statement(c.bundle)
    st["predicateType"] = "https://example.com/other/v1"
    resign(c.bundle, st, c.alice.signer)
    return verify_args(c)


def missing_envelope(c: Ctx) -> list[str | os.PathLike[str]]:
    (c.bundle / ENVELOPE_NAME).unlink()
    return verify_args(c)


def oversized_envelope(c: Ctx) -> list[str | os.PathLike[str]]:
    with open(c.bundle / ENVELOPE_NAME, "r+b") as f:
        f.truncate(signing.MAX_ENVELOPE_BYTES + 10)
    return verify_args(c)


def nested_envelope(c: Ctx) -> list[str | os.PathLike[str]]:
    (c.bundle / ENVELOPE_NAME).write_text("[" * 1000 + "]" * 1000)
    return verify_args(c)


def bad_base64(c: Ctx) -> list[str | os.PathLike[str]]:
    env = envelope_doc(c.bundle)
    env["payload"] = env["payload"][:-3] + "*=="
    write_envelope_doc(c.bundle, env)
    return verify_args(c)


def expired(c: Ctx) -> list[str | os.PathLike[str]]:
    st = statement(c.bundle)
    st["predicate"]["bundle"]["expires"] = "2001-01-01T00:00:00Z"
    resign(c.bundle, st, c.alice.signer)
    return verify_args(c)


def copy_differs(c: Ctx) -> list[str | os.PathLike[str]]:
    (c.bundle / MANIFEST_NAME).write_text("{}")
    return verify_args(c)


def flipped_byte(c: Ctx) -> list[str | os.PathLike[str]]:
    p = c.bundle / SHARD1
    data = bytearray(p.read_bytes())
    data[-10] ^= 1
    p.write_bytes(bytes(data))
    return verify_args(c)


def missing_file(c: Ctx) -> list[str | os.PathLike[str]]:
    (c.bundle / CONFIG_PATH).unlink()
    return verify_args(c)


def extra_file(c: Ctx) -> list[str | os.PathLike[str]]:
    (c.bundle / "evil.py").write_text("import os\n")
    return verify_args(c)


def symlink(c: Ctx) -> list[str | os.PathLike[str]]:
    outside = c.tmp / "outside.json"
    shutil.copy(c.bundle / CONFIG_PATH, outside)
    (c.bundle / CONFIG_PATH).unlink()
    (c.bundle / CONFIG_PATH).symlink_to(outside)
    return verify_args(c)


def traversal(c: Ctx) -> list[str | os.PathLike[str]]:
    st = statement(c.bundle)
    rename_in_statement(st, CONFIG_PATH, "../../etc/passwd")
    resign(c.bundle, st, c.alice.signer)
    return verify_args(c)


def duplicate_payload_key(c: Ctx) -> list[str | os.PathLike[str]]:
    data = (c.bundle / MANIFEST_NAME).read_bytes().replace(b'"sequence": 1', b'"sequence": 1, "sequence": 2')
    resign(c.bundle, data, c.alice.signer)
    return verify_args(c)


def pickle_not_allowed(c: Ctx) -> list[str | os.PathLike[str]]:
    st = statement(c.bundle)
    rename_in_statement(st, CONFIG_PATH, "models/acme--tiny/pytorch_model.bin")
    os.replace(c.bundle / CONFIG_PATH, c.bundle / "models/acme--tiny/pytorch_model.bin")
    resign(c.bundle, st, c.alice.signer)
    return verify_args(c)


def bad_safetensors(c: Ctx) -> list[str | os.PathLike[str]]:
    import hashlib

    bad = struct.pack("<Q", 2) + b"{}" + b"junk"
    (c.bundle / SHARD1).write_bytes(bad)
    st = statement(c.bundle)
    for s in st["subject"]:
        if s["name"] == SHARD1:
            s["digest"]["sha256"] = hashlib.sha256(bad).hexdigest()
    for f in st["predicate"]["files"]:
        if f["path"] == SHARD1:
            f["size"] = len(bad)
    resign(c.bundle, st, c.alice.signer)
    return verify_args(c)


def no_such_bundle(c: Ctx) -> list[str | os.PathLike[str]]:
    return verify_args(c, c.tmp / "nowhere")


def policy_missing(c: Ctx) -> list[str | os.PathLike[str]]:
    return ["verify", c.bundle, "--trust", c.tmp / "nopolicy.json"]


def policy_threshold_too_high(c: Ctx) -> list[str | os.PathLike[str]]:
    doc = json.loads(c.policy.read_text())
    doc["threshold"] = 5
    c.policy.write_text(json.dumps(doc))
    return verify_args(c)


def inspect_without_envelope(c: Ctx) -> list[str | os.PathLike[str]]:
    (c.bundle / ENVELOPE_NAME).unlink()
    return ["inspect", c.bundle]


def inspect_bad_payload(c: Ctx) -> list[str | os.PathLike[str]]:
    env = envelope_doc(c.bundle)
    env["payload"] = base64.b64encode(b'{"_type": 1, "_type": 2}').decode()
    write_envelope_doc(c.bundle, env)
    return ["inspect", c.bundle]


def sign_tampered(c: Ctx) -> list[str | os.PathLike[str]]:
    (c.bundle / CONFIG_PATH).write_text("{}")
    return ["sign", c.bundle, "--key", c.mallory.key]


def sign_missing_bundle(c: Ctx) -> list[str | os.PathLike[str]]:
    return ["sign", c.tmp / "nothing", "--key", c.mallory.key]


VERIFY_CASES: list[tuple[Setup, int, str, str, str | None]] = [
    (untrusted, 4, "SignatureError", "no valid signature", ENVELOPE_NAME),
    (wrong_payload_type, 4, "EnvelopeError", "payload type", ENVELOPE_NAME),
    (unknown_predicate, 4, "EnvelopeError", "unknown predicate type", None),
    (missing_envelope, 4, "EnvelopeError", "no signature envelope", ENVELOPE_NAME),
    (oversized_envelope, 4, "EnvelopeError", "larger than", ENVELOPE_NAME),
    (nested_envelope, 4, "EnvelopeError", "nested deeper", ENVELOPE_NAME),
    (bad_base64, 4, "EnvelopeError", "not valid base64", ENVELOPE_NAME),
    (expired, 4, "ExpiredError", "expired at 2001-01-01", None),
    (copy_differs, 3, "IntegrityError", "differs from the signed payload", MANIFEST_NAME),
    (flipped_byte, 3, "BundleMismatchError", SHARD1, SHARD1),
    (missing_file, 3, "BundleMismatchError", "1 missing", CONFIG_PATH),
    (extra_file, 3, "BundleMismatchError", "evil.py", "evil.py"),
    (symlink, 3, "UnsafePathError", "symbolic link", CONFIG_PATH),
    (traversal, 3, "UnsafePathError", "../../etc/passwd", "../../etc/passwd"),
    (duplicate_payload_key, 3, "MalformedManifestError", "duplicate key 'sequence'", None),
    (pickle_not_allowed, 3, "ContentPolicyError", "pytorch_model.bin", "pytorch_model.bin"),
    (bad_safetensors, 3, "MalformedSafetensorsError", "trailing bytes", SHARD1),
    (no_such_bundle, 2, "UsageError", "does not exist", "nowhere"),
    (policy_missing, 2, "PolicyError", "not found", "nopolicy.json"),
    (policy_threshold_too_high, 2, "PolicyError", "needs 5 signer(s)", "policy.json"),
    (inspect_without_envelope, 4, "EnvelopeError", "no signature envelope", ENVELOPE_NAME),
    (inspect_bad_payload, 3, "MalformedManifestError", "duplicate key", None),
    (sign_tampered, 3, "BundleMismatchError", "config.json", CONFIG_PATH),
    (sign_missing_bundle, 2, "UsageError", "does not exist", "nothing"),
]


@pytest.mark.parametrize(("setup", "code", "etype", "fragment", "path"), VERIFY_CASES,
                         ids=[c[0].__name__ for c in VERIFY_CASES])
def test_refusal_through_the_cli(ctx: Ctx, setup: Setup, code: int, etype: str, fragment: str,
                                 path: str | None) -> None:
    argv = setup(ctx)
    r = run_cli(*argv)
    assert_cli_error(r, code, fragment)
    assert r.stdout == ""
    err = assert_cli_json_error(cli_inproc(*argv, "--json"), code, etype, path)
    assert fragment in err["message"]
    # -q keeps the error (a script still needs to know why) but nothing else on stdout.
    rq = cli_inproc(*argv, "-q")
    assert rq.returncode == code and rq.stdout == ""


@pytest.mark.parametrize("argv", [["verify"], ["verify", "b", "--bogus"], ["nosuchcommand"],
                                  ["keygen", "x", "--algorithm", "dsa"], ["trust", "init", "p", "--threshold", "x"]])
def test_usage_errors_exit_2(tmp_path: Path, argv: list[str]) -> None:
    r = run_cli(*argv, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    rj = cli_inproc(*argv, "--json", cwd=tmp_path)
    assert rj.returncode == 2 and "Traceback" not in rj.stderr
    if argv[0] != "nosuchcommand":
        err = json.loads(rj.stdout)["error"]
        assert err["exit_code"] == 2 and err["type"] == "UsageError"


# -- pack: refusals and nothing written outside the output folder -----------------------------------------


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in root.rglob("*"):
        if p == skip or skip in p.parents:
            continue
        st = p.lstat()
        out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def spec_with(c: Ctx, body: str = "", *, model: Path | None = None, bundle: str = "") -> Path:
    spec = c.tmp / "spec.toml"
    write_spec(spec, model_dir=model or c.model, extra=body)
    if bundle:
        text = spec.read_text().replace("sequence = 1\n", f"sequence = 1\n{bundle}\n", 1)
        spec.write_text(text)
    return spec


def source_copy(c: Ctx, name: str) -> Path:
    src = c.tmp / "src" / name
    shutil.copytree(c.model, src)
    return src


PackSetup = Callable[[Ctx, Path], list[str | os.PathLike[str]]]


def pack_pickle(c: Ctx, out: Path) -> list[str | os.PathLike[str]]:
    src = source_copy(c, "pk")
    (src / "optimizer.pkl").write_bytes(b"\x80\x04.")
    return ["pack", spec_with(c, model=src), "--out", out, "--key", c.alice.key]


def pack_code(c: Ctx, out: Path) -> list[str | os.PathLike[str]]:
    src = source_copy(c, "code")
    (src / "modeling_evil.py").write_text("import os\n")
    return ["pack", spec_with(c, model=src), "--out", out, "--key", c.alice.key]


def pack_bad_safetensors(c: Ctx, out: Path) -> list[str | os.PathLike[str]]:
    src = source_copy(c, "bad")
    (src / "model-00001-of-00002.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    return ["pack", spec_with(c, model=src), "--out", out, "--key", c.alice.key]


def pack_collision(c: Ctx, out: Path) -> list[str | os.PathLike[str]]:
    src = source_copy(c, "case")
    (src / "CONFIG.json").write_text("{}")
    return ["pack", spec_with(c, model=src), "--out", out, "--key", c.alice.key]


def pack_expired(c: Ctx, out: Path) -> list[str | os.PathLike[str]]:
    return ["pack", spec_with(c, bundle="expires = 2001-01-01T00:00:00Z"), "--out", out, "--key", c.alice.key]


def pack_wrong_passphrase(c: Ctx, out: Path) -> list[str | os.PathLike[str]]:
    pw = c.tmp / "pw"
    pw.write_text("right\n")
    assert cli_inproc("keygen", "enc", "--dir", c.tmp / "k2", "--passphrase-file", pw).returncode == 0
    wrong = c.tmp / "wrong"
    wrong.write_text("wrong\n")
    return ["pack", spec_with(c), "--out", out, "--key", c.tmp / "k2" / "enc.key", "--passphrase-file", wrong]


def pack_no_key(c: Ctx, out: Path) -> list[str | os.PathLike[str]]:
    return ["pack", spec_with(c), "--out", out]


def pack_missing_key(c: Ctx, out: Path) -> list[str | os.PathLike[str]]:
    return ["pack", spec_with(c), "--out", out, "--key", c.tmp / "none.key"]


def pack_spec_missing(c: Ctx, out: Path) -> list[str | os.PathLike[str]]:
    return ["pack", c.tmp / "nospec.toml", "--out", out, "--key", c.alice.key]


def pack_spec_bad_toml(c: Ctx, out: Path) -> list[str | os.PathLike[str]]:
    (c.tmp / "bad.toml").write_text("[bundle\nname=")
    return ["pack", c.tmp / "bad.toml", "--out", out, "--key", c.alice.key]


def pack_spec_unknown_key(c: Ctx, out: Path) -> list[str | os.PathLike[str]]:
    return ["pack", spec_with(c, 'revison = "main"\n'), "--out", out, "--key", c.alice.key]


def pack_source_missing(c: Ctx, out: Path) -> list[str | os.PathLike[str]]:
    return ["pack", spec_with(c, model=c.tmp / "src" / "gone"), "--out", out, "--key", c.alice.key]


def pack_into_a_bundle(c: Ctx, out: Path) -> list[str | os.PathLike[str]]:
    shutil.copytree(c.bundle, out)
    return ["pack", spec_with(c), "--out", out, "--key", c.alice.key]


def pack_into_a_non_empty_folder(c: Ctx, out: Path) -> list[str | os.PathLike[str]]:
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    return ["pack", spec_with(c), "--out", out, "--key", c.alice.key]


def pack_token_file_not_utf8(c: Ctx, out: Path) -> list[str | os.PathLike[str]]:
    """pack reads --token-file as fit does (``_common.hub_token``): bytes that are not UTF-8 are exit 2, not a traceback."""
    token = c.tmp / "token"
    token.write_bytes(b"\xff\xfehf_secret\n")
    return ["pack", spec_with(c), "--out", out, "--key", c.alice.key, "--token-file", token]


PACK_CASES: list[tuple[PackSetup, int, str, str]] = [
    (pack_pickle, 3, "ContentPolicyError", "optimizer.pkl"),
    (pack_code, 3, "ContentPolicyError", "modeling_evil.py"),
    (pack_bad_safetensors, 3, "MalformedSafetensorsError", "model-00001-of-00002.safetensors"),
    (pack_collision, 3, "UnsafePathError", "CONFIG.json"),
    (pack_expired, 4, "ExpiredError", "already past"),
    (pack_wrong_passphrase, 2, "KeyFileError", "wrong passphrase"),
    (pack_no_key, 2, "UsageError", "--key"),
    (pack_missing_key, 2, "KeyFileError", "none.key"),
    (pack_spec_missing, 2, "SpecError", "nospec.toml"),
    (pack_spec_bad_toml, 2, "SpecError", "not valid TOML"),
    (pack_spec_unknown_key, 2, "SpecError", "revison"),
    (pack_source_missing, 2, "SpecError", "gone"),
    (pack_into_a_bundle, 2, "UsageError", "already holds a signed bundle"),
    (pack_into_a_non_empty_folder, 2, "UsageError", "not empty"),
    (pack_token_file_not_utf8, 2, "UsageError", "not UTF-8"),
]


@pytest.mark.parametrize(("setup", "code", "etype", "fragment"), PACK_CASES, ids=[c[0].__name__ for c in PACK_CASES])
def test_failed_pack_writes_nothing_outside_its_output_folder(ctx: Ctx, setup: PackSetup, code: int, etype: str,
                                                               fragment: str) -> None:
    out = ctx.tmp / "out"
    argv = setup(ctx, out)
    cwd = ctx.tmp / "cwd"
    cwd.mkdir()
    before = snapshot(ctx.tmp, out)
    out_before = snapshot(out, out / "-") if out.exists() else None
    r = run_cli(*argv, cwd=cwd)
    assert_cli_error(r, code, fragment)
    assert snapshot(ctx.tmp, out) == before, "a failed pack wrote outside its output folder"
    if out_before is not None:
        assert snapshot(out, out / "-") == out_before, "a refused pack changed a folder it did not own"
    elif out.exists():
        assert not (out / ENVELOPE_NAME).exists()  # an unfinished pack is never signed
        shutil.rmtree(out)
    err = assert_cli_json_error(cli_inproc(*argv, "--json", cwd=cwd), code, etype)
    assert fragment in err["message"] or fragment in (err["path"] or "")
    assert snapshot(ctx.tmp, out) == before
