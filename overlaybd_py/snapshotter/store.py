"""Snapshot metadata in SQLite: crash-safe and self-describing.

One row per snapshot: its containerd name (the key while active or a view, the name once
committed), kind, parent, labels, usage, and what overlaybd-py adds: the overlaybd *layer*
a committed snapshot stands for (a registry blob or a local ``overlaybd.commit`` file), the
*extract* flag of an active snapshot that unpacks an overlaybd blob, and the *lower* (the
committed snapshot whose merged device an active or view snapshot stacks on).

Crash safety: WAL journal with ``synchronous=FULL``; every change is one transaction. Rows
are inserted before their directory is populated and deleted before it is removed, so after
a crash the database never names a snapshot that is not there; a directory the database
does not name is an orphan that ``Cleanup`` removes. ``PRAGMA user_version`` carries the
schema version; a database of another version is refused, never misread.

Thread-safe: one connection, every call under one lock (gRPC handlers run on threads).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from ..errors import UsageError

__all__ = ["Kind", "Snapshot", "Store"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    kind INTEGER NOT NULL,
    parent_id INTEGER REFERENCES snapshots(id),
    created REAL NOT NULL,
    updated REAL NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    layer TEXT,
    extract INTEGER NOT NULL DEFAULT 0,
    lower_id INTEGER REFERENCES snapshots(id)
);
CREATE INDEX snapshots_parent ON snapshots(parent_id);
CREATE INDEX snapshots_lower ON snapshots(lower_id);
"""

_SELECT = """
SELECT s.id, s.name, s.kind, s.parent_id, COALESCE(p.name, ''), s.created, s.updated,
       s.labels, s.size, s.inodes, s.layer, s.extract, s.lower_id
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""


class Kind(IntEnum):
    """Snapshot kinds, with containerd's wire values."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass(frozen=True, slots=True)
class Snapshot:
    id: int
    name: str
    kind: Kind
    parent_id: int | None
    parent: str  # the parent's name, "" for none
    created: float
    updated: float
    labels: dict[str, str]
    size: int  # bytes used (committed: measured at commit)
    inodes: int
    layer: dict[str, Any] | None  # overlaybd layer: digest, size and ref (remote) or path
    extract: bool  # active, unpacking an overlaybd blob into its own directory
    lower_id: int | None  # active/view on an overlaybd image: the run's top snapshot

    @classmethod
    def _from_row(cls, row: tuple) -> Snapshot:
        (id_, name, kind, parent_id, parent, created, updated, labels, size, inodes, layer,
         extract, lower_id) = row
        return cls(id_, name, Kind(kind), parent_id, parent, created, updated,
                   json.loads(labels), size, inodes, json.loads(layer) if layer else None,
                   bool(extract), lower_id)


class Store:
    """The database of one snapshotter root. Build with :meth:`open`; ``close`` when done."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._lock = threading.RLock()

    @classmethod
    def open(cls, path: str | Path) -> Store:
        """Open (creating) the database; raises UsageError for another schema version."""
        path = Path(path)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                               timeout=30.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute("BEGIN IMMEDIATE")  # two processes creating it: one wins
                if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            elif version != SCHEMA_VERSION:
                raise UsageError(f"snapshot database {path} has schema version {version}, this "
                                 f"overlaybd-py reads version {SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Store]:
        """Group changes (and the caller's file system steps) into one transaction: it
        commits if the block completes and rolls back if it raises."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # -- reads ---------------------------------------------------------------------------------

    def _one(self, where: str, *args: Any) -> Snapshot | None:
        with self._lock:
            row = self._conn.execute(f"{_SELECT} WHERE {where}", args).fetchone()
        return Snapshot._from_row(row) if row else None

    def get(self, name: str) -> Snapshot | None:
        return self._one("s.name = ?", name)

    def by_id(self, snapshot_id: int) -> Snapshot | None:
        return self._one("s.id = ?", snapshot_id)

    def all(self) -> list[Snapshot]:
        with self._lock:
            rows = self._conn.execute(f"{_SELECT} ORDER BY s.id").fetchall()
        return [Snapshot._from_row(row) for row in rows]

    def chain(self, snapshot: Snapshot | None) -> list[Snapshot]:
        """``snapshot`` and its ancestors, nearest first."""
        out = []
        while snapshot is not None:
            out.append(snapshot)
            if snapshot.parent_id is None:
                break
            snapshot = self.by_id(snapshot.parent_id)
        return out

    def has_children(self, snapshot_id: int) -> bool:
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1",
                                     (snapshot_id,)).fetchone()
        return row is not None

    def users_of(self, lower_id: int) -> int:
        """Active and view snapshots stacked on ``lower_id``'s merged device."""
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM snapshots WHERE lower_id = ?",
                                      (lower_id,)).fetchone()[0]

    def lowers_in_use(self) -> set[int]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT DISTINCT lower_id FROM snapshots WHERE lower_id IS NOT NULL").fetchall()
        return {row[0] for row in rows}

    # -- writes (inside ``transaction``) ---------------------------------------------------------

    def insert(self, *, name: str, kind: Kind, parent_id: int | None, labels: dict[str, str],
               layer: dict[str, Any] | None = None, extract: bool = False,
               lower_id: int | None = None) -> int:
        now = time.time()
        with self._lock:
            cursor = self._conn.execute(
                "INSERT INTO snapshots (name, kind, parent_id, created, updated, labels, layer,"
                " extract, lower_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, int(kind), parent_id, now, now, json.dumps(labels),
                 json.dumps(layer) if layer else None, int(extract), lower_id))
            return int(cursor.lastrowid or 0)

    def commit(self, snapshot_id: int, *, name: str, labels: dict[str, str], size: int,
               inodes: int, layer: dict[str, Any] | None) -> None:
        """Turn an active snapshot into a committed one named ``name``."""
        with self._lock:
            self._conn.execute(
                "UPDATE snapshots SET name = ?, kind = ?, labels = ?, size = ?, inodes = ?,"
                " layer = ?, extract = 0, lower_id = NULL, updated = ? WHERE id = ?",
                (name, int(Kind.COMMITTED), json.dumps(labels), size, inodes,
                 json.dumps(layer) if layer else None, time.time(), snapshot_id))

    def set_labels(self, snapshot_id: int, labels: dict[str, str]) -> None:
        with self._lock:
            self._conn.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                               (json.dumps(labels), time.time(), snapshot_id))

    def delete(self, snapshot_id: int) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))
