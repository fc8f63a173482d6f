"""Small configs and synthetic safetensors headers for the VRAM estimator's unit tests.

Headers are built from (name, dtype, shape) only: the estimator never reads a
tensor's bytes, so the tests need no weight files.
"""

from __future__ import annotations

from typing import Any

from airpack.safetensors_check import DTYPE_BITS, TensorInfo
from airpack.vram import ModelShape, Weights, collect_weights, model_shape

MiB = 1 << 20
GiB = 1 << 30


def tensors(*specs: tuple[str, str, tuple[int, ...]]) -> list[TensorInfo]:
    """TensorInfo for (name, safetensors dtype, shape), laid out back to back."""
    out = []
    pos = 0
    for name, dtype, shape in specs:
        n = 1
        for d in shape:
            n *= d
        size = n * DTYPE_BITS[dtype] // 8
        out.append(TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=pos, end=pos + size))
        pos += size
    return out


def config(**kw: Any) -> dict[str, Any]:
    """A small Llama-style config.json; keyword arguments override or add fields (None removes one)."""
    cfg: dict[str, Any] = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 256,
        "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    for k, v in kw.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


def llama_header(cfg: dict[str, Any], dtype: str = "BF16") -> list[TensorInfo]:
    """The tensors a Llama checkpoint of ``cfg`` holds (lm_head only when untied)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    specs: list[tuple[str, str, tuple[int, ...]]] = [("model.embed_tokens.weight", dtype, (v, h)), ("model.norm.weight", dtype, (h,))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        specs += [
            (p + "self_attn.q_proj.weight", dtype, (q, h)),
            (p + "self_attn.k_proj.weight", dtype, (kv, h)),
            (p + "self_attn.v_proj.weight", dtype, (kv, h)),
            (p + "self_attn.o_proj.weight", dtype, (h, q)),
            (p + "mlp.gate_proj.weight", dtype, (i, h)),
            (p + "mlp.up_proj.weight", dtype, (i, h)),
            (p + "mlp.down_proj.weight", dtype, (h, i)),
            (p + "input_layernorm.weight", dtype, (h,)),
            (p + "post_attention_layernorm.weight", dtype, (h,)),
        ]
    if not cfg.get("tie_word_embeddings"):
        specs.append(("lm_head.weight", dtype, (v, h)))
    return tensors(*specs)


def shape_and_weights(cfg: dict[str, Any], header: list[TensorInfo] | None = None) -> tuple[ModelShape, Weights]:
    shape = model_shape(cfg)
    return shape, collect_weights(header if header is not None else llama_header(cfg), shape=shape)


# -- the architecture matrix: real configs of published models (the fields that size them) -------------------------
#
# Each entry is the config.json of the named checkpoint as published, cut to the fields that size memory (the rest
# takes transformers' defaults); ``layers`` is the reduced depth the matrix traces at (each layer kind kept) and
# ``family`` groups them in the benchmark table.

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama-2-7b": {"family": "dense MHA", "layers": 4, "config": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
        "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05, "torch_dtype": "float16", "tie_word_embeddings": False}},
    "llama-3.1-8b": {"family": "dense GQA", "layers": 4, "config": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False}},
    "qwen2.5-7b": {"family": "dense GQA", "layers": 4, "config": {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
        "num_key_value_heads": 4, "num_hidden_layers": 28, "vocab_size": 152064, "max_position_embeddings": 32768,
        "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28, "rope_theta": 1000000.0,
        "torch_dtype": "bfloat16", "tie_word_embeddings": False}},
    "qwen3-8b": {"family": "dense GQA", "layers": 4, "config": {
        "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 36, "vocab_size": 151936,
        "max_position_embeddings": 40960, "use_sliding_window": False, "torch_dtype": "bfloat16", "tie_word_embeddings": False}},
    "granite-3.0-8b": {"family": "dense GQA", "layers": 4, "config": {
        "model_type": "granite", "hidden_size": 4096, "intermediate_size": 12800, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 40, "vocab_size": 49155, "max_position_embeddings": 4096,
        "attention_multiplier": 0.0078125, "embedding_multiplier": 12.0, "logits_scaling": 16.0, "residual_multiplier": 0.22,
        "torch_dtype": "bfloat16", "tie_word_embeddings": True}},
    "olmo-2-7b": {"family": "dense MHA", "layers": 4, "config": {
        "model_type": "olmo2", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
        "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 100352, "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16", "tie_word_embeddings": False}},
    "stablelm-2-1.6b": {"family": "dense MHA", "layers": 4, "config": {
        "model_type": "stablelm", "hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32,
        "num_key_value_heads": 32, "num_hidden_layers": 24, "vocab_size": 100352, "max_position_embeddings": 4096,
        "partial_rotary_factor": 0.25, "use_qkv_bias": True, "torch_dtype": "bfloat16", "tie_word_embeddings": False}},
    "gpt2-medium": {"family": "dense MHA", "layers": 4, "config": {
        "model_type": "gpt2", "n_embd": 1024, "n_head": 16, "n_layer": 24, "vocab_size": 50257, "n_positions": 1024,
        "n_ctx": 1024, "torch_dtype": "float32"}},
    "falcon-7b": {"family": "MQA / parallel attention", "layers": 4, "config": {
        "model_type": "falcon", "hidden_size": 4544, "num_attention_heads": 71, "num_hidden_layers": 32, "vocab_size": 65024,
        "multi_query": True, "parallel_attn": True, "new_decoder_architecture": False, "alibi": False, "bias": False,
        "max_position_embeddings": 2048, "torch_dtype": "bfloat16"}},
    "starcoder2-7b": {"family": "sliding window", "layers": 4, "config": {
        "model_type": "starcoder2", "hidden_size": 4608, "intermediate_size": 18432, "num_attention_heads": 36,
        "num_key_value_heads": 4, "num_hidden_layers": 32, "vocab_size": 49152, "max_position_embeddings": 16384,
        "sliding_window": 4096, "use_bias": True, "torch_dtype": "bfloat16"}},
    "mistral-7b-v0.1": {"family": "sliding window", "layers": 4, "config": {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 32000, "max_position_embeddings": 32768,
        "sliding_window": 4096, "torch_dtype": "bfloat16", "tie_word_embeddings": False}},
    "phi-3-mini-4k": {"family": "sliding window", "layers": 4, "config": {
        "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 32,
        "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 32064, "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096, "sliding_window": 2047, "torch_dtype": "bfloat16", "tie_word_embeddings": False}},
    "gemma-2-9b": {"family": "sliding window / softcapped", "layers": 4, "config": {
        "model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 256, "num_hidden_layers": 42, "vocab_size": 256000,
        "max_position_embeddings": 8192, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256, "torch_dtype": "bfloat16"}},
    "gemma-3-4b": {"family": "sliding window / softcapped", "layers": 6, "config": {
        "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256, "num_hidden_layers": 34, "vocab_size": 262208,
        "max_position_embeddings": 131072, "sliding_window": 1024, "query_pre_attn_scalar": 256, "torch_dtype": "bfloat16"}},
    "command-r7b": {"family": "sliding window / softcapped", "layers": 4, "config": {
        "model_type": "cohere2", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 256000, "max_position_embeddings": 8192,
        "sliding_window": 4096, "torch_dtype": "bfloat16"}},
    "gpt-neox-pythia-1.4b": {"family": "MQA / parallel attention", "layers": 4, "config": {
        "model_type": "gpt_neox", "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 16,
        "num_hidden_layers": 24, "vocab_size": 50304, "max_position_embeddings": 2048, "rotary_pct": 0.25,
        "use_parallel_residual": True, "torch_dtype": "float16", "tie_word_embeddings": False}},
    "phi-2": {"family": "MQA / parallel attention", "layers": 4, "config": {
        "model_type": "phi", "hidden_size": 2560, "intermediate_size": 10240, "num_attention_heads": 32,
        "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 51200, "max_position_embeddings": 2048,
        "partial_rotary_factor": 0.4, "torch_dtype": "float16", "tie_word_embeddings": False}},
    "bloom-560m": {"family": "ALiBi", "layers": 4, "config": {
        "model_type": "bloom", "hidden_size": 1024, "n_head": 16, "n_layer": 24, "vocab_size": 250880,
        "torch_dtype": "float16"}},
    "mpt-7b": {"family": "ALiBi", "layers": 4, "config": {
        "model_type": "mpt", "d_model": 4096, "n_heads": 32, "n_layers": 32, "vocab_size": 50432, "max_seq_len": 2048,
        "expansion_ratio": 4, "attn_config": {"alibi": True}, "torch_dtype": "bfloat16"}},
    "mixtral-8x7b": {"family": "MoE", "layers": 4, "config": {
        "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 32000, "max_position_embeddings": 32768,
        "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None, "torch_dtype": "bfloat16"}},
    "qwen3-30b-a3b": {"family": "MoE", "layers": 4, "config": {
        "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 48,
        "vocab_size": 151936, "max_position_embeddings": 40960, "num_experts": 128, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "norm_topk_prob": True, "torch_dtype": "bfloat16", "tie_word_embeddings": False}},
    "qwen1.5-moe-a2.7b": {"family": "MoE", "layers": 4, "config": {
        "model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_hidden_layers": 24, "vocab_size": 151936, "max_position_embeddings": 8192, "num_experts": 60,
        "num_experts_per_tok": 4, "torch_dtype": "bfloat16", "tie_word_embeddings": False}},
    "olmoe-1b-7b": {"family": "MoE", "layers": 4, "config": {
        "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_hidden_layers": 16, "vocab_size": 50304, "max_position_embeddings": 4096,
        "num_experts": 64, "num_experts_per_tok": 8, "torch_dtype": "bfloat16"}},
    "deepseek-v2-lite": {"family": "MLA", "layers": 4, "config": {
        "model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_attention_heads": 16, "num_key_value_heads": 16, "num_hidden_layers": 27, "vocab_size": 102400,
        "max_position_embeddings": 163840, "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "torch_dtype": "bfloat16", "tie_word_embeddings": False}},
    "gpt-oss-20b": {"family": "MoE", "layers": 4, "config": {
        "model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_attention_heads": 64,
        "num_key_value_heads": 8, "head_dim": 64, "num_hidden_layers": 24, "vocab_size": 201088,
        "max_position_embeddings": 131072, "num_local_experts": 32, "num_experts_per_tok": 4, "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * 12, "torch_dtype": "bfloat16"}},
    "gpt-j-6b": {"family": "MQA / parallel attention", "layers": 4, "config": {
        "model_type": "gptj", "n_embd": 4096, "n_head": 16, "n_layer": 28, "rotary_dim": 64, "vocab_size": 50400,
        "n_positions": 2048, "torch_dtype": "float16", "tie_word_embeddings": False}},
}

#: Model types the estimator knows but no published config of the matrix covers, on one small synthetic config each
#: (3 layers, hidden 1024): their traces are recorded beside the matrix's (tests/data/vram_trace_matrix.json).
_SMALL: dict[str, Any] = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 4,
                          "head_dim": 64, "vocab_size": 32000, "max_position_embeddings": 8192, "num_hidden_layers": 3,
                          "torch_dtype": "bfloat16", "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_EXPERTS: dict[str, Any] = {"num_local_experts": 8, "num_experts_per_tok": 2}
OTHER_TYPES: dict[str, dict[str, Any]] = {
    "olmo": {**_SMALL, "model_type": "olmo"},
    "smollm3": {**_SMALL, "model_type": "smollm3"},
    "glm4": {**_SMALL, "model_type": "glm4"},
    "exaone4": {**_SMALL, "model_type": "exaone4"},
    "phimoe": {**_SMALL, "model_type": "phimoe", **_EXPERTS},
    "minimax": {**_SMALL, "model_type": "minimax", **_EXPERTS},
    "deepseek_v3": {**{k: v for k, v in _SMALL.items() if k != "head_dim"}, "model_type": "deepseek_v3", "n_routed_experts": 8,
                    "num_experts_per_tok": 2, "moe_intermediate_size": 512, "n_shared_experts": 1, "first_k_dense_replace": 1,
                    "kv_lora_rank": 128, "q_lora_rank": 256, "qk_rope_head_dim": 64, "qk_nope_head_dim": 64, "v_head_dim": 64,
                    "n_group": 2, "topk_group": 1, "num_key_value_heads": 16},
}
#: (batch, prompt, new tokens) the other types were traced at.
OTHER_POINTS = ((1, 512, 8), (1, 2048, 8), (8, 1024, 8), (8, 2048, 8))
#: Long generations (arch of ARCHITECTURES, batch, prompt, new tokens): every decode step grows the caches, and the
#: allocator keeps the old sizes' segments; recorded beside the matrix.
LONG_GENERATIONS = (("llama-3.1-8b", 8, 1024, 64), ("llama-3.1-8b", 1, 2048, 128), ("llama-3.1-8b", 8, 32, 512),
                    ("mistral-7b-v0.1", 8, 512, 96), ("qwen2.5-7b", 4, 300, 200), ("qwen2.5-7b", 16, 64, 300),
                    ("llama-2-7b", 4, 16, 700), ("mixtral-8x7b", 2, 64, 200), ("gemma-2-9b", 2, 128, 300))
