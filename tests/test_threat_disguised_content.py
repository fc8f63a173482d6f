"""Threat: executable or opaque weights that a name does not betray (a pickle called tokenizer.json, a forged GGUF header).

The content policy judges every file by its name and by its first bytes, with
one function (``content.check_file``) at pack time and over the very bytes
verify and install hash. A pickle, a ZIP (torch.save, .npz, .keras), an
object-dtype numpy array, an HDF5 file, a script or a native binary is refused
(exit 3, naming the file) unless the spec allowed it and the manifest flags it;
a GGUF file must have a sane header; ONNX and sentencepiece files are data.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import KeyPair, run_cli, verify
from registry_fixtures import audit_lines, registry_state, variant_model
from threat_helpers import MODEL_DIR, add_file_to_statement, assert_cli_error, refused, resign, statement

from airpack import content, formats
from airpack.errors import ContentPolicyError, MalformedWeightsError
from airpack.formats import Risk


def gguf(version: int = 3, tensors: int = 0, kv: int = 0, pad: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, kv) + b"\0" * pad


def npy(arr: np.ndarray) -> bytes:  # type: ignore[type-arg]
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def zipped(*names: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n in names:
            z.writestr(n, b"\x80\x02}q\x00.")
    return buf.getvalue()


# -- what the first bytes tell ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "fmt", "risk", "why"),
    [
        (b"\x80\x04\x95\x10\x00\x00\x00", "pickle", Risk.PICKLE, "protocol 4"),
        (b"\x80\x02}q\x00(X\x01", "pickle", Risk.PICKLE, "protocol 2"),
        (b"cos\nsystem\n(S'id'\ntR.", "pickle", Risk.PICKLE, "protocol 0"),
        (b"(dp0\nS'a'\np1\n", "pickle", Risk.PICKLE, "protocol 0"),
        (b"(S'id'\nios\nsystem\n.", "pickle", Risk.PICKLE, "protocol 0"),
        (b"\x80\x01cos\nsystem\n(S'id'\ntR.", "pickle", Risk.PICKLE, "protocol 1"),  # pickle.load takes a PROTO 1
        (b"}q\x00(X\x01\x00\x00\x00a", "pickle", Risk.PICKLE, "protocol 0 or 1"),
        (zipped("archive/data.pkl", "archive/data/0"), "zip", Risk.PICKLE, "torch.save archive (member archive/data.pkl)"),
        (zipped("config.json"), "zip", Risk.PICKLE, "ZIP archive (first member config.json)"),
        (npy(np.array([1, "x"], dtype=object)), "numpy", Risk.PICKLE, "object dtype"),
        (npy(np.zeros((2, 3), dtype=np.float32)), "numpy", None, "numpy array"),
        (b"\x89HDF\r\n\x1a\n\0\0", "hdf5", Risk.PICKLE, "Lambda"),
        (b"\0" * 512 + b"\x89HDF\r\n\x1a\n", "hdf5", Risk.PICKLE, "HDF5"),
        (b"#!/bin/sh\nrm -rf ~\n", "script", Risk.CODE, "#!"),
        (b"\x7fELF\x02\x01\x01", "binary", Risk.CODE, "native"),
        (gguf(), "gguf", None, "GGUF"),
    ],
)
def test_sniff_tells_a_format_from_its_first_bytes(head: bytes, fmt: str, risk: Risk | None, why: str) -> None:
    found = formats.sniff(head)
    assert found is not None and (found.fmt, found.risk) == (fmt, risk)
    assert why in found.why


@pytest.mark.parametrize("head", [b'{"model_type": "llama"}', b"[PAD]\n[UNK]\n", b"cat\ndog\nfish\n", b"",
                                  b"can\ndo\npeople\n", b"cat\ndog\nVery\n", b"(Version 2)\n", b"(In 2024\n",
                                  b"\x08\x07\x12\x07pytorch", b"\x0a\x0b\x0a\x05<unk>"])
def test_text_json_onnx_and_sentencepiece_are_data(head: bytes) -> None:
    found = formats.sniff(head)
    assert found is None or found.risk is None
    assert content.classify("models/a--b/x.onnx", head, len(head)).risk is None


def test_a_safetensors_length_that_looks_like_a_pickle_is_left_to_the_header_check() -> None:
    """A 640-byte header opens with 0x80 0x02, the pickle protocol-2 opcode: the suffix settles it, the header check judges."""
    head = struct.pack("<Q", 640) + b'{"__metadata__":{}}'
    assert content.classify("model.safetensors", head, 10_000).risk is None
    assert content.classify("model.json", head, 10_000).risk is Risk.PICKLE  # the same bytes under another name


@pytest.mark.parametrize(
    ("data", "size", "match"),
    [
        (gguf(version=1), None, "version 1"),
        (gguf(version=0x03000000), None, "version"),  # big-endian, or garbage
        (gguf(tensors=1 << 40), None, "over the limit"),
        (gguf(tensors=1000, kv=10), None, "need at least"),  # counts the file cannot hold
        (b"GGUF\x03\0", None, "shorter"),
        (b"not a gguf file at all, just bytes", None, "magic"),
    ],
)
def test_gguf_header_must_be_sane(data: bytes, size: int | None, match: str) -> None:
    refused(MalformedWeightsError, lambda: content.classify("m/model.gguf", data, size or len(data)), code=3, match=match)


def test_a_sane_gguf_header_is_data() -> None:
    data = gguf(tensors=2, kv=3, pad=2 * 24 + 3 * 13)
    assert content.classify("m/model-q4.gguf", data, len(data)).risk is None
    assert formats.check_gguf(data, len(data), display="x").tensors == 2


def test_names_still_count_whatever_the_bytes() -> None:
    for name, risk in [("x.bin", Risk.PICKLE), ("x.h5", Risk.PICKLE), ("x.keras", Risk.PICKLE), ("run.py", Risk.CODE),
                       ("tf_model.h5", Risk.PICKLE)]:
        assert content.classify(name, b"{}", 2).risk is risk, name
    assert content.prefer_safetensors(["model.safetensors", "tf_model.h5", "rust_model.ot"]) == ["model.safetensors"]


# -- pack: the bytes of every file it copied ----------------------------------------------------------


DISGUISED = [
    ("special_tokens.json", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.", "pickle", "allow_pickle"),
    ("weights.dat", zipped("archive/data.pkl"), "torch.save", "allow_pickle"),
    ("embeddings.arr", npy(np.array([{"a": 1}], dtype=object)), "object dtype", "allow_pickle"),
    ("tokenize", b"#!/usr/bin/env python3\nimport os\n", "#!", "allow_code"),
]


@pytest.mark.parametrize(("name", "data", "why", "key"), DISGUISED, ids=[d[0] for d in DISGUISED])
def test_pack_refuses_what_the_bytes_reveal_unless_the_spec_allows_it(
    tmp_path: Path, tiny_model: Path, make_bundle: Callable[..., Path], policy: Path, name: str, data: bytes, why: str,
    key: str,
) -> None:
    src = variant_model(tiny_model, tmp_path / "variant", extra={name: data})
    e = refused(ContentPolicyError, lambda: make_bundle(model_dir=src), code=3, match="not allowed by the spec")
    assert e.path == name and why in str(e) and key in e.hint

    b = make_bundle(model_dir=src, extra=f"[policy]\n{key} = true\n")
    m = verify(b, policy).manifest
    flagged = m.models[0].pickles if key == "allow_pickle" else m.models[0].code
    assert flagged == (name,)  # the signed manifest flags it, so verify (judging the same bytes) agrees


def test_pack_cli_names_the_disguised_file(tmp_path: Path, tiny_model: Path, alice: KeyPair) -> None:
    from conftest import write_spec

    src = variant_model(tiny_model, tmp_path / "variant", extra={"vocab.json": b"cos\nsystem\n(S'id'\ntR."})
    spec = write_spec(tmp_path / "spec.toml", model_dir=src)
    r = run_cli("pack", spec, "--out", tmp_path / "out", "--key", alice.key)
    assert_cli_error(r, 3, "vocab.json", "pickle")


def test_gguf_onnx_and_sentencepiece_pack_without_flags(tmp_path: Path, tiny_model: Path, make_bundle: Callable[..., Path],
                                                         policy: Path) -> None:
    src = variant_model(tiny_model, tmp_path / "variant", extra={
        "model-q4_k_m.gguf": gguf(tensors=1, kv=1, pad=64), "model.onnx": b"\x08\x07\x12\x07pytorch" + b"\0" * 64,
        "tokenizer.model": b"\x0a\x0b\x0a\x05<unk>\x15\0\0\0\0",
    })
    m = verify(make_bundle(model_dir=src), policy).manifest
    assert m.models[0].pickles == () and m.models[0].code == ()
    assert {f.path.rsplit("/", 1)[-1] for f in m.files} >= {"model-q4_k_m.gguf", "model.onnx", "tokenizer.model"}


def test_pack_refuses_a_malformed_gguf(tmp_path: Path, tiny_model: Path, make_bundle: Callable[..., Path]) -> None:
    src = variant_model(tiny_model, tmp_path / "variant", extra={"model.gguf": gguf(tensors=5000, kv=5000)})
    e = refused(MalformedWeightsError, lambda: make_bundle(model_dir=src), code=3, match="model.gguf")
    assert "exclude" in e.hint


# -- verify and install: the bytes that were hashed ------------------------------------------------------


def _plant(bundle: Path, signer: KeyPair, name: str, data: bytes, *, allow: str | None = None, flag: str | None = None) -> str:
    """Add a file to a bundle and sign a manifest that lists it (optionally allowed by the policy, optionally flagged)."""
    path = f"{MODEL_DIR}/{name}"
    (bundle / path).write_bytes(data)
    st = statement(bundle)
    add_file_to_statement(st, path, data)
    if allow:
        st["predicate"]["policy"][allow] = True
    if flag:
        st["predicate"]["models"][0][flag] = [name]
    resign(bundle, st, signer.signer)
    return path


@pytest.mark.parametrize(
    ("name", "data", "allow", "flag", "match"),
    [
        ("tokenizer_extra.json", b"\x80\x04K\x01.", None, None, "not allowed by the bundle's signed policy"),
        ("tokenizer_extra.json", b"\x80\x04K\x01.", "allow_pickle", None, "does not list it among its pickles"),
        ("weights.dat", zipped("archive/data.pkl"), None, None, "torch.save"),
        ("helper", b"#!/bin/sh\nid\n", "allow_code", None, "does not list it among its code"),
        ("libx.data", b"\x7fELF\x02\x01\x01\0", None, None, "native executable"),
    ],
)
def test_verify_refuses_unflagged_content_told_by_its_bytes(bundle: Path, policy: Path, alice: KeyPair, name: str, data: bytes,
                                                            allow: str | None, flag: str | None, match: str) -> None:
    path = _plant(bundle, alice, name, data, allow=allow, flag=flag)
    e = refused(ContentPolicyError, lambda: verify(bundle, policy), code=3, match=match)
    assert e.path == path
    assert_cli_error(run_cli("verify", bundle, "--trust", policy), 3, path)


def test_verify_refuses_a_signed_malformed_gguf(bundle: Path, policy: Path, alice: KeyPair) -> None:
    path = _plant(bundle, alice, "model.gguf", gguf(version=7))
    e = refused(MalformedWeightsError, lambda: verify(bundle, policy), code=3, match="version 7")
    assert e.path == path


def test_flagged_and_allowed_content_verifies_and_installs_only_with_consent(bundle: Path, policy: Path, alice: KeyPair,
                                                                             tmp_path: Path) -> None:
    path = _plant(bundle, alice, "extra.json", b"\x80\x04K\x01.", allow="allow_pickle", flag="pickles")
    assert verify(bundle, policy).manifest.models[0].pickles == ("extra.json",)
    reg = tmp_path / "registry"
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy, "--ignore-fit", "--json")
    assert r.returncode == 3, r.stdout
    err = json.loads(r.stdout)["error"]
    assert err["path"] == path and "--allow-pickle" in err["message"]
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy, "--ignore-fit", "--allow-pickle", "--json")
    assert r.returncode == 0, r.stdout


def test_install_of_a_disguised_pickle_changes_nothing_but_the_log(bundle: Path, policy: Path, alice: KeyPair,
                                                                   make_bundle: Callable[..., Path], tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    base = make_bundle(name="base", channel="base", repo_id="acme/base")
    assert run_cli("install", base, "--registry", reg, "--trust", policy, "--ignore-fit").returncode == 0
    before, lines = registry_state(reg), len(audit_lines(reg))
    path = _plant(bundle, alice, "notes.json", b"\x80\x05\x95\x01.", allow="allow_pickle")
    r = run_cli("install", bundle, "--registry", reg, "--trust", policy, "--ignore-fit", "--allow-pickle", "--json")
    assert r.returncode == 3, r.stdout
    assert json.loads(r.stdout)["error"] == {**json.loads(r.stdout)["error"], "type": "ContentPolicyError", "path": path}
    assert registry_state(reg) == before
    log = audit_lines(reg)
    assert len(log) == lines + 1 and log[-1]["result"] == "refused"


def test_content_the_registry_already_holds_is_judged_too(make_bundle: Callable[..., Path], policy: Path, alice: KeyPair,
                                                          tmp_path: Path) -> None:
    """A pickle installed once with consent cannot come back unflagged under another name: install does not read the
    bytes it already holds, so it judges the registry's own copy's first bytes instead."""
    data = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94."
    reg = tmp_path / "registry"
    first = make_bundle(sequence=1)
    _plant(first, alice, "extra.json", data, allow="allow_pickle", flag="pickles")
    r = run_cli("install", first, "--registry", reg, "--trust", policy, "--ignore-fit", "--allow-pickle")
    assert r.returncode == 0, r.stderr
    second = make_bundle(sequence=2)
    path = _plant(second, alice, "notes.json", data)
    before = registry_state(reg)
    r = run_cli("install", second, "--registry", reg, "--trust", policy, "--ignore-fit", "--allow-pickle", "--json")
    assert r.returncode == 3, r.stdout
    err = json.loads(r.stdout)["error"]
    assert (err["type"], err["path"]) == ("ContentPolicyError", path)
    assert registry_state(reg) == before
