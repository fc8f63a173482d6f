"""An exact memory trace of transformers' ``generate()`` where PyTorch is installed, with no GPU.

The pure estimator (``vram``) models each term; this module measures them the
way the GPU would see them. It builds the model from config.json on the meta
device (no weights, no memory), then runs transformers' own ``generate()`` at
the requested batch, prompt and new tokens under a ``TorchDispatchMode`` that:

* runs every large tensor op on the meta device (shapes and dtypes only);
* computes small integer and boolean tensors (token ids, positions, cache
  indices, masks of a few million elements) for real on the CPU, so the
  control flow of ``generate`` and of the mask builders is the real one;
  integer results of meta computations (the next token, the router's choice)
  are filled with plausible values: zeros, and balanced experts for ``topk``;
* replaces ``scaled_dot_product_attention`` with the choice CUDA makes (flash,
  then memory-efficient, then math, each with its conditions) and calls that
  backend's own ATen op, so its buffers (the flash log-sum-exp, the additive
  mask the efficient kernel needs, the math kernel's float32 scores) appear;
* records every storage's birth and death (weak references on the storages),
  and replays them through ``vram_alloc.CachingAllocator``.

The weights are allocated first in the order ``Module.to("cuda")`` moves them
(children before their parent's own parameters, then buffers), the cuBLAS
workspace at the first matrix multiply, and the peak is reset before
``generate`` as the calibration did. The answer is peak allocated and peak
reserved for the transformers version installed here.

torch and transformers are optional (``pip install 'airpack[trace]'``); they are
imported when a trace runs, and their absence is a ``TraceUnavailableError``
(exit 2) saying what to install.
"""

from __future__ import annotations

import importlib
import logging
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelConfigError, TraceUnavailableError
from .vram import config_dtype
from .vram_alloc import CUBLAS_WORKSPACE_BYTES, CachingAllocator

MiB = 1 << 20

#: Tensors of at most this many elements are computed for real when their inputs are real.
REAL_LIMIT = 1 << 22
#: What the trace needs (the [trace] extra in setup.cfg pins the same ranges).
TRACE_REQUIREMENT = "torch>=2.5 and transformers>=5,<6"
INSTALL_HINT = "pip install 'airpack[trace]' (CPU PyTorch is enough: torch>=2.5, transformers>=5,<6); or fit without --trace."

_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_mm", "_grouped_mm", "addbmm"}


@dataclass(frozen=True)
class SdpaCall:
    """One ``scaled_dot_product_attention`` call as CUDA would run it."""

    backend: str  # "flash", "efficient" or "math"
    query: tuple[int, ...]
    key: tuple[int, ...]
    masked: bool
    reason: str  # why not flash, when it is not


@dataclass(frozen=True)
class TraceResult:
    """What the trace measured, in bytes (the allocator's view, as ``torch.cuda`` would report it)."""

    model_type: str
    batch: int
    prompt: int
    new_tokens: int
    dtype: str
    weights_allocated: int  # memory_allocated() once the model is on the GPU
    weights_reserved: int
    peak_allocated: int  # max_memory_allocated() during generate
    peak_reserved: int  # max_memory_reserved() during generate
    peak_in_use: int = 0  # the most reserved at once in segments holding a live block: what must fit (vram_alloc)
    backends: dict[str, int] = field(default_factory=dict)  # SDPA calls per backend
    fallback_reasons: tuple[str, ...] = ()
    attn_implementation: str = ""
    torch_version: str = ""
    transformers_version: str = ""
    ops: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type, "batch": self.batch, "prompt": self.prompt, "new_tokens": self.new_tokens,
            "dtype": self.dtype, "weights_allocated": self.weights_allocated, "weights_reserved": self.weights_reserved,
            "peak_allocated": self.peak_allocated, "peak_reserved": self.peak_reserved, "peak_in_use": self.peak_in_use,
            "sdpa_backends": dict(self.backends),
            "sdpa_fallback_reasons": list(self.fallback_reasons), "attn_implementation": self.attn_implementation,
            "torch": self.torch_version, "transformers": self.transformers_version, "ops": self.ops,
        }


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise TraceUnavailableError(f"--trace needs {TRACE_REQUIREMENT}; {name} is not importable here ({e})",
                                    hint=INSTALL_HINT) from None


