"""Benchmark of ``airpack pack`` from a Hub against ``aria2c``, its peak memory, and its resume after SIGKILL (``make bench``).

In one run it:

1. writes a multi-file model (config.json, generation_config.json, a
   tokenizer.json, a safetensors index and ``--shards`` safetensors shards, the
   first one ``--big-gib`` GiB, default 2, the others ``--shard-mib``, default
   512: 4.5 GiB in 11 files with the .gitattributes) and serves it from the test Hub
   (``python -m tests.hubserver``) in its own process, with LFS files
   redirected to a real nginx on 127.0.0.1 as the CDN origin (``--cdn nginx``,
   the default; plain files through the Hub's ``/api/resolve-cache``);
2. times, best of ``--repeat`` and in turns, ``airpack pack`` in a fresh
   process (``--connections``, default 16) and ``aria2c -x 16 -s 16 -k 1M
   --file-allocation=none`` fetching the same files from the same servers (the
   final CDN URLs of LFS files and the resolve-cache URLs of plain files, one
   input file) into the same filesystem, all from a warm page cache; prints
   MB/s for each and the ratio pack / aria2 (goal: >= 0.9). pack fsyncs every
   file and aria2 does not, so "aria2 + fsync" (fsync of aria2's files after it
   exits) is shown too. aria2's files are checked against the Hub's sha256
   (untimed);
3. reports the peak RSS of the pack process (``wait4`` rusage of exactly that
   child) next to the largest file's size: memory must not grow with it;
4. starts a pack again, SIGKILLs it when it has written 50% of the model's
   bytes (``/proc/PID/io`` ``wchar``) and one weight file is in place, drops the
   complete files from the page cache, reruns the same command and reports the
   resumed run's seconds, the bytes fetched again beyond what was missing
   (servers' access logs: nginx ``$body_bytes_sent`` plus the Hub's request
   log; goal <= 1% of the model), and whether any file that was already
   complete at the kill was read again (``mincore``: how much of it is back in
   the page cache after the rerun; goal: none);
5. prints a table and, with ``--json``, one JSON line of the figures.

``--quick`` shrinks everything to a few MiB: a smoke test of the benchmark
itself, not a measurement. Everything is written under ``bench-out/``
(ignored by git) or ``--workdir`` and removed at the end unless ``--keep``.
Loopback HTTP shares the CPUs with hashing, so the figures depend on the
machine; compare runs on a quiet one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
MB = 1_000_000
MiB = 1 << 20
GiB = 1 << 30
REPO_ID = "bench/model"
ARIA2 = ["-x", "16", "-s", "16", "-k", "1M", "--file-allocation=none"]

from bench_verify import add_work_args, work_folder  # noqa: E402
from pack_probe import Run, evict, log_offsets, resident_bytes, run_probed, served_bytes  # noqa: E402

from airpack.manifest import ENVELOPE_NAME, model_slug  # noqa: E402
from airpack.signing import generate, write_keypair  # noqa: E402


@dataclass(frozen=True)
class SrcFile:
    """A file of the repo as the Hub lists it: the digest a download must match is the Hub's, not ours."""

    path: str
    size: int
    sha256: str | None  # the LFS oid, for LFS files
    git_sha1: str  # the git blob id (of the pointer, for LFS files)


# -- the model --------------------------------------------------------------------------


