"""`make demo`: a whole airpack round trip on a tiny model the demo builds itself.

Each step runs the real `airpack` command line and prints it first, so the
output reads like a runbook. Everything is written under demo-out/.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from factories import make_model  # noqa: E402

OUT = REPO / "demo-out"
AIRPACK = str(Path(sys.executable).parent / "airpack")


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(*args: str | os.PathLike[str], expect: int = 0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [os.path.relpath(a, OUT) if isinstance(a, Path) else str(a) for a in args]
    print(f"$ airpack {shlex.join(argv)}", flush=True)
    r = subprocess.run([AIRPACK, *argv], cwd=OUT, text=True, capture_output=True, env={**os.environ, **(env or {})})
    for line in (r.stdout + r.stderr).rstrip().splitlines():
        print(f"  {line}")
    if r.returncode != expect:
        print(f"demo failed: exit code {r.returncode}, expected {expect}", file=sys.stderr)
        sys.exit(1)
    if expect:
        print(f"  (refused with exit code {r.returncode}, as it should be)")
    return r


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    step("online side: a tiny model, two signing keys, a reviewed spec")
    make_model(OUT / "models" / "tiny-llama", shards=2)
    (OUT / "spec.toml").write_text(
        "[bundle]\n"
        'name = "tiny-llama"\nchannel = "tiny-llama"\nsequence = 1\n\n'
        "[[models]]\n"
        'repo_id = "demo/tiny-llama"\npath = "models/tiny-llama"\nlicense = "apache-2.0"\n\n'
        "[[targets]]\n"
        'gpu = "L4"\ncount = 1\ncontext = 2048\nruntime = "transformers"\n'
    )
    run("keygen", "packer", "--dir", OUT / "keys")
    run("keygen", "officer", "--dir", OUT / "keys", "--algorithm", "ecdsa-p256")
    run("pack", OUT / "spec.toml", "--out", OUT / "bundle", "--key", OUT / "keys" / "packer.key")

    step("transfer station: the security officer co-signs after checking every byte")
    run("sign", OUT / "bundle", "--key", OUT / "keys" / "officer.key")

    step("offline host: its own trust policy (two distinct signers required), then verify")
    run("trust", "init", OUT / "trust.json", "--threshold", "2")
    run("trust", "add", OUT / "trust.json", OUT / "keys" / "packer.pub", "--name", "packer")
    run("trust", "add", OUT / "trust.json", OUT / "keys" / "officer.pub", "--name", "officer")
    run("verify", OUT / "bundle", "--trust", OUT / "trust.json")

    step("a tampered copy is refused")
    shutil.copytree(OUT / "bundle", OUT / "tampered")
    weights = sorted((OUT / "tampered").glob("models/*/*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    (OUT / "tampered" / "models" / "demo--tiny-llama" / "evil.py").write_text("import os\n")
    run("verify", OUT / "tampered", "--trust", OUT / "trust.json", expect=3)

    print("\ndemo finished: everything above ran for real; files are in demo-out/")


if __name__ == "__main__":
    main()
