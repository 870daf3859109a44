"""Recent decisions, in memory, for ``fsguard status``: counts and latency percentiles.

Bounded whatever the call rate: one bucket per second for the last hour,
each with its counts and at most ``LATENCY_SAMPLES`` latencies (the
percentiles are over those samples), kept as a C array of doubles: 1.6 KB a
second, ~6 MB for the full hour at high rates (as Python floats in a list it
was ~25 MB, and it is what grows during a daemon's first hour: benchmarks'
``--soak``).  Prometheus keeps the long-term series.
"""

from __future__ import annotations

import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

HOUR = 3600
LATENCY_SAMPLES = 200  # per second


@dataclass
class Bucket:
    second: int
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies: array = field(default_factory=lambda: array("d"))


class RecentDecisions:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.buckets: deque[Bucket] = deque()
        self.clock = clock
        self.total = 0

    def add(self, action: str, reason: str, latency: float) -> None:
        second = int(self.clock())
        if not self.buckets or self.buckets[-1].second != second:
            self.buckets.append(Bucket(second))
            self._trim(second)
        bucket = self.buckets[-1]
        bucket.counts[(action, reason)] += 1
        if len(bucket.latencies) < LATENCY_SAMPLES:
            bucket.latencies.append(latency)
        self.total += 1

    def _trim(self, second: int) -> None:
        while self.buckets and self.buckets[0].second <= second - HOUR:
            self.buckets.popleft()

    def summary(self) -> dict:
        now = int(self.clock())
        self._trim(now)
        hour = list(self.buckets)
        minute = [b for b in hour if b.second > now - 60]
        latencies = sorted(x for b in hour for x in b.latencies)
        return {
            "total": self.total,
            "last_minute": _counts(minute),
            "last_hour": _counts(hour),
            "latency_ms": {"p50": _percentile(latencies, 0.50), "p99": _percentile(latencies, 0.99)},
        }


def _counts(buckets: Iterable[Bucket]) -> dict:
    counts: Counter[tuple[str, str]] = Counter()
    for bucket in buckets:
        counts.update(bucket.counts)
    by_verdict: Counter[str] = Counter()
    for (action, _), n in counts.items():
        by_verdict[action] += n
    return {"by_verdict": dict(by_verdict), "by_reason": {f"{a}/{r}": n for (a, r), n in sorted(counts.items())}}


def _percentile(ordered: list[float], fraction: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000, 3)
