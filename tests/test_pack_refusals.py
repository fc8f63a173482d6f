"""User flow: the packer's refusals. Nothing is created before something must be written, a failed pack takes back
what it wrote (but keeps Hub downloads to resume), spec mistakes are exit 2 at parse time, and every pack-time
hint speaks to the packer, never "get a fresh copy from the packer".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import KeyPair, write_spec
from factories import make_model
from hub_helpers import Packer
from hubserver import Fault, HubServer
from threat_helpers import assert_cli_error, cli_inproc, refused

from airpack.errors import (
    AirpackError,
    ContentPolicyError,
    FetchError,
    IntegrityError,
    MalformedSafetensorsError,
    SpecError,
    UnsafePathError,
)
from airpack.ops.export import pack_as_tar
from airpack.ops.pack import PARTIAL_MARKER, PackOptions, PackResult, pack
from airpack.spec import load_spec, spec_from_dict

pytest_plugins = ("hub_fixtures",)
RECEIVER_HINTS = {IntegrityError.default_hint, UnsafePathError.default_hint, MalformedSafetensorsError.default_hint}


def pack_spec(spec: Path, out: Path, alice: KeyPair) -> PackResult:
    return pack(PackOptions(spec=load_spec(spec), out=out, signer=alice.signer))


# -- item 12: create nothing until something must be written ------------------------------------


def test_a_spec_error_creates_no_output_folder(tmp_path: Path, tiny_model: Path, alice: KeyPair) -> None:
    spec = write_spec(tmp_path / "s.toml", model_dir=tiny_model, extra='include = ["*.gguf"]\n')
    out = tmp_path / "out"
    refused(SpecError, lambda: pack_spec(spec, out, alice), code=2, match="no files matching")
    assert not out.exists()
    r = cli_inproc("pack", spec, "--out", out, "--key", alice.key)
    assert_cli_error(r, 2, "no files matching")
    assert not out.exists() and not (out / PARTIAL_MARKER).exists()


def test_a_content_refusal_into_an_empty_folder_leaves_it_empty(tmp_path: Path, alice: KeyPair) -> None:
    src = make_model(tmp_path / "src")
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    out = tmp_path / "out"
    out.mkdir()
    refused(ContentPolicyError, lambda: pack_spec(write_spec(tmp_path / "s.toml", model_dir=src), out, alice), code=3)
    assert list(out.iterdir()) == []


def test_a_failure_after_copying_takes_back_the_folder_it_created(tmp_path: Path, alice: KeyPair) -> None:
    src = make_model(tmp_path / "src")
    (src / "extra.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    out = tmp_path / "out"
    e = refused(MalformedSafetensorsError, lambda: pack_spec(write_spec(tmp_path / "s.toml", model_dir=src), out, alice),
                code=3)
    assert not out.exists()
    # item 17: the hint is for the packer, about his folder
    assert e.hint not in RECEIVER_HINTS and str(src) in e.hint and "exclude" in e.hint


def test_a_failed_pack_into_an_empty_folder_empties_it_again(tmp_path: Path, alice: KeyPair) -> None:
    src = make_model(tmp_path / "src")
    (src / "extra.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    out = tmp_path / "out"
    out.mkdir()
    refused(MalformedSafetensorsError, lambda: pack_spec(write_spec(tmp_path / "s.toml", model_dir=src), out, alice),
            code=3)
    assert out.is_dir() and list(out.iterdir()) == []


def test_pack_as_tar_leaves_no_work_folder_on_a_refusal(tmp_path: Path, tiny_model: Path, alice: KeyPair) -> None:
    spec = load_spec(write_spec(tmp_path / "s.toml", model_dir=tiny_model, extra='include = ["*.gguf"]\n'))
    media = tmp_path / "media"
    media.mkdir()
    with pytest.raises(SpecError):
        pack_as_tar(lambda out: pack(PackOptions(spec=spec, out=out, signer=alice.signer)), media / "t.tar", alice.signer)
    assert list(media.iterdir()) == []


def test_a_failed_hub_pack_keeps_its_downloads_and_resumes(packer: Packer, hub: HubServer,
                                                           tiny_files: dict[str, bytes]) -> None:
    hub.commit("acme/tiny", tiny_files)
    hub.inject("acme/tiny", "tokenizer.json", Fault("status", status=503, times=None))
    out = packer.tmp / "out"
    with pytest.raises(FetchError):
        packer.pack(packer.spec(), out=out, workers=1)
    assert (out / PARTIAL_MARKER).exists() and any((out / "models" / "acme--tiny").iterdir())
    hub.clear_faults()
    before = len(hub.requests)
    r = packer.pack(packer.spec(), out=out, workers=1)
    assert r.manifest is not None and not (out / PARTIAL_MARKER).exists()
    assert {q.file for q in hub.requests[before:] if q.method == "GET" and q.file} == {"tokenizer.json"}


def test_a_hub_resolve_failure_creates_nothing(packer: Packer, hub: HubServer) -> None:
    out = packer.tmp / "out"
    with pytest.raises(AirpackError) as e:
        packer.pack(packer.spec(repo_id="acme/missing"), out=out)
    assert e.value.exit_code == 7 and not out.exists()


def test_hub_bytes_that_differ_from_the_listing_keep_a_packer_hint(packer: Packer, hub: HubServer,
                                                                  tiny_files: dict[str, bytes]) -> None:
    hub.commit("acme/tiny", tiny_files)
    hub.inject("acme/tiny", "config.json", Fault("corrupt", times=None))
    with pytest.raises(IntegrityError) as e:
        packer.pack(packer.spec(), out=packer.tmp / "out")
    assert e.value.hint and e.value.hint not in RECEIVER_HINTS  # the fetch layer's own hint (served other bytes), kept


# -- item 16: repo ids equal up to case are a spec error ----------------------------------------------


def test_repo_ids_that_differ_only_in_case_are_a_spec_error(tmp_path: Path, tiny_model: Path, alice: KeyPair) -> None:
    spec = write_spec(tmp_path / "s.toml", model_dir=tiny_model,
                      extra=f'\n[[models]]\nrepo_id = "Acme/Tiny"\npath = "{tiny_model}"\n')
    e = refused(SpecError, lambda: load_spec(spec), code=2, match="case-insensitive file systems")
    assert "acme/tiny" in e.message and "Acme/Tiny" in e.message
    r = cli_inproc("pack", spec, "--out", tmp_path / "out", "--key", alice.key, "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["type"] == "SpecError"
    assert not (tmp_path / "out").exists()


def test_the_same_repo_id_twice_is_still_a_spec_error(tmp_path: Path) -> None:
    doc = {"bundle": {"name": "b", "sequence": 1},
           "models": [{"repo_id": "a/b", "path": "x"}, {"repo_id": "a/b", "path": "y"}]}
    refused(SpecError, lambda: spec_from_dict(doc, base=tmp_path), code=2, match="appears twice")


# -- item 17: pack-time hints speak to the packer -------------------------------------------------------


def test_names_colliding_in_the_folder_get_a_packer_hint(tmp_path: Path, alice: KeyPair) -> None:
    src = make_model(tmp_path / "src")
    (src / "Config.json").write_text("{}")
    e = refused(UnsafePathError, lambda: pack_spec(write_spec(tmp_path / "s.toml", model_dir=src), tmp_path / "o", alice),
                code=3, match="case or Unicode")
    assert e.hint not in RECEIVER_HINTS and str(src) in e.hint
    r = cli_inproc("pack", write_spec(tmp_path / "s2.toml", model_dir=src), "--out", tmp_path / "o", "--key", alice.key)
    assert r.returncode == 3 and "fresh copy from the packer" not in r.stderr


def test_a_bad_config_json_gets_a_packer_hint(tmp_path: Path, alice: KeyPair) -> None:
    src = make_model(tmp_path / "src")
    (src / "config.json").write_text("{not json")
    e = refused(IntegrityError, lambda: pack_spec(write_spec(tmp_path / "s.toml", model_dir=src), tmp_path / "o", alice),
                code=3, match="config.json")
    assert e.hint not in RECEIVER_HINTS and str(src) in e.hint
    assert not (tmp_path / "o").exists()


# -- item 18: a runtime nothing else supports is refused in the spec ----------------------------------


def test_runtime_llamacpp_is_refused_at_parse_time(tmp_path: Path, tiny_model: Path) -> None:
    spec = write_spec(tmp_path / "s.toml", model_dir=tiny_model,
                      extra='\n[[targets]]\ngpu = "L4"\nruntime = "llamacpp"\n')
    refused(SpecError, lambda: load_spec(spec), code=2, match="runtime must be one of")


def test_the_shipped_example_spec_points_at_the_documented_folder() -> None:
    repo = Path(__file__).resolve().parent.parent
    spec = load_spec(repo / "manifests" / "example-local.toml")
    assert spec.models[0].path is not None
    assert spec.models[0].path.resolve() == (repo / "models" / "example-tiny").resolve()
    assert "demo/tiny_model.py models/example-tiny" in (repo / "README.md").read_text()


def test_a_tar_pack_whose_files_changed_mid_pack_gets_a_packer_hint(tmp_path: Path, tiny_model: Path, alice: KeyPair,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The export step re-verifies the packer's own bundle; a mismatch there is the packer's to re-run, not to refetch."""
    import airpack.ops.export as export_mod

    def changed(_opts: object) -> None:
        raise IntegrityError("bundle content does not match its manifest: 1 changed file(s)")

    monkeypatch.setattr(export_mod, "export", changed)
    spec = load_spec(write_spec(tmp_path / "s.toml", model_dir=tiny_model))
    media = tmp_path / "media"
    media.mkdir()
    with pytest.raises(IntegrityError) as e:
        pack_as_tar(lambda out: pack(PackOptions(spec=spec, out=out, signer=alice.signer)), media / "t.tar", alice.signer)
    assert e.value.hint not in RECEIVER_HINTS and "run pack again" in e.value.hint
