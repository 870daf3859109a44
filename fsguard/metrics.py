"""Prometheus metrics (prometheus_client), served by gevent's WSGI server.

A registry per daemon (not the process-global one), so several daemons can
live in one test process.  Counters and the latency histogram are updated
per call; the gauges are read from the daemon's status at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from gevent.pywsgi import WSGIServer
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


class _StatusCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self.status()
        registrations = GaugeMetricFamily("fsguard_registrations", "Registrations cached per switch", labels=["switch"])
        up = GaugeMetricFamily("fsguard_switch_up", "1 when the switch's watcher is live", labels=["switch"])
        for switch in status["switches"]:
            registrations.add_metric([switch["name"]], switch["registrations"])
            up.add_metric([switch["name"]], 1.0 if switch["state"] == "live" else 0.0)
        yield registrations
        yield up
        audit = status.get("audit") or {}
        for name, key, text in (
            ("fsguard_audit_queue_depth", "queue_depth", "Decisions waiting to be written"),
            ("fsguard_audit_spool_rows", "spool_rows", "Decisions spooled locally while the database fails"),
        ):
            yield GaugeMetricFamily(name, text, value=float(audit.get(key) or 0))
        yield GaugeMetricFamily("fsguard_audit_database_up", "1 when the audit database accepts writes",
                                value=0.0 if audit.get("database") == "failing" else 1.0)


class Metrics:
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter("fsguard_decisions", "Decisions by verdict and reason",
                                 ["verdict", "reason"], registry=self.registry)
        self.latency = Histogram("fsguard_decision_seconds", "Time to decide a call (lookup included)",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors = Counter("fsguard_errors", "Calls that ended without a verdict taking effect, by kind",
                              ["kind"], registry=self.registry)
        self.registry.register(_StatusCollector(status))
        self.server: WSGIServer | None = None

    def observe(self, action: str, reason: str, latency: float) -> None:
        self.decisions.labels(action, reason).inc()
        self.latency.observe(latency)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def serve(self, listen: tuple[str, int]) -> tuple[str, int]:
        self.server = WSGIServer(listen, make_wsgi_app(self.registry), log=None, error_log=None)
        self.server.start()
        return self.server.address[:2]

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=1)
