"""Benchmark of start-up: how long ``airpack --help`` and ``airpack verify`` of a tiny bundle take (``make bench``).

In one run it:

1. packs a tiny bundle (one 64 KiB safetensors file and a config.json) with
   the real pack code, with its own key and trust policy;
2. times, in fresh processes run in turns (best of ``--repeat``),
   ``python -c pass`` (the interpreter alone), ``airpack --help`` and
   ``airpack verify BUNDLE --trust POLICY``;
3. prints each time and its ratio to ``python -c pass`` (targets: at most
   0.15 s for ``--help`` and for ``verify`` of the tiny bundle).

The command line imports each command's module only when that command runs
(``airpack.cli.COMMANDS``), and each command imports its operations inside its
body, so these figures are mostly the interpreter, click, cryptography and the
verify code. Everything is written under ``bench-out/`` (ignored by git) or
``--workdir`` and removed at the end unless ``--keep``. Other load on the
machine makes the figures noisy; compare runs on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_verify import add_work_args, model_folder, pack_bundle, work_folder, write_safetensors

from airpack.signing import generate, load_public_file, write_keypair
from airpack.trust import new_policy, save_policy

TARGET_S = 0.15


def tiny_bundle(work: Path) -> tuple[Path, Path]:
    """(bundle folder, trust policy) of a bundle holding one 64 KiB safetensors file."""
    shard = work / "shards" / "model.safetensors"
    shard.parent.mkdir(parents=True)
    write_safetensors(shard, 64 * 1024, os.urandom(64 * 1024), 0)
    model = model_folder(work / "src", [shard])
    key = work / "bench.key"
    write_keypair(generate("ed25519"), key, work / "bench.pub")
    policy_path = work / "policy.json"
    policy = new_policy(1, source=str(policy_path)).with_key("bench", load_public_file(work / "bench.pub"), (work / "bench.pub").read_text())
    save_policy(policy, policy_path)
    return pack_bundle(work, "tiny", model, key), policy_path


def run_once(cmd: Sequence[str]) -> float:
    """Wall seconds of one fresh process; a failure stops the benchmark."""
    t = time.perf_counter()
    r = subprocess.run(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit {r.returncode}: {r.stderr.decode(errors='replace')}")
    return wall


def best_in_turns(n: int, cmds: dict[str, list[str]]) -> dict[str, float]:
    """Best wall time of ``n`` runs of each command, run in turns so a change in machine load hits all alike."""
    best: dict[str, float] = {}
    for _ in range(n):
        for name, cmd in cmds.items():
            w = run_once(cmd)
            best[name] = min(w, best.get(name, w))
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=20, help="fresh processes per command, in turns (best is kept)")
    add_work_args(ap, "bundle")
    a = ap.parse_args(argv)
    with work_folder(a, "startup-") as work:
        bundle, policy = tiny_bundle(work)
        py = sys.executable
        cmds = {
            "python -c pass": [py, "-c", "pass"],
            "airpack --help": [py, "-m", "airpack", "--help"],
            "airpack verify (tiny bundle)": [py, "-m", "airpack", "verify", str(bundle), "--trust", str(policy)],
        }
        for cmd in cmds.values():  # warm the page cache and the bytecode caches; a failure stops here
            run_once(cmd)
        load_before = os.getloadavg()[0]
        best = best_in_turns(a.repeat, cmds)
        load = max(load_before, os.getloadavg()[0])

    base = best["python -c pass"]
    print(f"airpack start-up benchmark: {os.cpu_count()} CPU(s), Python {sys.version.split()[0]}, best of {a.repeat} fresh processes")
    print(f"  {'command':<32}{'seconds':>9}{'x python':>10}   target")
    for name, t in best.items():
        target = "" if name == "python -c pass" else f"<= {TARGET_S:.2f} s: {'meets' if t <= TARGET_S else 'ABOVE'}"
        print(f"  {name:<32}{t:>9.3f}{t / base:>10.1f}   {target}")
    if load > 0.5:
        print(f"  note: load average {load:.1f} on {os.cpu_count()} CPU(s) from other work; the figures are noisy")
    if a.json:
        print(json.dumps({
            "python_s": round(base, 4), "help_s": round(best["airpack --help"], 4),
            "verify_s": round(best["airpack verify (tiny bundle)"], 4),
            "help_ratio": round(best["airpack --help"] / base, 2), "verify_ratio": round(best["airpack verify (tiny bundle)"] / base, 2),
            "target_s": TARGET_S, "load_average": round(load, 2), "repeat": a.repeat,
        }, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
