"""The audit writer: decisions to the database without ever slowing a verdict.

``submit`` appends to a bounded in-memory queue and returns (no I/O, never
raises).  One writer greenlet inserts what is queued in batches.  When an
insert fails or takes longer than ``write_timeout``, the database counts as
failing: the batch and everything queued after it go to the spool (a local
SQLite file), the writer retries with backoff, and once the database answers
again it writes the spool first, then the queue.

Order: every row gets a sequence number at submit; the spool returns rows by
sequence number and is always written before the queue, so rows reach the
database in submit order.  Duplicates: every row carries a ``record_id``
drawn at submit, and inserts are ``ON CONFLICT (record_id) DO NOTHING``, so a
batch replayed after an uncertain outcome (timeout, SIGKILL between insert
and spool cleanup) is written once.

Back-pressure: while an insert is in flight the queue grows; past half of
``queue_size`` a second greenlet moves it to the spool.  Only if the queue is
full anyway (the spool cannot be written either) is a decision not audited;
``dropped`` counts those and the log says which call.

Batches are taken at most every BATCH_INTERVAL (or as soon as batch_size
rows wait), so rows reach the database at most ~50 ms after their verdict.
A batch costs fsguard CPU whatever its size: for SQLite ~0.2 ms to hand it
to SQLite's thread and back, for PostgreSQL a transaction's round trips on
the hub.  Taken as soon as the previous insert returned, batches held one
row at moderate rates: with PostgreSQL at 500 decisions/s fsguard spent
1.16 ms of CPU per decision instead of 0.79 (benchmarks/outbound_bench.py
``--audit postgresql``; near saturation the queue batches by itself and
the two do not differ).  A PostgreSQL server
that stalls in the middle of a multi-row batch could hold the writer
forever (psycopg's pipeline, see ``_insert``): its connection is cut
ABORT_GRACE after write_timeout.

SQLite audit databases are written from a thread of the writer's own (the
sqlite3 module cannot yield, and WAL checkpoints fsync): see ``_insert`` and
benchmarks/audit_bench.py.  While that thread runs Python code it holds the
GIL, and by default the hub waits up to 5 ms to get it back: start() lowers
that switch interval to GIL_SWITCH_INTERVAL, or every such batch would add
milliseconds to the calls decided meanwhile.  The spool, written only while
the database is failing or behind, stays on the hub.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import gevent
from gevent.event import Event
from gevent.threadpool import ThreadPool
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from ..config import AuditConfig
from .models import AuditDecision, AuditRecord
from .spool import Item, Spool, SpoolError, spool_path
from .store import create_engine, describe_error, normalise_url, safe_url

log = logging.getLogger(__name__)

SPILL_INTERVAL = 0.05  # seconds rows may wait in memory while the database is failing
FIRST_RETRY = 0.1  # seconds before the first retry; doubles up to retry_interval
STOP_KILL_GRACE = 1.0  # seconds for an interrupted insert to unwind on stop
ABORT_GRACE = 1.0  # seconds past write_timeout before a stuck PostgreSQL connection is cut
BATCH_INTERVAL = 0.05  # seconds between batches while fewer than batch_size rows wait
GIL_SWITCH_INTERVAL = 0.0005  # seconds the hub may wait for the GIL held by SQLite's writer thread

_INSERT = {
    "postgresql": postgresql.insert(AuditDecision).on_conflict_do_nothing(index_elements=["record_id"]),
    "sqlite": sqlite.insert(AuditDecision).on_conflict_do_nothing(index_elements=["record_id"]),
}
# The database refused these rows: retrying the same batch cannot succeed.
_REFUSED = (sa_exc.IntegrityError, sa_exc.DataError)


def new_record_id() -> uuid.UUID:
    """A random UUID whose first 48 bits are the Unix time in milliseconds (RFC 9562 version 7).

    Time-ordered keys land at the end of the unique index on ``record_id``
    instead of on a random page of it: with SQLite that index costs a page
    write per row once it outgrows the cache (~16% of an insert at 100k rows,
    measured).  The 74 random bits keep it unique.
    """
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10)) & ((1 << 80) - 1)
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # variant RFC 9562
    return uuid.UUID(int=value)


class WriteTimeout(Exception):
    """An insert took longer than write_timeout."""


class AuditWriter:
    """Queue, batching writer greenlet and spool; see the module docstring."""

    def __init__(self, config: AuditConfig) -> None:
        self.config = config
        self._url = normalise_url(config.url)
        self._spool = Spool(spool_path(config.url, config.spool))
        self._seq = self._spool.last_seq()
        self._batch_size = config.batch_size
        self._high_water = max(1, config.queue_size // 2)
        self._queue: deque[Item] = deque()
        self._inflight: list[Item] = []  # taken from the queue, not yet known written
        self._engine: Engine | None = None
        self._connection: Connection | None = None
        self._thread: ThreadPool | None = None  # SQLite only: see _insert
        self._greenlets: list[gevent.Greenlet] = []
        self._wake = Event()  # the queue has rows, or stop was asked
        self._full = Event()  # batch_size rows wait, or stop was asked
        self._last_batch = 0.0  # monotonic time the last batch was taken
        self._pressure = Event()  # the queue is past half full
        self._stopping = Event()
        self._stopped = False
        self._progress = Event()  # replaced at each change; see wait_for
        self._failing = False
        self._spool_failing = False
        self._delay = 0.0
        self._counts = {"written": 0, "spooled": 0, "dropped": 0, "rejected": 0}
        self._last_error = ""
        self._last_error_at: datetime | None = None
        self._dropped_logged = 0.0

    # --- the daemon's side

    def start(self) -> None:
        """Spawn the writer (it writes a non-empty spool first) and the spiller."""
        self._engine = create_engine(self._url, poolclass=NullPool)  # one connection, owned by the writer
        if self._url.get_backend_name() == "sqlite":
            self._thread = ThreadPool(1)
            sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL))
        if self._spool.rows:
            log.info("audit: %d decisions waiting in the spool %s, writing them first",
                     self._spool.rows, self._spool.path)
        self._greenlets = [gevent.spawn(self._run), gevent.spawn(self._spill_on_pressure)]

    def submit(self, record: AuditRecord) -> None:
        """Queue one record.  O(1), no I/O, never blocks, never raises."""
        try:
            if self._stopped:
                self._submit_late(record)
            elif len(self._queue) >= self.config.queue_size:
                self._drop(record)
            else:
                self._seq += 1
                self._queue.append((self._seq, record.row(new_record_id())))
                self._wake.set()
                if len(self._queue) >= self._batch_size:
                    self._full.set()
                if len(self._queue) >= self._high_water:
                    self._pressure.set()
        except Exception:
            log.exception("audit: cannot queue the decision of call %s", getattr(record, "call_uuid", "?"))

    def stop(self, timeout: float) -> None:
        """Write what is queued within ``timeout`` seconds; spool the rest.  Nothing is lost."""
        self._stopping.set()
        self._wake.set()
        self._full.set()
        writer = self._greenlets[0] if self._greenlets else None
        if writer is not None:
            writer.join(timeout)
            if not writer.dead:
                log.warning("audit: the database did not take the queue within %gs; spooling it", timeout)
                writer.kill(block=True, timeout=STOP_KILL_GRACE)
        gevent.killall(self._greenlets[1:], block=True, timeout=STOP_KILL_GRACE)
        leftovers = self._inflight + list(self._queue)
        self._inflight, self._stopped = [], True
        self._queue.clear()
        if leftovers and not self._to_spool(leftovers):
            log.error("audit: %d decisions could not be written nor spooled and are lost", len(leftovers))
        self._close_connection()
        log.info("audit: stopped (written=%d spooled=%d, %d in the spool)",
                 self._counts["written"], self._counts["spooled"], self._spool.rows)
        self._notify()

    def _close_connection(self) -> None:
        with gevent.Timeout(STOP_KILL_GRACE, False):
            if self._thread is None:
                self._discard_connection()
            else:  # the thread may still be finishing an insert: close after it, there
                self._thread.spawn(self._discard_connection).get()
                self._thread.kill()

    def stats(self) -> dict[str, Any]:
        """The writer's state, for the status command (no secrets)."""
        return {
            "queue_depth": len(self._queue) + len(self._inflight),
            "spool_rows": self._spool.rows,
            "spool_bytes": self._spool.size_bytes(),
            **self._counts,
            "last_error": self._last_error,
            "last_error_at": self._last_error_at.isoformat() if self._last_error_at else None,
            "database": "failing" if self._failing else "ok",
            "url": safe_url(self._url),
            "spool": str(self._spool.path),
        }

    def wait_for(self, condition: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
        """Wait until ``condition(self.stats())`` holds; False after ``timeout`` seconds."""
        with gevent.Timeout(timeout, False):
            while not condition(self.stats()):
                self._progress.wait()
            return True
        return False

    # --- the writer greenlet

    def _run(self) -> None:
        while True:
            batch, from_spool = self._next_batch()
            if batch is None:
                if self._stopping.is_set():
                    return
                self._wake.clear()
                self._wake.wait()
                continue
            try:
                written = self._write(batch, from_spool)
            except Exception as exc:  # a bug: keep the rows, say so, go on
                log.exception("audit: writer error")
                written = False
                self._fail(exc)
                if not from_spool:
                    self._inflight = []
                    self._to_spool(batch)
            if not written:
                if self._stopping.is_set():
                    return
                self._backoff()

    def _next_batch(self) -> tuple[list[Item] | None, bool]:
        if self._spool.rows:
            if self._stopping.is_set():
                return None, True  # left for the next start; stop() spools the queue behind it
            return self._spool.head(self._batch_size), True
        if self._queue:
            self._gather()
        if self._queue:
            take = min(len(self._queue), self._batch_size)
            self._inflight = [self._queue.popleft() for _ in range(take)]
            self._last_batch = time.monotonic()
            return self._inflight, False
        return None, False

    def _gather(self) -> None:
        """Let rows gather until BATCH_INTERVAL after the last batch (see the module doc)."""
        wait = self._last_batch + BATCH_INTERVAL - time.monotonic()
        if wait > 0 and len(self._queue) < self._batch_size and not self._stopping.is_set():
            self._full.clear()
            self._full.wait(wait)

    def _write(self, batch: list[Item], from_spool: bool) -> bool:
        """Insert ``batch``; on failure spool it (unless it came from there).  True if written."""
        try:
            self._insert(batch)
        except _REFUSED as exc:
            return self._write_one_by_one(batch, from_spool, exc)
        except Exception as exc:  # down, slow, timeout: the database is failing
            self._fail(exc)
            if not from_spool:
                self._to_spool(batch)
            self._inflight = []
            return False
        if from_spool:
            self._spool.remove(seq for seq, _ in batch)
        self._inflight = []
        self._ok(len(batch))
        return True

    def _insert(self, batch: list[Item]) -> None:
        """One transaction, within write_timeout; WriteTimeout past it.

        PostgreSQL runs here, on the hub (psycopg waits cooperatively).
        SQLite cannot yield, and its commits sometimes fsync (WAL checkpoints,
        5-20 ms measured): it runs in the writer's own thread, always the same
        one, so the hub keeps deciding calls meanwhile.  A SQLite insert that
        times out still finishes in that thread, before the next one starts:
        order holds, and a replay of its rows is a no-op (ON CONFLICT).
        """
        timeout = gevent.Timeout(self.config.write_timeout)
        timeout.start()
        # psycopg runs a multi-row executemany in pipeline mode, and a pipeline interrupted by the
        # timeout waits for the server on its way out: forever if the server is stalled.  Past
        # ABORT_GRACE more, its socket is shut down, which ends that wait with an error.
        abort = gevent.spawn_later(self.config.write_timeout + ABORT_GRACE, self._abort_connection) \
            if self._thread is None else None
        try:
            if self._thread is None:
                self._insert_now(batch)
            else:
                self._thread.spawn(self._insert_now, batch).get()
        except gevent.Timeout as exc:
            if exc is not timeout:
                raise
            if self._thread is None:
                self._discard_connection()
            raise WriteTimeout(f"no answer within write_timeout={self.config.write_timeout:g}s") from None
        except BaseException:
            if self._thread is None:  # interrupted mid-query (stop): never reuse that connection
                self._discard_connection()
            raise
        finally:
            timeout.cancel()
            if abort is not None:
                abort.kill(block=False)

    def _abort_connection(self) -> None:
        """Shut down the socket under a PostgreSQL insert stuck past its timeout (see _insert)."""
        connection = self._connection
        try:
            fd = connection.connection.dbapi_connection.fileno()  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - no connection, or already closed: nothing is stuck on it
            return
        log.warning("audit: the database insert is stuck past write_timeout; cutting its connection")
        with socket.socket(fileno=os.dup(fd)) as stuck:
            stuck.shutdown(socket.SHUT_RDWR)

    def _insert_now(self, batch: list[Item]) -> None:
        """Insert on the writer's connection; after a failure, throw the connection away.

        A connection that failed may be mid-query; a new one is also the
        simplest proof that the database is back.
        """
        try:
            if self._connection is None:
                assert self._engine is not None
                self._connection = self._engine.connect()
            with self._connection.begin():
                self._connection.execute(_INSERT[self._connection.dialect.name], [row for _, row in batch])
        except Exception:
            self._discard_connection()
            raise

    def _discard_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.invalidate()
                connection.close()
            except Exception:  # noqa: BLE001 - it is being thrown away anyway
                pass

    def _write_one_by_one(self, batch: list[Item], from_spool: bool, error: Exception) -> bool:
        """The database refused the batch: write its rows alone, set the refused ones aside."""
        log.error("audit: the database refused a batch (%s); writing its %d rows one by one",
                  describe_error(error, self._url), len(batch))
        for index, item in enumerate(batch):
            try:
                self._insert([item])
            except _REFUSED as exc:
                self._reject(item, exc)
                continue
            except Exception as exc:
                self._fail(exc)
                if not from_spool:
                    self._to_spool(batch[index:])
                self._inflight = []
                return False
            if from_spool:
                self._spool.remove([item[0]])
            self._ok(1)
        self._inflight = []
        return True

    def _reject(self, item: Item, exc: Exception) -> None:
        error = describe_error(exc, self._url)
        log.error("audit: the database refused the decision of call %s (%s); kept in %s, table rejected",
                  item[1].get("call_uuid"), error, self._spool.path)
        self._spool.reject([item], error)
        self._counts["rejected"] += 1
        self._notify()

    def _backoff(self) -> None:
        """Wait before retrying; meanwhile new rows go to the spool every SPILL_INTERVAL."""
        self._delay = min(max(self._delay * 2, FIRST_RETRY), self.config.retry_interval)
        deadline = time.monotonic() + self._delay
        while True:
            self._spill()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.wait(min(remaining, SPILL_INTERVAL)):
                self._spill()
                return

    # --- the spool side

    def _spill_on_pressure(self) -> None:
        while True:
            self._pressure.wait()
            self._pressure.clear()
            if len(self._queue) >= self._high_water:
                log.warning("audit: %d decisions queued, moving them to the spool", len(self._queue))
                self._spill()

    def _spill(self) -> None:
        """Move the whole queue to the spool (oldest first: the spool stays older than the queue)."""
        if self._queue:
            items = list(self._queue)
            self._queue.clear()
            self._to_spool(items)

    def _to_spool(self, items: list[Item]) -> bool:
        try:
            self._spool.append(items)
        except (sqlite3.Error, OSError, SpoolError) as exc:
            if not self._spool_failing:
                log.error("audit: cannot write the spool %s (%s); decisions kept in memory",
                          self._spool.path, exc)
            self._spool_failing = True
            self._error(f"spool {self._spool.path}: {exc}")
            self._queue.extendleft(reversed(items))
            return False
        if self._spool_failing:
            log.warning("audit: the spool %s can be written again", self._spool.path)
        self._spool_failing = False
        self._counts["spooled"] += len(items)
        self._notify()
        return True

    def _submit_late(self, record: AuditRecord) -> None:
        log.warning("audit: decision of call %s submitted after stop; spooling it", record.call_uuid)
        self._seq += 1
        self._to_spool([(self._seq, record.row(new_record_id()))])

    def _drop(self, record: AuditRecord) -> None:
        self._counts["dropped"] += 1
        now = time.monotonic()
        if now - self._dropped_logged >= 1.0:
            self._dropped_logged = now
            log.error("audit: queue full (%d) and spool failing: decision of call %s not audited (dropped=%d)",
                      self.config.queue_size, record.call_uuid, self._counts["dropped"])

    # --- state

    def _ok(self, rows: int) -> None:
        self._counts["written"] += rows
        if self._failing:
            log.warning("audit: database %s answers again; %d decisions in the spool to write",
                        safe_url(self._url), self._spool.rows)
        self._failing, self._delay = False, 0.0
        self._notify()

    def _fail(self, exc: BaseException) -> None:
        error = describe_error(exc, self._url)
        if not self._failing:
            log.warning("audit: database %s failing (%s); decisions go to the spool %s",
                        safe_url(self._url), error, self._spool.path)
        self._failing = True
        self._error(error)

    def _error(self, text: str) -> None:
        self._last_error, self._last_error_at = text, datetime.now(UTC)
        self._notify()

    def _notify(self) -> None:
        progress, self._progress = self._progress, Event()
        progress.set()


__all__ = ["AuditWriter", "WriteTimeout"]
