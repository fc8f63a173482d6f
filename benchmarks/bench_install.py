"""Benchmark of ``airpack install``: throughput against ``cp -r`` and ``airpack verify`` of the same bundle (``make bench``).

In one run it:

1. writes a model folder of 256 MiB safetensors files (4 by default: 1 GiB)
   and packs it with the real pack code;
2. times, with a warm page cache and then a cold one (the bundle's pages
   evicted before each run, so it is read from the disk as from a medium),
   best of ``--repeat``, each a fresh process and a fresh destination on the
   same filesystem:
   - ``cp -r BUNDLE DEST``: copying alone (no fsync, as cp does);
   - ``cp -r BUNDLE DEST && sync -f DEST``: copying made durable, what install must do;
   - ``airpack verify BUNDLE``: hashing alone (in parallel);
   - ``airpack install BUNDLE --registry NEW``: verify + copy + hash + fsync + commit;
3. prints each in MB/s and checks the target: install within 1.1 x the slower
   of ``cp -r`` and ``airpack verify``, i.e. copying and hashing overlap (each
   byte is read once, hashed as it is copied). With a warm cache on few cores
   the run is CPU-bound and install also pays for writing (kernel copy and
   fsync) what verify only reads; with a cold cache the medium sets the pace.

Everything is written under ``bench-out/`` (ignored by git) or ``--workdir``
and removed at the end unless ``--keep``. Other load on the machine makes the
figures noisy; compare runs on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
MiB = 1 << 20
MB = 1_000_000

from bench_verify import add_work_args, make_sources, model_folder, pack_bundle, work_folder  # noqa: E402

from airpack import hashing  # noqa: E402
from airpack.signing import generate, load_public_file, write_keypair  # noqa: E402
from airpack.trust import new_policy, save_policy  # noqa: E402


def evict(root: Path) -> None:
    """Drop ``root``'s files from the page cache (POSIX_FADV_DONTNEED), so the next read comes from the disk.

    Only these files are evicted: nothing else on the machine is disturbed, and no root is needed.
    """
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(cmd: list[str], *, cleanup: Path | None = None, cold: Path | None = None) -> float:
    """Wall seconds of one command in a fresh process; ``cleanup`` is removed (untimed) before and after.

    With ``cold``, that folder's files are evicted from the page cache first (a medium read for real).
    """
    if cleanup is not None:
        shutil.rmtree(cleanup, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    if cold is not None:
        evict(cold)
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit {r.returncode}: {r.stderr}")
    if cleanup is not None:
        shutil.rmtree(cleanup, ignore_errors=True)
    return wall


def best(n: int, fn: object) -> float:
    assert callable(fn)
    return min(fn() for _ in range(n))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file-mib", type=int, default=256, help="size of each weight file (MiB)")
    ap.add_argument("--files", type=int, default=4, help="weight files in the bundle (default 4: 1 GiB)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per method (best is kept)")
    add_work_args(ap, "bundle")
    a = ap.parse_args(argv)
    with work_folder(a, "install-") as work:
        return run(a, work, time.perf_counter())


def run(a: argparse.Namespace, work: Path, started: float) -> int:
    print(f"writing {a.files} x {a.file_mib} MiB safetensors files under {os.path.relpath(work)} ...", flush=True)
    shards = make_sources(work / "shards", a.files, a.file_mib * MiB)
    model = model_folder(work / "src", shards)
    key = work / "bench.key"
    write_keypair(generate("ed25519"), key, work / "bench.pub")
    policy_path = work / "policy.json"
    save_policy(new_policy(1, source=str(policy_path)).with_key("bench", load_public_file(work / "bench.pub"),
                                                                (work / "bench.pub").read_text()), policy_path)
    print("packing the bundle with the real pack code ...", flush=True)
    bundle = pack_bundle(work, "bench", model, key)
    shutil.rmtree(work / "src")
    shutil.rmtree(work / "shards")
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())

    dest, reg = work / "copy", work / "registry"
    airpack = [sys.executable, "-m", "airpack"]
    # Warm the page cache (and check the bundle installs) before timing.
    timed([*airpack, "install", str(bundle), "--registry", str(reg), "--trust", str(policy_path), "-q"], cleanup=reg)

    def measure(cold: Path | None) -> dict[str, float]:
        sync_cp = ["sh", "-c", 'cp -r "$1" "$2" && sync -f "$2"', "sh", str(bundle), str(dest)]
        return {
            "cp": best(a.repeat, lambda: timed(["cp", "-r", str(bundle), str(dest)], cleanup=dest, cold=cold)),
            "cp_sync": best(a.repeat, lambda: timed(sync_cp, cleanup=dest, cold=cold)),
            "verify": best(a.repeat, lambda: timed([*airpack, "verify", str(bundle), "--trust", str(policy_path), "-q"], cold=cold)),
            "install": best(a.repeat, lambda: timed([*airpack, "install", str(bundle), "--registry", str(reg),
                                                     "--trust", str(policy_path), "-q"], cleanup=reg, cold=cold)),
        }

    rows: dict[str, dict[str, float]] = {}
    for cache in ("warm", "cold"):
        print(f"timing with a {cache} page cache (best of {a.repeat}) ...", flush=True)
        rows[cache] = measure(bundle if cache == "cold" else None)

    print()
    print(f"airpack install benchmark: {os.cpu_count()} CPU(s), {hashing.default_workers()} worker(s), Python {sys.version.split()[0]}")
    print(f"bundle: {a.files} x {a.file_mib} MiB = {total / (1 << 30):.2f} GiB, best of {a.repeat}, "
          "each run a fresh process (start-up included)")
    out: dict[str, float] = {"bytes": total}
    for cache, t in rows.items():
        slower = max(t["cp"], t["verify"])
        ratio = t["install"] / slower

        def row(name: str, s: float, slower: float = slower) -> str:
            return f"  {name:<56}{s:>9.3f}{total / s / MB:>10.0f}{s / slower:>10.2f}"

        print()
        print(f"{cache} page cache" + (" (the bundle's pages evicted before each run: read from the disk)" if cache == "cold" else ""))
        print(f"  {'method':<56}{'seconds':>9}{'MB/s':>10}{'/ slower':>10}")
        print(row("cp -r BUNDLE DEST", t["cp"]))
        print(row("cp -r BUNDLE DEST && sync -f DEST (durable copy)", t["cp_sync"]))
        print(row("airpack verify BUNDLE", t["verify"]))
        print(row("airpack install BUNDLE (verify+copy+hash+fsync+commit)", t["install"]))
        verdict = "meets" if ratio <= 1.1 else "ABOVE"
        print(f"  install / max(cp -r, verify) = {ratio:.2f}x ({verdict} the 1.1x target)")
        print(f"  install / durable copy       = {t['install'] / t['cp_sync']:.2f}x")
        out.update({f"{cache}_{k}_s": round(v, 4) for k, v in t.items()})
        out[f"{cache}_ratio"] = round(ratio, 3)
    print(f"total benchmark time {time.perf_counter() - started:.0f} s")
    if a.json:
        print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
