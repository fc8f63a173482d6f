"""The pure estimator held to the trace on every machine: recorded traces of the architecture matrix, no torch needed.

tests/data/vram_trace_matrix.json holds, for the 26 architectures of tests/vram_fixtures.ARCHITECTURES at
reduced depth (7 more model types on small synthetic configs, 9 long generations), the config and header
transformers saves and the trace's peak allocated, reserved and in use at batch 1 and 8, short and long prompts
(``tests/record_trace_matrix.py`` records it where the [trace] extra is installed). The estimator's stream must
reproduce them: this is where a change to vram_stream or vram_models that breaks a family shows, in CI, without
torch. The goal of the issue (never more than 3% under, at most 10% over, median within 3%) is the floor; the
stream's peak reserved is within 1% everywhere, and that is what is pinned.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from airpack.vram import CUDA_CONTEXT_BYTES, LIBRARY_BYTES, RunConfig, collect_weights, estimate, model_shape, tensor_infos_from_header

DATA = Path(__file__).resolve().parent / "data" / "vram_trace_matrix.json"
RECORDED: dict[str, Any] = json.loads(DATA.read_text())
ALL = {**RECORDED["architectures"], **RECORDED["other_types"], **{f"{n} (long)": a for n, a in RECORDED["long_generations"].items()}}
POINTS = [(name, i) for name, a in ALL.items() for i in range(len(a["runs"]))]


def _errors(name: str, i: int) -> tuple[float, float]:
    """(what must fit, what a roomy GPU shows): the estimate against the trace's peak in use and peak reserved."""
    arch = ALL[name]
    run = arch["runs"][i]
    shape = model_shape(arch["config"])
    weights = collect_weights(tensor_infos_from_header(arch["header"]), shape=shape)
    est = estimate(shape, weights, RunConfig(runtime="transformers", context=run["prompt"] + run["new_tokens"],
                                             batch=run["batch"], new_tokens=run["new_tokens"]))
    outside = CUDA_CONTEXT_BYTES + LIBRARY_BYTES
    assert est.peak_reserved_bytes is not None
    return (float((est.per_gpu_bytes - outside) / run["peak_in_use"] - 1),
            float((est.peak_reserved_bytes - outside) / run["peak_reserved"] - 1))


def test_the_recording_covers_the_matrix() -> None:
    archs = RECORDED["architectures"]
    assert len(archs) >= 20 and len({a["family"] for a in archs.values()}) >= 8
    assert all(len(a["runs"]) == 4 for a in archs.values())
    assert {r["batch"] for a in archs.values() for r in a["runs"]} == {1, 8}


@pytest.mark.parametrize(("name", "i"), POINTS, ids=[f"{n}-{i}" for n, i in POINTS])
def test_estimate_within_one_percent_of_the_trace(name: str, i: int) -> None:
    run = ALL[name]["runs"][i]
    need, reserved = _errors(name, i)
    where = f"{name} batch {run['batch']} prompt {run['prompt']}"
    assert -0.01 <= reserved <= 0.01, f"{where}: {reserved:+.2%} against the trace's peak reserved"
    # what must fit hangs on where small blocks land (one left in a big idle segment keeps it in use): the issue's
    # bound, never more than 3% under; it is within 1% on all but two points (Command R7B at batch 8 x 4k, -2.9%;
    # GPT-J at batch 8 x 1k, -1.5%)
    assert -0.03 <= need <= 0.01, f"{where}: {need:+.2%} against the trace's peak in use"


def test_the_median_point_is_exact() -> None:
    """Each point is held to -3% ... +1% above; over the whole set the typical point must be exact, not just inside the
    bound (a mechanism written slightly wrong for one family shows here before it crosses a point's bound)."""
    errs = [_errors(n, i) for n, i in POINTS]
    assert statistics.median(abs(need) for need, _ in errs) <= 0.005
    assert statistics.median(abs(res) for _, res in errs) <= 0.005


def test_header_order_does_not_matter() -> None:
    """A safetensors header lists tensors by dtype and name (``layers.10`` before ``layers.2``); the estimator loads
    them in the order PyTorch moves them, whatever order the header gives."""
    arch = ALL["bloom-560m"]
    run = arch["runs"][1]
    shape = model_shape(arch["config"])
    rc = RunConfig(runtime="transformers", context=run["prompt"] + run["new_tokens"], batch=run["batch"], new_tokens=run["new_tokens"])
    items = sorted(arch["header"].items())
    figures = {estimate(shape, collect_weights(tensor_infos_from_header(dict(order)), shape=shape), rc).per_gpu_bytes
               for order in (items, items[::-1], items[1::2] + items[::2])}
    assert len(figures) == 1
