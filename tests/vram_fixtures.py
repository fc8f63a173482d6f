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
