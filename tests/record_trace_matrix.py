"""Record the trace of every architecture-matrix point into tests/data/vram_trace_matrix.json (``make trace-matrix``).

The trace needs torch and transformers (the [trace] extra); the recording lets tests/test_vram_oracle.py hold
the pure estimator to the trace on every machine, torch or not. Re-record after changing the matrix or the
trace, or to check a new transformers version (the file names the versions it was recorded with).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vram_fixtures import ARCHITECTURES, LONG_GENERATIONS, OTHER_POINTS, OTHER_TYPES
from vram_matrix import POINTS

from airpack import vram_trace
from airpack.vram import model_shape

OUT = Path(__file__).resolve().parent / "data" / "vram_trace_matrix.json"


def _runs(config: dict[str, object], points: tuple[tuple[int, int, int], ...], layers: int | None) -> tuple[dict[str, object], list[object]]:
    cfg, header = vram_trace.reduced_model(config, layers)
    shape = model_shape(cfg)
    runs: list[object] = []
    for batch, prompt, new in points:
        prompt = min(prompt, shape.max_context - new)
        t = vram_trace.trace_generate(config, batch=batch, prompt=prompt, new_tokens=new, num_layers=layers)
        runs.append({"batch": batch, "prompt": prompt, "new_tokens": new, "peak_allocated": t.peak_allocated,
                     "peak_reserved": t.peak_reserved, "peak_in_use": t.peak_in_use, "backends": dict(t.backends)})
    return {"config": cfg, "header": header}, runs


def record() -> dict[str, object]:
    import torch
    import transformers

    archs: dict[str, object] = {}
    for name, arch in ARCHITECTURES.items():
        model, runs = _runs(arch["config"], POINTS, int(arch["layers"]))
        archs[name] = {"family": arch["family"], **model, "runs": runs}
        print(name, file=sys.stderr)
    others: dict[str, object] = {}
    for name, config in OTHER_TYPES.items():
        model, runs = _runs(config, OTHER_POINTS, None)
        others[name] = {"family": "other model types (small synthetic configs)", **model, "runs": runs}
        print(name, file=sys.stderr)
    long: dict[str, dict[str, object]] = {}
    for name, batch, prompt, new in LONG_GENERATIONS:
        arch = ARCHITECTURES[name]
        model, runs = _runs(arch["config"], ((batch, prompt, new),), int(arch["layers"]))
        entry = long.setdefault(name, {"family": "long generations", **model, "runs": []})
        entry["runs"] += runs  # type: ignore[operator]
        print(name, batch, prompt, new, file=sys.stderr)
    return {"recorded_with": {"torch": str(torch.__version__), "transformers": str(transformers.__version__)},
            "architectures": archs, "other_types": others, "long_generations": long}


if __name__ == "__main__":
    if not vram_trace.available():
        sys.exit(f"the trace needs {vram_trace.TRACE_REQUIREMENT}: {vram_trace.INSTALL_HINT}")
    OUT.write_text(json.dumps(record(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)