def _safetensors(path: Path, data_bytes: int, seed: int) -> None:
    """A valid safetensors file of one U8 tensor; every MiB differs (a counter in it), so no two ranges are alike."""
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "weight": {"dtype": "U8", "shape": [data_bytes], "data_offsets": [0, data_bytes]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    block = bytearray(random.Random(seed).randbytes(MiB))
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        left, i = data_bytes, 0
        while left:
            n = min(left, MiB)
            block[:8] = i.to_bytes(8, "little")
            f.write(memoryview(block)[:n])
            left, i = left - n, i + 1


def _tokenizer(path: Path, approx: int) -> None:
    """A tokenizer.json-shaped text file (compressible, as real ones are; the Hub may gzip it)."""
    rng = random.Random(7)
    vocab: dict[str, int] = {}
    size = 0
    while size < approx:
        tok = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz\u0120") for _ in range(rng.randint(2, 9)))
        if tok not in vocab:
            vocab[tok] = len(vocab)
            size += len(tok) + 12
    doc = {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": []}
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")


def make_model(folder: Path, *, big: int, shard: int, shards: int, tokenizer: int) -> None:
    """config, generation config, tokenizer, safetensors index and ``shards`` shards, the first ``big`` bytes."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "torch_dtype": "uint8"}, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    _tokenizer(folder / "tokenizer.json", tokenizer)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": big + shard * (shards - 1)},
         "weight_map": {f"layer{i}.weight": n for i, n in enumerate(names)}}, indent=2))
    for i, name in enumerate(names):
        _safetensors(folder / name, big if i == 0 else shard, seed=i)


def hub_listing(hub_url: str) -> list[SrcFile]:
    """Every file of the repo at main, with the Hub's digests (its tree listing, as pack reads it)."""
    with _opener().open(f"{hub_url}/api/models/{REPO_ID}/tree/main?recursive=true", timeout=30) as r:
        entries = json.loads(r.read(16 * MiB))
    return [SrcFile(path=e["path"], size=e["size"], sha256=(e.get("lfs") or {}).get("oid"), git_sha1=e["oid"])
            for e in entries if e.get("type") == "file"]


# -- the servers ------------------------------------------------------------------------


@dataclass
class Hub:
    proc: subprocess.Popen[str]
    url: str
    cdn: str  # "nginx" or "builtin"
    hub_log: Path
    nginx_log: Path | None


def _nginx_available() -> bool:
    sys.path.insert(0, str(REPO / "tests"))
    from nginx_cdn import NginxCDN
    return bool(NginxCDN.available())


def start_hub(work: Path, src: Path, cdn: str) -> Hub:
    """The test Hub in its own process (as a remote Hub would be); nginx as its CDN when asked and available."""
    hub_log = work / "hub-requests.jsonl"
    cmd = [sys.executable, "-m", "tests.hubserver", "--repo", f"{REPO_ID}={src}", "--log", str(hub_log)]
    if cdn == "nginx" and not _nginx_available():
        print("note: nginx is not installed here: the CDN is the test Hub's built-in Python server", file=sys.stderr)
        cdn = "builtin"
    if cdn == "nginx":
        cmd += ["--cdn", "nginx"]
    (work / "tmp").mkdir()  # the server's blob folder for nginx: hard links to the model on the same filesystem
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(work / "tmp")})
    assert proc.stdout is not None and proc.stderr is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise SystemExit(f"the test Hub did not start (said {url!r}): {proc.stderr.read()[-2000:]}")
    nginx_log: list[Path] = []
    seen = threading.Event()

    def read_stderr() -> None:  # keep draining, or the server blocks on a full pipe
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.strip().startswith("cdn-access-log:"):
                nginx_log.append(Path(line.split(":", 1)[1].strip()))
            elif line.startswith(f"  {REPO_ID} "):  # the last line it prints at start-up
                seen.set()

    threading.Thread(target=read_stderr, daemon=True).start()
    seen.wait(timeout=10)
    return Hub(proc=proc, url=url, cdn=cdn, hub_log=hub_log, nginx_log=nginx_log[0] if nginx_log else None)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _opener(*handlers: urllib.request.BaseHandler) -> urllib.request.OpenerDirector:
    """urllib without the environment's proxies: every server here is on 127.0.0.1."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), *handlers)


def final_urls(hub_url: str, files: list[SrcFile]) -> dict[str, str]:
    """Where each file's bytes really come from: follow the Hub's redirects with HEAD until another origin or a 200."""
    opener = _opener(_NoRedirect())
    hub_origin = urlsplit(hub_url)[:2]
    out: dict[str, str] = {}
    for f in files:
        url = f"{hub_url}/{REPO_ID}/resolve/main/{quote(f.path)}"
        for _ in range(5):
            try:
                with opener.open(urllib.request.Request(url, method="HEAD"), timeout=30) as r:
                    r.read()
                break  # a 200: the bytes are served here
            except urllib.error.HTTPError as e:
                if e.code not in (301, 302, 303, 307, 308):
                    raise SystemExit(f"HEAD {url} answered {e.code}") from None
                url = urljoin(url, e.headers["Location"])
                if urlsplit(url)[:2] != hub_origin:
                    break  # the CDN's URL
        out[f.path] = url
    return out


# -- the runs ---------------------------------------------------------------------------


def _env(work: Path) -> dict[str, str]:
    """No token, endpoint, connection count, proxy or Hub cache of the person running it: only 127.0.0.1 is reached."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "AIRPACK_")) and not k.lower().endswith("_proxy")}
    env.update(HF_HOME=str(work / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO))
    return env


