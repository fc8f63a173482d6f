"""Check the VRAM estimator against real GPU measurements (``make bench-fit``).

Reads ../shared/data/vram/h100-transformers-calibration.json (relative to the
checkout; ``--data FILE`` overrides it): for each model, its config.json and
safetensors header; for each run, the measured device memory after
``model.generate`` (``nvml_used_after``). Predicts every run with the
``transformers`` runtime and prints a per-model/per-run table and a summary.

Targets (exit 1 when one is missed): median absolute error <= 5% of the
measured figure; never under it by more than 3%; never over it by more than
15%; weight bytes within 1% of ``weights_allocated``; the KV cache equal to
2 x layers x KV heads x head_dim x 2 bytes x batch x (prompt + new tokens).

Where torch and transformers are installed (the [trace] extra) it also runs,
in the same pass: the trace on every measured run (its peak allocated and
reserved against ``torch.cuda``'s figures, and how NVML's figure relates to the
reserved memory), and the architecture matrix (tests/vram_fixtures.py): the
pure estimator against the trace, median and worst error per family.
``--no-trace`` skips both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from airpack import vram_trace  # noqa: E402
from airpack.vram import (  # noqa: E402
    CUDA_CONTEXT_BYTES,
    LIBRARY_BYTES,
    GpuBudget,
    RunConfig,
    collect_weights,
    fit,
    model_shape,
    tensor_infos_from_header,
)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "vram" / "h100-transformers-calibration.json"
MiB = 1 << 20

MEDIAN_MAX = 0.05
UNDER_MAX = 0.03
OVER_MAX = 0.15
WEIGHTS_MAX = 0.01


def kv_formula(cfg: dict[str, Any], tokens: int) -> int:
    """The textbook KV cache: keys and values, every layer, every KV head, bf16."""
    layers = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * layers * kv_heads * head_dim * 2 * tokens


def trace_measured(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The trace on every measured run: its peaks against torch.cuda's, and NVML's figure less the reserved peak."""
    from airpack.vram_trace import trace_generate

    out = []
    for m in doc["models"]:
        for r in m["runs"]:
            if not r.get("ok", True):
                continue
            t = trace_generate(m["config"], batch=r["batch"], prompt=r["prompt"], new_tokens=r["new_tokens"])
            out.append({"model": m["model"], "batch": r["batch"], "prompt": r["prompt"],
                        "allocated_error": t.peak_allocated / r["peak_allocated"] - 1,
                        "reserved_error": t.peak_reserved / r["peak_reserved"] - 1,
                        "nvml_minus_reserved": r["nvml_used_after"] - r["peak_reserved"],
                        "footprint_error": (t.peak_reserved + CUDA_CONTEXT_BYTES + LIBRARY_BYTES) / r["nvml_used_after"] - 1})
    return out


def print_trace_measured(rows: list[dict[str, Any]]) -> None:
    print("\ntrace (torch/transformers installed here, CPU) vs the measured runs")
    print(f"{'model':<18} {'batch':>5} {'prompt':>6} {'peak alloc':>10} {'peak resv':>10} {'NVML-resv MiB':>14} {'footprint':>10}")
    for r in rows:
        print(f"{r['model']:<18} {r['batch']:>5} {r['prompt']:>6} {r['allocated_error']:>+10.2%} {r['reserved_error']:>+10.2%}"
              f" {r['nvml_minus_reserved'] / MiB:>14.0f} {r['footprint_error']:>+10.2%}")
    a = [abs(r["allocated_error"]) for r in rows]
    rv = [r["reserved_error"] for r in rows]
    gap = [r["nvml_minus_reserved"] / MiB for r in rows]
    print(f"trace: peak allocated median |error| {statistics.median(a):.2%}, worst {max(a):.2%}; peak reserved "
          f"{min(rv):+.2%} .. {max(rv):+.2%}; NVML - reserved {min(gap):.0f}..{max(gap):.0f} MiB "
          f"(the estimate's context + libraries: {(CUDA_CONTEXT_BYTES + LIBRARY_BYTES) / MiB:.0f} MiB)")


