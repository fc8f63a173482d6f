"""Whole estimates per runtime, verdicts, and the longest-context search, hand-computed.

The small config of ``vram_fixtures.config()``: hidden 64, intermediate 128,
2 layers, 4 heads / 2 KV heads of 16 dims, vocab 256, bf16, untied: 213,632
bytes of weights, 256 bytes of KV per token.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vram_fixtures import GiB, MiB, config, llama_header, shape_and_weights

from airpack import vram_stream
from airpack.errors import UsageError
from airpack.vram import (
    COMMUNICATION_BYTES,
    CUBLAS_WORKSPACE_BYTES,
    CUDA_CONTEXT_BYTES,
    LIBRARY_BYTES,
    GpuBudget,
    ModelShape,
    RunConfig,
    Weights,
    collect_weights,
    estimate,
    fit,
    model_shape,
    stream_layout,
    stream_weight_sizes,
    verdict_for,
)

WEIGHTS = 2 * 256 * 64 * 2 + 2 * (2 * 64 * 64 * 2 + 2 * 32 * 64 * 2 + 3 * 128 * 64 * 2 + 2 * 64 * 2) + 64 * 2
KV_PER_TOKEN = 2 * 2 * 2 * 16 * 2
# vLLM's profile, per token: max(attention 4x64 + 3x64, MLP 4x64 + 3x128) = 640 elements x 2 bytes, + rope cos/sin 2 x 16 x 4
ACT_PER_TOKEN = 640 * 2 + 2 * 16 * 4
FIXED = (621 + 82 + 32) * MiB  # CUDA context + libraries + cuBLAS workspace
VLLM_FIXED = (82 + 32) * MiB  # vLLM counts its budget after CUDA started: the context is not in it


def _replay(shape: ModelShape, weights: Weights, run: RunConfig) -> vram_stream.Peaks:
    """The stream ``estimate`` replays for ``run``: the same layout, weights in load order and run point."""
    e = estimate(shape, weights, run)
    lay = stream_layout(shape, tp=run.tensor_parallel)
    sizes = stream_weight_sizes(weights, shape, run.tensor_parallel)
    return vram_stream.replay(lay, sizes, batch=run.batch, prompt=e.prompt_tokens, new_tokens=e.new_tokens)


def test_hand_computed_transformers_estimate() -> None:
    """Weights and KV cache exact; the rest is the stream's replay: the per-GPU figure is its peak reserved plus
    what lives outside PyTorch's allocator (CUDA's context and the libraries)."""
    shape, weights = shape_and_weights(config())
    assert weights.total_bytes == WEIGHTS == 213_632
    run = RunConfig(runtime="transformers", context=1040, batch=2, new_tokens=16)
    est = estimate(shape, weights, run)
    b = est.breakdown
    assert (est.prompt_tokens, est.new_tokens) == (1024, 16)
    assert b.weights == 213_632
    assert b.kv_cache == 2 * 1040 * KV_PER_TOKEN == 532_480
    peaks = _replay(shape, weights, run)
    # the estimate is the replay's reserve: activations are the peak allocated less the weights, the cache and cuBLAS's
    # workspace, and the allocator's share is what it reserved beyond the peak allocated
    assert est.per_gpu_bytes == CUDA_CONTEXT_BYTES + LIBRARY_BYTES + peaks.reserved
    assert b.activations == peaks.allocated - (b.weights + b.kv_cache + CUBLAS_WORKSPACE_BYTES)
    assert est.overhead.allocator == peaks.reserved - peaks.allocated
    assert b.overhead == FIXED + est.overhead.allocator
    assert est.per_gpu_bytes == b.weights + b.kv_cache + b.activations + b.overhead
    # the peak allocated is at least what the last decode step holds at its logits: the weights, the workspace, every
    # layer's cache at 1039 tokens (1040 once each block is rounded to 512 bytes: the analytic kv_cache), input_ids and
    # the attention mask (int64, kept by generate), and the step's bf16 logits beside their float32 copy
    logits = 2 * 256 * (2 + 4)
    assert b.activations >= logits + 2 * 2 * 1024 * 8
    # every tensor but cuBLAS's 32 MiB workspace is under 1 MiB (the largest: 2048 rows x 128 of the MLP in bf16, or of
    # the hidden size in float32 in the norms): the rest of the reserve is whole 2 MiB small-pool segments
    assert (peaks.reserved - CUBLAS_WORKSPACE_BYTES) % (2 * MiB) == 0


def test_hand_computed_vllm_estimate_and_kv_pool() -> None:
    shape, weights = shape_and_weights(config())
    gpu = GpuBudget(name="test", count=1, memory_bytes=10 * GiB)
    r = fit(shape, weights, RunConfig(runtime="vllm", context=1024), gpu)
    b = r.estimate.breakdown
    assert b.kv_cache == 1024 * KV_PER_TOKEN
    assert b.activations == 8192 * ACT_PER_TOKEN + 2 * 256 * 256 * 4  # profile batch + sampler logits/probs
    assert b.overhead == VLLM_FIXED and r.estimate.overhead.cuda_context == 0
    assert r.limit_bytes == 9_663_676_416  # 0.9 x 10 GiB, exactly
    pool = r.limit_bytes - (b.weights + b.activations + b.overhead)
    assert r.kv_pool_bytes == pool
    assert r.kv_token_capacity == pool // KV_PER_TOKEN
    assert r.max_concurrency == pool // (1024 * KV_PER_TOKEN)
    assert r.verdict == "fits"


def test_utilization_sets_the_vllm_limit_exactly() -> None:
    shape, weights = shape_and_weights(config())
    r = fit(shape, weights, RunConfig(runtime="vllm", gpu_memory_utilization="0.5"), GpuBudget(name="t", count=1, memory_bytes=1000 * MiB))
    assert r.limit_bytes == 500 * MiB


def test_sliding_window_mask_is_counted_for_transformers_prefill() -> None:
    """A 1,024-token prompt over 64-token windows: masking_utils cannot skip the sliding layers' mask, so the prefill
    writes everything the full-attention one does plus the mask, and the cache still holds the whole prompt."""
    full_shape, w = shape_and_weights(config())
    slide_shape, _ = shape_and_weights(config(sliding_window=64))
    run = RunConfig(runtime="transformers", context=1024 + 16, new_tokens=16, batch=2)
    full, slide = estimate(full_shape, w, run), estimate(slide_shape, w, run)
    assert stream_layout(slide_shape, tp=1).layer_windows == (64, 64)
    # the sliding layers hold the 1024-token prompt at the prefill peak (cropped to the window at the first decode step)
    assert slide.breakdown.kv_cache == 2 * 1024 * KV_PER_TOKEN
    p_full, p_slide = _replay(full_shape, w, run), _replay(slide_shape, w, run)
    # the full model's peak is at the prefill (2048 rows through the MLP; a decode step adds one token per layer): there
    # the sliding stream holds the same tensors, the same whole-prompt cache, and the boolean prompt x prompt sliding
    # mask, built once and held until the forward returns
    assert p_slide.allocated >= p_full.allocated + 1024 * 1024
    # so the sliding estimate is at least the full one's: the full model's reserve exceeds its peak allocated by less
    # than that mask (reserved >= allocated for both; the estimates are each reserve plus the same fixed overhead)
    assert p_full.reserved - p_full.allocated < 1024 * 1024
    assert slide.per_gpu_bytes >= full.per_gpu_bytes
    assert slide.breakdown.activations >= full.breakdown.activations + 1024 * 1024


def test_transformers_sliding_layers_hold_the_whole_prompt_at_prefill() -> None:
    """transformers keeps the prefill's keys and values whole until the first decode step crops them to the window."""
    shape, w = shape_and_weights(config(model_type="mistral", sliding_window=64))
    long_prompt = estimate(shape, w, RunConfig(runtime="transformers", context=1024, new_tokens=16)).breakdown.kv_cache
    short_prompt = estimate(shape, w, RunConfig(runtime="transformers", context=1024, new_tokens=1000)).breakdown.kv_cache
    vllm = estimate(shape, w, RunConfig(runtime="vllm", context=1024)).breakdown.kv_cache
    assert long_prompt == 2 * 1008 * KV_PER_TOKEN // 2  # 2 layers, each the 1008-token prompt
    assert short_prompt == 2 * 64 * KV_PER_TOKEN // 2  # a 24-token prompt: the window, once decoding
    assert vllm == 2 * 64 * KV_PER_TOKEN // 2


