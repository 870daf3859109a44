"""When registrations cannot be checked, on_error decides; emergencies never wait."""

from __future__ import annotations

import pytest

from fsguard.testing.caller import CallScenario, place_call
from fsguard.testing.switch import FakeSwitch

ALLOWED_IP = CallScenario(base="out-allow-registered-ip")  # registered: would be allowed


def reason_and_verdict(result):
    return result.variables.get("fsguard_reason"), result.outcome


@pytest.mark.parametrize("registrations", ["live", "cache"])
@pytest.mark.parametrize("on_error, outcome", [("deny", "rejected"), ("allow", "continued")])
def test_switch_down(on_error, outcome, registrations, switch, start_daemon):
    daemon = start_daemon(switch, registrations=registrations, on_error=on_error)
    switch.stop()  # the watcher loses its connection, live lookups cannot connect
    if registrations == "cache":
        [watcher] = daemon.watchers
        assert watcher.wait_for(lambda w: not w.live, 5)
    result = place_call(daemon.server.address, ALLOWED_IP)
    assert result.outcome == outcome
    if outcome == "continued":
        assert result.variables["fsguard_reason"] == "lookup-failed"


@pytest.mark.parametrize("on_error, outcome", [("deny", "rejected"), ("allow", "continued")])
@pytest.mark.parametrize("garbage", [b"-ERR sofia Command not found!\n", b"Invalid Profile!\n", b"\x00\xff<html>"])
def test_switch_answers_garbage(garbage, on_error, outcome, switch, start_daemon):
    switch.api_reply = garbage
    daemon = start_daemon(switch, registrations="live", on_error=on_error)
    result = place_call(daemon.server.address, ALLOWED_IP)
    assert result.outcome == outcome


@pytest.mark.parametrize("on_error, outcome", [("deny", "rejected"), ("allow", "continued")])
def test_decision_timeout(on_error, outcome, switch, start_daemon):
    switch.api_delay = 1.0
    daemon = start_daemon(switch, registrations="live", on_error=on_error, decision_timeout=0.1)
    result = place_call(daemon.server.address, ALLOWED_IP)
    assert result.outcome == outcome
    if outcome == "continued":
        assert result.variables["fsguard_reason"] == "timeout"
    assert result.verdict_at - result.connected_at < 0.6  # decided at the deadline, not after the switch


@pytest.mark.parametrize("registrations", ["live", "cache"])
def test_emergency_is_allowed_even_when_lookups_fail(registrations, switch, start_daemon):
    daemon = start_daemon(switch, registrations=registrations, on_error="deny")
    switch.stop()
    result = place_call(daemon.server.address, CallScenario(base="out-emergency-911"))
    assert result.outcome == "continued" and result.variables["fsguard_reason"] == "emergency"


def test_wrong_esl_password_is_a_failed_lookup(switch, start_daemon):
    host, port = switch.address
    daemon = start_daemon(switch, registrations="live", switches=[
        {"name": "fs1", "esl": f"{host}:{port}", "password": "WrongPassword"}])
    result = place_call(daemon.server.address, ALLOWED_IP)
    assert result.outcome == "rejected"


def test_two_switches_one_down_registered_on_the_other(switch, start_daemon):
    with FakeSwitch() as empty_node:
        daemon = start_daemon(switch, registrations="live", switches=[
            {"name": "fs1", "esl": "%s:%d" % switch.address, "password": "ClueCon"},
            {"name": "fs2", "esl": "%s:%d" % empty_node.address, "password": "ClueCon"},
        ])
        assert place_call(daemon.server.address, ALLOWED_IP).outcome == "continued"
        empty_node.stop()
        # fs1 proves the IP: the missing answer of fs2 does not matter
        assert place_call(daemon.server.address, ALLOWED_IP).variables["fsguard_reason"] == "registered-ip"
        # but an unproven IP with a switch missing is on_error, not a plain deny
        denied = place_call(daemon.server.address, CallScenario(base="out-deny-respond-603"))
        assert denied.outcome == "rejected"
