"""Captured FreeSWITCH ESL transcripts, and FreeSWITCH's wire encodings.

The captures in ``fixtures/freeswitch/`` (see its README.md) are the ground
truth for the simulators in :mod:`fsguard.testing.caller` (outbound role) and
:mod:`fsguard.testing.switch` (inbound role).  This module loads them and
holds the few encoding helpers both simulators need to produce the same
bytes FreeSWITCH produces.

Public API
----------
``FIXTURES``
    Path of the fixtures directory (found relative to this module).
``load(name) -> Transcript``
    ``name`` with or without ``.jsonl``; cached.
``Transcript``
    ``.name``, ``.meta``, ``.entries`` (``Entry(t, dir, data: bytes)``),
    ``.stream(direction) -> bytes``, ``.messages(direction) -> list[Message]``,
    ``.raw_messages(direction) -> list[tuple[Message, bytes]]``,
    ``.channel_data -> bytes`` (exact bytes of the outbound ``connect`` reply),
    ``.events(name) -> list[bytes]`` (exact bytes of each fs>app event message
    whose Event-Name or Event-Subclass is ``name``).
``RawReader``
    :class:`~fsguard.esl.protocol.MessageReader` that also returns the exact
    bytes of every message (the simulators record and replay those).
Wire helpers (as FreeSWITCH writes them)
    ``url_encode``, ``plain_body``, ``json_body``, ``event_message``,
    ``command_reply``, ``api_response``, ``disconnect_notice``,
    ``linger_notice``, ``parse_subscription``, ``Subscription``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

from fsguard.esl.protocol import Message, MessageReader, decode_value

FIXTURES: Path = Path(__file__).resolve().parent / "fixtures" / "freeswitch"

Direction = Literal["fs>app", "app>fs"]
FS: Direction = "fs>app"
APP: Direction = "app>fs"

# Raw header list: (name, value exactly as on the wire, i.e. URL-encoded).
RawHeaders = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Entry:
    """One transcript line: what one recv() returned / one sendall() sent."""

    t: float
    dir: Direction
    data: bytes


class RawReader:
    """Incremental ESL reader returning ``(message, exact bytes)`` pairs.

    Framing is delegated to :class:`MessageReader`; this only keeps a copy of
    the consumed bytes so each message's original bytes can be cut out.  The
    reader skips blank lines before a header block and ends the block at the
    first empty line, then takes Content-Length bytes, so the slice is:
    leading newlines skipped, up to the blank line, plus the body.
    """

    def __init__(self, commands: bool = False) -> None:
        self._reader = MessageReader(commands=commands)
        self._pending = bytearray()

    @property
    def buffered(self) -> int:
        return self._reader.buffered

    def feed(self, data: bytes) -> list[tuple[Message, bytes]]:
        self._pending += data
        out: list[tuple[Message, bytes]] = []
        for message in self._reader.feed(data):
            start = 0
            while self._pending[start : start + 1] == b"\n":
                start += 1
            end = self._pending.find(b"\n\n", start) + 2 + len(message.body)
            out.append((message, bytes(self._pending[start:end])))
            del self._pending[:end]
        return out


@dataclass
class Transcript:
    """One capture: meta and the byte stream in both directions."""

    name: str
    meta: dict
    entries: list[Entry]
    _raw: dict[str, list[tuple[Message, bytes]]] = field(default_factory=dict, repr=False)

    def stream(self, direction: Direction) -> bytes:
        # Chunk boundaries are incidental (README): only the stream matters.
        return b"".join(e.data for e in self.entries if e.dir == direction)

    def raw_messages(self, direction: Direction) -> list[tuple[Message, bytes]]:
        if direction not in self._raw:
            reader = RawReader(commands=direction == APP)
            messages = reader.feed(self.stream(direction))
            if reader.buffered:
                raise ValueError(f"{self.name}: {reader.buffered} bytes left over in {direction}")
            self._raw[direction] = messages
        return self._raw[direction]

    def messages(self, direction: Direction) -> list[Message]:
        return [m for m, _ in self.raw_messages(direction)]

    @property
    def channel_data(self) -> bytes:
        """Exact bytes of the reply to the outbound ``connect`` command."""
        for message, raw in self.raw_messages(FS):
            if message.headers.get("Event-Name") == "CHANNEL_DATA" and message.is_reply:
                return raw
        raise LookupError(f"{self.name} has no CHANNEL_DATA reply")

    def events(self, name: str) -> list[bytes]:
        """Exact bytes of every fs>app event named ``name`` (or subclass)."""
        found = []
        for message, raw in self.raw_messages(FS):
            event = message.event()
            if event is not None and name in (event.name, event.subclass):
                found.append(raw)
        return found


def load(name: str) -> Transcript:
    """Load ``fixtures/freeswitch/<name>.jsonl`` (cached, treat as read-only)."""
    return _load(name.removesuffix(".jsonl"))


@cache
def _load(stem: str) -> Transcript:
    lines = (FIXTURES / f"{stem}.jsonl").read_text(encoding="utf-8").splitlines()
    meta = json.loads(lines[0])["meta"]
    entries = []
    for line in lines[1:]:
        item = json.loads(line)
        # README: data is UTF-8 text; Content-Length counts the UTF-8 bytes.
        entries.append(Entry(item["t"], item["dir"], item["data"].encode("utf-8")))
    return Transcript(stem, meta, entries)


# --------------------------------------------------------------------------
# Wire helpers: how FreeSWITCH encodes what it sends.

# README "Plain encoding rule" (switch_url_encode, confirmed on every value of
# the captures): these printable characters stay, everything else is %XX.
_URL_KEEP = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!$'()*,-./_~")
_HEX = frozenset(b"0123456789abcdefABCDEF")


def url_encode(value: str) -> str:
    """switch_url_encode: upper-case %XX, an existing %XX is left alone."""
    raw = value.encode("utf-8")
    out = []
    for i, byte in enumerate(raw):
        if byte in _URL_KEEP:
            out.append(chr(byte))
        elif byte == 0x25 and raw[i + 1 : i + 2] and raw[i + 1] in _HEX and raw[i + 2 : i + 3] and raw[i + 2] in _HEX:
            # Per the README (from the source): a %XX already in a value is not re-encoded.
            out.append("%")
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def encode_headers(headers: list[tuple[str, str]]) -> RawHeaders:
    return [(name, url_encode(value).encode("ascii")) for name, value in headers]


def plain_body(headers: RawHeaders, body: bytes = b"") -> bytes:
    """switch_event_serialize: ``Name: value`` lines, blank line, optional body."""
    lines = b"".join(name.encode() + b": " + value + b"\n" for name, value in headers)
    if body:
        # Not captured for outbound; BACKGROUND_JOB (in-api-registrations) shows the form.
        return lines + b"Content-Length: %d\n\n" % len(body) + body
    return lines + b"\n"


def json_body(headers: RawHeaders, body: bytes = b"") -> bytes:
    """switch_event_serialize_json as captured: duplicated keys kept, all strings.

    ``/`` and non-ASCII are not escaped and there is no trailing newline
    (README).  With a body: ``Content-Length`` and ``_body`` keys (not
    captured: per FreeSWITCH source, switch_event_serialize_json).
    """
    items = [(name, decode_value(value)) for name, value in headers]
    if body:
        items += [("Content-Length", str(len(body))), ("_body", body.decode("utf-8", "replace"))]
    dump = lambda s: json.dumps(s, ensure_ascii=False)  # noqa: E731 - tiny local alias
    return ("{" + ",".join(f"{dump(k)}:{dump(v)}" for k, v in items) + "}").encode("utf-8")


def event_message(headers: RawHeaders, fmt: str = "plain", body: bytes = b"") -> bytes:
    """One ``text/event-plain|json`` message (outer headers as captured)."""
    payload = json_body(headers, body) if fmt == "json" else plain_body(headers, body)
    return b"Content-Length: %d\nContent-Type: text/event-%s\n\n" % (len(payload), fmt.encode()) + payload


def command_reply(text: str, extra: str = "") -> bytes:
    return f"Content-Type: command/reply\nReply-Text: {text}\n{extra}\n".encode("utf-8")


def api_response(body: bytes | str) -> bytes:
    data = body.encode("utf-8") if isinstance(body, str) else body
    return b"Content-Type: api/response\nContent-Length: %d\n\n" % len(data) + data


GOODBYE = "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
SHUTTING_DOWN = "The system is being shut down.\n"


def disconnect_notice(session_uuid: str | None = None, message: str = GOODBYE) -> bytes:
    """text/disconnect-notice; outbound sessions add Controlled-Session-UUID."""
    body = message.encode("utf-8")
    head = "Content-Type: text/disconnect-notice\n"
    if session_uuid:
        head += f"Controlled-Session-UUID: {session_uuid}\nContent-Disposition: disconnect\n"
    return head.encode() + b"Content-Length: %d\n\n" % len(body) + body


def linger_notice(session_uuid: str, channel_name: str, linger_time: int = -1) -> bytes:
    # Captured: Channel-Name is sent decoded (not URL-encoded).
    return (
        "Content-Type: text/disconnect-notice\n"
        f"Controlled-Session-UUID: {session_uuid}\n"
        "Content-Disposition: linger\n"
        f"Channel-Name: {channel_name}\n"
        f"Linger-Time: {linger_time}\n"
        "Content-Length: 0\n\n"
    ).encode("utf-8")


def parse_headers(block: bytes) -> RawHeaders:
    """Split ``Name: value`` lines of a header block, values kept raw."""
    headers: RawHeaders = []
    for line in block.split(b"\n"):
        if line:
            name, _, value = line.partition(b": ")
            headers.append((name.decode("ascii"), value))
    return headers


# Event names FreeSWITCH accepts in ``event``/``nixevent`` (switch_event.c
# EVENT_NAMES; not captured: per FreeSWITCH source).  Unknown names are
# ignored, and a command without any known name gets "-ERR no keywords".
EVENT_NAMES = frozenset(
    """CUSTOM CLONE CHANNEL_CREATE CHANNEL_DESTROY CHANNEL_STATE CHANNEL_CALLSTATE
    CHANNEL_ANSWER CHANNEL_HANGUP CHANNEL_HANGUP_COMPLETE CHANNEL_EXECUTE
    CHANNEL_EXECUTE_COMPLETE CHANNEL_HOLD CHANNEL_UNHOLD CHANNEL_BRIDGE CHANNEL_UNBRIDGE
    CHANNEL_PROGRESS CHANNEL_PROGRESS_MEDIA CHANNEL_OUTGOING CHANNEL_PARK CHANNEL_UNPARK
    CHANNEL_APPLICATION CHANNEL_ORIGINATE CHANNEL_UUID API LOG INBOUND_CHAN OUTBOUND_CHAN
    STARTUP SHUTDOWN PUBLISH UNPUBLISH TALK NOTALK SESSION_CRASH MODULE_LOAD MODULE_UNLOAD
    DTMF MESSAGE PRESENCE_IN NOTIFY_IN PRESENCE_OUT PRESENCE_PROBE MESSAGE_WAITING
    MESSAGE_QUERY ROSTER CODEC BACKGROUND_JOB DETECTED_SPEECH DETECTED_TONE
    PRIVATE_COMMAND HEARTBEAT TRAP ADD_SCHEDULE DEL_SCHEDULE EXE_SCHEDULE RE_SCHEDULE
    RELOADXML NOTIFY PHONE_FEATURE PHONE_FEATURE_SUBSCRIBE SEND_MESSAGE RECV_MESSAGE
    REQUEST_PARAMS CHANNEL_DATA GENERAL COMMAND SESSION_HEARTBEAT CLIENT_DISCONNECTED
    SERVER_DISCONNECTED SEND_INFO RECV_INFO RECV_RTCP_MESSAGE SEND_RTCP_MESSAGE CALL_SECURE
    NAT RECORD_START RECORD_STOP PLAYBACK_START PLAYBACK_STOP CALL_UPDATE FAILURE
    SOCKET_DATA MEDIA_BUG_START MEDIA_BUG_STOP CONFERENCE_DATA_QUERY CONFERENCE_DATA
    CALL_SETUP_REQ CALL_SETUP_RESULT CALL_DETAIL DEVICE_STATE TEXT SHUTDOWN_REQUESTED ALL""".split()
)


@dataclass
class Subscription:
    """What one ESL connection asked for with ``event``/``myevents``."""

    fmt: str = "plain"
    names: set[str] = field(default_factory=set)
    subclasses: set[str] = field(default_factory=set)
    myevents: bool = False

    @property
    def active(self) -> bool:
        return bool(self.names) or self.myevents

    def wants(self, name: str, subclass: str = "") -> bool:
        # mod_event_socket event_handler: ALL, or the name (CUSTOM also
        # needs a subscribed subclass when the event has one).
        if "ALL" in self.names:
            return True
        if name not in self.names:
            return False
        return name != "CUSTOM" or not subclass or subclass in self.subclasses


def parse_subscription(sub: Subscription, args: list[str]) -> str:
    """Apply ``event <fmt> <names...>`` arguments; return FreeSWITCH's reply.

    As in mod_event_socket parse_command: the first word may be the format,
    every word after CUSTOM is a subclass, unknown names are ignored.
    """
    custom = False
    known = 0
    for index, word in enumerate(args):
        if index == 0 and word.lower() in ("plain", "json", "xml"):
            sub.fmt = word.lower()
            continue
        if custom:
            sub.subclasses.add(word)
        elif word.upper().removeprefix("SWITCH_EVENT_") in EVENT_NAMES:
            name = word.upper().removeprefix("SWITCH_EVENT_")
            sub.names.add(name)
            known += 1
            custom = custom or name == "CUSTOM"
    if not known:
        return "-ERR no keywords supplied"
    return f"+OK event listener enabled {sub.fmt}"
