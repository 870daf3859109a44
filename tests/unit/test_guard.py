"""Guard: the lookup under a deadline, then the verdict; failures become verdicts."""

import gevent
import pytest

from fsguard.call import CallFacts
from fsguard.guard import Guard
from fsguard.policy import Action, Policy, Reason
from fsguard.registrations import Binding, LookupFailed, Registrations

CALL = CallFacts(uuid="u", source_ip="127.0.0.10", auth_user="1001", auth_realm="tenant-a.test",
                 destination="9196", profile="internal")
HERE = Binding(user="1001", realm="tenant-a.test", call_id="c", network_ip="127.0.0.10")


class Source:
    """A registration source scripted per call kind: the fast path and the live one."""

    def __init__(self, cache=(), live=(), delay=0.0, error=None, live_error=None, source="cache"):
        self.cache, self.live, self.delay, self.source = cache, live, delay, source
        self.error, self.live_error = error, live_error
        self.calls = []

    def _answer(self, kind, bindings, error):
        self.calls.append(kind)
        if self.delay:
            gevent.sleep(self.delay)
        if error is not None:
            raise error
        return Registrations("1001@tenant-a.test", tuple(bindings), kind)

    def lookup(self, profile, user, domain):
        return self._answer(self.source, self.cache, self.error)

    def lookup_live(self, profile, user, domain):
        return self._answer("live", self.live, self.live_error)


def guard(source, timeout=1.0, **policy):
    return Guard(Policy(**policy), source, timeout, clock=lambda: 0.0)


def test_cache_hit_allows_without_live_lookup():
    source = Source(cache=[HERE])
    decision = guard(source).decide(CALL)
    assert decision.verdict.reason is Reason.REGISTERED_IP and decision.lookup == "cache"
    assert source.calls == ["cache"]


def test_cache_miss_is_confirmed_live_register_then_call_race():
    source = Source(cache=[], live=[HERE])
    decision = guard(source).decide(CALL)
    assert decision.verdict.action is Action.ALLOW and decision.lookup == "live"
    assert source.calls == ["cache", "live"]


def test_cache_deny_confirmed_live_stays_deny():
    source = Source(cache=[], live=[])
    decision = guard(source).decide(CALL)
    assert decision.verdict.reason is Reason.NOT_REGISTERED and source.calls == ["cache", "live"]


def test_failed_confirmation_keeps_the_cache_answer():
    decision = guard(Source(cache=[], live_error=LookupFailed("fs1 down"))).decide(CALL)
    assert decision.verdict.reason is Reason.NOT_REGISTERED and decision.error == "fs1 down"


def test_live_answer_is_not_asked_twice():
    source = Source(cache=[], source="live")
    guard(source).decide(CALL)
    assert source.calls == ["live"]


@pytest.mark.parametrize("on_error", [Action.DENY, Action.ALLOW])
def test_lookup_failure_applies_on_error(on_error):
    decision = guard(Source(error=LookupFailed("garbage")), on_error=on_error).decide(CALL)
    assert (decision.verdict.action, decision.verdict.reason) == (on_error, Reason.LOOKUP_FAILED)
    assert decision.error == "garbage"


@pytest.mark.parametrize("on_error", [Action.DENY, Action.ALLOW])
def test_decision_timeout_applies_on_error(on_error):
    decision = guard(Source(cache=[HERE], delay=5.0), timeout=0.05, on_error=on_error).decide(CALL)
    assert (decision.verdict.action, decision.verdict.reason) == (on_error, Reason.TIMEOUT)
    assert decision.latency < 1.0


def test_a_crashing_lookup_still_ends_in_a_verdict():
    decision = guard(Source(error=RuntimeError("bug"))).decide(CALL)
    assert decision.verdict.reason is Reason.LOOKUP_FAILED and "bug" in decision.error


def test_emergency_never_waits_on_a_broken_lookup():
    source = Source(delay=5.0, error=LookupFailed("down"), live_error=LookupFailed("down"))
    call = CallFacts(uuid="u", source_ip="127.0.0.20", auth_user="1001", auth_realm="tenant-a.test", destination="911")
    decision = guard(source, timeout=0.05).decide(call)
    assert decision.verdict.reason is Reason.EMERGENCY and source.calls == [] and decision.lookup == "none"
