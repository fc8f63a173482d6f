"""Fit before downloading: `airpack fit ORG/NAME[@REVISION]` and `pack --dry-run` read config, index and headers only.

The real huggingface_hub client (and airpack's ranged GETs) talk to tests/hubserver.py on 127.0.0.1; the
request log proves which bytes moved: config.json and the shard index whole, and from each safetensors
file exactly its 8-byte length and its header, never a weights file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hub_helpers import OUTSIDER, TOKEN, Packer
from hubserver import HubServer, Request, tiny_model_files
from threat_helpers import assert_cli_error, cli_inproc

from airpack.errors import FetchError, GatedRepoError, MalformedSafetensorsError, RevisionNotFoundError, UsageError
from airpack.ops.fit import MAX_CONFIG_BYTES, FitOptions, fit_model, load_folder, model_kind
from airpack.ops.fit_hub import load_hub_model

pytest_plugins = ("hub_fixtures",)

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def wide_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A two-shard model with an index whose weights (MiB) dwarf their headers (about 1 KiB each)."""
    return tiny_model_files(tmp_path_factory.mktemp("wide") / "m", shards=2, hidden=256, intermediate=512, vocab=4096)


@pytest.fixture(scope="module")
def single_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return tiny_model_files(tmp_path_factory.mktemp("single") / "m", shards=1, hidden=128, vocab=2048)


def header_len(data: bytes) -> int:
    return int(struct.unpack("<Q", data[:8])[0])


def assert_only_metadata_moved(hub: HubServer, files: dict[str, bytes], repo: str = "acme/tiny") -> list[Request]:
    """Every byte-serving GET: config/index whole, each shard's [0, 8) and [8, 8 + header) ranges, nothing else."""
    gets = hub.downloads(repo)
    assert gets, "nothing was read"
    for r in gets:
        assert r.status in (200, 206), r
        if r.file is not None and r.file.endswith(".safetensors"):
            n = header_len(files[r.file])
            assert r.range in ("bytes=0-7", f"bytes=8-{8 + n - 1}"), r
            assert r.sent <= max(8, n) < len(files[r.file]) // 100, r
        else:
            assert r.file in ("config.json", "model.safetensors.index.json"), r
    return gets


# -- reading ----------------------------------------------------------------------------------


def test_sharded_model_reads_index_config_and_header_ranges_only(hub: HubServer, wide_files: dict[str, bytes],
                                                                  tmp_path: Path) -> None:
    hub.create_repo("acme/tiny")
    sha = hub.commit("acme/tiny", wide_files)
    src = load_hub_model("acme/tiny", endpoint=hub.url, token=None)
    gets = assert_only_metadata_moved(hub, wide_files)
    assert {r.file for r in gets} == {"config.json", "model.safetensors.index.json", *SHARDS}
    assert sorted(r.range for r in gets if r.file == SHARDS[0]) == sorted(
        ["bytes=0-7", f"bytes=8-{8 + header_len(wide_files[SHARDS[0]]) - 1}"])
    assert src.hub is not None and src.hub["commit"] == sha and src.hub["revision"] == "main"
    assert src.hub["bytes_read"] < 20_000 < src.hub["repo_bytes"]
    # the same estimate as the folder the files would make on disk
    folder = tmp_path / "m"
    for rel, data in wide_files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    opts = FitOptions(model="acme/tiny", gpu="L4", context=2048)
    remote, local = fit_model(opts, [src])[0].to_json(), fit_model(opts, [load_folder(folder)])[0].to_json()
    for key in ("verdict", "per_gpu_bytes", "breakdown", "weights_total_bytes", "parameters", "max_context"):
        assert remote[key] == local[key], key
    assert remote["hub"]["commit"] == sha and "hub" not in local


def test_single_file_model_and_a_pinned_revision(hub: HubServer, single_files: dict[str, bytes],
                                                  wide_files: dict[str, bytes]) -> None:
    hub.create_repo("acme/tiny")
    old = hub.commit("acme/tiny", single_files)
    hub.tag("acme/tiny", "v1", old)
    new = hub.commit("acme/tiny", wide_files)
    for rev, want in (("v1", old), (old, old), ("main", new)):
        src = load_hub_model(f"acme/tiny@{rev}", endpoint=hub.url, token=None)
        assert src.hub is not None and src.hub["commit"] == want
    one = load_hub_model("acme/tiny@v1", endpoint=hub.url, token=None)
    raw = single_files["model.safetensors"]
    assert {t.name for t in one.tensors} == set(json.loads(raw[8:8 + header_len(raw)])) - {"__metadata__"}
    assert_only_metadata_moved(hub, {**wide_files, **single_files})
    assert any(r.file == "model.safetensors" for r in hub.downloads())