def available() -> bool:
    """True when torch and transformers import (the trace can run)."""
    try:
        _import("torch")
        _import("transformers")
    except TraceUnavailableError:
        return False
    return True


# -- SDPA as CUDA runs it -------------------------------------------------------------------------------


def _flash_refusal(torch: Any, q: Any, k: Any, v: Any, mask: Any, is_causal: bool, enable_gqa: bool) -> str:
    """Why the flash kernel would not take this call ("" when it would): sdp_utils.cpp, use_flash_attention."""
    if mask is not None:
        return "explicit attention mask"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {str(q.dtype).removeprefix('torch.')}"
    if not q.shape[-1] == k.shape[-1] == v.shape[-1] or q.shape[-1] > 256:
        return f"head dim {q.shape[-1]}/{v.shape[-1]} (flash needs equal dims up to 256)"
    if is_causal and q.shape[-2] != k.shape[-2]:
        return "causal with different query and key lengths"
    return _heads_refusal(q, k, v, enable_gqa, gqa_ok=True)


def _heads_refusal(q: Any, k: Any, v: Any, enable_gqa: bool, *, gqa_ok: bool) -> str:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "not 4-D"
    if q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0]:
        return "batch sizes differ"
    hq, hk = q.shape[1], k.shape[1]
    if hq == hk == v.shape[1]:
        return ""
    if enable_gqa and gqa_ok and hq % hk == 0 and hk == v.shape[1]:
        return ""
    return "grouped heads" if enable_gqa else "head counts differ"


def _efficient_refusal(torch: Any, q: Any, k: Any, v: Any, enable_gqa: bool) -> str:
    """Why the memory-efficient kernel would not take it: sdp_utils.cpp, use_mem_efficient_attention."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    align = 4 if q.dtype == torch.float32 else 8
    if q.shape[-1] != k.shape[-1] or q.shape[-1] % align or v.shape[-1] % align:
        return f"head dim {q.shape[-1]}/{v.shape[-1]} not a multiple of {align}"
    return _heads_refusal(q, k, v, enable_gqa, gqa_ok=False)


def choose_backend(torch: Any, q: Any, k: Any, v: Any, mask: Any, is_causal: bool, enable_gqa: bool) -> tuple[str, str]:
    """(backend, why not flash): flash, else memory-efficient, else math, as on an sm80+ GPU."""
    why = _flash_refusal(torch, q, k, v, mask, is_causal, enable_gqa)
    if not why:
        return "flash", ""
    if not _efficient_refusal(torch, q, k, v, enable_gqa):
        return "efficient", why
    return "math", why


def _make_sdpa(torch: Any, calls: list[SdpaCall]) -> Callable[..., Any]:
    """A stand-in for ``F.scaled_dot_product_attention`` that runs CUDA's choice through its ATen op."""
    aten = torch.ops.aten
    F = torch.nn.functional

    def sdpa(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False,
             scale: float | None = None, enable_gqa: bool = False) -> Any:
        backend, why = choose_backend(torch, query, key, value, attn_mask, is_causal, enable_gqa)
        calls.append(SdpaCall(backend=backend, query=tuple(query.shape), key=tuple(key.shape), masked=attn_mask is not None,
                              reason=why))
        mask = attn_mask
        if mask is not None and mask.dtype == torch.bool:
            # convert_boolean_attn_mask: an additive mask in the query's dtype, of the mask's shape.
            zero = torch.zeros((), dtype=query.dtype, device=query.device)
            mask = torch.where(mask.logical_not(), torch.full((), -math.inf, dtype=query.dtype, device=query.device), zero)
        og_scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        if backend == "flash":
            d = query.shape[-1]
            pad = (-d) % 8
            q, k, v = (F.pad(t, (0, pad)) if pad else t for t in (query, key, value))
            out = aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=og_scale)[0]
            return out[..., :d] if pad else out
        if backend == "efficient":
            if mask is not None:
                s = mask.shape[-1]
                if s % 16:  # pad_bias: the kernel wants the bias's last dim aligned to 16
                    mask = F.pad(mask, (0, 16 - s % 16))[..., :s]
                shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
                mask = mask.expand(shape)
            return aten._scaled_dot_product_efficient_attention(query, key, value, mask, False, dropout_p, is_causal,
                                                                scale=scale)[0]
        return aten._scaled_dot_product_attention_math(query, key, value, mask, dropout_p, is_causal, None, scale=scale,
                                                       enable_gqa=enable_gqa)[0]

    return sdpa


