"""Estimate the GPU memory a model needs, from what a bundle holds; never load a tensor.

Inputs are a model's ``config.json`` (a dict) and its safetensors headers
(``TensorInfo``: exact bytes per tensor). The answer is per GPU, for a runtime
(``transformers`` generate or ``vllm`` serving), a context length and a batch:

* weights: the tensor bytes as stored (quantized checkpoints included: packed
  GPTQ/AWQ ints with their scales and zeros, FP8 with its scales), tied tensors
  once, every MoE expert resident, split over tensor-parallel GPUs;
* KV cache: per layer and token from the attention layout (MHA, GQA, MQA, MLA),
  sliding-window layers capped at their window, in the KV dtype;
* transformers: ``generate()`` written as the stream of its tensors
  (``vram_stream``, per-type code in ``vram_models``) and replayed through the
  caching allocator's model (``vram_alloc``): the working set and the allocator's
  reserve are what the replay holds, not a sum of terms;
* vLLM: its profiling batch and V1 memory accounting (vLLM 0.11.0's source);
* overhead: the CUDA context and libraries, cuBLAS workspace, NCCL buffers
  under tensor parallelism.

Every constant is named below and explained in docs/fit.md with where it came
from (``benchmarks/bench_fit.py`` checks them against real H100 measurements).
All results are frozen dataclasses holding integer bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from . import vram_models, vram_stream
from .errors import ModelConfigError, UsageError
from .safetensors_check import DTYPE_BITS, TensorInfo
from .vram_alloc import CUBLAS_WORKSPACE_BYTES

MiB = 1 << 20
GiB = 1 << 30

# -- constants (docs/fit.md, "Constants") ------------------------------------------------

#: Device memory a process holds once CUDA and PyTorch are initialised (measured on H100,
#: CUDA 13, torch 2.11: ``cuda_context_bytes`` = 650,969,088 in the calibration file).
CUDA_CONTEXT_BYTES = 621 * MiB
#: cuBLAS/cuBLASLt handles and kernel modules loaded lazily on first use: NVML's figure
#: minus the context minus PyTorch's reserved memory was 76-84 MiB on every calibration run.
LIBRARY_BYTES = 82 * MiB
#: NCCL communicator buffers (and vLLM's custom all-reduce buffers) per GPU when TP > 1.
COMMUNICATION_BYTES = 512 * MiB
#: A verdict is "tight" when the estimate is within this share of the limit.
TIGHT_PERCENT = 5
#: vLLM's prefill working set per token, in activation elements: the MLP holds act(gate), up and
#: their product (3 x intermediate) while the residual stream, the normed input, the
#: attention output and the MLP output (4 x hidden) are alive. (transformers: vram_stream.)
ACT_INTERMEDIATE_COPIES = 3
ACT_HIDDEN_COPIES = 4

# vLLM: the arithmetic below is derived from the source of this version (the one DESIGN.md's spec pins, vllm==0.11.0)
# and holds for its V1 engine: vllm/v1/worker/gpu_worker.py (``init_device``: the startup check that the free memory
# after CUDA started covers ``gpu_memory_utilization x total``; ``determine_available_memory``: KV pool = that budget
# - weights - the profile run's peak activations - non-torch memory), vllm/config/cache.py (16-token blocks on CUDA),
# the OpenAI server's engine defaults (max_num_batched_tokens 8192, max_num_seqs 256) and the sampler's float32
# logits and probabilities. CUDA graphs are captured after the KV cache is allocated and are not in the budget: they
# live in the (1 - utilization) headroom with the CUDA context. tests/test_vram_vllm.py checks it by hand.
VLLM_VERSION = "0.11.0"
# vLLM defaults (engine args, V1 engine, OpenAI-compatible server).
VLLM_GPU_MEMORY_UTILIZATION = "0.9"
VLLM_MAX_NUM_BATCHED_TOKENS = 8192
VLLM_MAX_NUM_SEQS = 256
VLLM_BLOCK_SIZE = 16

# -- how transformers runs attention, per model type (checked against the trace: tests/test_vram_matrix.py) -----------

#: SDPA with ``is_causal`` and no mask at prefill (CUDA takes the flash kernel, or the memory-efficient
#: one when the head dims differ, e.g. MLA's 192/128): no score matrix is ever materialised.
SDPA_CAUSAL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "granite", "olmo", "olmo2", "stablelm", "gpt_neox", "phi", "phi3", "gemma",
    "gemma3", "gemma3_text", "cohere", "cohere2", "starcoder2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gptj",
    "deepseek_v2", "deepseek_v3", "gpt2", "smollm3", "glm4", "exaone4", "granitemoe", "minimax", "phimoe",
})
#: SDPA with an explicit mask on every prefill (Falcon): the math kernel when the head counts differ (MQA),
#: float32 scores of batch x heads x prompt x prompt.
SDPA_MASKED_TYPES = frozenset({"falcon"})
#: No SDPA at all (eager attention): ALiBi (Bloom, MPT), logit softcapping (Gemma 2), attention sinks (gpt-oss).
EAGER_TYPES = frozenset({"bloom", "mpt", "gemma2", "gpt_oss"})
#: MLPs without a gate (up, activation, down): two intermediate-size tensors alive, not three.
FUSED_GATE_UP_TYPES = frozenset({"phi3", "glm", "glm4"})  # one gate_up matmul: its output and both halves' products
UNGATED_MLP_TYPES = frozenset({"gpt2", "gpt_neox", "starcoder2", "phi", "gptj", "falcon", "bloom", "mpt", "gpt_bigcode", "opt"})
ATTENTION_PATHS = ("causal", "masked", "eager", "unknown")
#: Activations transformers writes as a chain of ops (NewGELU: pow, mul, add, tanh...): two more
#: intermediate-size temporaries are alive at the chain's peak.
COMPOSITE_ACTS = frozenset({"gelu_new", "gelu_fast", "gelu_accurate"})
COMPOSITE_ACT_COPIES = 2

RUNTIMES = ("transformers", "vllm")
KV_DTYPES = ("auto", "fp16", "bf16", "fp8", "fp32")
VERDICTS = ("fits", "tight", "does_not_fit")

_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4, "f32": 4,
    "float16": 2, "fp16": 2, "half": 2, "f16": 2,
    "bfloat16": 2, "bf16": 2,
    "float8": 1, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
}
_ST_FLOAT = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float32"}
_MAX_INT = 1 << 48
#: No published model has a tenth of this many decoder layers (Llama-3.1-405B: 126); the stream replays each one.
_MAX_LAYERS = 2048


# -- the model, from config.json ----------------------------------------------------------


@dataclass(frozen=True)
class MLA:
    """DeepSeek-style multi-head latent attention (config names kept)."""

    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int = 0  # q through q_a_proj, its norm and q_b_proj (DeepSeek-V2/V3; 0: one q_proj, V2-Lite)


@dataclass(frozen=True)
class MoE:
    """A mixture of experts: all experts are resident; ``top_k`` run per token."""

    num_experts: int
    top_k: int
    expert_intermediate: int
    shared_intermediate: int
    has_dense_layers: bool
    dense_layers: tuple[int, ...] = ()  # the layers that run the dense MLP instead of the experts
    norm_topk: bool = False  # the top-k routing weights renormalised to sum to one (Mixtral, norm_topk_prob)


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs from config.json (the text model's, for multimodal ones)."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_context: int
    dtype: str  # the activation dtype: "bfloat16", "float16" or "float32"
    layer_kinds: tuple[str, ...]  # per layer: "full", "sliding" or "none" (no per-token KV)
    layer_windows: tuple[int, ...]  # per layer: the window of a sliding layer, else 0
    tie_word_embeddings: bool = False
    mla: MLA | None = None
    moe: MoE | None = None
    quantization: str | None = None
    notes: tuple[str, ...] = ()
    attention_path: str = "causal"  # how transformers runs attention: ATTENTION_PATHS
    gated_mlp: bool = True
    fused_gate_up: bool = False
    composite_act: bool = False  # an activation written as several PyTorch ops (gelu_new): its temporaries
    softcap: bool = False
    rope_dim: int = 0  # rotated dims per head when only part of each head is rotated (0: all of it)
    nope_layers: tuple[int, ...] = ()  # layers the code runs without the rotary embedding (no_rope_layers: SmolLM3, Llama-4)

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def attention(self) -> str:
        """MHA, GQA, MQA or MLA: how the KV cache is laid out."""
        if self.mla is not None:
            return "MLA"
        if self.num_kv_heads == 1 and self.num_heads > 1:
            return "MQA"
        return "MHA" if self.num_kv_heads == self.num_heads else "GQA"

    def describe(self) -> str:
        sliding = sum(1 for k in self.layer_kinds if k == "sliding")
        none = sum(1 for k in self.layer_kinds if k == "none")
        parts = [self.model_type or "model", f"{self.num_layers} layers", f"hidden {self.hidden_size}"]
        if self.mla is not None:
            parts.append(f"MLA (kv_lora_rank {self.mla.kv_lora_rank} + rope {self.mla.qk_rope_head_dim})")
        else:
            parts.append(f"{self.attention} {self.num_heads}/{self.num_kv_heads} heads x {self.head_dim}")
        if sliding:
            wins = sorted({w for w in self.layer_windows if w})
            parts.append(f"{sliding} sliding-window layer(s) ({', '.join(map(str, wins))})")
        if none:
            parts.append(f"{none} layer(s) without KV cache")
        if self.moe is not None:
            parts.append(f"MoE {self.moe.num_experts} experts, {self.moe.top_k} active")
        if self.quantization:
            parts.append(f"quantized ({self.quantization})")
        parts.append(self.dtype)
        return ", ".join(parts)


def _num(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _first(cfg: Mapping[str, Any], names: Iterable[str]) -> tuple[str, Any]:
    for n in names:
        v = cfg.get(n)
        if v is not None:
            return n, v
    return "", None


def _int(cfg: Mapping[str, Any], *names: str, default: int | None = None, minimum: int = 1) -> int:
    """The first of ``names`` present, as a bounded integer; ``default`` when none is."""
    key, v = _first(cfg, names)
    if v is None:
        if default is None:
            raise ModelConfigError(f"config.json has no {names[0]}; cannot estimate memory", path="config.json")
        return default
    n = _num(v)
    if n is None or not minimum <= n <= _MAX_INT:
        raise ModelConfigError(f"config.json: {key} = {v!r} is not a usable integer", path="config.json")
    return n


def _opt_int(cfg: Mapping[str, Any], *names: str, minimum: int = 0) -> int | None:
    key, v = _first(cfg, names)
    if v is None:
        return None
    n = _num(v)
    if n is None or not minimum <= n <= _MAX_INT:
        raise ModelConfigError(f"config.json: {key} = {v!r} is not a usable integer", path="config.json")
    return n


_SUBCONFIGS = ("text_config", "llm_config", "language_config", "thinker_config")


def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The language model's config: nested ``text_config`` (and kin) over the top level.

    Multimodal checkpoints (Llava, Gemma 3, Qwen-VL, Mllama...) keep the decoder's
    sizes in a sub-config; the top level still carries shared fields such as the
    dtype, ``tie_word_embeddings`` or ``quantization_config``.
    """
    merged: dict[str, Any] = dict(config)
    for _ in range(4):
        sub = next((merged[k] for k in _SUBCONFIGS if isinstance(merged.get(k), dict)), None)
        if sub is None:
            break
        outer = {k: v for k, v in merged.items() if k not in _SUBCONFIGS}
        merged = {**outer, **{k: v for k, v in sub.items() if v is not None or k not in outer}}
        if not any(isinstance(merged.get(k), dict) for k in _SUBCONFIGS):
            break
    return merged


