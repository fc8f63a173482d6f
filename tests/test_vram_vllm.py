"""vLLM mode's arithmetic, by hand: the version it is derived from, blocks, the budget, the startup check, the reserve.

vLLM cannot run here, so its figures are derived from its source (``vram.VLLM_VERSION``) and every
rule is pinned below with numbers worked out by hand. The model is ``vram_fixtures.config()``: hidden 64,
intermediate 128, 2 layers, 4 heads / 2 KV heads of 16 dims, vocab 256, bf16: 213,632 bytes of weights,
128 bytes of KV per layer and token (256 for both layers), 1,408 bytes of profile activations per token.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from vram_fixtures import GiB, MiB, config, llama_header, shape_and_weights

from airpack.vram import (
    COMMUNICATION_BYTES,
    VLLM_BLOCK_SIZE,
    VLLM_MAX_NUM_BATCHED_TOKENS,
    VLLM_MAX_NUM_SEQS,
    VLLM_VERSION,
    GpuBudget,
    RunConfig,
    estimate,
    fit,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "fit.md"
WEIGHTS = 213_632
KV_PER_LAYER = 2 * 2 * 16 * 2  # K and V x 2 KV heads x 16 dims x 2 bytes
KV_PER_TOKEN = 2 * KV_PER_LAYER
ACT_PER_TOKEN = 640 * 2 + 2 * 16 * 4  # max(attention 4x64 + 3x64, MLP 4x64 + 3x128) elements x bf16, + rope cos/sin
SAMPLER = 2 * 256 * 256 * 4  # float32 logits and probabilities of max_num_seqs (256) sequences x vocab 256
NON_KV = (82 + 32) * MiB  # libraries + cuBLAS workspace: in the budget; the CUDA context and CUDA graphs are not


def gpu(mib: int, *, count: int = 1, free_mib: int | None = None) -> GpuBudget:
    return GpuBudget(name="t", count=count, memory_bytes=mib * MiB, free_bytes=None if free_mib is None else free_mib * MiB,
                     source="catalog" if free_mib is None else "nvml")


def test_the_version_the_arithmetic_follows_is_named_in_code_and_docs() -> None:
    assert VLLM_VERSION == "0.11.0"
    assert f"vLLM {VLLM_VERSION}" in DOCS.read_text()
    assert (VLLM_BLOCK_SIZE, VLLM_MAX_NUM_BATCHED_TOKENS, VLLM_MAX_NUM_SEQS) == (16, 8192, 256)


@pytest.mark.parametrize(("context", "blocks"), [(1, 1), (16, 1), (17, 2), (1000, 63), (1024, 64), (4096, 256)])
def test_each_sequence_takes_whole_16_token_blocks(context: int, blocks: int) -> None:
    shape, weights = shape_and_weights(config())
    est = estimate(shape, weights, RunConfig(runtime="vllm", context=context))
    assert est.breakdown.kv_cache == blocks * 16 * KV_PER_TOKEN
    assert est.kv_bytes_per_token == KV_PER_TOKEN  # the per-token figure itself is not rounded
    batch = estimate(shape, weights, RunConfig(runtime="vllm", context=context, batch=3))
    assert batch.breakdown.kv_cache == 3 * blocks * 16 * KV_PER_TOKEN  # each sequence rounded on its own


def test_sliding_layers_hold_their_window_in_whole_blocks() -> None:
    shape, weights = shape_and_weights(config(model_type="mistral", sliding_window=100))
    est = estimate(shape, weights, RunConfig(runtime="vllm", context=1000))
    assert est.breakdown.kv_cache == 2 * 112 * KV_PER_LAYER  # min(1000, 100) = 100 tokens -> 7 blocks of 16 = 112
    short = estimate(shape, weights, RunConfig(runtime="vllm", context=40))
    assert short.breakdown.kv_cache == 2 * 48 * KV_PER_LAYER  # 40 -> 3 blocks


def test_the_budget_is_utilization_times_total_and_the_rest_of_it_is_the_kv_pool() -> None:
    shape, weights = shape_and_weights(config())
    r = fit(shape, weights, RunConfig(runtime="vllm", context=1000, gpu_memory_utilization="0.85"), gpu(24 * 1024))
    assert r.limit_bytes == 21_904_333_209 == int(Decimal("0.85") * 24 * GiB)  # 21,904,333,209.6 rounded down
    b = r.estimate.breakdown
    assert (b.weights, b.activations, b.overhead) == (WEIGHTS, 8192 * ACT_PER_TOKEN + SAMPLER, NON_KV)
    static = WEIGHTS + 11_534_336 + 524_288 + 119_537_664
    assert static == 131_809_920
    assert r.kv_pool_bytes == 21_904_333_209 - 131_809_920 == 21_772_523_289
    seq = 63 * 16 * KV_PER_TOKEN  # one sequence of 1,000 tokens: 63 blocks
    assert seq == 258_048
    assert r.max_concurrency == 21_772_523_289 // 258_048 == 84_373
    assert r.kv_token_capacity == 21_772_523_289 * 1000 // 258_048 == 84_373_927  # pool x context / one sequence's bytes
    assert r.verdict == "fits"


def test_full_attention_capacity_is_pool_over_bytes_per_token() -> None:
    shape, weights = shape_and_weights(config())
    r = fit(shape, weights, RunConfig(runtime="vllm", context=1024), gpu(10 * 1024))
    assert r.kv_token_capacity == r.kv_pool_bytes // KV_PER_TOKEN  # the figure vLLM logs as "GPU KV cache size"


@pytest.mark.parametrize(("mib", "starts"), [(6210, True), (6209, False)])
def test_vllm_starts_only_if_its_budget_is_free_once_cuda_started(mib: int, starts: bool) -> None:
    # 0.9 x T <= T - 621 MiB  <=>  T >= 6,210 MiB: 6,210 MiB leaves exactly 5,589 MiB = 0.9 x 6,210 MiB
    shape, weights = shape_and_weights(config())
    r = fit(shape, weights, RunConfig(runtime="vllm", context=64), gpu(mib))
    assert (r.verdict != "does_not_fit") is starts
    assert any(n.startswith("vLLM refuses to start") for n in r.notes) is not starts


def test_the_startup_check_uses_nvml_free_memory_and_names_the_highest_utilization_that_starts() -> None:
    shape, weights = shape_and_weights(config())
    ok = fit(shape, weights, RunConfig(runtime="vllm", context=64, gpu_memory_utilization="0.7"), gpu(40 * 1024, free_mib=30 * 1024))
    assert ok.verdict == "fits"  # 30,720 - 621 = 30,099 MiB free >= 0.7 x 40 GiB = 28,672 MiB
    no = fit(shape, weights, RunConfig(runtime="vllm", context=64, gpu_memory_utilization="0.75"), gpu(40 * 1024, free_mib=30 * 1024))
    assert no.verdict == "does_not_fit" and no.max_context == 0  # 30,099 MiB < 30,720 MiB
    assert any("at most 0.73" in n for n in no.notes)  # 30,099 / 40,960 = 0.7348


def test_the_reserve_as_modelled_profile_batch_sampler_no_context_no_graphs_no_slack() -> None:
    shape, weights = shape_and_weights(config())
    run = RunConfig(runtime="vllm", context=512, max_num_batched_tokens=2048, max_num_seqs=64)
    est = estimate(shape, weights, run)
    assert est.breakdown.activations == 2048 * ACT_PER_TOKEN + 2 * 64 * 256 * 4 == 3_014_656
    o = est.overhead
    assert (o.cuda_context, o.libraries, o.workspace, o.allocator, o.communication) == (0, 82 * MiB, 32 * MiB, 0, 0)
    assert est.per_gpu_bytes == WEIGHTS + 32 * 16 * KV_PER_TOKEN + 3_014_656 + NON_KV
    # the profile batch does not grow with the context: only the KV cache does
    longer = estimate(shape, weights, RunConfig(runtime="vllm", context=4096, max_num_batched_tokens=2048, max_num_seqs=64))
    assert longer.breakdown.activations == est.breakdown.activations
    assert longer.per_gpu_bytes - est.per_gpu_bytes == (256 - 32) * 16 * KV_PER_TOKEN


def test_float32_checkpoints_are_served_in_16_bits_their_matrices_counted_half() -> None:
    cfg = config(torch_dtype="float32")
    shape, weights = shape_and_weights(cfg, llama_header(cfg, "F32"))
    assert weights.total_bytes == 2 * WEIGHTS
    est = estimate(shape, weights, RunConfig(runtime="vllm", context=1024))
    # the matrices count 2 bytes per element; the five 1-D norms (64 elements each) as stored: 5 x 64 x 4 bytes
    assert est.breakdown.weights == WEIGHTS - 5 * 64 * 2 + 5 * 64 * 4 == 214_272
    assert est.kv_dtype == "bfloat16" and est.breakdown.kv_cache == 1024 * KV_PER_TOKEN
    assert est.breakdown.activations == 8192 * ACT_PER_TOKEN + SAMPLER


def test_tensor_parallel_adds_communication_and_needs_a_divisor_of_the_heads() -> None:
    shape, weights = shape_and_weights(config())
    two = fit(shape, weights, RunConfig(runtime="vllm", context=1024), gpu(10 * 1024, count=2))
    assert two.estimate.overhead.communication == COMMUNICATION_BYTES == 512 * MiB
    assert two.estimate.breakdown.kv_cache == 1024 * KV_PER_TOKEN // 2  # one of the 2 KV heads per GPU
    assert not any("divide" in n for n in two.notes)
    three = fit(shape, weights, RunConfig(runtime="vllm", context=1024), gpu(10 * 1024, count=3))
    assert any("divide the 4 attention heads" in n for n in three.notes)
