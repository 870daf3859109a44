"""The captures load, re-split exactly, and the simulators' encoders match them."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

from fsguard.esl.protocol import MessageReader, decode_value
from fsguard.testing import caller as C
from fsguard.testing import switch as S
from fsguard.testing import transcripts as T

ALL = sorted(p.stem for p in T.FIXTURES.glob("*.jsonl"))
OUTBOUND_WITH_CD = [n for n in ALL if n.startswith("out-") and any(e.dir == T.APP for e in T.load(n).entries)]


def test_fixtures_found() -> None:
    assert (T.FIXTURES / "README.md").is_file()
    assert len(ALL) == 25


def test_load_accepts_suffix() -> None:
    assert T.load("in-auth-ok.jsonl") is T.load("in-auth-ok")
    assert T.load("in-auth-ok").meta["scenario"] == "in-auth-ok"


@pytest.mark.parametrize("name", ALL)
def test_resplit_without_leftover(name: str) -> None:
    t = T.load(name)
    for direction in (T.FS, T.APP):
        raws = [raw for _, raw in t.raw_messages(direction)]
        assert b"".join(raws) == t.stream(direction)  # exact bytes, nothing left
        assert len(t.messages(direction)) == len(raws)
        for raw in raws:  # every slice is one whole message on its own
            assert len(MessageReader(commands=direction == T.APP).feed(raw)) == 1


@pytest.mark.parametrize("name", OUTBOUND_WITH_CD)
def test_channel_data_is_the_connect_reply(name: str) -> None:
    t = T.load(name)
    cd = t.channel_data
    assert cd.startswith(b"Event-Name: CHANNEL_DATA\n") and cd.endswith(b"Control: full\n\n")
    assert t.stream(T.FS).startswith(cd)
    assert t.messages(T.APP)[0].command == "connect"


def test_events_by_name_and_subclass() -> None:
    deny = T.load("out-deny-respond-603")
    assert len(deny.events("CHANNEL_EXECUTE_COMPLETE")) == 2
    assert all(raw.startswith(b"Content-Length: ") for raw in deny.events("CHANNEL_STATE"))
    plain = T.load("in-events-plain")
    assert len(plain.events("sofia::expire")) == 2
    assert b"Event-Subclass: sofia%3A%3Aexpire" in plain.events("sofia::expire")[0]


def _plain_blocks():
    for name in ALL:
        for message in T.load(name).messages(T.FS):
            if message.content_type == "text/event-plain":
                yield message.body.partition(b"\n\n")[0]
        for message in T.load(name).messages(T.FS)[:1]:
            if message.headers.get("Event-Name") == "CHANNEL_DATA":
                yield T.load(name).channel_data.removesuffix(b"\n\n")


def test_url_encode_matches_every_captured_value() -> None:
    count = 0
    for block in _plain_blocks():
        for _name, raw in T.parse_headers(block):
            assert T.url_encode(decode_value(raw)).encode() == raw
            count += 1
    assert count > 8000


def test_url_encode_rule() -> None:
    assert T.url_encode("+OK\n") == "%2BOK%0A"
    assert T.url_encode("sofia/internal/1001@tenant-a.test") == "sofia/internal/1001%40tenant-a.test"
    assert T.url_encode("Téléphone ☎") == "T%C3%A9l%C3%A9phone%20%E2%98%8E"
    assert T.url_encode("a%41b%zz") == "a%41b%25zz"  # existing %XX kept (README)


def test_json_body_matches_captured_json_events() -> None:
    count = 0
    for name in ("in-events-json", "in-api-hostile-callid"):
        for message in T.load(name).messages(T.FS):
            if message.content_type == "text/event-json":
                pairs = json.loads(message.body, object_pairs_hook=list)  # keeps duplicated keys
                assert T.json_body(T.encode_headers(pairs)) == message.body
                count += 1
    assert count > 20


def test_wire_helpers_match_captures() -> None:
    ok = T.load("in-auth-ok").raw_messages(T.FS)
    assert ok[1][1] == T.command_reply("+OK accepted")
    assert ok[2][1] == T.api_response(S.VERSION)
    assert ok[-1][1] == T.disconnect_notice()
    out = T.load("out-deny-respond-603")
    uuid = C.captured_facts("out-deny-respond-603")["uuid"]
    raws = [raw for _, raw in out.raw_messages(T.FS)]
    assert T.disconnect_notice(uuid) == raws[-1]
    assert T.linger_notice(uuid, "sofia/internal/1001@tenant-a.test") in raws
    shutdown = T.load("in-freeswitch-shutdown").raw_messages(T.FS)
    assert shutdown[-1][1] == T.disconnect_notice(None, T.SHUTTING_DOWN)
    bg = next(raw for m, raw in T.load("in-api-registrations").raw_messages(T.FS) if m.reply_text.startswith("+OK Job"))
    job = bg.split(b"Job-UUID: ")[-1].strip().decode()
    assert bg == T.command_reply(f"+OK Job-UUID: {job}", f"Job-UUID: {job}\n")


def test_plain_event_serialisation_round_trip() -> None:
    for raw in T.load("in-api-registrations").events("BACKGROUND_JOB"):
        body = raw.partition(b"\n\n")[2]
        block, _, inner = body.partition(b"\n\n")
        headers = [h for h in T.parse_headers(block) if h[0] != "Content-Length"]
        assert T.event_message(headers, "plain", inner) == raw


def test_subscription_parsing() -> None:
    sub = T.Subscription()
    reply = T.parse_subscription(sub, "plain CUSTOM sofia::register sofia::expire".split())
    assert reply == "+OK event listener enabled plain"
    assert sub.wants("CUSTOM", "sofia::register") and not sub.wants("CUSTOM", "sofia::unregister")
    assert not sub.wants("HEARTBEAT")
    assert T.parse_subscription(T.Subscription(), ["json", "NOSUCH"]) == "-ERR no keywords supplied"
    everything = T.Subscription()
    T.parse_subscription(everything, ["json", "ALL"])
    assert everything.fmt == "json" and everything.wants("CUSTOM", "anything")


# ---------------------------------------------------------------- caller: substitution


@pytest.mark.parametrize("name", OUTBOUND_WITH_CD)
def test_unsubstituted_channel_data_equals_capture(name: str) -> None:
    mode = T.load(name).messages(T.FS)[0].headers["Socket-Mode"]
    scenario = C.CallScenario(base=name, uuid=C.captured_facts(name)["uuid"], socket_mode=mode)
    assert C.channel_data(scenario) == T.load(name).channel_data


def _all_outbound_headers():
    for name in OUTBOUND_WITH_CD:
        facts = C.captured_facts(name)
        t = T.load(name)
        yield facts, T.parse_headers(t.channel_data.removesuffix(b"\n\n"))
        for message in t.messages(T.FS):
            if message.content_type == "text/event-plain":
                yield facts, T.parse_headers(message.body.partition(b"\n\n")[0])


def test_substitution_table_is_backed_by_the_captures() -> None:
    """Every (fact, header) pair occurs in some capture with the fact's value."""
    seen: set[tuple[str, str]] = set()
    for facts, headers in _all_outbound_headers():
        for header, raw in headers:
            value = decode_value(raw)
            for fact, names in C.SUBSTITUTIONS.items():
                old = facts[fact]
                form = C._FORMS.get((fact, header), str)
                if header in names and old and form(old) in value:
                    seen.add((fact, header))
    expected = {(f, h) for f, names in C.SUBSTITUTIONS.items() for h in names}
    unbacked = expected - seen - {("uuid", "Controlled-Session-UUID")}  # a notice header, not an event one
    assert not unbacked