# -- the dispatch mode ------------------------------------------------------------------------------------


class _Recorder:
    """Storage births and deaths, replayed into the allocator model as they happen."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.alloc = CachingAllocator()
        self.live: dict[int, tuple[int, int]] = {}  # storage key -> (allocator handle, nbytes)
        self.permanent: set[int] = set()
        self.closed = False
        self.workspace = False
        self.ops = 0

    def adopt(self, t: Any, *, allocate: bool) -> None:
        """A tensor that exists before the trace (weights, inputs): allocate it once, never free it."""
        st = t.untyped_storage()
        key = st._cdata
        if key in self.permanent or key in self.live:
            return
        self.permanent.add(key)
        if allocate and st.nbytes() > 0:
            self.alloc.malloc(st.nbytes())

    def record(self, out: Any) -> None:
        for t in _tensors(self.torch, out):
            st = t.untyped_storage()
            key = st._cdata
            n = st.nbytes()
            if key in self.permanent:
                continue
            entry = self.live.get(key)
            if entry is not None:
                if entry[1] != n:  # resized in place: a new block, then the old one goes
                    handle = self.alloc.malloc(n) if n else -1
                    if entry[0] >= 0:
                        self.alloc.free(entry[0])
                    self.live[key] = (handle, n)
                continue
            handle = self.alloc.malloc(n) if n else -1
            self.live[key] = (handle, n)
            weakref.finalize(st, self._died_handle, key)

    def _died_handle(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None and not self.closed and entry[0] >= 0:
            self.alloc.free(entry[0])

    def gemm(self) -> None:
        if not self.workspace:
            self.workspace = True
            self.alloc.malloc(CUBLAS_WORKSPACE_BYTES)


def _tensors(torch: Any, obj: Any) -> Iterator[Any]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(torch, o)


class _Runner:
    """How one ATen call runs: meta for big tensors, real for small integer ones (see the module's docstring)."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.pytree = importlib.import_module("torch.utils._pytree")
        self.meta = torch.device("meta")
        self.cpu = torch.device("cpu")

    def to_meta(self, x: Any) -> Any:
        if isinstance(x, self.torch.Tensor):
            return x if x.is_meta else x.to(self.meta)
        return self.meta if isinstance(x, self.torch.device) else x

    def to_real(self, x: Any) -> Any:
        if isinstance(x, self.torch.Tensor) and x.is_meta:
            if x.numel() > REAL_LIMIT:
                raise _NeedsData(f"a tensor of {x.numel()} elements would have to be computed for real")
            return self.torch.zeros(x.shape, dtype=x.dtype, device=self.cpu)
        if isinstance(x, self.torch.device) and x.type == "meta":
            return self.cpu
        return x

    def plausible(self, func: Any, i: int, t: Any, meta_inputs: list[Any]) -> Any:
        """Real values for a small integer result of a meta computation: zeros; ``topk`` picks experts in turn."""
        if t.numel() > REAL_LIMIT or t.dtype.is_floating_point or t.dtype.is_complex:
            return t
        torch = self.torch
        if func.__name__.startswith("topk") and i == 1 and t.dim() >= 1 and meta_inputs:
            experts = meta_inputs[0].shape[-1]
            k = t.shape[-1]
            rows = max(1, t.numel() // max(k, 1))
            return (torch.arange(rows * k, dtype=torch.int64) % experts).reshape(t.shape).to(t.dtype)
        return torch.zeros(t.shape, dtype=t.dtype, device=self.cpu)

    def call(self, func: Any, args: Any, kwargs: Any) -> Any:
        flat, spec = self.pytree.tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, self.torch.Tensor)]
        any_meta = any(t.is_meta for t in tensors)
        anchors = [i for i, a in enumerate(func._schema.arguments) if a.alias_info is not None]
        if anchors:
            return self._aliasing(func, args, kwargs, flat, spec, anchors, any_meta)
        try:
            a, kw = self.pytree.tree_unflatten([self.to_meta(x) for x in flat], spec)
            probe = func(*a, **kw)
        except (NotImplementedError, RuntimeError) as e:  # data-dependent ops (nonzero, item) have no meta kernel
            if not isinstance(e, NotImplementedError) and "meta" not in str(e).lower():
                raise  # a real error of the model at these sizes (a prompt beyond its positions...)
            return self._from_zeros(func, flat, spec, e)
        if not any_meta and all(t.numel() <= REAL_LIMIT for t in _tensors(self.torch, probe)):
            try:
                a, kw = self.pytree.tree_unflatten([self.to_real(x) for x in flat], spec)
                return func(*a, **kw)
            except (NotImplementedError, RuntimeError):
                pass  # an op with a CUDA kernel only: keep its shapes
        meta_inputs = [t for t in tensors if t.is_meta]
        if isinstance(probe, self.torch.Tensor):
            return self.plausible(func, 0, probe, meta_inputs)
        if isinstance(probe, (tuple, list)):
            fixed = [self.plausible(func, i, t, meta_inputs) if isinstance(t, self.torch.Tensor) else t
                     for i, t in enumerate(probe)]
            return tuple(fixed) if isinstance(probe, tuple) else fixed
        return probe

    def _aliasing(self, func: Any, args: Any, kwargs: Any, flat: list[Any], spec: Any, anchors: list[int],
                  any_meta: bool) -> Any:
        """In-place, out= and view ops: the tensor they write or view decides where the op runs."""
        anchored = [args[i] for i in anchors if i < len(args) and isinstance(args[i], self.torch.Tensor)]
        if anchored and not any(t.is_meta for t in anchored):
            a, kw = self.pytree.tree_unflatten([self.to_real(x) for x in flat], spec)
        elif any_meta:
            a, kw = self.pytree.tree_unflatten([self.to_meta(x) for x in flat], spec)
        else:
            a, kw = args, kwargs
        return func(*a, **kw)

    def _from_zeros(self, func: Any, flat: list[Any], spec: Any, err: BaseException) -> Any:
        try:
            a, kw = self.pytree.tree_unflatten([self.to_real(x) for x in flat], spec)
        except _NeedsData as nd:
            raise _NeedsData(f"{func.__name__} depends on the values of large tensors ({nd}); {err}") from None
        return func(*a, **kw)


