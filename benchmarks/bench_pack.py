"""Benchmark of ``airpack pack`` from a Hub: throughput against copying the same bytes locally (``make bench``).

In one run it:

1. writes a model folder (config.json and ``--files`` safetensors files,
   ``--size-mib`` in all) and serves it from the Hub-compatible test server
   on 127.0.0.1, in its own process (``python -m tests.hubserver``: LFS
   files answered with a redirect to a second "CDN" port, as the Hub does);
2. reads the folder once so every run below starts from the page cache;
3. times, on the same bytes: ``pack`` from the server (the real
   huggingface_hub client over HTTP, airpack hashing every byte),
   ``pack`` from the local folder (copy and hash), and a plain copy of the
   files (``copyfile`` + ``fsync``, no hashing);
4. prints each in MB/s and the ratios hub/local-pack and hub/plain-copy.

Everything is written under ``bench-out/`` (ignored by git) or ``--workdir``
and removed at the end unless ``--keep``. Loopback HTTP shares the CPU with
hashing, so the figures depend on the machine; compare runs on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 1_000_000
MiB = 1 << 20

from airpack.ops.pack import PackOptions, PackResult, pack  # noqa: E402
from airpack.signing import generate, load_signer, write_keypair  # noqa: E402
from airpack.spec import load_spec  # noqa: E402


def write_safetensors(path: Path, data_bytes: int, seed: int) -> None:
    """A valid safetensors file with one U8 tensor of ``data_bytes`` pseudo-random bytes (each MiB distinct)."""
    header = json.dumps(
        {"__metadata__": {"format": "pt"}, "weight": {"dtype": "U8", "shape": [data_bytes], "data_offsets": [0, data_bytes]}},
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)
    block = bytearray(random.Random(seed).randbytes(MiB))
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        left, i = data_bytes, 0
        while left:
            n = min(left, MiB)
            block[:8] = i.to_bytes(8, "little")
            f.write(block[:n])
            left, i = left - n, i + 1


def make_model(folder: Path, total: int, files: int) -> Path:
    folder.mkdir(parents=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "torch_dtype": "uint8"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    per = total // files
    for i in range(files):
        write_safetensors(folder / f"model-{i + 1:05d}-of-{files:05d}.safetensors", per, seed=i)
    return folder


def durable_copy(src: Path, dst: Path) -> None:
    """cp then fsync: what pack does for each file, minus the hashing (pack fsyncs every file too)."""
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def warm(folder: Path) -> int:
    n = 0
    for p in sorted(folder.iterdir()):
        with open(p, "rb", buffering=0) as f:
            while b := f.read(8 * MiB):
                n += len(b)
    return n


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="total size of the model (default 1024)")
    ap.add_argument("--files", type=int, default=4, help="number of safetensors files (default 4)")
    ap.add_argument("--workers", type=int, default=None, help="parallel downloads/copies (default: airpack's)")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-out")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pack-", dir=args.workdir))
    try:
        src = make_model(work / "src" / "bench" / "model", args.size_mib * MiB, args.files)
        write_keypair(generate("ed25519"), work / "k.key", work / "k.pub", passphrase=None)
        signer = load_signer(work / "k.key", passphrase=None)
        (work / "hub.toml").write_text('[bundle]\nname = "bench"\nsequence = 1\n\n'
                                       '[[models]]\nrepo_id = "bench/model"\nrevision = "main"\n')
        (work / "local.toml").write_text('[bundle]\nname = "bench"\nsequence = 1\n\n'
                                         '[[models]]\nrepo_id = "bench/model"\npath = "src/bench/model"\n')
        total = warm(src)
        # The Hub runs in its own process (as a remote Hub would): it does not share airpack's interpreter.
        server = subprocess.Popen([sys.executable, "-m", "tests.hubserver", "--repo", f"bench/model={src}"],
                                  cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            url = server.stdout.readline().strip()
            if not url.startswith("http://127.0.0.1:"):
                raise SystemExit(f"the test Hub did not start (said {url!r})")
            results: dict[str, PackResult] = {}
            t_hub = timed(lambda: results.update(hub=pack(PackOptions(
                spec=load_spec(work / "hub.toml"), out=work / "from-hub", signer=signer, endpoint=url,
                workers=args.workers))))
        finally:
            server.terminate()
            server.wait(timeout=30)
        t_local = timed(lambda: results.update(local=pack(PackOptions(
            spec=load_spec(work / "local.toml"), out=work / "from-local", signer=signer, workers=args.workers))))
        (work / "plain").mkdir()
        t_copy = timed(lambda: [durable_copy(p, work / "plain" / p.name) for p in sorted(src.iterdir())])
        digests = [{f.path: f.sha256 for f in r.manifest.files}  # type: ignore[union-attr]
                   for r in (results["hub"], results["local"])]
        same = all(digests[0].get(p) == d for p, d in digests[1].items() if p.startswith("models/"))

        def rate(t: float) -> float:
            return total / t / MB

        print(f"pack throughput, {total / MB:.0f} MB in {args.files} safetensors files + config.json "
              f"({os.cpu_count()} CPUs, workers {args.workers or 'default'}):")
        print(f"  pack from Hub server (HTTP 127.0.0.1, CDN redirect, hashed): {rate(t_hub):8.1f} MB/s  ({t_hub:.2f} s)")
        print(f"  pack from local folder (copy + hash):                       {rate(t_local):8.1f} MB/s  ({t_local:.2f} s)")
        print(f"  plain copy (copyfile + fsync, no hash):                     {rate(t_copy):8.1f} MB/s  ({t_copy:.2f} s)")
        print(f"  ratio hub / local pack: {t_local / t_hub:.2f}   hub / plain copy: {t_copy / t_hub:.2f}")
        print(f"  both bundles hold the same sha256s: {same}")
        print(json.dumps({"bench": "pack", "bytes": total, "hub_mb_s": round(rate(t_hub), 1),
                          "local_pack_mb_s": round(rate(t_local), 1), "copy_mb_s": round(rate(t_copy), 1),
                          "ratio_hub_local": round(t_local / t_hub, 3)}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