def _headers(scenario: C.CallScenario) -> dict[str, str]:
    return MessageReader().feed(C.channel_data(scenario))[0].headers


def test_substitutions_rewrite_every_listed_header() -> None:
    scenario = C.CallScenario(
        auth_user="2002", realm="tenant-c.example", source_ip="198.51.100.7", source_port=5999,
        destination="00441234567", user_agent='Evil "UA" <x>', uuid="11111111-2222-3333-4444-555555555555",
    )
    h = _headers(scenario)
    old = C.captured_facts(C.ALLOW_BASE)
    assert h["variable_sip_auth_username"] == "2002" and h["variable_user_name"] == "2002"
    assert h["variable_sip_auth_realm"] == "tenant-c.example" == h["variable_domain_name"]
    assert h["Channel-Name"] == "sofia/internal/2002@tenant-c.example"
    assert h["variable_sip_from_user"] == "2002" and h["Caller-Caller-ID-Number"] == "2002"
    assert h["Caller-Network-Addr"] == "198.51.100.7" == h["Channel-Network-Addr"]
    assert h["variable_sip_network_ip"] == h["variable_sip_received_ip"] == h["variable_sip_via_host"] == "198.51.100.7"
    assert h["variable_sip_network_port"] == "5999" and h["variable_sip_contact_uri"] == "2002@198.51.100.7:5999"
    assert "c=IN IP4 198.51.100.7" in h["variable_switch_r_sdp"]
    assert h["Caller-Destination-Number"] == "00441234567" == h["variable_sip_req_user"]
    assert h["variable_sip_full_to"] == "<sip:00441234567@tenant-c.example>"
    assert h["variable_sip_user_agent"] == 'Evil "UA" <x>'
    assert h["Unique-ID"] == h["variable_uuid"] == h["Channel-Call-UUID"] == scenario.uuid
    assert h["variable_effective_caller_id_name"] == "Extension 2002"
    assert h["variable_sip_local_network_addr"] == "127.0.0.1"  # not the caller's IP
    raw = C.channel_data(scenario)
    assert old["uuid"].encode() not in raw and b"127.0.0.10" not in raw
    assert b"Evil%20%22UA%22%20%3Cx%3E" in raw  # switch_url_encode of the new value
    base = T.parse_headers(T.load(C.ALLOW_BASE).channel_data.removesuffix(b"\n\n"))
    assert [n for n, _ in T.parse_headers(raw.removesuffix(b"\n\n"))] == [n for n, _ in base]


