"""The cache replays the captured sofia event sequences, step by step."""

import pytest

from fsguard.registrations import (
    Binding,
    RegistrationCache,
    SwitchTable,
    change_from_event,
    parse_profiles,
)
from tests.helpers import capture_meta, capture_timed_messages

MARGIN = 90.0

# After each captured action: identity -> {call-id suffix: network ip}
EXPECTED = [
    {"1001@tenant-a.test": {"1001a": "127.0.0.10"}},  # 1 register
    {"1001@tenant-a.test": {"1001a": "127.0.0.10"}},  # 2 refresh replaces
    {"1001@tenant-a.test": {"1001a": "127.0.0.10"},  # 3 second device of 1002
     "1002@tenant-a.test": {"1002a-dev1": "127.0.0.12", "1002a-dev2": "127.0.0.13"}},
    {"1001@tenant-a.test": {"1001a": "127.0.0.10"},  # 3b IPv6
     "1002@tenant-a.test": {"1002a-dev1": "127.0.0.12", "1002a-dev2": "127.0.0.13"},
     "1003@tenant-a.test": {"1003a-v6": "::1"}},
    {"1001@tenant-a.test": {"1001a": "127.0.0.10"},  # 4 unregister of one device
     "1002@tenant-a.test": {"1002a-dev2": "127.0.0.13"},
     "1003@tenant-a.test": {"1003a-v6": "::1"}},
    {"1001@tenant-a.test": {"1001a": "127.0.0.10"},  # 5 wrong password: nothing changes
     "1002@tenant-a.test": {"1002a-dev2": "127.0.0.13"},
     "1003@tenant-a.test": {"1003a-v6": "::1"}},
    {"1002@tenant-a.test": {"1002a-dev2": "127.0.0.13"},  # 6 flush -> sofia::expire
     "1003@tenant-a.test": {"1003a-v6": "::1"}},
    {"1002@tenant-a.test": {"1002a-dev2": "127.0.0.13"},  # 7 short registration came and expired
     "1003@tenant-a.test": {"1003a-v6": "::1"}},
    {"1002@tenant-a.test": {"1002a-dev2": "127.0.0.13"},  # 8 INVITE with wrong password
     "1003@tenant-a.test": {"1003a-v6": "::1"}},
    {"1002@tenant-a.test": {"1002a-dev2": "127.0.0.13"},  # 9 INVITE auth events
     "1003@tenant-a.test": {"1003a-v6": "::1"}},
]


def snapshot(table):
    return {
        identity: {call_id.split("@")[0].split("-", 1)[1]: b.network_ip for call_id, b in rows.items()}
        for identity, rows in table.by_identity.items()
    }


@pytest.mark.parametrize("capture", ["in-events-plain", "in-events-json"])
def test_captured_sequence_step_by_step(capture):
    actions = capture_meta(capture)["actions"]
    assert len(actions) == len(EXPECTED)
    events = [(t, m.event()) for t, m in capture_timed_messages(capture, "fs>app") if m.event() is not None]
    table = SwitchTable()
    for action, expected in zip(actions, EXPECTED):
        for t, event in events:
            if action["t_start"] <= t < action["t_end"]:
                change = change_from_event(event.headers, "fs1", now=1000.0, expiry_margin=MARGIN)
                if change is not None:
                    table.apply(change)
        assert snapshot(table) == expected, action["action"][:60]


def test_register_event_fields():
    [(_, message)] = [
        (t, m) for t, m in capture_timed_messages("in-events-plain", "fs>app")
        if m.event() is not None and m.event().subclass == "sofia::register"
    ][:1]
    change = change_from_event(message.event().headers, "fs1", now=1000.0, expiry_margin=MARGIN)
    b = change.binding
    assert change.kind == "register"
    assert (b.identity, b.network_ip, b.network_port, b.profile, b.transport) == (
        "1001@tenant-a.test", "127.0.0.10", "5070", "internal", "UDP")
    assert b.user_agent == 'Yealink SIP-T46S 66.86.0.15 "quoted" & <x>'
    assert b.contact == '"" <sip:1001@127.0.0.10:5070;transport=UDP>'
    assert b.expires_at == 1000.0 + 3600 + MARGIN and b.switch == "fs1"


def test_hostile_user_agent_in_both_formats():
    messages = [m for _, m in capture_timed_messages("in-api-hostile-callid", "fs>app")]
    registers = [m.event() for m in messages if m.event() is not None and m.event().subclass == "sofia::register"]
    assert len(registers) == 2  # one plain, one json
    for event in registers:
        b = change_from_event(event.headers, "fs1", 0, 0).binding
        assert b.call_id == "x<y>\"z\"'q'@127.0.0.16"
        assert b.user_agent == "Téléphone ☎ 1.0 <b>&amp;</b>"


