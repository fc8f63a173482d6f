"""The trace of transformers' generate(): CUDA's SDPA choice, the allocator replay, the measured runs, the CLI.

Tests marked ``trace`` need torch and transformers (the [trace] extra) and are skipped without them;
the others check what a host without them gets: one line, exit 2, what to install.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from airpack import vram_alloc, vram_trace
from airpack.errors import ModelConfigError, TraceUnavailableError

CALIBRATION = Path(__file__).resolve().parents[2] / "shared" / "data" / "vram" / "h100-transformers-calibration.json"

needs_torch = pytest.mark.skipif(not vram_trace.available(), reason="torch and transformers are not installed ([trace] extra)")


def test_trace_without_torch_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise TraceUnavailableError(f"--trace needs {vram_trace.TRACE_REQUIREMENT}; {name} is not importable here",
                                    hint=vram_trace.INSTALL_HINT)

    monkeypatch.setattr(vram_trace, "_import", missing)
    with pytest.raises(TraceUnavailableError) as e:
        vram_trace.trace_generate({"model_type": "llama"}, batch=1, prompt=8, new_tokens=1)
    assert e.value.exit_code == 2 and "airpack[trace]" in (e.value.hint or "")


def test_cli_trace_without_torch_is_exit_2(tiny_model: Path, tmp_path: Path) -> None:
    stub = tmp_path / "stub"
    (stub / "torch").mkdir(parents=True)
    (stub / "torch" / "__init__.py").write_text("raise ImportError('no torch on this host')\n")
    r = run_cli("fit", tiny_model, "--gpu", "1GiB", "--context", "64", "--trace", "--json", env={"PYTHONPATH": str(stub)})
    assert r.returncode == 2, r.stderr
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "TraceUnavailableError" and "torch" in err["message"]
    assert "pip install 'airpack[trace]'" in err["hint"]
    assert "Traceback" not in r.stderr


def test_cli_trace_refuses_vllm_and_several_gpus(tiny_model: Path) -> None:
    r = run_cli("fit", tiny_model, "--gpu", "1GiB", "--runtime", "vllm", "--trace")
    assert r.returncode == 2 and "vLLM cannot be traced" in r.stderr
    r = run_cli("fit", tiny_model, "--gpu", "1GiB:2", "--context", "64", "--trace")
    assert r.returncode == 2 and "one GPU" in r.stderr


# -- with torch ------------------------------------------------------------------------------------------


@needs_torch
@pytest.mark.trace
def test_sdpa_backend_is_chosen_as_cuda_would() -> None:
    import torch

    def t(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    q, k = t(1, 8, 16, 64), t(1, 2, 16, 64)
    assert vram_trace.choose_backend(torch, q, k, k, None, True, True)[0] == "flash"
    assert vram_trace.choose_backend(torch, q, k, k, None, True, False)[0] == "math"  # heads differ, no GQA flag
    full = t(1, 8, 16, 64)
    mask = torch.empty((1, 1, 16, 16), dtype=torch.bool, device="meta")
    assert vram_trace.choose_backend(torch, full, full, full, mask, False, False) == ("efficient", "explicit attention mask")
    f32 = t(1, 8, 16, 64, dtype=torch.float32)
    assert vram_trace.choose_backend(torch, f32, f32, f32, None, True, False)[0] == "efficient"
    wide = t(1, 8, 16, 320)
    assert vram_trace.choose_backend(torch, wide, wide, wide, None, True, False)[0] == "efficient"
    odd = t(1, 8, 16, 100)
    assert vram_trace.choose_backend(torch, odd, odd, odd, mask, False, False)[0] == "math"
    assert vram_trace.choose_backend(torch, q, t(1, 2, 32, 64), t(1, 2, 32, 64), None, True, True)[0] != "flash"


@needs_torch
@pytest.mark.trace
def test_trace_of_a_small_llama_counts_weights_kv_and_logits() -> None:
    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "torch_dtype": "bfloat16"}
    r = vram_trace.trace_generate(cfg, batch=2, prompt=64, new_tokens=4)
    params = 1000 * 256 * 2 + 2 * (256 * 256 * 2 + 2 * 128 * 256 + 3 * 256 * 512 + 2 * 256) + 256
    assert r.weights_allocated >= params * 2  # bf16, each tensor rounded up to 512 bytes
    assert r.peak_allocated > r.weights_allocated + vram_alloc.CUBLAS_WORKSPACE_BYTES
    assert r.peak_reserved >= r.peak_allocated
    assert r.backends == {"flash": 2 * 4}  # 2 layers x (prefill + 3 decode steps)
    assert r.transformers_version and r.attn_implementation == "sdpa"


@needs_torch
@pytest.mark.trace
def test_unknown_model_type_is_a_config_error() -> None:
    with pytest.raises(ModelConfigError, match="does not know model type"):
        vram_trace.trace_generate({"model_type": "no-such-arch", "hidden_size": 8}, batch=1, prompt=4, new_tokens=1)
    with pytest.raises(ModelConfigError, match="no model_type"):
        vram_trace.trace_generate({"hidden_size": 8}, batch=1, prompt=4, new_tokens=1)


@needs_torch
@pytest.mark.trace
@pytest.mark.skipif(not CALIBRATION.is_file(), reason="the calibration data is not beside this checkout")
@pytest.mark.parametrize(("model", "batch", "prompt"), [("qwen2.5-0.5b", 8, 2048), ("llama-3.2-1b", 1, 8192),
                                                        ("mistral-7b-v0.3", 1, 128)])
def test_trace_matches_the_measured_peak_within_1_percent(model: str, batch: int, prompt: int) -> None:
    data = json.loads(CALIBRATION.read_text())
    m = next(x for x in data["models"] if x["model"] == model)
    run = next(r for r in m["runs"] if (r["batch"], r["prompt"]) == (batch, prompt))
    r = vram_trace.trace_generate(m["config"], batch=batch, prompt=prompt, new_tokens=run["new_tokens"])
    assert abs(r.weights_allocated / m["weights_allocated"] - 1) < 0.001
    assert abs(r.peak_allocated / run["peak_allocated"] - 1) < 0.01
    assert abs(r.peak_reserved / run["peak_reserved"] - 1) < 0.07


@needs_torch
@pytest.mark.trace
def test_cli_fit_trace_json(tiny_model: Path) -> None:
    r = run_cli("fit", tiny_model, "--gpu", "1GiB", "--context", "256", "--new-tokens", "4", "--trace", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    t = d["trace"]
    assert d["runtime"] == "transformers" and d["verdict"] == t["verdict"]
    assert t["per_gpu_bytes"] == t["peak_in_use"] + t["outside_allocator_bytes"]
    assert t["peak_allocated"] <= t["peak_in_use"] <= t["peak_reserved"]
    assert t["peak_allocated"] >= t["weights_allocated"] and (t["prompt"], t["new_tokens"]) == (252, 4)
    assert d["estimate_per_gpu_bytes"] > 0 and d["estimate_verdict"] in ("fits", "tight", "does_not_fit")
    text = run_cli("fit", tiny_model, "--gpu", "1GiB", "--context", "256", "--new-tokens", "4", "--trace")
    assert "peak allocated" in text.stdout and "traced verdict" in text.stdout


def test_install_fit_trace_without_torch_is_exit_2_and_installs_nothing(bundle: Path, policy: Path, tmp_path: Path) -> None:
    stub = tmp_path / "stub"
    (stub / "torch").mkdir(parents=True)
    (stub / "torch" / "__init__.py").write_text("raise ImportError('no torch on this host')\n")
    reg = tmp_path / "reg"
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy, "--gpu", "1GiB", "--fit-trace", "--json",
                env={"PYTHONPATH": str(stub)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert json.loads(r.stdout)["error"]["type"] == "TraceUnavailableError"
    assert not (reg / "hub" / "models--acme--tiny").exists()


@needs_torch
@pytest.mark.trace
def test_install_fit_trace_records_the_trace(bundle: Path, policy: Path, tmp_path: Path) -> None:
    r = run_cli("install", bundle, "--registry", tmp_path / "reg", "--trust", policy, "--gpu", "1GiB", "--context", "128",
                "--fit-trace", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    (rep,) = json.loads(r.stdout)["fit"]
    assert rep["runtime"] == "transformers" and rep["verdict"] == rep["trace"]["verdict"] == "fits"
    assert rep["trace"]["peak_reserved"] >= rep["trace"]["peak_allocated"]


@needs_torch
@pytest.mark.trace
def test_quantized_checkpoints_are_not_traced() -> None:
    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
           "vocab_size": 100, "quantization_config": {"quant_method": "gptq", "bits": 4}}
    with pytest.raises(ModelConfigError, match="quantized checkpoint is estimated, not traced"):
        vram_trace.trace_generate(cfg, batch=1, prompt=4, new_tokens=1)
