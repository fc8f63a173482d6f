"""The transformers estimate as a stream of tensor births and deaths (vram_stream), replayed through the allocator model.

Threats: a stream whose peak is not what the ops it writes add up to (a tensor never freed, or freed too soon); a
sliding cache sized by the window at the prefill (it holds the whole prompt until the first decode step); a long
generation whose replay skips the step that holds the largest caches; a replay that raises or reports less reserved
than allocated for some small config; a model type whose attention is unknown estimated below a known one; tensor
parallelism that does not lower the busiest GPU's share. No torch: the stream is written from the model's shape.
Timings are not checked here (benchmarks measure them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vram_fixtures import ARCHITECTURES, MiB, config, llama_header, shape_and_weights

from airpack import vram_models, vram_stream
from airpack.errors import ModelConfigError
from airpack.vram import (
    CUDA_CONTEXT_BYTES,
    EVERY_STEP_BUDGET,
    LIBRARY_BYTES,
    SHORTCUT_MARGIN,
    GpuBudget,
    RunConfig,
    estimate,
    fit,
    model_shape,
    stream_layout,
    stream_weight_sizes,
)
from airpack.vram_alloc import CUBLAS_WORKSPACE_BYTES, SMALL_SEGMENT, OutOfMemory, round_size
from airpack.vram_stream import FULL_DECODE_STEPS, Layout, _cached_after, _decode_steps

HEADER_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def tiny_layout(**kw: Any) -> Layout:
    """One layer, 4 heads (MHA) of 16 dims, hidden 64, a gated MLP 4096 wide, LayerNorm, no rotary embedding, bf16.

    Every tensor but cuBLAS's workspace is under 1 MiB (the small pool), so the peak allocated is the sum of the
    live tensors, each rounded up to 512 bytes.
    """
    fields: dict[str, Any] = {
        "hidden": 64, "heads": 4, "kv_heads": 4, "head_dim": 16, "v_head_dim": 16, "rope_dim": 0,
        "intermediate": 4096, "vocab": 64, "act_bytes": 2, "kv_bytes": 2,
        "norm": "layer", "qk_norm": False, "attention": "flash", "gated": True, "composite_act": False,
        "fused_gate_up": False, "parallel": False, "softcap": False, "layer_windows": (0,),
    }
    fields.update(kw)
    return Layout(**fields)


def replay_of(cfg: dict[str, Any], run: RunConfig) -> vram_stream.Peaks:
    """The replay ``estimate`` makes for ``cfg`` at ``run`` (the same layout, weights and run point)."""
    shape, weights = shape_and_weights(cfg)
    e = estimate(shape, weights, run)
    tp = run.tensor_parallel
    lay = stream_layout(shape, tp=tp)
    return vram_stream.replay(lay, stream_weight_sizes(weights, shape, tp), batch=run.batch, prompt=e.prompt_tokens,
                              new_tokens=e.new_tokens)


# -- a stream small enough to add up by hand -------------------------------------------------------------------


def test_peak_allocated_of_a_one_layer_prefill_is_its_mlp_stage() -> None:
    """With an MLP 64 times wider than the hidden size, the peak is inside the MLP: gate's activation, up and their
    product (64 x 4096 bf16 each) on top of everything the forward still holds there.

    Alive at that moment: the weights, input_ids and the attention mask (int64, kept by ``generate``), cuBLAS's
    workspace (allocated at the first matmul), the embedding output (the first layer's residual input, held until
    the final norm), the layer's keys and values in the cache, the attention residual sum and the MLP's normed input.
    No decode step (one new token comes from the prefill), and the logits are tiny.
    """
    lay = tiny_layout()
    rows = 64  # batch 1 x 64 prompt tokens
    weights = [1 * MiB, 3000]
    peaks = vram_stream.replay(lay, weights, batch=1, prompt=rows, new_tokens=1)
    hidden_block = round_size(rows * 64 * 2)  # 8 KiB
    expected = (
        1 * MiB + round_size(3000)  # the weights, each its own block
        + 2 * round_size(rows * 8)  # input_ids, attention mask
        + CUBLAS_WORKSPACE_BYTES
        + hidden_block  # the embedding output
        + 2 * round_size(rows * 4 * 16 * 2)  # the cache's keys and values
        + 2 * hidden_block  # the residual sum, post_attention_layernorm's output
        + 3 * round_size(rows * 4096 * 2)  # act(gate), up, act(gate) * up
    )
    assert peaks.allocated == expected == 1 * MiB + 3072 + 1024 + 32 * MiB + 5 * 8192 + 3 * 512 * 1024
    assert peaks.reserved >= peaks.allocated


def test_a_layer_leaves_only_its_cache_and_its_output_alive() -> None:
    """Every temporary of a decoder layer at prefill dies inside it: after it returns, allocated grew by the layer's
    keys and values (the whole prompt, here on a sliding layer whose window is 16) and its output."""
    lay = tiny_layout(layer_windows=(16,), intermediate=128)
    s = vram_stream._Stream()
    rows = 2 * 64  # batch 2 x 64 prompt tokens, longer than the window
    x = s.new(rows * 64 * 2)
    before = s.alloc.allocated
    cache: list[int] = []
    vram_stream._layer_prefill(s, lay, 2, 64, x, 16, cache)
    # 64 tokens, not the 16 of the window: DynamicSlidingWindowLayer keeps the prefill's keys and values whole until
    # the first decode step crops them
    kv_block = round_size(rows * 4 * 16 * 2)
    assert len(cache) == 2
    assert s.alloc.allocated - before == CUBLAS_WORKSPACE_BYTES + 2 * kv_block + round_size(rows * 64 * 2)


def test_the_first_decode_step_crops_a_sliding_cache_to_the_window() -> None:
    """``torch.cat`` of the cached keys and the new one: the new block (window tokens) is born before the old (the whole
    prompt) dies, so allocated moves by the difference and the peak holds both."""
    lay = tiny_layout(layer_windows=(16,))
    s = vram_stream._Stream()
    prompt, width = 64, 4 * 16
    cache = [s.new(prompt * width * 2), s.new(prompt * width * 2)]
    before = s.alloc.allocated
    s.alloc.reset_peak()
    tokens = _cached_after(prompt, 1, 16)
    vram_stream._grow_cache(s, lay, 1, cache, 0, tokens)
    assert tokens == 16
    assert s.alloc.allocated - before == 2 * (round_size(16 * width * 2) - round_size(prompt * width * 2))
    assert s.alloc.peak_allocated == before + round_size(16 * width * 2)  # the new keys beside both old blocks


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("prompt", [8, 300])
def test_no_layer_of_any_architecture_leaks(name: str, prompt: int) -> None:
    """Each layer kind of the matrix's models (reduced depth) at prefill: once the layer returned, freeing its cache
    blocks, its output and what the model loop still holds (BLOOM's and MPT's attention weights) frees everything it
    allocated. A tensor never freed would be counted once per layer and per decode step; one freed twice raises."""
    arch = ARCHITECTURES[name]
    cfg = dict(arch["config"])
    shape = model_shape(cfg)
    lay = stream_layout(shape, tp=1)
    batch = 2
    for i, window in enumerate(lay.layer_windows[: arch["layers"]]):
        s = vram_stream._Stream()
        s.workspace = True  # cuBLAS's workspace is born once per process, not per layer
        x = s.new(batch * prompt * lay.hidden * lay.act_bytes)
        before = s.alloc.allocated
        cache: list[int] = []
        out = vram_stream._layer_prefill(s, vram_stream._moe_layer(lay, i), batch, prompt, x, window, cache)
        vram_stream._eager_layer_end(s)
        s.drop(*cache, out, *vram_stream._eager_forward_end(s))
        assert s.alloc.allocated == before, f"layer {i} (window {window}) left {s.alloc.allocated - before} bytes"


# -- the decode plan and the sliding cache rule -----------------------------------------------------------------


def test_every_decode_step_is_replayed() -> None:
    """generate() runs a prefill (the first new token) and then one step per further token; the steps between the
    first and last FULL_DECODE_STEPS replay only the large pool's blocks."""
    assert _decode_steps(0, False) == [] and _decode_steps(1, False) == []
    assert _decode_steps(2, False) == [(0, 1, False)]
    steps = _decode_steps(10, False)
    assert [d for d, _, _ in steps] == list(range(9)) and all(g == 1 for _, g, _ in steps)
    assert [q for _, _, q in steps] == [i >= FULL_DECODE_STEPS and i < 9 - FULL_DECODE_STEPS for i in range(9)]


