"""Weight bytes from safetensors headers: exact, as stored, counted once, split under TP."""

from __future__ import annotations

from fractions import Fraction

import pytest
from vram_fixtures import config, llama_header, shape_and_weights, tensors

from airpack.vram import (
    RunConfig,
    WeightTensor,
    act_elements_per_token,
    collect_weights,
    estimate,
    model_shape,
    tensor_infos_from_header,
    tensor_share,
    weights_per_gpu,
)


def test_weights_are_the_exact_header_bytes() -> None:
    cfg = config()
    header = llama_header(cfg)
    shape, weights = shape_and_weights(cfg, header)
    assert weights.total_bytes == sum(t.nbytes for t in header)
    assert estimate(shape, weights, RunConfig(runtime="transformers", context=8)).breakdown.weights == weights.total_bytes


# -- tied and repeated tensors -----------------------------------------------------------------------


def test_tied_lm_head_stored_twice_counts_once() -> None:
    cfg = config(tie_word_embeddings=True)
    header = llama_header(cfg) + tensors(("lm_head.weight", "BF16", (256, 64)))  # a checkpoint that kept the copy
    _, weights = shape_and_weights(cfg, header)
    assert weights.total_bytes == sum(t.nbytes for t in header) - 256 * 64 * 2
    assert "lm_head.weight" in weights.skipped


def test_untied_lm_head_counts() -> None:
    cfg = config(tie_word_embeddings=False)
    header = llama_header(cfg)
    assert any(t.name == "lm_head.weight" for t in header)
    assert shape_and_weights(cfg, header)[1].total_bytes == sum(t.nbytes for t in header)


def test_tied_checkpoint_without_lm_head_is_counted_as_is() -> None:
    cfg = config(tie_word_embeddings=True)
    header = llama_header(cfg)
    assert not any(t.name == "lm_head.weight" for t in header)
    assert shape_and_weights(cfg, header)[1].total_bytes == sum(t.nbytes for t in header)


def test_a_tensor_repeated_across_shards_counts_once() -> None:
    cfg = config()
    header = llama_header(cfg)
    again = tensors(("model.norm.weight", "BF16", (64,)))
    assert shape_and_weights(cfg, header + again)[1].total_bytes == sum(t.nbytes for t in header)


def test_speculative_layers_past_num_hidden_layers_are_not_loaded() -> None:
    cfg = config(num_hidden_layers=2)
    header = llama_header(cfg)
    mtp = tensors(("model.layers.2.eh_proj.weight", "BF16", (64, 128)), ("model.layers.2.mlp.up_proj.weight", "BF16", (128, 64)))
    vision = tensors(("model.vision_tower.encoder.layers.7.mlp.fc1.weight", "BF16", (32, 32)))
    _, weights = shape_and_weights(cfg, header + mtp + vision)
    assert weights.total_bytes == sum(t.nbytes for t in header + vision)
    assert sorted(weights.skipped) == ["model.layers.2.eh_proj.weight", "model.layers.2.mlp.up_proj.weight"]


# -- quantized checkpoints, as stored ---------------------------------------------------------------------


