"""The published JSON Schema (manifests/manifest.schema.json) matches what pack really writes.

Real packed manifests of several shapes must validate; broken ones must not,
and where airpack's own parser has the same rule, it must refuse them too.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import REPO, KeyPair
from threat_helpers import CONFIG_PATH, statement

from airpack._json import dumps_canonical
from airpack.errors import AirpackError
from airpack.manifest import MANIFEST_NAME, parse

SCHEMA_PATH = REPO / "manifests" / "manifest.schema.json"


@cache
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    return jsonschema.Draft202012Validator(schema)


def errors(doc: Any) -> list[str]:
    return [e.message for e in validator().iter_errors(doc)]


def test_schema_is_valid_2020_12() -> None:
    validator()


def test_real_manifests_validate(tmp_path: Path, make_bundle: Callable[..., Path], make_key: Callable[..., KeyPair],
                                 tiny_model: Path) -> None:
    carol = make_key("carol", "ecdsa-p256")
    (tiny_model / "optimizer.pkl").write_bytes(b"\x80\x04.")
    (tiny_model / "modeling_tiny.py").write_text("# custom code\n")
    bundles = [
        make_bundle(extra="[policy]\nallow_pickle = true\nallow_code = true\n"
                          '[[targets]]\ngpu = "H100-80GB"\ncount = 2\ncontext = 8192\n'
                          '[[targets]]\ngpu = "L4"\nruntime = "transformers"\nbatch = 4\n'),
        make_bundle(signer=carol, repo_id="single", name="n.1", channel="c-2", sequence=2**53 - 1,
                    extra="[policy]\nallow_pickle = true\nallow_code = true\n"),
    ]
    for b in bundles:
        doc = json.loads((b / MANIFEST_NAME).read_bytes())
        assert errors(doc) == [], b
    st = statement(bundles[0])
    assert len(st["predicate"]["targets"]) == 2
    assert st["predicate"]["models"][0]["pickles"] == ["optimizer.pkl"]


def test_expiring_manifest_validates(bundle: Path, alice: KeyPair) -> None:
    st = statement(bundle)
    st["predicate"]["bundle"]["expires"] = "2031-12-31T23:59:59Z"
    assert errors(st) == []
    parse(dumps_canonical(st))


def set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    here: Any = doc
    for k in keys[:-1]:
        here = here[int(k)] if isinstance(here, list) else here[k]
    last = keys[-1]
    if value is DELETE:
        if isinstance(here, list):
            del here[int(last)]
        else:
            del here[last]
    elif isinstance(here, list):
        here[int(last)] = value
    else:
        here[last] = value


DELETE = object()

# (what, path in the statement, new value, airpack's parser refuses it too)
BROKEN: list[tuple[str, str, Any, bool]] = [
    ("no subject", "subject", DELETE, True),
    ("wrong _type", "_type", "https://in-toto.io/Statement/v0.1", True),
    ("wrong predicate type", "predicateType", "https://airpack.dev/bundle/v2", True),
    ("unknown top-level field", "extra", 1, False),
    ("short digest", "subject.0.digest.sha256", "abc", True),
    ("upper-case digest", "subject.0.digest.sha256", "A" * 64, True),
    ("sha512 instead", "subject.0.digest", {"sha512": "0" * 128}, True),
    ("traversal", "subject.0.name", "../etc/passwd", True),
    ("absolute path", "subject.0.name", "/etc/passwd", True),
    ("backslash", "subject.0.name", "models\\x", True),
    ("dot component", "subject.0.name", "models/./x", True),
    ("empty component", "subject.0.name", "models//x", True),
    ("trailing slash", "subject.0.name", "models/x/", True),
    ("control character", "subject.0.name", "models/x\ny", True),
    ("reserved name", "subject.0.name", MANIFEST_NAME, True),
    ("negative size", "predicate.files.0.size", -1, True),
    ("string size", "predicate.files.0.size", "10", True),
    ("float sequence", "predicate.bundle.sequence", 1.5, True),
    ("negative sequence", "predicate.bundle.sequence", -1, True),
    ("huge sequence", "predicate.bundle.sequence", 2**63, True),
    ("bad name", "predicate.bundle.name", "has space", True),
    ("bad channel", "predicate.bundle.channel", "", True),
    ("local time", "predicate.bundle.created", "2026-01-01T00:00:00+02:00", True),
    ("date only expiry", "predicate.bundle.expires", "2027-01-01", True),
    ("unknown bundle field", "predicate.bundle.sequnce", 1, False),
    ("no policy", "predicate.policy", DELETE, False),
    ("string policy flag", "predicate.policy.allow_pickle", "false", True),
    ("no tool", "predicate.tool", DELETE, False),
    ("short commit", "predicate.models.0.commit", "abc123", True),
    ("unknown source", "predicate.models.0.source", "ftp", True),
    ("model outside models/", "predicate.models.0.path", "elsewhere/acme--tiny", True),
    ("bad repo id", "predicate.models.0.repo_id", "a/b/c", True),
    ("repo id with ..", "predicate.models.0.repo_id", "acme/..", True),
    ("pickles not a list", "predicate.models.0.pickles", "x.bin", True),
    ("target without gpu", "predicate.targets", [{"count": 1, "runtime": "vllm", "batch": 1}], False),
    ("target count 0", "predicate.targets", [{"gpu": "L4", "count": 0, "runtime": "vllm", "batch": 1}], False),
    ("wheel without digest", "predicate.wheels", [{"name": "x", "version": "1", "path": CONFIG_PATH}], True),
]


@pytest.mark.parametrize(("what", "path", "value", "parser_refuses"), BROKEN, ids=[b[0] for b in BROKEN])
def test_schema_rejects_broken_manifests(bundle: Path, what: str, path: str, value: Any, parser_refuses: bool) -> None:
    doc = copy.deepcopy(statement(bundle))
    assert errors(doc) == []
    set_path(doc, path, value)
    assert errors(doc), f"the schema accepted a manifest with {what}"
    if parser_refuses:
        with pytest.raises(AirpackError):
            parse(json.dumps(doc).encode())
