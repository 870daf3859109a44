"""Audit writer benchmark (issue "Audit trail").

    .venv/bin/python -m benchmarks.audit_bench [--rows N] [--json FILE]

Against the real PostgreSQL of the tests (``FSGUARD_TEST_POSTGRES``, default
postgresql+psycopg://postgres@127.0.0.1:5432/test; a throw-away database
``fsguard_bench_<random>`` is created and dropped) and a SQLite file:

* sustained rows/s into PostgreSQL through ``AuditWriter`` (submit ->
  queue -> batching writer greenlet -> INSERT ... ON CONFLICT DO NOTHING),
  and the same into SQLite;
* an offered load of 5,000 decisions/s for 5 s: does the writer keep up
  (queue short, nothing spooled)?
* verdict latency (a decision every millisecond, each in its own greenlet,
  decided by Guard and submitted, like the daemon) with no writer, with the
  writer on a healthy PostgreSQL, and with PostgreSQL stalled behind a TCP
  relay that holds every byte (the writer times out, spools, retries);
* how long the writer blocks the gevent hub (lateness of a 1 ms ticker):
  the figure behind "SQLite batches stay small, on the hub".

Targets: >= 5,000 rows/s into PostgreSQL; verdict latency while the database
is stalled within noise of the healthy figure.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from fsguard.audit import AuditWriter  # noqa: E402
from fsguard.config import AuditConfig  # noqa: E402
from tests.audit_conftest import ADMIN_URL, Postgres, TcpProxy, record, upgrade, verdict_latencies  # noqa: E402



class HubTicker:
    """Lateness of a 1 ms sleep: how long something kept the hub from running other greenlets."""

    def __init__(self) -> None:
        self.late: list[float] = []
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            started = time.perf_counter()
            gevent.sleep(0.001)
            self.late.append(time.perf_counter() - started - 0.001)

    def stop(self) -> dict[str, float]:
        self.greenlet.kill()
        late = sorted(self.late) or [0.0]
        return {"hub_block_p99_ms": 1000 * late[int(len(late) * 0.99)], "hub_block_max_ms": 1000 * late[-1]}


def writer_config(url: str, spool: Path, **overrides) -> AuditConfig:
    return AuditConfig(**({"url": url, "spool": str(spool)} | overrides))


def sustained(url: str, spool: Path, rows: int, **overrides) -> dict[str, float]:
    """Rows/s with the queue kept fed (never past a few batches, so nothing is spooled)."""
    writer = AuditWriter(writer_config(url, spool, **overrides))
    writer.start()
    records = [record(n) for n in range(rows)]
    ticker = HubTicker()
    started = time.perf_counter()
    for item in records:
        while writer.stats()["queue_depth"] >= 4 * writer.config.batch_size:
            gevent.sleep(0.0005)
        writer.submit(item)
    assert writer.wait_for(lambda s: s["written"] == rows, 300), writer.stats()
    elapsed = time.perf_counter() - started
    hub = ticker.stop()
    stats = writer.stats()
    writer.stop(10)
    return {"rows": rows, "seconds": elapsed, "rows_per_s": rows / elapsed, "spooled": stats["spooled"], **hub}


def offered(url: str, spool: Path, rate: int, seconds: float) -> dict[str, float]:
    """``rate`` decisions/s for ``seconds``, one every 1/rate s (in ticks of 1 ms)."""
    writer = AuditWriter(writer_config(url, spool))
    writer.start()
    depth, n = [], 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        while n < rate * elapsed:
            writer.submit(record(n))
            n += 1
        depth.append(writer.stats()["queue_depth"])
        gevent.sleep(0.001)
    assert writer.wait_for(lambda s: s["written"] + s["spool_rows"] == n and s["queue_depth"] == 0, 60)
    caught_up = time.perf_counter() - started - seconds
    stats = writer.stats()
    writer.stop(10)
    return {"offered_per_s": rate, "submitted": n, "queue_depth_max": max(depth), "spooled": stats["spooled"],
            "catch_up_s": caught_up}


def verdicts(writer: AuditWriter | None, calls: int, first: int) -> dict[str, float]:
    latencies = verdict_latencies(writer, calls, first)
    return {
        "calls": calls,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "max_ms": 1000 * latencies[-1],
    }


def latency_rounds(url: str, spool: Path, calls: int, rounds: int) -> dict[str, dict[str, float]]:
    """``latency`` ``rounds`` times; the median of each figure (this machine is shared: single runs are noisy)."""
    runs = [latency(url, spool, calls) for _ in range(rounds)]
    return {
        phase: {key: statistics.median(run[phase][key] for run in runs) for key in ("p50_ms", "p99_ms", "max_ms")}
        | {"calls": calls, "rounds": rounds}
        for phase in runs[0]
    }


def latency(url: str, spool: Path, calls: int) -> dict[str, dict[str, float]]:
    proxy = TcpProxy((make_url(url).host or "127.0.0.1", make_url(url).port or 5432))
    writer = AuditWriter(writer_config(proxy.url(url), spool, write_timeout=1.0, retry_interval=0.5))
    writer.start()
    result = {"no_audit": verdicts(None, calls, 0), "healthy": verdicts(writer, calls, 0)}
    assert writer.wait_for(lambda s: s["written"] == calls, 60)
    proxy.stall()
    result["stalled"] = verdicts(writer, calls, calls)
    # The stall is seen once an insert outlives write_timeout, which may be after the last call.
    assert writer.wait_for(lambda s: s["spooled"] > 0 and s["database"] == "failing", 10), writer.stats()
    proxy.resume()
    assert writer.wait_for(lambda s: s["written"] == 2 * calls and s["spool_rows"] == 0, 60), writer.stats()
    writer.stop(10)
    proxy.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows for the sustained figures")
    parser.add_argument("--calls", type=int, default=2_000, help="calls per latency figure")
    parser.add_argument("--rounds", type=int, default=3, help="latency figures are medians of this many runs")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    postgres = Postgres(ADMIN_URL)
    pg = postgres.create_database("fsguard_bench_").render_as_string(hide_password=False)
    results: dict[str, object] = {}
    try:
        upgrade(pg)
        with tempfile.TemporaryDirectory() as tmp:
            sqlite = f"sqlite:///{tmp}/audit.db"
            upgrade(sqlite)
            spool = Path(tmp) / "audit.spool"
            results["postgresql_sustained"] = sustained(pg, spool, args.rows)
            results["postgresql_sustained_batch_500"] = sustained(pg, spool, args.rows // 2, batch_size=500)
            results["postgresql_offered_5000"] = offered(pg, spool, 5000, 5.0)
            results["sqlite_sustained"] = sustained(sqlite, spool, args.rows)
            results["verdict_latency"] = latency_rounds(pg, spool, args.calls, args.rounds)
    finally:
        postgres.drop_all()

    print(json.dumps(results, indent=2, default=lambda v: round(v, 3) if isinstance(v, float) else str(v)))
    pg_rate = results["postgresql_sustained"]["rows_per_s"]  # type: ignore[index]
    lat = results["verdict_latency"]  # type: ignore[assignment]
    print(f"\nPostgreSQL: {pg_rate:,.0f} rows/s sustained (target >= 5,000): {'ok' if pg_rate >= 5000 else 'MISSED'}")
    print("verdict latency p50/p99/max ms: " + "; ".join(
        f"{k} {v['p50_ms']:.2f}/{v['p99_ms']:.2f}/{v['max_ms']:.2f}" for k, v in lat.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0 if pg_rate >= 5000 else 1


if __name__ == "__main__":
    sys.exit(main())