def _make_mode(torch: Any, rec: _Recorder) -> Any:
    """The TorchDispatchMode class: every ATen call through ``_Runner``, every storage it returns recorded."""
    from_pd = importlib.import_module("torch.utils._python_dispatch")
    runner = _Runner(torch)

    class Mode(from_pd.TorchDispatchMode):  # type: ignore[misc,name-defined]
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            rec.ops += 1
            if func.__name__.split(".")[0] in _GEMMS:
                rec.gemm()
            out = runner.call(func, args, kwargs or {})
            rec.record(out)
            return out

    return Mode


class _NeedsData(Exception):
    """An op whose result depends on values the trace does not compute."""


# -- building and running ---------------------------------------------------------------------------------


def _build_config(transformers: Any, config: Mapping[str, Any]) -> Any:
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelConfigError("config.json has no model_type; the trace cannot tell which transformers class to build",
                               path="config.json")
    mapping = transformers.models.auto.configuration_auto.CONFIG_MAPPING
    if model_type not in mapping:
        raise ModelConfigError(
            f"transformers {transformers.__version__} does not know model type {model_type!r} (custom code is not run)",
            path="config.json", hint="Upgrade transformers on this host, or fit without --trace.")
    sub = config.get("text_config")
    if isinstance(config.get("quantization_config"), dict) or (
            isinstance(sub, dict) and isinstance(sub.get("quantization_config"), dict)):
        raise ModelConfigError(
            "the trace builds the model's weights unquantized; a quantized checkpoint is estimated, not traced",
            path="config.json", hint="Fit without --trace (the estimator counts the quantized weights as stored).")
    cfg = {k: v for k, v in config.items() if k not in ("auto_map", "transformers_version", "_name_or_path")}
    try:
        return mapping[model_type].from_dict(cfg)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ModelConfigError(f"transformers cannot read this {model_type} config.json: {e}", path="config.json") from None


