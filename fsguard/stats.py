"""Recent decisions, in memory, for ``fsguard status``: counts and latency percentiles.

A ring of one slot per second for the last hour.  Each slot holds a count
per (action, reason) and at most ``LATENCY_SAMPLES`` latencies (the
percentiles are over those samples).  All of it lives in C arrays allocated,
and written, when the daemon starts (~6.3 MB): the daemon's memory does not
grow with its first hour of traffic (benchmarks' ``--soak`` measures that it
stays flat), and a slot is reused in place, an hour later.  Prometheus keeps
the long-term series.
"""

from __future__ import annotations

import time
from array import array
from collections import Counter
from collections.abc import Callable

from .policy import Action, Reason

HOUR = 3600
LATENCY_SAMPLES = 200  # per second

# Every (action, reason) a verdict can carry, each a column of a slot's counts.
PAIRS: tuple[tuple[str, str], ...] = tuple((str(a), str(r)) for a in Action for r in Reason)
_WIDTH = len(PAIRS)


class RecentDecisions:
    def __init__(self, clock: Callable[[], float] = time.monotonic, seconds: int = HOUR,
                 samples: int = LATENCY_SAMPLES) -> None:
        self.clock = clock
        self.seconds = seconds
        self.samples = samples
        self.total = 0
        self._column = {pair: column for column, pair in enumerate(PAIRS)}
        self._second = array("q", [-1]) * seconds  # the second a slot holds; -1: none yet
        self._counts = array("I", bytes(4 * _WIDTH * seconds))
        self._zero_counts = array("I", bytes(4 * _WIDTH))
        self._sampled = array("I", bytes(4 * seconds))  # latencies held per slot
        self._latencies = array("d", bytes(8 * samples * seconds))

    def add(self, action: str, reason: str, latency: float) -> None:
        """Count one decision.  KeyError for a pair no verdict can carry (a bug)."""
        column = self._column[(action, reason)]
        second = int(self.clock())
        slot = second % self.seconds
        if self._second[slot] != second:
            self._second[slot] = second
            self._counts[slot * _WIDTH : (slot + 1) * _WIDTH] = self._zero_counts
            self._sampled[slot] = 0
        self._counts[slot * _WIDTH + column] += 1
        sampled = self._sampled[slot]
        if sampled < self.samples:
            self._latencies[slot * self.samples + sampled] = latency
            self._sampled[slot] = sampled + 1
        self.total += 1

    def _slots(self, now: int, seconds: int) -> list[int]:
        """The slots holding one of the last ``seconds`` seconds up to ``now``."""
        oldest = now - seconds
        return [slot for slot, second in enumerate(self._second) if oldest < second <= now]

    def summary(self) -> dict:
        now = int(self.clock())
        hour = self._slots(now, self.seconds)
        minute = [slot for slot in hour if self._second[slot] > now - 60]
        latencies: list[float] = []
        for slot in hour:
            start = slot * self.samples
            latencies.extend(self._latencies[start : start + self._sampled[slot]])
        latencies.sort()
        return {
            "total": self.total,
            "last_minute": self._counts_of(minute),
            "last_hour": self._counts_of(hour),
            "latency_ms": {"p50": _percentile(latencies, 0.50), "p99": _percentile(latencies, 0.99)},
        }

    def _counts_of(self, slots: list[int]) -> dict:
        counts: Counter[tuple[str, str]] = Counter()
        for slot in slots:
            row = self._counts[slot * _WIDTH : (slot + 1) * _WIDTH]
            for column, n in enumerate(row):
                if n:
                    counts[PAIRS[column]] += n
        by_verdict: Counter[str] = Counter()
        for (action, _), n in counts.items():
            by_verdict[action] += n
        return {"by_verdict": dict(by_verdict), "by_reason": {f"{a}/{r}": n for (a, r), n in sorted(counts.items())}}


def _percentile(ordered: list[float], fraction: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000, 3)
