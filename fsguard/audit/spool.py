"""The spool: decisions the audit database could not take yet, kept on local disk.

A SQLite file (``[audit] spool``, by default next to a SQLite audit database,
else ``/var/lib/fsguard/audit.spool``) with one table keyed by the writer's
sequence number, so rows come back in the order they were submitted whatever
order they were spooled in.  Each append is one committed transaction in WAL
mode with ``synchronous=NORMAL``: a row in the spool survives SIGKILL or a
crash of fsguard (the last transactions may not survive a power cut).

Rows the database refuses outright (a constraint, not an outage) are moved
to the ``rejected`` table with the error, for an operator to look at, so one
bad row never blocks the rows behind it.

The spool blocks the gevent hub while SQLite writes; it is only written
while the database is failing or behind, in batches.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .store import AuditError, sqlite_path

DEFAULT_SPOOL = "/var/lib/fsguard/audit.spool"
COMPACT_ABOVE = 1 << 20  # bytes: an emptied spool larger than this is vacuumed

Item = tuple[int, dict[str, Any]]  # (sequence number, column values)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY, row TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rejected (seq INTEGER PRIMARY KEY, row TEXT NOT NULL, error TEXT NOT NULL,"
    " at TEXT NOT NULL)",
)


class SpoolError(AuditError):
    """The spool file cannot be opened or written."""


def spool_path(url: str, spool: str = "") -> Path:
    """``spool`` if set; else beside a SQLite audit database; else DEFAULT_SPOOL."""
    if spool:
        return Path(spool)
    database = sqlite_path(url)
    if database is None:
        return Path(DEFAULT_SPOOL)
    path = database.with_suffix(".spool")
    return path if path != database else database.with_name(database.name + ".spool")


def encode(row: dict[str, Any]) -> str:
    return json.dumps({**row, "record_id": str(row["record_id"]), "at": row["at"].isoformat()})


def decode(text: str) -> dict[str, Any]:
    row = json.loads(text)
    row["record_id"] = uuid.UUID(row["record_id"])
    row["at"] = datetime.fromisoformat(row["at"])
    return row


class Spool:
    """Ordered, durable rows waiting for the database (one writer process)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            for statement in _SCHEMA:
                self._db.execute(statement)
            self.rows = self._db.execute("SELECT count(*) FROM spool").fetchone()[0]
        except (sqlite3.Error, OSError) as exc:
            raise SpoolError(f"cannot open the audit spool {self.path}: {exc}") from None

    def last_seq(self) -> int:
        """The highest sequence number ever spooled and still kept (0 if none)."""
        query = "SELECT max(seq) FROM (SELECT seq FROM spool UNION ALL SELECT seq FROM rejected)"
        return self._db.execute(query).fetchone()[0] or 0

    def append(self, items: Sequence[Item]) -> None:
        """Keep ``items`` durably; a sequence number already kept is ignored."""
        if not items:
            return
        encoded = [(seq, encode(row)) for seq, row in items]
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany("INSERT OR IGNORE INTO spool (seq, row) VALUES (?, ?)", encoded)
            added = self._db.total_changes - before
        self.rows += added

    def head(self, limit: int) -> list[Item]:
        """The ``limit`` oldest rows, oldest first."""
        cursor = self._db.execute("SELECT seq, row FROM spool ORDER BY seq LIMIT ?", (limit,))
        return [(seq, decode(text)) for seq, text in cursor]

    def remove(self, seqs: Iterable[int]) -> None:
        with self._transaction():
            removed = self._remove(seqs)
        self.rows -= removed
        if self.rows == 0 and self.size_bytes() > COMPACT_ABOVE:
            self.compact()

    def compact(self) -> None:
        """Give the disk back once the spool is empty (SQLite keeps freed pages otherwise)."""
        self._db.execute("VACUUM")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def reject(self, items: Sequence[Item], error: str) -> None:
        """Move ``items`` (spooled or not) to the rejected table."""
        at = datetime.now(UTC).isoformat()
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO rejected (seq, row, error, at) VALUES (?, ?, ?, ?)",
                [(seq, encode(row), error, at) for seq, row in items],
            )
            removed = self._remove(seq for seq, _ in items)
        self.rows -= removed

    def rejected(self) -> list[tuple[int, dict[str, Any], str]]:
        cursor = self._db.execute("SELECT seq, row, error FROM rejected ORDER BY seq")
        return [(seq, decode(text), error) for seq, text, error in cursor]

    def size_bytes(self) -> int:
        """Bytes on disk, write-ahead log included."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except OSError:
                pass
        return total

    def close(self) -> None:
        self._db.close()

    def _remove(self, seqs: Iterable[int]) -> int:
        before = self._db.total_changes
        self._db.executemany("DELETE FROM spool WHERE seq = ?", [(seq,) for seq in seqs])
        return self._db.total_changes - before

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


__all__ = ["DEFAULT_SPOOL", "Spool", "SpoolError", "decode", "encode", "spool_path"]
