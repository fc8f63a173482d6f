"""The pure estimator against the trace, over the architecture matrix (tests/vram_fixtures.ARCHITECTURES).

The trace runs transformers' own generate() at reduced depth and replays it through the caching
allocator model; the estimator gets the same config.json and header. The figure compared is what
must fit: the allocator's peak in use (the estimate less the CUDA context and libraries, which live
outside the allocator, against the trace's ``peak_in_use``); the peak reserved is compared too, within
1%. Goals from the issue: never more than 3% under the trace, median within 3%, at most 10%
over. Where a family does not reach them, it is listed below with the reason, and the test checks the
list still describes the gap (so a fix shows up as a failure to update it).
"""

from __future__ import annotations

import statistics

import pytest
from vram_fixtures import ARCHITECTURES
from vram_matrix import TEST_POINTS, Case, run_case

from airpack import vram_trace
from airpack.vram import CUDA_CONTEXT_BYTES, LIBRARY_BYTES, RunConfig, collect_weights, estimate, model_shape, tensor_infos_from_header

pytestmark = [pytest.mark.trace,
              pytest.mark.skipif(not vram_trace.available(), reason="torch and transformers are not installed ([trace] extra)")]

#: Architectures the estimator under-estimates by more than 3% at some point of TEST_POINTS, and why (none now:
#: a gap found later goes here with its cause, so the list stays true).
KNOWN_UNDER: dict[str, str] = {}
#: Architectures over-estimated by more than 10%, and why (safe, but a bigger purchase than needed).
KNOWN_OVER: dict[str, str] = {}


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    out = []
    for name, arch in ARCHITECTURES.items():
        for batch, prompt, new in TEST_POINTS:
            out.append(run_case(name, arch, batch, prompt, new))
    return out


def test_at_least_20_architectures_of_every_family() -> None:
    families = {a["family"] for a in ARCHITECTURES.values()}
    assert len(ARCHITECTURES) >= 20
    assert {"dense MHA", "dense GQA", "MQA / parallel attention", "sliding window", "sliding window / softcapped", "ALiBi",
            "MoE", "MLA"} <= families


def test_never_more_than_3_percent_under_the_trace(cases: list[Case]) -> None:
    under = {c.name for c in cases if c.error < -0.03}
    assert under - set(KNOWN_UNDER) == set(), [f"{c.name} b{c.batch} p{c.prompt} {c.error:+.1%}" for c in cases if c.error < -0.03]
    assert set(KNOWN_UNDER) - under == set(), "these now meet the goal: take them off KNOWN_UNDER"


def test_at_most_10_percent_over_the_trace(cases: list[Case]) -> None:
    over = {c.name for c in cases if c.error > 0.10}
    assert over - set(KNOWN_OVER) == set(), [f"{c.name} b{c.batch} p{c.prompt} {c.error:+.1%}" for c in cases if c.error > 0.10]
    assert set(KNOWN_OVER) - over == set(), "these now meet the goal: take them off KNOWN_OVER"


def test_peak_reserved_within_one_percent(cases: list[Case]) -> None:
    off = [f"{c.name} b{c.batch} p{c.prompt} {c.reserved_error:+.2%}" for c in cases if abs(c.reserved_error) > 0.01]
    assert off == []


def test_median_error(cases: list[Case]) -> None:
    med = statistics.median(abs(c.error) for c in cases)
    assert med <= 0.03, f"median |error| {med:.2%}"


def test_unknown_model_type_takes_the_conservative_path() -> None:
    """A model type the estimator does not know gets math attention and a full cache: well above the trace, never under."""
    arch = ARCHITECTURES["mistral-7b-v0.1"]
    known = run_case("mistral-7b-v0.1", arch, 1, 4096, 4)
    cfg, header = vram_trace.reduced_model(arch["config"], int(arch["layers"]))
    shape = model_shape({**cfg, "model_type": "made-up"})
    assert shape.attention_path == "unknown" and any("not known to the estimator" in n for n in shape.notes)
    weights = collect_weights(tensor_infos_from_header(header), shape=shape)
    est = estimate(shape, weights, RunConfig(runtime="transformers", context=4100, batch=1, new_tokens=4))
    unknown = est.per_gpu_bytes - CUDA_CONTEXT_BYTES - LIBRARY_BYTES
    assert unknown > known.traced * 1.2 > known.estimated
