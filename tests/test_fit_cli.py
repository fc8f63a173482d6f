"""``airpack fit`` and install's fit gate, through the real command line.

The tiny model needs about 740 MiB with transformers (almost all of it the
CUDA context and libraries), so a ``1GiB`` GPU fits it and ``700MiB`` does not.
No GPU is used: GPUs are given as sizes, and NVML is replaced by a stub that
reports no driver wherever a test relies on there being none.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import KeyPair, run_cli

NO_NVML = """
class NVMLError(Exception):
    value = 12
NVML_ERROR_LIBRARY_NOT_FOUND = 12
def nvmlInit():
    raise NVMLError()
"""


@pytest.fixture
def no_gpu_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import pynvml`` finds a library that reports no driver."""
    d = tmp_path / "stub"
    d.mkdir()
    (d / "pynvml.py").write_text(NO_NVML)
    return {"PYTHONPATH": str(d)}


def test_text_table_for_a_model_folder(tiny_model: Path) -> None:
    r = run_cli("fit", tiny_model, "--gpu", "1GiB", "--runtime", "transformers", "--context", "1024")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for row in ("weights", "KV cache", "activations", "overhead", "total", "free memory", "verdict", "longest context"):
        assert f"\n  {row}" in out, row
    assert "fits" in out and "2,048 tokens (the model's maximum)" in out
    assert "GQA 4/2 heads" in out


