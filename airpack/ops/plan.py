"""``airpack fit MODEL --plan``: which GPUs, how many, and what they hold, for a purchase decision.

For each GPU type of the catalog asked for, the plan finds the smallest
tensor-parallel count (1, 2, 4, 8) whose estimate fits at the requested context
and batch, then reports what that option holds: the longest context, the most
concurrent sequences at the context, the memory left per GPU, and the decode
rate one sequence can reach at most. That rate is an **upper bound** from
memory bandwidth alone (every decode step reads the resident weights of the
active path and the sequence's KV cache once: bytes ÷ the datasheet bandwidth);
real kernels reach a fraction of it, so it is labelled as a bound, never a
promise. A price file (the user's own figures, per GPU-hour or per card) adds
what each option costs.

Every figure comes from the same estimator as ``airpack fit`` (``vram.fit``);
nothing here measures.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import GpuSpecError, PriceFileError
from ..gpus import CATALOG, CatalogGpu, lookup, parse_gpu
from ..vram import (
    FitResult,
    ModelShape,
    RunConfig,
    Weights,
    dtype_bytes,
    estimate,
    fit,
    kv_sequence_bytes,
    largest_fitting,
    weights_per_gpu,
)
from .fit import ModelSource, load_models, model_of, run_config

COUNTS = (1, 2, 4, 8)
DEFAULT_GPUS = ("H100-80GB", "H200", "B200", "A100-80GB", "A100-40GB", "L40S", "RTX-4090", "L4")
MAX_BATCH = 4096
MAX_PRICE_BYTES = 1 << 20


@dataclass(frozen=True)
class Price:
    """The user's own figures for one GPU type; either may be absent."""

    hour: float | None = None  # per GPU-hour
    card: float | None = None  # per card bought


@dataclass(frozen=True)
class Prices:
    currency: str = ""
    by_gpu: dict[str, Price] = field(default_factory=dict)  # catalog key -> price


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    model: str
    gpus: tuple[str, ...] = DEFAULT_GPUS
    context: int | None = None
    batch: int = 1
    new_tokens: int = 256
    runtime: str = "vllm"
    kv_dtype: str = "auto"
    gpu_memory_utilization: str = "0.9"
    registry: Path | None = None
    prices: Prices | None = None


@dataclass(frozen=True)
class PlanOption:
    """The smallest count of one GPU type that fits, or why none of 1, 2, 4, 8 does."""

    gpu: CatalogGpu
    count: int  # 0: no count fits
    result: FitResult | None  # at ``count`` (at the largest count tried when none fits)
    max_concurrency: int = 0
    decode_upper_bound: float = 0.0  # tokens per second per sequence, from bandwidth alone
    bytes_per_token: int = 0  # what one decode step reads per GPU for one sequence
    cost_per_hour: float | None = None
    cost_cards: float | None = None
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        r = self.result
        out: dict[str, Any] = {
            "gpu": self.gpu.key, "name": self.gpu.name, "fits": self.count > 0, "count": self.count or None,
            "memory_per_gpu_bytes": self.gpu.memory_bytes, "bandwidth_gbps": self.gpu.bandwidth_gbps,
            "bandwidth_source": self.gpu.bandwidth_source, "notes": list(self.notes),
        }
        if r is not None:
            out.update({"verdict": r.verdict, "per_gpu_bytes": r.per_gpu_bytes, "limit_bytes": r.limit_bytes,
                        "memory_left_bytes": r.headroom_bytes, "max_context": r.max_context})
        if self.count:
            out.update({"max_concurrency": self.max_concurrency, "decode_bytes_per_token": self.bytes_per_token,
                        "decode_tokens_per_s_upper_bound": round(self.decode_upper_bound, 1)})
        if self.cost_per_hour is not None:
            out["cost_per_hour"] = round(self.cost_per_hour, 2)
        if self.cost_cards is not None:
            out["cost_cards"] = round(self.cost_cards, 2)
        return out


