"""Faults, floods and leaks on the outbound port: every call ends in a verdict or a clean close."""

from __future__ import annotations

import gc
import os
import socket

import gevent
import pytest
from gevent.queue import Queue

from fsguard.testing.caller import CallScenario, place_call, place_calls

DENY = CallScenario(base="out-deny-respond-603", socket_mode="static")
ALLOW = CallScenario(base="out-allow-registered-ip", socket_mode="static")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def greenlets() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, gevent.Greenlet) and not o.dead)


def handler_crashes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info and r.name.startswith("fsguard")]


@pytest.mark.parametrize("fault", ["close_on_accept", "close_mid_channel_data", "no_connect_reply",
                                   "garbage_channel_data"])
def test_switch_side_faults_end_cleanly(fault, switch, start_daemon, caplog):
    daemon = start_daemon(switch, registrations="live", command_timeout=0.5)
    outcomes = Queue()
    daemon.server.on_outcome = outcomes.put
    result = place_call(daemon.server.address, CallScenario(fault=fault), timeout=5)
    outcome = outcomes.get(timeout=5)
    assert outcome.decision is None and outcome.error  # no verdict, said why, socket closed
    assert result.variables.get("fsguard_verdict") is None  # the dialplan check refuses such a call
    assert handler_crashes(caplog) == []


@pytest.mark.parametrize("scenario", [
    CallScenario(base="out-deny-respond-603", err_on=("api uuid_kill",)),
    CallScenario(base="out-allow-registered-ip", err_on=("api uuid_setvar_multi",)),
])
def test_a_refused_verdict_is_an_error_at_once_not_at_the_deadline(scenario, switch, start_daemon):
    daemon = start_daemon(switch, registrations="live", command_timeout=3.0)
    outcomes = Queue()
    daemon.server.on_outcome = outcomes.put
    result = place_call(daemon.server.address, scenario)
    outcome = outcomes.get(timeout=2)
    assert "refused the verdict" in outcome.error and "simulated failure" in outcome.error
    assert not outcome.effective and not outcome.caller_hung_up
    assert result.variables.get("fsguard_verdict") is None and result.hangup_cause is None
    assert result.command_lines[-1] == "exit" and result.closed_by == "switch"


def test_a_socket_without_full_is_refused_with_the_reason(switch, start_daemon):
    """linger and api need ``socket ... full``; without it no verdict can take effect: say so."""
    daemon = start_daemon(switch, registrations="live", command_timeout=3.0)
    outcomes = Queue()
    daemon.server.on_outcome = outcomes.put
    result = place_call(daemon.server.address, CallScenario(extra={"Control": "single-channel"}))
    outcome = outcomes.get(timeout=2)
    assert outcome.decision is None and "must call the socket application with 'full'" in outcome.error
    assert result.command_lines == ["connect", "linger"] and result.variables == {}


def test_connection_closed_after_the_verdict_is_not_a_crash(switch, start_daemon, caplog):
    daemon = start_daemon(switch, registrations="live")
    outcomes = Queue()
    daemon.server.on_outcome = outcomes.put
    result = place_call(daemon.server.address, CallScenario(base="out-deny-respond-603", err_on=("exit",)))
    assert result.sip_final == "603 Decline"
    assert outcomes.get(timeout=2).effective and handler_crashes(caplog) == []


FAULTS = ["close_on_accept", "close_mid_channel_data", "garbage_channel_data", None]


def faulty_calls_leave_nothing(daemon, count: int, concurrency: int) -> tuple:
    """Place ``count`` calls, most of them faulty; return (fds, greenlets) before and after."""
    scenarios = [CallScenario(fault=FAULTS[i % 4], cancel_after=0.001 if i % 7 == 0 else None,
                              source_ip="127.0.0.20" if i % 3 else "127.0.0.10") for i in range(count)]
    place_calls(daemon.server.address, scenarios[:concurrency], concurrency=concurrency)  # warm-up
    daemon.server.pool.join(timeout=5)
    before = (open_fds(), greenlets())
    place_calls(daemon.server.address, scenarios, concurrency=concurrency, timeout=10)
    assert daemon.server.pool.join(timeout=30)
    gc.collect()
    after = (open_fds(), greenlets())
    assert after[0] <= before[0] + 2, f"file descriptors: {before[0]} -> {after[0]}"
    assert after[1] <= before[1] + 2, f"greenlets: {before[1]} -> {after[1]}"
    return before, after


