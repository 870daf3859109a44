"""The audit writer against real databases: batching, a stalled or dead PostgreSQL, the spool,
restarts, SIGTERM and SIGKILL.  Waits are on the writer's progress, never on sleeps.
"""

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import UTC, datetime

import gevent
import pytest
from sqlalchemy.engine import make_url

from fsguard.audit import AuditRecord, AuditWriter
from fsguard.audit.spool import Spool
from fsguard.audit.writer import BATCH_INTERVAL, GIL_SWITCH_INTERVAL
from fsguard.config import AuditConfig

pytest.register_assert_rewrite("tests.audit_conftest")  # shared fixtures and helpers, before importing it
pytest_plugins = ["tests.audit_conftest"]
from tests.audit_conftest import closed_port, decision, record, rows_in, verdict_latencies  # noqa: E402

WAIT = 20.0  # seconds: generous bound for conditions that normally hold within milliseconds


def config(url, tmp_path, **overrides):
    settings = dict(url=url, spool=str(tmp_path / "audit.spool"), write_timeout=0.5, retry_interval=0.1)
    return AuditConfig(**(settings | overrides))


@pytest.fixture
def writers():
    started = []

    def make(cfg):
        writer = AuditWriter(cfg)
        writer.start()
        started.append(writer)
        return writer

    yield make
    for writer in started:
        writer.stop(1.0)


def submit(writer, first, count):
    for n in range(first, first + count):
        writer.submit(record(n))


def call_numbers(url):
    return [int(row.call_uuid[5:]) for row in rows_in(url)]


def assert_written_once_in_order(url, count):
    rows = rows_in(url)
    assert [int(row.call_uuid[5:]) for row in rows] == list(range(count))
    assert len({row.record_id for row in rows}) == count


def test_writes_every_decision_in_order(db_url, tmp_path, writers):
    writer = writers(config(db_url, tmp_path, batch_size=64))
    submit(writer, 0, 1000)
    assert writer.wait_for(lambda s: s["written"] == 1000, WAIT), writer.stats()
    assert_written_once_in_order(db_url, 1000)
    stats = writer.stats()
    assert stats["queue_depth"] == 0 and stats["spool_rows"] == 0 and stats["spooled"] == 0
    assert stats["database"] == "ok" and stats["last_error"] == "" and stats["last_error_at"] is None
    row = rows_in(db_url)[0]
    assert row.at is not None and row.verdict == "deny" and row.reason == "ip-not-registered"


def test_stored_times_are_utc_and_aware(db_url, tmp_path, writers):
    from datetime import timedelta, timezone

    from fsguard.audit.queries import Filters, list_decisions
    from fsguard.audit.store import connect

    at = datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    writer = writers(config(db_url, tmp_path))
    writer.submit(AuditRecord.from_decision(decision(1), "enforce", "fs1", at))
    assert writer.wait_for(lambda s: s["written"] == 1, WAIT)
    with connect(db_url) as connection:
        (row,) = list_decisions(connection, Filters(since=datetime(2024, 5, 1, 10, 0, tzinfo=UTC)), 10)
        assert not list_decisions(connection, Filters(since=datetime(2024, 5, 1, 10, 1, tzinfo=UTC)), 10)
    assert row["at"] == at and row["at"].utcoffset() == timedelta(0)


def p99_and_max(latencies):
    return latencies[int(len(latencies) * 0.99)], latencies[-1]