@settings(max_examples=60, deadline=None)
@given(new=st.integers(min_value=0, max_value=5000), shortcut=st.booleans())
def test_decode_steps_add_every_generated_token_but_the_last(new: int, shortcut: bool) -> None:
    """The caches end at prompt + new - 1 tokens (the last token is sampled, not fed back); the shortcut takes at most
    three steps, the last of one token."""
    steps = _decode_steps(new, shortcut)
    assert sum(g for _, g, _ in steps) == max(0, new - 1)
    assert all(d == sum(g for _, g, _ in steps[:i]) for i, (d, _, _) in enumerate(steps))
    if shortcut:
        assert len(steps) <= 3 and (not steps or steps[-1][1] == 1)


@pytest.mark.parametrize(
    ("cfg", "batch", "prompt", "new"),
    [
        (config(), 1, 1, 300),
        (config(), 4, 100, 200),
        (config(sliding_window=64), 2, 1000, 100),
        (config(model_type="made-up"), 2, 16, 500),
        (config(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2), 2, 16, 500),
    ],
)
def test_the_shortcut_keeps_the_peak_allocated(cfg: dict[str, Any], batch: int, prompt: int, new: int) -> None:
    """Replaying three steps of a long generation finds the same peak allocated as replaying every step: the last step,
    where the peak is, holds the same blocks either way. (Exact in the small pool, where every block is split to its
    rounded size; large blocks handed out whole make the placement, hence the reserve, depend on the steps before.)"""
    shape, w = shape_and_weights(cfg)
    lay = stream_layout(shape, tp=1)
    sizes = stream_weight_sizes(w, shape, 1)
    short = vram_stream.replay(lay, sizes, batch=batch, prompt=prompt, new_tokens=new, shortcut=True)
    every = vram_stream.replay(lay, sizes, batch=batch, prompt=prompt, new_tokens=new)
    assert short.allocated == every.allocated


