"""The offline model registry: a Hugging Face cache, a wheelhouse, a database and an audit log.

One module per idea, imported only downward (``layout`` at the bottom):

- ``layout``: the folder's names (``repo_folder``, ``ref_name``...) and path safety;
- ``records``: the frozen records the database answers with;
- ``database``: the schema, connecting, and every SQL query and write (``Database``);
- ``audit_log``: the hash-chained audit log;
- ``transactions``: ``Txn`` (stage, journal, apply, commit, finish) and recovery after a crash;
- ``store``: ``Registry`` and ``Writer``, which tie them together (the lock, ``reader()``, ``writer()``).

``from airpack.registry import X`` works for every public name of those modules.
"""

from __future__ import annotations

from ..rules import MAX_SEQUENCE_JUMP
from .audit_log import GENESIS, MAX_AUDIT_LINE, LogReport, audit_base, error_record, hostname
from .database import SCHEMA, SCHEMA_VERSION, Database
from .layout import (
    AUDIT_NAME,
    BUNDLES_DIR,
    DB_NAME,
    DIR_MODE,
    FILE_MODE,
    HUB_DIR,
    KEPT_ENVELOPE,
    KEPT_MANIFEST,
    LOCK_NAME,
    STAGING_DIR,
    WHEELS_DIR,
    Layout,
    kept_bundle_dir,
    kept_ref,
    link_target,
    now_text,
    ref_name,
    repo_folder,
    requirements_name,
)
from .records import (
    AuthorisingPolicy,
    BundleModel,
    BundleRow,
    ChannelHigh,
    InstalledBundle,
    InstalledModel,
    OpRow,
    RefRow,
    StoredFile,
    WheelRow,
)
from .store import Registry, RegistryCopies, Writer
from .transactions import CRASH_ENV, INTENT_NAME, JOURNAL_NAME, MAX_JOURNAL_BYTES, Txn, crash_point

__all__ = [
    "AUDIT_NAME", "BUNDLES_DIR", "CRASH_ENV", "DB_NAME", "DIR_MODE", "FILE_MODE", "GENESIS", "HUB_DIR", "INTENT_NAME", "JOURNAL_NAME",
    "KEPT_ENVELOPE", "KEPT_MANIFEST", "LOCK_NAME",
    "MAX_AUDIT_LINE", "MAX_JOURNAL_BYTES", "MAX_SEQUENCE_JUMP", "SCHEMA", "SCHEMA_VERSION", "STAGING_DIR", "WHEELS_DIR",
    "AuthorisingPolicy", "BundleModel", "BundleRow", "ChannelHigh", "Database", "InstalledBundle", "InstalledModel", "Layout",
    "LogReport", "OpRow", "RefRow", "Registry", "RegistryCopies",
    "StoredFile", "Txn", "WheelRow", "Writer", "audit_base", "crash_point", "error_record", "hostname", "kept_bundle_dir", "kept_ref", "link_target",
    "now_text", "ref_name", "repo_folder", "requirements_name",
]
