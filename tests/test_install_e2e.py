"""End to end on the isolated host: install, then load with the real offline clients (no network at all).

Each load runs in a fresh interpreter so ``HF_HUB_OFFLINE`` is read at import,
as it is for an operator. ``HF_ENDPOINT`` points at a closed local port, so any
attempt to reach a hub fails at once instead of passing by accident.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import KeyPair, run_cli
from registry_fixtures import add_file_entry, do_install, resign, variant_model

from airpack.manifest import FileEntry


def _offline_env(reg: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AIRPACK_", "TRANSFORMERS_"))}
    env.update({"HF_HUB_CACHE": str(reg / "hub"), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(reg.parent / "hf-home")})
    return env


def _py(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)


def test_huggingface_hub_loads_offline(make_bundle: Callable[..., Path], tiny_model: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    v2 = variant_model(tiny_model, tmp_path / "v2", extra={"sub/notes.json": b'{"n": 1}'})
    c1 = do_install(make_bundle(sequence=1), reg, policy).models[0]["commit"]
    c2 = do_install(make_bundle(sequence=2, model_dir=v2), reg, policy).models[0]["commit"]
    code = f"""
import json, os
from huggingface_hub import snapshot_download, hf_hub_download
hub = os.environ["HF_HUB_CACHE"]
out = {{
    "main": snapshot_download("acme/tiny", revision="main"),
    "default": snapshot_download("acme/tiny"),
    "by_commit": snapshot_download("acme/tiny", revision="{c1}", cache_dir=hub),
    "file": hf_hub_download("acme/tiny", "config.json"),
    "nested": hf_hub_download("acme/tiny", "sub/notes.json", revision="main"),
    "old_file": hf_hub_download("acme/tiny", "config.json", revision="{c1}", cache_dir=hub),
}}
print(json.dumps(out))
"""
    r = _py(code, _offline_env(reg))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    snaps = reg.resolve() / "hub" / "models--acme--tiny" / "snapshots"
    assert out["main"] == out["default"] == str(snaps / c2)
    assert out["by_commit"] == str(snaps / c1)
    assert Path(out["file"]).read_bytes() == (tiny_model / "config.json").read_bytes()
    assert Path(out["nested"]).read_bytes() == b'{"n": 1}'
    for f in v2.rglob("*"):
        if f.is_file():
            assert (Path(out["main"]) / f.relative_to(v2)).read_bytes() == f.read_bytes()
    # After a rollback the name loads the older revision.
    assert run_cli("rollback", "acme/tiny", "--registry", reg).returncode == 0
    r = _py("from huggingface_hub import snapshot_download; print(snapshot_download('acme/tiny'))", _offline_env(reg))
    assert r.returncode == 0 and r.stdout.strip() == str(snaps / c1), r.stderr


def test_show_lines_run_as_printed(bundle: Path, policy: Path, tmp_path: Path) -> None:
    """The first lines `airpack show` prints (up to transformers) work in a bare interpreter."""
    reg = tmp_path / "registry"
    do_install(bundle, reg, policy)
    doc = json.loads(run_cli("show", "acme/tiny", "--registry", reg, "--json").stdout)
    lines = [line for line in doc["load"]["python"] if "transformers" not in line and "tokenizer" not in line and "model =" not in line]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AIRPACK_"))}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    r = _py("\n".join([*lines, "print(path)"]), env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == Path(doc["snapshot"])


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None,
    reason="transformers and torch are not installed (pip install -e '.[e2e]' to run the forward pass)",
)
def test_transformers_loads_and_runs_a_forward_pass(bundle: Path, policy: Path, tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    do_install(bundle, reg, policy)
    code = """
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("acme/tiny", local_files_only=True)
model = AutoModelForCausalLM.from_pretrained("acme/tiny", local_files_only=True).float().eval()
ids = tok("w1 w2 w3", return_tensors="pt").input_ids
with torch.no_grad():
    out = model(ids)
assert out.logits.shape == (1, ids.shape[1], model.config.vocab_size), out.logits.shape
assert torch.isfinite(out.logits).all()
print("ok", tuple(out.logits.shape))
"""
    env = _offline_env(reg)
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = _py(code, env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")


# -- wheels -----------------------------------------------------------------------------------------


def _wheel(name: str, version: str) -> tuple[str, bytes]:
    """A minimal valid pure-Python wheel, built with zipfile."""
    dist = f"{name}-{version}.dist-info"
    files: dict[str, bytes] = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n".encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: airpack-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }

    def rec(path: str, data: bytes) -> str:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{path},sha256={digest},{len(data)}"

    record = "\n".join([*(rec(p, d) for p, d in files.items()), f"{dist}/RECORD,,"]) + "\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for p, d in files.items():
            z.writestr(p, d)
        z.writestr(f"{dist}/RECORD", record)
    return f"{name}-{version}-py3-none-any.whl", buf.getvalue()


def _add_wheel(bundle: Path, signer: KeyPair, name: str, version: str) -> FileEntry:
    filename, data = _wheel(name, version)
    entry = add_file_entry(bundle, f"wheels/{filename}", data)

    def mutate(pred: dict[str, Any], files: list[FileEntry]) -> list[FileEntry]:
        pred["wheels"] = [*pred.get("wheels", []), {"name": name, "version": version, "filename": filename, "path": entry.path,
                                                    "sha256": entry.sha256, "size": entry.size}]
        return [*files, entry]

    resign(bundle, signer, mutate)
    return entry


def test_wheels_install_offline_into_a_fresh_venv(bundle: Path, policy: Path, alice: KeyPair, tmp_path: Path) -> None:
    entry = _add_wheel(bundle, alice, "airpack_demo_pkg", "0.1.0")
    reg = tmp_path / "registry"
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    req = Path(doc["requirements"])
    assert req == reg.resolve() / "wheels" / "tiny.txt"
    assert f"--hash=sha256:{entry.sha256}" in req.read_text()
    assert (reg / "wheels" / entry.path.split("/")[-1]).read_bytes() == (bundle / entry.path).read_bytes()
    show = json.loads(run_cli("show", "acme/tiny", "--registry", reg, "--json").stdout)
    assert show["load"]["pip"].endswith(f"-r {req}")

    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-index", "--find-links", str(reg / "wheels"),
           "--require-hashes", "-r", str(req)]
    r2 = subprocess.run(pip, capture_output=True, text=True, env=env, timeout=120)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    r3 = subprocess.run([str(py), "-c", "import airpack_demo_pkg as m; print(m.VERSION)"], capture_output=True, text=True, timeout=60)
    assert r3.stdout.strip() == "0.1.0", r3.stderr
    # Removing the bundle takes its wheels and requirements with it.
    assert run_cli("remove", "tiny", "--registry", reg).returncode == 0
    assert sorted(p.name for p in (reg / "wheels").iterdir()) == []


def test_tampered_wheel_is_refused(bundle: Path, policy: Path, alice: KeyPair, tmp_path: Path) -> None:
    entry = _add_wheel(bundle, alice, "airpack_demo_pkg", "0.1.0")
    whl = bundle / entry.path
    data = bytearray(whl.read_bytes())
    data[10] ^= 0xFF
    whl.write_bytes(bytes(data))
    reg = tmp_path / "registry"
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy, "--json")
    assert r.returncode == 3
    assert not any((reg / "wheels").glob("*"))  # a refused first install creates no wheels/ at all