def test_hub_errors_are_exit_7_and_keep_the_token_out(hub: HubServer, wide_files: dict[str, bytes]) -> None:
    hub.create_repo("acme/tiny")
    hub.commit("acme/tiny", wide_files)
    hub.create_repo("acme/gated", gated="manual")
    hub.commit("acme/gated", wide_files)
    with pytest.raises(RevisionNotFoundError) as ei:
        load_hub_model("acme/nothere", endpoint=hub.url, token=None)
    assert ei.value.exit_code == 7 and "not found" in ei.value.message
    with pytest.raises(RevisionNotFoundError) as ei:
        load_hub_model("acme/tiny@nobranch", endpoint=hub.url, token=None)
    assert ei.value.exit_code == 7 and "nobranch" in ei.value.message and "nothing was downloaded" not in ei.value.message
    with pytest.raises(GatedRepoError) as ei:
        load_hub_model("acme/gated", endpoint=hub.url, token=None)
    assert ei.value.exit_code == 7 and "token" in ei.value.message
    with pytest.raises(GatedRepoError) as ei:
        load_hub_model("acme/gated", endpoint=hub.url, token=OUTSIDER)
    assert OUTSIDER not in ei.value.message and OUTSIDER not in (ei.value.hint or "")
    src = load_hub_model("acme/gated", endpoint=hub.url, token=TOKEN)  # granted: works, and the CDN never saw the token
    assert src.hub is not None
    assert all(not r.auth for r in hub.requests if r.origin == "cdn")
    assert any(r.auth for r in hub.requests if r.origin == "hub")
    url = hub.url
    hub.stop()
    with pytest.raises(FetchError) as ei:  # unreachable
        load_hub_model("acme/tiny", endpoint=url, token=TOKEN)
    assert ei.value.exit_code == 7 and TOKEN not in ei.value.message


def test_a_header_length_past_the_cap_is_refused_after_8_bytes(hub: HubServer, wide_files: dict[str, bytes]) -> None:
    bad = dict(wide_files)
    bad[SHARDS[1]] = struct.pack("<Q", 1 << 40) + bad[SHARDS[1]][8:]
    hub.create_repo("acme/tiny")
    hub.commit("acme/tiny", bad)
    with pytest.raises(MalformedSafetensorsError) as ei:
        load_hub_model("acme/tiny", endpoint=hub.url, token=None)
    assert ei.value.exit_code == 3 and "exceeds" in ei.value.message
    assert [r.range for r in hub.downloads("acme/tiny", SHARDS[1])] == ["bytes=0-7"]


def test_an_oversized_config_is_refused_before_it_is_fetched(hub: HubServer, wide_files: dict[str, bytes]) -> None:
    cfg = json.loads(wide_files["config.json"])
    cfg["padding"] = "x" * MAX_CONFIG_BYTES  # past the limit a folder's config.json is held to: the same from the Hub
    hub.create_repo("acme/tiny")
    hub.commit("acme/tiny", {**wide_files, "config.json": json.dumps(cfg).encode()})
    with pytest.raises(UsageError) as ei:
        load_hub_model("acme/tiny", endpoint=hub.url, token=None)
    assert ei.value.exit_code == 2 and "config.json" in ei.value.message and "limit" in ei.value.message
    assert not hub.downloads("acme/tiny", "config.json")


# -- telling a repo id from a path --------------------------------------------------------------


def test_model_kind_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "local").mkdir(parents=True)
    reg = tmp_path / "reg"
    assert model_kind("acme/local", registry=None, hub=False) == "path"
    assert model_kind("acme/tiny", registry=None, hub=False) == "hub"
    assert model_kind("acme/tiny@v1.0", registry=None, hub=True) == "hub"
    assert model_kind("acme/tiny", registry=reg, hub=False) == "registry"
    for model, registry, hub, words in (
        ("acme/local", None, True, "ambiguous"),
        ("acme/tiny", reg, True, "give one"),
        ("acme/tiny@main", reg, False, "@REVISION"),
        ("a/b/c", None, False, "--registry"),
        ("a/b/c", None, True, "Hub repo id"),
        ("../x", None, True, "Hub repo id"),
    ):
        with pytest.raises(UsageError) as ei:
            model_kind(model, registry=registry, hub=hub)
        assert ei.value.exit_code == 2 and words in ei.value.message, (model, ei.value.message)


# -- the command line ----------------------------------------------------------------------------


