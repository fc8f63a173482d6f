"""What ``fit`` (and install's fit gate) tells the operator: the real reason first, then what would fit.

A refusal leads with "needs X per GPU, but Y is usable" (or that vLLM cannot even start); its hint
lists what would fit, each suggestion estimated again (a higher --gpu-memory-utilization, more
GPUs, a shorter --context), and offers --ignore-fit only where it exists (install, not fit). A
context the model cannot run at is no fit verdict (exit 2, or "unknown" in install's and pack's
reports), and GPU counts are parsed strictly: ``H100:2:3`` and a spec's ``gpu = "H100:4"`` are refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import run_cli, verify
from registry_fixtures import do_install, registry_state, variant_model
from threat_helpers import assert_cli_error, assert_cli_json_error, cli_inproc
from vram_fixtures import config, llama_header

import airpack.ops.install as install_mod
from airpack.errors import ContextTooLongError, DiskSpaceError, FitError, GpuSpecError
from airpack.gpus import parse_gpu, resolve_gpus, split_count
from airpack.ops.fit import ModelSource, check_bundle_fit, estimate_source, fit_error, run_config

SEVEN_B = config(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, head_dim=128, vocab_size=32000)


def _seven(**cfg: object) -> ModelSource:
    c = {**SEVEN_B, **cfg}
    return ModelSource(name="acme/seven", kind="folder", location="seven", config=c, tensors=tuple(llama_header(c)))


# -- the refusal: reason first, what would fit in the hint ---------------------------------------------


def test_fit_refusal_leads_with_the_reason_and_never_offers_ignore_fit(tiny_model: Path) -> None:
    r = run_cli("fit", tiny_model, "--gpu", "760MiB", "--runtime", "transformers", "--batch", "64", "--json")
    assert r.returncode == 5
    err = json.loads(r.stdout)["error"]
    assert err["message"].startswith("tiny does not fit 1 x 760MiB GPU (transformers): it needs ")
    assert "per GPU at context 2048 x batch 64, but 760.00 MiB is usable per GPU" in err["message"]
    assert "--ignore-fit" not in err["hint"]  # fit has no such flag
    assert err["hint"].startswith("Try --context ") and "--batch 1" in err["hint"]
    t = run_cli("fit", tiny_model, "--gpu", "760MiB", "--runtime", "transformers", "--batch", "64")
    assert "--ignore-fit" not in t.stderr and "hint: Try --context" in t.stderr


def test_install_gate_refusal_offers_ignore_fit(bundle: Path, policy: Path) -> None:
    with pytest.raises(FitError) as e:
        check_bundle_fit(verify(bundle, policy), gpu="700MiB", context=512, runtime="transformers", ignore=False)
    assert "--ignore-fit" in e.value.hint


def test_suggestions_are_checked_by_estimating_again() -> None:
    src = _seven()
    big = parse_gpu("H100-80GB")
    need = estimate_source(src, run_config(runtime="vllm", context=4096), big).result.per_gpu_bytes
    gpu = parse_gpu(f"{int(need / 0.925) >> 20}MiB")  # 0.9 of it is too little, 0.95 is enough
    rep = estimate_source(src, run_config(runtime="vllm", context=4096, count=1), gpu)
    assert rep.result.verdict == "does_not_fit"
    assert rep.suggestions[0] == "--gpu-memory-utilization 0.95"
    assert any(s.startswith("2 x ") and ":2)" in s for s in rep.suggestions)
    assert rep.suggestions[-1] == f"--context {rep.result.max_context} or shorter"
    e = fit_error(rep)
    assert "with --gpu-memory-utilization 0.9" in e.message and "is usable per GPU" in e.message
    assert e.hint.startswith("Try --gpu-memory-utilization 0.95, or 2 x ")
    for s in rep.suggestions[:1]:  # each suggestion really fits
        assert estimate_source(src, run_config(runtime="vllm", context=4096, gpu_memory_utilization="0.95"), gpu).result.verdict != "does_not_fit", s


def test_more_gpus_of_the_catalog_kind_are_suggested_by_name() -> None:
    gpu = parse_gpu("T4")
    rep = estimate_source(_seven(), run_config(runtime="vllm", context=None, count=1), gpu)
    assert rep.result.verdict == "does_not_fit" and "2 x T4 (--gpu T4:2)" in rep.suggestions


def test_vllm_that_cannot_start_says_so_first(tiny_model: Path) -> None:
    r = run_cli("fit", tiny_model, "--gpu", "700MiB", "--json")
    assert r.returncode == 5
    msg = json.loads(r.stdout)["error"]["message"]
    assert msg.startswith("tiny does not fit 1 x 700MiB GPU (vllm): vLLM refuses to start")


# -- a context the model cannot run at -----------------------------------------------------------------


def test_a_context_beyond_the_models_maximum_is_refused_not_fits(tiny_model: Path) -> None:
    r = cli_inproc("fit", tiny_model, "--gpu", "H100-80GB", "--context", "999999", "--json")
    err = assert_cli_json_error(r, 2, "ContextTooLongError")
    assert "beyond the model's maximum of 2,048" in err["message"] and "--context 2048" in err["hint"]
    assert '"verdict"' not in r.stdout
    assert cli_inproc("fit", tiny_model, "--gpu", "H100-80GB", "--context", "2048").returncode == 0


def test_rope_scaling_stretches_the_maximum_and_an_assumed_maximum_refuses_nothing() -> None:
    gpu = parse_gpu("H100-80GB")
    with pytest.raises(ContextTooLongError):
        estimate_source(_seven(), run_config(runtime="vllm", context=8192), gpu)
    yarn = _seven(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096})
    assert estimate_source(yarn, run_config(runtime="vllm", context=16384), gpu).result.verdict != "does_not_fit"
    with pytest.raises(ContextTooLongError):
        estimate_source(yarn, run_config(runtime="vllm", context=16385), gpu)
    unknown = _seven(max_position_embeddings=None)  # config.json does not say: the estimator's 2048 is a guess
    estimate_source(unknown, run_config(runtime="vllm", context=8192), gpu)


def test_install_and_pack_report_such_a_context_as_unknown(bundle: Path, policy: Path,
                                                           make_bundle: Callable[..., Path]) -> None:
    (rep,) = check_bundle_fit(verify(bundle, policy), gpu="H100-80GB", context=999999, runtime=None, ignore=False)
    assert rep["verdict"] == "unknown" and "beyond the model's maximum" in rep["reason"]
    b = make_bundle(extra='\n[[targets]]\ngpu = "H100-80GB"\ncontext = 999999\n')
    (target,) = json.loads(run_cli("inspect", b, "--json").stdout)["targets"]
    assert target["estimate"]["verdict"] == "unknown"


# -- GPU counts, strictly ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["H100:2:3", "H100::2", "H100:", "H100:²", "H100:٣", "H100:-1", "H100:0", "H100: 2x"])
def test_malformed_gpu_counts_are_refused(spec: str, tiny_model: Path) -> None:
    with pytest.raises(GpuSpecError):
        split_count(spec)
    with pytest.raises(GpuSpecError):
        resolve_gpus(spec)
    assert_cli_error(cli_inproc("fit", tiny_model, "--gpu", spec), 2, "GPU spec")


def test_well_formed_counts_still_parse() -> None:
    assert split_count("H100-80GB:2") == ("H100-80GB", 2)
    assert split_count(" L4 : 4 ") == ("L4", 4)
    assert parse_gpu("24GiB:3").count == 3


def test_a_spec_target_whose_gpu_carries_a_count_is_refused(make_bundle: Callable[..., Path]) -> None:
    with pytest.raises(GpuSpecError, match="count = 4"):
        parse_gpu("H100-80GB:4", count=1)
    from airpack.errors import SpecError

    with pytest.raises(SpecError, match='gpu = "H100" and count = 4'):
        make_bundle(extra='\n[[targets]]\ngpu = "H100:4"\n')


# -- the free-space refusal names its reserve --------------------------------------------------------


def test_install_free_space_refusal_names_the_reserve(tmp_path: Path, bundle: Path, tiny_model: Path, policy: Path,
                                                      make_bundle: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    reg = tmp_path / "reg"
    do_install(bundle, reg, policy)
    nxt = make_bundle(model_dir=variant_model(tiny_model, tmp_path / "v2", extra={"extra.json": b"{}" * 50_000}), sequence=2)
    before = registry_state(reg)
    monkeypatch.setattr(install_mod, "_free_bytes", lambda p: 1000)
    with pytest.raises(DiskSpaceError) as e:
        do_install(nxt, reg, policy)
    assert f"plus a {install_mod.SPACE_MARGIN:,}-byte (64 MiB) reserve kept free" in e.value.message
    assert registry_state(reg) == before
