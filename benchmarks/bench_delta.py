"""Benchmark of delta bundles (``pack --for``): bytes carried and install time against the full bundle (``make bench``).

In one run it:

1. writes v1 of a model (``--files`` x ``--file-mib`` safetensors shards, 1 GiB
   by default, plus a ``--changed-mb`` (10 MB) ``tokenizer.json``), packs it
   and installs it into two registries with the real code;
2. writes v2, whose only change is that one file, and packs it twice: the full
   bundle, and a delta for the profile of the v1 registry;
3. prints the bytes each bundle carries (every file in its folder, envelope and
   manifest copy included) and checks the goal: the delta carries at most
   1.01 x the changed bytes plus the manifest;
4. times, best of ``--repeat`` (v2 removed again after each), the install of
   the full bundle and of the delta into a registry holding v1, and of the full
   bundle into an empty registry. Into a registry holding v1, the full install
   links the blobs the database says it holds without reading them (only the
   changed file is read from the medium); the delta must not take the
   database's word for the files it relies on, so it hashes every one of them
   again from the registry's disk: that re-hash (about one read of the model)
   is the delta's cost, and it is still far below copying the full bundle.

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

from bench_verify import add_work_args, make_sources, work_folder  # noqa: E402

from airpack.manifest import MANIFEST_NAME  # noqa: E402
from airpack.ops.install import InstallOptions, install  # noqa: E402
from airpack.ops.manage import RemoveOptions, remove  # noqa: E402
from airpack.ops.pack import PackOptions, pack  # noqa: E402
from airpack.ops.profile import ProfileOptions, collect  # noqa: E402
from airpack.signing import generate, load_public_file, load_signer, write_keypair  # noqa: E402
from airpack.spec import load_spec  # noqa: E402
from airpack.trust import TrustPolicy, new_policy, save_policy  # noqa: E402


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def model(root: Path, shards: list[Path], changed: bytes) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    for s in shards:
        os.link(s, root / s.name)
    (root / "tokenizer.json").write_bytes(changed)
    return root


def spec(work: Path, name: str, src: Path, sequence: int) -> Path:
    p = work / f"{name}.toml"
    p.write_text(f'[bundle]\nname = "bench"\nchannel = "bench"\nsequence = {sequence}\n\n'
                 f'[[models]]\nrepo_id = "bench/model"\npath = "{os.path.relpath(src, work)}"\n')
    return p


def tokenizer(n: int, tag: str) -> bytes:
    """A JSON file of ``n`` bytes (what a tokenizer.json is), different per ``tag``."""
    head, tail = b'{"version": "' + tag.encode() + b'", "pad": "', b'"}\n'
    return head + b"a" * (n - len(head) - len(tail)) + tail


def timed_install(bundle: Path, reg: Path, policy: TrustPolicy) -> float:
    t = time.perf_counter()
    install(InstallOptions(bundle=bundle, registry=reg, policy=policy, ignore_fit=True))
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--file-mib", type=int, default=256)
    ap.add_argument("--changed-mb", type=int, default=10, help="size of the one file the update changes (MB)")
    ap.add_argument("--repeat", type=int, default=3)
    add_work_args(ap, "models, bundles and registries")
    a = ap.parse_args()
    with work_folder(a, "delta-") as work:
        print(f"writing v1: {a.files} x {a.file_mib} MiB shards + a {a.changed_mb} MB tokenizer.json ...", flush=True)
        shards = make_sources(work / "shards", a.files, a.file_mib * MiB)
        changed = a.changed_mb * MB
        v1 = model(work / "v1", shards, tokenizer(changed, "1"))
        v2 = model(work / "v2", shards, tokenizer(changed, "2"))
        key = work / "bench.key"
        write_keypair(generate("ed25519"), key, work / "bench.pub")
        policy_path = work / "policy.json"
        save_policy(new_policy(1, source=str(policy_path)).with_key("bench", load_public_file(work / "bench.pub"),
                                                                    (work / "bench.pub").read_text()), policy_path)
        from airpack.trust import load_policy

        policy, signer = load_policy(policy_path), load_signer(key)
        b1 = pack(PackOptions(spec=load_spec(spec(work, "v1", v1, 1)), out=work / "b1", signer=signer)).out
        regs = [work / "reg-full", work / "reg-delta"]
        for reg in regs:
            install(InstallOptions(bundle=b1, registry=reg, policy=policy, ignore_fit=True))
        profile = collect(ProfileOptions(registry=regs[0]))
        full = pack(PackOptions(spec=load_spec(spec(work, "v2", v2, 2)), out=work / "full", signer=signer))
        delta = pack(PackOptions(spec=load_spec(spec(work, "v2d", v2, 2)), out=work / "delta", signer=signer, profile=profile))
        full_bytes, delta_bytes = folder_bytes(full.out), folder_bytes(delta.out)
        manifest_bytes = (delta.out / MANIFEST_NAME).stat().st_size
        goal = 1.01 * changed + manifest_bytes
        assert delta.manifest is not None
        relied = sum(f.size for f in delta.manifest.expected_on_host)
        print(f"full bundle:  {full_bytes:>14,} bytes carried")
        print(f"delta bundle: {delta_bytes:>14,} bytes carried ({delta_bytes / full_bytes:.2%} of the full bundle); "
              f"{relied:,} bytes left on the host")
        print(f"goal: delta <= 1.01 x {changed:,} changed bytes + {manifest_bytes:,} manifest = {goal:,.0f}: "
              f"{'MET' if delta_bytes <= goal else 'NOT MET'} ({delta_bytes / (changed + manifest_bytes):.4f} x)")

        times: dict[str, float] = {}
        for i in range(a.repeat):
            for name, bundle, reg in (("full", full.out, regs[0]), ("delta", delta.out, regs[1])):
                t = timed_install(bundle, reg, policy)
                times[name] = min(times.get(name, t), t)
                remove(RemoveOptions(registry=reg, name="bench/model", revision=delta.manifest.models[0].commit))
            fresh = work / f"reg-empty-{i}"
            t = timed_install(full.out, fresh, policy)
            times["empty"] = min(times.get("empty", t), t)
            shutil.rmtree(fresh)
        mbps = relied / times["delta"] / MB
        print(f"install into a registry holding v1: full {times['full']:.2f} s (shared blobs linked, not read), "
              f"delta {times['delta']:.2f} s: it re-hashed the {relied:,} bytes of registry files it relies on "
              f"({mbps:.0f} MB/s); the full bundle into an empty registry: {times['empty']:.2f} s")
        if a.json:
            print(json.dumps({"full_bytes": full_bytes, "delta_bytes": delta_bytes, "changed_bytes": changed,
                              "manifest_bytes": manifest_bytes, "goal_met": delta_bytes <= goal, "relied_bytes": relied,
                              "install_full_s": round(times["full"], 3), "install_delta_s": round(times["delta"], 3),
                              "install_full_empty_s": round(times["empty"], 3)}))
        shutil.rmtree(work / "shards", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
