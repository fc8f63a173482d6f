"""How transformers' modeling code runs each model type, as the stream (``vram_stream``) needs it.

The shape of a model (widths, heads, layers, windows, experts) comes from its
config.json; what its code *does* with them does not: whether the norm is an
RMSNorm that upcasts to float32 or a LayerNorm, whether q, k and v come from one
fused matmul, whether the rotary embedding runs in float32, which tensors the
layer's local variables keep alive until it returns. Those differences decide
which blocks are born when, so each is written here once per model type, as
the ``vram_stream.Layout`` fields that differ from Llama's code (transformers
5.x; every entry was checked op by op against the trace, ``vram_trace``, on the
architecture matrix of tests/vram_fixtures.py).

A model type not listed runs as Llama's code does; whether its attention path
is known is decided separately (``vram.ATTENTION_PATHS``): an unknown one is
estimated with the math kernel and a full-length cache.
"""

from __future__ import annotations

from typing import Any

_LAYER_NORM: dict[str, Any] = {"norm": "layer"}
_GEMMA: dict[str, Any] = {"norm": "rms_fp32", "embed_scale": True}
_GEMMA_SANDWICH: dict[str, Any] = {**_GEMMA, "post_norm": True}
_QK_NORM: dict[str, Any] = {"qk_norm": True, "qk_norm_inline": True}
_COHERE: dict[str, Any] = {"norm": "layer_fp32", "parallel": True, "rope_upcast": True}
_GRANITE: dict[str, Any] = {"embed_scale": True, "residual_scale": True}

#: Per model type: the Layout fields its modeling code sets differently from Llama's.
MODEL_CODE: dict[str, dict[str, Any]] = {
    # LayerNorm families, learned or no positions
    "gpt2": {**_LAYER_NORM, "rope_dim": 0, "fused_qkv": True, "keeps_branches": True, "learned_positions": True},
    "opt": {**_LAYER_NORM, "rope_dim": 0},
    "gpt_bigcode": {**_LAYER_NORM, "rope_dim": 0},
    "bloom": {**_LAYER_NORM, "rope_dim": 0, "fused_qkv": True, "embed_norm": True, "block_locals": True, "eager": "bloom"},
    "mpt": {**_LAYER_NORM, "rope_dim": 0, "fused_qkv": True, "block_locals": True, "eager": "mpt"},
    "starcoder2": {**_LAYER_NORM},
    "stablelm": {**_LAYER_NORM, "attn_out_copy": True, "keeps_branches": True},
    # parallel attention and MLP
    "gpt_neox": {**_LAYER_NORM, "parallel": True, "parallel_norms": 2, "fused_qkv": True, "attn_out_copy": True,
                 "rope_parts_die": True},
    "gptj": {**_LAYER_NORM, "parallel": True},
    "phi": {**_LAYER_NORM, "parallel": True, "attn_out_copy": True},
    "falcon": {**_LAYER_NORM, "parallel": True, "fused_qkv": True, "sdpa_repeat_kv": False},
    "cohere": dict(_COHERE),
    "cohere2": dict(_COHERE),
    # RMSNorm variants
    "phi3": {"fused_qkv": True, "attn_out_copy": True, "rope_concat": True, "rope_parts_die": True},
    "gemma": dict(_GEMMA),
    "gemma2": dict(_GEMMA_SANDWICH),
    "gemma3": {**_GEMMA_SANDWICH, "qk_norm": True, "rope_tables": 2},
    "gemma3_text": {**_GEMMA_SANDWICH, "qk_norm": True, "rope_tables": 2},
    "olmo": {"norm": "layer_f32", "rope_fp32": True},
    "olmo2": {"norm": "rms_w32", "pre_norm": False, "post_norm": True, "rope_fp32": True, **_QK_NORM, "qk_norm_full": True},
    "olmo3": {"rope_fp32": True},
    "olmoe": {**_QK_NORM, "qk_norm_full": True},
    "qwen3": dict(_QK_NORM),
    "qwen3_moe": dict(_QK_NORM),
    "granite": dict(_GRANITE),
    "granitemoe": dict(_GRANITE),
    "exaone4": {"pre_norm": False, "post_norm": True, "qk_norm": True, "rope_sliding_only": True},
    "glm4": {"post_norm": True, "rope_interleaved": True, "rope_parts_die": True, "attn_out_copy": True},
    # mixture-of-experts routers and experts
    "mixtral": {"moe_router": "f32"},
    "phimoe": {**_LAYER_NORM},  # sparsemixer routing: its tensors are rows x experts, written as the default router
    "qwen2_moe": {"moe_shared_gate": True},
    "deepseek_v2": {"moe_router": "f32_input"},
    # lightning (linear) attention in 256-token blocks (MiniMaxConfig.block_size), the normed input as residual
    "minimax": {"moe_router": "f32", "moe_norm_topk": True, "lightning_block": 256, "residual_normed": True},
    "deepseek_v3": {"moe_router": "sigmoid_groups", "mla_rope_interleave": True},
    "gpt_oss": {"eager": "sinks", "moe_router": "topk_first", "moe_bias": True},
}


def code_for(model_type: str) -> dict[str, Any]:
    """The Layout fields ``model_type``'s code sets (empty: Llama's code)."""
    return MODEL_CODE.get(model_type, {})
