"""``airpack pack`` from the Hub through the real command line: exit codes, output, and the token.

The token must never appear on stdout, stderr, in the bundle or in an error,
whether it is right, wrong, or not needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import KeyPair, run_cli
from hub_helpers import TOKEN, write_hub_spec
from hubserver import HubServer

pytest_plugins = ("hub_fixtures",)


def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_pack_with_env_endpoint_and_token_prints_a_summary_and_never_the_token(
    hub: HubServer, tiny_files: dict[str, bytes], tmp_path: Path, alice: KeyPair, policy: Path, clean_env: dict[str, str]
) -> None:
    hub.create_repo("acme/tiny", gated="auto", license="apache-2.0")
    sha = hub.commit("acme/tiny", tiny_files)
    spec = write_hub_spec(tmp_path / "spec.toml")
    out = tmp_path / "bundle"
    env = {**clean_env, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN}
    r = run_cli("pack", spec, "--out", out, "--key", alice.key, "-v", env=env)
    assert r.returncode == 0, r.stderr
    n = len(hub.repos["acme/tiny"].commits[sha])  # the model's files and the repo's .gitattributes
    assert sha in r.stdout and "apache-2.0" in r.stdout and f"{n} file(s)" in r.stdout
    v = run_cli("verify", out, "--trust", policy, "--json", env=clean_env)
    assert v.returncode == 0, v.stdout + v.stderr
    model = json.loads(v.stdout)["models"][0]
    assert (model["source"], model["commit"], model["revision"]) == ("hub", sha, "main")
    assert TOKEN not in r.stdout + r.stderr + v.stdout + v.stderr
    assert TOKEN.encode() not in _all_bytes(out)


def test_token_file_and_errors_never_show_the_token(hub: HubServer, tiny_files: dict[str, bytes], tmp_path: Path,
                                                    alice: KeyPair, clean_env: dict[str, str]) -> None:
    hub.create_repo("acme/tiny", gated="manual")
    hub.commit("acme/tiny", tiny_files)
    spec = write_hub_spec(tmp_path / "spec.toml")
    wrong = "hf_WRONGwrongWRONG0000"
    (tmp_path / "token").write_text(wrong + "\n")
    r = run_cli("pack", spec, "--out", tmp_path / "b1", "--key", alice.key, "--endpoint", hub.url,
                "--token-file", tmp_path / "token", "-v", env=clean_env)
    assert r.returncode == 7 and "token" in r.stderr
    assert wrong not in r.stdout + r.stderr
    j = run_cli("pack", spec, "--out", tmp_path / "b2", "--key", alice.key, "--endpoint", hub.url, "--json",
                env={**clean_env, "HF_TOKEN": wrong})
    assert j.returncode == 7 and wrong not in j.stdout + j.stderr
    assert json.loads(j.stdout)["error"]["exit_code"] == 7
    (tmp_path / "token").write_text(TOKEN + "\n")
    ok = run_cli("pack", spec, "--out", tmp_path / "b3", "--key", alice.key, "--endpoint", hub.url,
                 "--token-file", tmp_path / "token", env=clean_env)
    assert ok.returncode == 0, ok.stderr
    assert TOKEN not in ok.stdout + ok.stderr and TOKEN.encode() not in _all_bytes(tmp_path / "b3")


def test_gated_without_token_is_a_clear_exit_7(hub: HubServer, tiny_files: dict[str, bytes], tmp_path: Path,
                                               alice: KeyPair, clean_env: dict[str, str]) -> None:
    hub.create_repo("acme/tiny", gated="manual")
    hub.commit("acme/tiny", tiny_files)
    spec = write_hub_spec(tmp_path / "spec.toml")
    r = run_cli("pack", spec, "--out", tmp_path / "b", "--key", alice.key, "--endpoint", hub.url, env=clean_env)
    assert r.returncode == 7
    assert "acme/tiny is gated" in r.stderr and "HF_TOKEN" in r.stderr and "Traceback" not in r.stderr
    j = run_cli("pack", spec, "--out", tmp_path / "b", "--key", alice.key, "--endpoint", hub.url, "--json", env=clean_env)
    err = json.loads(j.stdout)["error"]
    assert (j.returncode, err["exit_code"], err["type"]) == (7, 7, "GatedRepoError")


@pytest.mark.parametrize("revision", ["nope"])
def test_unknown_revision_is_exit_7(hub: HubServer, tiny_files: dict[str, bytes], tmp_path: Path, alice: KeyPair,
                                    clean_env: dict[str, str], revision: str) -> None:
    hub.commit("acme/tiny", tiny_files)
    spec = write_hub_spec(tmp_path / "spec.toml", revision=revision)
    r = run_cli("pack", spec, "--out", tmp_path / "b", "--key", alice.key, "--endpoint", hub.url, env=clean_env)
    assert r.returncode == 7 and "revision 'nope' not found" in r.stderr and "Traceback" not in r.stderr


def test_dry_run_lists_files_sizes_total_and_licence(hub: HubServer, tiny_files: dict[str, bytes], tmp_path: Path,
                                                     clean_env: dict[str, str]) -> None:
    sha = hub.commit("acme/tiny", tiny_files)
    spec = write_hub_spec(tmp_path / "spec.toml")
    r = run_cli("pack", spec, "--out", tmp_path / "b", "--dry-run", env={**clean_env, "HF_ENDPOINT": hub.url})
    assert r.returncode == 0, r.stderr
    served = hub.repos["acme/tiny"].commits[sha]
    assert f"would write {len(served)} file(s)" in r.stdout and sha in r.stdout and "apache-2.0" in r.stdout
    assert "models/acme--tiny/model-00001-of-00002.safetensors" in r.stdout
    assert not (tmp_path / "b").exists() and hub.downloads() == []
    j = run_cli("pack", spec, "--out", tmp_path / "b", "--dry-run", "--json", "--endpoint", hub.url, env=clean_env)
    doc = json.loads(j.stdout)
    assert doc["total_bytes"] == sum(b.size for b in served.values())
    assert doc["models"][0]["commit"] == sha and doc["models"][0]["license"] == "apache-2.0"


def test_bad_endpoint_is_a_usage_error(tmp_path: Path, alice: KeyPair, clean_env: dict[str, str]) -> None:
    spec = write_hub_spec(tmp_path / "spec.toml")
    for bad in ("ftp://user:secret@host", "https://user:secret@hub.example", "not a url"):
        r = run_cli("pack", spec, "--out", tmp_path / "b", "--dry-run", "--endpoint", bad, env=clean_env)
        assert r.returncode == 2 and "secret" not in r.stderr and "Traceback" not in r.stderr