def test_tensor_parallel_adds_communication_buffers() -> None:
    shape, weights = shape_and_weights(config())
    one = estimate(shape, weights, RunConfig(runtime="vllm", context=64))
    two = estimate(shape, weights, RunConfig(runtime="vllm", context=64, tensor_parallel=2))
    assert one.overhead.communication == 0 and two.overhead.communication == COMMUNICATION_BYTES


def test_fit_uses_the_gpu_count_as_tensor_parallel_size() -> None:
    shape, weights = shape_and_weights(config())
    r = fit(shape, weights, RunConfig(runtime="vllm", context=64), GpuBudget(name="t", count=2, memory_bytes=80 * GiB))
    assert r.estimate.tensor_parallel == 2
    assert r.estimate.breakdown.kv_cache == 64 * KV_PER_TOKEN // 2


# -- verdicts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "verdict"), [(50, "fits"), (95, "fits"), (96, "tight"), (100, "tight"), (101, "does_not_fit")])
def test_verdict_bands(total: int, verdict: str) -> None:
    assert verdict_for(total, 100) == verdict


def test_transformers_limit_is_free_memory_when_known() -> None:
    shape, weights = shape_and_weights(config())
    gpu = GpuBudget(name="t", count=1, memory_bytes=80 * GiB, free_bytes=700 * MiB, source="nvml")
    r = fit(shape, weights, RunConfig(runtime="transformers", context=64), gpu)
    assert r.limit_bytes == 700 * MiB
    assert r.verdict == "does_not_fit"  # 735 MiB of context and libraries alone


