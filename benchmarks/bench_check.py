"""Benchmark of ``airpack check`` and of the re-verified no-op install (``make bench``).

Issue 11 made two commands read every installed or carried byte again:
``airpack check`` re-hashes each blob of a registry against its database, and
installing a bundle that is already installed verifies the medium before it
answers "noop". In one run this:

1. writes a model folder of 256 MiB safetensors files (4 by default: 1 GiB),
   packs it with the real pack code and installs it;
2. times, warm page cache, best of ``--repeat``, each a fresh process:
   - ``sha256sum`` over the registry's blobs: the serial baseline a careful
     operator would run by hand;
   - ``airpack check --registry REG``: every blob, link, ref, kept envelope
     and the audit chain;
   - ``airpack verify BUNDLE``: the bundle's own verification;
   - ``airpack install BUNDLE`` again: the no-op, which now verifies first;
3. prints each in MB/s with its ratio to ``sha256sum`` (check) and to
   ``verify`` (the no-op): check should beat the serial baseline where there
   are cores to hash in parallel, and the no-op should cost about one verify.

Everything is written under ``bench-out/`` (ignored by git) or ``--workdir``
and removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
MiB = 1 << 20
MB = 1_000_000

from bench_install import best, timed  # noqa: E402
from bench_verify import add_work_args, make_sources, model_folder, pack_bundle, work_folder  # noqa: E402

from airpack import hashing  # noqa: E402
from airpack.signing import generate, read_public_file, write_keypair  # noqa: E402
from airpack.trust import new_policy, save_policy  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file-mib", type=int, default=256, help="size of each weight file (MiB)")
    ap.add_argument("--files", type=int, default=4, help="weight files in the bundle (default 4: 1 GiB)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per method (best is kept)")
    add_work_args(ap, "bundle and registry")
    a = ap.parse_args(argv)
    with work_folder(a, "check-") as work:
        return run(a, work, time.perf_counter())


def run(a: argparse.Namespace, work: Path, started: float) -> int:
    print(f"writing {a.files} x {a.file_mib} MiB safetensors files under {os.path.relpath(work)} ...", flush=True)
    shards = make_sources(work / "shards", a.files, a.file_mib * MiB)
    model = model_folder(work / "src", shards)
    key, pub = work / "bench.key", work / "bench.pub"
    write_keypair(generate("ed25519"), key, pub)
    policy_path = work / "policy.json"
    pem = read_public_file(pub)
    save_policy(new_policy(1, source=str(policy_path)).with_key("bench", pem[0], pem[1]), policy_path)
    print("packing and installing the bundle with the real code ...", flush=True)
    bundle = pack_bundle(work, "bench", model, key)
    shutil.rmtree(work / "src")
    shutil.rmtree(work / "shards")
    reg = work / "registry"
    airpack = [sys.executable, "-m", "airpack"]
    install = [*airpack, "install", str(bundle), "--registry", str(reg), "--trust", str(policy_path), "-q"]
    timed(install)
    blobs = sorted(str(p) for p in (reg / "hub").rglob("blobs/*") if p.is_file())
    total = sum(os.path.getsize(p) for p in blobs)

    t = {
        "sha256sum": best(a.repeat, lambda: timed(["sha256sum", *blobs])),
        "check": best(a.repeat, lambda: timed([*airpack, "check", "--registry", str(reg), "-q"])),
        "verify": best(a.repeat, lambda: timed([*airpack, "verify", str(bundle), "--trust", str(policy_path), "-q"])),
        "noop_install": best(a.repeat, lambda: timed(install)),
    }
    print()
    print(f"airpack check benchmark: {os.cpu_count()} CPU(s), {hashing.default_workers()} worker(s), Python {sys.version.split()[0]}")
    print(f"registry: {len(blobs)} blobs, {total / (1 << 30):.2f} GiB; warm page cache, best of {a.repeat}, "
          "each run a fresh process (start-up included)")
    print(f"  {'method':<52}{'seconds':>9}{'MB/s':>10}{'ratio':>10}")
    rows = [("sha256sum BLOBS (serial baseline)", "sha256sum", "sha256sum"),
            ("airpack check --registry REG", "check", "sha256sum"),
            ("airpack verify BUNDLE", "verify", "verify"),
            ("airpack install BUNDLE again (verified no-op)", "noop_install", "verify")]
    for label, k, base in rows:
        print(f"  {label:<52}{t[k]:>9.3f}{total / t[k] / MB:>10.0f}{t[k] / t[base]:>10.2f}")
    print(f"  check / sha256sum = {t['check'] / t['sha256sum']:.2f}x; no-op install / verify = "
          f"{t['noop_install'] / t['verify']:.2f}x")
    print(f"total benchmark time {time.perf_counter() - started:.0f} s")
    if a.json:
        print(json.dumps({"bytes": total, **{f"{k}_s": round(v, 4) for k, v in t.items()}}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