def test_from_user_and_ipv6_forms() -> None:
    h = _headers(C.CallScenario(from_user="+15551230000", source_ip="2001:db8::5"))
    assert h["variable_sip_auth_username"] == "1001"  # identity unchanged
    assert h["variable_sip_from_user"] == "+15551230000" and h["variable_sip_from_user_stripped"] == "15551230000"
    assert h["Caller-Network-Addr"] == "2001:db8::5"
    assert h["variable_sip_contact_uri"] == "+15551230000@[2001:db8::5]:5070"
    assert "c=IN IP6 2001:db8::5" in h["variable_switch_r_sdp"]


def test_trunk_base_and_credentials() -> None:
    h = _headers(C.CallScenario(credentials=False, source_ip="203.0.113.9", destination="9197"))
    assert h["variable_sip_acl_authed_by"] == "providers" and "variable_sip_auth_username" not in h
    assert h["Caller-Network-Addr"] == "203.0.113.9" and h["Caller-RDNIS"] == "9197"
    with pytest.raises(ValueError):
        C.channel_data(C.CallScenario(credentials=False, auth_user="1001"))


def test_extra_mode_and_park_timeout() -> None:
    scenario = C.CallScenario(
        socket_mode="static", park_timeout=5,
        extra={"variable_sip_h_X-AUTH-IP": "10.0.0.1", "variable_toll_allow": None, "Caller-Context": "x"},
    )
    h = _headers(scenario)
    assert h["Socket-Mode"] == "static" and h["variable_current_application_data"] == "127.0.0.1:8084 full"
    assert "variable_park_timeout" not in h  # park_timeout only exists for async sockets
    assert h["variable_sip_h_X-AUTH-IP"] == "10.0.0.1" and "variable_toll_allow" not in h
    assert h["Caller-Context"] == "x"
    names = list(_headers(C.CallScenario(park_timeout=5)))
    at = names.index("variable_park_timeout")
    assert names[at - 1 : at + 2] == [
        "variable_call_uuid", "variable_park_timeout", "variable_current_application_data",
    ]
    assert b"variable_park_timeout: 5%3ACALL_REJECTED\n" in C.channel_data(C.CallScenario(park_timeout=5))


