"""ESL framing: bytes in, messages out, with hard limits.

Pure code (no sockets) so that it can be fuzzed and shared by the daemon and
the simulator.  Why not greenswitch's framing: it URL-decodes a whole payload
before splitting it into lines (a value holding ``%0A`` then forges a header),
decodes each line as UTF-8 (one invalid byte kills the connection) and spins
when a body is cut short by EOF.  Here a header block is split into lines
first and each value is decoded on its own.

What FreeSWITCH sends (see the captures):

* a header block ends with an empty line; ``Content-Length`` announces a body
  of that many *bytes*;
* the outbound ``connect`` reply is one header block without Content-Length,
  every value URL-encoded, ``Content-Type``/``Reply-Text`` last;
* ``text/event-plain`` bodies are themselves URL-encoded header blocks,
  optionally followed by an inner body (BACKGROUND_JOB);
* ``text/event-json`` bodies are one JSON object, every value a string.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

MAX_HEADER_BLOCK = 64 * 1024
MAX_HEADERS = 1024
MAX_BODY = 4 * 1024 * 1024


class ProtocolError(ValueError):
    """The peer sent something that is not ESL, or exceeds a limit."""


def decode_value(raw: bytes) -> str:
    """URL-decode one header value.

    Only ``%XX`` is decoded (FreeSWITCH's switch_url_encode leaves ``+`` as
    is).  Invalid UTF-8 becomes U+FFFD rather than an error: a value is data
    about a call, and a mangled User-Agent must not cost the verdict.
    """
    if b"%" in raw:
        raw = unquote_to_bytes(raw)
    return raw.decode("utf-8", "replace")


class Headers(Mapping[str, str]):
    """Header values, URL-decoded when first read (then cached).

    A call's channel data carries ~180 headers and each of its events ~250,
    of which fsguard reads a handful: decoding them all was most of the CPU a
    decision cost (benchmarks/outbound_bench.py profile).
    """

    __slots__ = ("_raw", "_decoded")

    def __init__(self, raw: dict[str, str]) -> None:
        self._raw = raw  # name -> value as latin-1 text (one char per byte), still encoded
        self._decoded: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        try:
            return self._decoded[name]
        except KeyError:
            value = self._decoded[name] = decode_value(self._raw[name].encode("latin-1"))
            return value

    def __contains__(self, name: object) -> bool:
        return name in self._raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"Headers({dict(self)!r})"


def decode_header_block(block: bytes, max_headers: int = MAX_HEADERS) -> Headers:
    """Split ``Name: value`` lines; the first occurrence of a name wins.

    Values are decoded lazily (``Headers``); a malformed line raises
    ProtocolError here, before anything is used.  (str.split over the
    latin-1 view measured faster than any regex over the block.)
    """
    lines = block.decode("latin-1").split("\n")
    if len(lines) > max_headers:
        raise ProtocolError(f"too many header lines ({len(lines)} > {max_headers})")
    raw: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name[0] in " \t" or name[-1] in " \t":
            if line.rstrip("\r"):
                raise ProtocolError(f"malformed header line {line[:80].encode('latin-1')!r}")
            continue
        if name not in raw:
            raw[name] = value[1:].rstrip("\r") if value[:1] == " " else value.rstrip("\r")
    return Headers(raw)


def plain_field(block: bytes, name: str) -> str | None:
    """One header of a plain header block, found without splitting the block.

    A raw line break cannot occur inside an (URL-encoded) value, so
    ``\nName: `` can only match at the start of a line.
    """
    key = name.encode("ascii") + b": "
    if block.startswith(key):
        start = len(key)
    else:
        found = block.find(b"\n" + key)
        if found < 0:
            return None
        start = found + 1 + len(key)
    end = block.find(b"\n", start)
    return decode_value(block[start : end if end >= 0 else len(block)].rstrip(b"\r"))


class BlockHeaders(Mapping[str, str]):
    """The headers of one raw block, read where they are needed.

    Looking one header up (``get``, ``[]``, ``in``) finds its line in the
    raw bytes (C-speed ``find``) and decodes that value only; iterating
    splits and validates the whole block once.  A call's channel data has
    ~180 headers and each of its events ~250, of which fsguard reads a few:
    decoding them all was most of a decision's CPU (outbound benchmark).
    """

    __slots__ = ("_block", "_found", "_all")

    def __init__(self, block: bytes) -> None:
        self._block = block
        self._found: dict[str, str | None] = {}
        self._all: Headers | None = None

    def _lookup(self, name: str) -> str | None:
        if self._all is not None or not name.isascii():
            return self._decoded().get(name)
        try:
            return self._found[name]
        except KeyError:
            value = self._found[name] = plain_field(self._block, name)
            return value

    def __getitem__(self, name: str) -> str:
        value = self._lookup(name)
        if value is None:
            raise KeyError(name)
        return value

    def get(self, name: str, default=None):  # type: ignore[override]
        value = self._lookup(name)
        return default if value is None else value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def _decoded(self) -> Headers:
        if self._all is None:
            self._all = decode_header_block(self._block)
        return self._all

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())

    def __repr__(self) -> str:
        return f"BlockHeaders({dict(self)!r})"


@dataclass(slots=True)
class Message:
    """One ESL message: its outer headers and raw body."""

    headers: Mapping[str, str]
    body: bytes = b""
    command: str = ""  # first line of a command block (reader in command mode)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    @property
    def reply_text(self) -> str:
        return self.headers.get("Reply-Text", "")

    @property
    def is_reply(self) -> bool:
        return self.content_type in ("command/reply", "api/response")

    @property
    def ok(self) -> bool:
        """A ``command/reply`` or ``api/response`` that does not start with -ERR."""
        text = self.reply_text if self.content_type == "command/reply" else self.text
        return not text.startswith("-ERR")

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def event(self) -> Event | None:
        """The event this message carries, if it is an event."""
        if self.content_type == "text/event-plain":
            return parse_plain_event(self.body)
        if self.content_type == "text/event-json":
            return parse_json_event(self.body)
        return None


@dataclass(slots=True)
class Event:
    """An ESL event: its headers (read on demand for plain events) plus the optional inner body."""

    headers: Mapping[str, str]
    body: str = ""

    @property
    def name(self) -> str:
        return self.headers.get("Event-Name", "")

    @property
    def subclass(self) -> str:
        return self.headers.get("Event-Subclass", "")

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.headers.get(key, default)


def parse_plain_event(body: bytes, max_headers: int = MAX_HEADERS) -> Event:
    block, sep, rest = body.partition(b"\n\n")
    lines = block.count(b"\n") + 1
    if lines > max_headers:
        raise ProtocolError(f"too many header lines ({lines} > {max_headers})")
    headers = BlockHeaders(block)
    inner = b""
    length = headers.get("Content-Length") if sep else None
    if length is not None:
        inner = rest[: _content_length(length)]
    return Event(headers, inner.decode("utf-8", "replace"))


def parse_json_event(body: bytes) -> Event:
    try:
        # Raw bytes from a device (a User-Agent) need not be UTF-8: replace, do not fail.
        data = json.loads(body.decode("utf-8", "replace"))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"event-json body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("event-json body is not a JSON object")
    inner = data.pop("_body", "")
    headers = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}
    return Event(headers, inner if isinstance(inner, str) else "")


def _content_length(value: str, limit: int = MAX_BODY) -> int:
    if not value.isascii() or not value.isdigit():
        raise ProtocolError(f"bad Content-Length {value[:40]!r}")
    length = int(value)
    if length > limit:
        raise ProtocolError(f"Content-Length {length} exceeds the limit of {limit}")
    return length


@dataclass
class MessageReader:
    """Incremental ESL decoder: ``feed()`` bytes, get complete messages.

    Bounded: a header block longer than ``max_header_block`` or a body larger
    than ``max_body`` raises ProtocolError instead of growing the buffer.
    """

    max_header_block: int = MAX_HEADER_BLOCK
    max_headers: int = MAX_HEADERS
    max_body: int = MAX_BODY
    commands: bool = False  # parse what an ESL client sends (first line = command)
    _buffer: bytearray = field(default_factory=bytearray)
    _pending: Message | None = None
    _body_length: int = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        messages: list[Message] = []
        while True:
            message = self._next()
            if message is None:
                return messages
            messages.append(message)

    def _next(self) -> Message | None:
        if self._pending is None:
            # Skip stray blank lines between messages, as FreeSWITCH's own
            # client does.
            while self._buffer[:1] == b"\n":
                del self._buffer[:1]
            end = self._buffer.find(b"\n\n")
            if end < 0:
                if len(self._buffer) > self.max_header_block:
                    raise ProtocolError(f"header block exceeds {self.max_header_block} bytes")
                return None
            if end > self.max_header_block:
                raise ProtocolError(f"header block exceeds {self.max_header_block} bytes")
            block = bytes(self._buffer[:end])
            del self._buffer[: end + 2]
            first = ""
            if self.commands:
                first_line, _, block = block.partition(b"\n")
                first = first_line.decode("utf-8", "replace").rstrip("\r")
            lines = block.count(b"\n") + 1
            if lines > self.max_headers:
                raise ProtocolError(f"too many header lines ({lines} > {self.max_headers})")
            headers = BlockHeaders(block)
            message = Message(headers, command=first)
            length = headers.get("Content-Length")
            if length is None:
                return message
            self._pending = message
            self._body_length = _content_length(length, self.max_body)
        if len(self._buffer) < self._body_length:
            return None
        message, self._pending = self._pending, None
        if len(self._buffer) == self._body_length:
            # The usual end of a large body: hand the buffer over, no copy.
            message.body, self._buffer = bytes(self._buffer), bytearray()
        else:
            with memoryview(self._buffer) as view:
                message.body = bytes(view[: self._body_length])
            del self._buffer[: self._body_length]
        return message


def command(name: str, **headers: str) -> bytes:
    """Encode one ESL command; header names use ``_`` for ``-``.

    Values must not contain newlines: that would inject a second command.
    """
    lines = [name]
    for key, value in headers.items():
        lines.append(f"{key.replace('_', '-')}: {value}")
    text = "\n".join(lines)
    if text.count("\n") != len(headers) or "\r" in text:
        raise ValueError(f"line break inside ESL command {name!r}")
    return (text + "\n\n").encode("utf-8")


def execute(app: str, arg: str = "", event_lock: bool = True) -> bytes:
    """``sendmsg`` that runs a dialplan application on the controlled channel."""
    headers = {"call_command": "execute", "execute_app_name": app}
    if arg:
        headers["execute_app_arg"] = arg
    if event_lock:
        headers["event_lock"] = "true"
    return command("sendmsg", **headers)


def hangup(cause: str) -> bytes:
    return command("sendmsg", call_command="hangup", hangup_cause=cause)