@dataclass(frozen=True)
class Plan:
    model: str
    location: str
    shape: ModelShape
    weights: Weights
    runtime: str
    context: int
    batch: int
    options: tuple[PlanOption, ...]
    currency: str = ""

    @property
    def any_fits(self) -> bool:
        return any(o.count for o in self.options)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "location": self.location, "architecture": self.shape.describe(),
                "runtime": self.runtime, "context": self.context, "batch": self.batch,
                "weights_total_bytes": self.weights.total_bytes, "parameters": self.weights.parameters,
                "currency": self.currency or None, "options": [o.to_json() for o in self.options],
                "decode_rate_is": "an upper bound from memory bandwidth (bytes read per token / datasheet bandwidth), not a promise"}


# -- the price file ---------------------------------------------------------------------------------------


def _price_number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise PriceFileError(f"{where} must be a positive number, not {v!r}", path=where)
    return float(v)


def parse_prices(data: bytes, display: str) -> Prices:
    """The price file, strictly: ``currency`` and a ``[prices]`` table of catalog GPUs with ``hour`` and/or ``card``."""
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PriceFileError(f"{display} is not valid TOML: {e}", path=display) from None
    unknown = sorted(set(doc) - {"currency", "prices"})
    if unknown:
        raise PriceFileError(f"{display}: unknown key {unknown[0]!r} (only currency and [prices])", path=display)
    currency = doc.get("currency", "")
    if not isinstance(currency, str) or len(currency) > 16:
        raise PriceFileError(f"{display}: currency must be a short string such as \"USD\"", path=display)
    table = doc.get("prices")
    if not isinstance(table, dict) or not table:
        raise PriceFileError(f"{display} has no [prices] table", path=display)
    out: dict[str, Price] = {}
    for name, entry in table.items():
        try:
            gpu = lookup(name)
        except GpuSpecError as e:
            raise PriceFileError(f"{display}: {e.message}", path=display) from None
        if gpu.key in out:
            raise PriceFileError(f"{display}: {name!r} prices {gpu.key} a second time", path=display)
        if not isinstance(entry, dict) or not entry:
            raise PriceFileError(f"{display}: prices.{name} must be a table with hour and/or card", path=display)
        bad = sorted(set(entry) - {"hour", "card"})
        if bad:
            raise PriceFileError(f"{display}: prices.{name} has unknown key {bad[0]!r} (hour, card)", path=display)
        out[gpu.key] = Price(hour=_price_number(entry["hour"], f"prices.{name}.hour") if "hour" in entry else None,
                             card=_price_number(entry["card"], f"prices.{name}.card") if "card" in entry else None)
    return Prices(currency=currency, by_gpu=out)


def load_prices(path: Path) -> Prices:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PRICE_BYTES + 1)
    except OSError as e:
        raise PriceFileError(f"cannot read price file {path}: {e.strerror}", path=str(path)) from None
    if len(data) > MAX_PRICE_BYTES:
        raise PriceFileError(f"price file {path} is larger than {MAX_PRICE_BYTES} bytes", path=str(path))
    return parse_prices(data, str(path))


