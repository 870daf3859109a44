import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fsguard.esl.protocol import (
    MessageReader,
    ProtocolError,
    command,
    decode_header_block,
    decode_value,
    execute,
    hangup,
)
from tests.helpers import CAPTURES, capture_messages


@pytest.mark.parametrize("path", sorted(CAPTURES.glob("*.jsonl")), ids=lambda p: p.stem)
def test_every_capture_splits_into_whole_messages(path):
    for direction in ("fs>app", "app>fs"):
        for message in capture_messages(path.stem, direction):
            if message.content_type in ("text/event-plain", "text/event-json"):
                assert message.event().headers


def test_connect_reply_has_no_length_and_encoded_reply_text():
    reply = capture_messages("out-allow-registered-ip", "fs>app")[0]
    assert reply.content_type == "command/reply"
    assert reply.reply_text == "+OK\n"  # sent as %2BOK%0A
    assert "Content-Length" not in reply.headers
    assert reply.headers["variable_sip_auth_username"] == "1001"
    assert reply.headers["Socket-Mode"] == "async"
    assert len(reply.headers) > 170


def test_value_decoding_is_per_line_so_encoded_newline_cannot_forge_a_header():
    headers = decode_header_block(b"A: x%0AB: forged\nC: %E2%98%8E")
    assert headers == {"A": "x\nB: forged", "C": "\u260e"}


def test_invalid_utf8_becomes_replacement_character():
    assert decode_value(b"T%C3l") == "T\ufffdl"


def test_plus_is_not_a_space():
    assert decode_value(b"+OK%20x") == "+OK x"


def test_special_user_agent_from_capture_decodes():
    assert decode_value(b"Yealink%20SIP-T46S%2066.86.0.15%20%22quoted%22%20%26%20%3Cx%3E") == (
        'Yealink SIP-T46S 66.86.0.15 "quoted" & <x>'
    )


def test_body_split_across_feeds():
    reader = MessageReader()
    data = b"Content-Type: api/response\nContent-Length: 5\n\nfalse"
    assert reader.feed(data[:30]) == []
    assert reader.feed(data[30:47]) == []
    [message] = reader.feed(data[47:])
    assert message.text == "false" and message.content_type == "api/response"


@pytest.mark.parametrize("length", [b"-1", b"abc", b"1e3", b"99999999999"])
def test_bad_content_length_is_rejected(length):
    with pytest.raises(ProtocolError):
        MessageReader().feed(b"Content-Type: x\nContent-Length: " + length + b"\n\n")


def test_oversized_header_block_is_rejected_not_buffered():
    reader = MessageReader(max_header_block=1024)
    with pytest.raises(ProtocolError):
        reader.feed(b"A: " + b"x" * 2000)


def test_too_many_headers_rejected():
    with pytest.raises(ProtocolError):
        MessageReader(max_headers=10).feed(b"".join(b"H%d: v\n" % i for i in range(20)) + b"\n")


def test_commands_are_encoded_as_captured():
    assert execute("set", "fsguard_verdict=allow") == (
        b"sendmsg\ncall-command: execute\nexecute-app-name: set\n"
        b"execute-app-arg: fsguard_verdict=allow\nevent-lock: true\n\n"
    )
    assert hangup("CALL_REJECTED") == b"sendmsg\ncall-command: hangup\nhangup-cause: CALL_REJECTED\n\n"
    assert command("connect") == b"connect\n\n"


@pytest.mark.parametrize("bad", ["a\nb", "a\r", "x\n\nexit"])
def test_command_refuses_line_breaks(bad):
    with pytest.raises(ValueError):
        execute("set", bad)
    with pytest.raises(ValueError):
        command(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096), st.lists(st.integers(min_value=1, max_value=64), max_size=40))
def test_reader_never_fails_other_than_protocol_error(data, cuts):
    reader = MessageReader(max_header_block=2048, max_body=4096)
    position = 0
    try:
        for cut in cuts + [len(data)]:
            for message in reader.feed(data[position : position + cut]):
                message.event() if message.content_type.startswith("text/event") else None
            position += cut
    except ProtocolError:
        pass
    assert reader.buffered <= 2048 + 4096 + 64


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,20}", fullmatch=True), st.text(max_size=50), max_size=20))
def test_encoded_headers_round_trip(headers):
    from urllib.parse import quote

    block = "\n".join(f"{k}: {quote(v, safe='')}" for k, v in headers.items()).encode()
    assert decode_header_block(block) == headers


def test_verdict_commands_are_single_api_lines():
    from fsguard.esl.outbound import verdict_command
    from fsguard.policy import Action

    uuid = "2d7de648-4ca7-4d57-a317-3171d3878734"
    assert verdict_command(uuid, Action.DENY, "ip-not-registered") == (
        f"api uuid_kill {uuid} CALL_REJECTED\n\n".encode())
    assert verdict_command(uuid, Action.ALLOW, "registered-ip") == (
        f"api uuid_setvar_multi {uuid} fsguard_reason=registered-ip;fsguard_verdict=allow\n\n".encode())


@pytest.mark.parametrize("uuid", ["a b", "a;fsguard_verdict=allow", "a\nexit", "", "caf\u00e9"])
def test_a_uuid_that_would_change_the_api_command_is_refused(uuid):
    from fsguard.esl.outbound import verdict_command
    from fsguard.policy import Action

    with pytest.raises((ProtocolError, ValueError)):
        verdict_command(uuid, Action.ALLOW, "registered-ip")


def test_a_reason_that_would_add_a_variable_is_refused():
    from fsguard.esl.outbound import verdict_command
    from fsguard.policy import Action

    with pytest.raises(ValueError):
        verdict_command("2d7de648", Action.ALLOW, "x;fsguard_verdict=allow")