def _build_model(torch: Any, transformers: Any, cfg: Any, dtype: Any) -> Any:
    auto = transformers.AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = auto.from_config(cfg, dtype=dtype)
    except ValueError:
        sub = getattr(cfg, "text_config", None)
        if sub is None:
            raise ModelConfigError(f"transformers has no causal language model for model type {cfg.model_type!r}",
                                   path="config.json", hint="Fit without --trace.") from None
        with torch.device("meta"):
            model = auto.from_config(sub, dtype=dtype)
    return model.eval()


def _load_order(torch: Any, module: Any) -> Iterator[Any]:
    """Parameters and buffers in the order ``Module._apply`` moves them: children first, then own params, then buffers."""
    for child in module.children():
        yield from _load_order(torch, child)
    for p in module._parameters.values():
        if p is not None:
            yield p
    for b in module._buffers.values():
        if b is not None:
            yield b


@contextmanager
def _patched_sdpa(torch: Any, calls: list[SdpaCall]) -> Iterator[None]:
    F = torch.nn.functional
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _make_sdpa(torch, calls)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextmanager
def _quiet() -> Iterator[None]:
    names = ("transformers", "torch")
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lv in zip(names, levels, strict=True):
            logging.getLogger(n).setLevel(lv)


def trace_generate(config: Mapping[str, Any], *, batch: int, prompt: int, new_tokens: int,
                   num_layers: int | None = None) -> TraceResult:
    """Trace ``model.generate`` of the model config.json describes; ``num_layers`` overrides the depth (tests)."""
    if batch < 1 or prompt < 1 or new_tokens < 0:
        raise ModelConfigError(f"batch {batch}, prompt {prompt} and new tokens {new_tokens} cannot be traced")
    torch, transformers, model, dtype_name = _built(config, num_layers)
    with _quiet():
        return _run_generate(torch, transformers, model, dtype_name, batch=batch, prompt=prompt, new_tokens=new_tokens)


def _built(config: Mapping[str, Any], num_layers: int | None) -> tuple[Any, Any, Any, str]:
    """torch, transformers, the model config.json describes built on the meta device (at ``num_layers``), its dtype."""
    torch = _import("torch")
    transformers = _import("transformers")
    cfg = _build_config(transformers, config)
    if num_layers is not None:
        _set_depth(cfg, num_layers)
    dtype_name = config_dtype(config)
    with _quiet():
        try:
            model = _build_model(torch, transformers, cfg, getattr(torch, dtype_name))
        except ModelConfigError:
            raise
        except (RuntimeError, ValueError, TypeError, KeyError, AttributeError, IndexError, NotImplementedError, ImportError,
                OSError, AssertionError) as e:
            # a class that cannot be built from this config: say so, never a traceback
            raise ModelConfigError(f"transformers could not build {cfg.model_type} from config.json: {type(e).__name__}: {e}",
                                   path="config.json", hint="Fit without --trace.") from None
    return torch, transformers, model, dtype_name


