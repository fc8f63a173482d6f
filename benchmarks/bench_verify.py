"""Benchmark of ``airpack verify``: hashing throughput and peak memory (``make bench``).

In one run it:

1. writes a model folder of 256 MiB safetensors files and packs it with the
   real pack code into a 1 GiB bundle (4 files) and a 4 GiB bundle (16 files);
2. times verify of the 1 GiB bundle (Python API, and the real CLI) against a
   single-thread ``hashlib.sha256`` pass over the same files, all warm in the
   page cache, and prints both in MB/s and their ratio (target: >= 1.7x on
   2 cores, i.e. files are hashed in parallel);
3. measures the peak resident memory of ``airpack verify`` on each bundle, in
   a fresh process each (``wait4`` rusage of exactly that child; target: the
   two within 20 MB, i.e. memory does not grow with the bundle).

Everything is written under ``bench-out/`` (ignored by git) or ``--workdir``
and removed at the end unless ``--keep``. Other load on the machine makes
the figures noisy; compare runs on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
MB = 1_000_000

from airpack import hashing  # noqa: E402
from airpack.ops.pack import PackOptions, pack  # noqa: E402
from airpack.ops.verify import VerifyOptions, verify_bundle  # noqa: E402
from airpack.signing import generate, load_public_file, load_signer, write_keypair  # noqa: E402
from airpack.spec import load_spec  # noqa: E402
from airpack.trust import new_policy, save_policy  # noqa: E402


def add_work_args(ap: argparse.ArgumentParser, keeps: str) -> None:
    """--workdir, --keep and --json, the same for every benchmark that writes a bundle."""
    ap.add_argument("--workdir", type=Path, help="where to write (default: a temp folder under bench-out/)")
    ap.add_argument("--keep", action="store_true", help=f"keep the generated {keeps}")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")


@contextlib.contextmanager
def work_folder(a: argparse.Namespace, prefix: str) -> Iterator[Path]:
    """A fresh folder under --workdir (default bench-out/), removed at the end unless --keep."""
    base = a.workdir or REPO / "bench-out"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield work
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


def write_safetensors(path: Path, data_bytes: int, block: bytes, seed: int) -> None:
    """A valid safetensors file with one U8 tensor of ``data_bytes`` bytes (distinct content per seed)."""
    header = json.dumps(
        {"__metadata__": {"format": "pt"}, "weight": {"dtype": "U8", "shape": [data_bytes], "data_offsets": [0, data_bytes]}},
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        left = data_bytes
        first = hashlib.sha256(seed.to_bytes(8, "little")).digest()
        f.write(first[: min(left, len(first))])
        left -= min(left, len(first))
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def make_sources(root: Path, files: int, file_bytes: int) -> list[Path]:
    root.mkdir(parents=True)
    block = os.urandom(16 * MiB)
    out = []
    for i in range(files):
        p = root / f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        write_safetensors(p, file_bytes, block, i)
        out.append(p)
    return out


def model_folder(root: Path, shards: list[Path]) -> Path:
    """A model folder holding (hard links to) ``shards`` and a config.json."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    for s in shards:
        os.link(s, root / s.name)
    return root


def pack_bundle(work: Path, name: str, model: Path, key: Path) -> Path:
    spec = work / f"{name}.toml"
    spec.write_text(
        f'[bundle]\nname = "{name}"\nchannel = "bench"\nsequence = 1\n\n'
        f'[[models]]\nrepo_id = "bench/{name}"\npath = "{os.path.relpath(model, work)}"\n'
    )
    out = work / f"bundle-{name}"
    pack(PackOptions(spec=load_spec(spec), out=out, signer=load_signer(key)))
    return out


def bundle_files(bundle: Path) -> list[Path]:
    return sorted(p for p in bundle.rglob("*.safetensors"))