def test_stalled_database_slows_no_verdict_and_loses_nothing(pg_url, proxy, tmp_path, writers):
    writer = writers(config(proxy.url(pg_url), tmp_path, batch_size=100))
    healthy_p99, healthy_max = p99_and_max(verdict_latencies(writer, 300, 0))
    assert writer.wait_for(lambda s: s["written"] == 300, WAIT)

    proxy.stall()
    stalled_p99, stalled_max = p99_and_max(verdict_latencies(writer, 600, 300))
    assert writer.wait_for(lambda s: s["database"] == "failing" and s["spool_rows"] > 0, WAIT), writer.stats()
    stats = writer.stats()
    assert stats["written"] == 300 and "no answer within write_timeout" in stats["last_error"]
    # No verdict waits for the database (each insert hangs write_timeout = 0.5 s here).  Loose bounds
    # for a busy machine; benchmarks/audit_bench.py measures the figures precisely.
    assert stalled_p99 < max(3 * healthy_p99, 0.020), (healthy_p99, stalled_p99)
    assert stalled_max < 0.200, (healthy_max, stalled_max)

    proxy.resume()
    assert writer.wait_for(lambda s: s["written"] == 900 and s["spool_rows"] == 0 and s["queue_depth"] == 0,
                           WAIT), writer.stats()
    assert writer.stats()["database"] == "ok"
    assert_written_once_in_order(pg_url, 900)


def test_database_down_then_back(pg_url, proxy, tmp_path, writers):
    writer = writers(config(proxy.url(pg_url), tmp_path))
    submit(writer, 0, 100)
    assert writer.wait_for(lambda s: s["written"] == 100, WAIT)
    proxy.cut()
    submit(writer, 100, 200)
    assert writer.wait_for(lambda s: s["spool_rows"] == 200 and s["database"] == "failing", WAIT), writer.stats()
    submit(writer, 300, 100)  # while down: spooled behind the others
    assert writer.wait_for(lambda s: s["spool_rows"] == 300, WAIT), writer.stats()
    proxy.resume()
    assert writer.wait_for(lambda s: s["written"] == 400 and s["spool_rows"] == 0, WAIT), writer.stats()
    assert_written_once_in_order(pg_url, 400)
    assert writer.stats()["spooled"] == 300


def test_stop_writes_the_queue(db_url, tmp_path):
    writer = AuditWriter(config(db_url, tmp_path, batch_size=50))
    writer.start()
    submit(writer, 0, 500)
    writer.stop(WAIT)
    stats = writer.stats()
    assert (stats["queue_depth"], stats["spool_rows"], stats["written"], stats["spooled"]) == (0, 0, 500, 0)
    assert_written_once_in_order(db_url, 500)


def test_stop_on_a_stalled_database_spools_everything_in_time(pg_url, proxy, tmp_path):
    writer = AuditWriter(config(proxy.url(pg_url), tmp_path, write_timeout=30.0))
    writer.start()
    proxy.stall()
    submit(writer, 0, 300)
    gevent.sleep(0)  # the writer takes its first batch and hangs on the database
    started = time.monotonic()
    writer.stop(0.3)
    assert time.monotonic() - started < 2.0
    assert writer.stats()["spool_rows"] == 300 and writer.stats()["queue_depth"] == 0
    # Decided after stop (should not happen; never lost either).
    writer.submit(record(300))
    assert writer.stats()["spool_rows"] == 301
    proxy.resume()
    restarted = AuditWriter(config(pg_url, tmp_path))
    restarted.start()
    assert restarted.wait_for(lambda s: s["spool_rows"] == 0, WAIT), restarted.stats()
    restarted.stop(WAIT)
    assert_written_once_in_order(pg_url, 301)


def test_restart_writes_the_spool_before_new_decisions(db_url, tmp_path):
    down = make_url(db_url).set(host="127.0.0.1", port=closed_port()) if "postgresql" in db_url else None
    dead_url = down.render_as_string(hide_password=False) if down else f"sqlite:///{tmp_path}/no/such/dir/a.db"
    first = AuditWriter(config(dead_url, tmp_path))
    first.start()
    submit(first, 0, 300)
    assert first.wait_for(lambda s: s["spool_rows"] == 300, WAIT), first.stats()
    first.stop(1.0)

    second = AuditWriter(config(db_url, tmp_path, batch_size=40))
    assert second.stats()["spool_rows"] == 300
    second.start()
    submit(second, 300, 100)  # newer: written after the whole spool
    assert second.wait_for(lambda s: s["written"] == 400 and s["spool_rows"] == 0, WAIT), second.stats()
    second.stop(WAIT)
    assert_written_once_in_order(db_url, 400)