@settings(max_examples=100, deadline=None)
@given(past=st.integers(min_value=0, max_value=5000), grow=st.integers(min_value=1, max_value=5000),
       window=st.integers(min_value=1, max_value=4096))
def test_a_sliding_cache_holds_at_most_its_window(past: int, grow: int, window: int) -> None:
    """A sliding layer keeps ``window - 1`` visible tokens and concatenates the new ones: at most ``window`` tokens,
    every token while the sequence is shorter; a full layer keeps them all."""
    held = _cached_after(past, grow, window)
    assert held == min(past + grow, window)
    assert _cached_after(past, grow, 0) == past + grow


# -- properties over small llama-style configs -------------------------------------------------------------------


@st.composite
def llama_configs(draw: st.DrawFn) -> dict[str, Any]:
    heads = draw(st.sampled_from([1, 2, 4, 8]))
    kv_heads = draw(st.sampled_from([k for k in (1, 2, 4, 8) if heads % k == 0]))
    return config(
        hidden_size=draw(st.sampled_from([32, 64, 128, 256])),
        intermediate_size=draw(st.integers(min_value=16, max_value=512)),
        num_hidden_layers=draw(st.integers(min_value=1, max_value=3)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=draw(st.sampled_from([8, 16, 32, 64])),
        vocab_size=draw(st.integers(min_value=16, max_value=2048)),
        torch_dtype=draw(st.sampled_from(sorted(HEADER_DTYPES))),
        sliding_window=draw(st.one_of(st.none(), st.integers(min_value=4, max_value=128))),
        model_type=draw(st.sampled_from(["llama", "mistral", "qwen2", "made-up"])),
    )


@settings(max_examples=100, deadline=None)
@given(cfg=llama_configs(), batch=st.integers(min_value=1, max_value=4), context=st.integers(min_value=1, max_value=1024),
       new=st.integers(min_value=0, max_value=64), tp=st.sampled_from([1, 2]))
def test_replay_and_estimate_invariants(cfg: dict[str, Any], batch: int, context: int, new: int, tp: int) -> None:
    """For any small config and run point the replay runs, the allocator never holds less than it hands out, and the
    estimate covers the weights, the cache, CUDA's context and the libraries.

    ``reserved`` is a sum of segments, each a multiple of 2 MiB (small-pool segments, 20 MiB ones, large ones rounded
    to 2 MiB); allocated blocks are carved from them; the weights are allocated first and never freed.
    """
    shape, weights = shape_and_weights(cfg, llama_header(cfg, HEADER_DTYPES[cfg["torch_dtype"]]))
    run = RunConfig(runtime="transformers", context=context, batch=batch, new_tokens=new, tensor_parallel=tp)
    e = estimate(shape, weights, run)
    sizes = stream_weight_sizes(weights, shape, tp)
    lay = stream_layout(shape, tp=tp)
    peaks = vram_stream.replay(lay, sizes, batch=batch, prompt=e.prompt_tokens, new_tokens=e.new_tokens)
    assert peaks.reserved >= peaks.in_use >= peaks.allocated >= sum(sizes) + CUBLAS_WORKSPACE_BYTES
    assert peaks.reserved % SMALL_SEGMENT == 0 and peaks.in_use % SMALL_SEGMENT == 0
    b = e.breakdown
    assert b.weights == sum(sizes)
    assert e.per_gpu_bytes == b.weights + b.kv_cache + b.activations + b.overhead
    assert e.per_gpu_bytes >= b.weights + b.kv_cache + CUDA_CONTEXT_BYTES + LIBRARY_BYTES
    # the estimate is what the allocator must hold at once (its segments with a live block) plus what lives outside
    # it; on a roomy GPU it shows its whole reserve. The analytic cache is never below what the stream holds.
    outside = CUDA_CONTEXT_BYTES + LIBRARY_BYTES + e.overhead.communication
    floor = b.weights + b.kv_cache + CUBLAS_WORKSPACE_BYTES
    assert e.per_gpu_bytes == max(peaks.in_use, floor) + outside
    assert e.peak_reserved_bytes == max(peaks.reserved, floor) + outside >= e.per_gpu_bytes
    assert min(b.activations, e.overhead.allocator) >= 0


# -- the conservative path ------------------------------------------------------------------------------------------


def test_an_unknown_model_type_takes_math_attention_and_no_window() -> None:
    """A model type whose attention code is not known runs SDPA's math kernel in the stream (float32 scores of
    batch x heads x prompt x prompt) with a mask, and no sliding window is trusted for its cache."""
    shape, _ = shape_and_weights(config(model_type="made-up", sliding_window=64))
    lay = stream_layout(shape, tp=1)
    assert lay.attention == "math"
    assert lay.sdpa_mask_always
    assert lay.layer_windows == (0, 0)


def test_an_unknown_model_type_is_estimated_at_least_as_high_as_llama() -> None:
    """Same shape, same weights, a 2,032-token prompt: the math kernel's float32 scores (2 x 4 x 2032 x 2032 x 4 bytes,
    126 MiB, several alive at once) dwarf anything flash attention holds; the cache is the same full-length one."""
    run = RunConfig(runtime="transformers", context=2048, batch=2, new_tokens=16)
    known_shape, w = shape_and_weights(config())
    unknown_shape, _ = shape_and_weights(config(model_type="made-up"))
    known, unknown = estimate(known_shape, w, run), estimate(unknown_shape, w, run)
    assert unknown.breakdown.kv_cache == known.breakdown.kv_cache
    assert unknown.per_gpu_bytes >= known.per_gpu_bytes
    assert unknown.breakdown.activations >= 2 * 4 * 2032 * 2032 * 4  # one float32 score block at least


def test_an_unknown_sliding_model_caches_the_whole_context() -> None:
    """The conservative path trusts no window: the cache is the full context, the same as without a window."""
    run = RunConfig(runtime="transformers", context=1024, new_tokens=1000)
    shape, w = shape_and_weights(config(model_type="made-up", sliding_window=64))
    full_shape, _ = shape_and_weights(config(model_type="made-up"))
    assert estimate(shape, w, run).breakdown.kv_cache == estimate(full_shape, w, run).breakdown.kv_cache == 1024 * 256


# -- tensor parallel --------------------------------------------------------------------------------------------


def test_tensor_parallel_lowers_the_busiest_gpus_share() -> None:
    """32 heads / 8 KV heads split over 2 GPUs: each holds half of every projection, of the cache and of the
    attention's and MLP's working set; the ~0.97 GB of weights saved outweighs the 512 MiB of communication buffers."""
    cfg = config(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=32000)
    shape, w = shape_and_weights(cfg)
    one = estimate(shape, w, RunConfig(runtime="transformers", context=2048, new_tokens=16))
    two = estimate(shape, w, RunConfig(runtime="transformers", context=2048, new_tokens=16, tensor_parallel=2))
    norms = (4 * 2 + 1) * 4096 * 2  # every GPU keeps the whole RMSNorm weights; every other tensor is split in two
    assert two.breakdown.weights == (one.breakdown.weights - norms) // 2 + norms
    assert two.breakdown.kv_cache * 2 == one.breakdown.kv_cache
    assert two.breakdown.activations <= one.breakdown.activations
    assert two.per_gpu_bytes < one.per_gpu_bytes
    assert two.per_gpu_bytes - two.overhead.communication < one.per_gpu_bytes


def _needed(lay: Layout, sizes: list[int], batch: int, prompt: int, new: int, hi: int) -> int:
    """The least capacity (2 MiB steps) at which ``generate`` runs: the allocator gives cached segments back under
    pressure (vram_alloc.CachingAllocator), so this, not an unbounded run's peak reserved, is what must fit."""
    lo = 0
    while hi - lo > 2 * MiB:
        mid = (lo + hi) // 2
        try:
            vram_stream.replay(lay, sizes, batch=batch, prompt=prompt, new_tokens=new, capacity=mid)
            hi = mid
        except OutOfMemory:
            lo = mid
    return hi


@pytest.mark.parametrize(("batch", "prompt", "new"), [(8, 16, 400), (4, 300, 300), (16, 64, 200), (2, 8, 900)])
def test_the_figure_is_the_least_memory_generate_runs_in(batch: int, prompt: int, new: int) -> None:
    """A long generation replayed step by step on an unbounded allocator reserves more than it needs (each grown
    cache block is too big for the freed ones and gets a new segment, which stays cached); on a GPU the allocator
    gives idle segments back when memory runs short. The estimate's figure, the peak of the segments holding a live
    block, is the least capacity the generation runs in; the shortcut's may be below it (the searches check theirs
    with every step), by at most vram.SHORTCUT_MARGIN."""
    cfg = config(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                 num_hidden_layers=4, vocab_size=1000)
    shape, w = shape_and_weights(cfg)
    lay = stream_layout(shape, tp=1)
    sizes = stream_weight_sizes(w, shape, 1)
    every = vram_stream.replay(lay, sizes, batch=batch, prompt=prompt, new_tokens=new)
    needed = _needed(lay, sizes, batch, prompt, new, every.reserved + 2 * MiB)  # within 2 MiB above the least
    assert needed - 2 * MiB <= every.in_use <= needed <= every.reserved + 2 * MiB
    short = vram_stream.replay(lay, sizes, batch=batch, prompt=prompt, new_tokens=new, shortcut=True)
    assert short.in_use * SHORTCUT_MARGIN >= every.in_use


# -- hostile configs and runs: bounded work, named refusals --------------------------------------------------------


def test_a_config_claiming_thousands_of_layers_is_refused() -> None:
    """The stream replays every layer: a config.json claiming more layers than any model has is a usage error (exit 2)
    with what to check, not minutes of work."""
    with pytest.raises(ModelConfigError, match="layers is not plausible"):
        model_shape(config(num_hidden_layers=100_000))


def test_a_huge_generation_is_estimated_with_the_raised_shortcut() -> None:
    """A billion new tokens (or thousands of layers generating thousands) would be hours of decode steps: past
    EVERY_STEP_BUDGET layer-steps the estimate is the shortcut's figure raised by SHORTCUT_MARGIN, and says so."""
    shape, w = shape_and_weights(config())
    run = RunConfig(runtime="transformers", context=1 << 31, new_tokens=1 << 30)
    e = estimate(shape, w, run)
    assert any("not replayed one by one" in n for n in e.notes)
    short = estimate(shape, w, run, shortcut=True)
    assert e.per_gpu_bytes > short.per_gpu_bytes
    small = RunConfig(runtime="transformers", context=600, new_tokens=100)
    assert shape.num_layers * 99 <= EVERY_STEP_BUDGET and not any("not replayed" in n for n in estimate(shape, w, small).notes)


@pytest.mark.parametrize("model_type", sorted(vram_models.MODEL_CODE))
def test_every_model_types_code_is_a_layout_the_stream_runs(model_type: str) -> None:
    """vram_models names Layout fields by string: each entry must name real fields, and the stream must run it."""
    fields = {f.name for f in dataclasses.fields(Layout)}
    assert set(vram_models.code_for(model_type)) <= fields
    shape, w = shape_and_weights(config(model_type=model_type))
    lay = stream_layout(shape, tp=1)
    assert all(getattr(lay, k) == v for k, v in vram_models.code_for(model_type).items())
    p = vram_stream.replay(lay, stream_weight_sizes(w, shape, 1), batch=2, prompt=64, new_tokens=4)
    assert p.reserved >= p.in_use >= p.allocated > 0


def test_a_type_not_in_the_table_runs_as_llama() -> None:
    assert vram_models.code_for("llama") == {} and vram_models.code_for("no-such-type") == {}


def test_fit_says_when_a_roomy_gpu_would_show_more_than_must_fit() -> None:
    """A long generation leaves cached segments nothing lives in: ``peak_reserved_bytes`` (what nvidia-smi would show
    with room to spare) is above ``per_gpu_bytes`` (what must fit), and fit's notes say why."""
    cfg = config(hidden_size=1024, intermediate_size=2048, num_attention_heads=16, num_key_value_heads=16, head_dim=64,
                 num_hidden_layers=8, vocab_size=1000)
    shape, w = shape_and_weights(cfg)
    r = fit(shape, w, RunConfig(runtime="transformers", context=516, batch=16, new_tokens=500),
            GpuBudget(name="t", count=1, memory_bytes=8 << 30))
    est = r.estimate
    assert est.peak_reserved_bytes is not None and est.peak_reserved_bytes * 50 > est.per_gpu_bytes * 51
    assert any("room to spare" in n and "what must fit" in n for n in r.notes)
    short = fit(shape, w, RunConfig(runtime="transformers", context=72, batch=4, new_tokens=8),
                GpuBudget(name="t", count=1, memory_bytes=8 << 30))
    assert not any("room to spare" in n for n in short.notes)


def test_a_misspelt_code_name_is_refused() -> None:
    """vram_models spells the stream's mechanisms as strings; a misspelt one must fail loudly, never run as the default."""
    shape, _ = shape_and_weights(config())
    lay = stream_layout(shape, tp=1)
    with pytest.raises(ValueError, match="norm"):
        dataclasses.replace(lay, norm="layer_fp23")
    with pytest.raises(ValueError, match="moe_router"):
        dataclasses.replace(lay, moe_router="sigmoid")