def config_dtype(config: Mapping[str, Any]) -> str:
    """The activation dtype config.json names (its text model's, for a multimodal one); bfloat16 when it names none.
    The trace builds the model in it, so the estimate and the trace run the same model."""
    return _dtype_name(text_config(config), None)


def _dtype_name(cfg: Mapping[str, Any], fallback: str | None) -> str:
    _, v = _first(cfg, ("dtype", "torch_dtype"))
    if isinstance(v, str):
        name = v.lower().removeprefix("torch.")
        if name in ("float32", "float", "fp32"):
            return "float32"
        if name in ("float16", "half", "fp16"):
            return "float16"
        if name in ("bfloat16", "bf16"):
            return "bfloat16"
    return fallback or "bfloat16"


_SLIDING_PATTERN_DEFAULTS = {"gemma2": 2, "gemma3": 6, "gemma3_text": 6, "cohere2": 4}
_FULL_TYPES = {"full_attention", "attention", "full", "global", "global_attention", "hybrid"}


def _layer_layout(cfg: Mapping[str, Any], n: int, model_type: str) -> tuple[tuple[str, ...], tuple[int, ...], list[str]]:
    """Per layer: does it cache every token, a window of tokens, or none (mamba/linear)?"""
    window = _opt_int(cfg, "sliding_window", minimum=0) if not isinstance(cfg.get("sliding_window"), list) else None
    window = window or None
    chunk = _opt_int(cfg, "attention_chunk_size", minimum=0) or None
    layers = _listed_layers(cfg, n, window, chunk)
    if layers is None:
        layers = _windowed_layers(cfg, n, model_type, window)
    kinds: list[str] = []
    wins: list[int] = []
    for kind, w in layers:
        if kind == "sliding" and not w:
            kind = "full"
        kinds.append(kind)
        wins.append((w or 0) if kind == "sliding" else 0)
    notes: list[str] = []
    if any(k == "none" for k in kinds):
        notes.append("layers without attention (mamba / linear attention) hold a fixed-size state per sequence that is not counted")
    return tuple(kinds), tuple(wins), notes


# A layer as the config describes it: "full", "sliding" (with its window; none means full) or "none".
_Layer = tuple[str, int | None]