def test_json_report(tiny_model: Path) -> None:
    r = run_cli("fit", tiny_model, "--gpu", "1GiB:1", "--runtime", "transformers", "--context", "1024", "--batch", "2",
                "--new-tokens", "24", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["verdict"] == "fits"
    b = d["breakdown"]
    assert set(b) == {"weights", "kv_cache", "activations", "overhead"}
    assert sum(b.values()) == d["per_gpu_bytes"]
    assert d["gpu"] == {"name": "1GiB GPU", "count": 1, "memory_bytes": 1 << 30, "source": "size"}
    assert d["max_context"] == 2048
    # tiny: 2 layers x K,V x 2 KV heads x 16 dims x 2 bytes (fp16) = 256 bytes per token; 2 x 1024 tokens
    assert b["kv_cache"] == 2 * 1024 * 256
    assert (d["prompt_tokens"], d["new_tokens"]) == (1000, 24)


def test_does_not_fit_exits_5_with_the_report_and_the_error(tiny_model: Path) -> None:
    r = run_cli("fit", tiny_model, "--gpu", "700MiB", "--runtime", "transformers", "--json")
    assert r.returncode == 5
    d = json.loads(r.stdout)
    assert d["verdict"] == "does_not_fit" and d["max_context"] == 0
    assert d["error"]["exit_code"] == 5 and d["error"]["type"] == "FitError"
    assert "does not fit 1 x 700MiB GPU" in d["error"]["message"]
    t = run_cli("fit", tiny_model, "--gpu", "700MiB", "--runtime", "transformers")
    assert t.returncode == 5
    assert "DOES NOT FIT" in t.stdout and "error:" in t.stderr and "700.00 MiB is usable" in t.stderr


def test_vllm_reports_kv_capacity(tiny_model: Path) -> None:
    r = run_cli("fit", tiny_model, "--gpu", "8GiB", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["runtime"] == "vllm" and d["limit_bytes"] == (8 << 30) * 9 // 10
    assert d["kv_token_capacity"] == d["kv_pool_bytes"] // 256
    assert d["max_concurrency"] == d["kv_pool_bytes"] // (2048 * 256)


def test_vllm_without_room_for_its_context_does_not_start(tiny_model: Path) -> None:
    r = run_cli("fit", tiny_model, "--gpu", "1GiB")
    assert r.returncode == 5
    assert "vLLM refuses to start" in r.stdout and "at most 0.39 would start" in r.stdout
    ok = run_cli("fit", tiny_model, "--gpu", "1GiB", "--gpu-memory-utilization", "0.39", "--json")
    assert ok.returncode == 0, ok.stdout
    assert json.loads(ok.stdout)["limit_bytes"] == int((1 << 30) * 0.39)


def test_bundle_as_model(bundle: Path) -> None:
    r = run_cli("fit", bundle, "--gpu", "L4", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["model"] == "acme/tiny" and d["gpu"]["name"] == "L4" and d["verdict"] == "fits"


def test_pack_records_the_estimate_and_inspect_shows_it(make_bundle, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    extra = '\n[[targets]]\ngpu = "H100-80GB"\ncount = 2\ncontext = 1024\nruntime = "vllm"\n' \
            '\n[[targets]]\ngpu = "700MiB"\nruntime = "transformers"\n'
    b = make_bundle(extra=extra)
    doc = json.loads((b / "manifest.json").read_text())
    t1, t2 = doc["predicate"]["targets"]
    assert t1["estimate"]["verdict"] == "fits" and t1["estimate"]["gpu"]["count"] == 2 and t1["estimate"]["context"] == 1024
    assert t2["estimate"]["verdict"] == "does_not_fit" and t2["estimate"]["max_context"] == 0
    r = run_cli("inspect", b)
    assert r.returncode == 0, r.stderr
    assert "2 x H100-80GB (vllm): fits" in r.stdout and "longest context that fits: 2048" in r.stdout
    assert "(transformers): does_not_fit" in r.stdout


def test_no_gpu_given_and_none_detected_is_a_clean_usage_error(tiny_model: Path, no_gpu_env: dict[str, str]) -> None:
    r = run_cli("fit", tiny_model, env=no_gpu_env)
    assert r.returncode == 2
    assert "no GPU detected" in r.stderr and "no NVIDIA driver" in r.stderr and "--gpu" in r.stderr
    assert "Traceback" not in r.stderr
    j = run_cli("fit", tiny_model, "--json", env=no_gpu_env)
    assert j.returncode == 2 and json.loads(j.stdout)["error"]["type"] == "NoGpuError"


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--gpu", "a100"], 2, "ambiguous"),
        (["--gpu", "warp-drive"], 2, "unknown GPU"),
        (["--gpu", "h100:0"], 2, "count"),
        (["--gpu", "h100", "--runtime", "llamacpp"], 2, "llamacpp"),
        (["--gpu", "h100", "--gpu-memory-utilization", "2"], 2, "gpu_memory_utilization"),
        (["--gpu", "h100", "--context", "0"], 2, "context"),
    ],
)
def test_bad_flags(tiny_model: Path, args: list[str], code: int, words: str) -> None:
    r = run_cli("fit", tiny_model, *args)
    assert r.returncode == code, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr


def test_models_the_estimator_cannot_read(tmp_path: Path, tiny_model: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("fit", empty, "--gpu", "h100")
    assert r.returncode == 2 and "config.json" in r.stderr
    (tiny_model / "config.json").write_text('{"model_type": "llama", "hidden_size": "big"}')
    r = run_cli("fit", tiny_model, "--gpu", "h100")
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("fit", tmp_path / "nowhere", "--gpu", "h100")
    assert r.returncode == 2 and "--registry" in r.stderr


def test_truncated_safetensors_is_an_integrity_error(tiny_model: Path) -> None:
    w = tiny_model / "model-00001-of-00002.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    r = run_cli("fit", tiny_model, "--gpu", "h100")
    assert r.returncode == 3 and "malformed safetensors" in r.stderr


# -- install's gate, and a model installed in a registry ------------------------------------------------------------


def test_install_refuses_a_model_that_does_not_fit_unless_ignored(bundle: Path, policy: Path, tmp_path: Path, alice: KeyPair) -> None:
    reg = tmp_path / "reg"
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy, "--gpu", "700MiB", "--runtime", "transformers", "--json")
    assert r.returncode == 5, r.stdout + r.stderr
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "FitError" and "acme/tiny" in err["message"] and "700MiB" in err["message"]
    assert not (reg / "hub" / "models--acme--tiny").exists()
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy, "--gpu", "700MiB", "--runtime", "transformers", "--ignore-fit",
                "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    fit = json.loads(r.stdout)["fit"]
    assert fit[0]["verdict"] == "does_not_fit" and fit[0]["model"] == "acme/tiny"
    # the installed model, found by repo id in the registry (its snapshot links resolved into blobs)
    r = run_cli("fit", "acme/tiny", "--registry", reg, "--gpu", "1GiB", "--runtime", "transformers", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["model"] == "acme/tiny" and d["verdict"] == "fits"
    r = run_cli("fit", "acme/other", "--gpu", "1GiB", env={"AIRPACK_REGISTRY": str(reg)})
    assert r.returncode == 2 and "not a folder, a bundle, or a model installed" in r.stderr
    # a snapshot link pointing out of the repo's blobs is refused, not followed
    (cfg,) = (reg / "hub" / "models--acme--tiny" / "snapshots").glob("*/config.json")
    outside = tmp_path / "elsewhere.json"
    outside.write_text(cfg.read_text())
    cfg.unlink()
    cfg.symlink_to(outside)
    r = run_cli("fit", "acme/tiny", "--registry", reg, "--gpu", "1GiB")
    assert r.returncode == 3 and "outside the repo's blobs" in r.stderr


def test_install_fits_on_a_big_enough_gpu(bundle: Path, policy: Path, tmp_path: Path) -> None:
    r = run_cli("install", bundle, "--registry", tmp_path / "reg", "--trust", policy, "--gpu", "H100-80GB:2", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    (rep,) = json.loads(r.stdout)["fit"]
    assert rep["verdict"] == "fits" and rep["gpu"]["count"] == 2 and rep["runtime"] == "vllm"
