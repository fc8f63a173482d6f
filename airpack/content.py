"""The content policy: which files are pickled weights or executable code.

Pickles run arbitrary code when loaded and ``*.py`` files are what
``trust_remote_code`` executes, so both are refused unless the spec (at pack
time) and the operator (at install time) allow them.
"""

from __future__ import annotations

import fnmatch
import posixpath

from .errors import ContentPolicyError
from .manifest import Manifest

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.joblib", "*.npy", "*.npz")
CODE_PATTERNS = ("*.py", "*.pyc", "*.pyo", "*.so", "*.dylib", "*.dll", "*.sh", "*.ipynb")
SAFETENSORS_SUFFIX = ".safetensors"


def _match(path: str, patterns: tuple[str, ...]) -> bool:
    base = posixpath.basename(path).lower()
    return any(fnmatch.fnmatchcase(base, p) for p in patterns)


def is_pickle(path: str) -> bool:
    return _match(path, PICKLE_PATTERNS)


def is_code(path: str) -> bool:
    return _match(path, CODE_PATTERNS)


def is_safetensors(path: str) -> bool:
    return path.lower().endswith(SAFETENSORS_SUFFIX)


def prefer_safetensors(paths: list[str]) -> list[str]:
    """Drop pickled weights when the same repo also ships safetensors (the Hub's usual duplicate)."""
    if any(is_safetensors(p) for p in paths):
        return [p for p in paths if not is_pickle(p) or not _is_weight(p)]
    return paths


def _is_weight(path: str) -> bool:
    base = posixpath.basename(path).lower()
    return base.startswith(("pytorch_model", "model", "consolidated", "adapter_model")) or base.endswith(
        (".pt", ".pth", ".ckpt")
    )


def matches(path: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """huggingface_hub-style allow/ignore patterns, matched against the whole relative path."""
    if include and not any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(posixpath.basename(path), p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(posixpath.basename(path), p) for p in exclude)


WHEELS_PREFIX = "wheels/"  # wheels are pip's business (hash-pinned), not a model's content


def check_signed_policy(manifest: Manifest) -> None:
    """Pickles and code must be both listed on their model and allowed by the signed policy (exit 3 otherwise)."""
    flagged_p = {f"{m.prefix}/{p}" for m in manifest.models for p in m.pickles}
    flagged_c = {f"{m.prefix}/{p}" for m in manifest.models for p in m.code}
    for f in manifest.files:
        if f.path.startswith(WHEELS_PREFIX):
            continue
        if is_pickle(f.path) and (not manifest.allow_pickle or f.path not in flagged_p):
            raise ContentPolicyError(f"pickled file {f.path} is not allowed by the bundle's signed policy", path=f.path)
        if is_code(f.path) and (not manifest.allow_code or f.path not in flagged_c):
            raise ContentPolicyError(f"code file {f.path} is not allowed by the bundle's signed policy", path=f.path)


def check_operator_consent(manifest: Manifest, *, allow_pickle: bool) -> None:
    """Pickles the signed policy allowed still need the operator's ``--allow-pickle`` to be installed."""
    pickles = [f"{m.prefix}/{p}" for m in manifest.models for p in m.pickles]
    pickles += [f.path for f in manifest.files if is_pickle(f.path) and not f.path.startswith(WHEELS_PREFIX)]
    if pickles and not allow_pickle:
        first = sorted(set(pickles))[0]
        raise ContentPolicyError(
            f"bundle {manifest.name} carries pickled weights ({first}); installing them needs --allow-pickle", path=first,
            hint="Loading a pickle runs code from the file; pass --allow-pickle only if you trust its signers for that.",
        )