def gptq_linear(prefix: str, in_f: int, out_f: int, *, bits: int = 4, group: int = 32) -> list[tuple[str, str, tuple[int, ...]]]:
    return [
        (f"{prefix}.qweight", "I32", (in_f * bits // 32, out_f)),
        (f"{prefix}.qzeros", "I32", (in_f // group, out_f * bits // 32)),
        (f"{prefix}.scales", "F16", (in_f // group, out_f)),
        (f"{prefix}.g_idx", "I32", (in_f,)),
    ]


def test_gptq_packed_int32_with_scales_and_zeros() -> None:
    cfg = config(torch_dtype="float16", quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 32})
    specs = [("model.embed_tokens.weight", "F16", (256, 64)), ("lm_head.weight", "F16", (256, 64))]
    specs += gptq_linear("model.layers.0.mlp.up_proj", 64, 128) + gptq_linear("model.layers.1.mlp.up_proj", 64, 128)
    shape, weights = shape_and_weights(cfg, tensors(*specs))
    # per linear: qweight 8x128x4 = 4096, qzeros 2x16x4 = 128, scales 2x128x2 = 512, g_idx 64x4 = 256
    assert weights.total_bytes == 2 * 256 * 64 * 2 + 2 * (4096 + 128 + 512 + 256)
    assert weights.quantization == "gptq/awq"
    assert shape.quantization == "gptq"
    assert shape.dtype == "float16"


def test_fp8_weights_with_scales() -> None:
    cfg = config(quantization_config={"quant_method": "fp8"})
    specs = [
        ("model.layers.0.mlp.down_proj.weight", "F8_E4M3", (64, 128)),
        ("model.layers.0.mlp.down_proj.weight_scale", "F32", (64, 1)),
        ("model.layers.0.mlp.down_proj.input_scale", "F32", ()),
        ("model.embed_tokens.weight", "BF16", (256, 64)),
    ]
    _, weights = shape_and_weights(cfg, tensors(*specs))
    assert weights.total_bytes == 64 * 128 + 64 * 4 + 4 + 256 * 64 * 2
    assert weights.quantization == "fp8"


def test_activation_dtype_comes_from_the_floats_when_config_is_silent() -> None:
    specs = [("model.embed_tokens.weight", "F16", (256, 64)), ("model.layers.0.mlp.up_proj.qweight", "I32", (8, 128))]
    w = collect_weights(tensors(*specs))
    assert w.float_dtype == "float16"
    assert model_shape(config(torch_dtype=None), weights_dtype=w.float_dtype).dtype == "float16"


# -- MoE: every expert resident, top-k active ---------------------------------------------------------------------


def moe_config(**kw: object) -> dict:
    return config(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, **kw)


def test_moe_all_experts_are_resident() -> None:
    cfg = moe_config()
    specs = [("model.embed_tokens.weight", "BF16", (256, 64))]
    for e in range(4):
        for n, shp in (("w1", (32, 64)), ("w2", (64, 32)), ("w3", (32, 64))):
            specs.append((f"model.layers.0.block_sparse_moe.experts.{e}.{n}.weight", "BF16", shp))
    specs.append(("model.layers.0.block_sparse_moe.gate.weight", "BF16", (4, 64)))
    _, weights = shape_and_weights(cfg, tensors(*specs))
    assert weights.total_bytes == 256 * 64 * 2 + 4 * 3 * 32 * 64 * 2 + 4 * 64 * 2


def test_moe_activations_use_the_active_experts_only() -> None:
    shape = model_shape(moe_config())
    assert shape.moe is not None and (shape.moe.num_experts, shape.moe.top_k, shape.moe.expert_intermediate) == (4, 2, 32)
    # attention stage: 4 x 64 + (q 64 + o 64 + k,v 64) = 448
    # MoE stage (grouped_mm): 4 x 64 + top_k 2 x (4 x 32 gate_up, act, product + 3 x 64 gathered, down, weighted)
    # + router logits 2 x 4 = 904
    assert act_elements_per_token(shape, 1) == 904


def test_moe_shared_experts_and_dense_first_layers() -> None:
    cfg = config(model_type="deepseek_v3", n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                 n_shared_experts=1, first_k_dense_replace=1, intermediate_size=256)
    shape = model_shape(cfg)
    assert shape.moe is not None and shape.moe.shared_intermediate == 16 and shape.moe.has_dense_layers
    # the dense first layer's MLP (3 x 256) outweighs the MoE layers: 4 x 64 + 768
    assert act_elements_per_token(shape, 1) == 256 + 768


# -- tensor parallelism -------------------------------------------------------------------------------------------


def test_tp_splits_matrices_and_keeps_norms_whole() -> None:
    shape = model_shape(config(num_attention_heads=4, num_key_value_heads=4))
    q = WeightTensor("model.layers.0.self_attn.q_proj.weight", "BF16", (64, 64), 64 * 64 * 2)
    norm = WeightTensor("model.layers.0.input_layernorm.weight", "BF16", (64,), 128)
    assert tensor_share(q, shape, 4) == Fraction(1, 4)
    assert tensor_share(norm, shape, 4) == 1


def test_tp_kv_projections_replicated_when_fewer_kv_heads_than_gpus() -> None:
    shape = model_shape(config(num_attention_heads=8, num_key_value_heads=2))
    k = WeightTensor("model.layers.0.self_attn.k_proj.weight", "BF16", (32, 64), 32 * 64 * 2)
    assert tensor_share(k, shape, 2) == Fraction(1, 2)
    assert tensor_share(k, shape, 8) == Fraction(1, 2)  # one whole head of the two on every GPU
    fused = WeightTensor("model.layers.0.self_attn.qkv_proj.weight", "BF16", (192, 64), 192 * 64 * 2)
    assert tensor_share(fused, shape, 8) == Fraction(1 + 2 * 1, 8 + 2 * 2)


def test_tp_weights_per_gpu_shrink_but_not_below_the_replicated_part() -> None:
    cfg = config(num_attention_heads=4, num_key_value_heads=4)
    shape, weights = shape_and_weights(cfg)
    one = sum(weights_per_gpu(weights, shape, 1))
    four = sum(weights_per_gpu(weights, shape, 4))
    norms = sum(t.nbytes for t in weights.tensors if len(t.shape) == 1)
    assert one == weights.total_bytes
    assert four == (one - norms) // 4 + norms


def test_header_summary_with_torch_dtype_names() -> None:
    infos = tensor_infos_from_header({"a": ["bfloat16", [4, 4]], "b": ["float32", [3]], "c": {"dtype": "I8", "shape": [5]}})
    assert [(t.dtype, t.nbytes) for t in infos] == [("BF16", 32), ("F32", 12), ("I8", 5)]


def test_unknown_dtype_in_a_header_summary() -> None:
    with pytest.raises(Exception, match="unknown dtype"):
        tensor_infos_from_header({"a": ["complex32", [2]]})
