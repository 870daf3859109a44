"""Hostile input, property-based: parsers reject with a clear error or parse, never crash or grow.

Run ``pytest tests/unit/test_fuzz.py --hypothesis-show-statistics`` for the case counts.
"""

from __future__ import annotations

import json
from urllib.parse import quote_from_bytes

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsguard.call import facts_from_channel_data
from fsguard.esl.protocol import MessageReader, ProtocolError, parse_json_event, parse_plain_event
from fsguard.policy import Policy, decide, needs_registrations
from fsguard.registrations import LookupFailed, Registrations, change_from_event, parse_profiles, parse_xmlstatus

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
nasty_text = st.lists(st.characters(codec="utf-8").map(str) | st.sampled_from(
    ["\x00", "<", "&", "%", "\n", "%0A", "%zz", "%C3", ":", "</call-id>", "&amp;"]), max_size=30).map("".join)
nasty_bytes = st.binary(max_size=200) | nasty_text.map(lambda t: t.encode("utf-8", "surrogatepass"))


@FUZZ
@given(st.lists(st.tuples(nasty_text, nasty_bytes), max_size=40), st.sampled_from([None, -1, 0, 5, 10**12]))
def test_framing_with_lying_lengths_and_hostile_headers(headers, length):
    block = b"\n".join(f"{k}".encode("utf-8", "surrogatepass") + b": " + v for k, v in headers)
    if length is not None:
        block += b"\nContent-Length: %d" % length
    reader = MessageReader(max_header_block=4096, max_body=4096, max_headers=64)
    try:
        for message in reader.feed(block + b"\n\n" + b"x" * 100):
            assert all(isinstance(v, str) for v in message.headers.values())
    except ProtocolError as exc:
        assert str(exc)  # a clear reason
    assert reader.buffered <= 4096 + 100 + 64


@FUZZ
@given(st.integers(min_value=0, max_value=5000))
def test_huge_numbers_of_headers_are_refused(count):
    block = b"".join(b"H%d: v\n" % i for i in range(count)) + b"\n"
    try:
        messages = MessageReader(max_headers=1024, max_header_block=1 << 20).feed(block)
        assert [len(m.headers) for m in messages] == ([count] if count else [])
        assert count <= 1024
    except ProtocolError as exc:
        assert count > 1024 and "too many header lines" in str(exc)


@FUZZ
@given(nasty_bytes)
def test_json_event_parser(body):
    try:
        event = parse_json_event(body)
        assert all(isinstance(v, str) for v in event.headers.values())
    except ProtocolError as exc:
        assert "event-json" in str(exc)


@FUZZ
@given(st.dictionaries(nasty_text, nasty_text | st.integers() | st.none() | st.lists(st.integers()), max_size=20))
def test_json_events_of_any_shape_map_to_a_change_or_nothing(data):
    data.setdefault("Event-Subclass", "sofia::register")
    event = parse_json_event(json.dumps(data).encode())
    change_from_event(event.headers, "fs1", 0.0, 0.0)  # never raises


@FUZZ
@given(st.dictionaries(st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,30}", fullmatch=True), nasty_bytes, max_size=30))
def test_plain_events_and_channel_data_with_escapes_nuls_and_invalid_utf8(headers):
    block = b"\n".join(k.encode() + b": " + quote_from_bytes(v).encode() for k, v in headers.items())
    event = parse_plain_event(block + b"\n\n")
    facts = facts_from_channel_data(event.headers)
    policy = Policy()
    answer = Registrations(facts.identity, (), "live") if needs_registrations(facts, policy) else None
    verdict = decide(facts, answer, policy, 0.0)
    assert verdict.action in ("allow", "deny")


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["call-id", "sip-auth-user", "sip-auth-realm", "network-ip", "agent",
                                           "contact", "status", "registration", "/registration", "junk"]),
                          nasty_text), max_size=40))
def test_xmlstatus_parser_on_hostile_documents(elements):
    rows = "".join(f"<{tag}>{value}</{tag}>\n" if not tag.startswith("/") and tag != "registration"
                   else f"<{tag}>\n" for tag, value in elements)
    doc = ('<?xml version="1.0" encoding="ISO-8859-1"?>\n<profile>\n  <registrations>\n' + rows
           + "  </registrations>\n</profile>\n").encode("utf-8", "surrogatepass")
    try:
        for binding in parse_xmlstatus(doc, now=0.0):
            assert binding.user and binding.network_ip
    except LookupFailed as exc:
        assert str(exc)


@FUZZ
@given(nasty_bytes)
def test_profile_list_parser(reply):
    try:
        assert all(isinstance(name, str) for name in parse_profiles(b'<?xml?>\n<profiles>\n' + reply + b"</profiles>\n"))
    except LookupFailed:
        pass
