"""The content policy: which files are pickled weights or executable code.

Pickles run arbitrary code when loaded and ``*.py`` files are what
``trust_remote_code`` executes, so both are refused unless the spec (at pack
time) and the operator (at install time) allow them.
"""

from __future__ import annotations

import fnmatch
import posixpath

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