def sha256_single_thread(paths: list[Path]) -> None:
    """The baseline: one thread, hashlib, 1 MiB reads, every file in turn."""
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(MiB):
                h.update(chunk)
        h.hexdigest()


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def interleaved_best(n: int, fns: dict[str, Callable[[], object]]) -> dict[str, tuple[float, float]]:
    """Best (wall, cpu) of ``n`` runs of each, run in turns so a change in machine load hits all alike."""
    best: dict[str, tuple[float, float]] = {}
    for _ in range(n):
        for name, fn in fns.items():
            w, c = timed(fn)
            if name not in best or w < best[name][0]:
                best[name] = (w, c)
    return best


def run_cli(args: list[str]) -> tuple[float, int, int]:
    """Run ``airpack ARGS`` in a fresh process: (wall seconds, exit code, peak RSS in bytes of exactly that child)."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "airpack", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode() if p.stderr else ""
    if p.stderr:
        p.stderr.close()
    if p.returncode != 0:
        raise SystemExit(f"airpack {' '.join(args)} failed with exit {p.returncode}: {err}")
    return wall, p.returncode, usage.ru_maxrss * 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file-mib", type=int, default=256, help="size of each weight file (MiB)")
    ap.add_argument("--small", type=int, default=4, help="files in the small bundle (default 4: 1 GiB)")
    ap.add_argument("--large", type=int, default=16, help="files in the large bundle (default 16: 4 GiB)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per method, in turns (best is kept)")
    add_work_args(ap, "bundles")
    a = ap.parse_args(argv)
    if a.large < a.small:
        ap.error("--large must be at least --small")
    with work_folder(a, "verify-") as work:
        return run(a, work, time.perf_counter())


def run(a: argparse.Namespace, work: Path, started: float) -> int:
    file_bytes = a.file_mib * MiB
    print(f"writing {a.large} x {a.file_mib} MiB safetensors files under {os.path.relpath(work)} ...", flush=True)
    shards = make_sources(work / "shards", a.large, file_bytes)
    small_model = model_folder(work / "src-small", shards[: a.small])
    large_model = model_folder(work / "src-large", shards)

    key = work / "bench.key"
    write_keypair(generate("ed25519"), key, work / "bench.pub")
    policy_path = work / "policy.json"
    policy = new_policy(1, source=str(policy_path)).with_key(
        "bench", load_public_file(work / "bench.pub"), (work / "bench.pub").read_text()
    )
    save_policy(policy, policy_path)

    print("packing both bundles with the real pack code ...", flush=True)
    t = time.perf_counter()
    small = pack_bundle(work, "small", small_model, key)
    large = pack_bundle(work, "large", large_model, key)
    pack_s = time.perf_counter() - t
    shutil.rmtree(work / "src-small")
    shutil.rmtree(work / "src-large")
    shutil.rmtree(work / "shards")

    files = bundle_files(small)
    small_bytes = sum(p.stat().st_size for p in small.rglob("*") if p.is_file())
    large_bytes = sum(p.stat().st_size for p in large.rglob("*") if p.is_file())
    hashed = sum(p.stat().st_size for p in files)

    # Warm the page cache, and check the bundle verifies before timing it.
    sha256_single_thread(files)
    vb = verify_bundle(VerifyOptions(bundle=small, policy=policy))
    assert sum(f.path.endswith(".safetensors") for f in vb.manifest.files) == a.small

    print(f"timing (best of {a.repeat}, in turns) ...", flush=True)
    load_before = os.getloadavg()[0]
    cli_args = ["verify", str(small), "--trust", str(policy_path), "--json"]
    best = interleaved_best(a.repeat, {
        "base": lambda: sha256_single_thread(files),
        "api": lambda: verify_bundle(VerifyOptions(bundle=small, policy=policy)),
    })
    (t_base, _), (t_api, cpu_api) = best["base"], best["api"]
    t_cli = min(run_cli(cli_args)[0] for _ in range(max(1, a.repeat // 2)))
    t_start = min(run_cli(["--version"])[0] for _ in range(2))
    load = max(load_before, os.getloadavg()[0])

    print("peak memory of `airpack verify`, a fresh process per bundle ...", flush=True)
    rss_small = run_cli(["verify", str(small), "--trust", str(policy_path), "--json"])[2]
    rss_large = run_cli(["verify", str(large), "--trust", str(policy_path), "--json"])[2]

    workers = hashing.default_workers()
    mbps = {k: hashed / v / MB for k, v in {"base": t_base, "api": t_api, "cli": t_cli}.items()}
    ratio_api, ratio_cli = t_base / t_api, t_base / t_cli
    diff_mb = (rss_large - rss_small) / MB

    print()
    print(f"airpack verify benchmark: {os.cpu_count()} CPU(s), {workers} hash worker(s), "
          f"{hashing.CHUNK // MiB} MiB reads, Python {sys.version.split()[0]}")
    print(f"bundle S: {a.small} x {a.file_mib} MiB = {small_bytes / (1 << 30):.2f} GiB;   "
          f"bundle L: {a.large} x {a.file_mib} MiB = {large_bytes / (1 << 30):.2f} GiB;   packed both in {pack_s:.1f} s")
    print()
    print(f"Throughput on bundle S ({hashed / MB:.0f} MB of weights, warm page cache, best of {a.repeat}; MB = 10^6 bytes)")
    print(f"  {'method':<44}{'seconds':>9}{'MB/s':>10}{'ratio':>8}")
    print(f"  {'hashlib.sha256, one thread (baseline)':<44}{t_base:>9.3f}{mbps['base']:>10.0f}{1.0:>8.2f}")
    print(f"  {'verify_bundle() (Python API)':<44}{t_api:>9.3f}{mbps['api']:>10.0f}{ratio_api:>8.2f}")
    print(f"  {'airpack verify --json (CLI, with start-up)':<44}{t_cli:>9.3f}{mbps['cli']:>10.0f}{ratio_cli:>8.2f}")
    print(f"  {'  of which start-up (airpack --version)':<44}{t_start:>9.3f}")
    verdict = "meets" if ratio_api >= 1.7 else "BELOW"
    print(f"  verify / single-thread sha256 = {ratio_api:.2f}x ({verdict} the 1.7x target for 2 cores)")
    print(f"  cores busy during verify (CPU s / wall s) = {cpu_api / t_api:.2f}")
    if load > 0.5:
        print(f"  note: load average {load:.1f} on {os.cpu_count()} CPU(s) from other work; the figures are noisy")
    print()
    print("Peak memory of `airpack verify` (max RSS of a fresh process)")
    print(f"  {'bundle':<12}{'size':>10}{'peak RSS':>12}")
    print(f"  {'S':<12}{small_bytes / (1 << 30):>7.2f} GiB{rss_small / MB:>9.1f} MB")
    print(f"  {'L':<12}{large_bytes / (1 << 30):>7.2f} GiB{rss_large / MB:>9.1f} MB")
    verdict = "meets" if abs(diff_mb) <= 20 else "ABOVE"
    print(f"  difference {diff_mb:+.1f} MB ({verdict} the 20 MB target)")
    print()
    print(f"total benchmark time {time.perf_counter() - started:.0f} s")
    if a.json:
        print(json.dumps({
            "cpus": os.cpu_count(), "workers": workers, "hashed_bytes": hashed,
            "sha256_mbps": round(mbps["base"]), "verify_api_mbps": round(mbps["api"]),
            "verify_cli_mbps": round(mbps["cli"]), "ratio_api": round(ratio_api, 3), "ratio_cli": round(ratio_cli, 3),
            "cli_startup_s": round(t_start, 3), "cores_busy": round(cpu_api / t_api, 2), "load_average": round(load, 2),
            "small_bytes": small_bytes, "large_bytes": large_bytes,
            "rss_small": rss_small, "rss_large": rss_large, "rss_diff_mb": round(diff_mb, 2),
        }, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
