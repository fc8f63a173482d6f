"""Packing from the Hub: what gets pinned and recorded, and what the content policy lets through.

The real huggingface_hub client talks to tests/hubserver.py over a socket on
127.0.0.1 (the Hub on one port, its CDN on another).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, verify
from hub_helpers import TOKEN, Packer
from hubserver import HubServer, Request

from airpack.errors import AirpackError, ContentPolicyError, FetchError, GatedRepoError, RevisionNotFoundError, UnsafePathError
from airpack.fetch.wheels import compatible_platforms
from airpack.spec import load_spec

SHARD = "model-00001-of-00002.safetensors"

pytest_plugins = ("hub_fixtures",)


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def bundle_bytes(out: Path, rel: str) -> bytes:
    return (out / "models" / "acme--tiny" / rel).read_bytes()


# -- the flow ---------------------------------------------------------------------------


def test_pack_records_commit_hub_hashes_and_metadata(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes],
                                                     policy: Path) -> None:
    hub.create_repo("acme/tiny", license="llama3.1", pipeline_tag="text-generation", library_name="transformers")
    sha = hub.commit("acme/tiny", tiny_files)
    r = packer.pack(packer.spec())
    assert r.manifest is not None
    m = r.manifest.models[0]
    raw = m.raw
    assert (m.source, m.revision, m.commit, m.license) == ("hub", "main", sha, "llama3.1")
    assert raw["path"] == "models/acme--tiny" and raw["gated"] is False
    assert (raw["pipeline_tag"], raw["library_name"]) == ("text-generation", "transformers")
    assert raw["parameters"] > 0 and raw["dtypes"] == {"F16": raw["parameters"]}
    assert raw["config"]["model_type"] == "llama"
    served = hub.repos["acme/tiny"].commits[sha]
    assert set(raw["hub_files"]) == set(served)
    for rel, rec in raw["hub_files"].items():
        blob = served[rel]
        assert rec["size"] == blob.size
        if blob.lfs:  # the Hub's own sha256 (LFS oid) is recorded, and it is what the bundle holds
            assert rec == {"size": blob.size, "sha256": blob.sha256}
            assert r.manifest.file(f"models/acme--tiny/{rel}").sha256 == blob.sha256  # type: ignore[union-attr]
        else:
            assert rec == {"size": blob.size, "git_sha1": blob.git_sha1}
    for rel, data in tiny_files.items():
        assert bundle_bytes(r.out, rel) == data
    assert not (r.out / ".airpack-staging").exists() and not (r.out / ".airpack-partial").exists()
    verify(r.out, policy)
    # no floats anywhere in the signed manifest, and it is what the published schema describes
    doc = json.loads((r.out / "manifest.json").read_bytes(), parse_float=lambda s: pytest.fail(f"float {s} in manifest"))
    schema = REPO / "manifests" / "manifest.schema.json"
    if schema.exists():
        import jsonschema

        jsonschema.validate(doc, json.loads(schema.read_text()))


def test_example_specs_parse() -> None:
    qwen = load_spec(REPO / "manifests" / "qwen2.5-7b-instruct.toml")
    m = qwen.models[0]
    assert m.source == "hub" and len(m.revision or "") == 40 and qwen.wheels is not None
    assert "manylinux1_x86_64" in compatible_platforms(qwen.wheels.platforms)
    local = load_spec(REPO / "manifests" / "example-local.toml")
    assert local.models[0].source == "local"


def test_dry_run_resolves_and_fetches_nothing(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes]) -> None:
    sha = hub.commit("acme/tiny", tiny_files)
    out = packer.tmp / "never"
    r = packer.pack(packer.spec(), out=out, dry_run=True)
    assert r.dry_run and r.manifest is None and not out.exists()
    model = r.details["models"][0]
    assert model["commit"] == sha and model["license"] == "apache-2.0"
    assert {p.bundle_path: p.size for p in r.planned} == {
        f"models/acme--tiny/{k}": b.size for k, b in hub.repos["acme/tiny"].commits[sha].items()
    }
    # The dry run HEADs each file (its size and transport are planned from the answer) but GETs none.
    assert hub.downloads() == [] and not [q for q in hub.requests if "/resolve/" in q.path and q.method != "HEAD"]
    assert {p.transport for p in r.planned} == {"http"}


# -- pinning: the revision is resolved once --------------------------------------------------


def test_pinned_commit_and_moving_branch(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes],
                                         tiny_files_v2: dict[str, bytes], policy: Path) -> None:
    a = hub.commit("acme/tiny", tiny_files, title="v1")
    hub.tag("acme/tiny", "release", a)
    on_main = packer.pack(packer.spec(revision="main"))
    b = hub.commit("acme/tiny", {SHARD: tiny_files_v2[SHARD]}, title="new weights")  # main moves on
    assert b != a

    # The bundle packed before the move still says commit a, holds a's bytes and verifies.
    assert on_main.manifest is not None and on_main.manifest.models[0].commit == a
    verify(on_main.out, policy)
    assert bundle_bytes(on_main.out, SHARD) == tiny_files[SHARD]

    pinned = packer.pack(packer.spec(revision=a))
    moved = packer.pack(packer.spec(revision="main"))
    tag = packer.pack(packer.spec(revision="release"))
    assert pinned.manifest and moved.manifest and tag.manifest
    assert [x.manifest.models[0].commit for x in (pinned, moved, tag)] == [a, b, a]  # type: ignore[union-attr]
    assert pinned.manifest.models[0].revision == a and tag.manifest.models[0].revision == "release"
    assert bundle_bytes(pinned.out, SHARD) == tiny_files[SHARD]
    assert bundle_bytes(moved.out, SHARD) == tiny_files_v2[SHARD]
    hub.move_ref("acme/tiny", "release", b)  # a tag that moves is followed only when asked again
    again = packer.pack(packer.spec(revision="release"))
    assert again.manifest and again.manifest.models[0].commit == b


def test_branch_moving_during_the_pack_changes_nothing(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes],
                                                      tiny_files_v2: dict[str, bytes], policy: Path) -> None:
    """main moves right after it was resolved: every file still comes from the resolved commit."""
    a = hub.commit("acme/tiny", tiny_files)
    b = hub.commit("acme/tiny", tiny_files_v2, branch="next")

    def move(req: Request) -> None:
        if req.path.startswith("/api/models/acme/tiny"):
            hub.move_ref("acme/tiny", "main", b)

    hub.hooks.append(move)
    r = packer.pack(packer.spec(revision="main"))
    assert hub.repos["acme/tiny"].refs["main"] == b  # it really moved mid-pack
    assert r.manifest is not None and r.manifest.models[0].commit == a
    for rel, data in tiny_files.items():
        assert bundle_bytes(r.out, rel) == data
    assert all(f"/resolve/{a}/" in q.path for q in hub.requests if "/resolve/" in q.path)
    verify(r.out, policy)


def test_include_and_exclude(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes]) -> None:
    hub.commit("acme/tiny", {**tiny_files, "README.md": "# tiny\n", "extra/notes.txt": "x"})
    r = packer.pack(packer.spec(model_extra='include = ["*.safetensors", "*.json"]\nexclude = ["generation_config.json"]'))
    assert r.manifest is not None
    got = {f.path.removeprefix("models/acme--tiny/") for f in r.manifest.files if f.path.startswith("models/")}
    assert got == {k for k in tiny_files if k.endswith((".safetensors", ".json")) and k != "generation_config.json"}
    assert not {q.file for q in hub.downloads()} & {"README.md", "extra/notes.txt", "generation_config.json"}


# -- content policy -------------------------------------------------------------------------


def test_bin_and_safetensors_takes_only_safetensors(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes]) -> None:
    hub.commit("acme/tiny", {**tiny_files, "pytorch_model-00001-of-00002.bin": b"\x80\x04pickle" * 100,
                             "pytorch_model.bin.index.json": "{}"})
    r = packer.pack(packer.spec())
    assert r.manifest is not None
    paths = {f.path for f in r.manifest.files}
    assert not any(p.endswith(".bin") for p in paths)
    assert "pytorch_model-00001-of-00002.bin" not in r.manifest.models[0].raw["hub_files"]
    assert r.manifest.models[0].pickles == ()
    assert not [q for q in hub.downloads() if q.file and q.file.endswith(".bin")]


def test_pickle_only_repo_is_refused_unless_allowed(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes]) -> None:
    files = {k: v for k, v in tiny_files.items() if not k.endswith(".safetensors")}
    hub.commit("acme/tiny", {**files, "pytorch_model.bin": b"\x80\x04pickle" * 10})
    with pytest.raises(ContentPolicyError) as ei:
        packer.pack(packer.spec())
    assert ei.value.exit_code == 3 and "pytorch_model.bin" in str(ei.value)
    assert hub.downloads() == []  # refused before a byte was fetched
    r = packer.pack(packer.spec(extra="[policy]\nallow_pickle = true\n"))
    assert r.manifest is not None and r.manifest.models[0].pickles == ("pytorch_model.bin",)


def test_remote_code_is_refused_by_default(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes], policy: Path) -> None:
    hub.commit("acme/tiny", {**tiny_files, "modeling_tiny.py": "import os\nos.system('echo owned')\n"})
    with pytest.raises(ContentPolicyError) as ei:
        packer.pack(packer.spec())
    assert ei.value.exit_code == 3 and "modeling_tiny.py" in str(ei.value)
    assert hub.downloads() == []
    r = packer.pack(packer.spec(extra="[policy]\nallow_code = true\n"))
    assert r.manifest is not None and r.manifest.models[0].code == ("modeling_tiny.py",)
    assert r.manifest.allow_code is True
    verify(r.out, policy)


# -- what the Hub refuses ---------------------------------------------------------------------


@pytest.mark.parametrize("revision", ["no-such-branch", "0" * 40])
def test_unknown_revision_is_exit_7(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes], revision: str) -> None:
    hub.commit("acme/tiny", tiny_files)
    with pytest.raises(RevisionNotFoundError) as ei:
        packer.pack(packer.spec(revision=revision), dry_run=True)
    assert ei.value.exit_code == 7 and revision in str(ei.value)


def test_unknown_repo_is_exit_7(packer: Packer, hub: HubServer) -> None:
    with pytest.raises(RevisionNotFoundError) as ei:
        packer.pack(packer.spec(repo_id="acme/nope"))
    assert ei.value.exit_code == 7 and "acme/nope" in str(ei.value) and "not found" in str(ei.value)


def test_unreachable_hub_is_exit_7(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes]) -> None:
    url = hub.url
    hub.stop()
    packer.hub = type("Gone", (), {"url": url})()  # type: ignore[assignment]
    with pytest.raises(AirpackError) as ei:
        packer.pack(packer.spec())
    assert ei.value.exit_code == 7 and "ConnectError" in str(ei.value)
    hub.start()  # for the fixture's stop()


def test_gated_repo(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes], policy: Path) -> None:
    hub.create_repo("acme/tiny", gated="manual")
    hub.commit("acme/tiny", tiny_files)
    with pytest.raises(GatedRepoError) as ei:
        packer.pack(packer.spec())
    assert ei.value.exit_code == 7 and "gated" in str(ei.value) and "token" in str(ei.value)
    with pytest.raises(FetchError) as ei2:
        packer.pack(packer.spec(), token="hf_wrong_token_0000")
    assert ei2.value.exit_code == 7 and "rejected the token" in str(ei2.value) and "hf_wrong" not in str(ei2.value)
    r = packer.pack(packer.spec(), token=TOKEN)
    assert r.manifest is not None and r.manifest.models[0].raw["gated"] is True
    verify(r.out, policy)
    # The token went to the Hub, never to the CDN of another origin.
    assert any(q.auth for q in hub.requests if q.origin == "hub")
    cdn = [q for q in hub.requests if q.origin == "cdn"]
    assert cdn and not any(q.auth for q in cdn)
    assert TOKEN.encode() not in b"".join(p.read_bytes() for p in r.out.rglob("*") if p.is_file())


@pytest.mark.parametrize("bad", ["../escape.json", "a/../../b.json", "sub/.hidden/../x.json"])
def test_unsafe_path_listed_by_the_hub_is_refused(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes],
                                                  bad: str) -> None:
    hub.commit("acme/tiny", {**tiny_files, bad: "{}"})
    with pytest.raises(UnsafePathError) as ei:
        packer.pack(packer.spec())
    assert ei.value.exit_code == 3
    assert not list(packer.tmp.rglob("escape.json")) and not (packer.tmp.parent / "b.json").exists()


def test_names_that_collide_on_some_disks_are_refused_before_download(packer: Packer, hub: HubServer,
                                                                      tiny_files: dict[str, bytes]) -> None:
    hub.commit("acme/tiny", {**tiny_files, "Config.json": "{}"})
    with pytest.raises(UnsafePathError) as ei:
        packer.pack(packer.spec())
    assert ei.value.exit_code == 3 and "config.json" in str(ei.value).lower()
    assert hub.downloads() == []


def _manifest_json(out: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((out / "manifest.json").read_bytes())
    return doc


def test_two_hub_models_in_one_bundle(packer: Packer, hub: HubServer, tiny_files: dict[str, bytes],
                                      tiny_files_v2: dict[str, bytes], policy: Path) -> None:
    a = hub.commit("acme/tiny", tiny_files)
    b = hub.commit("acme/other", tiny_files_v2)
    spec = packer.spec(extra='[[models]]\nrepo_id = "acme/other"\nrevision = "main"\n')
    r = packer.pack(spec)
    assert r.manifest is not None
    assert {(m.repo_id, m.commit) for m in r.manifest.models} == {("acme/tiny", a), ("acme/other", b)}
    assert {m["path"] for m in _manifest_json(r.out)["predicate"]["models"]} == {"models/acme--tiny", "models/acme--other"}
    verify(r.out, policy)