def test_cli_fit_and_plan_from_the_hub(hub: HubServer, wide_files: dict[str, bytes], clean_env: dict[str, str],
                                       tmp_path: Path) -> None:
    hub.create_repo("acme/tiny")
    sha = hub.commit("acme/tiny", wide_files)
    r = cli_inproc("fit", "acme/tiny", "--endpoint", hub.url, "--gpu", "L4", "--context", "2048", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["verdict"] == "fits" and doc["hub"]["commit"] == sha and doc["location"] == f"acme/tiny@{sha[:12]}"
    t = cli_inproc("fit", "acme/tiny", "--gpu", "L4", "--context", "2048", env={"HF_ENDPOINT": hub.url}, cwd=tmp_path)
    assert t.returncode == 0, t.stderr
    assert f"commit {sha}" in t.stdout and "safetensors headers" in t.stdout
    p = cli_inproc("fit", f"acme/tiny@{sha}", "--endpoint", hub.url, "--plan", "--gpus", "L4,H100", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["hub"]["commit"] == sha and plan["options"][0]["fits"] is True
    assert_only_metadata_moved(hub, wide_files)


def test_cli_refusals(hub: HubServer, wide_files: dict[str, bytes], clean_env: dict[str, str], tmp_path: Path) -> None:
    hub.create_repo("acme/tiny")
    hub.commit("acme/tiny", wide_files)
    (tmp_path / "acme" / "tiny").mkdir(parents=True)
    assert_cli_error(cli_inproc("fit", "acme/tiny", "--endpoint", hub.url, "--gpu", "L4", cwd=tmp_path), 2, "ambiguous")
    reg = tmp_path / "reg"
    assert_cli_error(cli_inproc("fit", "acme/other", "--endpoint", hub.url, "--registry", reg, "--gpu", "L4", cwd=tmp_path),
                     2, "give one")
    e = assert_cli_error(cli_inproc("fit", "acme/other", "--endpoint", hub.url, "--gpu", "L4", cwd=tmp_path), 7, "not found")
    assert TOKEN not in e
    token = tmp_path / "token"
    token.write_text(OUTSIDER + "\n")
    hub.create_repo("acme/gated", gated="manual")
    hub.commit("acme/gated", wide_files)
    r = cli_inproc("fit", "acme/gated", "--endpoint", hub.url, "--token-file", token, "--gpu", "L4", cwd=tmp_path)
    assert_cli_error(r, 7, "gated")
    assert OUTSIDER not in r.stderr + r.stdout
    # AIRPACK_REGISTRY yields to an explicit --endpoint; alone, it keeps a repo id on the offline side
    ok = cli_inproc("fit", "acme/gated", "--endpoint", hub.url, "--gpu", "L4", "--json", cwd=tmp_path,
                    env={"AIRPACK_REGISTRY": str(reg), "HF_TOKEN": TOKEN})
    assert ok.returncode == 0, ok.stderr
    before = len(hub.requests)
    off = cli_inproc("fit", "acme/gated", "--gpu", "L4", cwd=tmp_path, env={"AIRPACK_REGISTRY": str(reg), "HF_ENDPOINT": hub.url})
    assert_cli_error(off, 6, "registry")
    assert len(hub.requests) == before


# -- pack --dry-run ------------------------------------------------------------------------------


def test_pack_dry_run_estimates_each_target_from_headers(packer: Packer, hub: HubServer, wide_files: dict[str, bytes],
                                                         tmp_path: Path) -> None:
    hub.create_repo("acme/tiny")
    hub.commit("acme/tiny", wide_files)
    local = tmp_path / "local"
    for rel, data in wide_files.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    targets = ('[[targets]]\ngpu = "L4"\ncount = 1\ncontext = 2048\nruntime = "vllm"\n\n'
               '[[targets]]\ngpu = "H100-80GB"\ncount = 2\ncontext = 1024\nruntime = "transformers"\n')
    spec = packer.spec(extra=f'[[models]]\nrepo_id = "acme/local"\npath = "{local}"\n\n' + targets)
    r = packer.pack(spec, dry_run=True)
    assert not r.out.exists()
    doc = r.to_json()
    assert [t["gpu"] for t in doc["targets"]] == ["L4", "H100-80GB"]
    for t in doc["targets"]:
        hub_est, local_est = t["estimates"]
        assert (hub_est["model"], local_est["model"]) == ("acme/tiny", "acme/local")
        assert hub_est["verdict"] == "fits" and hub_est["per_gpu_bytes"] == local_est["per_gpu_bytes"]
        assert t["estimate"]["verdict"] == "fits"
    assert doc["targets"][0]["estimate"]["runtime"] == "vllm" and doc["targets"][1]["estimate"]["gpu"]["count"] == 2
    assert_only_metadata_moved(hub, wide_files)


def test_pack_dry_run_cli_prints_the_targets(hub: HubServer, wide_files: dict[str, bytes], clean_env: dict[str, str],
                                             tmp_path: Path) -> None:
    hub.create_repo("acme/tiny")
    hub.commit("acme/tiny", wide_files)
    spec = tmp_path / "spec.toml"
    spec.write_text('[bundle]\nname = "tiny"\nchannel = "tiny"\nsequence = 1\n\n[[models]]\nrepo_id = "acme/tiny"\n'
                    'revision = "main"\n\n[[targets]]\ngpu = "L4"\ncount = 1\ncontext = 2048\nruntime = "vllm"\n')
    r = cli_inproc("pack", spec, "--out", tmp_path / "b", "--dry-run", "--endpoint", hub.url)
    assert r.returncode == 0, r.stderr
    assert "target 1 x L4 (vllm, context 2,048, batch 1): acme/tiny: fits" in r.stdout
    j = cli_inproc("pack", spec, "--out", tmp_path / "b", "--dry-run", "--endpoint", hub.url, "--json")
    assert json.loads(j.stdout)["targets"][0]["estimate"]["verdict"] == "fits"
    assert not (tmp_path / "b").exists()
    assert_only_metadata_moved(hub, wide_files)
