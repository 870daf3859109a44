import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fsguard.registrations import LookupFailed, parse_xmlstatus
from tests.helpers import capture_messages


def api_replies(name):
    commands = [m.command for m in capture_messages(name, "app>fs") if m.command.startswith("api ")]
    replies = [m for m in capture_messages(name, "fs>app") if m.content_type == "api/response"]
    first = {}
    for cmd, reply in zip(commands, replies):
        first.setdefault(cmd, reply.body)  # the capture repeats commands after a flush
    return first


REGS = api_replies("in-api-registrations")
HOSTILE = api_replies("in-api-hostile-callid")


def test_profile_reg_lists_one_binding_per_call_id():
    bindings = parse_xmlstatus(REGS["api sofia xmlstatus profile internal reg"], now=1000.0, profile="internal")
    assert [(b.identity, b.network_ip, b.network_port) for b in bindings] == [
        ("1001@tenant-a.test", "127.0.0.10", "5070"),
        ("1001@tenant-b.test", "127.0.0.11", "5071"),
        ("1002@tenant-a.test", "127.0.0.12", "5072"),
        ("1002@tenant-a.test", "127.0.0.13", "5073"),
    ]
    first = bindings[0]
    assert first.user_agent == 'Yealink SIP-T46S 66.86.0.15 "quoted" & <x>'
    assert first.contact == '"" <sip:1001@127.0.0.10:5070;transport=UDP>'
    assert first.expires_at == 1000.0 + 3608 and first.transport == "UDP" and first.profile == "internal"


def test_user_lookup_and_ipv6():
    [one] = parse_xmlstatus(REGS["api sofia xmlstatus profile internal user 1001@tenant-a.test"], now=0)
    assert one.identity == "1001@tenant-a.test"
    [v6] = parse_xmlstatus(REGS["api sofia xmlstatus profile internal-ipv6 reg"], now=0)
    assert v6.network_ip == "::1" and v6.identity == "1003@tenant-a.test"


def test_empty_document_means_no_registrations():
    replies = [m.body for m in capture_messages("in-api-registrations", "fs>app") if m.content_type == "api/response"]
    empty = [body for body in replies if len(body) == 102]  # after flush_inbound_reg
    assert len(empty) == 2 and all(parse_xmlstatus(body, now=0) == [] for body in empty)


def test_hostile_call_id_breaks_xml_but_not_the_parser():
    body = HOSTILE["api sofia xmlstatus profile internal user 1003@tenant-a.test"]
    import xml.etree.ElementTree as ET

    with pytest.raises(ET.ParseError):
        ET.fromstring(body)
    [binding] = parse_xmlstatus(body, now=0)
    assert binding.call_id == "x<y>\"z\"'q'@127.0.0.16"
    assert binding.user_agent == "Téléphone ☎ 1.0 <b>&amp;</b>"
    assert binding.network_ip == "127.0.0.16"


@pytest.mark.parametrize(
    "reply",
    [b"Invalid Profile!\n", b"-ERR nosuchcommand Command not found!\n", b"", b"\x00\xff garbage", b"<?xml version"],
)
def test_non_documents_raise_lookup_failed(reply):
    with pytest.raises(LookupFailed):
        parse_xmlstatus(reply, now=0)


def test_truncated_document_raises():
    body = REGS["api sofia xmlstatus profile internal reg"]
    with pytest.raises(LookupFailed):
        parse_xmlstatus(body[: len(body) // 2], now=0)


def _row(call_id, user="1002", realm="tenant-a.test", ip="127.0.0.12"):
    return (
        "    <registration>\n"
        f"        <call-id>{call_id}</call-id>\n"
        f"        <user>{user}@{realm}</user>\n"
        "        <status>Registered(UDP)(unknown) exp(2026-11-22 19:01:34) expsecs(60)</status>\n"
        f"        <network-ip>{ip}</network-ip>\n"
        "        <network-port>5072</network-port>\n"
        f"        <sip-auth-user>{user}</sip-auth-user>\n"
        f"        <sip-auth-realm>{realm}</sip-auth-realm>\n"
        "    </registration>\n"
    )


def _doc(*rows):
    return ('<?xml version="1.0" encoding="ISO-8859-1"?>\n<profile>\n  <registrations>\n'
            + "".join(rows) + "  </registrations>\n</profile>\n").encode()


def test_call_id_cannot_forge_a_row_for_another_user():
    forged = ("a</call-id></registration><registration><call-id>b</call-id>"
              "<network-ip>6.6.6.6</network-ip><sip-auth-user>1001</sip-auth-user>"
              "<sip-auth-realm>tenant-a.test</sip-auth-realm></registration><registration><call-id>c")
    bindings = parse_xmlstatus(_doc(_row(forged), _row("ok")), now=0)
    assert [(b.identity, b.network_ip) for b in bindings] == [
        ("1002@tenant-a.test", "127.0.0.12"),
        ("1002@tenant-a.test", "127.0.0.12"),
    ]
    assert bindings[0].call_id == forged


def test_row_with_repeated_element_is_dropped_others_kept():
    bad = _row("x").replace("<network-port>", "<network-ip>6.6.6.6</network-ip>\n        <network-port>")
    bindings = parse_xmlstatus(_doc(bad, _row("good", ip="127.0.0.13")), now=0)
    assert [b.network_ip for b in bindings] == ["127.0.0.13"]


def test_row_without_ip_is_dropped():
    row = _row("x").replace("        <network-ip>127.0.0.12</network-ip>\n", "")
    assert parse_xmlstatus(_doc(row), now=0) == []


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.binary(max_size=200))
def test_any_call_id_or_trailing_bytes_never_crash(call_id, junk):
    call_id = call_id.replace("\n", "").replace("\r", "")
    doc = _doc(_row(call_id), _row("good", ip="127.0.0.13"))
    bindings = parse_xmlstatus(doc, now=0)
    assert ("127.0.0.13", "good") in [(b.network_ip, b.call_id) for b in bindings]
    try:
        parse_xmlstatus(junk + doc + junk, now=0)
    except LookupFailed:
        pass
