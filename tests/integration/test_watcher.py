"""The registration watcher against the simulated switch: events, resync, races."""

from __future__ import annotations

import pytest

from fsguard.config import SwitchConfig
from fsguard.esl.watcher import Watcher
from fsguard.registrations import RegistrationCache
from fsguard.testing.caller import CallScenario, place_call
from fsguard.testing.switch import FakeSwitch, Registration

A1001 = "1001@tenant-a.test"


@pytest.fixture
def empty_switch():
    with FakeSwitch() as fake:
        yield fake


def watch(switch, event_format="json", sweep_interval=30.0):
    cache = RegistrationCache()
    host, port = switch.address
    watcher = Watcher(SwitchConfig("fs1", host, port, "ClueCon"), cache, timeout=2.0, expiry_margin=0.0,
                      backoff=(0.01, 0.05), sweep_interval=sweep_interval, event_format=event_format)
    watcher.start()
    assert watcher.wait_for(lambda w: w.live, 5), watcher.last_error
    return watcher, cache


def ips(cache, identity):
    return sorted(b.network_ip for b in cache.bindings(identity, ["fs1"]))


def applied(watcher, count):
    return watcher.wait_for(lambda w: sum(w.events.values()) >= count, 5)


@pytest.fixture
def watched(empty_switch, request):
    watcher, cache = watch(empty_switch, getattr(request, "param", "json"))
    yield empty_switch, watcher, cache
    watcher.stop()


@pytest.mark.parametrize("watched", ["json", "plain"], indirect=True)
def test_event_sequence_step_by_step(watched):
    switch, watcher, cache = watched
    phone = Registration("1001", "tenant-a.test", network_ip="127.0.0.10", network_port=5070,
                         user_agent='Yealink SIP-T46S 66.86.0.15 "quoted" & <x>')
    seen = 0

    def step(action, expected_events):
        nonlocal seen
        action()
        seen += expected_events
        assert applied(watcher, seen)

    step(lambda: switch.add(phone, event=True), 1)  # new registration
    assert ips(cache, A1001) == ["127.0.0.10"]
    [binding] = cache.bindings(A1001, ["fs1"])
    assert binding.user_agent == 'Yealink SIP-T46S 66.86.0.15 "quoted" & <x>'

    step(lambda: switch.emit_register(phone, refresh=True), 1)  # refresh: same Call-ID
    assert ips(cache, A1001) == ["127.0.0.10"] and cache.size("fs1") == 1

    dev1 = Registration("1002", "tenant-a.test", network_ip="127.0.0.12", call_id="dev1@127.0.0.12")
    dev2 = Registration("1002", "tenant-a.test", network_ip="127.0.0.13", call_id="dev2@127.0.0.13")
    step(lambda: (switch.add(dev1, event=True), switch.add(dev2, event=True)), 2)  # second device
    assert ips(cache, "1002@tenant-a.test") == ["127.0.0.12", "127.0.0.13"]

    v6 = Registration("1003", "tenant-a.test", network_ip="::1", profile="internal-ipv6",
                      user_agent="Téléphone ☎ 1.0 <b>&amp;</b>")
    step(lambda: switch.add(v6, event=True), 1)  # IPv6, special characters
    [binding] = cache.bindings("1003@tenant-a.test", ["fs1"])
    assert (binding.network_ip, binding.profile, binding.user_agent) == ("::1", "internal-ipv6", v6.user_agent)

    step(lambda: (switch.remove(dev1.call_id), switch.emit_unregister(dev1)), 1)  # one device leaves
    assert ips(cache, "1002@tenant-a.test") == ["127.0.0.13"]

    bad = Registration("1003", "tenant-a.test", network_ip="127.0.0.14")
    step(lambda: switch.emit_register_failure(bad), 1)  # wrong password: counted, nothing cached
    assert watcher.events["sofia::register_failure"] == 1 and ips(cache, "1003@tenant-a.test") == ["::1"]

    step(lambda: switch.flush(A1001), 1)  # flush_inbound_reg -> sofia::expire
    assert ips(cache, A1001) == []

    step(lambda: (switch.remove(dev2.call_id), switch.emit_unregister(dev2, socket_close=True)), 1)
    assert ips(cache, "1002@tenant-a.test") == []  # the socket-close variant has no network-ip


def test_natural_expiry_without_an_expire_event(empty_switch):
    watcher, cache = watch(empty_switch, sweep_interval=0.05)
    try:
        short = Registration("1003", "tenant-b.test", network_ip="127.0.0.15", expires=1)
        empty_switch.add(short, event=True)
        assert applied(watcher, 1) and ips(cache, "1003@tenant-b.test") == ["127.0.0.15"]
        # no sofia::expire is sent: the cache's own clock removes it
        assert watcher.wait_for(lambda w: cache.size("fs1") == 0, 5)
    finally:
        watcher.stop()


def test_bootstrap_loads_every_profile(empty_switch):
    empty_switch.add(Registration("1001", "tenant-a.test", network_ip="127.0.0.10"))
    empty_switch.add(Registration("1003", "tenant-a.test", network_ip="::1", profile="internal-ipv6"))
    watcher, cache = watch(empty_switch)
    try:
        assert ips(cache, A1001) == ["127.0.0.10"] and ips(cache, "1003@tenant-a.test") == ["::1"]
        assert "sofia xmlstatus" in empty_switch.api_commands
        assert {"sofia xmlstatus profile internal reg", "sofia xmlstatus profile internal-ipv6 reg"} <= set(
            empty_switch.api_commands)
    finally:
        watcher.stop()


