"""Every threat gets the same answer in every form a bundle takes: folder, tar, parts, OCI artifact.

Each threat tampers with a real bundle folder; the folder is then carried into
the other forms *without* airpack's own writers (which would refuse to carry
it): a tar written with Python's tarfile, parts cut from that tar with a
signed parts index, an artifact pushed to a real registry past ``push``'s
checks. Verifying (``verify``, or ``pull --trust`` for OCI) and installing
must then refuse with the same exit code and the same error type, and the
install must leave the registry as it was but for one audit line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import KeyPair
from factories import make_model
from registry_fixtures import audit_lines, registry_state
from threat_helpers import CONFIG_PATH, SHARD1, SHARD2, add_file_to_statement, flip_byte, resign, statement
from transfer_fixtures import craft_tar

from airpack.errors import AirpackError
from airpack.manifest import ENVELOPE_NAME, MANIFEST_NAME
from airpack.oci_ref import parse_ref
from airpack.ops.install import InstallOptions, install
from airpack.ops.verify import VerifyOptions, verify_bundle
from airpack.parts import PartsWriter, build_statement, index_name, part_names, plan_layout, sign_index
from airpack.trust import load_policy

if TYPE_CHECKING:
    from oci_registry import OciRegistry

pytest_plugins = ["oci_registry"]

FORMS = ("dir", "tar", "parts", "oci")


@dataclass
class Ctx:
    alice: KeyPair
    bob: KeyPair
    other: Path  # a second valid bundle of the same channel (sequence 2, another model)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _set_file(st: dict[str, Any], path: str, data: bytes) -> None:
    for s in st["subject"]:
        if s["name"] == path:
            s["digest"]["sha256"] = _sha(data)
    for f in st["predicate"]["files"]:
        if f["path"] == path:
            f["size"] = len(data)


# -- the threats: each tampers with the folder in place --------------------------------------------


def flipped_byte(b: Path, c: Ctx) -> None:
    flip_byte(b / SHARD1, 100)


def truncated(b: Path, c: Ctx) -> None:
    data = (b / SHARD1).read_bytes()
    (b / SHARD1).write_bytes(data[: len(data) // 2])


def missing_file(b: Path, c: Ctx) -> None:
    (b / CONFIG_PATH).unlink()


def extra_file(b: Path, c: Ctx) -> None:
    (b / "models/acme--tiny/notes.txt").write_text("not signed\n")


def swapped_files(b: Path, c: Ctx) -> None:
    one, two = (b / SHARD1).read_bytes(), (b / SHARD2).read_bytes()
    (b / SHARD1).write_bytes(two)
    (b / SHARD2).write_bytes(one)


def aliased_name(b: Path, c: Ctx) -> None:
    """A signed name carried under another case: some filesystems would take one for the other."""
    (b / CONFIG_PATH).rename(b / CONFIG_PATH.replace("config.json", "Config.json"))


def untrusted_signer(b: Path, c: Ctx) -> None:
    resign(b, statement(b), c.bob.signer)


def envelope_of_another_bundle(b: Path, c: Ctx) -> None:
    """A valid, trusted envelope (another bundle's) beside this bundle's manifest copy and files."""
    shutil.copyfile(c.other / ENVELOPE_NAME, b / ENVELOPE_NAME)


def expired(b: Path, c: Ctx) -> None:
    st = statement(b)
    st["predicate"]["bundle"]["expires"] = "2021-06-30T00:00:00Z"
    resign(b, st, c.alice.signer)


def manifest_copy_altered(b: Path, c: Ctx) -> None:
    (b / MANIFEST_NAME).write_bytes((b / MANIFEST_NAME).read_bytes() + b" ")


def manifest_copy_missing(b: Path, c: Ctx) -> None:
    (b / MANIFEST_NAME).unlink()


def envelope_missing(b: Path, c: Ctx) -> None:
    (b / ENVELOPE_NAME).unlink()


def wrong_payload_type(b: Path, c: Ctx) -> None:
    resign(b, statement(b), c.alice.signer, payload_type="text/plain")


def malformed_safetensors(b: Path, c: Ctx) -> None:
    bad = (8).to_bytes(8, "little") + b'{"a": 1}'
    (b / SHARD2).write_bytes(bad)
    st = statement(b)
    _set_file(st, SHARD2, bad)
    resign(b, st, c.alice.signer)


def pickle_not_allowed(b: Path, c: Ctx) -> None:
    data = b"\x80\x04K\x01."  # a pickle: runs code when loaded
    (b / "models/acme--tiny/pytorch_model.bin").write_bytes(data)
    st = statement(b)
    add_file_to_statement(st, "models/acme--tiny/pytorch_model.bin", data)
    resign(b, st, c.alice.signer)


def pickle_named_as_json(b: Path, c: Ctx) -> None:
    """A pickle whose name betrays nothing: judged by the first bytes that were hashed, in every form."""
    data = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94."
    (b / "models/acme--tiny/chat_template.json").write_bytes(data)
    st = statement(b)
    add_file_to_statement(st, "models/acme--tiny/chat_template.json", data)
    resign(b, st, c.alice.signer)


def malformed_gguf(b: Path, c: Ctx) -> None:
    data = b"GGUF" + (3).to_bytes(4, "little") + (10**6).to_bytes(8, "little") + (0).to_bytes(8, "little")
    (b / "models/acme--tiny/model.gguf").write_bytes(data)
    st = statement(b)
    add_file_to_statement(st, "models/acme--tiny/model.gguf", data)
    resign(b, st, c.alice.signer)


def sequence_above_max(b: Path, c: Ctx) -> None:
    st = statement(b)
    st["predicate"]["bundle"]["sequence"] = 2**53
    resign(b, st, c.alice.signer)


def traversal_in_manifest(b: Path, c: Ctx) -> None:
    st = statement(b)
    add_file_to_statement(st, "models/acme--tiny/../../evil.txt", b"x")
    resign(b, st, c.alice.signer)


def case_collision_in_manifest(b: Path, c: Ctx) -> None:
    st = statement(b)
    add_file_to_statement(st, CONFIG_PATH.replace("config", "CONFIG"), (b / CONFIG_PATH).read_bytes())
    resign(b, st, c.alice.signer)


def duplicate_subject(b: Path, c: Ctx) -> None:
    st = statement(b)
    st["subject"].append(dict(st["subject"][0]))
    resign(b, st, c.alice.signer)


# (threat, expected exit code, expected error type, forms it cannot be expressed in)
THREATS: list[tuple[Callable[[Path, Ctx], None], int, str, tuple[str, ...]]] = [
    (flipped_byte, 3, "BundleMismatchError", ()),
    (truncated, 3, "BundleMismatchError", ()),
    (missing_file, 3, "BundleMismatchError", ()),
    (extra_file, 3, "BundleMismatchError", ()),
    (swapped_files, 3, "BundleMismatchError", ()),
    (aliased_name, 3, "UnsafePathError", ()),
    (untrusted_signer, 4, "SignatureError", ()),
    (envelope_of_another_bundle, 3, "IntegrityError", ()),
    (expired, 4, "ExpiredError", ()),
    (manifest_copy_altered, 3, "IntegrityError", ()),
    (manifest_copy_missing, 3, "BundleMismatchError", ("oci",)),  # an artifact always lists its manifest copy
    (envelope_missing, 4, "EnvelopeError", ("oci",)),
    (wrong_payload_type, 4, "EnvelopeError", ()),
    (malformed_safetensors, 3, "MalformedSafetensorsError", ()),
    (pickle_not_allowed, 3, "ContentPolicyError", ()),
    (pickle_named_as_json, 3, "ContentPolicyError", ()),
    (malformed_gguf, 3, "MalformedWeightsError", ()),
    (sequence_above_max, 4, "SequenceJumpError", ()),
    (traversal_in_manifest, 3, "UnsafePathError", ()),
    (case_collision_in_manifest, 3, "UnsafePathError", ()),
    (duplicate_subject, 3, "IntegrityError", ()),
]


# -- carrying a (tampered) folder into the other forms, past airpack's own checks -----------------


def _members(folder: Path) -> list[tuple[str, bytes]]:
    """The envelope, the manifest copy (each if present), then every other file on disk in path order."""
    out = [(n, (folder / n).read_bytes()) for n in (ENVELOPE_NAME, MANIFEST_NAME) if (folder / n).exists()]
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return out + [(rel, (folder / rel).read_bytes()) for rel in files if rel not in (ENVELOPE_NAME, MANIFEST_NAME)]


def _signed_payload(folder: Path) -> bytes:
    import base64

    if (folder / ENVELOPE_NAME).exists():
        return base64.b64decode(json.loads((folder / ENVELOPE_NAME).read_bytes())["payload"])
    return (folder / MANIFEST_NAME).read_bytes()


def as_tar(folder: Path, out: Path) -> Path:
    return craft_tar(out, _members(folder))


def as_parts(folder: Path, out: Path, signer: KeyPair) -> Path:
    out.mkdir()
    tar = as_tar(folder, out.parent / f"{out.name}.tar")
    data = tar.read_bytes()
    layout = plan_layout(len(data), 8192, 0)
    pw = PartsWriter(out, part_names("b.tar", layout), layout)
    pw.write(data)
    parts = pw.finish()
    pw.commit()
    payload = _signed_payload(folder)
    st = build_statement(tar_name="b.tar", tar_size=len(data), tar_sha256=_sha(data), layout=layout, parts=parts,
                         bundle={"name": "tiny", "channel": "tiny", "sequence": 1, "manifest_sha256": _sha(payload)})
    (out / index_name("b.tar")).write_bytes(sign_index(st, signer.signer))
    return out


def as_artifact(folder: Path, reg: OciRegistry) -> str:
    ref = reg.ref("acme/tiny", "v1")
    reg.push_doctored(ref, envelope=(folder / ENVELOPE_NAME).read_bytes(), manifest_copy=(folder / MANIFEST_NAME).read_bytes(),
                      files=reg.bundle_files(folder))
    return ref


def _outcome(fn: Callable[[], object]) -> tuple[int, str]:
    try:
        fn()
    except AirpackError as e:
        return e.exit_code, type(e).__name__
    return 0, "ok"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("threat", "code", "etype", "cannot"), THREATS, ids=[t[0].__name__ for t in THREATS])
def test_threat_gets_the_same_answer_in_every_form(
    threat: Callable[[Path, Ctx], None], code: int, etype: str, cannot: tuple[str, ...], form: str, tmp_path: Path,
    make_bundle: Callable[..., Path], make_key: Callable[..., KeyPair], alice: KeyPair, policy: Path,
    request: pytest.FixtureRequest,
) -> None:
    if form in cannot:
        pytest.skip(f"{threat.__name__} cannot be expressed as {form}")
    bundle = make_bundle()
    other = make_bundle(model_dir=make_model(tmp_path / "src" / "other", seed=5), sequence=2)
    threat(bundle, Ctx(alice=alice, bob=make_key("bob"), other=other))
    pol = load_policy(policy)
    registry = tmp_path / "registry"
    base = make_bundle(model_dir=make_model(tmp_path / "src" / "base", seed=7), name="base", channel="base", repo_id="acme/base")
    install(InstallOptions(bundle=base, registry=registry, policy=pol, ignore_fit=True))
    before, lines = registry_state(registry), len(audit_lines(registry))

    if form == "oci":
        from airpack.ops.oci import OciInstallOptions, PullOptions, install_from_oci, pull

        reg: OciRegistry = request.getfixturevalue("oci_registry")
        ref = parse_ref(as_artifact(bundle, reg))
        access = reg._access()
        read = _outcome(lambda: pull(PullOptions(source=ref, out=tmp_path / "pulled", access=access, policy=pol)))
        assert not (tmp_path / "pulled").exists()
        inst = _outcome(lambda: install_from_oci(OciInstallOptions(
            source=ref, access=access, install=InstallOptions(bundle=tmp_path, registry=registry, policy=pol, ignore_fit=True))))
    else:
        path = {"dir": lambda: bundle, "tar": lambda: as_tar(bundle, tmp_path / "b.tar"),
                "parts": lambda: as_parts(bundle, tmp_path / "parts", alice)}[form]()
        read = _outcome(lambda: verify_bundle(VerifyOptions(bundle=path, policy=pol)))
        inst = _outcome(lambda: install(InstallOptions(bundle=path, registry=registry, policy=pol, ignore_fit=True)))

    assert read == (code, etype), f"{threat.__name__} as {form}: verify gave {read}"
    assert inst == (code, etype), f"{threat.__name__} as {form}: install gave {inst}"
    assert registry_state(registry) == before
    log = audit_lines(registry)
    assert len(log) == lines + 1 and log[-1]["result"] == "refused" and log[-1]["error"]["type"] == etype