def pack_cmd(work: Path, hub: Hub, out: Path, connections: int) -> list[str]:
    return [sys.executable, "-m", "airpack", "pack", str(work / "bench.toml"), "--out", str(out),
            "--key", str(work / "k.key"), "--endpoint", hub.url, "--json", "--connections", str(connections)]


def hub_figures(doc: dict[str, object] | None) -> dict[str, object] | None:
    """The totals of ``pack --json``'s ``"hub"`` object (``ops.pack.hub_totals``), without the per-model list."""
    hub = doc.get("hub") if doc else None
    return {k: v for k, v in hub.items() if k != "models"} if isinstance(hub, dict) else None


def checked(run: Run, what: str) -> Run:
    if run.returncode != 0:
        raise SystemExit(f"{what} failed with exit {run.returncode}:\n{run.stderr[-3000:]}{run.stdout[-2000:]}")
    return run


def matches_hub(path: Path, f: SrcFile) -> bool:
    """The Hub's own check: SHA-256 against the LFS oid, or the git blob SHA-1 for plain files."""
    if not path.is_file() or path.stat().st_size != f.size:
        return False
    h = hashlib.sha256() if f.sha256 else hashlib.sha1(b"blob %d\0" % f.size, usedforsecurity=False)
    with open(path, "rb", buffering=0) as fh:
        while b := fh.read(8 * MiB):
            h.update(b)
    return h.hexdigest() == (f.sha256 or f.git_sha1)


def mismatches(folder: Path, files: list[SrcFile]) -> list[str]:
    """Files under ``folder`` that are missing or do not hash to the Hub's digest."""
    return [f.path for f in files if not matches_hub(folder / f.path, f)]