def test_a_replayed_spool_never_duplicates(db_url, tmp_path):
    """SIGKILL after the insert, before the spool was cleaned: the same rows come back."""
    writer = AuditWriter(config(db_url, tmp_path))
    items = [(n + 1, record(n).row(uuid.uuid4())) for n in range(50)]
    writer._spool.append(items)  # as left by a killed writer
    writer.start()
    assert writer.wait_for(lambda s: s["spool_rows"] == 0, WAIT)
    writer.stop(WAIT)
    spool = Spool(tmp_path / "audit.spool")
    spool.append(items)  # the same rows, again
    spool.close()
    again = AuditWriter(config(db_url, tmp_path))
    again.start()
    assert again.wait_for(lambda s: s["spool_rows"] == 0, WAIT)
    again.stop(WAIT)
    assert_written_once_in_order(db_url, 50)


def test_a_refused_row_is_set_aside_and_the_rest_written(db_url, tmp_path, writers):
    writer = writers(config(db_url, tmp_path))
    good = record(1)
    bad = dataclasses.replace(good, verdict="maybe", call_uuid="call-bad")
    writer.submit(record(0))
    writer.submit(bad)
    writer.submit(good)
    assert writer.wait_for(lambda s: s["written"] == 2 and s["rejected"] == 1, WAIT), writer.stats()
    assert call_numbers(db_url) == [0, 1]
    ((_, row, error),) = Spool(tmp_path / "audit.spool").rejected()
    assert row["call_uuid"] == "call-bad" and "verdict" in error


def test_queue_full_moves_to_spool_and_counts_what_it_drops(pg_url, proxy, tmp_path, writers):
    writer = writers(config(proxy.url(pg_url), tmp_path, queue_size=100, write_timeout=30.0))
    proxy.stall()
    for n in range(300):  # decisions arriving one by one: the spiller keeps the queue short
        writer.submit(record(n))
        gevent.sleep(0)
    assert writer.wait_for(lambda s: s["spool_rows"] >= 250, WAIT), writer.stats()
    assert writer.stats()["dropped"] == 0
    for n in range(300, 500):  # a burst with no switch to the hub at all: the bound holds
        writer.submit(record(n))
    stats = writer.stats()
    assert stats["queue_depth"] <= 100 + 100 and stats["dropped"] > 0


def test_submit_never_raises(db_url, tmp_path, writers, caplog):
    writer = writers(config(db_url, tmp_path))
    writer.submit(None)  # a bug in the caller: logged, never raised into the verdict path
    assert "cannot queue" in caplog.text


def test_password_never_shown(pg_url, proxy, tmp_path, writers, caplog):
    caplog.set_level(logging.DEBUG)
    url = make_url(proxy.url(pg_url)).set(password="s3cret-pw")  # trust auth: accepted, and ignored
    writer = writers(config(url.render_as_string(hide_password=False), tmp_path))
    submit(writer, 0, 10)
    assert writer.wait_for(lambda s: s["written"] == 10, WAIT)
    proxy.cut()
    submit(writer, 10, 10)
    assert writer.wait_for(lambda s: s["database"] == "failing", WAIT)
    stats = writer.stats()
    assert "s3cret-pw" not in repr(stats) and "***" in stats["url"] and stats["last_error"]
    assert "s3cret-pw" not in caplog.text and "failing" in caplog.text


CHILD = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import signal, sys, gevent, gevent.event
    sys.path.insert(0, {root!r})
    from fsguard.audit import AuditWriter
    from fsguard.config import AuditConfig
    from tests.audit_conftest import record
    writer = AuditWriter(AuditConfig(url={url!r}, spool={spool!r}, write_timeout=0.5, retry_interval=0.1))
    writer.start()
    for n in range({count}):
        writer.submit(record(n))
    if {wait_spooled}:
        writer.wait_for(lambda s: s["spool_rows"] == {count}, 20)
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    print("ready", writer.stats()["queue_depth"], writer.stats()["spool_rows"], flush=True)
    stop.wait()
    writer.stop(5.0)
    print("stopped", flush=True)