def test_no_greenlet_or_socket_leaks_over_many_faulty_calls(switch, start_daemon, caplog):
    daemon = start_daemon(switch, registrations="live", command_timeout=0.3)
    faulty_calls_leave_nothing(daemon, 400, concurrency=50)
    assert handler_crashes(caplog) == []


@pytest.mark.stress
def test_no_leaks_over_10000_faulty_calls(switch, start_daemon):
    daemon = start_daemon(switch, registrations="live", command_timeout=0.3)
    before, after = faulty_calls_leave_nothing(daemon, 10_000, concurrency=100)
    print(f"10,000 faulty calls: fds {before[0]} -> {after[0]}, greenlets {before[1]} -> {after[1]}")


def connect_from(source_ip: str, address) -> socket.socket:
    sock = socket.socket()
    sock.bind((source_ip, 0))
    sock.connect(address)
    return sock


def test_connections_from_outside_accept_from_are_closed_at_once_and_counted(switch, start_daemon):
    daemon = start_daemon(switch, accept_from=["127.0.0.1/32"])
    flood = [connect_from("127.0.0.99", daemon.server.address) for _ in range(2000)]
    try:
        closed = 0
        for sock in flood:
            sock.settimeout(5)
            closed += sock.recv(1) == b""  # EOF: fsguard hung up without a word
        assert closed == 2000
        assert daemon.server.refused["127.0.0.99"] == 2000
        assert daemon.status()["refused_connections"] == 2000
        result = place_call(daemon.server.address, ALLOW)  # from 127.0.0.1: decided as usual
        assert result.variables.get("fsguard_reason") == "registered-ip"
    finally:
        for sock in flood:
            sock.close()


def test_idle_connections_cannot_starve_real_calls(switch, start_daemon):
    daemon = start_daemon(switch, max_connections=50, command_timeout=1.0)
    idle = [socket.create_connection(daemon.server.address) for _ in range(300)]  # never answer `connect`
    try:
        during = place_call(daemon.server.address, ALLOW, timeout=5)
        emergency = place_call(daemon.server.address, CallScenario(base="out-emergency-911", socket_mode="static"))
        # The idle ones fill the slots: a real call is answered at once, over capacity ...
        assert during.outcome in ("continued", "rejected")
        assert during.verdict_at - during.connected_at < 0.5
        assert emergency.variables.get("fsguard_reason") == "emergency"  # ... emergencies still pass
        # ... and once their read deadline passes, calls are decided normally again.
        assert daemon.server.pool.join(timeout=5)  # every idle one was cut at its read deadline
        after = place_call(daemon.server.address, ALLOW, timeout=5)
        assert after.variables.get("fsguard_reason") == "registered-ip"
    finally:
        for sock in idle:
            sock.close()


def test_over_capacity_verdict_is_configurable(switch, start_daemon):
    switch.api_delay = 0.5  # hold the first call in its lookup
    daemon = start_daemon(switch, registrations="live", max_connections=1, over_capacity="allow")
    first = gevent.spawn(place_call, daemon.server.address, ALLOW)
    assert switch.wait_until(lambda: len(switch.api_commands) >= 1, 5)
    second = place_call(daemon.server.address, CallScenario(base="out-deny-respond-603", socket_mode="static"))
    assert second.variables.get("fsguard_reason") == "over-capacity" and second.outcome == "continued"
    assert first.get(timeout=5).variables.get("fsguard_reason") == "registered-ip"


def test_slow_trickle_is_cut_at_the_read_deadline(switch, start_daemon):
    daemon = start_daemon(switch, command_timeout=0.5)
    sock = socket.create_connection(daemon.server.address)
    try:
        assert sock.recv(64) == b"connect\n\nlinger\n\n"  # one write (pipelined)
        sock.settimeout(5)
        started = gevent.get_hub().loop.now()
        for byte in b"Event-Name: CHANNEL_DATA\n":  # one byte every 0.1 s never ends the header block
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break  # fsguard has closed it
            gevent.sleep(0.1)  # the trickle itself, not a synchronisation
        data = sock.recv(64)
        assert data == b""  # closed by fsguard
        assert gevent.get_hub().loop.now() - started < 3
    finally:
        sock.close()