def _listed_layers(cfg: Mapping[str, Any], n: int, window: int | None, chunk: int | None) -> list[_Layer] | None:
    """The layers when the config lists them one by one (types, a pattern string, a period, per-layer windows); else None."""
    types = cfg.get("layer_types") or cfg.get("layers_block_type")
    pattern = cfg.get("hybrid_override_pattern")
    if isinstance(types, list) and len(types) == n and all(isinstance(t, str) for t in types):
        return [_typed_layer(t.lower(), window, chunk) for t in types]
    if isinstance(pattern, str) and len(pattern) == n:
        return [("full" if c == "*" else "none", None) for c in pattern]
    if _opt_int(cfg, "attn_layer_period") and cfg.get("attn_layer_offset") is not None:
        period = _int(cfg, "attn_layer_period")
        offset = _int(cfg, "attn_layer_offset", minimum=0)
        return [("full" if i % period == offset else "none", None) for i in range(n)]
    if isinstance(cfg.get("sliding_window"), list) and len(cfg["sliding_window"]) == n:
        return [_window_layer(_num(w)) for w in cfg["sliding_window"]]
    if isinstance(cfg.get("no_rope_layers"), list) and chunk and len(cfg["no_rope_layers"]) == n:
        return [("sliding" if flag else "full", chunk) for flag in cfg["no_rope_layers"]]
    return None


def _typed_layer(t: str, window: int | None, chunk: int | None) -> _Layer:
    """One entry of ``layer_types``: chunked and sliding attention keep a window, full attention all, the rest nothing."""
    if "chunk" in t:
        return "sliding", chunk or window
    if "sliding" in t or t in ("local", "local_attention"):
        return "sliding", window
    if t in _FULL_TYPES:
        return "full", None
    return "none", None


def _window_layer(w: int | None) -> _Layer:
    """One entry of a per-layer ``sliding_window`` list: a positive window, or full attention."""
    return ("sliding", w) if w and w > 0 else ("full", None)


def _windowed_layers(cfg: Mapping[str, Any], n: int, model_type: str, window: int | None) -> list[_Layer]:
    """Every layer from one ``sliding_window``: none, the layers from ``max_window_layers`` on, or all but every k-th."""
    if cfg.get("use_sliding_window") is False or window is None:
        return [("full", None)] * n
    if cfg.get("use_sliding_window") is True and cfg.get("max_window_layers") is not None:
        first = _int(cfg, "max_window_layers", minimum=0)
        return [("sliding" if i >= first else "full", window) for i in range(n)]
    every = _opt_int(cfg, "sliding_window_pattern") or _SLIDING_PATTERN_DEFAULTS.get(model_type)
    return [("sliding" if not every or (i + 1) % every else "full", window) for i in range(n)]