""")


def child(tmp_path, url, count, wait_spooled):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = CHILD.format(root=root, url=url, spool=str(tmp_path / "audit.spool"), count=count,
                          wait_spooled=wait_spooled)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    ready = process.stdout.readline().split()
    assert ready and ready[0] == "ready", ready
    return process, ready


def test_sigterm_loses_nothing(pg_url, tmp_path):
    process, ready = child(tmp_path, pg_url, 2000, False)
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0 and process.stdout.read().strip() == "stopped"
    spool = Spool(tmp_path / "audit.spool")
    assert len(rows_in(pg_url)) + spool.rows == 2000
    if spool.rows:
        writer = AuditWriter(config(pg_url, tmp_path))
        writer.start()
        assert writer.wait_for(lambda s: s["spool_rows"] == 0, WAIT)
        writer.stop(WAIT)
    assert_written_once_in_order(pg_url, 2000)


def test_sigkill_loses_nothing_already_spooled(pg_url, tmp_path):
    dead = make_url(pg_url).set(port=closed_port()).render_as_string(hide_password=False)
    process, ready = child(tmp_path, dead, 500, True)
    assert ready[2] == "500"
    process.kill()
    process.wait(30)
    assert Spool(tmp_path / "audit.spool").rows == 500
    writer = AuditWriter(config(pg_url, tmp_path))
    writer.start()
    assert writer.wait_for(lambda s: s["spool_rows"] == 0, WAIT), writer.stats()
    writer.stop(WAIT)
    assert_written_once_in_order(pg_url, 500)


def test_rows_trickling_in_share_a_batch(db_url, tmp_path, writers):
    """One row per millisecond: batches gather rows instead of one insert (thread handoff, round trips) per row."""
    writer = writers(config(db_url, tmp_path))
    batches = []
    real_insert = writer._insert_now
    writer._insert_now = lambda batch: (batches.append(len(batch)), real_insert(batch))[1]
    submit(writer, 0, 1)
    assert writer.wait_for(lambda s: s["written"] == 1, WAIT)
    for n in range(1, 31):
        gevent.sleep(0.001)  # spacing the load, not waiting for a result
        writer.submit(record(n))
    assert writer.wait_for(lambda s: s["written"] == 31, WAIT), writer.stats()
    assert_written_once_in_order(db_url, 31)
    # ~30 ms of rows against a 50 ms interval: 2 batches here, a few more on a slow machine; 31 without it.
    assert len(batches) <= 1 + 30 * 0.001 / BATCH_INTERVAL + 4, batches


def test_a_sqlite_writer_thread_cannot_hold_the_gil_for_long(sqlite_url, tmp_path, writers, monkeypatch):
    monkeypatch.setattr(sys, "setswitchinterval", lambda value: seen.append(value))
    seen: list[float] = []
    writers(config(sqlite_url, tmp_path))
    assert seen and seen[-1] <= GIL_SWITCH_INTERVAL  # the hub waits at most this for the GIL


def test_a_database_stalling_during_a_batch_of_many_rows_fails_over_in_time(pg_url, proxy, tmp_path, writers):
    """psycopg's executemany runs in pipeline mode, whose exit waited for a stalled server forever."""
    writer = writers(config(proxy.url(pg_url), tmp_path, batch_size=100))
    submit(writer, 0, 10)
    assert writer.wait_for(lambda s: s["written"] == 10, WAIT)  # the connection is open
    proxy.stall()
    submit(writer, 10, 100)  # one batch of 100 rows
    assert writer.wait_for(lambda s: s["database"] == "failing" and s["spool_rows"] == 100, WAIT), writer.stats()
    proxy.resume()
    assert writer.wait_for(lambda s: s["written"] == 110 and s["spool_rows"] == 0, WAIT), writer.stats()
    assert_written_once_in_order(pg_url, 110)
