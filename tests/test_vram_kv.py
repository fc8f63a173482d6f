"""KV cache per attention layout, hand-computed on small configs.

Each test states the formula it expects; a wrong KV term is the error that
makes a fit calculator off by a factor (GQA, MLA, sliding windows).
"""

from __future__ import annotations

import pytest
from vram_fixtures import config, shape_and_weights

from airpack.errors import ModelConfigError
from airpack.vram import RunConfig, estimate, kv_layer_token_bytes, kv_sequence_bytes, model_shape


def kv(cfg: dict, *, context: int, batch: int = 1, runtime: str = "transformers", tp: int = 1, kv_dtype: str = "auto") -> int:
    shape, weights = shape_and_weights(cfg)
    # all but one token generated: the windowed cache as decoding holds it (a long prompt keeps the whole prompt at the
    # prefill under transformers, tested in test_vram_runtime.py)
    run = RunConfig(runtime=runtime, context=context, batch=batch, new_tokens=context - 1, tensor_parallel=tp, kv_dtype=kv_dtype)
    return estimate(shape, weights, run).breakdown.kv_cache


# -- multi-head, grouped-query, multi-query ---------------------------------------------------


def test_mha_keys_and_values_of_every_head() -> None:
    cfg = config(num_attention_heads=4, num_key_value_heads=4)
    # 2 (K and V) x 2 layers x 4 heads x 16 dims x 2 bytes = 512 bytes per token
    assert model_shape(cfg).attention == "MHA"
    assert kv(cfg, context=100, batch=3) == 3 * 100 * 512


