"""An envelope that cannot be read is a resource failure; one that is too large says so.

Permission denied or an I/O error while reading ``envelope.dsse.json`` is not
a trust verdict about the bundle: it is exit 8 (resources), naming the file.
An envelope over the size cap says it is too large, with its size and the
cap, names its path once, and gives a hint about the envelope rather than the
generic "check the signers". A missing envelope is unchanged (exit 4 today).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from threat_helpers import assert_cli_json_error, cli_inproc

import airpack.sources
from airpack import signing
from airpack.errors import EnvelopeError
from airpack.manifest import ENVELOPE_NAME


def _fail_envelope_read(monkeypatch: pytest.MonkeyPatch, exc: OSError) -> None:
    """Make reading the envelope fail as a medium would (root reads a chmod 000 file, so this is simulated)."""
    real = airpack.sources.read_capped

    def read(path: Path, cap: int, **kw: object) -> bytes:
        if Path(path).name == ENVELOPE_NAME:
            raise exc
        return real(path, cap, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(airpack.sources, "read_capped", read)


@pytest.mark.parametrize(("exc", "fragment", "error_type"), [
    (OSError(errno.EIO, "Input/output error"), "Input/output error", "ResourceError"),
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied", "AccessDeniedError"),
])
def test_unreadable_envelope_is_exit_8(bundle: Path, policy: Path, monkeypatch: pytest.MonkeyPatch, exc: OSError,
                                       fragment: str, error_type: str) -> None:
    _fail_envelope_read(monkeypatch, exc)
    r = cli_inproc("verify", bundle, "--trust", policy, "--json")
    err = assert_cli_json_error(r, 8, error_type, ENVELOPE_NAME)
    assert fragment in err["message"] and "envelope" in err["message"]
    assert "signed by keys" not in err.get("hint", "")


def test_unreadable_envelope_for_real(bundle: Path, policy: Path) -> None:
    """chmod 000, for a user who is not root (root reads it anyway)."""
    import os

    if os.geteuid() == 0:
        pytest.skip("root can read a file with mode 000")
    env = bundle / ENVELOPE_NAME
    env.chmod(0)
    try:
        r = cli_inproc("verify", bundle, "--trust", policy, "--json")
        assert_cli_json_error(r, 8, "AccessDeniedError", ENVELOPE_NAME)
    finally:
        env.chmod(0o644)


def test_missing_envelope_is_still_a_trust_refusal(bundle: Path, policy: Path) -> None:
    (bundle / ENVELOPE_NAME).unlink()
    r = cli_inproc("verify", bundle, "--trust", policy, "--json")
    assert json.loads(r.stdout)["error"]["exit_code"] in (2, 4)  # "not a bundle" (2) is another change's to make


def test_oversized_envelope_says_too_large_with_size_and_cap(bundle: Path, policy: Path) -> None:
    env = bundle / ENVELOPE_NAME
    with open(env, "r+b") as f:
        f.truncate(signing.MAX_ENVELOPE_BYTES + 5)
    r = cli_inproc("verify", bundle, "--trust", policy, "--json")
    err = assert_cli_json_error(r, 4, "EnvelopeError", ENVELOPE_NAME)
    msg = err["message"]
    assert "too large" in msg
    assert f"{signing.MAX_ENVELOPE_BYTES + 5:,} bytes" in msg and f"{signing.MAX_ENVELOPE_BYTES:,}-byte limit" in msg
    assert msg.count(str(env)) == 1
    assert "signed by keys in this host's trust policy" not in err["hint"]


def test_oversized_envelope_in_a_tar_says_too_large(tmp_path: Path, bundle: Path, policy: Path) -> None:
    from airpack.sources import TarSource

    tar = tmp_path / "b.tar"
    assert cli_inproc("export", bundle, "--tar", tar, "--trust", policy).returncode == 0
    data = bytearray(tar.read_bytes())
    size = signing.MAX_ENVELOPE_BYTES + 1
    data[124:136] = f"{size:011o}\0".encode()  # the first member's size field...
    chk = sum(data[0:148]) + 8 * 32 + sum(data[156:512])  # ...and its header checksum
    data[148:156] = f"{chk:06o}\0 ".encode()
    tar.write_bytes(bytes(data))
    src = TarSource(tar)
    with pytest.raises(EnvelopeError) as info, src.session():
        src.envelope_bytes()
    assert "too large" in str(info.value) and f"{size:,} bytes" in str(info.value)