def _moe(cfg: Mapping[str, Any], model_type: str, intermediate: int) -> MoE | None:
    experts = _opt_int(cfg, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    if not experts or experts < 2:
        return None
    top_k = _opt_int(cfg, "num_experts_per_tok", "num_experts_per_token", "experts_per_token", "moe_top_k") or 2
    expert_i = _opt_int(cfg, "moe_intermediate_size", "expert_intermediate_size") or intermediate
    shared = _opt_int(cfg, "shared_expert_intermediate_size") or 0
    n_shared = _opt_int(cfg, "n_shared_experts", "num_shared_experts") or 0
    if not shared and n_shared:
        shared = n_shared * expert_i
    if not shared and model_type.startswith("llama4"):
        shared = intermediate
    mlp_only = cfg.get("mlp_only_layers")
    dense = bool(
        (_opt_int(cfg, "first_k_dense_replace") or 0) > 0
        or (isinstance(mlp_only, list) and mlp_only)
        or (_opt_int(cfg, "decoder_sparse_step") or 1) > 1
        or (_opt_int(cfg, "interleave_moe_layer_step") or 1) > 1
        or (_opt_int(cfg, "moe_layer_freq") or 1) > 1
    )
    return MoE(num_experts=experts, top_k=min(top_k, experts), expert_intermediate=expert_i,
               shared_intermediate=shared, has_dense_layers=dense, dense_layers=_moe_dense_layers(cfg) if dense else (),
               norm_topk=model_type == "mixtral" or cfg.get("norm_topk_prob") is True)


def _moe_dense_layers(cfg: Mapping[str, Any]) -> tuple[int, ...]:
    """The layer indices that transformers builds with the dense MLP (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers
    and decoder_sparse_step, Llama-4's interleave step, moe_layer_freq), so the stream runs the dense MLP there."""
    layers = _opt_int(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers") or 0
    first = _opt_int(cfg, "first_k_dense_replace") or 0
    mlp_only = cfg.get("mlp_only_layers")
    only = {i for i in mlp_only if isinstance(i, int)} if isinstance(mlp_only, list) else set()
    step = max(_opt_int(cfg, "decoder_sparse_step", "interleave_moe_layer_step") or 1, 1)  # sparse: (i + 1) % step == 0
    freq = max(_opt_int(cfg, "moe_layer_freq") or 1, 1)  # DeepSeek: sparse where i % freq == 0
    return tuple(i for i in range(layers) if i < first or i in only or (i + 1) % step != 0 or i % freq != 0)


def model_shape(config: Mapping[str, Any], *, weights_dtype: str | None = None) -> ModelShape:
    """Read config.json (a parsed dict) into a ``ModelShape``; ``ModelConfigError`` when it cannot."""
    if not isinstance(config, Mapping):
        raise ModelConfigError("config.json is not a JSON object", path="config.json")
    cfg = text_config(config)
    model_type = cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else ""
    assert isinstance(model_type, str)
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model", "dim")
    layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    if layers > _MAX_LAYERS:
        raise ModelConfigError(f"config.json: {layers} layers is not plausible (the estimator takes up to {_MAX_LAYERS})",
                               path="config.json", hint="Check num_hidden_layers in the model's config.json.")
    heads = _int(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads")
    if cfg.get("multi_query") is True:
        kv_heads = 1
    else:
        kv_heads = _int(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num", "n_kv_heads", default=heads)
    head_dim = _opt_int(cfg, "head_dim", "kv_channels", minimum=1) or max(1, hidden // heads)
    intermediate = _int(cfg, "intermediate_size", "ffn_hidden_size", "n_inner", "ffn_dim", default=4 * hidden)
    vocab = _int(cfg, "vocab_size", "padded_vocab_size")
    notes: list[str] = []
    max_ctx = _opt_int(cfg, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "max_seq_len")
    if not max_ctx:
        max_ctx = 2048
        notes.append("config.json gives no max_position_embeddings; assuming 2048 tokens")
    kinds, wins, layout_notes = _layer_layout(cfg, layers, model_type)
    notes += layout_notes
    mla = None
    if _opt_int(cfg, "kv_lora_rank"):
        rope = _int(cfg, "qk_rope_head_dim")
        nope = _int(cfg, "qk_nope_head_dim", default=head_dim)
        mla = MLA(kv_lora_rank=_int(cfg, "kv_lora_rank"), qk_rope_head_dim=rope, qk_nope_head_dim=nope,
                  v_head_dim=_int(cfg, "v_head_dim", default=nope), q_lora_rank=_opt_int(cfg, "q_lora_rank") or 0)
    moe = _moe(cfg, model_type, intermediate)
    if moe is not None and _opt_int(cfg, "intermediate_size_mlp"):
        intermediate = _int(cfg, "intermediate_size_mlp")
    qc = cfg.get("quantization_config")
    quant = None
    if isinstance(qc, dict):
        q = qc.get("quant_method") or qc.get("format") or "quantized"
        quant = str(q)[:40]
    tie = cfg.get("tie_word_embeddings")
    path, softcap = _attention_path(cfg, model_type)
    if path == "unknown":
        notes.append(f"model type {model_type or '(none)'!r}: how transformers runs its attention is not known to the estimator; "
                     "for transformers it assumed the math kernel (float32 scores of every head) and a full-length KV cache "
                     "on every attention layer")
    return ModelShape(
        model_type=model_type[:64], hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=min(kv_heads, heads),
        head_dim=head_dim, intermediate_size=intermediate, vocab_size=vocab, max_context=max_ctx,
        dtype=_dtype_name(cfg, weights_dtype), layer_kinds=kinds, layer_windows=wins,
        tie_word_embeddings=bool(tie) if isinstance(tie, bool) else False, mla=mla, moe=moe, quantization=quant,
        notes=tuple(notes), attention_path=path, gated_mlp=model_type not in UNGATED_MLP_TYPES,
        fused_gate_up=model_type in FUSED_GATE_UP_TYPES, softcap=softcap, rope_dim=_rope_dim(cfg, head_dim),
        composite_act=any(cfg.get(k) in COMPOSITE_ACTS for k in ("hidden_act", "activation_function", "hidden_activation")),
        nope_layers=_nope_layers(cfg, layers),
    )


def _nope_layers(cfg: Mapping[str, Any], n: int) -> tuple[int, ...]:
    """The layers whose ``no_rope_layers`` flag is 0 (the modeling code's ``use_rope``), where the list covers every layer."""
    flags = cfg.get("no_rope_layers")
    if not isinstance(flags, list) or len(flags) != n:
        return ()
    return tuple(i for i, f in enumerate(flags) if f == 0)


def _rope_dim(cfg: Mapping[str, Any], head_dim: int) -> int:
    """Rotated dims per head: ``rotary_dim``, or ``partial_rotary_factor`` / ``rotary_pct`` of the head (0: all)."""
    rp = cfg.get("rope_parameters")
    sources = [cfg, rp] if isinstance(rp, Mapping) else [cfg]
    for src in sources:
        dim = _num(src.get("rotary_dim"))
        if dim and 0 < dim < head_dim:
            return dim
        for key in ("partial_rotary_factor", "rotary_pct"):
            f = src.get(key)
            if isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1:
                return max(2, int(head_dim * f) // 2 * 2)
    return 0


def _attention_path(cfg: Mapping[str, Any], model_type: str) -> tuple[str, bool]:
    """(path, softcapped): causal SDPA, SDPA with a mask, eager, or unknown (the conservative math path)."""
    softcap = isinstance(cfg.get("attn_logit_softcapping"), (int, float)) and not isinstance(cfg.get("attn_logit_softcapping"), bool)
    if model_type in EAGER_TYPES:
        return "eager", softcap
    if softcap and model_type not in ("gemma3", "gemma3_text"):
        return "eager", True  # SDPA cannot softcap: transformers runs eager attention
    if model_type in SDPA_MASKED_TYPES:
        return "masked", softcap
    if model_type in SDPA_CAUSAL_TYPES:
        return "causal", softcap
    return "unknown", softcap


# -- the weights, from safetensors headers ----------------------------------------------------


@dataclass(frozen=True)
class WeightTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Weights:
    """The tensors a runtime loads: duplicates and tied copies once, speculative-decoding layers out."""

    tensors: tuple[WeightTensor, ...]
    skipped: tuple[str, ...] = ()
    quantization: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def parameters(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)

    def dtype_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
        return dict(sorted(out.items()))

    @property
    def float_dtype(self) -> str | None:
        """The most common floating dtype by bytes (the activation dtype when config.json is silent)."""
        best: tuple[int, str] | None = None
        for dt, n in self.dtype_bytes().items():
            if dt in _ST_FLOAT and (best is None or n > best[0]):
                best = (n, _ST_FLOAT[dt])
        return best[1] if best else None


_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight", "embedding.weight")
_HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_LM_PREFIXES = ("", "model", "model.language_model", "language_model.model", "language_model", "transformer", "model.decoder")


def _quant_kind(tensors: Iterable[WeightTensor]) -> str | None:
    names = set()
    for t in tensors:
        base = t.name.rsplit(".", 1)[-1]
        if base in ("qweight", "qzeros", "g_idx"):
            names.add("gptq/awq")
        elif t.dtype.startswith("F8"):
            names.add("fp8")
        elif base in ("weight_packed", "weight_scale") and t.dtype in ("I32", "U8", "I8"):
            names.add("compressed-tensors")
        elif base.endswith("_blocks") and t.dtype == "U8":
            names.add("mxfp4")
        elif t.dtype in ("F4", "F6_E2M3", "F6_E3M2"):
            names.add("fp4/fp6")
    return ", ".join(sorted(names)) or None


def collect_weights(tensors: Iterable[TensorInfo], *, shape: ModelShape | None = None, tie: bool | None = None) -> Weights:
    """The resident weights from safetensors headers (exact bytes, as stored).

    A name seen twice (shards that repeat a tensor) counts once; with
    ``tie_word_embeddings`` an ``lm_head`` that repeats the embedding counts once;
    decoder layers numbered past ``num_hidden_layers`` (DeepSeek-V3's
    multi-token-prediction layer) are not loaded by the runtimes and are left out.
    """
    tie_embeddings = tie if tie is not None else (shape.tie_word_embeddings if shape is not None else False)
    seen: dict[str, WeightTensor] = {}
    skipped: list[str] = []
    for t in tensors:
        if t.name in seen:
            continue
        if shape is not None:
            m = _LAYER_RE.search(t.name)
            if m and t.name[: m.start()] in _LM_PREFIXES and int(m.group(1)) >= shape.num_layers:
                skipped.append(t.name)
                continue
        seen[t.name] = WeightTensor(name=t.name, dtype=t.dtype, shape=tuple(t.shape), nbytes=t.nbytes)
    if tie_embeddings:
        embeds = [t for n, t in seen.items() if n.endswith(_EMBED_SUFFIXES)]
        for n in [n for n in seen if n.endswith(_HEAD_SUFFIXES)]:
            head = seen[n]
            if any(e.shape == head.shape and e.dtype == head.dtype for e in embeds):
                del seen[n]
                skipped.append(n)
    tensors_out = tuple(seen.values())
    return Weights(tensors=tensors_out, skipped=tuple(skipped), quantization=_quant_kind(tensors_out))


def tensor_infos_from_header(header: Mapping[str, Any]) -> list[TensorInfo]:
    """TensorInfo list from a ``{name: [dtype, shape]}`` summary (torch or safetensors dtype names).

    Used for the calibration file and tests: offsets are synthetic but contiguous.
    """
    torch_to_st = {
        "bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64", "int8": "I8", "uint8": "U8",
        "int16": "I16", "int32": "I32", "int64": "I64", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    }
    out: list[TensorInfo] = []
    pos = 0
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if isinstance(spec, dict):
            dt, shp = spec.get("dtype"), spec.get("shape")
        else:
            dt, shp = spec[0], spec[1]
        dts = torch_to_st.get(str(dt), str(dt))
        if dts not in DTYPE_BITS or not isinstance(shp, list):
            raise ModelConfigError(f"tensor {name!r}: unknown dtype {dt!r} or shape {shp!r}")
        n = (math.prod(shp) * DTYPE_BITS[dts] + 7) // 8
        out.append(TensorInfo(name=name, dtype=dts, shape=tuple(shp), begin=pos, end=pos + n))
        pos += n
    return out


def _is_kv_proj(name: str) -> bool:
    return bool(re.search(r"\.(k_proj|v_proj|key|value|wk|wv)\.", name + ".")) and "kv_a_proj" not in name and "kv_b_proj" not in name


def _is_fused_qkv(name: str) -> bool:
    return bool(re.search(r"\.(qkv_proj|query_key_value|c_attn|Wqkv|W_pack)\.", name + "."))


def _is_replicated(name: str, t: WeightTensor, shape: ModelShape) -> bool:
    if len(t.shape) <= 1:
        return True  # norms and biases: small, kept whole on every GPU
    if any(s in name for s in ("kv_a_proj_with_mqa", "q_a_proj", "kv_a_layernorm", "q_a_layernorm")):
        return True  # MLA's down-projections are replicated (vLLM ReplicatedLinear)
    # MoE router: tiny, replicated
    return shape.moe is not None and bool(re.search(r"\.(gate|router)\.(weight|bias)$", name))


def tensor_share(t: WeightTensor, shape: ModelShape, tp: int) -> Fraction:
    """The share of one tensor the busiest GPU holds under tensor parallelism of ``tp``."""
    if tp <= 1:
        return Fraction(1)
    name = t.name
    if _is_replicated(name, t, shape):
        return Fraction(1)
    kvh = shape.num_kv_heads
    kv_local = -(-kvh // tp)
    if _is_kv_proj(name):
        return Fraction(kv_local, kvh)
    if _is_fused_qkv(name):
        nh = shape.num_heads
        return Fraction(-(-nh // tp) + 2 * kv_local, nh + 2 * kvh)
    return Fraction(1, tp)


def weights_per_gpu(weights: Weights, shape: ModelShape, tp: int, *, halve_fp32: bool = False) -> list[int]:
    """Bytes of each tensor on the busiest GPU (rounded up), in load order."""
    out = []
    for t in weights.tensors:
        n = t.nbytes // 2 if halve_fp32 and t.dtype == "F32" and len(t.shape) > 1 else t.nbytes
        share = tensor_share(t, shape, tp)
        out.append(-(-(n * share.numerator) // share.denominator))
    return out


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def parse_utilization(value: str | float | Decimal) -> Decimal:
    """``gpu_memory_utilization`` as an exact decimal in (0, 1]."""
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise UsageError(f"gpu_memory_utilization {value!r} is not a number") from None
    if not d.is_finite() or not 0 < d <= 1:
        raise UsageError(f"gpu_memory_utilization must be in (0, 1], not {value}")
    return d


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """How the model will run. ``context`` is tokens per sequence (prompt + new tokens); None = the model's maximum."""

    runtime: str = "vllm"
    context: int | None = None
    batch: int = 1
    new_tokens: int = 256
    kv_dtype: str = "auto"
    tensor_parallel: int = 1
    gpu_memory_utilization: str = VLLM_GPU_MEMORY_UTILIZATION
    max_num_batched_tokens: int = VLLM_MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = VLLM_MAX_NUM_SEQS

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise UsageError(f"unknown runtime {self.runtime!r}; choose one of {', '.join(RUNTIMES)}")
        if self.kv_dtype.lower() not in _DTYPE_BYTES and self.kv_dtype.lower() != "auto":
            raise UsageError(f"unknown KV cache dtype {self.kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
        for name in ("batch", "tensor_parallel", "max_num_batched_tokens", "max_num_seqs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 24:
                raise UsageError(f"{name.replace('_', ' ')} must be a positive integer, not {v!r}")
        if self.context is not None and (isinstance(self.context, bool) or not 1 <= self.context <= 1 << 32):
            raise UsageError(f"context must be a positive number of tokens, not {self.context!r}")
        if isinstance(self.new_tokens, bool) or not 0 <= self.new_tokens <= 1 << 32:
            raise UsageError(f"new tokens must be a non-negative integer, not {self.new_tokens!r}")
        parse_utilization(self.gpu_memory_utilization)


@dataclass(frozen=True)
class Breakdown:
    """Bytes on the busiest GPU, by kind; ``total`` is what the verdict compares."""

    weights: int
    kv_cache: int
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead

    def to_json(self) -> dict[str, int]:
        return {"weights": self.weights, "kv_cache": self.kv_cache, "activations": self.activations, "overhead": self.overhead}


@dataclass(frozen=True)
class Overhead:
    """What ``Breakdown.overhead`` is made of."""

    cuda_context: int
    libraries: int
    workspace: int
    allocator: int
    communication: int

    @property
    def total(self) -> int:
        return self.cuda_context + self.libraries + self.workspace + self.allocator + self.communication

    def to_json(self) -> dict[str, int]:
        return {"cuda_context": self.cuda_context, "libraries": self.libraries, "workspace": self.workspace,
                "allocator": self.allocator, "communication": self.communication}


@dataclass(frozen=True)
class Estimate:
    runtime: str
    context: int
    batch: int
    prompt_tokens: int
    new_tokens: int
    tensor_parallel: int
    kv_dtype: str
    kv_bytes_per_token: int  # one token of one sequence on the busiest GPU, every KV layer, no window cap
    breakdown: Breakdown
    overhead: Overhead
    notes: tuple[str, ...] = ()
    # transformers: what the process shows on a GPU with room to spare (nvidia-smi; the context, libraries and
    # torch.cuda.max_memory_reserved), cached segments nothing lives in included; >= per_gpu_bytes
    peak_reserved_bytes: int | None = None

    @property
    def per_gpu_bytes(self) -> int:
        return self.breakdown.total


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype name the estimator uses (``bfloat16``, ``fp8``...)."""
    return _DTYPE_BYTES[name.lower()]


def _kv_elem_bytes(shape: ModelShape, kv_dtype: str) -> tuple[str, int]:
    name = kv_dtype.lower()
    if name == "auto":
        return shape.dtype, shape.dtype_bytes
    return name, _DTYPE_BYTES[name]


def kv_layer_token_bytes(shape: ModelShape, *, runtime: str, tp: int, kv_bytes: int) -> int:
    """KV bytes one attention layer stores per token on the busiest GPU.

    GQA/MHA/MQA: keys and values of the local KV heads; with fewer KV heads than
    GPUs every GPU keeps one (replicated). MLA: one latent of ``kv_lora_rank +
    qk_rope_head_dim`` per token, the same on every GPU: vLLM caches it, and so does
    transformers 5 (DeepseekV2Attention caches the normed latent and the rotated k_pe,
    and expands them to per-head keys and values at every step; transformers 4
    cached the expansion, ``heads x (nope + rope + v)``, 9x more for DeepSeek-V2-Lite).
    """
    if shape.mla is not None:
        m = shape.mla
        return (m.kv_lora_rank + m.qk_rope_head_dim) * kv_bytes
    heads = -(-shape.num_kv_heads // tp)
    return 2 * heads * shape.head_dim * kv_bytes


def kv_sequence_bytes(shape: ModelShape, tokens: int, *, runtime: str, tp: int, kv_bytes: int, prompt: int = 0) -> int:
    """KV bytes of one sequence of ``tokens`` on the busiest GPU (sliding layers hold at most their window).

    transformers' sliding-window cache layers keep the prefill's keys and values whole until the first
    decode step replaces them with the window: with a ``prompt`` longer than the window, the layer holds
    the prompt at the peak.
    """
    per = kv_layer_token_bytes(shape, runtime=runtime, tp=tp, kv_bytes=kv_bytes)
    total = 0
    for kind, win in zip(shape.layer_kinds, shape.layer_windows, strict=True):
        if kind == "none":
            continue
        t = max(min(tokens, win), min(prompt, tokens)) if kind == "sliding" else tokens
        if runtime == "vllm":
            t = _round_up(t, VLLM_BLOCK_SIZE)
        total += t * per
    return total


def act_elements_per_token(shape: ModelShape, tp: int) -> int:
    """Peak working set of one prefill token, in activation elements, on the busiest GPU.

    The larger of the attention stage (q, k, v and the attention output, split
    over GPUs) and the MLP stage (dense MLP: 3 x intermediate; MoE: each of the
    top-k experts' 3 x intermediate plus its output, the shared expert, the
    router's logits), plus 4 hidden-size tensors of the residual stream.
    """
    h = shape.hidden_size
    base = ACT_HIDDEN_COPIES * h
    if shape.mla is not None:
        q = shape.num_heads * (shape.mla.qk_nope_head_dim + shape.mla.qk_rope_head_dim)
        o = shape.num_heads * shape.mla.v_head_dim
        kv = shape.num_heads * (shape.mla.qk_nope_head_dim + shape.mla.qk_rope_head_dim + shape.mla.v_head_dim)
    else:
        q = o = shape.num_heads * shape.head_dim
        kv = 2 * shape.num_kv_heads * shape.head_dim
    stages = [base + -(-(q + o + kv) // tp)]
    moe = shape.moe
    copies = ACT_INTERMEDIATE_COPIES if shape.gated_mlp else ACT_INTERMEDIATE_COPIES - 1
    copies += 1 if shape.fused_gate_up else 0
    copies += COMPOSITE_ACT_COPIES if shape.composite_act else 0
    if moe is None or moe.has_dense_layers:
        stages.append(base + copies * -(-shape.intermediate_size // tp))
    if moe is not None:
        # transformers' grouped_mm experts: each of the top-k copies of a token is gathered (hidden), goes through
        # gate_up (2 x intermediate), act(gate) and its product with up (2 x intermediate), down and the routing
        # weight (2 x hidden): all rows of the layer at once.
        per_expert = (ACT_INTERMEDIATE_COPIES + 1) * -(-moe.expert_intermediate // tp) + 3 * h
        shared = ACT_INTERMEDIATE_COPIES * -(-moe.shared_intermediate // tp)
        stages.append(base + moe.top_k * per_expert + shared + 2 * moe.num_experts)
    return max(stages)


def _rope_bytes_per_token(shape: ModelShape) -> int:
    """cos and sin of the rotary embedding, computed in float32 for every position."""
    dim = shape.mla.qk_rope_head_dim if shape.mla is not None else shape.head_dim
    return 2 * dim * 4


def trusted_windows(shape: ModelShape) -> ModelShape:
    """``shape`` as transformers' cache is estimated: for a model type whose attention path is not known (the
    conservative path) no window is trusted, every attention layer caches every token."""
    if shape.attention_path != "unknown":
        return shape
    return replace(shape, layer_kinds=tuple("none" if k == "none" else "full" for k in shape.layer_kinds),
                   layer_windows=tuple(0 for _ in shape.layer_windows))


def stream_layout(shape: ModelShape, *, tp: int, act_bytes: int | None = None, kv_bytes: int | None = None) -> vram_stream.Layout:
    """The model as the stream writes it, on the busiest of ``tp`` GPUs: its shape here, its code from vram_models."""
    ab = act_bytes or shape.dtype_bytes
    kb = kv_bytes or ab
    heads = -(-shape.num_heads // tp)
    kv_heads = -(-shape.num_kv_heads // tp)
    mla = shape.mla
    if mla is not None:
        d, vd, rope = mla.qk_nope_head_dim + mla.qk_rope_head_dim, mla.v_head_dim, mla.qk_rope_head_dim
        kv_heads = heads
    else:
        d = vd = shape.head_dim
        rope = shape.rope_dim or d
    path = shape.attention_path
    if path == "eager":
        attention = "eager"
    elif path == "unknown" or (path == "masked" and kv_heads != heads):
        attention = "math"
    elif path == "masked" or d != vd:
        attention = "efficient"
    else:
        attention = "flash"
    cached = trusted_windows(shape)
    windows = tuple(-1 if k == "none" else (w if k == "sliding" else 0)
                    for k, w in zip(cached.layer_kinds, cached.layer_windows, strict=True))
    moe = shape.moe
    lay = vram_stream.Layout(
        hidden=shape.hidden_size, heads=heads, kv_heads=kv_heads, head_dim=d, v_head_dim=vd, rope_dim=rope,
        intermediate=-(-shape.intermediate_size // tp), vocab=shape.vocab_size, act_bytes=ab, kv_bytes=kb,
        norm="rms", qk_norm=False, attention=attention, gated=shape.gated_mlp, composite_act=shape.composite_act,
        fused_gate_up=shape.fused_gate_up, parallel=False, softcap=shape.softcap, layer_windows=windows,
        sdpa_mask_always=path in ("masked", "unknown"),
        moe_experts=moe.num_experts if moe else 0, moe_top_k=moe.top_k if moe else 0,
        moe_intermediate=-(-moe.expert_intermediate // tp) if moe else 0,
        moe_shared=-(-moe.shared_intermediate // tp) if moe else 0,
        moe_dense_layers=moe.dense_layers if moe else (), moe_norm_topk=bool(moe and moe.norm_topk),
        mla=mla is not None, q_lora_rank=mla.q_lora_rank if mla else 0, kv_lora_rank=mla.kv_lora_rank if mla else 0,
        mla_rope_dim=mla.qk_rope_head_dim if mla else 0, mla_nope_dim=mla.qk_nope_head_dim if mla else 0,
        nope_layers=shape.nope_layers,
    )
    return replace(lay, **vram_models.code_for(shape.model_type))


_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
#: Where a decoder layer's sub-modules come in the order PyTorch moves them (registration order: attention, its
#: projections q, k, v, o; then the MLP or experts; norms wherever they are, being small). A tensor matching none
#: keeps its place among its layer's others.
_LOAD_RANK = (
    ("q_a_proj", 1), ("q_a_layernorm", 2), ("q_b_proj", 3), ("q_proj", 4), ("query_key_value", 4), ("qkv_proj", 4), ("c_attn", 4),
    ("Wqkv", 4), ("q_norm", 5), ("k_proj", 6), ("kv_a_proj", 6), ("kv_a_layernorm", 7), ("kv_b_proj", 8), ("k_norm", 9),
    ("v_proj", 10), ("o_proj", 11), ("out_proj", 11), ("attn.c_proj", 11), ("attention.dense", 11), ("self_attention.dense", 11),
    ("attn.dense", 11), ("sinks", 12), ("mlp.gate.", 20), ("router", 20), ("gate_up_proj", 21), ("gate_proj", 21), ("w1", 21),
    ("fc1", 21), ("fc_in", 21), ("c_fc", 21), ("dense_h_to_4h", 21), ("up_proj", 22), ("w3", 22), ("down_proj", 23), ("w2", 23),
    ("fc2", 23), ("fc_out", 23), ("mlp.c_proj", 23), ("dense_4h_to_h", 23),
)


def _load_key(index: int, name: str) -> tuple[int, int, int, int]:
    m = _BLOCK_RE.search(name)
    if m is None:  # embeddings first, then what follows the layers (final norm, lm_head)
        head = name.endswith(_HEAD_SUFFIXES) or "norm" in name.rsplit(".", 2)[-2:][0] or name.startswith(("lm_head", "ln_f"))
        return (2 if head else 0, 0, 0, index)
    rest = name[m.end():]
    shared = 1 if "shared_expert" in rest else 0
    rank = next((r for key, r in _LOAD_RANK if key in rest), 50)
    return (1, int(m.group(1)), rank + 30 * shared, index)


def load_order(weights: Weights) -> list[int]:
    """Indices of ``weights.tensors`` in the order transformers moves them to the GPU: the embeddings, each layer's
    attention then MLP (a header lists them alphabetically, ``layers.10`` before ``layers.2``), then the final norm
    and head. Which 20 MiB segments the 1-10 MiB weights share, and what is left free in them, depends on it."""
    return sorted(range(len(weights.tensors)), key=lambda i: _load_key(i, weights.tensors[i].name))


def stream_weight_sizes(weights: Weights, shape: ModelShape, tp: int) -> list[int]:
    """Per-GPU tensor sizes in load order (``load_order``), as the stream allocates them."""
    sizes = weights_per_gpu(weights, shape, tp)
    return [sizes[i] for i in load_order(weights)]


class _Model:
    """Everything that does not depend on the context length, computed once."""

    def __init__(self, shape: ModelShape, weights: Weights, run: RunConfig) -> None:
        self.shape = shape
        self.run = run
        tp = run.tensor_parallel
        vllm = run.runtime == "vllm"
        # vLLM loads float32 checkpoints in 16-bit; transformers keeps what is stored.
        self.act_dtype = "bfloat16" if vllm and shape.dtype == "float32" else shape.dtype
        self.act_bytes = _DTYPE_BYTES[self.act_dtype]
        kv_name, kv_bytes = _kv_elem_bytes(replace(shape, dtype=self.act_dtype), run.kv_dtype)
        self.kv_name = kv_name
        self.kv_bytes = kv_bytes
        sizes = weights_per_gpu(weights, shape, tp, halve_fp32=vllm and shape.dtype == "float32")
        self.weights = sum(sizes)
        # transformers places each checkpoint tensor on its own (the stream replays them, in load order, through one
        # layout for every context); vLLM fuses them into few large tensors.
        if not vllm:
            self.weight_sizes = tuple(sizes[i] for i in load_order(weights))
            self.layout = stream_layout(shape, tp=tp, act_bytes=self.act_bytes, kv_bytes=kv_bytes)
        self.act_per_token = act_elements_per_token(shape, tp) * self.act_bytes + _rope_bytes_per_token(shape)
        self.kv_token = kv_layer_token_bytes(shape, runtime=run.runtime, tp=tp, kv_bytes=kv_bytes) * sum(
            1 for k in shape.layer_kinds if k != "none"
        )
        self.communication = COMMUNICATION_BYTES if tp > 1 else 0
        self.kv_shape = trusted_windows(shape) if not vllm else shape

    def _transformers(self, prompt: int, new: int, kv: int, *, shortcut: bool, raised: bool) -> tuple[int, Overhead, int]:
        """(activations, overhead, peak reserved) of ``generate``: its tensors' stream replayed through the allocator.

        The figure compared with the GPU is the most the allocator must hold at once: its segments that hold a live
        block (the weights and their rounding, the cache, the working set and the blocks beside them that cannot be
        reused). On a GPU with room to spare it also keeps segments nothing lives in any more (old sizes of a grown
        cache) and shows more reserved; when memory runs short it gives those back (vram_alloc) instead of failing,
        so they are reported (the third figure, what ``torch.cuda.max_memory_reserved`` shows) but not required.
        ``activations`` is the peak allocated less the weights, the cache and cuBLAS's workspace; ``allocator`` the
        rest of the figure.
        """
        run = self.run
        peaks = vram_stream.peaks(self.layout, self.weight_sizes, batch=run.batch, prompt=prompt, new_tokens=new,
                                  shortcut=shortcut or raised)
        in_use = int(peaks.in_use * SHORTCUT_MARGIN) if raised else peaks.in_use
        fixed = self.weights + kv + CUBLAS_WORKSPACE_BYTES
        act = max(0, peaks.allocated - fixed)
        allocator = max(0, in_use - fixed - act)
        overhead = Overhead(cuda_context=CUDA_CONTEXT_BYTES, libraries=LIBRARY_BYTES, workspace=CUBLAS_WORKSPACE_BYTES,
                            allocator=allocator, communication=self.communication)
        reserved = max(peaks.reserved, in_use, fixed + act) + CUDA_CONTEXT_BYTES + LIBRARY_BYTES + self.communication
        return act, overhead, reserved

    def estimate(self, context: int, *, shortcut: bool = False) -> Estimate:
        """The estimate at ``context`` tokens; ``shortcut``: the fast decode replay searches bracket with."""
        shape, run = self.shape, self.run
        tp = run.tensor_parallel
        transformers = run.runtime == "transformers"
        prompt = max(1, context - run.new_tokens) if transformers else context
        new = context - prompt
        raised = transformers and shape.num_layers * max(0, new - 1) > EVERY_STEP_BUDGET
        kv_seq = kv_sequence_bytes(self.kv_shape, context, runtime=run.runtime, tp=tp, kv_bytes=self.kv_bytes,
                                   prompt=prompt if transformers else 0)
        kv = run.batch * kv_seq
        notes: list[str] = []
        if transformers:
            act, overhead, reserved = self._transformers(prompt, new, kv, shortcut=shortcut, raised=raised and not shortcut)
        else:
            tokens = run.max_num_batched_tokens
            act = tokens * self.act_per_token
            act += 2 * run.max_num_seqs * shape.vocab_size * 4  # the sampler's float32 logits and probabilities
            # vLLM's budget (gpu_memory_utilization x total) is counted from a snapshot taken after CUDA
            # started: the context lives outside it, in the headroom, with the CUDA graphs.
            overhead = Overhead(cuda_context=0, libraries=LIBRARY_BYTES, workspace=CUBLAS_WORKSPACE_BYTES,
                                allocator=0, communication=self.communication)
            reserved = 0
        if context > shape.max_context:
            notes.append(f"context {context} is beyond the model's max_position_embeddings ({shape.max_context})")
        if raised:
            notes.append(f"{new} new tokens x {shape.num_layers} layers: the decode steps were not replayed one by one "
                         f"(over {EVERY_STEP_BUDGET:,} layer-steps); the estimate is the shortcut's raised by "
                         f"{float(SHORTCUT_MARGIN - 1):.0%}")
        return Estimate(
            runtime=run.runtime, context=context, batch=run.batch, prompt_tokens=prompt, new_tokens=new,
            tensor_parallel=tp, kv_dtype=self.kv_name, kv_bytes_per_token=self.kv_token,
            breakdown=Breakdown(weights=self.weights, kv_cache=kv, activations=act, overhead=overhead.total),
            overhead=overhead, notes=tuple(notes), peak_reserved_bytes=reserved or None,
        )


def estimate(shape: ModelShape, weights: Weights, run: RunConfig, *, shortcut: bool = False) -> Estimate:
    """Bytes on the busiest GPU for ``run`` (at ``run.context``, or the model's maximum); ``shortcut``: the fast decode
    replay (``vram_stream._decode_steps``) a search brackets with."""
    return _Model(shape, weights, run).estimate(run.context or shape.max_context, shortcut=shortcut)


# -- the verdict ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuBudget:
    """The GPUs to fit on, as numbers: per-GPU total memory CUDA sees, and what is free now if known."""

    name: str
    count: int
    memory_bytes: int
    free_bytes: int | None = None
    source: str = "catalog"

    def __post_init__(self) -> None:
        if self.count < 1 or self.memory_bytes < 1:
            raise UsageError(f"GPU {self.name}: count and memory must be positive")


@dataclass(frozen=True)
class FitResult:
    estimate: Estimate
    gpu: GpuBudget
    limit_bytes: int  # what the run may use on each GPU
    verdict: str
    max_context: int  # the longest context (tokens per sequence) with total <= limit; 0 if none
    model_max_context: int
    kv_pool_bytes: int = 0  # vLLM: what is left for the KV cache per GPU
    kv_token_capacity: int = 0  # vLLM: tokens the pool holds at full-length sequences
    max_concurrency: int = 0  # vLLM: full-length sequences the pool holds at once
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def per_gpu_bytes(self) -> int:
        return self.estimate.per_gpu_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.limit_bytes - self.per_gpu_bytes


def verdict_for(total: int, limit: int) -> str:
    """fits; tight when within TIGHT_PERCENT of the limit; does_not_fit above it."""
    if total > limit:
        return "does_not_fit"
    if total * 100 > limit * (100 - TIGHT_PERCENT):
        return "tight"
    return "fits"


#: Layers x decode steps the every-step replay takes on (about 10 s): beyond, a generation is estimated with the
#: shortcut raised by SHORTCUT_MARGIN, and a note says so (a config claiming 100,000 layers, or a billion new
#: tokens, must not hold a courier's laptop for hours).
EVERY_STEP_BUDGET = 2_000_000
#: How far below the every-step replay's figure the shortcut's was found (tests/test_vram_stream.py: up to 12%, on a
#: 900-token generation after an 8-token prompt); searches widen their bracket by this before checking every step.
SHORTCUT_MARGIN = Fraction(115, 100)


def _bisect(lo: int, hi: int, ok: Callable[[int], bool], *, granularity: int = 1) -> int:
    """The largest n in lo..hi with ok(n), for ok true up to some point and false after; ok(lo) is assumed (lo = 0:
    none). Stops within ``granularity`` of the answer, below it."""
    if ok(hi):
        return hi
    while hi - lo > granularity:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def largest_fitting(hi: int, figure: Callable[[int, bool], int], limit: int, *, step: int = 1) -> int:
    """The largest n in 1..hi whose figure (every decode step replayed) is within ``limit``; 0 when none is.

    ``figure(n, shortcut)`` grows with n (a context, a batch). The search runs on the shortcut's figure (fast, to
    ``step``), then checks its answer with every step; only when that fails does it search every-step
    figures, between the shortcut's answer widened by SHORTCUT_MARGIN and the answer itself, to 1/512 of it.
    """
    top = _bisect(0, hi, lambda n: n > 0 and figure(n, True) <= limit, granularity=step)
    if top == 0 or figure(top, False) <= limit:
        return top
    low = _bisect(0, top, lambda n: n > 0 and figure(n, True) * SHORTCUT_MARGIN <= limit)
    if low and figure(low, False) > limit:  # the margin was not enough: search every step from the bottom
        low = _bisect(0, low, lambda n: n > 0 and figure(n, False) <= limit, granularity=max(1, low // 512))
        return low
    return _bisect(low, top, lambda n: n <= low or figure(n, False) <= limit, granularity=max(1, top // 512))


def fit(shape: ModelShape, weights: Weights, run: RunConfig, gpu: GpuBudget) -> FitResult:
    """Estimate, compare with the GPUs, and search the longest context that fits."""
    if run.tensor_parallel != gpu.count:
        run = replace(run, tensor_parallel=gpu.count)
    model = _Model(shape, weights, run)
    context = run.context or shape.max_context
    est = model.estimate(context)
    notes = list(shape.notes) + list(est.notes)
    if est.peak_reserved_bytes is not None and est.peak_reserved_bytes * 50 > est.per_gpu_bytes * 51:
        notes.append(f"on a GPU with room to spare PyTorch would show {est.peak_reserved_bytes / GiB:.2f} GiB: its caching "
                     f"allocator keeps segments nothing lives in any more, and gives them back before it would fail; "
                     f"{est.per_gpu_bytes / GiB:.2f} GiB is what must fit")
    util = parse_utilization(run.gpu_memory_utilization)
    startup_ok = True
    if run.runtime == "vllm":
        limit = int(util * gpu.memory_bytes)
        # vLLM starts only if, once its CUDA context exists, its whole budget is free.
        free_after_context = (gpu.memory_bytes if gpu.free_bytes is None else gpu.free_bytes) - CUDA_CONTEXT_BYTES
        if free_after_context < limit:
            startup_ok = False
            most = max(Decimal(0), Decimal(free_after_context) / Decimal(gpu.memory_bytes))
            notes.append(
                f"vLLM refuses to start: after its CUDA context {free_after_context / GiB:.2f} GiB would be free, less than "
                f"gpu_memory_utilization {util} x {gpu.memory_bytes / GiB:.2f} GiB; at most "
                f"{most.quantize(Decimal('0.01'), rounding='ROUND_DOWN')} would start"
            )
        if shape.num_heads % run.tensor_parallel:
            notes.append(f"vLLM needs the GPU count to divide the {shape.num_heads} attention heads")
    else:
        limit = gpu.memory_bytes if gpu.free_bytes is None else min(gpu.memory_bytes, gpu.free_bytes)
    verdict = verdict_for(est.per_gpu_bytes, limit) if startup_ok else "does_not_fit"

    hi = max(shape.max_context, 1)  # to 1/1024 of the model's positions: 128 tokens of 131,072
    best = largest_fitting(hi, lambda c, short: model.estimate(c, shortcut=short).per_gpu_bytes, limit,
                           step=max(1, hi // 1024)) if startup_ok else 0

    pool = capacity = concurrency = 0
    if run.runtime == "vllm":
        static = est.breakdown.weights + est.breakdown.activations + est.breakdown.overhead
        pool = max(0, limit - static)
        seq = kv_sequence_bytes(shape, context, runtime="vllm", tp=run.tensor_parallel, kv_bytes=model.kv_bytes)
        if seq:
            concurrency = pool // seq
            capacity = pool * context // seq
    if shape.num_kv_heads < run.tensor_parallel and shape.mla is None:
        notes.append(f"{shape.num_kv_heads} KV head(s) over {run.tensor_parallel} GPUs: each GPU keeps a replicated copy")
    return FitResult(
        estimate=est, gpu=gpu, limit_bytes=limit, verdict=verdict, max_context=best, model_max_context=shape.max_context,
        kv_pool_bytes=pool, kv_token_capacity=capacity, max_concurrency=concurrency, notes=tuple(dict.fromkeys(notes)),
    )