def test_vllm_refuses_to_start_when_less_than_its_share_is_free() -> None:
    shape, weights = shape_and_weights(config())
    gpu = GpuBudget(name="t", count=1, memory_bytes=80 * GiB, free_bytes=40 * GiB, source="nvml")
    r = fit(shape, weights, RunConfig(runtime="vllm", context=64), gpu)
    assert r.verdict == "does_not_fit" and r.max_context == 0
    # (40 GiB free - 621 MiB of CUDA context) / 80 GiB, rounded down: the highest utilization that starts
    assert any("at most 0.49" in n for n in r.notes)


def test_vllm_needs_room_for_its_context_beside_its_budget() -> None:
    shape, weights = shape_and_weights(config())
    run = RunConfig(runtime="vllm", context=64)
    small = fit(shape, weights, run, GpuBudget(name="t", count=1, memory_bytes=6 * GiB))
    assert small.verdict == "does_not_fit" and small.max_context == 0  # 6 GiB - 621 MiB < 0.9 x 6 GiB
    big = fit(shape, weights, run, GpuBudget(name="t", count=1, memory_bytes=7 * GiB))
    assert big.verdict == "fits" and big.max_context == 4096


def test_weights_alone_too_big_fit_no_context() -> None:
    shape, weights = shape_and_weights(config())
    r = fit(shape, weights, RunConfig(runtime="transformers"), GpuBudget(name="t", count=1, memory_bytes=600 * MiB))
    assert (r.verdict, r.max_context) == ("does_not_fit", 0)


def test_whole_model_context_fits_on_a_big_gpu() -> None:
    shape, weights = shape_and_weights(config())
    r = fit(shape, weights, RunConfig(runtime="transformers"), GpuBudget(name="t", count=1, memory_bytes=80 * GiB))
    assert r.verdict == "fits"
    assert r.max_context == shape.max_context == 4096
    assert r.estimate.context == 4096  # no --context: the model's maximum


@settings(max_examples=60, deadline=None)
@given(mem_mib=st.integers(min_value=736, max_value=5000), runtime=st.sampled_from(["transformers", "vllm"]),
       batch=st.integers(min_value=1, max_value=64), window=st.sampled_from([None, 100]))
def test_max_context_is_the_longest_that_fits(mem_mib: int, runtime: str, batch: int, window: int | None) -> None:
    cfg = config(sliding_window=window, num_hidden_layers=4, sliding_window_pattern=2, max_position_embeddings=65536)
    shape, weights = shape_and_weights(cfg)
    gpu = GpuBudget(name="t", count=1, memory_bytes=mem_mib * MiB)
    run = RunConfig(runtime=runtime, batch=batch, new_tokens=16, gpu_memory_utilization="0.5")

    def total(context: int) -> int:
        return estimate(shape, weights, RunConfig(runtime=runtime, batch=batch, new_tokens=16, context=context)).per_gpu_bytes

    r = fit(shape, weights, run, gpu)
    if r.max_context == 0:
        assert total(1) > r.limit_bytes or any("refuses to start" in n for n in r.notes)
        return
    assert total(r.max_context) <= r.limit_bytes
    step = max(1, shape.max_context // 1024)  # the search's resolution: 1/1024 of the model's positions
    if r.max_context < shape.max_context:
        assert total(min(r.max_context + step, shape.max_context)) > r.limit_bytes
    assert (r.verdict == "does_not_fit") == (r.max_context < shape.max_context)


# -- bad run settings are usage errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"runtime": "llamacpp"},
        {"batch": 0},
        {"context": 0},
        {"new_tokens": -1},
        {"gpu_memory_utilization": "1.5"},
        {"gpu_memory_utilization": "nan"},
        {"gpu_memory_utilization": "lots"},
        {"tensor_parallel": 0},
    ],
)
def test_bad_run_config(kw: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        RunConfig(**kw)


def test_moe_decode_gathers_the_selected_experts_weights() -> None:
    """generate() decodes MoE layers with batched_mm on a GPU: every (token, expert) pair copies that expert's weights."""
    cfg = config(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2, intermediate_size=128)
    shape = model_shape(cfg)
    # batch 8 x top-2 pairs, each gate_up (2 x 128 x 64) and down (64 x 128) in bf16, gathered at every decode step
    w = collect_weights(llama_header(cfg), shape=shape)
    long_decode = estimate(shape, w, RunConfig(runtime="transformers", context=64, batch=8, new_tokens=32))
    assert long_decode.breakdown.activations >= 8 * 2 * 3 * 128 * 64 * 2
