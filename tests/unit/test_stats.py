"""fsguard status's recent decisions: a fixed ring of per-second slots."""

from __future__ import annotations

import pytest

from fsguard.policy import Action, Reason
from fsguard.stats import HOUR, LATENCY_SAMPLES, PAIRS, RecentDecisions

ALLOW = (Action.ALLOW, Reason.REGISTERED_IP)
DENY = (Action.DENY, Reason.IP_NOT_REGISTERED)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def recent(clock: Clock) -> RecentDecisions:
    return RecentDecisions(clock)


def test_every_verdict_pair_has_a_column() -> None:
    assert len(PAIRS) == len(set(PAIRS)) == len(Action) * len(Reason)
    assert ("deny", "over-capacity") in PAIRS


def test_counts_by_verdict_and_reason(recent: RecentDecisions, clock: Clock) -> None:
    for _ in range(3):
        recent.add(*ALLOW, 0.001)
    clock.now += 0.5
    recent.add(*DENY, 0.002)
    summary = recent.summary()
    assert summary["total"] == 4
    for window in ("last_minute", "last_hour"):
        assert summary[window] == {"by_verdict": {"allow": 3, "deny": 1},
                                   "by_reason": {"allow/registered-ip": 3, "deny/ip-not-registered": 1}}


def test_seconds_leave_the_minute_then_the_hour(recent: RecentDecisions, clock: Clock) -> None:
    recent.add(*DENY, 0.001)
    clock.now += 59
    recent.add(*ALLOW, 0.001)
    assert recent.summary()["last_minute"]["by_verdict"] == {"allow": 1, "deny": 1}
    clock.now += 1
    summary = recent.summary()
    assert summary["last_minute"]["by_verdict"] == {"allow": 1}
    assert summary["last_hour"]["by_verdict"] == {"allow": 1, "deny": 1}
    clock.now += HOUR - 60
    assert recent.summary()["last_hour"]["by_verdict"] == {"allow": 1}
    clock.now += 60
    summary = recent.summary()
    assert summary["last_hour"] == {"by_verdict": {}, "by_reason": {}}
    assert summary["latency_ms"] == {"p50": None, "p99": None}
    assert summary["total"] == 2


def test_a_slot_reused_an_hour_later_holds_only_its_new_second(recent: RecentDecisions, clock: Clock) -> None:
    for _ in range(5):
        recent.add(*DENY, 0.9)
    clock.now += HOUR  # the same slot of the ring
    recent.add(*ALLOW, 0.001)
    summary = recent.summary()
    assert summary["last_hour"]["by_reason"] == {"allow/registered-ip": 1}
    assert summary["latency_ms"] == {"p50": 1.0, "p99": 1.0}


def test_latency_percentiles_over_at_most_the_sampled_latencies_per_second(
        recent: RecentDecisions, clock: Clock) -> None:
    for n in range(1, 101):
        recent.add(*ALLOW, n / 1000)  # 1..100 ms
    assert recent.summary()["latency_ms"] == {"p50": 51.0, "p99": 100.0}
    for _ in range(LATENCY_SAMPLES * 2):
        recent.add(*ALLOW, 5.0)  # beyond the samples of this second: counted, not sampled
    summary = recent.summary()
    assert summary["last_minute"]["by_verdict"] == {"allow": 100 + 2 * LATENCY_SAMPLES}
    # samples: 1..100 ms, then 5 s until LATENCY_SAMPLES are held
    assert summary["latency_ms"] == {"p50": 5000.0, "p99": 5000.0}
    clock.now += 1
    recent.add(*ALLOW, 0.001)  # a new second samples again
    assert recent.summary()["latency_ms"]["p50"] < 5000.0


def test_a_pair_no_verdict_can_carry_is_refused(recent: RecentDecisions) -> None:
    with pytest.raises(KeyError):
        recent.add("maybe", "registered-ip", 0.001)
    assert recent.total == 0


def test_memory_is_taken_at_start_and_never_grows(recent: RecentDecisions, clock: Clock) -> None:
    arrays = [value for value in vars(recent).values() if hasattr(value, "buffer_info")]
    assert len(arrays) >= 4
    before = [a.buffer_info() for a in arrays]
    size = sum(a.itemsize * len(a) for a in arrays)
    assert size >= HOUR * LATENCY_SAMPLES * 8  # the latencies of a full hour, allocated up front
    for second in range(HOUR + 90):  # more than an hour at 250 decisions/s
        clock.now += 1
        for n in range(250):
            recent.add(*(ALLOW if n % 10 else DENY), 0.001)
    assert [a.buffer_info() for a in arrays] == before
    assert recent.summary()["last_hour"]["by_verdict"] == {"allow": 225 * HOUR, "deny": 25 * HOUR}
