"""The architecture matrix: the pure estimator against the trace, shared by tests/test_vram_matrix.py and bench_fit."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from airpack.vram import CUDA_CONTEXT_BYTES, LIBRARY_BYTES, RunConfig, collect_weights, estimate, model_shape, tensor_infos_from_header
from airpack.vram_trace import reduced_model, trace_generate

#: (batch, prompt, new tokens) each architecture runs at: short and long prompts, batch 1 and 8.
POINTS = ((1, 512, 8), (1, 4096, 8), (8, 1024, 8), (8, 4096, 8))
#: The subset `make test` runs (a long prompt at batch 1, a shorter one at batch 8): about a minute on one core.
TEST_POINTS = ((1, 4096, 4), (8, 1024, 4))


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    batch: int
    prompt: int
    new_tokens: int
    estimated: int  # the estimator's per-GPU bytes less the CUDA context and libraries: what the allocator must hold
    traced: int  # the trace's peak in use (segments holding a live block): the same, traced
    traced_allocated: int
    notes: tuple[str, ...]
    estimated_reserved: int = 0  # what a roomy GPU would show reserved, estimated and traced
    traced_reserved: int = 0
    estimate_s: float = 0.0  # wall time of the pure estimate
    trace_s: float = 0.0  # wall time of the trace (the baseline bench-fit compares it with)

    @property
    def error(self) -> float:
        """Signed relative error of the estimate against the trace (negative: under)."""
        return self.estimated / self.traced - 1

    @property
    def reserved_error(self) -> float:
        return self.estimated_reserved / self.traced_reserved - 1


def run_case(name: str, arch: dict[str, Any], batch: int, prompt: int, new_tokens: int,
             cache: dict[str, tuple[dict[str, Any], dict[str, list[Any]]]] | None = None) -> Case:
    layers = int(arch["layers"])
    if cache is not None and name in cache:
        cfg, header = cache[name]
    else:
        cfg, header = reduced_model(arch["config"], layers)
        if cache is not None:
            cache[name] = (cfg, header)
    shape = model_shape(cfg)
    if prompt + new_tokens > shape.max_context:  # a model cannot run past its positions (MPT's 2048)
        prompt = shape.max_context - new_tokens
    t0 = time.perf_counter()
    weights = collect_weights(tensor_infos_from_header(header), shape=shape)
    est = estimate(shape, weights, RunConfig(runtime="transformers", context=prompt + new_tokens, batch=batch,
                                             new_tokens=new_tokens))
    t1 = time.perf_counter()
    tr = trace_generate(arch["config"], batch=batch, prompt=prompt, new_tokens=new_tokens, num_layers=layers)
    t2 = time.perf_counter()
    return Case(name=name, family=str(arch["family"]), batch=batch, prompt=prompt, new_tokens=new_tokens,
                estimated=est.per_gpu_bytes - CUDA_CONTEXT_BYTES - LIBRARY_BYTES, traced=tr.peak_in_use,
                estimated_reserved=(est.peak_reserved_bytes or 0) - CUDA_CONTEXT_BYTES - LIBRARY_BYTES,
                traced_reserved=tr.peak_reserved,
                traced_allocated=tr.peak_allocated, notes=shape.notes + est.notes, estimate_s=t1 - t0, trace_s=t2 - t1)