def _binding(call_id, ip, expires_at, identity=("1001", "tenant-a.test")):
    return Binding(user=identity[0], realm=identity[1], call_id=call_id, network_ip=ip, expires_at=expires_at)


def test_natural_expiry_by_the_cache_clock():
    table = SwitchTable([_binding("a", "127.0.0.10", 100.0), _binding("b", "127.0.0.11", 200.0)])
    assert table.sweep(99.0) == 0 and len(table) == 2
    assert table.sweep(100.0) == 1
    assert snapshot_ips(table) == {"127.0.0.11"}


def snapshot_ips(table):
    return {b.network_ip for rows in table.by_identity.values() for b in rows.values()}


def test_refresh_moving_ip_replaces_and_remove_is_by_call_id():
    table = SwitchTable([_binding("a", "127.0.0.10", 100.0)])
    table.put(_binding("a", "127.0.0.99", 100.0))
    assert snapshot_ips(table) == {"127.0.0.99"} and len(table) == 1
    assert table.remove("a") and not table.remove("a") and len(table) == 0


def test_cache_is_the_union_of_the_switches_asked():
    cache = RegistrationCache()
    cache.replace("fs1", SwitchTable([_binding("a", "127.0.0.10", None)]))
    cache.replace("fs2", SwitchTable([_binding("b", "127.0.0.11", None)]))
    assert {b.network_ip for b in cache.bindings("1001@tenant-a.test", ["fs1", "fs2"])} == {"127.0.0.10", "127.0.0.11"}
    assert {b.network_ip for b in cache.bindings("1001@tenant-a.test", ["fs2"])} == {"127.0.0.11"}
    assert cache.bindings("1002@tenant-a.test", ["fs1", "fs2"]) == ()


def test_unregister_variant_without_network_ip_still_removes():
    # The socket-close unregister (TCP/TLS connection lost) carries no network-ip.
    change = change_from_event({"Event-Subclass": "sofia::unregister", "call-id": "a", "username": "1001",
                                "realm": "tenant-a.test", "expires": "0"}, "fs1", 0, 0)
    assert change.kind == "remove" and change.call_id == "a"


@pytest.mark.parametrize("headers", [
    {"Event-Subclass": "sofia::register", "call-id": "a", "username": "1001", "realm": "x", "expires": "60"},
    {"Event-Subclass": "sofia::register", "call-id": "a", "network-ip": "1.2.3.4", "expires": "60"},
    {"Event-Subclass": "sofia::register", "call-id": "a", "username": "1", "realm": "x", "network-ip": "1.2.3.4", "expires": "soon"},
    {"Event-Subclass": "sofia::register_attempt", "call-id": "a", "username": "1", "realm": "x", "network-ip": "1.2.3.4", "expires": "300"},
    {"Event-Subclass": "sofia::register", "username": "1", "realm": "x", "network-ip": "1.2.3.4", "expires": "60"},
])
def test_incomplete_or_other_events_change_nothing(headers):
    assert change_from_event(headers, "fs1", 0, 0) is None


def test_register_with_expires_zero_removes():
    change = change_from_event({"Event-Subclass": "sofia::register", "call-id": "a", "username": "1",
                                "realm": "x", "network-ip": "1.2.3.4", "expires": "0"}, "fs1", 0, 0)
    assert change.kind == "remove"


def test_profile_list_from_mod_sofia_format():
    reply = (b'<?xml version="1.0" encoding="ISO-8859-1"?>\n<profiles>\n'
             b"<profile>\n<name>internal</name>\n<type>profile</type>\n<data>sip:mod_sofia@127.0.0.1:5060</data>\n<state>RUNNING (0)</state>\n</profile>\n"
             b"<profile>\n<name>internal</name>\n<type>profile</type>\n<data>sips:mod_sofia@127.0.0.1:5061</data>\n<state>RUNNING (0) (TLS)</state>\n</profile>\n"
             b"<gateway>\n<name>carrier</name>\n<type>gateway</type>\n<data>sip:x</data>\n<state>REGED</state>\n</gateway>\n"
             b"<alias>\n<name>127.0.0.1</name>\n<type>alias</type>\n<data>internal</data>\n<state>ALIASED</state>\n</alias>\n"
             b"<profile>\n<name>internal-ipv6</name>\n<type>profile</type>\n<data>sip:mod_sofia@[::1]:5060</data>\n<state>RUNNING (0)</state>\n</profile>\n"
             b"</profiles>\n")
    assert parse_profiles(reply) == ["internal", "internal-ipv6"]
