"""Tiny real models for tests and the demo: safetensors weights, config.json, tokenizer files.

Shapes follow the Llama layout, so transformers can load the model and the
VRAM estimator sees the same tensor names as on a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

VOCAB = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(252)]


def llama_config(
    *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 256, intermediate: int = 128,
    tie: bool = False, dtype: str = "float16",
) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tie,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def llama_tensors(cfg: dict[str, Any], *, seed: int = 0, np_dtype: Any = np.float16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np_dtype)

    t: dict[str, np.ndarray] = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": np.ones(h, dtype=np_dtype)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = w(q, h)
        t[p + "self_attn.k_proj.weight"] = w(kv, h)
        t[p + "self_attn.v_proj.weight"] = w(kv, h)
        t[p + "self_attn.o_proj.weight"] = w(h, q)
        t[p + "mlp.gate_proj.weight"] = w(inter, h)
        t[p + "mlp.up_proj.weight"] = w(inter, h)
        t[p + "mlp.down_proj.weight"] = w(h, inter)
        t[p + "input_layernorm.weight"] = np.ones(h, dtype=np_dtype)
        t[p + "post_attention_layernorm.weight"] = np.ones(h, dtype=np_dtype)
    if not cfg.get("tie_word_embeddings"):
        t["lm_head.weight"] = w(v, h)
    return t


def tokenizer_files() -> dict[str, str]:
    """A word-level tokenizer that the tokenizers library loads (no network, no sentencepiece)."""
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for i, s in enumerate(VOCAB[:4])
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {s: i for i, s in enumerate(VOCAB)}, "unk_token": "<unk>"},
    }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 2048,
    }
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    return {
        "tokenizer.json": json.dumps(tok, indent=2),
        "tokenizer_config.json": json.dumps(cfg, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }


def make_model(directory: Path, *, shards: int = 1, seed: int = 0, **cfg_kw: Any) -> Path:
    """Write a tiny Llama-shaped model folder; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(**cfg_kw)
    tensors = llama_tensors(cfg, seed=seed)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    for name, text in tokenizer_files().items():
        (directory / name).write_text(text)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        index: dict[str, Any] = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))}, "weight_map": {}}
        per = (len(names) + shards - 1) // shards
        for s in range(shards):
            fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
            save_file(part, str(directory / fn), metadata={"format": "pt"})
            index["weight_map"].update({n: fn for n in part})
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


def write_blob(path: Path, size: int, *, seed: int = 0) -> Path:
    """A file of ``size`` pseudo-random bytes (fast, deterministic)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
    return path
