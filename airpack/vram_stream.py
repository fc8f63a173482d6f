"""transformers' ``generate()`` as a stream of tensor births and deaths, written from the model's shape, no torch.

The pure estimator's figure for the transformers runtime is what PyTorch's caching
allocator must hold at once, and that is not a sum of terms: it depends on the
order in which blocks of which sizes are born and die (a freed float32 score
block is split by the next layer's small tensors and the next scores need a new
segment; a key cache copied per decode step no longer fits where it was). This
module writes the stream transformers produces, op by op, as the trace
(``vram_trace``) records it for each mechanism:

* the weights, in load order;
* per layer at prefill: the norm (RMSNorm's float32 upcast and its temporaries,
  LayerNorm), the projections, rotary embedding (``rotate_half``: a negated half,
  a concatenation, two products and their sum, for q and k), the cache (the layer's
  keys and values copied into it), attention as the backend CUDA picks runs it
  (flash: the output and its log-sum-exp; memory-efficient with the converted
  additive mask; math: float32 q, k, v, float32 scores, softmax and the cast back;
  eager: scores in the model's dtype, the float32 softmax, softcapping, ALiBi's
  bias), the output projection, the residual adds, the MLP (gated or not, the
  activation's own temporaries, MoE routing and the selected experts' rows);
* the final norm and the last token's logits, kept in float32 by ``generate``;
* every decode step: each layer's cache grown by concatenation (the new block is
  born before the old one dies), MoE decode gathering the chosen experts' weights,
  MLA expanding its cache, eager and math scores over the cache.

The stream is replayed through ``vram_alloc.CachingAllocator``, the same model of
the allocator the trace uses, so the reserve is the mechanism's, not a
percentage. ``Peaks.in_use`` (the segments holding a live block at the worst
moment) is what must fit: the allocator gives idle segments back before it fails;
``Peaks.reserved`` is what a roomy GPU shows. What each model type's code does
differently from Llama's is in ``vram_models``. tests/test_vram_oracle.py holds
the replay to recorded traces of 26 architectures (and more) on every machine;
a model type whose attention path is not known takes the math kernel and a
full-length cache (``vram.ATTENTION_PATHS``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from airpack.vram_alloc import CUBLAS_WORKSPACE_BYTES, SMALL_SIZE, CachingAllocator

#: Decode steps replayed in full (every tensor, also those of the small pool) at each end of the generation; the
#: steps between replay what the large pool sees: the grown caches and the large temporaries (``_Stream.quiet``).
FULL_DECODE_STEPS = 2


@dataclass(frozen=True, kw_only=True)
class Layout:
    """What the stream needs of one model on one GPU (local heads and widths under tensor parallelism)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    rope_dim: int  # rotated dims per head (0: no rotary embedding)
    intermediate: int
    vocab: int
    act_bytes: int
    kv_bytes: int
    norm: str  # NORMS: "rms" (Llama: float32 upcast), "rms_fp32" (Gemma), "rms_w32" (OLMo-2), "layer", "layer_fp32" (Cohere), "layer_f32" (OLMo)
    qk_norm: bool
    attention: str  # "flash", "efficient", "math", "eager"
    gated: bool
    composite_act: bool
    fused_gate_up: bool
    parallel: bool  # attention and MLP read the same normed input (GPT-J, Falcon, Phi, NeoX)
    softcap: bool
    moe_experts: int = 0
    moe_top_k: int = 0
    moe_intermediate: int = 0
    moe_shared: int = 0
    layer_windows: tuple[int, ...] = ()  # per layer: its window (0: full attention), -1: no KV cache
    mla: bool = False
    q_lora_rank: int = 0  # MLA: q through a low-rank projection (0: one q_proj)
    kv_lora_rank: int = 0
    mla_rope_dim: int = 0
    mla_nope_dim: int = 0
    embed_scale: bool = False  # the embedding output multiplied by a constant (Gemma's sqrt(hidden), Granite)
    pre_norm: bool = True  # a norm before attention and before the MLP (OLMo-2 has none: only post norms)
    post_norm: bool = False  # a norm on the attention and MLP outputs before the residual add (Gemma-2/3, OLMo-2)
    residual_scale: bool = False  # the branch output multiplied before the residual add (Granite)
    qk_norm_inline: bool = False  # each of q and k normed straight after its projection (Qwen3, OLMo)
    qk_norm_full: bool = False  # the q and k norms span all heads (OLMo), not each head
    fused_qkv: bool = False  # one query_key_value matmul; q, k and v are views of it (GPT-NeoX)
    parallel_norms: int = 1  # norms of the layer input in a parallel layer (GPT-NeoX norms it again for the MLP)
    rope_upcast: bool = False  # q and k upcast to float32 for the rotation and cast back (Cohere)
    rope_concat: bool = False  # q and k rebuilt by cat(rotated, pass-through) even when every dim rotates (Phi-3)
    rope_parts_die: bool = False  # the rotated slices die at that concatenation (GPT-NeoX, Phi-3)
    learned_positions: bool = False  # a position embedding added to the token embedding (GPT-2)
    keeps_branches: bool = False  # the decoder layer's locals keep its normed input and branch outputs (StableLM)
    attn_out_copy: bool = False  # the attention output made contiguous by a copy before the output projection
    rope_fp32: bool = False  # cos and sin kept in float32, q and k rotated in float32 and cast back (OLMo)
    rope_tables: int = 1  # rotary tables the forward builds (Gemma-3: one for local, one for global layers)
    # -- fields added per family below (one line each) --
    sdpa_mask_always: bool = False  # the model always passes SDPA a materialised mask (Falcon: allow_is_causal_skip=False)
    sdpa_repeat_kv: bool = True  # masked grouped heads repeated to every head (transformers' sdpa_attention_forward)
    block_locals: bool = False  # BLOOM, MPT: one name for both normed inputs (the first dies once the second is born), MLP adds the residual
    embed_norm: bool = False  # a norm on the embedding output, the first layer's input (BLOOM's word_embeddings_layernorm)
    eager: str = ""  # eager attention's code: "" (transformers' eager_attention_forward), "bloom", "mpt", "sinks" (gpt-oss)
    moe_dense_layers: tuple[int, ...] = ()  # layers that run the dense MLP among MoE layers (DeepSeek's first_k_dense_replace)
    moe_norm_topk: bool = False  # top-k weights renormalised (a sum over each token's k weights)
    moe_shared_gate: bool = False  # Qwen2-MoE: the shared expert runs first, scaled by sigmoid(shared_expert_gate)
    # moe_router "sigmoid_groups": DeepSeek-V3 (sigmoid scores, group-limited top-k, float32 weights)
    moe_router: str = "cast"  # "cast": float32 softmax, weights cast; "f32": kept (Mixtral); "f32_input" (DeepSeek-V2); "topk_first" (gpt-oss)
    moe_bias: bool = False  # gpt-oss: experts with biases (gathered per row) and the clamped SwiGLU
    mla_rope_interleave: bool = False  # DeepSeek-V3: q_rot and k_rot rotated as even/odd slices in the model's dtype (no complex float32)
    lightning_block: int = 0  # MiniMax: a layer without a KV cache runs lightning attention over blocks of this many tokens
    residual_normed: bool = False  # MiniMax: the residual is the normed input; each sum is residual * alpha + branch * beta
    nope_layers: tuple[int, ...] = ()  # layers without the rotary embedding (the config's no_rope_layers: SmolLM3)
    rope_sliding_only: bool = False  # EXAONE-4: with sliding layers configured, the full-attention layers have no rotary embedding
    rope_interleaved: bool = False  # GLM-4: cos and sin halves repeat_interleave'd per call; q, k die when the rotation returns


    def __post_init__(self) -> None:
        # the stream dispatches on these strings; vram_models spells them: a misspelt one must not run as the default
        for name, allowed in (("norm", NORMS), ("attention", ATTENTIONS), ("eager", EAGERS), ("moe_router", ROUTERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Layout.{name} {getattr(self, name)!r} is not one of {', '.join(map(repr, allowed))}")


NORMS = ("rms", "rms_fp32", "rms_w32", "layer", "layer_fp32", "layer_f32")
ATTENTIONS = ("flash", "efficient", "math", "eager")
EAGERS = ("", "bloom", "mpt", "sinks")
ROUTERS = ("cast", "f32", "f32_input", "topk_first", "sigmoid_groups")


@dataclass(frozen=True)
class Peaks:
    allocated: int
    reserved: int
    in_use: int = 0  # peak of the segments holding live blocks (reserved less wholly free cached segments)


class _Stream:
    """Births and deaths into the allocator model; handles are the allocator's."""

    def __init__(self, capacity: int | None = None) -> None:
        self.alloc = CachingAllocator(capacity)
        self.workspace = False
        # a decode step's temporaries of the small pool (<= 1 MiB) live in 2 MiB segments of their own and leave as
        # they came: between the first and last steps they are not replayed (the large pool decides the footprint)
        self.quiet = False
        self.layer_held: list[int] = []  # die when the decoder layer returns (eager attention's weights)
        self.next_held: list[int] = []  # die when the next decoder layer returns (BLOOM's and MPT's `outputs`)
        self.attn_locals: list[int] = []  # die when the attention module returns, after its output projection (BLOOM, MPT)

    def new(self, nbytes: int) -> int:
        if nbytes <= 0 or (self.quiet and nbytes <= SMALL_SIZE):
            return -1
        return self.alloc.malloc(nbytes)

    def keep(self, nbytes: int) -> int:
        """A block that outlives the step (a grown cache): born whatever its pool."""
        return self.alloc.malloc(nbytes) if nbytes > 0 else -1

    def drop(self, *handles: int) -> None:
        for h in handles:
            if h >= 0:
                self.alloc.free(h)

    def mm(self, nbytes: int) -> int:
        if not self.workspace:
            self.workspace = True
            self.alloc.malloc(CUBLAS_WORKSPACE_BYTES)
        return self.new(nbytes)


def _norm(s: _Stream, lay: Layout, rows: int, width: int) -> int:
    """One norm over ``rows`` x ``width``: its output (the temporaries die inside)."""
    n = rows * width
    ab = lay.act_bytes
    if lay.norm == "layer":
        out = s.new(n * ab)
        mean, rstd = s.new(rows * 4), s.new(rows * 4)
        s.drop(mean, rstd)
        return out
    if lay.norm == "layer_f32":  # OLMo: F.layer_norm(x.float()) without weights, cast back; the float32 x dies inside
        f = s.new(n * 4)
        y = s.new(n * 4)
        mean, rstd = s.new(rows * 4), s.new(rows * 4)
        s.drop(mean, rstd, f)
        out = s.new(n * ab)
        s.drop(y)
        return out
    if lay.norm == "layer_fp32":  # Cohere: float32 x, (x - mean) twice, its square, the product, the weight, the cast
        return _layer_norm_fp32(s, lay, rows, width)
    f = s.new(n * 4) if ab != 4 else -1  # x.to(float32)
    p = s.new(n * 4)  # pow(2)
    m = s.new(rows * 4)  # mean
    s.drop(p)
    e = s.new(rows * 4)
    r = s.new(rows * 4)  # rsqrt(mean + eps)
    s.drop(e)
    y = s.new(n * 4)
    s.drop(r, f)
    if lay.norm == "rms_fp32":  # Gemma: (1 + weight) in float32, then the cast
        w = s.new(n * 4)
        s.drop(y)
        out = s.new(n * ab) if ab != 4 else -1
        s.drop(w if out >= 0 else -1, m)
        return out if out >= 0 else w
    if lay.norm == "rms_w32":  # OLMo-2: (weight * y).to(dtype), both float32 temporaries alive until it returns
        w = s.new(n * 4)
        out = s.new(n * ab) if ab != 4 else -1
        s.drop(w if out >= 0 else -1, y, m)
        return out if out >= 0 else w
    yb = s.new(n * ab) if ab != 4 else -1
    out = s.new(n * ab)
    s.drop(yb, y, m)
    return out


def _layer_norm_fp32(s: _Stream, lay: Layout, rows: int, width: int) -> int:
    """CohereLayerNorm, op by op: its output in the model's dtype."""
    n = rows * width
    f = s.new(n * 4)
    mean = s.new(rows * 4)
    d1 = s.new(n * 4)
    p = s.new(n * 4)
    s.drop(d1)
    var = s.new(rows * 4)
    s.drop(p)
    d2 = s.new(n * 4)
    e = s.new(rows * 4)
    r = s.new(rows * 4)
    s.drop(e)
    y = s.new(n * 4)
    s.drop(d2, r, f)
    w = s.new(n * 4)
    s.drop(y)
    out = s.new(n * lay.act_bytes)
    s.drop(w, mean, var)
    return out


def _rope(s: _Stream, lay: Layout, rows: int, heads: int) -> int:
    """``q * cos + rotate_half(q) * sin`` on ``heads`` heads of ``rows`` tokens: the rotated tensor.

    With float32 tables (OLMo) the products and the sum are float32 (type promotion); the caller casts back.
    """
    ab = 4 if lay.rope_upcast else lay.act_bytes
    pb = 4 if lay.rope_fp32 else ab
    n = rows * heads * lay.rope_dim
    a = s.new(n * pb)
    g = s.new(n // 2 * ab)
    c = s.new(n * ab)
    s.drop(g)
    b = s.new(n * pb)
    s.drop(c)
    e = s.new(n * pb)
    s.drop(a, b)
    return e


def _attention(s: _Stream, lay: Layout, batch: int, q_len: int, kv_len: int, window: int) -> int:
    """The attention call at ``q_len`` queries over ``kv_len`` keys: its output (-1 at a decode step, not written).

    The call's own buffers are born and die inside. SDPA takes a mask where the model passes one (Falcon always;
    a sliding layer whose keys reach its window, as ``masking_utils`` cannot then skip it), and CUDA's kernel choice
    follows: flash only unmasked and in 16-bit, memory-efficient where the heads match, else the math kernel.
    """
    kv_len = min(kv_len, window) if window > 0 and q_len == 1 else kv_len
    if lay.attention == "eager":
        return _eager(s, lay, batch, q_len, kv_len, window)
    masked = lay.sdpa_mask_always or (window > 0 and kv_len >= window)
    kernel = _sdpa_kernel(lay, masked)
    if kernel == "flash":  # its output follows q's layout: a q made contiguous by a cat needs the copy
        out = _flash(s, lay, batch, q_len, kv_len)
        return _sdpa_contiguous(s, lay, batch, q_len, out) if lay.attn_out_copy else out
    rep = _sdpa_repeat_kv(s, lay, batch, q_len, kv_len, masked)
    mask = _sdpa_float_mask(s, lay, batch, q_len, kv_len) if masked else -1
    if kernel == "efficient":
        out = _efficient(s, lay, batch, q_len, kv_len, mask)
    else:
        out = _math(s, lay, batch, q_len, kv_len, mask, lay.heads if rep else lay.kv_heads)
    s.drop(*rep)
    # the math kernel's output is (batch, heads, q, d): attn_output.transpose(1, 2).contiguous() copies it;
    # the memory-efficient kernel writes (batch, q, heads, d) whatever q's layout
    return _sdpa_contiguous(s, lay, batch, q_len, out) if kernel == "math" else out


def _sdpa_contiguous(s: _Stream, lay: Layout, batch: int, q_len: int, out: int) -> int:
    """``attn_output.transpose(1, 2).contiguous()`` where it copies: the copy is born, the kernel's output dies."""
    if out < 0:
        return out
    c = s.new(batch * q_len * lay.heads * lay.v_head_dim * lay.act_bytes)
    s.drop(out)
    return c


# -- SDPA's kernels (flash, memory-efficient, math) -------------------------------------------------


def _sdpa_kernel(lay: Layout, masked: bool) -> str:
    """CUDA's choice (sdp_utils.cpp): flash needs no mask and 16-bit; memory-efficient, head dims aligned and heads matching."""
    if lay.attention == "math":
        return "math"
    if lay.attention == "flash" and not masked and lay.act_bytes != 4:
        return "flash"
    align = 4 if lay.act_bytes == 4 else 8
    aligned = lay.head_dim % align == 0 and lay.v_head_dim % align == 0
    heads_match = lay.kv_heads == lay.heads or lay.sdpa_repeat_kv or not masked
    return "efficient" if aligned and heads_match else "math"


def _sdpa_repeat_kv(s: _Stream, lay: Layout, batch: int, q_len: int, kv_len: int, masked: bool) -> list[int]:
    """``repeat_kv``: with a mask, grouped keys and values are copied to every head (at a decode step ``pack_gqa`` folds q)."""
    if not masked or not lay.sdpa_repeat_kv or lay.kv_heads == lay.heads or q_len == 1:
        return []
    ab = lay.act_bytes
    return [s.new(batch * lay.heads * kv_len * lay.head_dim * ab), s.new(batch * lay.heads * kv_len * lay.v_head_dim * ab)]


def _sdpa_float_mask(s: _Stream, lay: Layout, batch: int, q_len: int, kv_len: int) -> int:
    """``where(mask.logical_not(), -inf, 0)``: the boolean mask, broadcast over the batch, made additive in the model's dtype."""
    n = batch * q_len * kv_len
    inv = s.new(n)
    add = s.new(n * lay.act_bytes)
    s.drop(inv)
    return add


def _flash(s: _Stream, lay: Layout, batch: int, q_len: int, kv_len: int) -> int:
    """The output, then the float32 log-sum-exp the kernel returns (dropped at once)."""
    out = s.new(batch * q_len * lay.heads * lay.v_head_dim * lay.act_bytes) if q_len > 1 else -1
    lse = s.new(batch * lay.heads * q_len * 4)
    s.drop(lse)
    return out


def _efficient(s: _Stream, lay: Layout, batch: int, q_len: int, kv_len: int, mask: int) -> int:
    """The output (no log-sum-exp without grad); a bias whose last dim is not a multiple of 16 is first padded (pad_bias)."""
    if mask >= 0 and kv_len % 16:
        padded = s.new(batch * q_len * _round_up(kv_len, 16) * lay.act_bytes)
        s.drop(mask)
        mask = padded
    out = s.new(batch * q_len * lay.heads * lay.v_head_dim * lay.act_bytes) if q_len > 1 else -1
    s.drop(mask)
    return out


def _math(s: _Stream, lay: Layout, batch: int, q_len: int, kv_len: int, mask: int, kv_heads: int) -> int:
    """aten's ``_scaled_dot_product_attention_math`` in 16-bit on CUDA: float32 q, k, v, each scaled, float32 scores,
    the mask added, softmax, the probabilities cast, the float32 product and its cast back (the output)."""
    ab = lay.act_bytes
    heads, d = lay.heads, lay.head_dim
    scores = batch * heads * q_len * kv_len
    q32 = s.new(batch * heads * q_len * d * 4)
    k32 = s.new(batch * kv_heads * kv_len * d * 4)
    v32 = s.new(batch * kv_heads * kv_len * lay.v_head_dim * 4)
    qs = s.new(batch * heads * q_len * d * 4)
    ks = s.new(batch * kv_heads * kv_len * d * 4)
    # matmul folds (batch, heads) into one bmm dim: over a batch that is not 1, q laid out (batch, seq, heads, d)
    # and keys or values broadcast over the heads cannot be viewed so, and are copied for the product
    bcast = batch > 1 and kv_heads < heads
    qc = s.new(batch * heads * q_len * d * 4) if batch > 1 and q_len > 1 else -1
    kc = s.new(batch * heads * kv_len * d * 4) if bcast else -1
    sc = s.new(scores * 4)
    s.drop(kc, qc, ks)
    if mask >= 0:
        add = s.new(scores * 4)
        s.drop(sc)
        sc = add
    sm = s.new(scores * 4)
    s.drop(sc)
    low = s.new(scores * ab)
    vc = s.new(batch * heads * kv_len * lay.v_head_dim * 4) if bcast else -1
    o32 = s.new(batch * heads * q_len * lay.v_head_dim * 4)
    s.drop(vc)
    out = s.new(batch * heads * q_len * lay.v_head_dim * ab)
    s.drop(o32, sm, qs, v32, k32, q32, low, mask)
    if q_len == 1:
        s.drop(out)
        return -1
    return out


# -- eager attention (the model's own code: scores in its dtype, softcapping, ALiBi, sinks) ------------


def _eager(s: _Stream, lay: Layout, batch: int, q_len: int, kv_len: int, window: int) -> int:
    """The model's own attention code, op by op: its output (-1 at a decode step, not written).

    The weights it returns stay referenced after it (``_eager_layer_end``).
    """
    ab = lay.act_bytes
    heads = lay.heads
    # repeat_kv: expand + reshape copies keys and values to every query head (GQA)
    kv = [s.new(batch * heads * kv_len * lay.head_dim * ab), s.new(batch * heads * kv_len * lay.v_head_dim * ab)] \
        if lay.kv_heads != heads else []
    # the query is a transposed view (BLOOM's and MPT's split of the fused projection; rotate_half keeps the layout
    # of its transposed input): the matmul's reshape to (batch * heads, q, d) copies it, unless batch or q_len is 1
    # (then a view); gpt-oss's rotary concatenates, a contiguous result
    qc = s.new(batch * heads * q_len * lay.head_dim * ab) if lay.eager != "sinks" and batch > 1 and q_len > 1 else -1
    if lay.eager == "bloom":
        probs, local = _eager_bloom(s, lay, batch * heads * q_len * kv_len, qc)
    elif lay.eager == "mpt":
        probs, local = _eager_mpt(s, lay, batch * heads * q_len * kv_len, qc)
    elif lay.eager == "sinks":
        probs, local = _eager_sinks(s, lay, batch * heads * q_len, kv_len)
    else:
        probs, local = _eager_hf(s, lay, batch * heads * q_len * kv_len, qc)
    ctx = s.new(batch * heads * q_len * lay.v_head_dim * ab)  # probs @ v
    out = s.new(batch * heads * q_len * lay.v_head_dim * ab)  # made contiguous (transpose, or BLOOM's merge of heads)
    s.drop(ctx, *kv)
    if q_len == 1:  # a decode step's output is not written
        s.drop(out, *local)
        out = -1
    else:  # BLOOM's and MPT's attention module outlives the eager code: its locals die when it returns
        s.attn_locals += local
    if lay.eager in ("bloom", "mpt"):  # the block's (output, weights) tuple is the model loop's `outputs` until the next block returns
        s.layer_held += s.next_held
        s.next_held = [probs]
    else:  # `hidden_states, _ = self.self_attn(...)`: the decoder layer's `_` holds the weights until it returns
        s.layer_held.append(probs)
    return out


def _eager_softmax(s: _Stream, lay: Layout, scores: int, x: int, *, upcast: bool) -> int:
    """``softmax(x, dtype=float32).to(dtype)``: the float32 copy (when ``x`` is not float32), the softmax, the cast back."""
    f = s.new(scores * 4) if upcast else -1
    sm = s.new(scores * 4)
    s.drop(f)
    probs = s.new(scores * lay.act_bytes)
    s.drop(sm)
    return probs


def _eager_bloom(s: _Stream, lay: Layout, scores: int, qc: int) -> tuple[int, list[int]]:
    """``alibi.baddbmm(q, k)``, ``+ mask``, the float32 softmax; the reshaped query and both score blocks are locals until it returns."""
    ab = lay.act_bytes
    sc = s.new(scores * ab)
    masked = s.new(scores * ab)
    return _eager_softmax(s, lay, scores, masked, upcast=ab != 4), [qc, sc, masked]


def _eager_mpt(s: _Stream, lay: Layout, scores: int, qc: int) -> tuple[int, list[int]]:
    """``q @ k^T * scale``, ``+ position_bias`` (float32: the scores promote), ``masked_fill``, softmax, the cast."""
    ab = lay.act_bytes
    sc = s.new(scores * ab)
    s.drop(qc)
    scaled = s.new(scores * ab)
    s.drop(sc)
    biased = s.new(scores * 4)
    s.drop(scaled)
    filled = s.new(scores * 4)
    s.drop(biased)
    return _eager_softmax(s, lay, scores, filled, upcast=False), [filled]


def _eager_hf(s: _Stream, lay: Layout, scores: int, qc: int) -> tuple[int, list[int]]:
    """transformers' ``eager_attention_forward``: ``q @ k^T * scaling``, softcapping, ``+ mask``, the float32 softmax."""
    ab = lay.act_bytes
    sc = s.new(scores * ab)
    s.drop(qc)
    for _ in range(4 if lay.softcap else 1):  # * scaling (then / softcap, tanh, * softcap)
        nxt = s.new(scores * ab)
        s.drop(sc)
        sc = nxt
    masked = s.new(scores * ab)
    s.drop(sc)
    probs = _eager_softmax(s, lay, scores, masked, upcast=ab != 4)
    s.drop(masked)
    return probs, []


def _eager_sinks(s: _Stream, lay: Layout, rows: int, kv_len: int) -> tuple[int, list[int]]:
    """gpt-oss: ``q @ k^T * scaling + mask``, cat the sink logit, minus the row max, softmax in the model's dtype, the sink dropped."""
    ab = lay.act_bytes
    sc = s.new(rows * kv_len * ab)
    scaled = s.new(rows * kv_len * ab)
    s.drop(sc)
    masked = s.new(rows * kv_len * ab)
    s.drop(scaled)
    combined = s.new(rows * (kv_len + 1) * ab)
    mx, idx = s.new(rows * ab), s.new(rows * 8)  # max(dim=-1): values and indices
    s.drop(idx)
    shifted = s.new(rows * (kv_len + 1) * ab)
    s.drop(combined, mx)
    probs = s.new(rows * (kv_len + 1) * ab)  # the returned weights are a slice of it
    s.drop(masked)
    return probs, [shifted]


def _eager_bloom_gelu(s: _Stream, lay: Layout, n: int, x: int) -> int:
    """BLOOM's MLP activation, ``x * 0.5 * (1.0 + tanh(0.79788456 * x * (1 + 0.044715 * x * x)))`` in Python's order."""
    ab = lay.act_bytes
    half, b, c = s.new(n * ab), s.new(n * ab), s.new(n * ab)  # x * 0.5, 0.79788456 * x, 0.044715 * x
    d = s.new(n * ab)  # * x
    s.drop(c)
    e = s.new(n * ab)  # 1 + ...
    s.drop(d)
    f = s.new(n * ab)  # b * e
    s.drop(b, e)
    g = s.new(n * ab)  # tanh
    s.drop(f)
    h = s.new(n * ab)  # 1.0 + ...
    s.drop(g)
    out = s.new(n * ab)
    s.drop(half, h, x)
    return out


def _eager_return(s: _Stream, lay: Layout, *dying: int, after_residual: bool) -> None:
    """The attention module returned: ``dying`` (its output, the projections) and the eager code's locals die.

    That is after its output projection, or for BLOOM after its ``dropout_add`` of the residual.
    """
    if lay.eager == "bloom" and not after_residual:  # the trace's order: the projections, the scores, the merged heads
        out, *rest = dying
        s.attn_locals = [*rest, *s.attn_locals, out]
        return
    s.drop(*dying, *s.attn_locals)
    s.attn_locals = []


def _eager_layer_end(s: _Stream) -> None:
    """A decoder layer returned: the attention weights its locals (or, BLOOM and MPT, the loop's previous `outputs`) held die."""
    s.drop(*s.attn_locals, *s.layer_held)
    s.attn_locals, s.layer_held = [], []


def _eager_forward_end(s: _Stream) -> list[int]:
    """What the model loop's `outputs` still holds when the forward returns (BLOOM's and MPT's last attention weights)."""
    held, s.next_held = s.next_held, []
    return held


def _eager_masks(s: _Stream, lay: Layout, batch: int, prompt: int) -> list[int]:
    """What an eager model's forward builds once at prefill for attention (masks, ALiBi) and holds until it returns."""
    ab = lay.act_bytes
    pp = prompt * prompt
    held: list[int] = []
    if lay.eager == "bloom":  # slopes * arange(kv), repeated per batch row in float32, cast to the model's dtype
        ar = s.new(lay.heads * prompt * 4)
        rep = s.new(batch * lay.heads * prompt * 4)
        held.append(s.new(batch * lay.heads * prompt * ab))
        s.drop(rep, ar)
    kinds = sorted({w > 0 for w in lay.layer_windows if w >= 0}) if lay.eager not in ("bloom", "mpt") else [False]
    for sliding in kinds:  # masking_utils: the boolean causal (and sliding) mask made additive (where) in the model's dtype
        b = _sliding_mask(s, prompt) if sliding else s.new(pp)
        add = s.new(batch * pp * ab)
        s.drop(b)
        if lay.eager == "mpt":  # `.to(torch.bool)`: MPT masks with masked_fill
            held.append(s.new(batch * pp))
            s.drop(add)
        else:
            held.append(add)
    return held


def _masks(s: _Stream, lay: Layout, batch: int, prompt: int) -> list[int]:
    """The attention masks the model's forward builds once at prefill and holds until it returns."""
    if lay.attention == "eager":
        return _eager_masks(s, lay, batch, prompt)
    if lay.sdpa_mask_always:  # create_causal_mask(allow_is_causal_skip=False): kv_idx <= q_idx, broadcast over the batch
        return [s.new(prompt * prompt)]
    if any(w > 0 and prompt >= w for w in lay.layer_windows):  # the sliding layers' mask (full layers skip theirs)
        return [_sliding_mask(s, prompt)]
    return []


def _sliding_mask(s: _Stream, prompt: int) -> int:
    """masking_utils' ``and_masks(sliding_window_overlay, causal)`` over the index grid, ``result & fn(...)`` per
    function: (kv > q - w), its copy, the ands, (kv <= q). Eager and SDPA models build it alike."""
    n = prompt * prompt
    gt = s.new(n)
    cp = s.new(n)
    s.drop(gt)
    a1 = s.new(n)
    s.drop(cp)
    le = s.new(n)
    a2 = s.new(n)
    s.drop(le, a1)
    return a2


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _mlp(s: _Stream, lay: Layout, rows: int, n_in: int) -> int:
    """The MLP on ``rows`` tokens: its output (``n_in``, the normed input, is the caller's)."""
    ab = lay.act_bytes
    n = rows * lay.intermediate
    if lay.moe_experts:
        return _moe(s, lay, rows)
    if lay.fused_gate_up:  # gate, up = gate_up.chunk(2): the views keep gate_up alive until the MLP returns
        gu = s.mm(2 * n * ab)
        a = s.new(n * ab)
        m = s.new(n * ab)
        s.drop(a)
        out = s.mm(rows * lay.hidden * ab)
        s.drop(m, gu)
        return out
    elif lay.gated:
        return _gated(s, lay, rows, lay.intermediate)
    else:
        u = s.mm(n * ab)
        m = _act(s, lay, n, u)
    out = s.mm(rows * lay.hidden * ab)
    if lay.block_locals:  # BLOOM's and MPT's MLP adds the residual itself: its activation dies after that sum
        s.layer_held.append(m)
    else:
        s.drop(m)
    return out


def _gated(s: _Stream, lay: Layout, rows: int, width: int) -> int:
    """``down(act(gate(x)) * up(x))`` of ``width`` over ``rows`` tokens: gate, its activation, up, the product, down;
    the output (the dense MLP, a shared expert, a decode step's MLP)."""
    ab, n = lay.act_bytes, rows * width
    g = s.mm(n * ab)
    a = s.new(n * ab)
    s.drop(g)
    u = s.mm(n * ab)
    m = s.new(n * ab)
    s.drop(a, u)
    out = s.mm(rows * lay.hidden * ab)
    s.drop(m)
    return out


def _act(s: _Stream, lay: Layout, n: int, x: int) -> int:
    """The activation of an ungated MLP; the composite GELUs keep their temporaries (``x`` dies after it)."""
    ab = lay.act_bytes
    if lay.eager == "bloom":
        return _eager_bloom_gelu(s, lay, n, x)
    if lay.composite_act:  # 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), one op at a time
        half = s.new(n * ab)
        cube = s.new(n * ab)
        t = s.new(n * ab)
        s.drop(cube)
        for _ in range(3):  # x + ..., * sqrt(2/pi), tanh
            nxt = s.new(n * ab)
            s.drop(t)
            t = nxt
        one = s.new(n * ab)
        s.drop(t)
        out = s.new(n * ab)
        s.drop(half, one, x)
        return out
    out = s.new(n * ab)
    s.drop(x)
    return out


def _moe(s: _Stream, lay: Layout, rows: int) -> int:
    """A MoE block at prefill (``grouped_mm``): the router, the experts over every (token, expert) row, any shared expert.

    Qwen2-MoE runs its shared expert before the router and scales it by a sigmoid gate; DeepSeek adds it after the experts.
    """
    ab, h = lay.act_bytes, lay.hidden
    shared = _moe_shared(s, lay, rows) if lay.moe_shared and lay.moe_shared_gate else -1
    wb, keep = _moe_router(s, lay, rows)
    out = _moe_grouped(s, lay, rows, wb)
    if shared >= 0:
        g = s.mm(rows * ab)  # shared_expert_gate: one logit per token
        sg = s.new(rows * ab)
        s.drop(g)
        scaled = s.new(rows * h * ab)
        s.drop(sg, shared)
        tot = s.new(rows * h * ab)
        s.drop(out)
        s.drop(scaled)
        out = tot
    elif lay.moe_shared:
        sh = _moe_shared(s, lay, rows)
        tot = s.new(rows * h * ab)
        s.drop(sh, out)
        out = tot
    s.drop(*keep)
    return out


def _moe_shared(s: _Stream, lay: Layout, rows: int) -> int:
    """The shared expert: a gated MLP of ``moe_shared`` width on every token; its output."""
    return _gated(s, lay, rows, lay.moe_shared)


def _moe_router(s: _Stream, lay: Layout, rows: int) -> tuple[int, list[int]]:
    """The router on ``rows`` tokens: the routing weights' element size and what the block holds to its end.

    The logits, the top-k weights and indices live until the block returns; the float32 softmax dies once top-k is taken.
    """
    ab, e, k = lay.act_bytes, lay.moe_experts, lay.moe_top_k
    if lay.moe_router == "topk_first":  # gpt-oss: top-k of the biased logits, softmax over the k in the model's dtype
        logits = s.mm(rows * e * ab)
        vals, idx = s.new(rows * k * ab), s.new(rows * k * 8)
        sm = s.new(rows * k * ab)
        s.drop(vals)
        return ab, [logits, idx, sm]
    if lay.moe_router == "sigmoid_groups":
        return 4, _moe_router_groups(s, lay, rows)
    if lay.moe_router == "f32_input":  # DeepSeek-V2: the router in float32, weights scaled by routed_scaling_factor
        x32 = s.new(rows * lay.hidden * 4)
        logits = s.mm(rows * e * 4)
        s.drop(x32)
        sm = s.new(rows * e * 4)
        vals, idx = s.new(rows * k * 4), s.new(rows * k * 8)
        w = s.new(rows * k * 4)
        s.drop(vals, sm)
        return 4, [logits, w, idx]
    logits = s.mm(rows * e * ab)
    l32 = s.new(rows * e * 4)
    sm = s.new(rows * e * 4)
    s.drop(l32)
    vals, idx = s.new(rows * k * 4), s.new(rows * k * 8)
    if lay.moe_norm_topk:
        total = s.new(rows * 4)
        s.drop(total)
    if lay.moe_router == "f32":  # Mixtral: the weights stay float32
        s.drop(sm)
        return 4, [logits, vals, idx]
    w = s.new(rows * k * ab)
    s.drop(vals, sm)
    return ab, [logits, w, idx]


def _moe_router_groups(s: _Stream, lay: Layout, rows: int) -> list[int]:
    """DeepSeek-V3's router: float32 logits, sigmoid scores plus the correction bias, the experts of unselected groups
    masked (the expanded group mask is reshaped into a copy, made bool, inverted), top-k, the scores gathered,
    renormalised and scaled. Returns what the block holds to its end (logits, weights, indices).

    The per-group tensors (rows x n_group) are left out: the config's group count is not in the shape, and they are
    a few bytes a token beside the rows x experts ones.
    """
    e, k = lay.moe_experts, lay.moe_top_k
    x32 = s.new(rows * lay.hidden * 4)
    logits = s.mm(rows * e * 4)
    s.drop(x32)
    sig = s.new(rows * e * 4)
    choice = s.new(rows * e * 4)  # scores + e_score_correction_bias
    mask = s.new(rows * e * 4)
    b = s.new(rows * e)
    nb = s.new(rows * e)
    s.drop(b)
    masked = s.new(rows * e * 4)
    s.drop(nb, choice)
    vals, idx = s.new(rows * k * 4), s.new(rows * k * 8)
    s.drop(vals)
    g = s.new(rows * k * 4)  # scores.gather(1, topk_indices)
    den = -1
    if lay.moe_norm_topk:  # sum + 1e-20, then an in-place division
        total = s.new(rows * 4)
        den = s.new(rows * 4)
        s.drop(total)
    w = s.new(rows * k * 4)  # * routed_scaling_factor
    s.drop(g, sig, masked, mask, den)
    return [logits, w, idx]


def _moe_gate(s: _Stream, lay: Layout, pairs: int, gu: int) -> int:
    """The experts' activation on the gate_up rows ``gu`` (which die here): the product that goes into down."""
    ab, n = lay.act_bytes, pairs * lay.moe_intermediate
    if not lay.gated:
        a = s.new(n * ab)
        s.drop(gu)
        return a
    if lay.moe_bias:  # gpt-oss: clamp both halves, gate * sigmoid(gate * alpha), (up + 1) * glu
        cg, cu = s.new(n * ab), s.new(n * ab)
        ga = s.new(n * ab)
        sg = s.new(n * ab)
        s.drop(ga)
        glu = s.new(n * ab)
        s.drop(sg)
        up1 = s.new(n * ab)
        m = s.new(n * ab)
        s.drop(up1, cg, cu, glu, gu)
        return m
    a = s.new(n * ab)
    m = s.new(n * ab)
    s.drop(a, gu)
    return m


def _moe_grouped(s: _Stream, lay: Layout, rows: int, wb: int) -> int:
    """``grouped_mm_experts_forward``: the rows sorted by expert, gathered, through gate_up, the gate and down,
    weighted (float32 weights promote the product), put back in token order and summed over each token's k rows."""
    ab, h, e = lay.act_bytes, lay.hidden, lay.moe_experts
    pairs = rows * lay.moe_top_k
    wab = max(ab, wb)
    ids, perm = s.new(pairs * 8), s.new(pairs * 8)  # torch.sort
    fd = s.new(pairs * 8)  # perm // top_k
    x = s.new(pairs * h * ab)
    s.drop(fd)
    sw = s.new(pairs * wb)
    ic = s.new(pairs * 4)  # expert ids as int32 for histc
    hist, offs = s.new(e * 4), s.new(e * 4)
    gub = s.new(pairs * 2 * lay.moe_intermediate * ab) if lay.moe_bias else -1
    gu = s.mm(pairs * (2 if lay.gated else 1) * lay.moe_intermediate * ab)
    m = _moe_gate(s, lay, pairs, gu)
    db = s.new(pairs * h * ab) if lay.moe_bias else -1
    s.drop(gub)
    down = s.mm(pairs * h * ab)
    s.drop(m)
    weighted = s.new(pairs * h * wab)
    inv = s.new(pairs * 8)
    ar = s.new(pairs * 8)
    s.drop(ar)
    back = s.new(pairs * h * wab)
    s.drop(weighted)
    summed = s.new(rows * h * wab)
    out = s.new(rows * h * ab) if wab != ab else summed
    s.drop(ids, perm, x, sw, ic, hist, offs, db, down, back, inv)
    if out != summed:
        s.drop(summed)
    return out


def _moe_layer(lay: Layout, i: int) -> Layout:
    """Layer ``i``'s layout: the dense MLP's (no experts) where the model builds one among its MoE layers."""
    return replace(lay, moe_experts=0) if lay.moe_experts and i in lay.moe_dense_layers else lay


def _layer_code(lay: Layout, i: int) -> Layout:
    """Layer ``i``'s layout at prefill: ``_moe_layer``'s, without the rotary embedding where the code skips it (SmolLM3's
    NoPE layers; EXAONE-4 rotates only its sliding layers once a sliding window is configured, with none every layer)."""
    lay = _moe_layer(lay, i)
    if i in lay.nope_layers or (lay.rope_sliding_only and lay.layer_windows[i] == 0 and any(w > 0 for w in lay.layer_windows)):
        return replace(lay, rope_dim=0)
    return lay


def _projections(s: _Stream, lay: Layout, rows: int, n: int) -> tuple[int, int, int, list[int]]:
    """q, k and v of ``rows`` tokens from the normed input ``n``, after any q/k norm and the rotary embedding.

    The list: blocks the attention forward still references until it returns (dropped after the output projection).
    """
    if lay.mla:
        return _mla_projections(s, lay, rows, n)
    q, k, v, hold = _qkv(s, lay, rows)
    if lay.qk_norm and not lay.qk_norm_inline:
        qn = _norm(s, lay, rows * lay.heads, lay.head_dim)
        s.drop(q)
        kn = _norm(s, lay, rows * lay.kv_heads, lay.head_dim)
        s.drop(k)
        q, k = qn, kn
    if not lay.rope_dim:
        return q, k, v, hold
    ab = lay.act_bytes
    if lay.rope_dim < lay.head_dim or lay.rope_concat:
        # partial rotary: the rotated slices, then cat(rotated, pass-through); the slices' bases and the rotated
        # parts stay referenced until the attention forward returns (StableLM, Phi) or die at their concatenation
        # (GPT-NeoX and Phi-3 concatenate the rotated expression directly; Phi-3 does even with nothing to pass)
        # GLM-4: cos[..., :d/2].repeat_interleave(2) and sin's, copies of the tables born before the rotation
        tabs = [s.new(rows * lay.rope_dim * ab) for _ in range(2)] if lay.rope_interleaved else []
        qr = _rope(s, lay, rows, lay.heads)
        if not lay.rope_concat:  # apply_rotary_pos_emb on both slices, then the concatenations (Phi-3: q's, then k's)
            kr = _rope(s, lay, rows, lay.kv_heads)
        qf = s.new(rows * lay.heads * lay.head_dim * ab)
        if lay.rope_parts_die:
            s.drop(qr)
            qr = -1
        if lay.rope_concat:
            kr = _rope(s, lay, rows, lay.kv_heads)
        kf = s.new(rows * lay.kv_heads * lay.head_dim * ab)
        if lay.rope_parts_die:
            s.drop(kr)
            kr = -1
        if lay.rope_interleaved:  # q_rot and k_rot are views of locals that apply_rotary_pos_emb's return releases
            s.drop(*tabs, q, k)
            return qf, kf, v, [qr, kr, *hold]
        return qf, kf, v, [qr, q, kr, k, *hold]
    up: list[int] = []
    if lay.rope_upcast:  # Cohere: q.float(), k.float(), rotated in float32
        up = [s.new(rows * lay.heads * lay.head_dim * 4), s.new(rows * lay.kv_heads * lay.head_dim * 4)]
    qe = _rope(s, lay, rows, lay.heads)
    ke = _rope(s, lay, rows, lay.kv_heads)
    if lay.rope_upcast:
        qc = s.new(rows * lay.heads * lay.head_dim * ab)
        kc = s.new(rows * lay.kv_heads * lay.head_dim * ab)
        s.drop(*up, qe, ke, q, k)
        return qc, kc, v, hold
    if lay.rope_fp32:  # q_embed.to(q_type), k_embed.to(k_type); the unrotated q and k die after the casts
        qc = s.new(rows * lay.heads * lay.head_dim * ab)
        kc = s.new(rows * lay.kv_heads * lay.head_dim * ab)
        s.drop(qe, ke)
        qe, ke = qc, kc
    s.drop(q, k)
    return qe, ke, v, hold


def _qkv(s: _Stream, lay: Layout, rows: int) -> tuple[int, int, int, list[int]]:
    """The three projections (one fused matmul whose q, k, v are views, or three; q/k normed inline when so written)."""
    ab = lay.act_bytes
    qn, kvn = rows * lay.heads * lay.head_dim, rows * lay.kv_heads * lay.head_dim
    if lay.fused_qkv:
        base = s.mm((qn + kvn) * ab + rows * lay.kv_heads * lay.v_head_dim * ab)
        return -1, -1, -1, [base]
    if lay.qk_norm and lay.qk_norm_inline:  # q_norm(q_proj(x)), k_norm(k_proj(x)), then v_proj(x)
        full = lay.qk_norm_full
        q = s.mm(qn * ab)
        qq = _norm(s, lay, rows, lay.heads * lay.head_dim) if full else _norm(s, lay, rows * lay.heads, lay.head_dim)
        s.drop(q)
        k = s.mm(kvn * ab)
        kk = _norm(s, lay, rows, lay.kv_heads * lay.head_dim) if full else _norm(s, lay, rows * lay.kv_heads, lay.head_dim)
        s.drop(k)
        return qq, kk, s.mm(rows * lay.kv_heads * lay.v_head_dim * ab), []
    q = s.mm(qn * ab)
    k = s.mm(kvn * ab)
    return q, k, s.mm(rows * lay.kv_heads * lay.v_head_dim * ab), []


# -- multi-head latent attention (DeepSeek-V2/V3) -------------------------------------------------------


def _mla_projections(s: _Stream, lay: Layout, rows: int, n: int) -> tuple[int, int, int, list[int]]:
    """DeepSeek-V2's attention up to its cache update: the q projection (or q_a, its norm, q_b), the latent
    ``kv_a_proj_with_mqa`` split into the latent (normed) and the shared rope part, and the rotary embedding on
    q_pe and k_pe in complex float32.

    Returns the q projection, the normed latent and the rotated k_pe (the cache copies those two, then they die)
    and what the forward holds until it returns (the rotated q_pe, the kv_a output).
    """
    ab, heads, rope = lay.act_bytes, lay.heads, lay.mla_rope_dim
    if lay.q_lora_rank:
        qa = s.mm(rows * lay.q_lora_rank * ab)
        qan = _norm(s, lay, rows, lay.q_lora_rank)
        s.drop(qa)
        q = s.mm(rows * heads * lay.head_dim * ab)
        s.drop(qan)
    else:
        q = s.mm(rows * heads * lay.head_dim * ab)
    kva = s.mm(rows * (lay.kv_lora_rank + rope) * ab)
    kvn = _norm(s, lay, rows, lay.kv_lora_rank)
    if lay.mla_rope_interleave:
        qr = _rope_interleave(s, lay, rows * heads * rope)
        kr = _rope_interleave(s, lay, rows * rope)
        return q, kvn, kr, [qr, kva]
    qf = s.new(rows * heads * rope * 4)  # q_pe.float()
    kf = s.new(rows * rope * 4)
    qm = s.new(rows * heads * rope * 4)  # complex64 product with freqs_cis
    qr = s.new(rows * heads * rope * ab)  # type_as(q)
    s.drop(qm)
    km = s.new(rows * rope * 4)
    kr = s.new(rows * rope * ab)
    s.drop(km, qf, kf)
    return q, kvn, kr, [qr, kva]


def _rope_interleave(s: _Stream, lay: Layout, n: int) -> int:
    """DeepSeek-V3's ``apply_rotary_pos_emb_interleave`` on ``n`` elements: ``cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin])``
    on the even and odd halves, in the model's dtype; the rotated tensor."""
    ab = lay.act_bytes
    half = n // 2 * ab
    a, b = s.new(half), s.new(half)
    d = s.new(half)
    s.drop(a, b)
    a, b = s.new(half), s.new(half)
    t = s.new(half)
    s.drop(a, b)
    out = s.new(n * ab)
    s.drop(t, d)
    return out


def _mla_expand(s: _Stream, lay: Layout, rows: int, kv_rows: int, q: int, hold: list[int]) -> tuple[int, list[int]]:
    """After the cache update: ``cat(q_nope, q_pe)`` and ``expand_kv`` over the ``kv_rows`` cached tokens (kv_b_proj of
    the latent: k_nope and v as views of one product; the keys copied into a new tensor with the shared k_pe).

    Returns the query and what the forward holds until it returns; v is not padded (the efficient kernel takes it).
    """
    ab, heads = lay.act_bytes, lay.heads
    query = s.new(rows * heads * lay.head_dim * ab)
    kv = s.mm(kv_rows * heads * (lay.mla_nope_dim + lay.v_head_dim) * ab)
    keys = s.new(kv_rows * heads * lay.head_dim * ab)
    return query, [*hold, q, kv, keys]


def _mla_cache_widths(lay: Layout) -> tuple[int, int]:
    """Elements one token adds to a layer's two cache tensors: keys and values, or MLA's latent and its rope part."""
    if lay.mla:  # transformers caches the compressed latent and the shared k_pe, not per-head keys and values
        return lay.kv_lora_rank, lay.mla_rope_dim
    return lay.kv_heads * lay.head_dim, lay.kv_heads * lay.v_head_dim


def _mla_decode(s: _Stream, lay: Layout, batch: int, kv_len: int) -> None:
    """A decode step's MLA attention after the cache grew: the latent cache expanded to per-head keys and values
    over all ``kv_len`` tokens (the step's own projections are a few rows; the norm's input is the caller's)."""
    q, kvn, kr, hold = _mla_projections(s, lay, batch, -1)
    s.drop(kvn, kr)
    query, hold = _mla_expand(s, lay, batch, batch * kv_len, q, hold)
    out = s.new(batch * lay.heads * lay.v_head_dim * lay.act_bytes)
    o = s.mm(batch * lay.hidden * lay.act_bytes)
    s.drop(out, query, *hold, o)


def _moe_decode(s: _Stream, lay: Layout, batch: int) -> None:
    """A MoE block at a decode step (``batched_mm``): each (token, expert) row gathers its expert's gate_up and then its
    down weights (the down copy is born before the gate_up copy dies), two batched products, the weighted sum."""
    ab, h, inter = lay.act_bytes, lay.hidden, lay.moe_intermediate
    pairs = batch * lay.moe_top_k
    wb, keep = _moe_router(s, lay, batch)
    wab = max(ab, wb)
    x = s.new(pairs * h * ab)  # repeat_interleave
    up = (2 if lay.gated else 1) * inter
    wgu = s.new(pairs * up * h * ab)
    gub = s.new(pairs * up * ab) if lay.moe_bias else -1
    gu = s.mm(pairs * up * ab)
    m = _moe_gate(s, lay, pairs, gu)
    wd = s.new(pairs * h * inter * ab)
    s.drop(wgu)
    db = s.new(pairs * h * ab) if lay.moe_bias else -1
    s.drop(gub)
    down = s.mm(pairs * h * ab)
    s.drop(m)
    weighted = s.new(pairs * h * wab)
    summed = s.new(batch * h * wab)
    out = s.new(batch * h * ab) if wab != ab else -1
    s.drop(x, wd, db, down, weighted, summed, out, *keep)


def _layer_prefill(s: _Stream, lay: Layout, batch: int, prompt: int, x_in: int, window: int,
                   cache: list[int]) -> int:
    """One decoder layer over the prompt: its output; the cache blocks it keeps go to ``cache``."""
    ab = lay.act_bytes
    rows = batch * prompt
    h = lay.hidden
    n = _norm(s, lay, rows, h) if lay.pre_norm else x_in
    if lay.lightning_block and window < 0:  # MiniMax: lightning attention, a recurrent state in place of a KV cache
        o = _lightning(s, lay, batch, prompt, n, cache)
    else:
        o = _attention_prefill(s, lay, batch, prompt, n, window, cache)
    if lay.residual_normed:
        return _normed_residuals(s, lay, rows, n, o)
    if lay.parallel:  # attn(ln(x)) + mlp(ln(x)) + x: both branches alive until the sums
        if lay.parallel_norms > 1:
            s.drop(n)
            n = _norm(s, lay, rows, h)
        m = _mlp(s, lay, rows, n)
        if lay.parallel_norms > 1:  # mlp(post_attention_layernorm(x)): a temporary
            s.drop(n)
            n = -1
        r = s.new(rows * h * ab)
        r2 = s.new(rows * h * ab)
        s.drop(r, n, o, m)
        return r2
    # the layer's locals may hold both branch outputs (and StableLM's normed input) until it returns; GPT-2 rebinds
    # the normed input at the first sum and keeps the MLP's until the second
    keep = lay.keeps_branches
    if lay.pre_norm and not (keep and not lay.learned_positions) and not lay.block_locals:
        s.drop(n)
        n = -1
    r1 = _residual(s, lay, rows, x_in, o, keep=keep)
    _eager_return(s, lay, after_residual=True)
    n2 = _norm(s, lay, rows, h) if lay.pre_norm else r1
    if lay.block_locals:
        s.drop(n)
    m = _mlp(s, lay, rows, n2)
    if lay.block_locals:  # BLOOM, MPT: the MLP adds the residual; its normed input is a block local until it returns
        s.layer_held.append(n2)
    elif lay.pre_norm and not (keep and lay.learned_positions):
        s.drop(n2)
        n2 = -1
    r2 = _residual(s, lay, rows, r1, m, keep=keep)
    s.drop(*((n, n2, r1, o, m) if keep else (r1,)))
    return r2


def _attention_prefill(s: _Stream, lay: Layout, batch: int, prompt: int, n: int, window: int, cache: list[int]) -> int:
    """A layer's attention over the prompt from its normed input ``n``: the output projection; the cache blocks go to ``cache``."""
    rows = batch * prompt
    q, k, v, hold = _projections(s, lay, rows, n)
    if window >= 0:  # the cache copies the layer's keys and values (DynamicLayer: cat onto an empty tensor)
        kw, vw = _mla_cache_widths(lay)
        kc = s.new(rows * kw * lay.kv_bytes)
        vc = s.new(rows * vw * lay.kv_bytes)
        s.drop(k, v)
        cache += [kc, vc]
    else:  # a layer without a per-token cache (a state-space or linear-attention mixer, counted as attention): its
        # keys and values are the attention's own and die with it
        cache += [-1, -1]
        hold = [*hold, k, v]
    if lay.mla:  # the query concatenation and the expanded keys and values, built from the cache
        q, hold = _mla_expand(s, lay, rows, rows, q, hold)
    out = _attention(s, lay, batch, prompt, prompt, window)  # made contiguous there where the kernel's layout needs a copy
    o = s.mm(rows * lay.hidden * lay.act_bytes)
    _eager_return(s, lay, out, q, *hold, after_residual=False)
    return o


def _normed_residuals(s: _Stream, lay: Layout, rows: int, n: int, o: int) -> int:
    """MiniMax's layer after its attention: the residual is the normed input (and then the normed sum), each sum
    ``residual * alpha + branch * beta``; the normed input lives until the second norm, the first sum dies there."""
    r1 = _scaled_sum(s, lay, rows, o)
    n2 = _norm(s, lay, rows, lay.hidden)
    s.drop(r1, n)
    m = _mlp(s, lay, rows, n2)
    r2 = _scaled_sum(s, lay, rows, m)
    s.drop(n2)
    return r2


def _scaled_sum(s: _Stream, lay: Layout, rows: int, branch: int) -> int:
    """``residual * alpha + branch * beta``: both products (a new tensor even at a factor of 1), their sum; the branch dies."""
    nb = rows * lay.hidden * lay.act_bytes
    a, b = s.new(nb), s.new(nb)
    r = s.new(nb)
    s.drop(a, b, branch)
    return r


def _lightning(s: _Stream, lay: Layout, batch: int, prompt: int, n: int, cache: list[int]) -> int:
    """MiniMax's lightning attention over the prompt from the normed input ``n``: its output projection.

    silu(qkv_proj(x)), then the prompt block by block (``_lightning_block``); the loop's locals (the last block's
    scores, products and output) live until the forward returns, the recurrent state goes to ``cache``. The block
    outputs are concatenated, transposed into a copy, normed, gated by sigmoid(output_gate(x)) and projected.
    """
    ab, inner = lay.act_bytes, batch * prompt * lay.heads * lay.head_dim * lay.act_bytes
    qkv = s.mm(3 * inner)
    act = s.new(3 * inner)
    s.drop(qkv)
    state = s.new(batch * lay.heads * lay.head_dim * lay.head_dim * ab)  # torch.zeros
    loop = [-1, -1, -1, -1, -1]
    outs: list[int] = []
    for start in range(0, prompt, lay.lightning_block):
        state = _lightning_block(s, lay, batch, min(lay.lightning_block, prompt - start), state, loop)
        outs.append(loop[4])
    cat = s.new(inner)
    s.drop(*outs[:-1])  # the list is rebound to the concatenation; the loop variable keeps the last block's output
    c = s.new(inner)  # attn_output.transpose(1, 2).reshape(...)
    s.drop(cat)
    y = _norm(s, lay, batch * prompt, lay.heads * lay.head_dim)
    s.drop(c)
    g = s.mm(inner)
    sg = s.new(inner)
    s.drop(g)
    gated = s.new(inner)
    s.drop(sg, y)
    o = s.mm(batch * prompt * lay.hidden * ab)
    s.drop(gated, act, *loop)
    cache += [state, -1]
    return o


def _lightning_block(s: _Stream, lay: Layout, batch: int, size: int, state: int, loop: list[int]) -> int:
    """One block of ``size`` tokens: intra-block scores (q and k sliced, so matmul copies them), decayed, times v; the
    inter-block product with the state; their sum (kept for the concatenation); the state advanced. ``loop`` holds the
    previous block's scores, intra and inter products, k^T v and output, each dying when this block rebinds it."""
    ab = lay.act_bytes
    bb = batch * lay.heads * size * lay.head_dim * ab
    sn = batch * lay.heads * size * size * ab
    st = batch * lay.heads * lay.head_dim * lay.head_dim * ab
    qc, kc = s.new(bb), s.new(bb)
    scores = s.mm(sn)
    s.drop(kc, qc, loop[0])
    sd = s.new(sn)  # * diagonal_decay
    vc = s.new(bb)
    intra = s.mm(bb)
    s.drop(vc, sd, loop[1])
    qd = s.new(bb)  # q * query_decay, copied for the matmul
    qdc = s.new(bb)
    inter = s.mm(bb)
    s.drop(qdc, qd, loop[2])
    out = s.new(bb)
    kd = s.new(bb)  # (k * key_decay).transpose(-1, -2) @ v: both copied
    c1, c2 = s.new(bb), s.new(bb)
    kv = s.mm(st)
    s.drop(c2, c1, kd, loop[3])
    dec = s.new(st)
    new = s.new(st)
    s.drop(dec, state)
    loop[:] = [scores, intra, inter, kv, out]
    return new


def _lightning_decode(s: _Stream, lay: Layout, batch: int, cache: list[int], layer: int) -> None:
    """A decode step of lightning attention: k^T v of the new token, the decayed state plus it (the new state, born
    before the old one dies); the step's projections are a few rows."""
    st = batch * lay.heads * lay.head_dim * lay.head_dim * lay.act_bytes
    cur = s.mm(st)
    dec = s.new(st)
    new = s.new(st)
    s.drop(dec, cache[2 * layer], cur)
    cache[2 * layer] = new


def _residual(s: _Stream, lay: Layout, rows: int, x: int, branch: int, *, keep: bool = False) -> int:
    """``x + branch`` (after the branch's post norm or scale); the branch dies unless ``keep``, ``x`` is the caller's."""
    ab = lay.act_bytes
    if lay.post_norm:
        pn = _norm(s, lay, rows, lay.hidden)
        s.drop(branch)
        branch = pn
    if lay.residual_scale:
        scaled = s.new(rows * lay.hidden * ab)
        r = s.new(rows * lay.hidden * ab)
        s.drop(scaled, branch)
        return r
    r = s.new(rows * lay.hidden * ab)
    if not keep:
        s.drop(branch)
    return r


def _logits(s: _Stream, lay: Layout, batch: int, rows: int, x: int, prev: int, *forward: int) -> int:
    """The final norm over ``rows`` tokens and the last token's logits, kept by ``generate`` in float32.

    ``forward``: what the model's forward holds until it returns (the embedding output, the rotary tables, masks).
    """
    n = _norm(s, lay, rows, lay.hidden)
    s.drop(x, *forward)
    lg = s.mm(batch * lay.vocab * lay.act_bytes)
    s.drop(n)
    f32 = s.new(batch * lay.vocab * 4)
    s.drop(lg, prev)
    return f32


def _cached_after(past: int, grow: int, window: int) -> int:
    """Tokens a layer's cache storage holds after a step that adds ``grow`` to ``past`` tokens.

    A sliding layer (DynamicSlidingWindowLayer) concatenates its visible ``window - 1`` tokens with the new ones and
    keeps a view of the last ``window - 1``: the storage is at most ``window`` tokens once decoding started.
    """
    if window > 0:
        return min(past + grow - 1, window - 1) + 1
    return past + grow


def _grow_cache(s: _Stream, lay: Layout, batch: int, cache: list[int], layer: int, tokens: int) -> None:
    """``torch.cat([keys, new])``: the grown keys, then values, are born before the old ones die."""
    for c, width in zip((2 * layer, 2 * layer + 1), _mla_cache_widths(lay), strict=True):
        grown = s.keep(batch * tokens * width * lay.kv_bytes)
        s.drop(cache[c])
        cache[c] = grown


def _small_decode_layer(lay: Layout, batch: int) -> bool:
    """Whether a decode step's layer allocates nothing but its cache in the large pool (> 1 MiB): no MLA expansion,
    no eager or math scores over the cache, no lightning state, and a working set of batch rows under 1 MiB."""
    widest = max(lay.hidden, lay.intermediate, lay.heads * lay.head_dim) * 4
    return not (lay.mla or lay.lightning_block or lay.attention in ("math", "eager")) and batch * widest <= SMALL_SIZE


def _decode_working_set(s: _Stream, lay: Layout, batch: int) -> None:
    """A decode step's projections and MLP over ``batch`` rows, born and dead in the layer. Under 1 MiB they live in
    the small pool's own segments and are not replayed; at a large batch they are large blocks among the caches."""
    ab = lay.act_bytes
    if batch * max(lay.intermediate, lay.hidden, lay.heads * lay.head_dim) * ab <= SMALL_SIZE:
        return
    q = s.new(batch * lay.heads * lay.head_dim * ab)
    out = s.new(batch * lay.heads * lay.v_head_dim * ab)
    s.drop(q)
    o = s.new(batch * lay.hidden * ab)
    s.drop(out)
    if not lay.moe_experts:
        s.drop(_gated(s, lay, batch, lay.intermediate))
    s.drop(o)


def _decode_step(s: _Stream, lay: Layout, batch: int, past: int, grow: int, cache: list[int], prev: int) -> int:
    """One decode step over ``past`` cached tokens, growing each cache by ``grow``: the step's float32 logits."""
    ab = lay.act_bytes
    h = lay.hidden
    x0 = x = s.new(batch * h * ab)
    plain = s.quiet and _small_decode_layer(lay, batch)
    for i, window in enumerate(lay.layer_windows):
        if plain and window >= 0 and not _moe_layer(lay, i).moe_experts:  # only the caches reach the large pool
            _grow_cache(s, lay, batch, cache, i, _cached_after(past, grow, window))
            continue
        n = _norm(s, lay, batch, h)
        if window >= 0:
            _grow_cache(s, lay, batch, cache, i, _cached_after(past, grow, window))
            _decode_working_set(s, lay, batch)
        elif lay.lightning_block:
            _lightning_decode(s, lay, batch, cache, i)
        if lay.mla:
            _mla_decode(s, lay, batch, past + grow)
        if lay.attention in ("math", "eager") and window >= 0:
            _attention(s, lay, batch, 1, past + grow, window)
        if _moe_layer(lay, i).moe_experts:
            _moe_decode(s, lay, batch)
        r = s.new(batch * h * ab)
        s.drop(n, -1 if x == x0 else x)
        x = r
        _eager_layer_end(s)
    return _logits(s, lay, batch, batch, x, prev, x0, *_eager_forward_end(s))


def _decode_steps(new_tokens: int, shortcut: bool) -> list[tuple[int, int, bool]]:
    """(cached tokens before, tokens added, quiet) of each replayed decode step.

    Every step, by default. ``shortcut``: the first step, one step growing every cache to one token short of its
    end, and the last, all in full: 10-100x faster for long generations, and as good for the peak allocated, but it
    misses how the grown blocks pile up (up to 12% under what a 900-token generation needs); the searches use it to
    bracket their answer and check that with every step (vram.fit).
    """
    steps = max(0, new_tokens - 1)
    if shortcut and steps > 3:
        return [(0, 1, False), (1, steps - 2, False), (steps - 1, 1, False)]
    return [(i, 1, FULL_DECODE_STEPS <= i < steps - FULL_DECODE_STEPS) for i in range(steps)]


def replay(lay: Layout, weight_sizes: list[int], *, batch: int, prompt: int, new_tokens: int, capacity: int | None = None,
           shortcut: bool = False) -> Peaks:
    """Peak allocated and reserved of ``generate(batch, prompt, new_tokens)``, weights loaded first."""
    s = _Stream(capacity)
    for w in weight_sizes:
        s.new(w)
    ids = s.new(batch * prompt * 8)
    mask_ids = s.new(batch * prompt * 8)
    del ids, mask_ids
    s.alloc.reset_peak()
    ab = lay.act_bytes
    rows = batch * prompt
    x0 = s.new(rows * lay.hidden * ab)
    held: list[int] = []  # what the forward's locals hold until it returns besides x0
    if lay.embed_scale:
        scaled = s.new(rows * lay.hidden * ab)
        s.drop(x0)
        x0 = scaled
    if lay.learned_positions:  # GPT-2: inputs_embeds + position_embeds, both kept; their sum is the first hidden state
        held = [x0, s.new(rows * lay.hidden * ab)]
        x0 = -2
        x = s.new(rows * lay.hidden * ab)
    else:
        x = _norm(s, lay, rows, lay.hidden) if lay.embed_norm else x0  # BLOOM's word_embeddings_layernorm
    masks = _masks(s, lay, batch, prompt)  # the forward builds its masks before the rotary tables
    tables: list[int] = []
    for _ in range(lay.rope_tables if lay.rope_dim else 0):  # cos and sin: float32, scaled, cast to the model's dtype
        f = s.new(rows * lay.rope_dim // 2 * 4)
        emb = s.new(rows * lay.rope_dim * 4)
        c = s.new(rows * lay.rope_dim * 4)
        c2 = s.new(rows * lay.rope_dim * 4)
        s.drop(c)
        sn = s.new(rows * lay.rope_dim * 4)
        s2 = s.new(rows * lay.rope_dim * 4)
        s.drop(sn)
        if lay.rope_fp32:  # OLMo keeps the float32 tables
            tables += [c2, s2]
            s.drop(f, emb)
            continue
        tables += [s.new(rows * lay.rope_dim * ab), s.new(rows * lay.rope_dim * ab)]
        s.drop(f, emb, c2, s2)
    cache: list[int] = []
    for i, window in enumerate(lay.layer_windows):
        out = _layer_prefill(s, _layer_code(lay, i), batch, prompt, x, window, cache)
        _eager_layer_end(s)
        if x != x0:
            s.drop(x)
        x = out
    logits = _logits(s, lay, batch, rows, x, -1, max(x0, -1), *held, *tables, *masks, *_eager_forward_end(s))
    # every decode step: each grows every cache by one token, and where the grown blocks land depends on every step
    # before (a three-step shortcut was 12% short of what a 900-token generation needs)
    for done, grow, quiet in _decode_steps(new_tokens, shortcut):
        s.quiet = quiet
        logits = _decode_step(s, lay, batch, prompt + done, grow, cache, logits)
    return Peaks(allocated=s.alloc.peak_allocated, reserved=s.alloc.peak_reserved, in_use=s.alloc.peak_in_use)


@functools.lru_cache(maxsize=512)
def _replay_cached(lay: Layout, weight_sizes: tuple[int, ...], batch: int, prompt: int, new_tokens: int, shortcut: bool) -> Peaks:
    return replay(lay, list(weight_sizes), batch=batch, prompt=prompt, new_tokens=new_tokens, shortcut=shortcut)


def peaks(lay: Layout, weight_sizes: tuple[int, ...], *, batch: int, prompt: int, new_tokens: int, shortcut: bool = False) -> Peaks:
    """``replay``, remembered: a plan asks the same question for every GPU of the same count (the stream does not
    depend on the GPU), and a context search revisits its midpoints."""
    return _replay_cached(lay, weight_sizes, batch, prompt, new_tokens, shortcut)
