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

from vram_fixtures import ARCHITECTURES
from vram_matrix import POINTS

from airpack import vram_trace
from airpack.vram import model_shape

OUT = Path(__file__).resolve().parent / "data" / "vram_trace_matrix.json"


def record() -> dict[str, object]:
    archs: dict[str, object] = {}
    versions: dict[str, str] = {}
    for name, arch in ARCHITECTURES.items():
        layers = int(arch["layers"])
        cfg, header = vram_trace.reduced_model(arch["config"], layers)
        shape = model_shape(cfg)
        runs = []
        for batch, prompt, new in POINTS:
            prompt = min(prompt, shape.max_context - new)
            t = vram_trace.trace_generate(arch["config"], batch=batch, prompt=prompt, new_tokens=new, num_layers=layers)
            versions = {"torch": t.torch_version, "transformers": t.transformers_version}
            runs.append({"batch": batch, "prompt": prompt, "new_tokens": new, "peak_allocated": t.peak_allocated,
                         "peak_reserved": t.peak_reserved, "backends": dict(t.backends)})
        archs[name] = {"family": arch["family"], "config": cfg, "header": header, "runs": runs}
        print(name, file=sys.stderr)
    return {"recorded_with": versions, "architectures": archs}


if __name__ == "__main__":
    if not vram_trace.available():
        sys.exit(f"the trace needs {vram_trace.TRACE_REQUIREMENT}: {vram_trace.INSTALL_HINT}")
    OUT.write_text(json.dumps(record(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)
