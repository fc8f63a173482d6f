"""Write a tiny Llama-shaped model folder, so README's "A first bundle" has a local model to pack.

    python3 demo/tiny_model.py models/example-tiny

The folder holds what a real checkpoint holds (``config.json``, a tokenizer,
``generation_config.json`` and ``model.safetensors``), about 250 KB of it, so
pack validates the safetensors header and fit reads the config as for a real
model. Only the standard library is used, so it runs before any virtualenv
exists; the bytes depend on nothing but this file (running it again writes
the same folder).
"""

from __future__ import annotations

import json
import random
import struct
import sys
from pathlib import Path
from typing import Any

CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every weight of a Llama decoder with this config, by its Hugging Face name."""
    h, i, v, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    return shapes


def safetensors_bytes(shapes: dict[str, tuple[int, ...]], *, seed: int = 0) -> bytes:
    """A safetensors file of F16 tensors (small normal values, norms at one), in the format's own layout."""
    rng = random.Random(seed)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    data = bytearray()
    for name in sorted(shapes):
        count = 1
        for n in shapes[name]:
            count *= n
        values = [1.0] * count if name.endswith("norm.weight") else [rng.gauss(0.0, 0.02) for _ in range(count)]
        raw = struct.pack(f"<{count}e", *values)
        header[name] = {"dtype": "F16", "shape": list(shapes[name]), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(head)) + head + bytes(data)


def tokenizer() -> dict[str, object]:
    """A byte-level BPE tokenizer with no merges: one token per byte value, as tokenizers' JSON format writes it."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": b + 3 for b in range(253)}
    return {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": t, "special": True, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False} for t, i in (("<unk>", 0), ("<s>", 1), ("</s>", 2))],
        "normalizer": None,
        "pre_tokenizer": None,
        "model": {"type": "BPE", "vocab": vocab, "merges": [], "unk_token": "<unk>", "byte_fallback": True},
    }


def write_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer(), indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 2048,
         "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    (folder / "model.safetensors").write_bytes(safetensors_bytes(tensor_shapes(CONFIG)))
    return folder


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 demo/tiny_model.py FOLDER", file=sys.stderr)
        return 2
    folder = write_model(Path(argv[0]))
    print(f"wrote a tiny model into {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
