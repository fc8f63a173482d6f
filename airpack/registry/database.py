"""The registry database (SQLite, WAL): its schema, opening it, and every query and write airpack makes.

It exists so that SQL lives in one module: the operations (``airpack.ops``)
ask ``Database`` typed questions (``channel_high``, ``models``, ``refs``...)
and get frozen dataclasses back, never rows. ``Database`` is the connection
itself (a ``sqlite3.Connection`` subclass), so a read-only connection from
``Registry.reader()`` and the writer's connection answer the same methods.

The commit point of every registry write is ``Database.recording``: one
SQLite transaction holding the rows and the write's txn id (see
``transactions``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import AirpackError, LockHeldError, NotInstalledError, RegistryError, ResourceError
from .layout import DB_NAME, FILE_MODE, Layout, now_text
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

SCHEMA_VERSION = 2

# Each step takes a registry database from version N to N + 1; ``connect`` runs them in one SQLite transaction with the
# version bump, so an old registry is carried forward with every row kept (2: what authorised each install, and the
# digest of the envelope kept under bundles/).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE bundles ADD COLUMN policy_sha256 TEXT",
        "ALTER TABLE bundles ADD COLUMN policy_threshold INTEGER",
        "ALTER TABLE bundles ADD COLUMN policy_keyids TEXT",
        "ALTER TABLE bundles ADD COLUMN envelope_sha256 TEXT",
    ),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ops (
    txn TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS bundles (
    id INTEGER PRIMARY KEY,
    txn TEXT NOT NULL REFERENCES ops(txn),
    name TEXT NOT NULL,
    channel TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    created TEXT NOT NULL,
    expires TEXT,
    signers TEXT NOT NULL,
    source TEXT NOT NULL,
    installed_at TEXT NOT NULL,
    installed_by TEXT NOT NULL,
    downgrade INTEGER NOT NULL DEFAULT 0,
    fit TEXT,
    state TEXT NOT NULL CHECK (state IN ('active', 'removed')),
    removed_at TEXT,
    policy_sha256 TEXT,
    policy_threshold INTEGER,
    policy_keyids TEXT,
    envelope_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS bundles_digest ON bundles(manifest_sha256);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    bundle_id INTEGER NOT NULL REFERENCES bundles(id) ON DELETE CASCADE,
    repo_id TEXT NOT NULL,
    ref TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    revision TEXT,
    source TEXT NOT NULL,
    license TEXT
);
CREATE INDEX IF NOT EXISTS models_repo ON models(repo_id);
CREATE TABLE IF NOT EXISTS files (
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (model_id, path)
);
CREATE INDEX IF NOT EXISTS files_sha ON files(sha256);
CREATE TABLE IF NOT EXISTS wheels (
    bundle_id INTEGER NOT NULL REFERENCES bundles(id) ON DELETE CASCADE,
    filename TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (bundle_id, filename)
);
CREATE TABLE IF NOT EXISTS refs (
    repo_id TEXT NOT NULL,
    ref TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    model_id INTEGER REFERENCES models(id) ON DELETE SET NULL,
    PRIMARY KEY (repo_id, ref)
);
CREATE TABLE IF NOT EXISTS channels (
    channel TEXT PRIMARY KEY,
    sequence INTEGER NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    bundle TEXT NOT NULL
);
"""

_MODELS = """
    SELECT m.id, m.repo_id, m.ref, m.commit_sha, m.revision, m.source, m.license,
           b.id AS bundle_id, b.name, b.channel, b.sequence, b.manifest_sha256, b.signers,
           b.installed_at, b.installed_by, b.policy_sha256, b.policy_threshold, b.policy_keyids,
           (SELECT COUNT(*) FROM files f WHERE f.model_id = m.id) AS nfiles,
           (SELECT COALESCE(SUM(size), 0) FROM files f WHERE f.model_id = m.id) AS nbytes,
           (SELECT COUNT(*) FROM wheels w WHERE w.bundle_id = b.id) AS nwheels,
           r.commit_sha AS ref_commit,
           (r.commit_sha = m.commit_sha AND m.id = COALESCE(r.model_id, (
               SELECT MAX(m2.id) FROM models m2 JOIN bundles b2 ON b2.id = m2.bundle_id
               WHERE m2.repo_id = m.repo_id AND m2.ref = m.ref AND m2.commit_sha = m.commit_sha AND b2.state = 'active'
           ))) AS is_current
    FROM models m JOIN bundles b ON b.id = m.bundle_id
    LEFT JOIN refs r ON r.repo_id = m.repo_id AND r.ref = m.ref
    WHERE b.state = 'active'
"""


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _policy(row: sqlite3.Row) -> AuthorisingPolicy | None:
    """The authorising policy of a bundle row; None for an install recorded before schema 2."""
    if row["policy_threshold"] is None:
        return None
    keyids = json.loads(row["policy_keyids"]) if row["policy_keyids"] else []
    return AuthorisingPolicy(sha256=row["policy_sha256"], threshold=int(row["policy_threshold"]), keyids=tuple(keyids))