def matrix_table() -> list[dict[str, Any]]:
    """The pure estimator against the trace on the architecture matrix, every point."""
    from vram_fixtures import ARCHITECTURES
    from vram_matrix import POINTS, run_case

    out = []
    cache: dict[str, Any] = {}
    for name, arch in ARCHITECTURES.items():
        for batch, prompt, new in POINTS:
            c = run_case(name, arch, batch, prompt, new, cache)
            out.append({"arch": name, "family": c.family, "batch": c.batch, "prompt": c.prompt, "error": c.error,
                        "reserved_error": c.reserved_error, "estimated": c.estimated, "traced": c.traced,
                        "estimate_s": c.estimate_s, "trace_s": c.trace_s})
    return out


def print_matrix(rows: list[dict[str, Any]]) -> None:
    print(f"\npure estimator vs the trace: {len({r['arch'] for r in rows})} architectures x batch 1/8 x prompts "
          "(the allocator's share, estimate less CUDA context and libraries: what must fit against the trace's peak in use;"
          " 'reserved': what a roomy GPU shows against its peak reserved)")
    print(f"{'family':<28} {'archs':>5} {'points':>6} {'median |err|':>13} {'worst under':>12} {'worst over':>11}"
          f" {'reserved worst':>15}")

    def line(label: str, mine: list[dict[str, Any]]) -> None:
        errs = [r["error"] for r in mine]
        res = [r["reserved_error"] for r in mine]
        print(f"{label:<28} {len({r['arch'] for r in mine}):>5} {len(mine):>6} {statistics.median(abs(e) for e in errs):>13.2%}"
              f" {min(0.0, min(errs)):>+12.2%} {max(0.0, max(errs)):>+11.2%} {max(res, key=abs):>+15.2%}")

    for fam in sorted({r["family"] for r in rows}):
        line(fam, [r for r in rows if r["family"] == fam])
    line("all", rows)
    errs = [r["error"] for r in rows]
    print("goals: never under by more than 3%, median within 3%, at most 10% over "
          f"(under by > 3%: {sum(e < -0.03 for e in errs)} points; over by > 10%: {sum(e > 0.10 for e in errs)} points)")
    est_s = sum(r["estimate_s"] for r in rows)
    trace_s = sum(r["trace_s"] for r in rows)
    print(f"time over the {len(rows)} points: pure estimator {est_s:.2f} s, trace {trace_s:.1f} s "
          f"(ratio {est_s / trace_s:.4f}; the trace is the baseline the estimator replaces where torch is absent)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="calibration JSON (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print the rows and summary as JSON")
    ap.add_argument("--no-trace", action="store_true", help="skip the trace (measured runs and the architecture matrix)")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        print(f"bench-fit needs the calibration file {args.data} (../shared/data/vram/ beside the checkout); "
              "pass --data FILE", file=sys.stderr)
        return 2
    doc = json.loads(args.data.read_text())
    rows: list[dict[str, Any]] = []
    weight_rows: list[dict[str, Any]] = []
    kv_ok = True
    for m in doc["models"]:
        cfg = m["config"]
        infos = tensor_infos_from_header(m["header"])
        shape = model_shape(cfg)
        weights = collect_weights(infos, shape=shape)
        gpu = GpuBudget(name=m.get("gpu", "GPU"), count=1, memory_bytes=int(m["total_mem"]))
        first = None
        for r in m["runs"]:
            if not r.get("ok", True):
                continue
            ctx = r["prompt"] + r["new_tokens"]
            res = fit(shape, weights, RunConfig(runtime="transformers", context=ctx, batch=r["batch"], new_tokens=r["new_tokens"]), gpu)
            est = res.estimate
            first = first or est
            shown = est.peak_reserved_bytes or est.per_gpu_bytes  # the measurement is nvidia-smi's, on a roomy GPU
            kv_expected = kv_formula(cfg, r["batch"] * ctx)
            kv_ok &= est.breakdown.kv_cache == kv_expected
            measured = r["nvml_used_after"]
            rows.append({
                "model": m["model"], "batch": r["batch"], "prompt": r["prompt"], "new_tokens": r["new_tokens"],
                "measured": measured, "predicted": shown, "error": (shown - measured) / measured, "needed": est.per_gpu_bytes,
                "weights": est.breakdown.weights, "kv_cache": est.breakdown.kv_cache, "kv_formula": kv_expected,
                "activations": est.breakdown.activations, "overhead": est.breakdown.overhead,
            })
        if first is not None:
            alloc = m["weights_allocated"]
            weight_rows.append({"model": m["model"], "predicted": first.breakdown.weights, "weights_allocated": alloc,
                                "error": (first.breakdown.weights - alloc) / alloc, "attention": shape.attention})

    errs = [r["error"] for r in rows]
    summary = {
        "runs": len(rows),
        "models": len(weight_rows),
        "median_abs_error": statistics.median(abs(e) for e in errs),
        "max_under": -min(0.0, min(errs)),
        "max_over": max(0.0, max(errs)),
        "max_weights_error": max(abs(w["error"]) for w in weight_rows),
        "kv_exact": kv_ok,
    }
    checks = {
        f"median |error| <= {MEDIAN_MAX:.0%}": summary["median_abs_error"] <= MEDIAN_MAX,
        f"never under by more than {UNDER_MAX:.0%}": summary["max_under"] <= UNDER_MAX,
        f"never over by more than {OVER_MAX:.0%}": summary["max_over"] <= OVER_MAX,
        f"weights within {WEIGHTS_MAX:.0%} of weights_allocated": summary["max_weights_error"] <= WEIGHTS_MAX,
        "KV cache exact against the formula": kv_ok,
    }
    traced = not args.no_trace and vram_trace.available()
    measured_trace = trace_measured(doc) if traced else []
    matrix = matrix_table() if traced else []
    if args.json:
        print(json.dumps({"rows": rows, "weights": weight_rows, "summary": summary, "checks": checks,
                          "trace_measured": measured_trace, "matrix": matrix}, indent=2))
        return 0 if all(checks.values()) else 1

    print(f"VRAM fit vs {args.data.name}: runtime transformers, figure predicted: nvml_used_after (the estimate's"
          " peak_reserved_bytes: what the process shows on a GPU with room to spare)\n")
    print(f"{'model':<18} {'batch':>5} {'prompt':>6} {'measured MiB':>13} {'predicted MiB':>14} {'error':>7}"
          f" {'weights':>8} {'KV':>8} {'act':>8} {'overhead':>9}  KV=formula")
    for r in rows:
        print(f"{r['model']:<18} {r['batch']:>5} {r['prompt']:>6} {r['measured'] / MiB:>13.0f} {r['predicted'] / MiB:>14.0f}"
              f" {r['error']:>+7.1%} {r['weights'] / MiB:>8.0f} {r['kv_cache'] / MiB:>8.0f} {r['activations'] / MiB:>8.0f}"
              f" {r['overhead'] / MiB:>9.0f}  {'yes' if r['kv_cache'] == r['kv_formula'] else 'NO'}")
    print("\nper model (weights are exact header bytes; PyTorch's rounding shows up in weights_allocated)")
    print(f"{'model':<18} {'attn':>4} {'weights MiB':>12} {'allocated MiB':>14} {'w. error':>9} {'runs':>5} {'median |err|':>13} {'worst':>7}")
    for w in weight_rows:
        mine = [r["error"] for r in rows if r["model"] == w["model"]]
        worst = max(mine, key=abs)
        print(f"{w['model']:<18} {w['attention']:>4} {w['predicted'] / MiB:>12.1f} {w['weights_allocated'] / MiB:>14.1f}"
              f" {w['error']:>+9.2%} {len(mine):>5} {statistics.median(abs(e) for e in mine):>13.2%} {worst:>+7.1%}")
    print(f"\nsummary: {summary['runs']} runs of {summary['models']} models; median |error| {summary['median_abs_error']:.2%}; "
          f"worst under {summary['max_under']:.2%}; worst over {summary['max_over']:.2%}; "
          f"weights within {summary['max_weights_error']:.2%}; KV exact: {'yes' if kv_ok else 'NO'}")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {name}")
    if traced:
        print_trace_measured(measured_trace)
        print_matrix(matrix)
    elif not args.no_trace:
        print(f"\n(trace skipped: {vram_trace.TRACE_REQUIREMENT} not installed; {vram_trace.INSTALL_HINT})")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
