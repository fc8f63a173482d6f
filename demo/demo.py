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
from hubserver import serve  # noqa: E402

OUT = Path(os.environ.get("AIRPACK_DEMO_OUT", REPO / "demo-out")).resolve()
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


SOFTHSM_MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                   "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so")


def officer_token() -> str | None:
    """The officer's key on a SoftHSM2 token (a stand-in for a YubiKey or an HSM), as a PKCS#11 URI; None without SoftHSM2.

    The token lives in a throwaway folder under demo-out/ (its own SOFTHSM2_CONF), its PIN in a
    0600 file: the key is generated inside the token and never leaves it.
    """
    module = next((m for m in SOFTHSM_MODULES if Path(m).is_file()), None)
    if shutil.which("softhsm2-util") is None or module is None:
        print("  softhsm2 is not installed: skipping the token step, the officer signs with a key file instead "
              "(install the softhsm2 package, or run `make demo` as root, to see it)")
        return None
    folder = OUT / "softhsm"
    (folder / "tokens").mkdir(parents=True, mode=0o700)
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # for this demo's own commands only
    pin = folder / "officer.pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    print(f"$ softhsm2-util --init-token --free --label airpack --pin 1234 --so-pin 5678   (SOFTHSM2_CONF={os.path.relpath(conf, OUT)})")
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "airpack", "--pin", "1234", "--so-pin", "5678"],
                   check=True, capture_output=True)
    return f"pkcs11:token=airpack;object=officer?module-path={module}&pin-source=file:{pin}"