def test_drop_and_come_back_with_other_registrations_converges(empty_switch):
    old = Registration("1001", "tenant-a.test", network_ip="127.0.0.10")
    empty_switch.add(old)
    watcher, cache = watch(empty_switch)
    try:
        assert ips(cache, A1001) == ["127.0.0.10"]
        empty_switch.stop()  # the switch goes away ...
        assert watcher.wait_for(lambda w: not w.live, 5)
        empty_switch.remove(old.call_id)  # ... and comes back with another truth, no events
        empty_switch.add(Registration("1001", "tenant-a.test", network_ip="127.0.0.99"))
        empty_switch.start()
        assert watcher.wait_for(lambda w: w.live and w.sessions == 2, 5), watcher.last_error
        assert ips(cache, A1001) == ["127.0.0.99"]
    finally:
        watcher.stop()


def test_captured_shutdown_then_restart_resyncs(empty_switch):
    empty_switch.add(Registration("1001", "tenant-a.test", network_ip="127.0.0.10"))
    watcher, cache = watch(empty_switch)
    try:
        empty_switch.shutdown()  # SHUTDOWN event, "The system is being shut down.", close; no unregister
        assert watcher.wait_for(lambda w: w.state == "down", 5)
        assert "shut down" in watcher.last_error
        empty_switch.start()  # registrations survived the restart
        assert watcher.wait_for(lambda w: w.live and w.sessions == 2, 5)
        assert ips(cache, A1001) == ["127.0.0.10"]
    finally:
        watcher.stop()


@pytest.mark.parametrize("kind", ["bad-password", "rude-rejection"])
def test_refused_session_is_reported_and_retried(kind):
    switch = FakeSwitch(rude_rejection=kind == "rude-rejection")
    switch.start()
    cache = RegistrationCache()
    host, port = switch.address
    password = "WrongPassword" if kind == "bad-password" else "ClueCon"
    watcher = Watcher(SwitchConfig("fs1", host, port, password), cache, timeout=1.0, expiry_margin=0.0,
                      backoff=(0.01, 0.05))
    watcher.start()
    try:
        assert switch.wait_until(lambda: switch.connections >= 3, 5)  # it keeps retrying, with backoff
        assert not watcher.live
        assert ("authentication refused" if kind == "bad-password" else "Access Denied") in watcher.last_error
    finally:
        watcher.stop()
        switch.stop()


def test_register_then_call_race_is_won_by_the_live_lookup(switch, start_daemon):
    daemon = start_daemon(switch, registrations="cache")
    # The phone registered, but its sofia::register has not reached fsguard yet.
    switch.add(Registration("1001", "tenant-a.test", network_ip="127.0.0.20", network_port=5080))
    result = place_call(daemon.server.address, CallScenario(base="out-deny-respond-603"))
    assert result.outcome == "continued" and result.variables["fsguard_reason"] == "registered-ip"
    assert switch.api_commands[-1] == "sofia xmlstatus profile internal user 1001@tenant-a.test"


def test_a_down_watcher_is_replaced_by_live_lookups(switch, start_daemon):
    daemon = start_daemon(switch, registrations="cache")
    [watcher] = daemon.watchers
    watcher.stop()
    assert not watcher.live
    before = len(switch.api_commands)
    result = place_call(daemon.server.address, CallScenario(base="out-allow-registered-ip"))
    assert result.variables["fsguard_reason"] == "registered-ip"
    assert len(switch.api_commands) == before + 1  # asked live, not from a stale table


def test_cache_answers_without_asking_the_switch(switch, start_daemon):
    daemon = start_daemon(switch, registrations="cache")
    before = len(switch.api_commands)
    new_phone = Registration("1002", "tenant-a.test", network_ip="127.0.0.77", network_port=5090)
    switch.add(new_phone, event=True)
    [watcher] = daemon.watchers
    assert watcher.wait_for(lambda w: "127.0.0.77" in ips(daemon.cache, "1002@tenant-a.test"), 5)
    result = place_call(daemon.server.address, CallScenario(auth_user="1002", source_ip="127.0.0.77"))
    assert result.variables["fsguard_reason"] == "registered-ip"
    assert len(switch.api_commands) == before


def test_bootstrap_survives_a_hostile_call_id(empty_switch):
    # Captured (in-api-hostile-callid): FreeSWITCH emits this Call-ID raw, so
    # the xmlstatus answer is not well-formed XML; the other rows must survive.
    hostile = Registration("1003", "tenant-a.test", network_ip="127.0.0.16", network_port=5078,
                           call_id="x<y>\"z\"'q'@127.0.0.16", user_agent="Téléphone ☎ 1.0 <b>&amp;</b>")
    forger = Registration("1002", "tenant-a.test", network_ip="127.0.0.12",
                          call_id="a</call-id><network-ip>6.6.6.6</network-ip></registration><registration>")
    empty_switch.add(hostile)
    empty_switch.add(forger)
    empty_switch.add(Registration("1001", "tenant-a.test", network_ip="127.0.0.10"))
    watcher, cache = watch(empty_switch)
    try:
        assert ips(cache, "1003@tenant-a.test") == ["127.0.0.16"]
        assert ips(cache, "1002@tenant-a.test") == ["127.0.0.12"]
        assert ips(cache, A1001) == ["127.0.0.10"]
        [binding] = cache.bindings("1003@tenant-a.test", ["fs1"])
        assert binding.call_id == hostile.call_id and binding.user_agent == hostile.user_agent
    finally:
        watcher.stop()