def _set_depth(cfg: Any, n: int) -> None:
    """Reduce a config to ``n`` decoder layers, per-layer lists cut to match (tests use real configs at reduced depth)."""
    for target in (cfg, getattr(cfg, "text_config", None)):
        if target is None:
            continue
        old = getattr(target, "num_hidden_layers", None)
        if not isinstance(old, int):
            continue
        target.num_hidden_layers = n
        for attr in ("layer_types", "layers_block_type", "no_rope_layers", "sliding_window_pattern_list"):
            v = getattr(target, attr, None)
            if isinstance(v, list) and len(v) == old:
                setattr(target, attr, v[:n])
        mlp = getattr(target, "mlp_only_layers", None)
        if isinstance(mlp, list):
            target.mlp_only_layers = [i for i in mlp if i < n]


def _run_generate(torch: Any, transformers: Any, model: Any, dtype_name: str, *, batch: int, prompt: int,
                  new_tokens: int) -> TraceResult:
    rec = _Recorder(torch)
    seen: set[int] = set()
    for t in _load_order(torch, model):
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            rec.adopt(t, allocate=True)
    weights_allocated, weights_reserved = rec.alloc.allocated, rec.alloc.reserved
    ids = torch.ones((batch, prompt), dtype=torch.long)
    mask = torch.ones((batch, prompt), dtype=torch.long)
    for t in (ids, mask):
        rec.adopt(t, allocate=True)
    gen = model.generation_config
    gen.eos_token_id = None
    gen.pad_token_id = 0
    gen.bos_token_id = None
    calls: list[SdpaCall] = []
    rec.alloc.reset_peak()
    mode_cls = _make_mode(torch, rec)
    try:
        with _patched_sdpa(torch, calls), torch.no_grad(), mode_cls():
            result = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False,
                                    num_beams=1, use_cache=True)
            del result
    except _NeedsData as e:
        raise ModelConfigError(f"the trace cannot run {model.config.model_type}: {e}", path="config.json",
                               hint="Fit without --trace.") from None
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError, NotImplementedError, OSError,
            AssertionError) as e:
        raise ModelConfigError(f"the trace of {model.config.model_type} failed in transformers: {type(e).__name__}: "
                               f"{str(e).splitlines()[0][:300] if str(e) else ''}", path="config.json",
                               hint="Fit without --trace (the estimator's figure stands).") from None
    finally:
        rec.closed = True
    backends: dict[str, int] = {}
    for c in calls:
        backends[c.backend] = backends.get(c.backend, 0) + 1
    reasons = tuple(dict.fromkeys(c.reason for c in calls if c.reason))
    return TraceResult(
        model_type=str(model.config.model_type), batch=batch, prompt=prompt, new_tokens=new_tokens, dtype=dtype_name,
        weights_allocated=weights_allocated, weights_reserved=weights_reserved,
        peak_allocated=rec.alloc.peak_allocated, peak_reserved=rec.alloc.peak_reserved, peak_in_use=rec.alloc.peak_in_use,
        backends=backends,
        fallback_reasons=reasons, attn_implementation=str(getattr(model.config, "_attn_implementation", "") or ""),
        torch_version=str(torch.__version__), transformers_version=str(transformers.__version__), ops=rec.ops,
    )


def reduced_model(config: Mapping[str, Any], num_layers: int | None = None) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """(config.json, safetensors header summary) of the model as ``save_pretrained`` would write it, at ``num_layers``.

    The config is transformers' full dict (defaults filled in, per-layer lists cut to the
    depth); the header maps each saved tensor (tied ones once) to ``[dtype, shape]``. The
    architecture matrix feeds both to the pure estimator and compares it with the trace.
    """
    _, _, model, _ = _built(config, num_layers)
    header: dict[str, list[Any]] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        key = t.untyped_storage()._cdata
        if key in seen:
            continue
        seen.add(key)
        header[name] = [str(t.dtype).removeprefix("torch."), list(t.shape)]
    out = model.config.to_dict()
    out.setdefault("model_type", model.config.model_type)
    return out, header