# ---------------------------------------------------------------- switch: formats


def _captured_registrations(xml: str) -> list[S.Registration]:
    regs = []
    for row in ET.fromstring(xml).iter("registration"):
        user, realm = row.findtext("user").split("@")
        regs.append(S.Registration(
            user, realm, network_ip=row.findtext("network-ip"), network_port=int(row.findtext("network-port")),
            call_id=row.findtext("call-id"), user_agent=row.findtext("agent"),
        ))
    return regs


def _normalise(text: str) -> str:
    text = re.sub(r"exp\([^)]*\) expsecs\(\d+\)", "exp(T) expsecs(N)", text)
    return re.sub(r"EXP\([^)]*\) EXPSECS\(\d+\)", "EXP(T) EXPSECS(N)", text)


def _api_bodies(name: str) -> dict[str, str]:
    t = T.load(name)
    commands = [m.command for m in t.messages(T.APP) if m.command.startswith("api ")]
    bodies = [m.text for m in t.messages(T.FS) if m.content_type == "api/response"]
    out: dict[str, str] = {}
    for command, body in zip(commands, bodies, strict=True):
        out.setdefault(command[4:], body)  # first answer (before the flush)
    return out


def test_xmlstatus_and_status_text_equal_capture() -> None:
    bodies = _api_bodies("in-api-registrations")
    regs = _captured_registrations(bodies["sofia xmlstatus profile internal reg"])
    assert regs[0].contact == '"" <sip:1001@127.0.0.10:5070;transport=UDP>'  # default derived like the capture
    assert _normalise(S.xmlstatus(regs)) == _normalise(bodies["sofia xmlstatus profile internal reg"])
    one = [r for r in regs if r.aor == "1001@tenant-a.test"]
    user_query = bodies["sofia xmlstatus profile internal user 1001@tenant-a.test"]
    assert _normalise(S.xmlstatus(one)) == _normalise(user_query)
    assert _normalise(S.status_reg(regs)) == _normalise(bodies["sofia status profile internal reg"])
    assert len(S.xmlstatus([]).encode()) == 102


def test_xmlstatus_expiry_fields() -> None:
    reg = S.Registration("1001", "tenant-a.test", network_ip="127.0.0.10", registered_at=1_000_000, expires=3600)
    text = S.xmlstatus([reg], now=1_000_002, late_margin=10)
    assert "expsecs(3608)</status>" in text  # as captured: expires + margin - elapsed


def test_hostile_call_id_is_emitted_raw() -> None:
    bodies = _api_bodies("in-api-hostile-callid")
    captured = bodies["sofia xmlstatus profile internal reg"]
    reg = S.Registration("1003", "tenant-a.test", network_ip="127.0.0.16", network_port=5078,
                         call_id="x<y>\"z\"'q'@127.0.0.16", user_agent="Téléphone ☎ 1.0 <b>&amp;</b>")
    ours = S.xmlstatus([reg])
    assert _normalise(ours) == _normalise(captured)
    with pytest.raises(ET.ParseError):
        ET.fromstring(ours)


def test_directory_variables_follow_the_capture() -> None:
    variables = dict(S.directory_variables("1002", "tenant-a.test"))
    assert variables["extension_uuid"] == "b2808083-8e84-46a3-8651-33e4a8839def"  # captured
    assert variables["presence_id"] == "1002@tenant-a.test"
    assert variables["effective_caller_id_name"] == "Extension 1002"
    other = dict(S.directory_variables("77", "new.example"))
    assert other["user_context"] == "new.example" and other["sip_auth_username"] == "77"
