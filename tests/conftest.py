"""Shared fixtures: keys, trust policies, tiny models, specs and packed bundles.

Every test works in its own tmp_path; nothing reaches the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from factories import make_model
from report_helpers import browser  # noqa: F401 - headless Chromium for the report tests (tests/report_helpers.py)
from softhsm import softhsm  # noqa: F401 - the throwaway SoftHSM2 token fixture (tests/softhsm.py)

from airpack.ops.pack import PackOptions, pack
from airpack.ops.verify import VerifiedBundle, VerifyOptions, verify_bundle
from airpack.signing import (
    Signer,
    generate,
    load_public_file,
    load_signer,
    write_keypair,
)
from airpack.spec import load_spec
from airpack.trust import TrustPolicy, load_policy, new_policy, save_policy

REPO = Path(__file__).resolve().parent.parent
AIRPACK = [sys.executable, "-m", "airpack"]


@dataclass
class KeyPair:
    name: str
    key: Path
    pub: Path
    signer: Signer


@pytest.fixture
def make_key(tmp_path: Path) -> Callable[..., KeyPair]:
    def _make(name: str, algorithm: str = "ed25519", passphrase: bytes | None = None) -> KeyPair:
        d = tmp_path / "keys"
        d.mkdir(exist_ok=True)
        key, pub = d / f"{name}.key", d / f"{name}.pub"
        write_keypair(generate(algorithm), key, pub, passphrase=passphrase)
        return KeyPair(name=name, key=key, pub=pub, signer=load_signer(key, passphrase=passphrase))

    return _make


@pytest.fixture
def alice(make_key: Callable[..., KeyPair]) -> KeyPair:
    return make_key("alice")


@pytest.fixture
def bob(make_key: Callable[..., KeyPair]) -> KeyPair:
    return make_key("bob")


@pytest.fixture
def make_policy(tmp_path: Path) -> Callable[..., Path]:
    def _make(*keys: KeyPair, threshold: int = 1, name: str = "policy.json") -> Path:
        path = tmp_path / name
        p: TrustPolicy = new_policy(threshold, source=str(path))
        for k in keys:
            p = p.with_key(k.name, load_public_file(k.pub), k.pub.read_text())
        save_policy(p, path)
        return path

    return _make


@pytest.fixture
def policy(make_policy: Callable[..., Path], alice: KeyPair) -> Path:
    return make_policy(alice)


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return make_model(tmp_path / "src" / "tiny", shards=2)


def write_spec(path: Path, *, model_dir: Path, name: str = "tiny", channel: str = "tiny", sequence: int = 1,
               repo_id: str = "acme/tiny", extra: str = "") -> Path:
    rel = os.path.relpath(model_dir, path.parent)
    path.write_text(
        f'[bundle]\nname = "{name}"\nchannel = "{channel}"\nsequence = {sequence}\n\n'
        f'[[models]]\nrepo_id = "{repo_id}"\npath = "{rel}"\nlicense = "apache-2.0"\n{extra}'
    )
    return path


@pytest.fixture
def make_bundle(tmp_path: Path, tiny_model: Path, alice: KeyPair) -> Callable[..., Path]:
    """Pack the tiny model (or another folder) into a fresh bundle; returns the bundle folder."""
    counter = {"n": 0}

    def _make(*, signer: KeyPair | None = None, model_dir: Path | None = None, sequence: int = 1,
              name: str = "tiny", channel: str = "tiny", repo_id: str = "acme/tiny", extra: str = "",
              **opts: Any) -> Path:
        counter["n"] += 1
        n = counter["n"]
        spec = write_spec(tmp_path / f"spec{n}.toml", model_dir=model_dir or tiny_model, name=name, channel=channel,
                          sequence=sequence, repo_id=repo_id, extra=extra)
        out = tmp_path / f"bundle{n}"
        pack(PackOptions(spec=load_spec(spec), out=out, signer=(signer or alice).signer, **opts))
        return out

    return _make


@pytest.fixture
def bundle(make_bundle: Callable[..., Path]) -> Path:
    return make_bundle()


def verify(bundle: Path, policy_path: Path, **kw: Any) -> VerifiedBundle:
    return verify_bundle(VerifyOptions(bundle=bundle, policy=load_policy(policy_path), **kw))


def run_cli(*args: str | os.PathLike[str], env: dict[str, str] | None = None, input: str | None = None,
            cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real ``airpack`` command line in a subprocess."""
    e = dict(os.environ)
    e.pop("AIRPACK_TRUST", None)
    e.pop("AIRPACK_REGISTRY", None)
    e.pop("AIRPACK_PASSPHRASE", None)
    e.update(env or {})
    return subprocess.run([*AIRPACK, *map(str, args)], capture_output=True, text=True, env=e, input=input,
                          cwd=cwd, timeout=timeout)
