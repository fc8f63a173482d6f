"""Property: change any byte of a signed bundle and verify refuses it (exit 3 or 4), never crashes.

The one allowed exception is DESIGN's: bytes of the envelope that change no
signed byte and no signature (a key id, whitespace) may verify; the test
checks that exactly that is what happened whenever a changed bundle passes.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, run_cli, write_spec
from factories import make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airpack.errors import AirpackError
from airpack.manifest import ENVELOPE_NAME
from airpack.ops.pack import PackOptions, pack
from airpack.ops.verify import VerifyOptions, verify_bundle
from airpack.signing import generate, load_public_file, load_signer, parse_envelope, write_keypair
from airpack.spec import load_spec
from airpack.trust import TrustPolicy, new_policy, save_policy


class Signed:
    """One packed, signed bundle and a policy that trusts its signer, shared by all examples."""

    def __init__(self, root: Path) -> None:
        keys = root / "keys"
        keys.mkdir()
        write_keypair(generate("ed25519"), keys / "alice.key", keys / "alice.pub")
        self.key = keys / "alice.key"
        self.policy_path = root / "policy.json"
        p: TrustPolicy = new_policy(1, source=str(self.policy_path))
        p = p.with_key("alice", load_public_file(keys / "alice.pub"), (keys / "alice.pub").read_text())
        save_policy(p, self.policy_path)
        self.policy = p
        model = make_model(root / "src" / "tiny", shards=2)
        spec = write_spec(root / "spec.toml", model_dir=model)
        self.bundle = root / "bundle"
        pack(PackOptions(spec=load_spec(spec), out=self.bundle, signer=load_signer(self.key)))
        self.files = sorted(p.relative_to(self.bundle).as_posix() for p in self.bundle.rglob("*") if p.is_file())
        self.envelope = parse_envelope((self.bundle / ENVELOPE_NAME).read_bytes(), where="original")


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signed]:
    yield Signed(tmp_path_factory.mktemp("signed"))


def mutate(data: bytes, op: str, pos: int, value: int) -> bytes:
    i = pos % max(len(data), 1)
    if op == "xor":
        return data[:i] + bytes([data[i] ^ value]) + data[i + 1:]
    if op == "delete":
        return data[:i] + data[i + 1:]
    if op == "insert":
        return data[:i] + bytes([value]) + data[i:]
    return data[:i]  # truncate


ops = st.sampled_from(["xor", "xor", "xor", "delete", "insert", "truncate"])


def check_one(signed: Signed, rel: str, op: str, pos: int, value: int) -> None:
    with tempfile.TemporaryDirectory(dir=signed.bundle.parent) as d:
        copy = Path(d) / "b"
        shutil.copytree(signed.bundle, copy)
        target = copy / rel
        original = target.read_bytes()
        changed = mutate(original, op, pos, value)
        if changed == original:
            return
        target.write_bytes(changed)
        try:
            verify_bundle(VerifyOptions(bundle=copy, policy=signed.policy))
        except AirpackError as e:
            if rel == ENVELOPE_NAME:
                assert e.exit_code == 4, f"{type(e).__name__} ({e.exit_code}): {e}"
            else:
                assert e.exit_code == 3, f"{type(e).__name__} ({e.exit_code}): {e}"
            return
        # It verified: only a change to no signed byte and no signature is allowed to.
        assert rel == ENVELOPE_NAME, f"a changed {rel} verified"
        env = parse_envelope(changed, where="changed")
        assert env.payload_type == signed.envelope.payload_type
        assert env.payload == signed.envelope.payload
        assert [s.sig for s in env.signatures] == [s.sig for s in signed.envelope.signatures]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), op=ops, pos=st.integers(min_value=0, max_value=2**32), value=st.integers(1, 255))
def test_any_changed_byte_is_refused(signed: Signed, data: st.DataObject, op: str, pos: int, value: int) -> None:
    rel = data.draw(st.sampled_from(signed.files), label="file")
    check_one(signed, rel, op, pos, value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=ops, pos=st.integers(min_value=0, max_value=2**32), value=st.integers(1, 255))
def test_any_changed_envelope_byte_is_refused_unless_nothing_signed_changed(
    signed: Signed, op: str, pos: int, value: int
) -> None:
    check_one(signed, ENVELOPE_NAME, op, pos, value)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), pos=st.integers(min_value=0, max_value=2**32), value=st.integers(1, 255))
def test_changed_bundle_through_the_cli_never_crashes(signed: Signed, data: st.DataObject, pos: int,
                                                      value: int) -> None:
    rel = data.draw(st.sampled_from(signed.files), label="file")
    with tempfile.TemporaryDirectory(dir=signed.bundle.parent) as d:
        copy = Path(d) / "b"
        shutil.copytree(signed.bundle, copy)
        target = copy / rel
        target.write_bytes(mutate(target.read_bytes(), "xor", pos, value))
        r = run_cli("verify", copy, "--trust", signed.policy_path, cwd=REPO)
        assert "Traceback" not in r.stderr
        assert r.returncode in (0, 3, 4)
        if r.returncode == 0:
            assert rel == ENVELOPE_NAME
        else:
            assert sum(line.startswith("error:") for line in r.stderr.splitlines()) == 1


def test_the_untouched_bundle_verifies(signed: Signed) -> None:
    """The baseline of the properties: without a change the bundle passes (so a refusal means something)."""
    vb = verify_bundle(VerifyOptions(bundle=signed.bundle, policy=signed.policy))
    assert vb.signer_names == ["alice"]
    assert {ENVELOPE_NAME, "manifest.json"} < set(signed.files)
    assert sum(f.endswith(".safetensors") for f in signed.files) == 2
