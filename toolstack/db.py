"""The toolstack's database: one SQLite table of objects, each a JSON record.

WAL with synchronous=NORMAL: a committed transaction is in the WAL file before COMMIT
returns, so it survives a kill -9 of the daemon (only a power cut could lose it). One
connection shared by all threads behind a re-entrant lock; `transaction()` groups
several writes (SR + PBD records) into one atomic commit.
"""
import contextlib
import json
import os
import sqlite3
import threading

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    ref TEXT PRIMARY KEY,
    class TEXT NOT NULL,
    uuid TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS objects_class ON objects (class);
CREATE UNIQUE INDEX IF NOT EXISTS objects_uuid ON objects (class, uuid);
"""


class Database(object):
    def __init__(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(SCHEMA)
        self._lock = threading.RLock()
        self._depth = 0

    def close(self):
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def transaction(self):
        """Hold the lock; commit at the outermost exit, roll back on an exception."""
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._conn.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield self
            except BaseException:
                self._depth -= 1
                if outer:
                    self._conn.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                self._conn.execute("COMMIT")

    def insert(self, cls, ref, record):
        with self.transaction():
            self._conn.execute("INSERT INTO objects (ref, class, uuid, data) VALUES (?, ?, ?, ?)",
                               (ref, cls, record["uuid"], json.dumps(record)))

    def update(self, cls, ref, record):
        with self.transaction():
            self._conn.execute("UPDATE objects SET uuid = ?, data = ? WHERE ref = ? AND class = ?",
                               (record["uuid"], json.dumps(record), ref, cls))

    def delete(self, cls, ref):
        with self.transaction():
            self._conn.execute("DELETE FROM objects WHERE ref = ? AND class = ?", (ref, cls))

    def get(self, cls, ref):
        """The record, or None."""
        with self._lock:
            row = self._conn.execute("SELECT data FROM objects WHERE ref = ? AND class = ?",
                                     (ref, cls)).fetchone()
        return json.loads(row[0]) if row else None

    def ref_of_uuid(self, cls, uuid):
        with self._lock:
            row = self._conn.execute("SELECT ref FROM objects WHERE class = ? AND uuid = ?",
                                     (cls, uuid)).fetchone()
        return row[0] if row else None

    def all(self, cls):
        """[(ref, record)] of a class, in creation order."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT ref, data FROM objects WHERE class = ? ORDER BY rowid", (cls,)).fetchall()
        return [(ref, json.loads(data)) for ref, data in rows]
