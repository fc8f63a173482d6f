"""The content policy: which files are pickled weights or executable code, and who must allow them.

Pickles run arbitrary code when loaded and ``*.py`` files are what
``trust_remote_code`` executes, so both are refused unless the spec (at pack
time, signed into the manifest) and the operator (at install time:
``--allow-pickle``, ``--allow-code``) allow them.

A file is judged by its name and by its first bytes (``airpack.formats``):
a pickle called ``tokenizer.json`` is still a pickle. ``check_file`` is the one
decision, called by pack on the files it copied and by the verification
pipeline on the very bytes it hashed, so both sides judge a file alike;
``docs/threat-model.md`` has the table of formats.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass

from . import formats
from .errors import ContentPolicyError
from .formats import Risk
from .manifest import Manifest

# By name. HDF5 (.h5, .keras) may hold Keras Lambda layers; .ot is a TorchScript archive (tch); all unpickle or unmarshal code.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.joblib", "*.npy", "*.npz", "*.h5", "*.hdf5",
                   "*.keras", "*.ot")
CODE_PATTERNS = ("*.py", "*.pyc", "*.pyo", "*.so", "*.dylib", "*.dll", "*.sh", "*.ipynb")
SAFETENSORS_SUFFIX = ".safetensors"
GGUF_SUFFIX = ".gguf"
WHEELS_PREFIX = "wheels/"  # wheels are pip's business (hash-pinned, installed with --require-hashes), not a model's content


def _match(path: str, patterns: tuple[str, ...]) -> bool:
    base = posixpath.basename(path).lower()
    return any(fnmatch.fnmatchcase(base, p) for p in patterns)


def is_pickle(path: str) -> bool:
    """Pickled by its name: what pack can tell before a byte is fetched."""
    return _match(path, PICKLE_PATTERNS)


def is_code(path: str) -> bool:
    """Code by its name: what pack can tell before a byte is fetched."""
    return _match(path, CODE_PATTERNS)


def is_safetensors(path: str) -> bool:
    return path.lower().endswith(SAFETENSORS_SUFFIX)


def is_gguf(path: str) -> bool:
    return path.lower().endswith(GGUF_SUFFIX)


def prefer_safetensors(paths: list[str]) -> list[str]:
    """Drop pickled weights when the same repo also ships safetensors (the Hub's usual duplicate)."""
    if any(is_safetensors(p) for p in paths):
        return [p for p in paths if not is_pickle(p) or not _is_weight(p)]
    return paths


def _is_weight(path: str) -> bool:
    base = posixpath.basename(path).lower()
    return base.startswith(("pytorch_model", "model", "consolidated", "adapter_model", "tf_model", "rust_model")) or base.endswith(
        (".pt", ".pth", ".ckpt")
    )


def matches(path: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """huggingface_hub-style allow/ignore patterns, matched against the whole relative path."""
    if include and not any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(posixpath.basename(path), p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(posixpath.basename(path), p) for p in exclude)


# -- the one decision -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """What a file is to the content policy: ``risk`` None for data; ``why`` says how that was told."""

    risk: Risk | None
    why: str = ""


@dataclass(frozen=True, kw_only=True)
class Policy:
    """What may pass: the spec's (or the signed manifest's) allow flags, and at verify the files the manifest flags.

    ``listed`` is None at pack time, where the flags are being decided; at
    verify it maps each risk to the bundle paths the signed manifest lists on
    their model (``pickles``, ``code``), and a file of that risk must be
    among them.
    """

    allow_pickle: bool
    allow_code: bool
    listed: Mapping[Risk, frozenset[str]] | None = None
    label: str = ""  # whose files these are, for a pack-time message (a repo id)
    by: str = "the spec"  # whose policy it is, for the message
    exempt: tuple[str, ...] = ()  # bundle folders the policy does not judge (wheels: pip's hash-pinned business)

    @classmethod
    def spec(cls, *, allow_pickle: bool, allow_code: bool, label: str) -> Policy:
        """The spec's policy at pack time, for the files of one model (paths relative to the model's folder)."""
        return cls(allow_pickle=allow_pickle, allow_code=allow_code, label=label)

    @classmethod
    def signed(cls, manifest: Manifest) -> Policy:
        """The policy a signed manifest carries, with the files it flags."""
        listed = {
            Risk.PICKLE: frozenset(f"{m.prefix}/{p}" for m in manifest.models for p in m.pickles),
            Risk.CODE: frozenset(f"{m.prefix}/{p}" for m in manifest.models for p in m.code),
        }
        return cls(allow_pickle=manifest.allow_pickle, allow_code=manifest.allow_code, listed=listed,
                   by="the bundle's signed policy", exempt=(WHEELS_PREFIX,))


def classify(path: str, head: bytes | None, size: int) -> Finding:
    """By name first (the reviewed spec's vocabulary), then by the first bytes when they are given.

    A safetensors file is left to its header check (the 8-byte length that
    opens it can look like anything); a GGUF file, by name or by magic, must
    have a sane header (``MalformedWeightsError`` otherwise).
    """
    if is_code(path):
        return Finding(Risk.CODE, "its name marks it as code")
    if is_pickle(path):
        return Finding(Risk.PICKLE, "its name marks it as pickled")
    if head is None or is_safetensors(path):
        return Finding(None)
    found = formats.sniff(head)
    if is_gguf(path) or (found is not None and found.fmt == "gguf"):
        formats.check_gguf(head, size, display=path)
        return Finding(None, "a GGUF file with a sane header")
    if found is None:
        return Finding(None)
    return Finding(found.risk, found.why)


def check_file(policy: Policy, path: str, head: bytes | None, size: int) -> Finding:
    """The content policy for one file (``head``: its first bytes, or None to judge by name): its finding, or exit 3.

    Pack calls it on each file it copied (``policy.listed`` None), the
    pipeline on the bytes it hashed (the signed policy), and step 5 of the
    pipeline with names only.
    """
    if path.startswith(policy.exempt):
        return Finding(None, "not judged here (a wheel, which pip installs with --require-hashes)")
    found = classify(path, head, size)
    if found.risk is None:
        return found
    allowed = policy.allow_pickle if found.risk is Risk.PICKLE else policy.allow_code
    kind = "pickled weights" if found.risk is Risk.PICKLE else "code files"
    if policy.listed is None:
        if not allowed:
            who = f"{policy.label}: " if policy.label else ""
            key = "allow_pickle" if found.risk is Risk.PICKLE else "allow_code"
            raise ContentPolicyError(f"{who}{kind} are not allowed by {policy.by}: {path} ({found.why})", path=path,
                                     hint=f"Exclude {path} in the spec's include/exclude, or set {key} = true in its "
                                          "[policy] only if you trust what it runs.")
        return found
    what = "pickled file" if found.risk is Risk.PICKLE else "code file"
    if not allowed:
        raise ContentPolicyError(f"{what} {path} is not allowed by {policy.by} ({found.why})", path=path)
    if path not in policy.listed[found.risk]:
        flag = "pickles" if found.risk is Risk.PICKLE else "code"
        raise ContentPolicyError(f"{what} {path} is not allowed by {policy.by}: its model does not list it among its "
                                 f"{flag} ({found.why})", path=path)
    return found


def check_signed_policy(manifest: Manifest) -> None:
    """Step 5 of the pipeline, before a file is read: every file the names mark must be flagged and allowed (exit 3)."""
    policy = Policy.signed(manifest)
    for f in manifest.files:
        check_file(policy, f.path, None, f.size)


def flagged(manifest: Manifest, risk: Risk) -> list[str]:
    """The bundle paths of ``risk`` a signed manifest carries: those its models list, and those their names mark."""
    policy = Policy.signed(manifest)
    assert policy.listed is not None
    named = {f.path for f in manifest.files if not f.path.startswith(policy.exempt) and classify(f.path, None, f.size).risk is risk}
    listed = policy.listed
    return sorted(listed[risk] | named)


_CONSENT = {
    Risk.PICKLE: ("pickled weights", "--allow-pickle",
                  "Loading a pickle runs code from the file; pass --allow-pickle only if you trust its signers for that."),
    Risk.CODE: ("code", "--allow-code",
                "Code in a model folder runs when a loader trusts remote code (trust_remote_code=True) or a script is "
                "started; pass --allow-code only if you trust its signers for that."),
}


def check_operator_consent(manifest: Manifest, *, allow_pickle: bool, allow_code: bool) -> None:
    """What the signed policy allowed still needs the operator: ``--allow-pickle`` for pickles, ``--allow-code`` for code.

    Called before a file is read, on what the manifest flags and the names
    mark; a file whose bytes show a pickle or a program the manifest does not
    flag is refused anyway once it is hashed, so nothing escapes consent.
    """
    for risk, allowed in ((Risk.PICKLE, allow_pickle), (Risk.CODE, allow_code)):
        files = flagged(manifest, risk)
        if files and not allowed:
            what, flag, hint = _CONSENT[risk]
            raise ContentPolicyError(f"bundle {manifest.name} carries {what} ({files[0]}); installing it needs {flag}",
                                     path=files[0], hint=hint)
