"""Benchmark of export, verify-from-parts and repair against plain ``tar``, ``split`` and ``sha256sum`` (``make bench``).

In one run, on the same bundle (default 1 GiB: four 256 MiB safetensors
shards packed with the real pack code), warm in the page cache:

1. export to one tar (``airpack export``, which also hashes every file and
   the tar) against ``tar -cf`` of the bundle folder;
2. export to parts of 128 MiB with 2 parity parts and a signed index, against
   ``tar -cf - | split -b 128M`` followed by ``sha256sum`` of the parts (what
   a courier would do by hand, with no parity);
3. ``airpack verify`` of the parts folder (streams the tar out of the parts,
   hashing every member) and ``airpack verify --parts`` (hashes every part)
   against ``cat parts | sha256sum`` and ``sha256sum parts``;
4. ``airpack repair`` after deleting one data part against ``sha256sum`` of
   the parts (repair reads k parts to rebuild one).

Each line prints MB/s (of tar bytes) and the ratio to its baseline; peak
resident memory of the export with parity is measured in a fresh process.
Everything is written under ``bench-out/`` (or ``--workdir``) and removed at
the end unless ``--keep``. Other load on the machine makes the figures noisy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
MB = 1_000_000

from airpack.ops.export import ExportOptions, export  # noqa: E402
from airpack.ops.pack import PackOptions, pack  # noqa: E402
from airpack.ops.transfer import check_parts_folder, repair_parts  # noqa: E402
from airpack.ops.verify import VerifyOptions, verify_bundle  # noqa: E402
from airpack.signing import generate, load_public_file, load_signer, write_keypair  # noqa: E402
from airpack.spec import load_spec  # noqa: E402
from airpack.trust import new_policy, save_policy  # noqa: E402


def write_safetensors(path: Path, data_bytes: int, block: bytes, seed: int) -> None:
    """A valid safetensors file with one U8 tensor of ``data_bytes`` bytes (distinct first bytes per seed)."""
    header = json.dumps({"weight": {"dtype": "U8", "shape": [data_bytes], "data_offsets": [0, data_bytes]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        first = hashlib.sha256(seed.to_bytes(8, "little")).digest()
        f.write(first)
        left = data_bytes - len(first)
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sh(cmd: str, cwd: Path) -> None:
    subprocess.run(["bash", "-c", f"set -euo pipefail; {cmd}"], cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def peak_rss_mib(argv: list[str]) -> float:
    """Peak resident memory of exactly one child process (``wait4`` rusage), in MiB."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(argv)}: {proc.stderr.read().decode() if proc.stderr else ''}")
    return usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="bundle size (default 1024)")
    ap.add_argument("--split-mib", type=int, default=128, help="part size (default 128)")
    ap.add_argument("--parity", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-out" / "transfer")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    for tool in ("tar", "split", "sha256sum", "cat"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench_transfer needs `{tool}` on PATH for its baselines")

    w: Path = args.workdir
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    try:
        shards = 4
        src = w / "src"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
        block = os.urandom(16 * MiB)
        for i in range(shards):
            write_safetensors(src / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", args.size_mib * MiB // shards, block, i)
        write_keypair(generate(), w / "k.key", w / "k.pub")
        signer = load_signer(w / "k.key")
        policy = new_policy(1).with_key("bench", load_public_file(w / "k.pub"), (w / "k.pub").read_text())
        save_policy(policy, w / "trust.json")
        (w / "spec.toml").write_text('[bundle]\nname = "bench"\nchannel = "bench"\nsequence = 1\n\n'
                                     '[[models]]\nrepo_id = "bench/model"\npath = "src"\n')
        bundle = w / "bundle"
        pack(PackOptions(spec=load_spec(w / "spec.toml"), out=bundle, signer=signer))
        sh("cat $(find bundle -type f) > /dev/null", w)  # warm the page cache

        rows: list[tuple[str, float, str, float]] = []

        def row(what: str, ours: float, base_name: str, base: float, nbytes: int) -> None:
            rows.append((what, nbytes / ours / MB, base_name, nbytes / base / MB))

        # 1. one tar
        (w / "t").mkdir()
        t_export = timed(lambda: export(ExportOptions(bundle=bundle, tar=w / "t" / "b.tar", policy=policy)))
        tar_bytes = (w / "t" / "b.tar").stat().st_size
        t_tar = timed(lambda: sh("tar -cf base.tar -C bundle .", w))
        row("export -> one tar (hashes files + tar)", t_export, "tar -cf", t_tar, tar_bytes)

        # 2. parts with parity
        split = args.split_mib * MiB
        (w / "p").mkdir()
        t_parts = timed(lambda: export(ExportOptions(bundle=bundle, tar=w / "p" / "b.tar", policy=policy, split=split,
                                                     parity=args.parity, signer=signer)))
        (w / "s").mkdir()
        t_split = timed(lambda: sh(f"tar -cf - -C bundle . | split -b {split} -d -a 4 - s/b.tar.part && sha256sum s/* > s.sums", w))
        row(f"export -> {args.split_mib} MiB parts + {args.parity} parity + index", t_parts,
            "tar | split + sha256sum", t_split, tar_bytes)

        # 3. verify from parts, and each part
        t_verify = timed(lambda: verify_bundle(VerifyOptions(bundle=w / "p", policy=policy)))
        t_cat = timed(lambda: sh("cat p/b.tar.part* | sha256sum", w))
        row("verify parts folder (stream, hash members)", t_verify, "cat parts | sha256sum", t_cat, tar_bytes)
        parts_bytes = sum(p.stat().st_size for p in (w / "p").iterdir())
        t_vparts = timed(lambda: check_parts_folder(w / "p", policy))
        t_sums = timed(lambda: sh("sha256sum p/b.tar.part* p/b.tar.parity* > /dev/null", w))
        row("verify --parts (hash every part, parallel)", t_vparts, "sha256sum parts", t_sums, parts_bytes)

        # 4. repair one lost data part
        (w / "p" / "b.tar.part0002").unlink()
        t_repair = timed(lambda: repair_parts(w / "p", policy))
        row("repair 1 lost data part (check + rebuild)", t_repair, "sha256sum parts", t_sums, parts_bytes)

        (w / "r").mkdir()
        rss = peak_rss_mib([str(Path(sys.executable).parent / "airpack"), "export", str(bundle), "--tar", str(w / "r" / "b.tar"),
                            "--split", f"{args.split_mib}MiB", "--parity", str(args.parity), "--trust", str(w / "trust.json"),
                            "--key", str(w / "k.key"), "-q"])

        print(f"\nbench_transfer: bundle {args.size_mib} MiB ({shards} shards), tar {tar_bytes / MB:.0f} MB, "
              f"parts of {args.split_mib} MiB, parity {args.parity}; {os.cpu_count()} CPU(s); page cache warm")
        print(f"{'airpack':<48} {'MB/s':>8}   {'baseline':<26} {'MB/s':>8}   ratio")
        for what, ours, base_name, base in rows:
            print(f"{what:<48} {ours:>8.0f}   {base_name:<26} {base:>8.0f}   {ours / base:5.2f}x")
        print(f"peak RSS of `airpack export --split --parity` (fresh process): {rss:.0f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    main()