def aria2_run(work: Path, env: dict[str, str], urls: dict[str, str], dest: Path) -> tuple[Run, float]:
    """aria2c on the same URLs into ``dest``; also how long fsyncing its files afterwards takes (pack fsyncs)."""
    listing = work / "aria2-input.txt"
    listing.write_text("".join(f"{u}\n  out={p}\n" for p, u in urls.items()))
    cmd = ["aria2c", *ARIA2, "-i", str(listing), "-d", str(dest), "--console-log-level=warn", "--summary-interval=0",
           "--download-result=hide", "--auto-file-renaming=false", "--allow-overwrite=true", "--quiet=true"]
    run = checked(run_probed(cmd, env=env, cwd=work, logs=work / "logs-aria2"), "aria2c")
    t = time.perf_counter()
    for p in urls:
        fd = os.open(dest / p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return run, time.perf_counter() - t


REREAD_SLACK = 64 * 1024  # a complete file of which more came back into the cache was read again, not just sniffed


@dataclass
class Resume:
    killed_at: int  # bytes the first run had written when killed (wchar)
    complete_at_kill: dict[str, int]  # files already in place at the kill: path -> size
    still_cached: int  # bytes of them the eviction could not drop
    read_back: dict[str, int]  # path -> bytes of it in the page cache after the rerun
    rerun: Run
    served_rerun: int | None
    served_total: int | None
    bad: list[str]  # files of the resumed bundle that do not hash to the Hub's digest


def resume_run(work: Path, hub: Hub, env: dict[str, str], total: int, files: list[SrcFile],
               connections: int) -> Resume | None:
    """Pack, SIGKILL at 50% of the bytes written, evict the complete files from the cache, rerun, see what came back.

    The kill waits, past 50%, until one weight file is in place (complete and
    verified) and then 1% of the model more has been written: without a complete
    file the rerun could not show whether complete files are read again, and
    killing in the instant a file appears would always land between its rename
    and its journal line, a window a real crash almost never hits. The report
    says where the kill really fell. None when the pack finished before the kill.
    """
    out = work / "resume-out"
    before = log_offsets(hub.nginx_log, hub.hub_log)
    cmd = pack_cmd(work, hub, out, connections)
    model = out.joinpath(*model_slug(REPO_ID).split("/"))
    weights = [model / f.path for f in files if f.sha256 is not None]

    seen_at: list[int] = []  # bytes written when the first weight file was seen in place

    def one_in_place(wrote: int) -> bool:
        if not seen_at and any(p.exists() for p in weights):
            seen_at.append(wrote)
        return bool(seen_at) and wrote >= seen_at[0] + total // 100

    killed = run_probed(cmd, env=env, cwd=work, logs=work / "logs-killed", kill_at=total // 2, kill_when=one_in_place)
    if not killed.killed:
        checked(killed, "pack (to be killed)")
        return None
    if (out / ENVELOPE_NAME).exists():  # the kill came after the signature: the pack had finished
        return None
    complete = {f.path: f.size for f in files if (model / f.path).is_file() and (model / f.path).stat().st_size == f.size}
    still = sum(evict(model / p) for p in complete)
    middle = log_offsets(hub.nginx_log, hub.hub_log)
    rerun = checked(run_probed(cmd, env=env, cwd=work, logs=work / "logs-rerun"), "resumed pack")
    read_back = {p: resident_bytes(model / p) for p in complete}
    end = log_offsets(hub.nginx_log, hub.hub_log)
    return Resume(killed_at=killed.wchar, complete_at_kill=complete, still_cached=still, read_back=read_back,
                  rerun=rerun,
                  served_rerun=served_bytes(hub.nginx_log, hub.hub_log, since=middle, until=end),
                  served_total=served_bytes(hub.nginx_log, hub.hub_log, since=before, until=end),
                  bad=mismatches(model, files))


# -- the report -------------------------------------------------------------------------


def _mb_s(n: int, s: float) -> float:
    return n / s / MB if s > 0 else 0.0


def _row(label: str, value: str) -> None:
    print(f"  {label:<56} {value}")


def report(a: argparse.Namespace, hub: Hub, files: list[SrcFile], t_pack: float, t_aria: float, t_sync: float,
           rss: int, figs: dict[str, object] | None, aria_bad: list[str], pack_bad: list[str],
           res: Resume | None, connections: int) -> dict[str, object]:
    total = sum(f.size for f in files)
    big = max(f.size for f in files)
    ratio, ratio_sync = t_aria / t_pack, (t_aria + t_sync) / t_pack
    print(f"pack from the test Hub, {len(files)} files, {total / MB:.0f} MB (largest {big / GiB:.2f} GiB), "
          f"CDN {hub.cdn}, {os.cpu_count()} CPUs, best of {a.repeat}:")
    _row(f"airpack pack --connections {connections} (hashed, fsynced)",
         f"{_mb_s(total, t_pack):8.1f} MB/s  ({t_pack:.2f} s)")
    fetch_s = figs.get("seconds") if figs else None
    if isinstance(fetch_s, (int, float)) and fetch_s > 0:
        _row("  of which its download phase (its \"hub\" seconds)", f"{_mb_s(total, fetch_s):8.1f} MB/s  ({fetch_s:.2f} s)")
    _row(f"aria2c {' '.join(ARIA2)}", f"{_mb_s(total, t_aria):8.1f} MB/s  ({t_aria:.2f} s)")
    _row("aria2c, then fsync of its files", f"{_mb_s(total, t_aria + t_sync):8.1f} MB/s  ({t_aria + t_sync:.2f} s)")
    _row("ratio pack / aria2 (goal >= 0.9)", f"{ratio:8.2f}   (pack / (aria2 + fsync): {ratio_sync:.2f})")
    _row("files match the Hub's digests", f"aria2: {not aria_bad}{' ' + str(aria_bad) if aria_bad else ''}   "
                                          f"pack: {not pack_bad}{' ' + str(pack_bad) if pack_bad else ''}")
    _row("peak RSS of pack (largest file)", f"{rss / MiB:8.0f} MiB ({big / MiB:.0f} MiB)")
    _row("engine's own figures (pack --json \"hub\")", json.dumps(figs) if figs else "n/a")
    doc: dict[str, object] = {
        "bench": "pack", "cdn": hub.cdn, "files": len(files), "bytes": total, "largest_bytes": big,
        "connections": connections, "pack_seconds": round(t_pack, 3), "pack_mb_s": round(_mb_s(total, t_pack), 1),
        "aria2_seconds": round(t_aria, 3), "aria2_mb_s": round(_mb_s(total, t_aria), 1),
        "aria2_fsync_seconds": round(t_sync, 3), "ratio_pack_aria2": round(ratio, 3),
        "ratio_pack_aria2_fsync": round(ratio_sync, 3), "aria2_digests_match": not aria_bad,
        "pack_digests_match": not pack_bad, "pack_max_rss": rss, "hub": figs,
    }
    if res is not None:
        doc.update(report_resume(res, total, t_pack))
    elif not a.no_resume:
        print("resume: the pack finished before the kill point; nothing to resume (use a bigger model)")
        doc["resume_killed"] = False
    return doc


def report_resume(res: Resume, total: int, t_pack: float) -> dict[str, object]:
    """The resume figures; which evidence each rests on is printed with it."""
    refigs = hub_figures(res.rerun.json_doc())
    missing = total - res.killed_at  # what the killed run had not written (its wchar: bytes it wrote, all files)
    fetched, source = res.served_rerun, "the servers' access logs"
    if fetched is None:
        fetched, source = res.rerun.wchar, "bytes the rerun wrote (wchar); the servers keep no log"
    again = max(0, fetched - missing)
    complete_bytes = sum(res.complete_at_kill.values())
    read_back = sum(res.read_back.values())
    reread = sorted(p for p, n in res.read_back.items() if n > REREAD_SLACK)
    print(f"resume after SIGKILL at {res.killed_at / total:.0%} of the bytes written (50%, or 1% after the "
          f"first weight file was in place), same command again:")
    _row("resumed run (a whole pack)", f"{res.rerun.seconds:8.2f} s    ({t_pack:.2f} s)")
    _row("peak RSS of the resumed run", f"{res.rerun.max_rss / MiB:8.0f} MiB")
    _row(f"fetched by the rerun ({source})", f"{fetched / MB:8.1f} MB")
    _row("missing at the kill (model - bytes the killed run wrote)", f"{missing / MB:8.1f} MB")
    _row("fetched again beyond that (goal <= 1% of the model)",
         f"{again / MB:8.1f} MB = {100 * again / total:.2f}%")
    if res.served_total is not None:
        _row("served over both runs (incl. socket buffers at the kill)",
             f"{res.served_total / MB:8.1f} MB for {total / MB:.1f} MB")
    _row("complete at the kill, evicted from the page cache",
         f"{len(res.complete_at_kill):8d} files, {complete_bytes / MB:.1f} MB ({res.still_cached / MiB:.1f} MiB stayed)")
    _row("of them back in the page cache after the rerun (mincore)", f"{read_back / 1024:8.0f} KiB")
    _row(f"complete files read again (> {REREAD_SLACK // 1024} KiB back; goal 0)",
         f"{len(reread):8d}{' ' + str(reread) if reread else ''}" if res.complete_at_kill
         else "n/a: no file was complete at the kill")
    _row("read from storage by the rerun (/proc read_bytes)", f"{res.rerun.read_bytes / MB:8.1f} MB")
    _row("the resumed bundle matches the Hub's digests", f"{not res.bad}{' ' + str(res.bad) if res.bad else ''}")
    _row("engine's own figures for the rerun", json.dumps(refigs) if refigs else "n/a")
    return {"resume_killed": True, "resume_killed_at_bytes": res.killed_at,
            "resume_seconds": round(res.rerun.seconds, 3), "resume_fetched_bytes": fetched,
            "resume_fetched_source": source, "resume_refetched_bytes": again,
            "resume_refetched_pct": round(100 * again / total, 3),
            "resume_served_total_bytes": res.served_total, "resume_complete_at_kill": len(res.complete_at_kill),
            "resume_complete_bytes": complete_bytes, "resume_complete_read_back_bytes": read_back,
            "resume_complete_files_reread": len(reread), "resume_read_bytes": res.rerun.read_bytes,
            "resume_digests_match": not res.bad, "resume_hub": refigs}


# -- main -------------------------------------------------------------------------------


def sizes(a: argparse.Namespace) -> dict[str, int]:
    if a.quick:
        return {"big": 24 * MiB, "shard": 4 * MiB, "shards": 3, "tokenizer": 256 * 1024}
    return {"big": int(a.big_gib * GiB), "shard": a.shard_mib * MiB, "shards": a.shards, "tokenizer": 4 * MiB}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--big-gib", type=float, default=2.0, help="size of the largest shard in GiB (default 2)")
    # With the defaults the largest file is 44% of the model, so at the kill (50%) it is complete and the resume
    # shows whether a complete file is read again.
    ap.add_argument("--shard-mib", type=int, default=512, help="size of each other shard in MiB (default 512)")
    ap.add_argument("--shards", type=int, default=6, help="number of safetensors shards (default 6)")
    ap.add_argument("--connections", type=int, default=16, help="pack --connections (default 16)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each, in turns; the best is kept (default 3)")
    ap.add_argument("--cdn", choices=["nginx", "builtin"], default="nginx", help="the CDN origin (default nginx)")
    ap.add_argument("--no-resume", action="store_true", help="skip the SIGKILL-and-resume measurement")
    ap.add_argument("--quick", action="store_true", help="a few MiB, one run: checks the benchmark works, measures nothing")
    add_work_args(ap, "model, bundles and logs")
    a = ap.parse_args(argv)
    if a.quick:
        a.repeat = 1
    if shutil.which("aria2c") is None:
        raise SystemExit("aria2c is not installed (Debian: apt-get install aria2); the benchmark compares against it")
    sz = sizes(a)
    total_guess = sz["big"] + sz["shard"] * (sz["shards"] - 1) + sz["tokenizer"]
    with work_folder(a, "pack-") as work:
        free = shutil.disk_usage(work).free
        if free < 4 * total_guess + GiB:
            raise SystemExit(f"{work} has {free / GiB:.1f} GiB free; the benchmark needs {(4 * total_guess + GiB) / GiB:.1f}")
        make_model(work / "src", big=sz["big"], shard=sz["shard"], shards=sz["shards"], tokenizer=sz["tokenizer"])
        write_keypair(generate("ed25519"), work / "k.key", work / "k.pub", passphrase=None)
        (work / "bench.toml").write_text(f'[bundle]\nname = "bench"\nsequence = 1\n\n'
                                         f'[[models]]\nrepo_id = "{REPO_ID}"\nrevision = "main"\n')
        env = _env(work)
        connections = a.connections
        hub = start_hub(work, work / "src", a.cdn)
        try:
            files = hub_listing(hub.url)
            total = sum(f.size for f in files)
            urls = final_urls(hub.url, files)
            t_pack = t_aria = t_sync = float("inf")
            rss, figs, aria_bad, pack_bad = 0, None, [], []
            for i in range(a.repeat):
                out, dest = work / "pack-out", work / "aria2-out"
                run = checked(run_probed(pack_cmd(work, hub, out, connections), env=env, cwd=work,
                                         logs=work / "logs-pack"), "airpack pack")
                if run.seconds < t_pack:
                    t_pack, figs = run.seconds, hub_figures(run.json_doc())
                rss = max(rss, run.max_rss)
                arun, sync = aria2_run(work, env, urls, dest)
                if arun.seconds < t_aria:
                    t_aria, t_sync = arun.seconds, sync
                if i == 0:
                    aria_bad = mismatches(dest, files)
                    pack_bad = mismatches(out.joinpath(*model_slug(REPO_ID).split("/")), files)
                shutil.rmtree(out)
                shutil.rmtree(dest)
            res = None if a.no_resume else resume_run(work, hub, env, total, files, connections)
        finally:
            hub.proc.terminate()
            hub.proc.wait(timeout=30)
        doc = report(a, hub, files, t_pack, t_aria, t_sync, rss, figs, aria_bad, pack_bad, res, connections)
        if a.json:
            print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