def delta_round_trip(reg: Path, officer: str | Path) -> None:
    """v2 changes only the tokenizer config: the host writes its profile, the packer carries only the difference."""
    step("offline host: write its profile (what it holds, no secrets); the officer reads it before it crosses")
    run("profile", "--registry", reg, "--out", OUT / "host.json", "--trust", OUT / "trust.json", "--name", "demo-host",
        "--gpu", "L4")
    run("profile", "--show", OUT / "host.json")

    step("online side: v2 (same weights, changed tokenizer config), packed for that host: only the difference is carried")
    v2 = OUT / "upstream" / "tiny-llama-v2"
    shutil.copytree(OUT / "upstream" / "tiny-llama", v2)
    cfg = v2 / "tokenizer_config.json"
    (cfg).write_text(cfg.read_text().rstrip().rstrip("}") + ', "chat_template": "{{ messages }} (v2)"}\n')
    (OUT / "spec-v2.toml").write_text(
        '[bundle]\nname = "tiny-llama"\nchannel = "tiny-llama"\nsequence = 2\n\n'
        '[[models]]\nrepo_id = "demo/tiny-llama"\npath = "upstream/tiny-llama-v2"\n'
    )
    run("pack", OUT / "spec-v2.toml", "--out", OUT / "v2", "--key", OUT / "keys" / "packer.key", "--for", OUT / "host.json")
    run("sign", OUT / "v2", "--key", officer)
    carried = sum(p.stat().st_size for p in (OUT / "v2").rglob("*") if p.is_file())
    print(f"  the delta bundle on the medium: {carried:,} bytes")

    step("offline host: verify the delta against the registry (every file it relies on hashed), install, load offline")
    run("verify", OUT / "v2", "--trust", OUT / "trust.json", "--registry", reg)
    run("install", OUT / "v2", "--registry", reg, "--trust", OUT / "trust.json", "--gpu", "L4")
    code = ("import json, os; from huggingface_hub import snapshot_download; p = snapshot_download('demo/tiny-llama'); "
            "print('v2 loaded offline:', json.load(open(os.path.join(p, 'tokenizer_config.json')))['chat_template'])")
    r = subprocess.run([sys.executable, "-c", code], cwd=OUT, text=True, capture_output=True,
                       env={**os.environ, "HF_HUB_CACHE": str(reg / "hub"), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    print(f"  {(r.stdout + r.stderr).strip()}")
    if r.returncode != 0:
        sys.exit("demo failed: the delta's snapshot did not load offline")


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    step("online side: a local Hub-compatible server holding a tiny model, two signing keys, a reviewed spec")
    make_model(OUT / "upstream" / "tiny-llama", shards=2)
    hub = serve({"demo/tiny-llama": OUT / "upstream" / "tiny-llama"}, token=None)
    print(f"  Hub-compatible server at {hub.url} (127.0.0.1 only; the real huggingface_hub client talks to it)")
    try:
        (OUT / "spec.toml").write_text(
            "[bundle]\n"
            'name = "tiny-llama"\nchannel = "tiny-llama"\nsequence = 1\n\n'
            "[[models]]\n"
            'repo_id = "demo/tiny-llama"\nrevision = "v1.0"\n\n'
            "[[targets]]\n"
            'gpu = "L4"\ncount = 1\ncontext = 2048\nruntime = "vllm"\n'
        )
        run("keygen", "packer", "--dir", OUT / "keys")
        officer: str | Path | None = officer_token()
        if officer is not None:  # the officer's key is made inside the token; only officer.pub is written
            run("keygen", "officer", "--dir", OUT / "keys", "--pkcs11", officer)
        else:
            run("keygen", "officer", "--dir", OUT / "keys", "--algorithm", "ecdsa-p256")
            officer = OUT / "keys" / "officer.key"
        run("pack", OUT / "spec.toml", "--out", OUT / "bundle", "--dry-run", "--endpoint", hub.url)
        run("pack", OUT / "spec.toml", "--out", OUT / "bundle", "--key", OUT / "keys" / "packer.key", "--endpoint", hub.url)
    finally:
        hub.stop()

    step("transfer station: the security officer co-signs after checking every byte (with the key on the token)")
    run("sign", OUT / "bundle", "--key", officer)
    run("sbom", OUT / "bundle", "--out", OUT / "tiny-llama.cdx.json")

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

    step("does it fit? (the estimate recorded at pack time, then on other GPUs)")
    run("inspect", OUT / "bundle")
    run("fit", OUT / "bundle", "--gpu", "L4", "--context", "2048")
    run("fit", OUT / "bundle", "--gpu", "600MiB", "--runtime", "transformers", expect=5)

    step("transfer station: export to 64 KiB parts with 2 parity parts and a signed parts index")
    (OUT / "media").mkdir()
    run("export", OUT / "bundle", "--tar", OUT / "media" / "tiny-llama.tar", "--split", "64KiB", "--parity", "2",
        "--trust", OUT / "trust.json", "--key", officer)
    run("verify", "--parts", OUT / "media", "--trust", OUT / "trust.json")

    step("offline host: a part is lost on the way; repair rebuilds it from parity, then install from the parts")
    (OUT / "media" / "tiny-llama.tar.part0002").unlink()
    run("verify", OUT / "media", "--trust", OUT / "trust.json", expect=3)
    run("repair", OUT / "media", "--trust", OUT / "trust.json")
    reg = OUT / "registry"
    run("install", OUT / "media", "--registry", reg, "--trust", OUT / "trust.json", "--gpu", "L4")
    run("install", OUT / "bundle", "--registry", reg, "--trust", OUT / "trust.json", "--gpu", "L4")

    step("offline host: what is installed, how to load it, and the install log")
    run("list", "--registry", reg)
    run("show", "demo/tiny-llama", "--registry", reg)
    run("log", "verify", "--registry", reg)

    step("load the model with the real huggingface_hub client and no network")
    code = (
        "import os; from huggingface_hub import snapshot_download; "
        "p = snapshot_download('demo/tiny-llama', revision='v1.0'); print(p); print(sorted(os.listdir(p)))"
    )
    print("$ HF_HUB_CACHE=registry/hub HF_HUB_OFFLINE=1 python -c \"from huggingface_hub import snapshot_download; ...\"", flush=True)
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=OUT, text=True, capture_output=True,
        env={**os.environ, "HF_HUB_CACHE": str(reg / "hub"), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"},
    )
    for line in (r.stdout + r.stderr).rstrip().splitlines():
        print(f"  {os.path.relpath(line, OUT) if line.startswith(str(OUT)) else line}")
    if r.returncode != 0:
        sys.exit("demo failed: the installed model did not load offline")

    step("for the reviewers: the audit report of the bundle (verified, against what is installed) and of the registry")
    run("report", OUT / "bundle", "--trust", OUT / "trust.json", "--registry", reg, "--out", OUT / "report.html")
    run("report", "--registry", reg, "--out", OUT / "registry-report.html")
    print(f"  open {os.path.relpath(OUT / 'report.html')} and {os.path.relpath(OUT / 'registry-report.html')} in any browser, "
          "or print them (A4)")

    delta_round_trip(reg, officer)

    print(f"\ndemo finished: everything above ran for real; files are in {os.path.relpath(OUT)}/")


if __name__ == "__main__":
    main()