def test_gqa_only_the_kv_heads_are_cached() -> None:
    cfg = config(num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    # 2 x 2 layers x 2 KV heads x 8 x 2 bytes = 128 bytes per token, not 8 heads' worth
    assert model_shape(cfg).attention == "GQA"
    assert kv(cfg, context=1000) == 1000 * 128


def test_mqa_one_kv_head() -> None:
    cfg = config(num_key_value_heads=1)
    assert model_shape(cfg).attention == "MQA"
    assert kv(cfg, context=64) == 64 * (2 * 2 * 1 * 16 * 2)


def test_mqa_from_multi_query_flag() -> None:
    cfg = config(num_key_value_heads=None, multi_query=True)
    assert model_shape(cfg).num_kv_heads == 1


def test_missing_kv_heads_means_mha_and_missing_head_dim_is_hidden_over_heads() -> None:
    cfg = config(num_key_value_heads=None, head_dim=None)  # 64 / 4 heads = 16
    s = model_shape(cfg)
    assert (s.num_kv_heads, s.head_dim) == (4, 16)
    assert kv(cfg, context=10) == 10 * 2 * 2 * 4 * 16 * 2


def test_head_dim_null_falls_back() -> None:
    assert model_shape(config(head_dim=None, hidden_size=96, num_attention_heads=6)).head_dim == 16


def test_transformers_kv_counts_prompt_plus_new_tokens() -> None:
    cfg = config()
    shape, weights = shape_and_weights(cfg)
    est = estimate(shape, weights, RunConfig(runtime="transformers", context=2048 + 16, batch=8, new_tokens=16))
    assert (est.prompt_tokens, est.new_tokens) == (2048, 16)
    assert est.breakdown.kv_cache == 8 * (2048 + 16) * (2 * 2 * 2 * 16 * 2)


# -- dtypes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kv_dtype", "bytes_per_elem"), [("auto", 2), ("bf16", 2), ("fp16", 2), ("fp8", 1), ("fp32", 4)])
def test_kv_dtype(kv_dtype: str, bytes_per_elem: int) -> None:
    assert kv(config(), context=32, kv_dtype=kv_dtype) == 32 * 2 * 2 * 2 * 16 * bytes_per_elem


def test_kv_auto_follows_a_float32_model_in_transformers_but_not_in_vllm() -> None:
    cfg = config(torch_dtype="float32")
    assert kv(cfg, context=32) == 32 * 2 * 2 * 2 * 16 * 4
    assert kv(cfg, context=32, runtime="vllm") == 32 * 2 * 2 * 2 * 16 * 2  # vLLM serves float32 checkpoints in 16 bits


def test_unknown_kv_dtype_is_a_usage_error() -> None:
    with pytest.raises(Exception, match="unknown KV cache dtype"):
        RunConfig(kv_dtype="int3")


# -- MLA ------------------------------------------------------------------------------------------

MLA_CFG = dict(model_type="deepseek_v3", num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=32, qk_rope_head_dim=8,
               qk_nope_head_dim=16, v_head_dim=16, q_lora_rank=24, num_hidden_layers=3)


def test_mla_vllm_stores_one_latent_per_token() -> None:
    cfg = config(**MLA_CFG)
    shape = model_shape(cfg)
    assert shape.attention == "MLA"
    # (kv_lora_rank 32 + qk_rope_head_dim 8) x 2 bytes x 3 layers; no K/V pair, no heads
    assert kv_layer_token_bytes(shape, runtime="vllm", tp=1, kv_bytes=2) == 40 * 2
    assert kv(cfg, context=160, runtime="vllm") == 160 * 3 * 40 * 2


def test_mla_latent_is_replicated_under_tensor_parallelism() -> None:
    cfg = config(**MLA_CFG)
    assert kv(cfg, context=160, runtime="vllm", tp=4) == kv(cfg, context=160, runtime="vllm", tp=1)


def test_mla_transformers_caches_the_latent_too() -> None:
    """transformers 5 caches the normed latent and the rotated k_pe (the trace shows it), like vLLM, not the expansion."""
    cfg = config(**MLA_CFG)
    # (kv_lora_rank 32 + rope 8) x 2 bytes x 3 layers, the same on every GPU
    assert kv(cfg, context=10) == 10 * 3 * (32 + 8) * 2
    assert kv(cfg, context=10, tp=2) == kv(cfg, context=10)


def test_mla_with_fp8_cache() -> None:
    assert kv(config(**MLA_CFG), context=16, runtime="vllm", kv_dtype="fp8") == 16 * 3 * 40


def test_vllm_rounds_each_sequence_to_whole_blocks() -> None:
    cfg = config(**MLA_CFG)
    assert kv(cfg, context=17, runtime="vllm") == 32 * 3 * 40 * 2  # 17 tokens take two 16-token blocks


# -- sliding windows ---------------------------------------------------------------------------------

PER_LAYER = 2 * 2 * 16 * 2  # K and V x 2 KV heads x 16 dims x 2 bytes


def test_sliding_window_caps_every_layer_when_config_has_no_switch() -> None:
    cfg = config(model_type="mistral", sliding_window=100)
    assert model_shape(cfg).layer_kinds == ("sliding", "sliding")
    assert kv(cfg, context=1000) == 2 * 100 * PER_LAYER
    assert kv(cfg, context=50) == 2 * 50 * PER_LAYER  # below the window the window does not matter


def test_use_sliding_window_false_disables_the_window() -> None:
    cfg = config(model_type="qwen2", sliding_window=100, use_sliding_window=False, max_window_layers=1)
    assert model_shape(cfg).layer_kinds == ("full", "full")
    assert kv(cfg, context=1000) == 2 * 1000 * PER_LAYER


def test_use_sliding_window_true_slides_the_layers_from_max_window_layers_on() -> None:
    cfg = config(model_type="qwen2", num_hidden_layers=4, sliding_window=100, use_sliding_window=True, max_window_layers=1)
    assert model_shape(cfg).layer_kinds == ("full", "sliding", "sliding", "sliding")
    assert kv(cfg, context=1000) == (1000 + 3 * 100) * PER_LAYER


def test_null_sliding_window_means_full_attention() -> None:
    cfg = config(model_type="mistral", sliding_window=None)
    assert kv(cfg, context=1000) == 2 * 1000 * PER_LAYER


def test_layer_types_mix_full_and_sliding() -> None:
    cfg = config(num_hidden_layers=4, sliding_window=128,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    assert kv(cfg, context=4096) == (2 * 128 + 2 * 4096) * PER_LAYER


def test_layer_types_override_use_sliding_window_fields() -> None:
    cfg = config(model_type="qwen3", num_hidden_layers=2, sliding_window=64, use_sliding_window=False,
                 layer_types=["full_attention", "full_attention"])
    assert kv(cfg, context=1000) == 2 * 1000 * PER_LAYER


def test_gemma3_pattern_from_model_type_when_layer_types_are_absent() -> None:
    cfg = config(model_type="gemma3_text", num_hidden_layers=12, sliding_window=512)
    kinds = model_shape(cfg).layer_kinds
    assert [i for i, k in enumerate(kinds) if k == "full"] == [5, 11]  # every 6th layer is global
    assert kv(cfg, context=8192) == (10 * 512 + 2 * 8192) * PER_LAYER


def test_explicit_sliding_window_pattern() -> None:
    cfg = config(num_hidden_layers=4, sliding_window=10, sliding_window_pattern=2)
    assert model_shape(cfg).layer_kinds == ("sliding", "full", "sliding", "full")


def test_chunked_attention_layers_hold_one_chunk() -> None:
    cfg = config(model_type="llama4_text", num_hidden_layers=4, attention_chunk_size=256,
                 layer_types=["chunked_attention", "chunked_attention", "chunked_attention", "full_attention"])
    assert kv(cfg, context=1024, runtime="vllm") == (3 * 256 + 1024) * PER_LAYER
    # transformers: llama4's cache class is not one the estimator knows, so the conservative path caches every token
    assert kv(cfg, context=1024) == 4 * 1024 * PER_LAYER


def test_mamba_layers_hold_no_per_token_cache() -> None:
    cfg = config(num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "attention"])
    shape = model_shape(cfg)
    assert shape.layer_kinds == ("none", "full", "none", "full")
    assert kv(cfg, context=100) == 2 * 100 * PER_LAYER
    assert any("state" in n for n in shape.notes)


def test_kv_sequence_bytes_is_monotone_in_tokens() -> None:
    shape = model_shape(config(num_hidden_layers=4, sliding_window=32, sliding_window_pattern=2))
    last = -1
    for t in range(0, 200, 7):
        now = kv_sequence_bytes(shape, t, runtime="transformers", tp=1, kv_bytes=2)
        assert now >= last
        last = now


# -- tensor parallelism -----------------------------------------------------------------------------


def test_tp_splits_kv_heads() -> None:
    cfg = config(num_attention_heads=8, num_key_value_heads=8)
    assert kv(cfg, context=10, tp=4) == kv(cfg, context=10) // 4


def test_tp_with_fewer_kv_heads_than_gpus_replicates_one_head_per_gpu() -> None:
    cfg = config(num_attention_heads=8, num_key_value_heads=2)
    one_head = 10 * 2 * 2 * 1 * 16 * 2  # tokens x K,V x layers x 1 head x dim x bytes
    assert kv(cfg, context=10, tp=2) == one_head
    assert kv(cfg, context=10, tp=8) == one_head  # not 2/8 of a head: every GPU keeps a whole one


# -- multimodal nesting ---------------------------------------------------------------------------------


def test_text_config_of_a_multimodal_model() -> None:
    text = config(model_type="gemma3_text", num_hidden_layers=6, sliding_window=512, torch_dtype=None)
    cfg = {"model_type": "gemma3", "torch_dtype": "bfloat16", "vision_config": {"hidden_size": 32, "num_hidden_layers": 30},
           "text_config": text}
    shape = model_shape(cfg)
    assert (shape.model_type, shape.num_layers, shape.hidden_size, shape.dtype) == ("gemma3_text", 6, 64, "bfloat16")
    assert shape.layer_kinds.count("full") == 1


def test_deeper_nesting_is_followed() -> None:
    cfg = {"model_type": "omni", "thinker_config": {"text_config": config(num_hidden_layers=5)}}
    assert model_shape(cfg).num_layers == 5


# -- configs the estimator must refuse by name --------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        config(hidden_size=None),
        config(num_hidden_layers="32"),
        config(num_attention_heads=0),
        config(vocab_size=-5),
        config(num_hidden_layers=10**9),
        config(sliding_window=True, vocab_size=1.5),
    ],
)
def test_unusable_config_is_a_named_error(bad: dict) -> None:
    with pytest.raises(ModelConfigError):
        model_shape(bad)


def test_config_that_is_not_an_object() -> None:
    with pytest.raises(ModelConfigError):
        model_shape([1, 2, 3])  # type: ignore[arg-type]