# -- the connection --------------------------------------------------------------------------------


class Database(sqlite3.Connection):
    """An open registry database; ``connect`` makes one. Reads work on any connection, writes need the writer's."""

    path: Path
    pending: str | None = None  # set by ``Registry.reader``: an interrupted write it could not settle, and why

    # the commit point

    @contextlib.contextmanager
    def recording(self, txn: str, kind: str) -> Iterator[None]:
        """One SQLite transaction recording the txn id with the rows written inside the block; rolled back on any error."""
        try:
            self.execute("BEGIN IMMEDIATE")
            try:
                self.execute("INSERT INTO ops(txn, kind, at) VALUES (?, ?, ?)", (txn, kind, now_text()))
                yield
                self.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise db_error(e, self.path) from None

    def txn_committed(self, txn: str) -> bool:
        return self.execute("SELECT 1 FROM ops WHERE txn = ?", (txn,)).fetchone() is not None

    def any_committed(self) -> bool:
        """Whether any write ever committed here (a new registry whose first install failed has none)."""
        return self.execute("SELECT 1 FROM ops LIMIT 1").fetchone() is not None

    # bundles and channels

    def channel_high(self, channel: str) -> ChannelHigh | None:
        row = self.execute("SELECT sequence, manifest_sha256, bundle FROM channels WHERE channel = ?", (channel,)).fetchone()
        return None if row is None else ChannelHigh(sequence=int(row[0]), manifest_sha256=str(row[1]), bundle=str(row[2]))

    def channels(self) -> list[tuple[str, ChannelHigh]]:
        """Every channel the registry has seen, with its highest installed bundle (rollback protection), by name."""
        rows = self.execute("SELECT channel, sequence, manifest_sha256, bundle FROM channels ORDER BY channel")
        return [(str(r[0]), ChannelHigh(sequence=int(r[1]), manifest_sha256=str(r[2]), bundle=str(r[3]))) for r in rows]

    def active_bundle_with_digest(self, manifest_sha256: str) -> BundleRow | None:
        """The newest active bundle with exactly this manifest (the same bundle installed before)."""
        row = self.execute(
            "SELECT id, name, sequence FROM bundles WHERE manifest_sha256 = ? AND state = 'active' ORDER BY id DESC LIMIT 1",
            (manifest_sha256,),
        ).fetchone()
        return None if row is None else BundleRow(id=int(row[0]), name=str(row[1]), sequence=int(row[2]))

    def active_bundle_ids(self, name: str) -> list[int]:
        return [int(r[0]) for r in self.execute("SELECT id FROM bundles WHERE name = ? AND state = 'active' ORDER BY id", (name,))]

    def bundle_names(self, bundle_ids: list[int]) -> list[str]:
        if not bundle_ids:
            return []
        rows = self.execute(f"SELECT name FROM bundles WHERE id IN ({_marks(len(bundle_ids))})", bundle_ids)
        return sorted({str(r[0]) for r in rows})

    def latest_bundle_with_wheels(self, name: str, *, excluding: list[int]) -> BundleRow | None:
        """The newest other active bundle of this name that installed wheels (its requirements file stays)."""
        row = self.execute(
            f"""SELECT b.id, b.name, b.sequence FROM bundles b WHERE b.name = ? AND b.state = 'active'
                AND b.id NOT IN ({_marks(len(excluding))}) AND EXISTS (SELECT 1 FROM wheels w WHERE w.bundle_id = b.id)
                ORDER BY b.id DESC LIMIT 1""",
            (name, *excluding),
        ).fetchone()
        return None if row is None else BundleRow(id=int(row[0]), name=str(row[1]), sequence=int(row[2]))

    # models, files, refs

    def models(self, *, repo_id: str | None = None) -> list[InstalledModel]:
        """Every installed model (of one repo), with its bundle, in repo and install order."""
        q = _MODELS
        args: tuple[Any, ...] = ()
        if repo_id is not None:
            q += " AND m.repo_id = ?"
            args = (repo_id,)
        q += " ORDER BY m.repo_id, m.id"
        return [
            InstalledModel(
                model_id=r["id"], repo_id=r["repo_id"], ref=r["ref"], commit=r["commit_sha"], revision=r["revision"],
                source=r["source"], license=r["license"], bundle_id=r["bundle_id"], bundle=r["name"], channel=r["channel"],
                sequence=r["sequence"], manifest_sha256=r["manifest_sha256"], signers=tuple(json.loads(r["signers"])),
                installed_at=r["installed_at"], installed_by=r["installed_by"], current=bool(r["is_current"]),
                files=r["nfiles"], bytes=r["nbytes"], has_wheels=r["nwheels"] > 0, policy=_policy(r),
                ref_commit=r["ref_commit"],
            )
            for r in self.execute(q, args)
        ]

    def bundle_models(self, bundle_id: int) -> list[BundleModel]:
        rows = self.execute(
            """SELECT m.id, m.repo_id, m.ref, m.commit_sha, m.revision, m.source, m.license, r.commit_sha AS current
               FROM models m LEFT JOIN refs r ON r.repo_id = m.repo_id AND r.ref = m.ref WHERE m.bundle_id = ?""",
            (bundle_id,),
        )
        return [BundleModel(model_id=r["id"], repo_id=r["repo_id"], ref=r["ref"], commit=r["commit_sha"], revision=r["revision"],
                            source=r["source"], license=r["license"], ref_commit=r["current"]) for r in rows]

    def model_files(self, model_id: int) -> list[StoredFile]:
        rows = self.execute("SELECT path, sha256, size FROM files WHERE model_id = ? ORDER BY path", (model_id,))
        return [StoredFile(path=str(r[0]), sha256=str(r[1]), size=int(r[2])) for r in rows]

    def refs(self, repo_id: str) -> list[RefRow]:
        rows = self.execute("SELECT ref, commit_sha FROM refs WHERE repo_id = ? ORDER BY ref", (repo_id,))
        return [RefRow(ref=str(r[0]), commit=str(r[1])) for r in rows]

    # blobs and wheels

    def has_file(self, sha256: str) -> bool:
        """Whether any installed model file holds these bytes."""
        return self.execute("SELECT 1 FROM files WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone() is not None

    def file_size(self, sha256: str) -> int | None:
        row = self.execute("SELECT size FROM files WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone()
        return None if row is None else int(row[0])

    def repos_holding(self, sha256: str) -> list[str]:
        """Repos whose active models hold a file with these bytes."""
        rows = self.execute(
            """SELECT DISTINCT m.repo_id FROM files f JOIN models m ON m.id = f.model_id
               JOIN bundles b ON b.id = m.bundle_id WHERE f.sha256 = ? AND b.state = 'active'""",
            (sha256,),
        )
        return [str(r[0]) for r in rows]

    def repo_holds(self, repo_id: str, sha256: str) -> bool:
        row = self.execute(
            """SELECT 1 FROM files f JOIN models m ON m.id = f.model_id JOIN bundles b ON b.id = m.bundle_id
               WHERE m.repo_id = ? AND f.sha256 = ? AND b.state = 'active' LIMIT 1""",
            (repo_id, sha256),
        ).fetchone()
        return row is not None

    def wheel_files_holding(self, sha256: str) -> list[str]:
        """Wheelhouse file names of active bundles with these bytes."""
        rows = self.execute(
            "SELECT DISTINCT w.filename FROM wheels w JOIN bundles b ON b.id = w.bundle_id WHERE w.sha256 = ? AND b.state = 'active'",
            (sha256,),
        )
        return [str(r[0]) for r in rows]

    def wheel_sha(self, filename: str) -> str | None:
        row = self.execute(
            "SELECT w.sha256 FROM wheels w JOIN bundles b ON b.id = w.bundle_id WHERE w.filename = ? AND b.state = 'active' LIMIT 1",
            (filename,),
        ).fetchone()
        return None if row is None else str(row[0])

    def active_wheels(self) -> dict[str, str]:
        """filename -> sha256 of every wheel an active bundle installed."""
        rows = self.execute("SELECT w.filename, w.sha256 FROM wheels w JOIN bundles b ON b.id = w.bundle_id WHERE b.state = 'active'")
        return {str(r[0]): str(r[1]) for r in rows}

    def bundle_wheels(self, bundle_ids: list[int]) -> list[WheelRow]:
        if not bundle_ids:
            return []
        rows = self.execute(
            f"SELECT filename, name, version, sha256, size FROM wheels WHERE bundle_id IN ({_marks(len(bundle_ids))})", bundle_ids
        )
        return [WheelRow(filename=str(r[0]), name=str(r[1]), version=str(r[2]), sha256=str(r[3]), size=int(r[4])) for r in rows]

    def wheel_used_elsewhere(self, filename: str, *, excluding: list[int]) -> bool:
        """Whether an active bundle other than ``excluding`` installed this wheel file."""
        row = self.execute(
            f"""SELECT 1 FROM wheels w JOIN bundles b ON b.id = w.bundle_id
                WHERE w.filename = ? AND b.state = 'active' AND w.bundle_id NOT IN ({_marks(len(excluding))}) LIMIT 1""",
            (filename, *excluding),
        ).fetchone()
        return row is not None

    # what ``airpack check`` compares the folder with

    def ops(self) -> list[OpRow]:
        """Every committed registry write, oldest first: each must have its line in the audit log."""
        rows = self.execute("SELECT txn, kind, at FROM ops ORDER BY at, txn")
        return [OpRow(txn=str(r[0]), kind=str(r[1]), at=str(r[2])) for r in rows]

    def active_bundles(self) -> list[InstalledBundle]:
        rows = self.execute(
            """SELECT id, name, channel, sequence, manifest_sha256, envelope_sha256, policy_sha256, policy_threshold, policy_keyids
               FROM bundles WHERE state = 'active' ORDER BY id"""
        )
        return [InstalledBundle(id=int(r["id"]), name=str(r["name"]), channel=str(r["channel"]), sequence=int(r["sequence"]),
                                manifest_sha256=str(r["manifest_sha256"]), envelope_sha256=r["envelope_sha256"], policy=_policy(r))
                for r in rows]

    def bundle_digests(self) -> set[str]:
        """The manifest digest of every bundle ever installed, removed ones too (their kept envelopes stay)."""
        return {str(r[0]) for r in self.execute("SELECT DISTINCT manifest_sha256 FROM bundles")}

    def active_wheel_files(self) -> list[WheelRow]:
        """Each wheelhouse file an active bundle installed, once."""
        rows = self.execute(
            """SELECT w.filename, MIN(w.name), MIN(w.version), MIN(w.sha256), MIN(w.size) FROM wheels w
               JOIN bundles b ON b.id = w.bundle_id WHERE b.state = 'active' GROUP BY w.filename ORDER BY w.filename"""
        )
        return [WheelRow(filename=str(r[0]), name=str(r[1]), version=str(r[2]), sha256=str(r[3]), size=int(r[4])) for r in rows]

    def all_refs(self) -> list[tuple[str, RefRow]]:
        """(repo_id, ref) of every ref the database records."""
        rows = self.execute("SELECT repo_id, ref, commit_sha FROM refs ORDER BY repo_id, ref")
        return [(str(r[0]), RefRow(ref=str(r[1]), commit=str(r[2]))) for r in rows]

    # writes (inside ``recording``)

    def insert_bundle(self, *, txn: str, name: str, channel: str, sequence: int, manifest_sha256: str, created: str,
                      expires: str | None, signers: list[dict[str, str]], source: str, installed_by: str, downgrade: bool,
                      fit: list[dict[str, Any]] | None, policy: AuthorisingPolicy | None = None,
                      envelope_sha256: str | None = None) -> int:
        """One installed bundle; ``policy`` is what authorised it, ``envelope_sha256`` the digest of its kept envelope."""
        cur = self.execute(
            """INSERT INTO bundles(txn, name, channel, sequence, manifest_sha256, created, expires, signers, source,
                                   installed_at, installed_by, downgrade, fit, state, policy_sha256, policy_threshold,
                                   policy_keyids, envelope_sha256)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'active', ?, ?, ?, ?)""",
            (txn, name, channel, sequence, manifest_sha256, created, expires, json.dumps(signers), source, now_text(),
             installed_by, int(downgrade), json.dumps(fit) if fit is not None else None,
             policy.sha256 if policy else None, policy.threshold if policy else None,
             json.dumps(list(policy.keyids)) if policy else None, envelope_sha256),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def insert_model(self, bundle_id: int, *, repo_id: str, ref: str, commit: str, revision: str | None, source: str,
                     license: str | None) -> int:
        cur = self.execute(
            "INSERT INTO models(bundle_id, repo_id, ref, commit_sha, revision, source, license) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (bundle_id, repo_id, ref, commit, revision, source, license),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def insert_files(self, model_id: int, files: Iterable[tuple[str, str, int]]) -> None:
        """(path, sha256, size) of each file of a model."""
        self.executemany("INSERT INTO files(model_id, path, sha256, size) VALUES (?, ?, ?, ?)",
                         [(model_id, rel, sha, size) for rel, sha, size in files])

    def insert_wheels(self, bundle_id: int, wheels: Iterable[WheelRow]) -> None:
        self.executemany(
            "INSERT INTO wheels(bundle_id, filename, name, version, sha256, size) VALUES (?, ?, ?, ?, ?, ?)",
            [(bundle_id, w.filename, w.name, w.version, w.sha256, w.size) for w in wheels],
        )

    def raise_channel(self, channel: str, *, sequence: int, manifest_sha256: str, bundle: str) -> None:
        """Record ``sequence`` as the channel's highest unless a higher one is recorded already."""
        self.execute(
            """INSERT INTO channels(channel, sequence, manifest_sha256, bundle) VALUES (?, ?, ?, ?)
               ON CONFLICT(channel) DO UPDATE SET sequence = excluded.sequence, manifest_sha256 = excluded.manifest_sha256,
               bundle = excluded.bundle WHERE excluded.sequence >= channels.sequence""",
            (channel, sequence, manifest_sha256, bundle),
        )

    def set_ref(self, repo_id: str, ref: str, commit: str, model_id: int | None) -> None:
        self.execute(
            """INSERT INTO refs(repo_id, ref, commit_sha, model_id) VALUES (?, ?, ?, ?)
               ON CONFLICT(repo_id, ref) DO UPDATE SET commit_sha = excluded.commit_sha, model_id = excluded.model_id""",
            (repo_id, ref, commit, model_id),
        )

    def delete_ref(self, repo_id: str, ref: str) -> None:
        self.execute("DELETE FROM refs WHERE repo_id = ? AND ref = ?", (repo_id, ref))

    def delete_models(self, model_ids: list[int]) -> None:
        """The model rows, and with them (cascade) their file rows."""
        if model_ids:
            self.execute(f"DELETE FROM models WHERE id IN ({_marks(len(model_ids))})", model_ids)

    def delete_wheels(self, bundle_ids: list[int]) -> None:
        if bundle_ids:
            self.execute(f"DELETE FROM wheels WHERE bundle_id IN ({_marks(len(bundle_ids))})", bundle_ids)

    def retire_empty_bundles(self, bundle_ids: list[int]) -> None:
        """Mark each bundle removed once it holds no model and no wheel any more."""
        at = now_text()
        for bid in bundle_ids:
            self.execute(
                """UPDATE bundles SET state = 'removed', removed_at = ? WHERE id = ?
                   AND NOT EXISTS (SELECT 1 FROM models WHERE bundle_id = ?) AND NOT EXISTS (SELECT 1 FROM wheels WHERE bundle_id = ?)""",
                (at, bid, bid, bid),
            )


# -- opening ----------------------------------------------------------------------------------


def db_error(e: sqlite3.Error, path: Path) -> AirpackError:
    msg = str(e)
    if isinstance(e, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg):
        return LockHeldError(f"registry database {path} is busy: {msg}", path=str(path))
    if isinstance(e, sqlite3.OperationalError) and ("disk" in msg and "full" in msg):
        return ResourceError(f"registry database {path}: {msg}", path=str(path))
    return RegistryError(f"registry database {path}: {msg}", path=str(path),
                         hint="The registry database is damaged or not airpack's; restore it from a backup.")


def _connect_read_only(layout: Layout, path: Path) -> Database:
    """A read-only connection that also works where nothing may be written (a read-only mount, ``chmod -R a-w``).

    A WAL database opened ``mode=ro`` still needs its ``-shm`` file: SQLite
    creates it when it is missing, and fails ("attempt to write a readonly
    database") when the folder is read-only. With no ``-wal`` file (or an
    empty one) every committed row is in the main file, so ``immutable=1``,
    which reads only that file, gives the same answer. With a non-empty
    ``-wal`` it would silently miss the newest commits, so that case is
    refused with what to do instead.
    """
    base = "file:" + urllib.parse.quote(os.fsencode(path))  # the bytes: a folder name that is not UTF-8 still opens
    conn: Database | None = None
    try:
        conn = sqlite3.connect(base + "?mode=ro", uri=True, isolation_level=None, timeout=30, factory=Database)
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # the first read is where a read-only folder fails
        return conn
    except sqlite3.OperationalError as e:
        if conn is not None:
            conn.close()
        if "readonly" not in str(e) and "unable to open" not in str(e):
            raise
        first = e
    wal = layout.lstat(DB_NAME + "-wal")
    if wal is not None and wal.st_size > 0:
        raise RegistryError(
            f"registry database {path} cannot be read here ({first}): the folder is read-only and {DB_NAME}-wal "
            "holds commits not yet folded into the database file", path=str(path),
            hint="Run any airpack write command on the registry where it is writable (that folds the log in), "
                 "or copy the registry to a writable place and read the copy.")
    return sqlite3.connect(base + "?mode=ro&immutable=1", uri=True, isolation_level=None, timeout=30, factory=Database)


def _old_version(value: object) -> int | None:
    """The schema version ``value`` names if this airpack can migrate it forward, else None."""
    v = str(value)
    return int(v) if v.isdigit() and int(v) in MIGRATIONS and int(v) < SCHEMA_VERSION else None


def _migrate(conn: Database) -> None:
    """Carry an older schema forward, step by step, in one SQLite transaction with the version bump (all or nothing)."""
    row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    if row is None or _old_version(row[0]) is None:
        return
    conn.execute("BEGIN IMMEDIATE")  # the version is read again inside: another process may have migrated meanwhile
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        version = _old_version(row[0]) if row is not None else None
        if version is None:  # current, or unknown (refused by connect)
            conn.execute("COMMIT")
            return
        while version < SCHEMA_VERSION:
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            version += 1
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _upgrade_for_reader(layout: Layout, path: Path, found: str) -> None:
    """A reader met an older schema: migrate it (adding columns only, every row kept) or say what to do."""
    try:
        connect(layout, write=True).close()
    except (AirpackError, OSError) as e:
        raise RegistryError(
            f"registry database {path} has schema {found}; this airpack reads {SCHEMA_VERSION} and could not upgrade it: {e}",
            path=str(path),
            hint="Run this command once as a user who may write the registry: the upgrade adds columns and keeps every row.",
        ) from None


def connect_empty(layout: Layout) -> Database:
    """An empty registry database in memory, for a registry folder that has no ``registry.db`` yet.

    It answers the writer's questions (no channel, no bundle, no blob) while a
    first install is still being checked, so that a refused first install
    creates no database file: the real one is created when the first thing
    must be written (``store.Writer.begin``).
    """
    conn = sqlite3.connect(":memory:", isolation_level=None, factory=Database)
    conn.path = layout.path(DB_NAME)
    conn.row_factory = sqlite3.Row
    conn.executescript(SCHEMA + f"INSERT INTO meta(key, value) VALUES ('schema', '{SCHEMA_VERSION}');")
    return conn


def connect(layout: Layout, *, write: bool) -> Database:
    """Open the database (read-only unless ``write``; the writer creates the schema) and check its schema version."""
    path = layout.path(DB_NAME)
    layout.check_plain_file(DB_NAME)
    try:
        if write:
            conn = sqlite3.connect(str(path), isolation_level=None, timeout=30, factory=Database)
        else:
            if not path.exists():
                raise NotInstalledError(f"{layout.root} is not an airpack registry (no {DB_NAME})", path=str(layout.root))
            conn = _connect_read_only(layout, path)
        conn.path = path
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        if write:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(
                "BEGIN IMMEDIATE;" + SCHEMA
                + f"INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', '{SCHEMA_VERSION}'); COMMIT;"
            )
            _migrate(conn)
            for f in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
                if layout.check_plain_file(f):
                    os.chmod(layout.path(f), FILE_MODE)
        row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    except sqlite3.Error as e:
        raise db_error(e, path) from None
    if not write and row is not None and _old_version(row[0]) is not None:
        conn.close()
        _upgrade_for_reader(layout, path, str(row[0]))
        return connect(layout, write=False)
    if row is None or row[0] != str(SCHEMA_VERSION):
        conn.close()
        raise RegistryError(f"registry database {path} has schema {row[0] if row else 'none'}; this airpack reads {SCHEMA_VERSION}",
                            path=str(path))
    return conn