def parse_gpu_list(text: str) -> tuple[str, ...]:
    """``--gpus H100,L40S,...``: catalog GPUs only (the plan needs their bandwidth); unknown or ambiguous: exit 2."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise GpuSpecError("--gpus names no GPU; give a list such as H100,H200,L40S")
    keys: list[str] = []
    for n in names:
        if ":" in n:
            raise GpuSpecError(f"--gpus takes GPU types, not counts ({n!r}): the plan finds the count")
        g = lookup(n)
        if g.key not in keys:
            keys.append(g.key)
    return tuple(keys)


# -- planning ------------------------------------------------------------------------------------------------


def _active_weight_bytes(shape: ModelShape, weights: Weights, tp: int) -> int:
    """Bytes one decode step reads on the busiest GPU: every weight, but only the top-k share of routed experts."""
    sizes = weights_per_gpu(weights, shape, tp)
    if shape.moe is None:
        return sum(sizes)
    moe = shape.moe
    total = 0
    for t, n in zip(weights.tensors, sizes, strict=True):
        routed = ".experts." in t.name or t.name.endswith((".experts.gate_up_proj", ".experts.down_proj"))
        total += n * moe.top_k // moe.num_experts if routed and "shared" not in t.name else n
    return total


def _max_batch(shape: ModelShape, weights: Weights, run: RunConfig, limit: int) -> int:
    """transformers: the most sequences of the context that fit at once within ``limit`` per GPU."""
    return largest_fitting(MAX_BATCH, lambda b, short: estimate(shape, weights, replace(run, batch=b), shortcut=short).per_gpu_bytes,
                           limit)


def plan_gpu(shape: ModelShape, weights: Weights, run: RunConfig, gpu: CatalogGpu, prices: Prices | None) -> PlanOption:
    """The smallest count of ``gpu`` that fits, and what it holds."""
    notes: list[str] = []
    last: FitResult | None = None
    for n in COUNTS:
        if run.runtime == "vllm" and shape.num_heads % n:
            notes.append(f"{n} GPUs skipped: vLLM needs the count to divide the {shape.num_heads} attention heads")
            continue
        budget = parse_gpu(gpu.key, count=n)
        r = fit(shape, weights, replace(run, tensor_parallel=n), budget)
        last = r
        if r.verdict == "does_not_fit":
            continue
        nrun = replace(run, tensor_parallel=n)
        seqs = r.max_concurrency if run.runtime == "vllm" else _max_batch(shape, weights, nrun, r.limit_bytes)
        kv_one = kv_sequence_bytes(shape, r.estimate.context, runtime=run.runtime, tp=n, kv_bytes=dtype_bytes(r.estimate.kv_dtype))
        per_token = _active_weight_bytes(shape, weights, n) + kv_one
        rate = gpu.bandwidth_gbps * 1e9 / per_token if per_token and gpu.bandwidth_gbps else 0.0
        price = prices.by_gpu.get(gpu.key) if prices is not None else None
        return PlanOption(gpu=gpu, count=n, result=r, max_concurrency=seqs, decode_upper_bound=rate, bytes_per_token=per_token,
                          cost_per_hour=price.hour * n if price is not None and price.hour is not None else None,
                          cost_cards=price.card * n if price is not None and price.card is not None else None,
                          notes=tuple(notes + list(r.notes)))
    notes.append(f"does not fit on {COUNTS[-1]} or fewer")
    return PlanOption(gpu=gpu, count=0, result=last, notes=tuple(notes))


def plan_source(src: ModelSource, opts: PlanOptions, gpus: tuple[CatalogGpu, ...]) -> Plan:
    shape, weights = model_of(src, opts.context)
    run = run_config(runtime=opts.runtime, context=opts.context, batch=opts.batch, new_tokens=opts.new_tokens,
                     kv_dtype=opts.kv_dtype, gpu_memory_utilization=opts.gpu_memory_utilization)
    options = tuple(plan_gpu(shape, weights, run, g, opts.prices) for g in gpus)
    return Plan(model=src.name, location=src.location, shape=shape, weights=weights, runtime=run.runtime,
                context=opts.context or shape.max_context, batch=opts.batch, options=options,
                currency=opts.prices.currency if opts.prices is not None else "")


def plan_model(opts: PlanOptions, sources: list[ModelSource] | None = None) -> list[Plan]:
    """``airpack fit MODEL --plan``: one plan per model (a bundle may carry several); ``sources`` already read (from the Hub)."""
    by_key = {g.key: g for g in CATALOG}
    for key in opts.gpus:
        if key not in by_key:
            raise GpuSpecError(f"unknown GPU {key!r} in --gpus")
    gpus = tuple(by_key[k] for k in opts.gpus)
    return [plan_source(src, opts, gpus) for src in (load_models(opts.model, opts.registry) if sources is None else sources)]
