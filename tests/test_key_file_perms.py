"""Files that decide trust must not be writable by anyone but their owner.

Whoever can write the trust policy decides what the host trusts; whoever can
write (or replace) a private key signs in its owner's name. Both are refused
(exit 2) when group or others can write the file, or the folder holding it
(unless the folder has the sticky bit). A private key or passphrase file
others can only read is a warning on stderr; the command still works.

Only mode bits are checked, so these tests hold when run as root too.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KeyPair, write_spec
from threat_helpers import assert_cli_error, assert_cli_json_error, cli_inproc

from airpack.errors import KeyFileError, PolicyError
from airpack.signing import load_signer, passphrase_from
from airpack.trust import load_policy

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX mode bits")


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_policy_writable_by_others_is_refused(bundle: Path, policy: Path, mode: int) -> None:
    os.chmod(policy, mode)
    with pytest.raises(PolicyError, match="is writable by"):
        load_policy(policy)
    line = assert_cli_error(cli_inproc("verify", bundle, "--trust", policy), 2, "trust policy", "writable by")
    assert str(policy) in line
    r = cli_inproc("verify", bundle, "--trust", policy)
    assert "chmod go-w" in r.stderr


def test_every_policy_command_checks_the_mode(tmp_path: Path, policy: Path, bob: KeyPair) -> None:
    os.chmod(policy, 0o666)
    before = policy.read_bytes()
    for args in (("trust", "list", policy), ("trust", "add", policy, bob.pub, "--name", "bob"),
                 ("trust", "set-threshold", policy, "1"), ("trust", "remove", policy, "alice")):
        assert_cli_json_error(cli_inproc(*args, "--json"), 2, "PolicyError", str(policy))
    assert policy.read_bytes() == before


def test_policy_in_a_folder_others_can_write(tmp_path: Path, bundle: Path, make_policy: Callable[..., Path],
                                             alice: KeyPair) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    policy = make_policy(alice)
    moved = folder / "policy.json"
    policy.rename(moved)
    os.chmod(folder, 0o777)
    assert_cli_error(cli_inproc("verify", bundle, "--trust", moved), 2, "which group and others can write")
    os.chmod(folder, 0o777 | stat.S_ISVTX)  # like /tmp: nobody may replace a file they do not own
    assert cli_inproc("verify", bundle, "--trust", moved).returncode == 0
    os.chmod(folder, 0o755)


def test_safe_policy_modes_are_accepted(bundle: Path, policy: Path) -> None:
    for mode in (0o644, 0o600, 0o444, 0o640):
        os.chmod(policy, mode)
        assert cli_inproc("verify", bundle, "--trust", policy).returncode == 0


def test_trust_init_and_add_write_a_safe_policy(tmp_path: Path, alice: KeyPair) -> None:
    policy = tmp_path / "new-policy.json"
    assert cli_inproc("trust", "init", policy).returncode == 0
    assert cli_inproc("trust", "add", policy, alice.pub, "--name", "alice").returncode == 0
    assert policy.stat().st_mode & 0o022 == 0
    assert cli_inproc("trust", "list", policy).returncode == 0


# -- private keys and passphrases ----------------------------------------------------------------


def test_private_key_writable_by_others_is_refused(tmp_path: Path, bundle: Path, bob: KeyPair) -> None:
    os.chmod(bob.key, 0o620)
    with pytest.raises(KeyFileError, match=r"private key .* is writable by group"):
        load_signer(bob.key)
    before = (bundle / "envelope.dsse.json").read_bytes()
    r = cli_inproc("sign", bundle, "--key", bob.key, "--json")
    assert_cli_json_error(r, 2, "KeyFileError", str(bob.key))
    assert (bundle / "envelope.dsse.json").read_bytes() == before


def test_private_key_in_a_folder_others_can_write(tmp_path: Path, tiny_model: Path, bob: KeyPair) -> None:
    os.chmod(bob.key.parent, 0o757)
    try:
        spec = write_spec(tmp_path / "s.toml", model_dir=tiny_model)
        out = tmp_path / "never"
        assert_cli_error(cli_inproc("pack", spec, "--out", out, "--key", bob.key), 2, "which others can write")
        assert not out.exists()
    finally:
        os.chmod(bob.key.parent, 0o755)


def test_private_key_readable_by_others_warns_and_works(bundle: Path, policy: Path, bob: KeyPair) -> None:
    os.chmod(bob.key, 0o644)
    warnings: list[str] = []
    load_signer(bob.key, warn=warnings.append)
    assert len(warnings) == 1 and "readable by group and others" in warnings[0] and "chmod 600" in warnings[0]
    r = cli_inproc("sign", bundle, "--key", bob.key, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["added"] is True  # stdout stays one JSON document
    assert "warning: private key" in r.stderr and "readable by" in r.stderr
    r = cli_inproc("sign", bundle, "--key", bob.key, "-q")
    assert r.returncode == 0 and r.stderr == ""


def test_a_0600_key_gives_no_warning(bob: KeyPair) -> None:
    warnings: list[str] = []
    load_signer(bob.key, warn=warnings.append)
    assert warnings == []


def test_passphrase_file_readable_by_others_warns(tmp_path: Path, make_key: Callable[..., KeyPair]) -> None:
    carol = make_key("carol", passphrase=b"s3cret")
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    os.chmod(pw, 0o604)
    warnings: list[str] = []
    assert passphrase_from(pw, warn=warnings.append) == b"s3cret"
    assert len(warnings) == 1 and "passphrase file" in warnings[0] and "readable by others" in warnings[0]
    r = cli_inproc("keygen", "dave", "--dir", tmp_path / "k2", "--passphrase-file", pw)
    assert r.returncode == 0 and "warning: passphrase file" in r.stderr
    os.chmod(pw, 0o600)
    warnings.clear()
    passphrase_from(pw, warn=warnings.append)
    assert warnings == []
    load_signer(carol.key, passphrase=b"s3cret", warn=warnings.append)
    assert warnings == []
