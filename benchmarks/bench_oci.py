"""Benchmark of the OCI transport on loopback: push, pull and install from a registry vs install from a folder (``make bench``).

In one run it:

1. writes a model folder of 256 MiB safetensors files (4 by default: 1 GiB)
   and packs it with the real pack code;
2. starts the CNCF distribution registry (Debian package docker-registry) on
   127.0.0.1 with its storage on the same filesystem, and warms the page cache;
3. times, best of ``--repeat``, each a fresh ``airpack`` process:
   - ``airpack push BUNDLE oci://...`` into a new repository (verify + send every blob);
   - the same push again (verify + HEAD each blob; nothing is sent);
   - ``airpack pull oci://... --trust`` into a new folder;
   - ``airpack install oci://... --registry NEW`` (trust check, download into
     staging, then the file install: verify, copy, fsync, commit);
   - ``airpack install BUNDLE --registry NEW`` from the folder, same run, as the baseline;
4. prints each in MB/s of bundle bytes, and install-from-registry over install-from-folder.

Everything is written under ``bench-out/`` (ignored by git) or ``--workdir``
and removed at the end unless ``--keep``. Loopback hides network limits: on a
real cluster the registry's disks and the LAN set the pace. Other load on the
machine makes the figures noisy; compare runs on a quiet machine.
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
sys.path.insert(0, str(REPO / "tests"))
MiB = 1 << 20
MB = 1_000_000

from bench_verify import add_work_args, make_sources, model_folder, pack_bundle, sha256_single_thread, work_folder  # noqa: E402

from airpack.signing import generate, load_public_file, write_keypair  # noqa: E402
from airpack.trust import new_policy, save_policy  # noqa: E402


def airpack(args: list[str]) -> float:
    """Run ``airpack ARGS`` in a fresh process; return its wall time (exit non-zero stops the benchmark)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "airpack", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"airpack {' '.join(args)} failed with exit {p.returncode}: {p.stderr}")
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file-mib", type=int, default=256, help="size of each weight file (MiB)")
    ap.add_argument("--files", type=int, default=4, help="weight files in the bundle (default 4: 1 GiB)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per method (best is kept)")
    add_work_args(ap, "files")
    a = ap.parse_args(argv)

    try:
        from oci_registry import start_registry
    except ImportError as e:
        print(f"bench_oci: skipped ({e}; run from a checkout with the test extra installed)")
        return 0
    with work_folder(a, "oci-") as work:
        try:
            reg = start_registry(work / "oci-registry")
        except BaseException as e:  # pytest.skip raises its own exception type (a BaseException)
            if type(e).__name__ != "Skipped":
                raise
            print(f"bench_oci: skipped ({e})")
            return 0
        try:
            return run(a, work, reg)
        finally:
            reg.stop()


def run(a: argparse.Namespace, work: Path, reg: object) -> int:
    host = reg.host  # type: ignore[attr-defined]
    print(f"writing {a.files} x {a.file_mib} MiB safetensors files under {os.path.relpath(work)} ...", flush=True)
    shards = make_sources(work / "shards", a.files, a.file_mib * MiB)
    model = model_folder(work / "src", shards)
    key = work / "bench.key"
    write_keypair(generate("ed25519"), key, work / "bench.pub")
    policy_path = work / "policy.json"
    save_policy(new_policy(1, source=str(policy_path)).with_key("bench", load_public_file(work / "bench.pub"),
                                                                (work / "bench.pub").read_text()), policy_path)
    bundle = pack_bundle(work, "oci", model, key)
    shutil.rmtree(work / "src")
    shutil.rmtree(work / "shards")
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    sha256_single_thread(files)  # warm the page cache
    trust = ["--trust", str(policy_path)]

    print(f"timing on {host} (best of {a.repeat}) ...", flush=True)
    t_push, t_push_again, t_pull, t_oci_install, t_dir_install = [], [], [], [], []
    for i in range(a.repeat):
        ref = f"oci://{host}/bench/r{i}:v1"
        t_push.append(airpack(["push", str(bundle), ref, "--plain-http", *trust]))
        t_push_again.append(airpack(["push", str(bundle), ref, "--plain-http", *trust]))
        out = work / f"pulled{i}"
        t_pull.append(airpack(["pull", ref, "--out", str(out), "--plain-http", *trust]))
        shutil.rmtree(out)
        node = work / f"node-oci{i}"
        t_oci_install.append(airpack(["install", ref, "--registry", str(node), "--plain-http", "--ignore-fit", *trust]))
        shutil.rmtree(node)
        node = work / f"node-dir{i}"
        t_dir_install.append(airpack(["install", str(bundle), "--registry", str(node), "--ignore-fit", *trust]))
        shutil.rmtree(node)

    def mbs(t: list[float]) -> float:
        return total / min(t) / MB

    fig = {
        "bundle_bytes": total,
        "push_MBps": round(mbs(t_push), 1),
        "push_again_s": round(min(t_push_again), 3),
        "pull_MBps": round(mbs(t_pull), 1),
        "install_from_registry_MBps": round(mbs(t_oci_install), 1),
        "install_from_folder_MBps": round(mbs(t_dir_install), 1),
        "registry_over_folder": round(min(t_dir_install) / min(t_oci_install), 3),
    }
    print(f"bundle: {total / MB:.0f} MB in {len(files)} files, registry on loopback ({host})")
    print(f"  push (verify + send)            {fig['push_MBps']:>8.1f} MB/s   {min(t_push):6.2f} s")
    print(f"  push again (verify + HEADs)     {'':>8}        {min(t_push_again):6.2f} s")
    print(f"  pull --trust                    {fig['pull_MBps']:>8.1f} MB/s   {min(t_pull):6.2f} s")
    print(f"  install oci:// (pull + install) {fig['install_from_registry_MBps']:>8.1f} MB/s   {min(t_oci_install):6.2f} s")
    print(f"  install BUNDLE (from a folder)  {fig['install_from_folder_MBps']:>8.1f} MB/s   {min(t_dir_install):6.2f} s")
    print(f"  install from the registry runs at {fig['registry_over_folder']:.2f} x the speed of install from a folder")
    if a.json:
        print(json.dumps(fig, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
